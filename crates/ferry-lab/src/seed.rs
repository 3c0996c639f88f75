//! The seed's manifests (the blog post's Nextcloud walk-through), as the demo, the failover
//! benchmark and the tests apply them.

pub const NEXTCLOUD_DEV: &str = include_str!("../manifests/seed/nextcloud-dev.yaml");
pub const NEXTCLOUD_DEV_CLUSTERIP: &str =
    include_str!("../manifests/seed/nextcloud-dev-clusterip.yaml");
pub const NEXTCLOUD_DEV_NODEPORT: &str =
    include_str!("../manifests/seed/nextcloud-dev-nodeport.yaml");
pub const NEXTCLOUD_DEV_LOADBALANCER: &str =
    include_str!("../manifests/seed/nextcloud-dev-loadbalancer.yaml");
pub const METALLB_CONFIG: &str = include_str!("../manifests/seed/metallb-config.yaml");

/// The seed's `kubectl run debian-bash --image debian bash`, as a Pod.
pub const DEBIAN_BASH: &str = include_str!("../manifests/seed/debian-bash.yaml");

/// BGP mode for `ferry lab up --bgp`: a bgp pool, a BGPAdvertisement and a BGPPeer pointing at
/// the lab's router.
pub const METALLB_BGP: &str = include_str!("../manifests/seed/metallb-bgp.yaml");
/// The seed's LoadBalancer Service, taking its address from the bgp pool.
pub const NEXTCLOUD_DEV_LOADBALANCER_BGP: &str =
    include_str!("../manifests/seed/nextcloud-dev-loadbalancer-bgp.yaml");
