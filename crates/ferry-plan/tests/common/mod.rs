//! Shared by the ferry-plan integration tests: a builder for `ResolvedService`, packets and
//! outcome helpers for the tracer, and a generator of random service sets.
#![allow(dead_code)] // each test crate uses a different part

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ferry_model::view::{ResolvedEndpoint, ResolvedPort, ResolvedService};
use ferry_model::{ObjectRef, Protocol, ServiceType, TrafficPolicy};
use ferry_plan::ir::{Action, Chain, KeyType, Rule, Ruleset, Set, Value, Verdict};
use ferry_plan::plan::DEFAULT_MASQUERADE_MARK;
use ferry_plan::trace::{Fate, Outcome, Packet};
use ferry_plan::PlanConfig;
use proptest::prelude::*;

pub const NODE: &str = "k3s-master-rpi001";
pub const OTHER_NODE: &str = "k3s-worker-rpi002";

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|_| panic!("test bug: bad IP {s}"))
}

/// This node: k3s-master-rpi001 at 192.168.2.11, pods in 10.42.0.0/16 (and fd00:42::/64).
pub fn config() -> PlanConfig {
    PlanConfig {
        node_name: NODE.into(),
        node_ips: vec![ip("192.168.2.11")],
        cluster_cidrs: vec![
            "10.42.0.0/16".parse().unwrap(),
            "fd00:42::/64".parse().unwrap(),
        ],
        masquerade_mark: DEFAULT_MASQUERADE_MARK,
        lb_pools: vec![],
        service_cidrs: vec![
            "10.43.0.0/16".parse().unwrap(),
            "fd00:43::/108".parse().unwrap(),
        ],
        ..PlanConfig::default()
    }
}

/// As [`config`], with an IPv6 node address too (so v6 node ports are served).
pub fn dual_stack_config() -> PlanConfig {
    let mut c = config();
    c.node_ips.push(ip("2001:db8:2::11"));
    c
}

/// Load-balancer pools of every shape the kernel stores differently: ranges that are not
/// prefixes, prefixes (listed back as `prefix`), single addresses (listed back as plain
/// addresses), IPv4 and IPv6.
pub fn lb_pools() -> Vec<(IpAddr, IpAddr)> {
    [
        ("192.168.2.200", "192.168.2.225"),
        ("192.168.5.0", "192.168.5.255"),
        ("192.168.7.7", "192.168.7.7"),
        ("10.99.0.0", "10.99.1.255"),
        ("fd00:200::10", "fd00:200::1f"),
        ("fd00:300::5", "fd00:300::9"),
        ("fd00:400::", "fd00:400::ffff:ffff"),
        ("2001:db8:7::7", "2001:db8:7::7"),
    ]
    .iter()
    .map(|(a, b)| (ip(a), ip(b)))
    .collect()
}

/// `cfg` with [`lb_pools`].
pub fn with_lb_pools(mut cfg: PlanConfig) -> PlanConfig {
    cfg.lb_pools = lb_pools();
    cfg
}

// ---- endpoints ----

/// A ready endpoint on another node.
pub fn ep(addr: &str, port: u16) -> ResolvedEndpoint {
    ResolvedEndpoint {
        addr: ip(addr),
        port,
        node: Some(OTHER_NODE.into()),
        ready: true,
        serving: true,
        terminating: false,
        zone_hints: None,
    }
}

pub trait EndpointExt {
    fn on(self, node: &str) -> Self;
    /// Shutting down but still serving (what a rolling update drains to).
    fn terminating(self) -> Self;
    /// Neither ready nor serving.
    fn not_ready(self) -> Self;
    /// Topology hints for these zones.
    fn hinted(self, zones: &[&str]) -> Self;
}

impl EndpointExt for ResolvedEndpoint {
    fn on(mut self, node: &str) -> Self {
        self.node = Some(node.into());
        self
    }
    fn terminating(mut self) -> Self {
        self.ready = false;
        self.serving = true;
        self.terminating = true;
        self
    }
    fn not_ready(mut self) -> Self {
        self.ready = false;
        self.serving = false;
        self
    }
    fn hinted(mut self, zones: &[&str]) -> Self {
        self.zone_hints = Some(
            zones
                .iter()
                .map(|z| z.to_string())
                .collect::<Vec<_>>()
                .into(),
        );
        self
    }
}

// ---- services ----

pub struct Svc(ResolvedService);

impl Svc {
    /// A ClusterIP service in namespace "default".
    pub fn new(name: &str, cluster_ip: &str) -> Svc {
        Svc(ResolvedService {
            id: ObjectRef::new("default", name),
            type_: ServiceType::ClusterIP,
            cluster_ip: Some(ip(cluster_ip)),
            secondary_cluster_ip: None,
            external_ips: vec![],
            load_balancer_ips: vec![],
            external_traffic_policy: TrafficPolicy::Cluster,
            internal_traffic_policy: TrafficPolicy::Cluster,
            ports: vec![],
            affinity_timeout: None,
            load_balancer_source_ranges: vec![],
            health_check_node_port: None,
        })
    }
    pub fn namespace(mut self, ns: &str) -> Svc {
        self.0.id.namespace = ns.into();
        self
    }
    pub fn type_(mut self, t: ServiceType) -> Svc {
        self.0.type_ = t;
        self
    }
    /// An unnamed port.
    pub fn port(self, proto: Protocol, port: u16, eps: &[ResolvedEndpoint]) -> Svc {
        self.named_port("", proto, port, None, eps)
    }
    /// A port with a node port (and the service made a NodePort one if it was ClusterIP).
    pub fn node_port(
        mut self,
        proto: Protocol,
        port: u16,
        node_port: u16,
        eps: &[ResolvedEndpoint],
    ) -> Svc {
        if self.0.type_ == ServiceType::ClusterIP {
            self.0.type_ = ServiceType::NodePort;
        }
        self.named_port("", proto, port, Some(node_port), eps)
    }
    pub fn named_port(
        mut self,
        name: &str,
        proto: Protocol,
        port: u16,
        node_port: Option<u16>,
        eps: &[ResolvedEndpoint],
    ) -> Svc {
        let mut endpoints = eps.to_vec();
        endpoints.sort();
        self.0.ports.push(ResolvedPort {
            name: name.into(),
            protocol: proto,
            port,
            node_port,
            endpoints,
        });
        self
    }
    pub fn external_ip(mut self, addr: &str) -> Svc {
        self.0.external_ips.push(ip(addr));
        self
    }
    pub fn load_balancer_ip(mut self, addr: &str) -> Svc {
        self.0.type_ = ServiceType::LoadBalancer;
        self.0.load_balancer_ips.push(ip(addr));
        self
    }
    /// The other family's cluster IP (a dual-stack service).
    pub fn secondary_cluster_ip(mut self, addr: &str) -> Svc {
        self.0.secondary_cluster_ip = Some(ip(addr));
        self
    }
    pub fn external_policy_local(mut self) -> Svc {
        self.0.external_traffic_policy = TrafficPolicy::Local;
        self
    }
    pub fn internal_policy_local(mut self) -> Svc {
        self.0.internal_traffic_policy = TrafficPolicy::Local;
        self
    }
    pub fn build(self) -> ResolvedService {
        self.0
    }
}

/// The seed's services (crates/ferry-lab/manifests/seed), each backed by the two nextcloud pods.
pub fn seed_services() -> Vec<ResolvedService> {
    let pods = [ep("10.42.0.85", 80).on(NODE), ep("10.42.1.170", 80)];
    vec![
        Svc::new("nextcloud-dev-clusterip", "10.43.7.203")
            .port(Protocol::Tcp, 8080, &pods)
            .build(),
        Svc::new("nextcloud-dev-nodeport", "10.43.120.17")
            .node_port(Protocol::Tcp, 80, 32540, &pods)
            .build(),
        Svc::new("nextcloud-dev-loadbalancer", "10.43.55.9")
            .node_port(Protocol::Tcp, 80, 31380, &pods)
            .load_balancer_ip("192.168.2.200")
            .build(),
        Svc::new("kube-dns", "10.43.0.10")
            .namespace("kube-system")
            .named_port(
                "dns",
                Protocol::Udp,
                53,
                None,
                &[ep("10.42.0.3", 53).on(NODE)],
            )
            .named_port(
                "dns-tcp",
                Protocol::Tcp,
                53,
                None,
                &[ep("10.42.0.3", 53).on(NODE)],
            )
            .build(),
    ]
}

// ---- packets and outcomes ----

pub fn packet(proto: Protocol, saddr: &str, daddr: &str, dport: u16) -> Packet {
    Packet {
        saddr: ip(saddr),
        daddr: ip(daddr),
        proto,
        dport,
        local_origin: false,
        iif: None,
    }
}

pub fn tcp(saddr: &str, daddr: &str, dport: u16) -> Packet {
    packet(Protocol::Tcp, saddr, daddr, dport)
}

pub fn udp(saddr: &str, daddr: &str, dport: u16) -> Packet {
    packet(Protocol::Udp, saddr, daddr, dport)
}

/// Sent by the node itself (the output hook).
pub fn from_node(mut p: Packet) -> Packet {
    p.local_origin = true;
    p
}

/// Panics unless the probabilities of `outcomes` sum to 1 and each is in (0, 1].
pub fn assert_total_probability(outcomes: &[Outcome]) {
    let total: f64 = outcomes.iter().map(|o| o.probability).sum();
    assert!(
        (total - 1.0).abs() < 1e-9,
        "probabilities sum to {total}: {outcomes:#?}"
    );
    for o in outcomes {
        assert!(o.probability > 0.0 && o.probability <= 1.0 + 1e-12, "{o:?}");
    }
}

/// The one fate of a trace that has a single outcome (probability 1).
pub fn only_fate(outcomes: &[Outcome]) -> Fate {
    assert_total_probability(outcomes);
    assert_eq!(outcomes.len(), 1, "expected one outcome: {outcomes:#?}");
    outcomes[0].fate.clone()
}

/// DNAT outcomes by endpoint: (probability, masquerade). Panics on any other kind of outcome.
pub fn dnat_outcomes(outcomes: &[Outcome]) -> BTreeMap<(IpAddr, u16), (f64, bool)> {
    assert_total_probability(outcomes);
    let mut m = BTreeMap::new();
    for o in outcomes {
        match o.fate {
            Fate::Dnat {
                addr,
                port,
                masquerade,
            } => {
                let old = m.insert((addr, port), (o.probability, masquerade));
                assert!(old.is_none(), "{addr}:{port} twice: {outcomes:#?}");
            }
            _ => panic!("expected only DNAT outcomes: {outcomes:#?}"),
        }
    }
    m
}

/// Every chain named by a rule or a map element, and every set named by a rule, exists.
pub fn assert_references_resolve(rs: &Ruleset) {
    use ferry_plan::ir::Match;
    let chain_of = |v: &Verdict| match v {
        Verdict::Jump(c) | Verdict::Goto(c) => Some(c.clone()),
        _ => None,
    };
    for c in rs.chains.values() {
        for r in &c.rules {
            let mut sets = vec![];
            for m in &r.matches {
                match m {
                    Match::DaddrInSet(_, s)
                    | Match::ServiceTupleNotIn(_, s)
                    | Match::AddrPairInSet(_, s) => sets.push(s.clone()),
                    _ => {}
                }
            }
            match &r.action {
                Action::Verdict(v) => {
                    if let Some(t) = chain_of(v) {
                        assert!(rs.chains.contains_key(&t), "{}: no chain {t}", c.name);
                    }
                }
                Action::ServiceTupleVmap(_, s) | Action::ProtoPortVmap(s) => sets.push(s.clone()),
                _ => {}
            }
            for s in sets {
                assert!(rs.sets.contains_key(&*s), "{}: no set {s}", c.name);
            }
        }
    }
    for s in rs.sets.values() {
        for e in s.elements.values() {
            assert_eq!(e.verdict().is_some(), s.is_vmap, "{}: {e:?}", s.name);
            if let Some(t) = e.verdict().and_then(chain_of) {
                assert!(rs.chains.contains_key(&t), "{}: no chain {t}", s.name);
            }
        }
    }
}

/// A table left by another version of ferry: a map and a chain this one no longer plans, the
/// map pointing at the chain.
pub fn with_leftovers(mut rs: Ruleset) -> Ruleset {
    let mut old = Set::new(
        "old-services-v4",
        &[KeyType::Ipv4Addr],
        true,
        "from an older layout",
    );
    let mut chain = Chain::new("old-service", "from an older layout");
    chain.push(Rule::new(vec![], Action::Verdict(Verdict::Accept)));
    old.insert(
        vec![Value::Ip(ip("10.43.0.99"))],
        Some(Verdict::Goto("old-service".into())),
        String::new(),
    );
    rs.add_set(old);
    rs.add_chain(chain);
    rs
}

// ---- random services ----

/// How an endpoint stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    Ready,
    /// serving and terminating: used when nothing is ready.
    Draining,
    /// terminating and no longer serving: never used.
    Gone,
    NotReady,
}

#[derive(Debug, Clone)]
pub struct EndpointSpec {
    /// Index into a small pool of pod addresses, so services share pods.
    pub pod: u8,
    pub port: u16,
    /// 0: this node, 1..=2: other nodes, 3: unknown.
    pub node: u8,
    pub condition: Condition,
}

#[derive(Debug, Clone)]
pub struct PortSpec {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub endpoints: Vec<EndpointSpec>,
}

#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub namespace: String,
    pub v6: bool,
    pub type_: ServiceType,
    pub external_ips: u8,
    pub external_local: bool,
    pub internal_local: bool,
    pub ports: Vec<PortSpec>,
    /// ClientIP affinity timeout.
    pub affinity: Option<u32>,
    /// How many loadBalancerSourceRanges (0: none; 3: one of them is everything).
    pub source_ranges: u8,
}

fn endpoint_spec() -> impl Strategy<Value = EndpointSpec> {
    let condition = prop_oneof![
        5 => Just(Condition::Ready),
        2 => Just(Condition::Draining),
        1 => Just(Condition::Gone),
        1 => Just(Condition::NotReady),
    ];
    let port = prop_oneof![Just(80u16), Just(8080), Just(53), 1u16..=65535];
    (0u8..24, port, 0u8..4, condition).prop_map(|(pod, port, node, condition)| EndpointSpec {
        pod,
        port,
        node,
        condition,
    })
}

fn port_spec() -> impl Strategy<Value = PortSpec> {
    let protocol = prop_oneof![
        4 => Just(Protocol::Tcp),
        2 => Just(Protocol::Udp),
        1 => Just(Protocol::Sctp),
    ];
    let name = prop_oneof![Just(String::new()), "[a-z]{1,6}"];
    let port = prop_oneof![Just(80u16), Just(443), Just(53), 1u16..=65535];
    (
        name,
        protocol,
        port,
        proptest::collection::vec(endpoint_spec(), 0..6),
    )
        .prop_map(|(name, protocol, port, endpoints)| PortSpec {
            name,
            protocol,
            port,
            endpoints,
        })
}

pub fn service_spec() -> impl Strategy<Value = ServiceSpec> {
    let namespace = prop_oneof![
        Just("default".to_string()),
        Just("kube-system".to_string()),
        Just("nextcloud".to_string()),
    ];
    let type_ = prop_oneof![
        Just(ServiceType::ClusterIP),
        Just(ServiceType::NodePort),
        Just(ServiceType::LoadBalancer),
    ];
    (
        namespace,
        proptest::bool::weighted(0.25),
        type_,
        0u8..3,
        any::<bool>(),
        proptest::bool::weighted(0.2),
        proptest::collection::vec(port_spec(), 0..4),
        proptest::option::weighted(0.3, prop_oneof![Just(10800u32), 1u32..4]),
        0u8..4,
    )
        .prop_map(
            |(
                namespace,
                v6,
                type_,
                external_ips,
                external_local,
                internal_local,
                ports,
                affinity,
                source_ranges,
            )| {
                ServiceSpec {
                    namespace,
                    v6,
                    type_,
                    external_ips,
                    external_local,
                    internal_local,
                    ports,
                    affinity,
                    source_ranges,
                }
            },
        )
}

pub fn service_specs(max: usize) -> impl Strategy<Value = Vec<ServiceSpec>> {
    proptest::collection::vec(service_spec(), 0..max)
}

/// The address of pool pod `i` in the family asked for (never 10.42.1.250 / fd00:42::ffff,
/// which tests use as a client pod that backs no service).
pub fn pod_addr(i: u8, v6: bool) -> IpAddr {
    if v6 {
        ip(&format!("fd00:42::{:x}", 0x100 + u32::from(i)))
    } else {
        ip(&format!("10.42.{}.{}", i % 3, 10 + i))
    }
}

/// Service number `i` built from its spec. Everything global is derived from `i`, so names,
/// cluster IPs and node ports never clash, and the same `i` in two snapshots is "the same
/// service, maybe changed".
pub fn service_from_spec(i: usize, spec: &ServiceSpec) -> ResolvedService {
    let n = i as u32;
    let cluster_ip = if spec.v6 {
        ip(&format!("fd00:43::1:{:x}", n + 1))
    } else {
        ip(&format!("10.43.{}.{}", 100 + n / 250, n % 250 + 1))
    };
    let external = |k: u8| {
        if spec.v6 {
            ip(&format!("2001:db8:e::{:x}:{:x}", n + 1, k))
        } else {
            ip(&format!("172.16.{}.{}", n % 250, 10 + k))
        }
    };
    let nodes = [
        Some(NODE),
        Some(OTHER_NODE),
        Some("k3s-worker-rpi003"),
        None,
    ];
    let mut seen_ports = BTreeSet::new();
    let mut ports = vec![];
    for (k, p) in spec.ports.iter().enumerate() {
        // Kubernetes refuses a port+protocol twice, and a name twice.
        if !seen_ports.insert((p.port, p.protocol)) {
            continue;
        }
        let mut endpoints: BTreeMap<(IpAddr, u16), ResolvedEndpoint> = BTreeMap::new();
        for e in &p.endpoints {
            let addr = pod_addr(e.pod, spec.v6);
            let (ready, serving, terminating) = match e.condition {
                Condition::Ready => (true, true, false),
                Condition::Draining => (false, true, true),
                Condition::Gone => (false, false, true),
                Condition::NotReady => (false, false, false),
            };
            endpoints
                .entry((addr, e.port))
                .or_insert_with(|| ResolvedEndpoint {
                    addr,
                    port: e.port,
                    node: nodes[usize::from(e.node)].map(ferry_model::SharedStr::from),
                    ready,
                    serving,
                    terminating,
                    zone_hints: None,
                });
        }
        ports.push(ResolvedPort {
            name: if p.name.is_empty() && spec.ports.len() == 1 {
                String::new()
            } else {
                format!("{}{k}", p.name)
            },
            protocol: p.protocol,
            port: p.port,
            node_port: spec
                .type_
                .has_node_ports()
                .then(|| 30000 + (n * 4 + k as u32) as u16),
            endpoints: endpoints.into_values().collect(),
        });
    }
    let policy = |local: bool| {
        if local {
            TrafficPolicy::Local
        } else {
            TrafficPolicy::Cluster
        }
    };
    let mut external_ips: Vec<IpAddr> = (0..spec.external_ips).map(external).collect();
    let load_balancer_ips = if spec.type_ == ServiceType::LoadBalancer {
        vec![external(9)]
    } else {
        vec![]
    };
    external_ips.retain(|a| !load_balancer_ips.contains(a));
    ResolvedService {
        id: ObjectRef::new(spec.namespace.clone(), format!("svc-{i}")),
        type_: spec.type_,
        cluster_ip: Some(cluster_ip),
        secondary_cluster_ip: None,
        external_ips,
        load_balancer_ips,
        external_traffic_policy: policy(spec.external_local),
        internal_traffic_policy: policy(spec.internal_local),
        ports,
        affinity_timeout: spec.affinity,
        load_balancer_source_ranges: (0..spec.source_ranges)
            .map(|k| {
                let text = match (spec.v6, k) {
                    (false, 2) => "0.0.0.0/0".to_string(),
                    (true, 2) => "::/0".to_string(),
                    (false, _) => format!("192.168.{}.0/24", 2 + k),
                    (true, _) => format!("2001:db8:{k}::/48"),
                };
                text.parse().expect("a CIDR")
            })
            .collect(),
        health_check_node_port: None,
    }
}

pub fn services_from_specs(specs: &[ServiceSpec]) -> Vec<ResolvedService> {
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| service_from_spec(i, s))
        .collect()
}

/// The seed's services and `n` random ones, the same on every run.
pub fn many_services(n: usize) -> Vec<ResolvedService> {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let specs = proptest::collection::vec(service_spec(), n)
        .new_tree(&mut runner)
        .expect("a value")
        .current();
    let mut s = seed_services();
    s.extend(services_from_specs(&specs));
    s
}

/// A dual-stack configuration with load-balancer pools, over `n` shard tables.
pub fn sharded(n: u16) -> PlanConfig {
    PlanConfig {
        shards: n,
        ..with_lb_pools(dual_stack_config())
    }
}

/// What "snapshot B" does with service `i` of snapshot A.
#[derive(Debug, Clone, Copy)]
pub enum Change {
    Keep,
    /// Replaced by the spec at the same index of the other list (same name and cluster IP).
    Replace,
    Delete,
    /// The same ports, with the other spec's endpoints.
    NewEndpoints,
    /// Traffic policies flipped.
    FlipPolicies,
}

pub fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        4 => Just(Change::Keep),
        1 => Just(Change::Replace),
        1 => Just(Change::Delete),
        2 => Just(Change::NewEndpoints),
        1 => Just(Change::FlipPolicies),
    ]
}

/// Snapshot B from A, the specs `other` and a change per index (indices past A's end are new
/// services from `other`, added unless their change is Delete).
pub fn evolve(
    a: &[ServiceSpec],
    other: &[ServiceSpec],
    changes: &[Change],
) -> Vec<ResolvedService> {
    let mut out = vec![];
    for i in 0..a.len().max(other.len()) {
        let c = changes.get(i).copied().unwrap_or(Change::Keep);
        let spec = match (a.get(i), other.get(i), c) {
            (_, _, Change::Delete) => None,
            (Some(x), _, Change::Keep) | (Some(x), None, _) => Some(x.clone()),
            (None, Some(y), _) | (Some(_), Some(y), Change::Replace) => Some(y.clone()),
            (Some(x), Some(y), Change::NewEndpoints) => {
                let mut s = x.clone();
                for (k, p) in s.ports.iter_mut().enumerate() {
                    p.endpoints = y
                        .ports
                        .get(k)
                        .map(|q| q.endpoints.clone())
                        .unwrap_or_default();
                }
                Some(s)
            }
            (Some(x), Some(_), Change::FlipPolicies) => {
                let mut s = x.clone();
                s.external_local = !s.external_local;
                s.internal_local = !s.internal_local;
                Some(s)
            }
            (None, None, _) => None,
        };
        if let Some(s) = spec {
            out.push(service_from_spec(i, &s));
        }
    }
    out
}
