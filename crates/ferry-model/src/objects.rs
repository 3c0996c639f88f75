//! The Kubernetes objects ferry reads, reduced to the fields it uses.
//!
//! Every source (a manifest directory today, the Kubernetes API later) produces these types;
//! everything downstream (allocation, planning, the lab) consumes only these types.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::cidr::Cidr;

/// namespace/name of an object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectRef {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The metadata every object carries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Meta {
    pub name: String,
    /// "default" when the manifest leaves it out (cluster-scoped objects: "").
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// The fields a manifest usually leaves out (annotations, uid, ...): see [`Extra`].
    pub extra: Extra<MetaExtra>,
}

/// The fields of a [`Meta`] a manifest usually leaves out (boxed: see [`Extra`]; the API
/// server writes all but the annotations on every object, in a box of the same size as they
/// took inline).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetaExtra {
    pub annotations: BTreeMap<String, String>,
    /// metadata.creationTimestamp as written (RFC 3339), if any.
    pub creation_timestamp: Option<String>,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

static EMPTY_META_EXTRA: MetaExtra = MetaExtra {
    annotations: BTreeMap::new(),
    creation_timestamp: None,
    uid: None,
    resource_version: None,
};

impl ExtraFields for MetaExtra {
    fn empty() -> &'static MetaExtra {
        &EMPTY_META_EXTRA
    }
}

impl Meta {
    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef::new(self.namespace.clone(), self.name.clone())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Kubernetes spelling: TCP, UDP, SCTP.
    pub fn as_k8s(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
    /// nftables spelling: tcp, udp, sctp.
    pub fn as_nft(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
    pub fn parse_k8s(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalName,
}

impl ServiceType {
    pub fn as_k8s(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
            ServiceType::ExternalName => "ExternalName",
        }
    }
    /// Whether ports of this type get node ports.
    pub fn has_node_ports(self) -> bool {
        matches!(self, ServiceType::NodePort | ServiceType::LoadBalancer)
    }
}

/// spec.ports[].targetPort
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// May be empty when the service has a single port.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    /// Defaults to `port` when left out.
    pub target_port: TargetPort,
    /// Explicit spec.ports[].nodePort, if given.
    pub node_port: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

/// spec.clusterIP as written.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ClusterIpSpec {
    /// Left out or "": allocate one.
    #[default]
    Auto,
    /// "None": headless, no virtual IP, no rules.
    None,
    /// An explicit address.
    Ip(IpAddr),
}

/// An IP family (spec.ipFamilies[]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    IPv4,
    IPv6,
}

impl IpFamily {
    pub fn of(ip: IpAddr) -> IpFamily {
        if ip.is_ipv4() {
            IpFamily::IPv4
        } else {
            IpFamily::IPv6
        }
    }
    pub fn other(self) -> IpFamily {
        match self {
            IpFamily::IPv4 => IpFamily::IPv6,
            IpFamily::IPv6 => IpFamily::IPv4,
        }
    }
    /// Kubernetes spelling: IPv4, IPv6.
    pub fn as_k8s(self) -> &'static str {
        match self {
            IpFamily::IPv4 => "IPv4",
            IpFamily::IPv6 => "IPv6",
        }
    }
    pub fn parse_k8s(s: &str) -> Option<IpFamily> {
        match s {
            "IPv4" => Some(IpFamily::IPv4),
            "IPv6" => Some(IpFamily::IPv6),
            _ => None,
        }
    }
}

/// spec.ipFamilyPolicy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum IpFamilyPolicy {
    /// One family (the default).
    #[default]
    SingleStack,
    /// Both families when the cluster has service CIDRs of both, else one.
    PreferDualStack,
    /// Both families, or the Service is rejected.
    RequireDualStack,
}

impl IpFamilyPolicy {
    pub fn as_k8s(self) -> &'static str {
        match self {
            IpFamilyPolicy::SingleStack => "SingleStack",
            IpFamilyPolicy::PreferDualStack => "PreferDualStack",
            IpFamilyPolicy::RequireDualStack => "RequireDualStack",
        }
    }
    pub fn parse_k8s(s: &str) -> Option<IpFamilyPolicy> {
        match s {
            "SingleStack" => Some(IpFamilyPolicy::SingleStack),
            "PreferDualStack" => Some(IpFamilyPolicy::PreferDualStack),
            "RequireDualStack" => Some(IpFamilyPolicy::RequireDualStack),
            _ => None,
        }
    }
}

/// spec.sessionAffinity (with spec.sessionAffinityConfig.clientIP.timeoutSeconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SessionAffinity {
    #[default]
    None,
    /// Repeat connections from one client address go to the same endpoint until the client
    /// has made no new connection for `timeout_seconds` (1..=86400; Kubernetes' default 10800).
    ClientIp { timeout_seconds: u32 },
}

impl SessionAffinity {
    /// Kubernetes' default timeout for ClientIP affinity (3 hours).
    pub const DEFAULT_TIMEOUT_SECONDS: u32 = 10800;
    /// The largest timeout the API server accepts (1 day).
    pub const MAX_TIMEOUT_SECONDS: u32 = 86400;
    /// The timeout when ClientIP affinity is on.
    pub fn timeout_seconds(self) -> Option<u32> {
        match self {
            SessionAffinity::None => None,
            SessionAffinity::ClientIp { timeout_seconds } => Some(timeout_seconds),
        }
    }
}

/// Fields most objects leave out, kept behind one pointer (absent: all of them left out) so
/// that the common object stays small (10,000 Services are kept). Reads as a `T` (the empty
/// one when absent); writing through it allocates the box.
#[derive(Clone)]
pub struct Extra<T: ExtraFields>(Option<Box<T>>);

/// What an [`Extra`] holds.
pub trait ExtraFields: Default + PartialEq + Sized + 'static {
    /// The fields all left out (what an absent box reads as).
    fn empty() -> &'static Self;
}

impl<T: ExtraFields> Extra<T> {
    /// Whether the box is absent (every field left out).
    pub fn is_absent(&self) -> bool {
        self.0.is_none()
    }
}

impl<T: ExtraFields> Default for Extra<T> {
    fn default() -> Self {
        Extra(None)
    }
}

impl<T: ExtraFields> From<T> for Extra<T> {
    /// Boxed unless every field is left out.
    fn from(t: T) -> Self {
        if t == *T::empty() {
            Extra(None)
        } else {
            Extra(Some(Box::new(t)))
        }
    }
}

impl<T: ExtraFields> std::ops::Deref for Extra<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.0.as_deref().unwrap_or_else(|| T::empty())
    }
}

impl<T: ExtraFields> std::ops::DerefMut for Extra<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.0.get_or_insert_with(Box::default)
    }
}

impl<T: ExtraFields> PartialEq for Extra<T> {
    /// By content: an absent box equals a box of fields all left out.
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: ExtraFields + Eq> Eq for Extra<T> {}

impl<T: ExtraFields + std::fmt::Debug> std::fmt::Debug for Extra<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Service {
    pub meta: Meta,
    pub type_: ServiceType,
    pub cluster_ip: ClusterIpSpec,
    /// spec.ipFamilies as written (validated: one or two distinct families, matching the
    /// cluster IPs given); empty: chosen at allocation.
    pub ip_families: Vec<IpFamily>,
    /// spec.ipFamilyPolicy (None when left out: SingleStack, or dual-stack when two
    /// clusterIPs or ipFamilies are written, as the API server defaults it).
    pub ip_family_policy: Option<IpFamilyPolicy>,
    pub ports: Vec<ServicePort>,
    /// spec.selector; empty means "endpoints are managed by someone else".
    pub selector: BTreeMap<String, String>,
    pub external_traffic_policy: TrafficPolicy,
    pub internal_traffic_policy: TrafficPolicy,
    pub session_affinity: SessionAffinity,
    /// `spec.trafficDistribution: PreferClose` (or `PreferSameZone`), or the annotation
    /// `service.kubernetes.io/topology-mode: Auto`: endpoints get zone hints (what an
    /// EndpointSlice controller writes; proxies read the hints, not this).
    pub prefer_close: bool,
    /// The fields most Services leave out (external and load-balancer addresses, ...).
    pub extra: Extra<ServiceExtra>,
}

/// The fields of a [`Service`] most Services leave out (boxed: see [`Extra`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceExtra {
    /// spec.clusterIPs beyond the first (which is `cluster_ip`): the other family's address,
    /// if given (validated: at most one, of the other family).
    pub secondary_cluster_ip: Option<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    /// spec.loadBalancerIP (deprecated field, still honoured later).
    pub load_balancer_ip: Option<IpAddr>,
    pub load_balancer_class: Option<String>,
    /// status.loadBalancer.ingress[].ip as found (from the API; manifests rarely have it).
    pub load_balancer_ingress: Vec<IpAddr>,
    /// spec.externalName for type ExternalName.
    pub external_name: Option<String>,
    /// spec.loadBalancerSourceRanges, or else the annotation
    /// `service.beta.kubernetes.io/load-balancer-source-ranges` (as kube-proxy reads them):
    /// who may reach the load-balancer addresses; empty: everyone.
    pub load_balancer_source_ranges: Vec<Cidr>,
    /// Explicit spec.healthCheckNodePort, if given (LoadBalancer with externalTrafficPolicy
    /// Local only).
    pub health_check_node_port: Option<u16>,
}

static EMPTY_SERVICE_EXTRA: ServiceExtra = ServiceExtra {
    secondary_cluster_ip: None,
    external_ips: Vec::new(),
    load_balancer_ip: None,
    load_balancer_class: None,
    load_balancer_ingress: Vec::new(),
    external_name: None,
    load_balancer_source_ranges: Vec::new(),
    health_check_node_port: None,
};

impl ExtraFields for ServiceExtra {
    fn empty() -> &'static ServiceExtra {
        &EMPTY_SERVICE_EXTRA
    }
}

impl Service {
    pub fn is_headless(&self) -> bool {
        self.cluster_ip == ClusterIpSpec::None
    }
    /// spec.ipFamilyPolicy, defaulted as the API server does: RequireDualStack when two
    /// cluster IPs or two families are written, else SingleStack.
    pub fn effective_ip_family_policy(&self) -> IpFamilyPolicy {
        match self.ip_family_policy {
            Some(p) => p,
            None if self.extra.secondary_cluster_ip.is_some() || self.ip_families.len() > 1 => {
                IpFamilyPolicy::RequireDualStack
            }
            None => IpFamilyPolicy::SingleStack,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressType {
    IPv4,
    IPv6,
    Fqdn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointConditions {
    /// Missing `ready` means ready (as Kubernetes says), unless terminating.
    pub ready: bool,
    /// Missing `serving` defaults to `ready`.
    pub serving: bool,
    pub terminating: bool,
}

/// A string shared by many holders, one pointer wide (`Option<SharedStr>` too, where an
/// `Arc<str>` takes two): node names, written on thousands of endpoints each.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SharedStr(Arc<Box<str>>);

impl std::ops::Deref for SharedStr {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for SharedStr {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for SharedStr {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for SharedStr {
    fn from(s: &str) -> SharedStr {
        SharedStr(Arc::new(s.into()))
    }
}

impl From<String> for SharedStr {
    fn from(s: String) -> SharedStr {
        SharedStr(Arc::new(s.into_boxed_str()))
    }
}

impl PartialEq<str> for SharedStr {
    fn eq(&self, other: &str) -> bool {
        **self == *other
    }
}

impl PartialEq<&str> for SharedStr {
    fn eq(&self, other: &&str) -> bool {
        **self == **other
    }
}

impl std::fmt::Debug for SharedStr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, f)
    }
}

impl std::fmt::Display for SharedStr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self)
    }
}

impl SharedStr {
    /// Whether `a` and `b` are the same shared copy.
    pub fn ptr_eq(a: &SharedStr, b: &SharedStr) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }
}

/// `hints.forZones[].name` of an endpoint, shared by the endpoint and the resolved endpoints
/// made from it (one pointer wide: an `Arc<[String]>` takes two).
pub type ZoneHints = Arc<Vec<String>>;

/// An endpoint's addresses: usually one, held inline (24 bytes, no allocation); more than one
/// on the heap. Reads as a slice.
#[derive(Clone, Default)]
pub struct Addresses(AddressesRepr);

#[derive(Clone, Default)]
enum AddressesRepr {
    #[default]
    Empty,
    One(IpAddr),
    /// Two or more.
    Many(Box<[IpAddr]>),
}

impl Addresses {
    pub fn new() -> Addresses {
        Addresses::default()
    }
    pub fn as_slice(&self) -> &[IpAddr] {
        match &self.0 {
            AddressesRepr::Empty => &[],
            AddressesRepr::One(ip) => std::slice::from_ref(ip),
            AddressesRepr::Many(v) => v,
        }
    }
    pub fn push(&mut self, ip: IpAddr) {
        self.0 = match std::mem::take(&mut self.0) {
            AddressesRepr::Empty => AddressesRepr::One(ip),
            AddressesRepr::One(first) => AddressesRepr::Many(Box::new([first, ip])),
            AddressesRepr::Many(v) => {
                let mut v = v.into_vec();
                v.push(ip);
                AddressesRepr::Many(v.into_boxed_slice())
            }
        };
    }
    /// Whether the addresses are on the heap (more than one).
    pub fn spilled(&self) -> bool {
        matches!(self.0, AddressesRepr::Many(_))
    }
}

impl std::ops::Deref for Addresses {
    type Target = [IpAddr];
    fn deref(&self) -> &[IpAddr] {
        self.as_slice()
    }
}

impl PartialEq for Addresses {
    fn eq(&self, other: &Addresses) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Addresses {}

impl std::fmt::Debug for Addresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

impl From<Vec<IpAddr>> for Addresses {
    fn from(v: Vec<IpAddr>) -> Addresses {
        match v.len() {
            0 => Addresses(AddressesRepr::Empty),
            1 => Addresses(AddressesRepr::One(v[0])),
            _ => Addresses(AddressesRepr::Many(v.into_boxed_slice())),
        }
    }
}

impl<const N: usize> From<[IpAddr; N]> for Addresses {
    fn from(a: [IpAddr; N]) -> Addresses {
        Addresses::from(a.to_vec())
    }
}

impl From<IpAddr> for Addresses {
    fn from(ip: IpAddr) -> Addresses {
        Addresses(AddressesRepr::One(ip))
    }
}

impl FromIterator<IpAddr> for Addresses {
    fn from_iter<I: IntoIterator<Item = IpAddr>>(iter: I) -> Addresses {
        Addresses::from(iter.into_iter().collect::<Vec<_>>())
    }
}

impl<'a> IntoIterator for &'a Addresses {
    type Item = &'a IpAddr;
    type IntoIter = std::slice::Iter<'a, IpAddr>;
    fn into_iter(self) -> Self::IntoIter {
        self.as_slice().iter()
    }
}

impl IntoIterator for Addresses {
    type Item = IpAddr;
    type IntoIter = std::vec::IntoIter<IpAddr>;
    fn into_iter(self) -> Self::IntoIter {
        match self.0 {
            AddressesRepr::Empty => Vec::new().into_iter(),
            AddressesRepr::One(ip) => vec![ip].into_iter(),
            AddressesRepr::Many(v) => v.into_vec().into_iter(),
        }
    }
}

/// One endpoint of a slice, reduced to what routing reads (kept for every endpoint of the
/// cluster: 100,000 of them at 10,000 services of 10 endpoints, so it is kept small: the usual
/// single address inline, the node's name and the zone hints shared, each one pointer wide).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// As Kubernetes writes them (consumers use the first).
    pub addresses: Addresses,
    pub conditions: EndpointConditions,
    /// Shared with every other endpoint on the same node (see [`node_name`]),
    /// and with the resolved endpoints made from it.
    pub node_name: Option<SharedStr>,
    /// `hints.forZones[].name`: the zones whose nodes should send cluster traffic here
    /// (topology-aware routing, `trafficDistribution: PreferClose`); None without hints.
    pub zone_hints: Option<ZoneHints>,
}

/// Hands out one shared copy of each distinct string (node names: a handful, each written on
/// thousands of endpoints). Forgets the strings no one else holds any more as it grows.
#[derive(Debug, Default)]
pub struct Interner {
    seen: std::collections::HashSet<SharedStr>,
    /// The size at which the next pruning happens (0: the first at 64).
    prune_at: usize,
}

impl Interner {
    /// The shared copy of `s`.
    pub fn get(&mut self, s: &str) -> SharedStr {
        if let Some(a) = self.seen.get(s) {
            return a.clone();
        }
        if self.seen.len() >= self.prune_at.max(64) {
            self.seen.retain(|a| Arc::strong_count(&a.0) > 1);
            self.prune_at = self.seen.len() * 2;
        }
        let a = SharedStr::from(s);
        self.seen.insert(a.clone());
        a
    }

    /// How many strings it holds.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// The process-wide shared copy of node name `s`: every endpoint on one node, in any slice,
/// holds the same one.
pub fn node_name(s: &str) -> SharedStr {
    static NAMES: std::sync::LazyLock<std::sync::Mutex<Interner>> =
        std::sync::LazyLock::new(Default::default);
    NAMES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(s)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointPort {
    /// Matches ServicePort.name ("" for an unnamed port).
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSlice {
    /// Without labels (the one read, the Service's name, is `service_name`).
    pub meta: Meta,
    /// From the label kubernetes.io/service-name.
    pub service_name: String,
    pub address_type: AddressType,
    pub endpoints: Vec<Endpoint>,
    pub ports: Vec<EndpointPort>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddress {
    /// InternalIP, ExternalIP, Hostname, ...
    pub type_: String,
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub meta: Meta,
    pub addresses: Vec<NodeAddress>,
    /// spec.podCIDR(s), if set.
    pub pod_cidrs: Vec<String>,
}

impl Node {
    /// The node's InternalIP addresses that parse as IPs.
    pub fn internal_ips(&self) -> Vec<IpAddr> {
        self.addresses
            .iter()
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigMap {
    pub meta: Meta,
    pub data: BTreeMap<String, String>,
}

/// A v1 Namespace (its labels feed MetalLB's namespaceSelectors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// `meta.namespace` is "" (namespaces are cluster-scoped).
    pub meta: Meta,
}

/// matchExpressions[].operator of a label selector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl SelectorOperator {
    pub fn as_k8s(self) -> &'static str {
        match self {
            SelectorOperator::In => "In",
            SelectorOperator::NotIn => "NotIn",
            SelectorOperator::Exists => "Exists",
            SelectorOperator::DoesNotExist => "DoesNotExist",
        }
    }
    pub fn parse_k8s(s: &str) -> Option<SelectorOperator> {
        match s {
            "In" => Some(SelectorOperator::In),
            "NotIn" => Some(SelectorOperator::NotIn),
            "Exists" => Some(SelectorOperator::Exists),
            "DoesNotExist" => Some(SelectorOperator::DoesNotExist),
            _ => None,
        }
    }
}

/// One matchExpressions entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    /// Non-empty for In and NotIn, empty for Exists and DoesNotExist (checked when parsing).
    pub values: Vec<String>,
}

impl LabelSelectorRequirement {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            SelectorOperator::In => value.is_some_and(|v| self.values.contains(v)),
            // As Kubernetes: a missing label is "not in" any set.
            SelectorOperator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            SelectorOperator::Exists => value.is_some(),
            SelectorOperator::DoesNotExist => value.is_none(),
        }
    }
}

/// A metav1.LabelSelector: every matchLabels pair and every expression must hold.
/// An empty selector matches everything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelSelector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

impl LabelSelector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|e| e.matches(labels))
    }
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }
}

impl std::fmt::Display for LabelSelector {
    /// Kubernetes' selector syntax: `app=web,tier in (a,b),!legacy`; `<everything>` when empty.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_empty() {
            return write!(f, "<everything>");
        }
        let mut parts: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for e in &self.match_expressions {
            parts.push(match e.operator {
                SelectorOperator::In => format!("{} in ({})", e.key, e.values.join(",")),
                SelectorOperator::NotIn => format!("{} notin ({})", e.key, e.values.join(",")),
                SelectorOperator::Exists => e.key.clone(),
                SelectorOperator::DoesNotExist => format!("!{}", e.key),
            });
        }
        write!(f, "{}", parts.join(","))
    }
}

/// metallb.io/v1beta1 IPAddressPool spec.serviceAllocation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceAllocation {
    /// As written; MetalLB reads 0 (and unset) as "lowest priority".
    pub priority: Option<i32>,
    pub namespaces: Vec<String>,
    pub namespace_selectors: Vec<LabelSelector>,
    pub service_selectors: Vec<LabelSelector>,
}

/// A metallb.io/v1beta1 IPAddressPool, as written (addresses are validated by
/// [`crate::pools::load`], which names this object in its errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpAddressPool {
    pub meta: Meta,
    /// spec.addresses: CIDRs ("192.168.2.0/28") or ranges ("192.168.2.200-192.168.2.225").
    pub addresses: Vec<String>,
    /// spec.autoAssign (default true).
    pub auto_assign: bool,
    /// spec.avoidBuggyIPs (default false).
    pub avoid_buggy_ips: bool,
    pub service_allocation: Option<ServiceAllocation>,
}

/// A metallb.io/v1beta1 L2Advertisement.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct L2Advertisement {
    pub meta: Meta,
    /// spec.ipAddressPools (pool names).
    pub ip_address_pools: Vec<String>,
    /// spec.ipAddressPoolSelectors (on the pools' labels).
    pub ip_address_pool_selectors: Vec<LabelSelector>,
    /// spec.nodeSelectors (on the nodes' labels); empty: every node.
    pub node_selectors: Vec<LabelSelector>,
    /// spec.interfaces; empty: no restriction.
    pub interfaces: Vec<String>,
}

/// A v1 Secret, reduced to what ferry reads: a BGPPeer's `spec.passwordSecret` (type
/// `kubernetes.io/basic-auth`, key `password`). Its Debug output never shows the values.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret {
    pub meta: Meta,
    /// `type` ("Opaque" when not written).
    pub type_: String,
    /// `data` (decoded from base64) and `stringData`, merged.
    pub data: BTreeMap<String, Vec<u8>>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("meta", &self.meta)
            .field("type_", &self.type_)
            .field("keys", &self.data.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// `spec.passwordSecret` of a BGPPeer (a core/v1 SecretReference).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SecretRef {
    pub name: String,
    /// Empty: the peer's namespace.
    pub namespace: String,
}

/// A metallb.io BGPPeer (`v1beta2`, or the older `v1beta1`), as written: numbers and
/// addresses are checked by [`crate::bgp::load`], which names this object in its errors.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct BgpPeerCr {
    pub meta: Meta,
    /// spec.myASN (required; 1-4294967295).
    pub my_asn: Option<u64>,
    /// spec.peerASN (required; 1-4294967295).
    pub peer_asn: Option<u64>,
    /// spec.peerAddress.
    pub peer_address: String,
    /// spec.peerPort (default 179).
    pub peer_port: Option<u64>,
    /// spec.holdTime, a Go duration ("90s", "1m30s").
    pub hold_time: Option<String>,
    /// spec.keepaliveTime, a Go duration.
    pub keepalive_time: Option<String>,
    /// spec.routerID.
    pub router_id: String,
    /// spec.sourceAddress.
    pub source_address: String,
    /// spec.nodeSelectors; empty: every node.
    pub node_selectors: Vec<LabelSelector>,
    /// spec.password (TCP MD5).
    pub password: String,
    /// spec.passwordSecret.
    pub password_secret: Option<SecretRef>,
    /// spec.ebgpMultiHop.
    pub ebgp_multihop: bool,
    /// spec.bfdProfile.
    pub bfd_profile: String,
    /// spec.vrf (not supported: a non-empty value is an error).
    pub vrf: String,
}

impl std::fmt::Debug for BgpPeerCr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BgpPeerCr")
            .field("meta", &self.meta)
            .field("my_asn", &self.my_asn)
            .field("peer_asn", &self.peer_asn)
            .field("peer_address", &self.peer_address)
            .field("peer_port", &self.peer_port)
            .field("hold_time", &self.hold_time)
            .field("keepalive_time", &self.keepalive_time)
            .field("router_id", &self.router_id)
            .field("source_address", &self.source_address)
            .field("node_selectors", &self.node_selectors)
            .field(
                "password",
                &(!self.password.is_empty()).then_some("<redacted>"),
            )
            .field("password_secret", &self.password_secret)
            .field("ebgp_multihop", &self.ebgp_multihop)
            .field("bfd_profile", &self.bfd_profile)
            .field("vrf", &self.vrf)
            .finish()
    }
}

/// A metallb.io/v1beta1 BGPAdvertisement, as written.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BgpAdvertisementCr {
    pub meta: Meta,
    /// spec.aggregationLength (default 32).
    pub aggregation_length: Option<i64>,
    /// spec.aggregationLengthV6 (default 128).
    pub aggregation_length_v6: Option<i64>,
    /// spec.localPref (0: not set).
    pub local_pref: Option<u64>,
    /// spec.communities: `65535:65282`, `large:1:2:3` or a Community alias.
    pub communities: Vec<String>,
    /// spec.ipAddressPools (pool names).
    pub ip_address_pools: Vec<String>,
    /// spec.ipAddressPoolSelectors (on the pools' labels).
    pub ip_address_pool_selectors: Vec<LabelSelector>,
    /// spec.peers (BGPPeer names); empty: every peer.
    pub peers: Vec<String>,
    /// spec.nodeSelectors; empty: every node.
    pub node_selectors: Vec<LabelSelector>,
}

/// A metallb.io/v1beta1 Community: named aliases of community values.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommunityCr {
    pub meta: Meta,
    /// spec.communities: (name, value) as written.
    pub communities: Vec<(String, String)>,
}

/// A metallb.io/v1beta1 BFDProfile, as written.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BfdProfileCr {
    pub meta: Meta,
    /// spec.receiveInterval (ms).
    pub receive_interval: Option<u64>,
    /// spec.transmitInterval (ms).
    pub transmit_interval: Option<u64>,
    /// spec.detectMultiplier.
    pub detect_multiplier: Option<u64>,
    /// spec.echoInterval (ms).
    pub echo_interval: Option<u64>,
    /// spec.echoMode.
    pub echo_mode: Option<bool>,
    /// spec.passiveMode.
    pub passive_mode: Option<bool>,
    /// spec.minimumTtl.
    pub minimum_ttl: Option<u64>,
}

/// One parsed Kubernetes object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    Service(Service),
    EndpointSlice(EndpointSlice),
    Node(Node),
    ConfigMap(ConfigMap),
    Namespace(Namespace),
    IpAddressPool(IpAddressPool),
    L2Advertisement(L2Advertisement),
    /// Boxed: the largest kind, and rare.
    BgpPeer(Box<BgpPeerCr>),
    BgpAdvertisement(BgpAdvertisementCr),
    Community(CommunityCr),
    BfdProfile(BfdProfileCr),
    Secret(Secret),
}

impl Object {
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Service(_) => "Service",
            Object::EndpointSlice(_) => "EndpointSlice",
            Object::Node(_) => "Node",
            Object::ConfigMap(_) => "ConfigMap",
            Object::Namespace(_) => "Namespace",
            Object::IpAddressPool(_) => "IPAddressPool",
            Object::L2Advertisement(_) => "L2Advertisement",
            Object::BgpPeer(_) => "BGPPeer",
            Object::BgpAdvertisement(_) => "BGPAdvertisement",
            Object::Community(_) => "Community",
            Object::BfdProfile(_) => "BFDProfile",
            Object::Secret(_) => "Secret",
        }
    }
    pub fn meta(&self) -> &Meta {
        match self {
            Object::Service(o) => &o.meta,
            Object::EndpointSlice(o) => &o.meta,
            Object::Node(o) => &o.meta,
            Object::ConfigMap(o) => &o.meta,
            Object::Namespace(o) => &o.meta,
            Object::IpAddressPool(o) => &o.meta,
            Object::L2Advertisement(o) => &o.meta,
            Object::BgpPeer(o) => &o.meta,
            Object::BgpAdvertisement(o) => &o.meta,
            Object::Community(o) => &o.meta,
            Object::BfdProfile(o) => &o.meta,
            Object::Secret(o) => &o.meta,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_small_and_share_their_node_names() {
        // 100,000 endpoints are kept (10,000 services of 10): each one's size counts.
        use std::mem::size_of;
        assert_eq!(size_of::<Addresses>(), 24);
        assert_eq!(size_of::<Option<SharedStr>>(), 8);
        assert_eq!(size_of::<Option<ZoneHints>>(), 8);
        assert_eq!(size_of::<EndpointConditions>(), 3);
        assert_eq!(size_of::<Endpoint>(), 48);
        let mut i = Interner::default();
        let (a, b, c) = (i.get("n1"), i.get("n1"), i.get("n2"));
        assert!(SharedStr::ptr_eq(&a, &b));
        assert!(!SharedStr::ptr_eq(&a, &c));
        assert_eq!((&*a, &*c), ("n1", "n2"));
        // One address inline: no allocation of its own.
        let e = Endpoint {
            addresses: IpAddr::from([10, 42, 0, 1]).into(),
            conditions: EndpointConditions {
                ready: true,
                serving: true,
                terminating: false,
            },
            node_name: Some(a),
            zone_hints: None,
        };
        assert!(!e.addresses.spilled());
        assert_eq!(e.node_name.as_deref(), Some("n1"));
    }

    #[test]
    fn services_are_small_and_box_what_most_leave_out() {
        // 10,000 Services are kept: the fields most leave out are behind one pointer.
        use std::mem::size_of;
        assert_eq!(size_of::<Extra<ServiceExtra>>(), 8);
        // What is boxed (inline before: the Service was 432 bytes, its Meta 168, a slice
        // 248).
        assert_eq!(size_of::<ServiceExtra>(), 160);
        assert_eq!(size_of::<MetaExtra>(), 96);
        assert_eq!(size_of::<Extra<MetaExtra>>(), 8);
        assert_eq!(size_of::<Meta>(), 80);
        assert_eq!(size_of::<Service>(), 192);
        assert_eq!(size_of::<EndpointSlice>(), 160);
        // Guarded against growing: one per port.
        assert_eq!(size_of::<ServicePort>(), 56);
        assert_eq!(size_of::<EndpointPort>(), 32);
        let plain = Service::default();
        assert!(plain.extra.is_absent());
        assert_eq!(plain.extra.external_name, None);
        assert!(plain.extra.load_balancer_ingress.is_empty());
        // All left out: no box; equal by content however held.
        let empty: Extra<ServiceExtra> = ServiceExtra::default().into();
        assert!(empty.is_absent());
        let mut written = plain.clone();
        written.extra.load_balancer_ingress = vec![IpAddr::from([192, 168, 2, 200])];
        assert!(!written.extra.is_absent());
        assert_ne!(written, plain);
        written.extra.load_balancer_ingress.clear();
        assert_eq!(written, plain);
        let meta: Extra<MetaExtra> = MetaExtra::default().into();
        assert!(meta.is_absent());
        assert_eq!(meta.resource_version, None);
    }

    #[test]
    fn node_names_are_shared_across_callers_and_forgotten_when_unused() {
        let (a, b) = (node_name("interned-n1"), node_name("interned-n1"));
        assert!(SharedStr::ptr_eq(&a, &b));
        let mut i = Interner::default();
        let kept = i.get("kept");
        for n in 0..200 {
            drop(i.get(&format!("gone-{n}")));
        }
        // Pruned as it grew: what no one holds is gone, what someone holds stays shared.
        assert!(i.len() < 100, "{}", i.len());
        assert!(SharedStr::ptr_eq(&kept, &i.get("kept")));
    }

    #[test]
    fn addresses_read_as_a_slice_whatever_their_number() {
        let ip = |n: u8| IpAddr::from([10, 0, 0, n]);
        let none = Addresses::new();
        assert!(none.is_empty() && !none.spilled());
        let one = Addresses::from(vec![ip(1)]);
        assert_eq!(one.as_slice(), [ip(1)]);
        assert!(!one.spilled());
        let mut many = one.clone();
        many.push(ip(2));
        many.push(ip(3));
        assert!(many.spilled());
        assert_eq!(&many[..], [ip(1), ip(2), ip(3)]);
        assert_eq!(many.iter().count(), 3);
        assert_eq!(many.clone().into_iter().collect::<Vec<_>>(), many.to_vec());
        // Equal by content, however held.
        assert_eq!(
            Addresses::from([ip(1), ip(2)]),
            [ip(1), ip(2)].into_iter().collect()
        );
        assert_ne!(one, many);
        assert_eq!(format!("{one:?}"), "[10.0.0.1]");
    }
}
