//! MetalLB's kinds (`metallb.io/v1beta1`, and `v1beta2` for BGPPeer), as its CRDs define the
//! fields ferry reads: the typed counterparts of k8s-openapi's built-in kinds. Unknown fields
//! are ignored, as for the built-in kinds. Integers are read as i64 (the CRDs' `format: int64`
//! for ASNs) and range-checked afterwards, so an out-of-range value gets a message with the
//! range rather than a decoding error.

use k8s_openapi::api::core::v1::SecretReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::{Deserialize, Serialize};

/// `IPAddressPool.metallb.io/v1beta1`.
#[allow(clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct IPAddressPool {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: IPAddressPoolSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IPAddressPoolSpec {
    pub addresses: Option<Vec<String>>,
    pub auto_assign: Option<bool>,
    #[serde(rename = "avoidBuggyIPs")]
    pub avoid_buggy_ips: Option<bool>,
    pub service_allocation: Option<ServiceAllocation>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAllocation {
    pub priority: Option<i32>,
    pub namespaces: Option<Vec<String>>,
    pub namespace_selectors: Option<Vec<LabelSelector>>,
    pub service_selectors: Option<Vec<LabelSelector>>,
}

/// `L2Advertisement.metallb.io/v1beta1`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct L2Advertisement {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Option<L2AdvertisementSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct L2AdvertisementSpec {
    pub ip_address_pools: Option<Vec<String>>,
    pub ip_address_pool_selectors: Option<Vec<LabelSelector>>,
    pub node_selectors: Option<Vec<LabelSelector>>,
    pub interfaces: Option<Vec<String>>,
}

/// `BGPPeer.metallb.io/v1beta2` (and `v1beta1`, whose fields are a subset with the same JSON:
/// its nodeSelectors have the shape of a LabelSelector).
#[allow(clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct BGPPeer {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Option<BGPPeerSpec>,
}

#[allow(clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BGPPeerSpec {
    #[serde(rename = "myASN")]
    pub my_asn: Option<i64>,
    #[serde(rename = "peerASN")]
    pub peer_asn: Option<i64>,
    pub peer_address: Option<String>,
    pub peer_port: Option<i64>,
    /// A Go duration ("90s").
    pub hold_time: Option<String>,
    pub keepalive_time: Option<String>,
    #[serde(rename = "routerID")]
    pub router_id: Option<String>,
    pub source_address: Option<String>,
    pub node_selectors: Option<Vec<LabelSelector>>,
    pub password: Option<String>,
    pub password_secret: Option<SecretReference>,
    pub ebgp_multi_hop: Option<bool>,
    pub bfd_profile: Option<String>,
    pub vrf: Option<String>,
    // Fields of MetalLB's FRR modes ferry does not support (checked, then refused or ignored).
    pub interface: Option<String>,
    #[serde(rename = "dynamicASN")]
    pub dynamic_asn: Option<String>,
    #[serde(rename = "localASN")]
    pub local_asn: Option<i64>,
    pub connect_time: Option<String>,
    pub enable_graceful_restart: Option<bool>,
    #[serde(rename = "disableMP")]
    pub disable_mp: Option<bool>,
    pub dual_stack_address_family: Option<bool>,
}

/// `BGPAdvertisement.metallb.io/v1beta1`.
#[allow(clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct BGPAdvertisement {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Option<BGPAdvertisementSpec>,
}

#[allow(clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BGPAdvertisementSpec {
    pub aggregation_length: Option<i64>,
    #[serde(rename = "aggregationLengthV6")]
    pub aggregation_length_v6: Option<i64>,
    pub local_pref: Option<i64>,
    pub communities: Option<Vec<String>>,
    pub ip_address_pools: Option<Vec<String>>,
    pub ip_address_pool_selectors: Option<Vec<LabelSelector>>,
    pub node_selectors: Option<Vec<LabelSelector>>,
    pub peers: Option<Vec<String>>,
    /// Not supported by ferry (refused).
    pub service_selectors: Option<Vec<LabelSelector>>,
}

/// `Community.metallb.io/v1beta1`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct Community {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Option<CommunitySpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct CommunitySpec {
    pub communities: Option<Vec<CommunityAlias>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct CommunityAlias {
    pub name: Option<String>,
    pub value: Option<String>,
}

/// `BFDProfile.metallb.io/v1beta1`.
#[allow(clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct BFDProfile {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Option<BFDProfileSpec>,
}

#[allow(clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BFDProfileSpec {
    pub receive_interval: Option<i64>,
    pub transmit_interval: Option<i64>,
    pub detect_multiplier: Option<i64>,
    pub echo_interval: Option<i64>,
    pub echo_mode: Option<bool>,
    pub passive_mode: Option<bool>,
    pub minimum_ttl: Option<i64>,
}
