//! MetalLB's kinds (`metallb.io/v1beta1`), as its CRDs define the fields ferry reads: the
//! typed counterparts of k8s-openapi's built-in kinds. Unknown fields are ignored, as for the
//! built-in kinds.

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
