//! ferry's Kubernetes API side.
//!
//! - [`source`]: one watcher per kind (Services, EndpointSlices, Nodes, Namespaces, MetalLB's
//!   ConfigMap and metallb.io kinds), each object converted when it arrives by the manifest
//!   reader's own code, and a [`ferry_source::Snapshot`] of all of them on demand: the agent
//!   syncs from it exactly as from a manifest directory.
//! - [`lease`]: leader election on a `coordination.k8s.io/v1` Lease, client-go's algorithm
//!   (GET, then PUT with the resourceVersion read; a race loses with 409), the decision pure
//!   with time passed in.
//! - [`controller`]: the load-balancer controller the leader runs: addresses from the pools
//!   into `status.loadBalancer.ingress`, existing addresses kept, Events as MetalLB writes them;
//!   what to write is pure ([`controller::plan`]), the writes are the edge.
//! - [`status`]: what the agents forward and announce in this mode (cluster IPs and node
//!   ports from the Service spec, load-balancer addresses from its status).

pub mod controller;
pub mod lease;
pub mod source;
pub mod status;

pub use source::{ApiSource, SourceConfig};

/// A client for `--kubeconfig PATH`, or in-cluster configuration when `path` is None.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    use anyhow::Context;
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::incluster().context(
            "in-cluster configuration (KUBERNETES_SERVICE_HOST and the service account token)",
        )?,
    };
    kube::Client::try_from(config).context("creating the Kubernetes client")
}

/// An API error in a line a user reads (kube's Display of a Status is its Debug form).
pub fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({} {})", s.message, s.code, s.reason),
        e => e.to_string(),
    }
}
