//! Model -> ruleset: the layout of ferry's nftables table.
//!
//! ```text
//! filter-prerouting / filter-output (filter, priority dstnat-10)
//!   -> service-checks: drop sources outside a load-balancer address's source ranges
//!      (firewall-<svc>), reject new connections to services without endpoints, and to
//!      cluster IPs on ports no service has
//! nat-prerouting / nat-output (nat, priority dstnat)
//!   -> services: one verdict-map lookup on daddr . l4proto . dport (cluster, external and
//!      load-balancer IPs) and one on l4proto . dport for the node's own addresses (node ports)
//!      -> external-<svc> (marks for masquerade) -> service-<svc> -> choose-N-tcp-v4: dnat
//!         to one of N endpoints, drawn (`numgen random mod N`) from the endpoint map by the
//!         packet's frontend (with ClientIP affinity, first: dnat to the endpoint the
//!         client's map remembers)
//! nat-postrouting (nat, priority srcnat)
//!   -> masquerading: remember the endpoint of affinity services' new connections (by their
//!      original destination), masquerade connections marked above, and pods that reached
//!      themselves (hairpin)
//! ```
//!
//! Per packet, the cost is two map lookups whatever the number of services and endpoints (the
//! dispatch, the draw); per service port, one chain (two with external traffic) of two
//! rules, and one element per endpoint and frontend in a map shared by the table. There are
//! no per-service sets (creating ~20,000 of them is what makes cold loads slow) and no
//! per-endpoint rules (a rule costs the kernel ~10 times an element, by the profiles); the draw
//! chains, one per endpoint count, keep the rules bound to each map few (the kernel checks
//! every element added against every rule bound to its map).

use std::collections::BTreeSet;
use std::net::IpAddr;

use ferry_model::cidr::Cidr;
use ferry_model::view::{
    topology_endpoints, usable_endpoints, ResolvedEndpoint, ResolvedPort, ResolvedService,
};
use ferry_model::{Protocol, TrafficPolicy};

use crate::ir::*;

/// The mark bit that asks nat-postrouting to masquerade (kube-proxy's is 0x4000 too).
pub const DEFAULT_MASQUERADE_MARK: u32 = 0x4000;

/// An interface (or interface-name prefix) pods' traffic arrives on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalInterface {
    pub name: String,
    /// `name` is a prefix (`veth` for `veth*`).
    pub prefix: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PlanConfig {
    /// This node's name (for externalTrafficPolicy/internalTrafficPolicy Local).
    pub node_name: String,
    /// Addresses node ports are served on.
    pub node_ips: Vec<IpAddr>,
    /// Pod CIDRs (kube-proxy's ClusterCIDR or NodeCIDR local-traffic detection): traffic to
    /// cluster IPs from outside them is masqueraded.
    pub cluster_cidrs: Vec<Cidr>,
    /// Pods' traffic told by the interface it arrives on instead (BridgeInterface or
    /// InterfaceNamePrefix detection); overrides `cluster_cidrs`.
    pub local_interface: Option<LocalInterface>,
    /// Masquerade all traffic to cluster IPs (kube-proxy's `--masquerade-all`).
    pub masquerade_all: bool,
    /// Service CIDRs: new connections to an address in them that no service has are dropped
    /// (as kube-proxy's nftables mode does).
    pub service_cidrs: Vec<Cidr>,
    /// This node's zone (its `topology.kubernetes.io/zone` label): cluster-wide traffic goes
    /// to the endpoints hinted for it (topology-aware routing).
    pub node_zone: Option<String>,
    pub masquerade_mark: u32,
    /// Load-balancer address pools (inclusive ranges): traffic to a pool address that no
    /// service uses on that port is rejected, not forwarded (in routed setups it would loop).
    pub lb_pools: Vec<(IpAddr, IpAddr)>,
    /// Service tables (see [`plan_sharded`]): 0 or 1 is today's one table `ferry`; N > 1
    /// spreads the services over tables `ferry-0`..`ferry-{N-1}` by a stable hash of their
    /// namespace/name, with the checks that need every service in the common table `ferry`.
    pub shards: u16,
}

pub mod names {
    use super::{Family, Protocol};
    pub const SERVICES: &str = "services";
    pub const SERVICE_CHECKS: &str = "service-checks";
    pub const POOL_CHECKS: &str = "pool-checks";
    pub const MARK_FOR_MASQUERADE: &str = "mark-for-masquerade";
    pub const MASQUERADING: &str = "masquerading";
    pub const REJECT: &str = "reject-service";
    pub fn service_ips(f: Family) -> String {
        format!("service-ips-{}", f.suffix())
    }
    pub fn service_nodeports(f: Family) -> String {
        format!("service-nodeports-{}", f.suffix())
    }
    pub fn nodeport_ips(f: Family) -> String {
        format!("nodeport-ips-{}", f.suffix())
    }
    pub fn no_endpoint_services(f: Family) -> String {
        format!("no-endpoint-services-{}", f.suffix())
    }
    pub fn no_endpoint_nodeports(f: Family) -> String {
        format!("no-endpoint-nodeports-{}", f.suffix())
    }
    pub fn cluster_ips(f: Family) -> String {
        format!("cluster-ips-{}", f.suffix())
    }
    pub fn cluster_ip_ports(f: Family) -> String {
        format!("cluster-ip-ports-{}", f.suffix())
    }
    pub fn lb_pools(f: Family) -> String {
        format!("lb-pools-{}", f.suffix())
    }
    pub fn hairpin(f: Family) -> String {
        format!("hairpin-{}", f.suffix())
    }
    pub fn firewall_ips(f: Family) -> String {
        format!("firewall-ips-{}", f.suffix())
    }
    pub fn affinity_frontends(f: Family) -> String {
        format!("affinity-frontends-{}", f.suffix())
    }
    /// Service chains' endpoints of protocol `p`, by frontend address . port . draw.
    pub fn endpoints(f: Family, p: Protocol) -> String {
        format!("endpoints-{}-{}", p.as_nft(), f.suffix())
    }
    /// Service chains' endpoints for traffic that came in on a node port, by node port .
    /// draw.
    pub fn nodeport_endpoints(f: Family, p: Protocol) -> String {
        format!("nodeport-endpoints-{}-{}", p.as_nft(), f.suffix())
    }
    /// As [`endpoints`], for the chains of traffic from outside that choose for themselves
    /// (externalTrafficPolicy: Local, or Cluster with internalTrafficPolicy: Local).
    pub fn external_endpoints(f: Family, p: Protocol) -> String {
        format!("external-endpoints-{}-{}", p.as_nft(), f.suffix())
    }
    /// As [`nodeport_endpoints`], for those chains.
    pub fn external_nodeport_endpoints(f: Family, p: Protocol) -> String {
        format!("external-nodeport-endpoints-{}-{}", p.as_nft(), f.suffix())
    }
}

/// The transport protocols a service port may have (each has its endpoint maps).
pub const PROTOCOLS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

/// The fixed part of the table: base chains, the dispatch chains and the (empty) maps.
fn skeleton(cfg: &PlanConfig) -> Ruleset {
    use names::*;
    let mut rs = Ruleset::default();
    for f in FAMILIES {
        let a = f.addr_type();
        let (p, s) = (KeyType::InetProto, KeyType::InetService);
        rs.add_set(Set::new(
            &service_ips(f),
            &[a, p, s],
            true,
            "cluster, external and load-balancer IPs -> service",
        ));
        rs.add_set(Set::new(
            &service_nodeports(f),
            &[p, s],
            true,
            "node ports -> service",
        ));
        rs.add_set(Set::new(
            &nodeport_ips(f),
            &[a],
            false,
            "addresses node ports are served on",
        ));
        rs.add_set(Set::new(
            &no_endpoint_services(f),
            &[a, p, s],
            true,
            "service IPs without endpoints",
        ));
        rs.add_set(Set::new(
            &no_endpoint_nodeports(f),
            &[p, s],
            true,
            "node ports without endpoints",
        ));
        rs.add_set(Set::new(&cluster_ips(f), &[a], false, "every cluster IP"));
        // A plain set, not service-ips: a verdict map used in a filter chain could not send to
        // chains that DNAT.
        rs.add_set(Set::new(
            &cluster_ip_ports(f),
            &[a, p, s],
            false,
            "every cluster and load-balancer IP . protocol . port",
        ));
        rs.add_set(Set::ranges(&lb_pools(f), a, "load-balancer address pools"));
        rs.add_set(Set::new(
            &hairpin(f),
            &[a, a],
            false,
            "endpoint . itself: a pod reaching itself via a service",
        ));
        rs.add_set(Set::new(
            &firewall_ips(f),
            &[a, p, s],
            true,
            "load-balancer IPs with source ranges -> their firewall",
        ));
        rs.add_set(Set::new(
            &affinity_frontends(f),
            &[a, p, s],
            true,
            "addresses of services with ClientIP affinity -> where their clients are remembered",
        ));
        for pr in PROTOCOLS {
            for (chooser, frontend, whose) in [
                (Chooser::Service, "service", ""),
                (Chooser::External, "external", " of traffic from outside"),
            ] {
                let (by_addr, by_port) = chooser.maps(f, pr);
                let by_addr_comment =
                    format!("{frontend} address . port . draw -> endpoint{whose}");
                rs.add_set(Set::endpoints(&by_addr, f, pr, false, &by_addr_comment));
                let by_port_comment = format!("node port . draw -> endpoint{whose}");
                rs.add_set(Set::endpoints(&by_port, f, pr, true, &by_port_comment));
            }
        }
    }
    for (a, b) in &cfg.lb_pools {
        rs.set_mut(&lb_pools(Family::of(*a))).insert(
            vec![Value::Range(*a, *b)],
            None,
            String::new(),
        );
    }
    for ip in &cfg.node_ips {
        let f = Family::of(*ip);
        rs.set_mut(&nodeport_ips(f))
            .insert(vec![Value::Ip(*ip)], None, String::new());
    }

    // The hooks: each base chain jumps to the chain that does the work.
    let hooks: [(&str, ChainType, Hook, i32, &str, &str); 5] = [
        (
            "filter-prerouting",
            ChainType::Filter,
            Hook::Prerouting,
            -110,
            SERVICE_CHECKS,
            "before DNAT: reject what no endpoint can take",
        ),
        (
            "filter-output",
            ChainType::Filter,
            Hook::Output,
            -110,
            SERVICE_CHECKS,
            "before DNAT: reject what no endpoint can take",
        ),
        (
            "nat-prerouting",
            ChainType::Nat,
            Hook::Prerouting,
            -100,
            SERVICES,
            "DNAT traffic arriving for services",
        ),
        (
            "nat-output",
            ChainType::Nat,
            Hook::Output,
            -100,
            SERVICES,
            "DNAT this node's own traffic to services",
        ),
        (
            "nat-postrouting",
            ChainType::Nat,
            Hook::Postrouting,
            100,
            MASQUERADING,
            "SNAT what needs it",
        ),
    ];
    for (name, type_, hook, priority, target, comment) in hooks {
        let mut c = Chain::base(name, type_, hook, priority, comment);
        c.push(Rule::new(
            vec![],
            Action::Verdict(Verdict::Jump(target.into())),
        ));
        if name == "filter-prerouting" {
            // Arriving traffic only: the node's own connections to its LAN are never refused
            // because a pool happens to cover the neighbour's address.
            c.push(Rule::new(
                vec![],
                Action::Verdict(Verdict::Jump(POOL_CHECKS.into())),
            ));
        }
        rs.add_chain(c);
    }

    let mut c = Chain::new(
        SERVICE_CHECKS,
        "reject new connections no endpoint can take",
    );
    for f in FAMILIES {
        // loadBalancerSourceRanges first: a source outside them is dropped (as kube-proxy),
        // on every packet, so narrowing the ranges also cuts established connections.
        c.push(Rule::new(
            vec![],
            Action::ServiceTupleVmap(f, firewall_ips(f).into()),
        ));
    }
    for f in FAMILIES {
        c.push(Rule::new(
            vec![Match::CtStateNew],
            Action::ServiceTupleVmap(f, no_endpoint_services(f).into()),
        ));
        c.push(Rule::new(
            vec![
                Match::CtStateNew,
                Match::DaddrInSet(f, nodeport_ips(f).into()),
            ],
            Action::ProtoPortVmap(no_endpoint_nodeports(f).into()),
        ));
        c.push(
            Rule::new(
                vec![
                    Match::CtStateNew,
                    Match::DaddrInSet(f, cluster_ips(f).into()),
                    Match::ServiceTupleNotIn(f, cluster_ip_ports(f).into()),
                ],
                Action::Verdict(Verdict::Goto(REJECT.into())),
            )
            .with_comment("a cluster IP on a port its service lacks"),
        );
        for cidr in cfg
            .service_cidrs
            .iter()
            .filter(|c| Family::of(c.network()) == f)
        {
            c.push(
                Rule::new(
                    vec![
                        Match::CtStateNew,
                        Match::DaddrIn(*cidr),
                        Match::DaddrNotInSet(f, cluster_ips(f).into()),
                    ],
                    Action::Verdict(Verdict::Drop),
                )
                .with_comment("an address of the service CIDR that no service has"),
            );
        }
    }
    rs.add_chain(c);

    let mut c = Chain::new(
        POOL_CHECKS,
        "refuse arriving connections to pool addresses no service uses",
    );
    for f in FAMILIES {
        c.push(
            Rule::new(
                vec![
                    Match::CtStateNew,
                    Match::DaddrInSet(f, lb_pools(f).into()),
                    Match::ServiceTupleNotIn(f, cluster_ip_ports(f).into()),
                ],
                Action::Verdict(Verdict::Goto(REJECT.into())),
            )
            .with_comment("a load-balancer address on a port no service uses"),
        );
    }
    rs.add_chain(c);

    let mut c = Chain::new(SERVICES, "dispatch by destination");
    for f in FAMILIES {
        c.push(Rule::new(
            vec![],
            Action::ServiceTupleVmap(f, service_ips(f).into()),
        ));
        c.push(Rule::new(
            vec![Match::DaddrInSet(f, nodeport_ips(f).into())],
            Action::ProtoPortVmap(service_nodeports(f).into()),
        ));
    }
    rs.add_chain(c);

    let m = cfg.masquerade_mark;
    let mut c = Chain::new(MARK_FOR_MASQUERADE, "ask nat-postrouting to masquerade");
    c.push(Rule::new(vec![], Action::SetMark(m)));
    rs.add_chain(c);

    let mut c = Chain::new(
        MASQUERADING,
        "masquerade marked connections and hairpin traffic",
    );
    for f in FAMILIES {
        // ClientIP affinity: remember (or refresh) the endpoint each new connection went to,
        // whether chosen at random or remembered (nat chains see only first packets).
        c.push(Rule::new(
            vec![Match::CtStatusDnat],
            Action::OriginalTupleVmap(f, affinity_frontends(f).into()),
        ));
    }
    for f in FAMILIES {
        c.push(Rule::new(
            vec![
                Match::CtStatusDnat,
                Match::AddrPairInSet(f, hairpin(f).into()),
            ],
            Action::Verdict(Verdict::Jump(MARK_FOR_MASQUERADE.into())),
        ));
    }
    c.push(Rule::new(
        vec![Match::MarkLacks(m)],
        Action::Verdict(Verdict::Return),
    ));
    c.push(Rule::new(vec![], Action::ToggleMark(m)));
    c.push(Rule::new(vec![], Action::Masquerade { fully_random: true }));
    rs.add_chain(c);

    let mut c = Chain::new(REJECT, "no endpoint: refuse instead of black-holing");
    c.push(Rule::new(
        vec![Match::L4Proto(Protocol::Tcp)],
        Action::RejectTcpReset,
    ));
    c.push(Rule::new(vec![], Action::RejectIcmpx));
    rs.add_chain(c);
    rs
}

/// `service-default/web/tcp/80` and friends: the chain names read as what they serve. The
/// second family of a dual-stack service gets its own chains, `service-default/web/tcp/80/ipv6`
/// (`family` is "" for the primary family, else "/ipv4" or "/ipv6").
pub fn port_chain(
    prefix: &str,
    svc: &ResolvedService,
    port: &ResolvedPort,
    family: &str,
) -> String {
    format!(
        "{prefix}-{}/{}/{}/{}{family}",
        svc.id.namespace,
        svc.id.name,
        port.protocol.as_nft(),
        port.port
    )
}

fn describe(svc: &ResolvedService, port: &ResolvedPort) -> String {
    if port.name.is_empty() {
        format!("{} {}/{}", svc.id, port.port, port.protocol.as_k8s())
    } else {
        format!(
            "{}:{} {}/{}",
            svc.id,
            port.name,
            port.port,
            port.protocol.as_k8s()
        )
    }
}

/// Which endpoint maps a chain that chooses among several endpoints draws from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Chooser {
    /// A service chain (`service-...`): [`names::endpoints`], [`names::nodeport_endpoints`].
    Service,
    /// A chain of traffic from outside that chooses for itself: the `external-` maps.
    External,
}

/// The chain that DNATs to one of `n` endpoints drawn at random (`choose-N-tcp-v4`, or
/// `choose-external-N-tcp-v4`): one draw `numgen random mod n` looked up with the packet's
/// frontend in the chooser's endpoint map; a packet that came in on a node port misses it
/// (the dispatch would have sent a packet to a frontend of the map elsewhere) and is looked
/// up by its port in the node-port map. Shared by every chain choosing among n endpoints of
/// `proto` and `family` (its name says all it holds), so each map is bound by a few rules: the
/// kernel checks every element added against every rule bound to its map.
fn draw_chain(chooser: Chooser, family: Family, proto: Protocol, n: u32) -> Chain {
    let (by_addr, by_port) = chooser.maps(family, proto);
    let kind = match chooser {
        Chooser::Service => "",
        Chooser::External => "external-",
    };
    let name = format!("choose-{kind}{n}-{}-{}", proto.as_nft(), family.suffix());
    let mut c = Chain::new(
        name,
        format!("one of {n} endpoints at random, by the service's frontend"),
    );
    for (map, nodeport) in [(by_addr, false), (by_port, true)] {
        c.push(Rule::new(
            vec![Match::L4Proto(proto)],
            Action::DnatDraw {
                family,
                proto,
                map: set_key(&map),
                modulus: n,
                nodeport,
            },
        ));
    }
    c
}

impl Chooser {
    /// Its endpoint maps of `proto`: by address, and by node port.
    fn maps(self, f: Family, proto: Protocol) -> (String, String) {
        use names::*;
        match self {
            Chooser::Service => (endpoints(f, proto), nodeport_endpoints(f, proto)),
            Chooser::External => (
                external_endpoints(f, proto),
                external_nodeport_endpoints(f, proto),
            ),
        }
    }
}

/// The rules choosing one of `eps` uniformly. One endpoint: `dnat` to it. Several: `goto` the
/// table's chain that draws one of n (see [`draw_chain`]), whose elements for this chain's
/// frontends (see [`Fragment::draws`]) are returned, one per draw; none for one endpoint.
fn endpoint_rules(
    fr: &mut Fragment,
    chain: &mut Chain,
    family: Family,
    proto: Protocol,
    eps: &[&ResolvedEndpoint],
    chooser: Chooser,
) -> Draws {
    if let [e] = eps {
        chain.push(Rule::new(
            vec![Match::L4Proto(proto)],
            Action::Dnat {
                addr: e.addr,
                port: e.port,
            },
        ));
        return Draws::from(Vec::new());
    }
    let modulus = u32::try_from(eps.len()).unwrap_or(u32::MAX);
    let draw = draw_chain(chooser, family, proto, modulus);
    chain.push(Rule::new(
        vec![],
        Action::Verdict(Verdict::Goto(draw.name.clone())),
    ));
    if !fr.shared.iter().any(|c| c.name == draw.name) {
        fr.shared.push(std::sync::Arc::new(draw));
    }
    eps.iter()
        .map(|e| Element::endpoint(e.addr, e.port))
        .collect()
}

/// The endpoint of each draw 0..n of a chain, shared by its frontends' elements.
pub type Draws = std::sync::Arc<[std::sync::Arc<Element>]>;

/// The key text of draw `k` of the frontend whose key text is `prefix` (as [`key_text`]
/// writes the frontend's values and the draw), into `out`.
fn draw_key(out: &mut String, prefix: &str, k: usize) {
    use std::fmt::Write as _;
    out.clear();
    let _ = write!(out, "{prefix} . {k}");
}

/// ClientIP affinity for the endpoint-choosing chain `chain` (of `family`): its dynamic map
/// (client address -> endpoint), the chain that remembers each new connection's endpoint in
/// it, and the rule (first in `chain`, before the random choice) that sends a remembered client
/// back. The map holds endpoint addresses when all of `eps` listen on one port (the usual case;
/// the port is then in the DNAT rule), else address . port — which libnftables 1.0.6 cannot
/// write for IPv6 (it aborts): such IPv6 chains get no affinity (None).
///
/// The map's name carries a hash of the timeout and of the endpoints the chain chooses from:
/// when they change, the map is replaced by an empty one, so a client is never sent to an
/// endpoint that has gone (kube-proxy keeps the clients of the endpoints that stay; ferry's
/// one map per chain keeps the lookup to one per connection).
fn affinity(
    fr: &mut Fragment,
    chain: &str,
    family: Family,
    proto: Protocol,
    timeout: u32,
    eps: &[&ResolvedEndpoint],
) -> Option<(Rule, String)> {
    use std::hash::Hasher;
    let one_port = eps
        .first()
        .map(|e| e.port)
        .filter(|p| eps.iter().all(|e| e.port == *p));
    if one_port.is_none() && family == Family::V6 {
        return None;
    }
    let mut h = fnv::FnvHasher::default();
    h.write(&timeout.to_le_bytes());
    for e in eps {
        let mut b = Vec::new();
        e.addr.encode(&mut b);
        h.write(&b);
        h.write(&e.port.to_le_bytes());
    }
    let map = format!("affinity-{chain}-{:08x}", h.finish() as u32);
    let a = family.addr_type();
    let data = match one_port {
        Some(_) => vec![a],
        None => vec![a, KeyType::InetService],
    };
    fr.sets.push(Set::dynamic_map(
        &map,
        &[a],
        &data,
        &format!("client -> endpoint of {chain}, for {timeout} s after its last connection"),
    ));
    let remember = format!("remember-{chain}");
    let mut c = Chain::new(remember.as_str(), format!("ClientIP affinity of {chain}"));
    c.push(Rule::new(
        vec![],
        Action::Remember {
            family,
            map: map.clone().into(),
            timeout,
            with_port: one_port.is_none(),
        },
    ));
    fr.add_chain(c);
    let rule = Rule::new(
        vec![Match::L4Proto(proto)],
        Action::DnatRemembered {
            family,
            map: map.into(),
            port: one_port,
        },
    )
    .with_comment("ClientIP affinity");
    Some((rule, remember))
}

/// What one service adds to the table: its chains and its map/set elements.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fragment {
    pub chains: Vec<std::sync::Arc<Chain>>,
    /// Its chains' endpoint draws: (endpoint map, frontend key text, the endpoint of each
    /// draw). The table holds, for each frontend, the draws of the first service (by
    /// namespace/name) that has that frontend, as elements `frontend . k`; kept here once per
    /// frontend rather than as one element each.
    pub draws: Vec<(Key, Key, Draws)>,
    /// Chains it uses that other services' may too (the draw chains, see [`draw_chain`]):
    /// in the table while any service uses them. Equal names are equal chains.
    pub shared: Vec<std::sync::Arc<Chain>>,
    /// Sets of its own (client affinity maps).
    pub sets: Vec<Set>,
    /// (set name, key text, element): the key and element are the ones the table holds.
    pub elements: Vec<(Key, Key, std::sync::Arc<Element>)>,
    /// Endpoint addresses that may reach themselves through the service (sorted, once each).
    pub hairpins: Vec<IpAddr>,
}

/// The name of one of the skeleton's sets as an element's set (see [`Fragment::elements`]):
/// shared by every element of that set, not allocated per element.
fn set_key(name: &str) -> Key {
    static KEYS: std::sync::OnceLock<Vec<Key>> = std::sync::OnceLock::new();
    let keys = KEYS.get_or_init(|| {
        use names::*;
        FAMILIES
            .into_iter()
            .flat_map(|f| {
                [
                    service_ips(f),
                    service_nodeports(f),
                    nodeport_ips(f),
                    no_endpoint_services(f),
                    no_endpoint_nodeports(f),
                    cluster_ips(f),
                    cluster_ip_ports(f),
                    lb_pools(f),
                    hairpin(f),
                    firewall_ips(f),
                    affinity_frontends(f),
                ]
                .into_iter()
                .chain(PROTOCOLS.into_iter().flat_map(move |p| {
                    [
                        endpoints(f, p),
                        nodeport_endpoints(f, p),
                        external_endpoints(f, p),
                        external_nodeport_endpoints(f, p),
                    ]
                }))
            })
            .map(Key::from)
            .collect()
    });
    keys.iter()
        .find(|k| ***k == *name)
        .cloned()
        .unwrap_or_else(|| name.into())
}

impl Fragment {
    /// The elements of a chooser's endpoint maps for one frontend: draw k -> `draws[k]`.
    /// `key` is the frontend (address . protocol . port, or protocol . node port).
    fn draws(&mut self, map: &str, key: &[Value], draws: &Draws) {
        if !draws.is_empty() {
            self.draws
                .push((set_key(map), key_text(key).into(), draws.clone()));
        }
    }
    fn insert(&mut self, set: &str, key: Vec<Value>, verdict: Option<Verdict>, comment: String) {
        self.elements.push((
            set_key(set),
            key_text(&key).into(),
            Element::shared(verdict, comment),
        ));
    }
    /// Kept until the service changes: no spare capacity, each hairpin once.
    fn finish(mut self) -> Fragment {
        self.hairpins.sort_unstable();
        self.hairpins.dedup();
        self.hairpins.shrink_to_fit();
        self.elements.shrink_to_fit();
        self.draws.shrink_to_fit();
        self.chains.shrink_to_fit();
        self.shared.shrink_to_fit();
        self.sets.shrink_to_fit();
        self
    }
    fn add_chain(&mut self, mut c: Chain) {
        // Kept until the service changes: no spare capacity.
        c.rules.shrink_to_fit();
        // Computed once here, then shared by every plan that reuses this fragment.
        let _ = c.fingerprint();
        self.chains.push(std::sync::Arc::new(c));
    }
}

/// Plans one service's fragment: of a dual-stack service, each family's cluster IP, node
/// ports, external and load-balancer addresses go to that family's endpoints only (as
/// kube-proxy's two per-family proxiers do).
pub fn plan_service(cfg: &PlanConfig, svc: &ResolvedService) -> Fragment {
    if !svc.is_dual_stack() {
        return plan_family(cfg, svc, "").finish();
    }
    let mut fr = Fragment::default();
    for view in svc.families() {
        let suffix = match view.cluster_ip {
            Some(ip) if view.cluster_ip != svc.cluster_ip && ip.is_ipv4() => "/ipv4",
            Some(_) if view.cluster_ip != svc.cluster_ip => "/ipv6",
            _ => "",
        };
        let part = plan_family(cfg, &view, suffix);
        fr.chains.extend(part.chains);
        for c in part.shared {
            if !fr.shared.iter().any(|s| s.name == c.name) {
                fr.shared.push(c);
            }
        }
        fr.sets.extend(part.sets);
        fr.elements.extend(part.elements);
        fr.draws.extend(part.draws);
        fr.hairpins.extend(part.hairpins);
    }
    fr.finish()
}

/// Plans one family of a service (`svc` holds that family's addresses and endpoints only;
/// `suffix` goes on its chains' names, see [`port_chain`]).
fn plan_family(cfg: &PlanConfig, svc: &ResolvedService, suffix: &str) -> Fragment {
    use names::*;
    let mut fr = Fragment::default();
    let reject = Verdict::Goto(REJECT.into());
    let Some(cip) = svc.cluster_ip else {
        return fr;
    };
    let f = Family::of(cip);
    fr.insert(
        &cluster_ips(f),
        vec![Value::Ip(cip)],
        None,
        svc.id.to_string(),
    );
    let cluster_cidr = cfg
        .cluster_cidrs
        .iter()
        .find(|c| c.is_ipv4() == cip.is_ipv4());
    // kube-proxy's local-traffic detection: what marks traffic as from this cluster's pods
    // (an interface, else the pod CIDR), and so what is masqueraded on its way to a cluster IP.
    let from_pods: Option<Vec<Match>> = match &cfg.local_interface {
        Some(li) => Some(vec![Match::IifName {
            name: li.name.clone().into(),
            prefix: li.prefix,
            negate: false,
        }]),
        None => cluster_cidr.map(|cc| vec![Match::SaddrIn(*cc)]),
    };
    let masquerade_unless: Option<Vec<Match>> = if cfg.masquerade_all {
        // Traffic to the cluster IP only, as kube-proxy: pods short-circuited from an
        // externalTrafficPolicy: Local address to this chain keep their address.
        Cidr::new(cip, if cip.is_ipv4() { 32 } else { 128 }).map(|c| vec![Match::DaddrIn(c)])
    } else {
        match &cfg.local_interface {
            Some(li) => Some(vec![Match::IifName {
                name: li.name.clone().into(),
                prefix: li.prefix,
                negate: true,
            }]),
            None => cluster_cidr.map(|cc| vec![Match::SaddrNotIn(*cc)]),
        }
    };
    let firewall = firewall_chain(cfg, svc, suffix);
    if let Some(c) = &firewall {
        fr.add_chain(c.clone());
    }
    for port in &svc.ports {
        let what = describe(svc, port);
        let proto = Value::Proto(port.protocol);
        // The chains that choose an endpoint, and (with ClientIP affinity) the chain that
        // remembers the clients of each: (frontend tuple, remember chain) pairs.
        let mut remembers: Vec<(Vec<Value>, String)> = Vec::new();
        let choose =
            |fr: &mut Fragment, c: &mut Chain, eps: &[&ResolvedEndpoint], chooser: Chooser| {
                let remember = svc.affinity_timeout.and_then(|t| {
                    let (rule, remember) = affinity(fr, &c.name, f, port.protocol, t, eps)?;
                    c.push(rule);
                    Some(remember)
                });
                let draws = endpoint_rules(fr, c, f, port.protocol, eps, chooser);
                (remember, draws)
            };
        // The frontends of traffic from outside (external and load-balancer addresses of this
        // family, the node port): each gets the draws of the chain its traffic chooses in.
        let outside_keys: Vec<Vec<Value>> = svc
            .external_ips
            .iter()
            .chain(svc.load_balancer_ips.iter())
            .filter(|ip| Family::of(**ip) == f)
            .map(|ip| vec![Value::Ip(*ip), Value::Port(port.port)])
            .collect();
        let nodeport_key = port.node_port.map(|np| vec![Value::Port(np)]);
        let fill_outside = |fr: &mut Fragment, draws: &Draws, chooser: Chooser| {
            let (by_addr, by_port) = chooser.maps(f, port.protocol);
            for k in &outside_keys {
                fr.draws(&by_addr, k, draws);
            }
            if let Some(k) = &nodeport_key {
                fr.draws(&by_port, k, draws);
            }
        };

        // Traffic from inside the cluster (cluster IP).
        let zone = cfg.node_zone.as_deref();
        // Cluster-wide choices follow topology hints (kube-proxy applies them to those only).
        let cluster_wide = || topology_endpoints(usable_endpoints(&port.endpoints, None), zone);
        let internal = match svc.internal_traffic_policy {
            TrafficPolicy::Cluster => cluster_wide(),
            TrafficPolicy::Local => usable_endpoints(&port.endpoints, Some(&cfg.node_name)),
        };
        // The service chain reaches every endpoint of the cluster (not only this node's).
        let internal_all = svc.internal_traffic_policy == TrafficPolicy::Cluster;
        let service_chain: Key = port_chain("service", svc, port, suffix).into();
        let has_external = port.node_port.is_some()
            || !svc.external_ips.is_empty()
            || !svc.load_balancer_ips.is_empty();
        // Whether traffic from outside goes on to the service chain (to choose there).
        let outside_to_service = has_external
            && match svc.external_traffic_policy {
                TrafficPolicy::Cluster => {
                    internal_all && !internal.is_empty() && !cluster_wide().is_empty()
                }
                TrafficPolicy::Local => internal_all && !internal.is_empty(),
            };
        let mut service_remember = None;
        let key = vec![Value::Ip(cip), proto, Value::Port(port.port)];
        fr.insert(&cluster_ip_ports(f), key.clone(), None, String::new());
        if internal.is_empty() {
            // No endpoint at all: reject. internalTrafficPolicy: Local with endpoints on other
            // nodes only: drop, as kube-proxy.
            let verdict = if cluster_wide().is_empty() {
                reject.clone()
            } else {
                Verdict::Drop
            };
            fr.insert(&no_endpoint_services(f), key, Some(verdict), what.clone());
        } else {
            let mut c = Chain::new(service_chain.clone(), &what);
            if let Some(ms) = &masquerade_unless {
                c.push(Rule::new(
                    ms.clone(),
                    Action::Verdict(Verdict::Jump(MARK_FOR_MASQUERADE.into())),
                ));
            }
            let (remember, draws) = choose(&mut fr, &mut c, &internal, Chooser::Service);
            service_remember = remember;
            fr.draws(
                &endpoints(f, port.protocol),
                &[Value::Ip(cip), Value::Port(port.port)],
                &draws,
            );
            if outside_to_service {
                fill_outside(&mut fr, &draws, Chooser::Service);
            }
            if let Some(r) = &service_remember {
                remembers.push((key.clone(), r.clone()));
            }
            fr.add_chain(c);
            fr.insert(
                &service_ips(f),
                key,
                Some(Verdict::Goto(service_chain.clone())),
                what.clone(),
            );
            // Only an endpoint whose packets pass through this node before DNAT can reach
            // itself here: this node's own (and those of no known node). Pods elsewhere are
            // DNATed by their own node, except when they come in to this node's external
            // addresses of a Local service, which sends pod traffic to any endpoint.
            let reenters = svc.external_traffic_policy == TrafficPolicy::Local
                && (port.node_port.is_some()
                    || !svc.external_ips.is_empty()
                    || !svc.load_balancer_ips.is_empty());
            fr.hairpins.extend(
                internal
                    .iter()
                    .filter(|e| reenters || e.node.as_deref().is_none_or(|n| n == cfg.node_name))
                    .map(|e| e.addr),
            );
        }

        // Traffic from outside (node ports, external IPs, load-balancer IPs).
        if !has_external {
            emit_remembers(&mut fr, remembers);
            continue;
        }
        let (external_target, external_remember) = match svc.external_traffic_policy {
            TrafficPolicy::Cluster => {
                let all = cluster_wide();
                if all.is_empty() {
                    (None, None)
                } else {
                    // Masquerade so replies come back through this node, then on to any
                    // endpoint in the cluster.
                    let name: Key = port_chain("external", svc, port, suffix).into();
                    let mut c =
                        Chain::new(name.clone(), format!("{what} from outside the cluster"));
                    c.push(Rule::new(
                        vec![],
                        Action::Verdict(Verdict::Jump(MARK_FOR_MASQUERADE.into())),
                    ));
                    let remember = if svc.internal_traffic_policy == TrafficPolicy::Cluster {
                        c.push(Rule::new(
                            vec![],
                            Action::Verdict(Verdict::Goto(service_chain.clone())),
                        ));
                        service_remember.clone()
                    } else {
                        let (r, draws) = choose(&mut fr, &mut c, &all, Chooser::External);
                        fill_outside(&mut fr, &draws, Chooser::External);
                        // From outside: masqueraded already; only a pod of this node (or of
                        // no known node) can come back to itself here.
                        fr.hairpins.extend(
                            all.iter()
                                .filter(|e| e.node.as_deref().is_none_or(|n| n == cfg.node_name))
                                .map(|e| e.addr),
                        );
                        r
                    };
                    fr.add_chain(c);
                    (Some(name), remember)
                }
            }
            TrafficPolicy::Local => {
                // Only this node's endpoints, no masquerade: the client's address is kept.
                let eps = usable_endpoints(&port.endpoints, Some(&cfg.node_name));
                // As kube-proxy: this cluster's pods and the node itself reach the address as
                // if they went out to a load balancer and came back, on any endpoint (the
                // cluster-wide service chain; the node's own traffic masqueraded).
                let short_circuit = internal_all && !internal.is_empty();
                if eps.is_empty() && !short_circuit {
                    (None, None)
                } else {
                    let name: Key = port_chain("local", svc, port, suffix).into();
                    let mut c = Chain::new(
                        name.clone(),
                        format!("{what} from outside, to this node's endpoints"),
                    );
                    if short_circuit {
                        let to_service = Action::Verdict(Verdict::Goto(service_chain.clone()));
                        if let Some(ms) = &from_pods {
                            c.push(
                                Rule::new(ms.clone(), to_service.clone())
                                    .with_comment("short-circuit pod traffic"),
                            );
                        }
                        c.push(
                            Rule::new(
                                vec![Match::FibSaddrLocal],
                                Action::Verdict(Verdict::Jump(MARK_FOR_MASQUERADE.into())),
                            )
                            .with_comment("masquerade local traffic"),
                        );
                        c.push(
                            Rule::new(vec![Match::FibSaddrLocal], to_service)
                                .with_comment("short-circuit local traffic"),
                        );
                    }
                    let remember = if eps.is_empty() {
                        c.push(
                            Rule::new(vec![], Action::Verdict(Verdict::Drop))
                                .with_comment("no endpoint on this node"),
                        );
                        None
                    } else {
                        let (r, draws) = choose(&mut fr, &mut c, &eps, Chooser::External);
                        fill_outside(&mut fr, &draws, Chooser::External);
                        fr.hairpins.extend(eps.iter().map(|e| e.addr));
                        r
                    };
                    fr.add_chain(c);
                    (Some(name), remember)
                }
            }
        };
        // Without endpoints: reject, as kube-proxy does, except under Local policy while other
        // nodes have endpoints: drop then (load balancers health-check the node port and steer
        // away from this node; a refusal would end the client's connection attempt).
        let none_verdict = match svc.external_traffic_policy {
            TrafficPolicy::Local if !usable_endpoints(&port.endpoints, None).is_empty() => {
                Verdict::Drop
            }
            TrafficPolicy::Cluster | TrafficPolicy::Local => reject.clone(),
        };
        let ext_ips = svc.external_ips.iter().chain(svc.load_balancer_ips.iter());
        for ip in ext_ips {
            let fam = Family::of(*ip);
            let key = vec![Value::Ip(*ip), proto, Value::Port(port.port)];
            fr.insert(&cluster_ip_ports(fam), key.clone(), None, String::new());
            if let Some(r) = &external_remember {
                remembers.push((key.clone(), r.clone()));
            }
            match &external_target {
                Some(t) => fr.insert(
                    &service_ips(fam),
                    key,
                    Some(Verdict::Goto(t.clone())),
                    what.clone(),
                ),
                None => fr.insert(
                    &no_endpoint_services(fam),
                    key,
                    Some(none_verdict.clone()),
                    what.clone(),
                ),
            }
        }
        if let Some(fw) = &firewall {
            // Only the load-balancer addresses are filtered (not node ports, as kube-proxy).
            for ip in &svc.load_balancer_ips {
                fr.insert(
                    &firewall_ips(Family::of(*ip)),
                    vec![Value::Ip(*ip), proto, Value::Port(port.port)],
                    Some(Verdict::Jump(fw.name.clone())),
                    what.clone(),
                );
            }
        }
        if let Some(np) = port.node_port {
            let key = vec![proto, Value::Port(np)];
            if let Some(r) = &external_remember {
                for ip in cfg.node_ips.iter().filter(|ip| Family::of(**ip) == f) {
                    remembers.push((vec![Value::Ip(*ip), proto, Value::Port(np)], r.clone()));
                }
            }
            match &external_target {
                Some(t) => fr.insert(
                    &service_nodeports(f),
                    key,
                    Some(Verdict::Goto(t.clone())),
                    what.clone(),
                ),
                None => fr.insert(
                    &no_endpoint_nodeports(f),
                    key,
                    Some(none_verdict.clone()),
                    what.clone(),
                ),
            }
        }
        emit_remembers(&mut fr, remembers);
    }

    fr
}

/// The elements that send each affinity frontend to its remember chain (nat-postrouting).
fn emit_remembers(fr: &mut Fragment, remembers: Vec<(Vec<Value>, String)>) {
    for (key, chain) in remembers {
        let f = match key.first() {
            Some(Value::Ip(ip)) => Family::of(*ip),
            _ => continue,
        };
        fr.insert(
            &names::affinity_frontends(f),
            key,
            Some(Verdict::Jump(chain.into())),
            String::new(),
        );
    }
}

/// The firewall of a LoadBalancer service with source ranges (`firewall-<ns>/<name>`): drops
/// sources outside them. None when there is nothing to filter (no load-balancer address, no
/// range, or a range that is everything). As kube-proxy, when a range holds one of this node's
/// addresses the load-balancer addresses are allowed as sources too (a node reaching a VIP it
/// holds locally sends from the VIP).
fn firewall_chain(cfg: &PlanConfig, svc: &ResolvedService, suffix: &str) -> Option<Chain> {
    let ranges = &svc.load_balancer_source_ranges;
    if svc.load_balancer_ips.is_empty()
        || ranges.is_empty()
        || ranges.iter().any(|r| r.prefix_len() == 0)
    {
        return None;
    }
    let mut allowed: Vec<Cidr> = ranges.clone();
    if cfg
        .node_ips
        .iter()
        .any(|ip| ranges.iter().any(|r| r.contains(*ip)))
    {
        for ip in &svc.load_balancer_ips {
            let host = if ip.is_ipv4() { 32 } else { 128 };
            allowed.extend(Cidr::new(*ip, host));
        }
    }
    allowed.sort();
    allowed.dedup();
    let name = format!("firewall-{}/{}{suffix}", svc.id.namespace, svc.id.name);
    let mut c = Chain::new(
        name.as_str(),
        format!("{}: loadBalancerSourceRanges", svc.id),
    );
    c.push(Rule::new(
        vec![Match::SaddrNotInAny(allowed.into())],
        Action::Verdict(Verdict::Drop),
    ));
    Some(c)
}

/// Plans the whole table for this node.
pub fn plan(cfg: &PlanConfig, services: &[ResolvedService]) -> Ruleset {
    Planner::default().plan(cfg, services)
}

/// The shard (0..n) of a service: FNV-1a of `namespace/name`, stable across runs and builds.
pub fn shard_of(id: &ferry_model::ObjectRef, n: u16) -> u16 {
    if n <= 1 {
        return 0;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id
        .namespace
        .bytes()
        .chain(std::iter::once(b'/'))
        .chain(id.name.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(n)) as u16
}

/// The name of shard `k`'s table.
pub fn shard_table(k: u16) -> String {
    format!("{TABLE}-{k}")
}

/// The configuration a shard table is planned with: the checks that must see every service
/// (service CIDR addresses no service has, pool addresses no service uses) live in the common
/// table only; a shard rejects only what its own services lack.
pub fn shard_config(cfg: &PlanConfig) -> PlanConfig {
    PlanConfig {
        service_cidrs: Vec::new(),
        lb_pools: Vec::new(),
        shards: 1,
        ..cfg.clone()
    }
}

/// The common table of a sharded layout: the skeleton with every service's cluster IPs and
/// cluster IP . protocol . port (plain sets, no verdicts: changing them never makes the
/// kernel re-validate chains) for the service CIDR and pool checks; no service chains.
pub fn plan_common(cfg: &PlanConfig, services: &[ResolvedService]) -> Ruleset {
    let mut rs = skeleton(cfg);
    rs.table = Some(TABLE.into());
    // An element several services ask for carries the smallest namespace/name's (as in
    // [`plan`]); of the same service twice, the first counts.
    let mut sorted: Vec<&ResolvedService> = services.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    sorted.dedup_by(|b, a| a.id == b.id);
    for svc in sorted {
        for (set, key, el) in common_elements(cfg, svc) {
            if let Some(s) = rs.sets.get_mut(&*set) {
                s.elements.entry(key).or_insert(el);
            }
        }
    }
    rs
}

/// What a service puts in the common table: its cluster IP and cluster/load-balancer
/// IP . protocol . port elements.
fn common_elements(
    cfg: &PlanConfig,
    svc: &ResolvedService,
) -> Vec<(Key, Key, std::sync::Arc<Element>)> {
    plan_service(cfg, svc)
        .elements
        .into_iter()
        .filter(|(set, _, _)| {
            FAMILIES
                .iter()
                .any(|f| **set == *names::cluster_ips(*f) || **set == *names::cluster_ip_ports(*f))
        })
        .collect()
}

/// [`plan_sharded`] incrementally: a [`Planner`] per shard holding only its services, and the
/// common table made of the shards' own cluster IP elements (shared with them, not planned or
/// kept twice). A change re-plans the changed services only, and touches their shard (and the
/// common table when their addresses change).
#[derive(Debug, Default)]
pub struct ShardedPlanner {
    cfg: Option<PlanConfig>,
    shards: Vec<Planner>,
    common: Ruleset,
}

/// The sets of the common table that hold elements: every service's cluster IPs and cluster
/// IP . protocol . port (the same elements as in its shard).
fn common_sets() -> impl Iterator<Item = String> {
    FAMILIES
        .into_iter()
        .flat_map(|f| [names::cluster_ips(f), names::cluster_ip_ports(f)])
}

impl ShardedPlanner {
    /// The tables as last planned: the common one first, then the shards.
    pub fn tables(&self) -> Vec<&Ruleset> {
        std::iter::once(&self.common)
            .chain(self.shards.iter().map(|p| p.ruleset()))
            .collect()
    }

    /// Starts over with `cfg`: every table its skeleton, no service.
    fn configure(&mut self, cfg: &PlanConfig) {
        let n = cfg.shards.max(2);
        self.cfg = Some(cfg.clone());
        self.shards = (0..n)
            .map(|k| Planner::for_table(&shard_table(k)))
            .collect();
        self.common = skeleton(cfg);
        self.common.table = Some(TABLE.into());
    }

    /// Brings every table up to date (`cfg.shards` > 1); returns what changed in each, in
    /// the order of [`ShardedPlanner::tables`].
    pub fn update(&mut self, cfg: &PlanConfig, services: &[ResolvedService]) -> Vec<Touched> {
        self.update_refs(cfg, services)
    }

    /// [`ShardedPlanner::update`] of services held elsewhere (a map's values).
    pub fn update_refs<'s>(
        &mut self,
        cfg: &PlanConfig,
        services: impl IntoIterator<Item = &'s ResolvedService>,
    ) -> Vec<Touched> {
        let mut common_touched = Touched::default();
        if self.cfg.as_ref() != Some(cfg) {
            self.configure(cfg);
            common_touched.full = true;
        }
        let n = self.shards.len() as u16;
        // Each planner sees only its services (an unchanged one costs it a hash).
        let mut mine: Vec<Vec<&ResolvedService>> = vec![Vec::new(); usize::from(n)];
        for svc in services {
            mine[usize::from(shard_of(&svc.id, n))].push(svc);
        }
        let scfg = shard_config(cfg);
        let mut out = vec![common_touched];
        for (p, svcs) in self.shards.iter_mut().zip(mine) {
            out.push(p.update_refs(&scfg, svcs).1);
        }
        self.settle_common(&mut out);
        out
    }

    /// [`Planner::update_changed`] for the sharded layout: `changed` services are added or
    /// replace the ones of their names (the first of a name counts), then `removed` are taken
    /// out; only the common table and the shards of those services are touched, at the cost
    /// of planning the changed services. The tables are the ones [`ShardedPlanner::update`] of
    /// the resulting services would give; returns what changed in each, in the order of
    /// [`ShardedPlanner::tables`]. A configuration other than the last update's is refused.
    pub fn update_changed<'a, 'b>(
        &mut self,
        cfg: &PlanConfig,
        changed: impl IntoIterator<Item = &'a ResolvedService>,
        removed: impl IntoIterator<Item = &'b ferry_model::ObjectRef>,
    ) -> Result<Vec<Touched>, NeedsFullUpdate> {
        let mut common_touched = Touched::default();
        match &self.cfg {
            Some(c) if c == cfg => {}
            Some(_) => return Err(NeedsFullUpdate),
            None => {
                self.configure(cfg);
                common_touched.full = true;
            }
        }
        let n = self.shards.len() as u16;
        // Per shard: its changed services and its removed ones (only shards with some are
        // planned).
        let mut per_shard: Vec<(Vec<&ResolvedService>, Vec<&ferry_model::ObjectRef>)> =
            vec![(Vec::new(), Vec::new()); usize::from(n)];
        for svc in changed {
            per_shard[usize::from(shard_of(&svc.id, n))].0.push(svc);
        }
        for id in removed {
            per_shard[usize::from(shard_of(id, n))].1.push(id);
        }
        let scfg = shard_config(cfg);
        let fresh = common_touched.full;
        let mut out = vec![common_touched];
        for (p, (svcs, gone)) in self.shards.iter_mut().zip(per_shard) {
            out.push(if fresh || !svcs.is_empty() || !gone.is_empty() {
                p.update_changed(&scfg, svcs, gone)?
            } else {
                Touched::default()
            });
        }
        self.settle_common(&mut out);
        Ok(out)
    }

    /// Brings the common table's elements in line with the shards after they changed as
    /// `touched` says (`touched[0]`, the common table's, gets what changed in it): each key
    /// holds the element of its first owner by namespace/name over all shards (as [`plan`]).
    fn settle_common(&mut self, touched: &mut [Touched]) {
        let Some((common_touched, shards_touched)) = touched.split_first_mut() else {
            return;
        };
        let everything = common_touched.full || shards_touched.iter().any(|t| t.full);
        for set in common_sets() {
            let keys: BTreeSet<Key> = if everything {
                let mut all: BTreeSet<Key> = self
                    .common
                    .sets
                    .get(&set)
                    .map(|s| s.elements.keys().cloned().collect())
                    .unwrap_or_default();
                for p in &self.shards {
                    if let Some(s) = p.rs.sets.get(&set) {
                        all.extend(s.elements.keys().cloned());
                    }
                }
                all
            } else {
                shards_touched
                    .iter()
                    .filter_map(|t| t.elements.get(&set))
                    .flatten()
                    .cloned()
                    .collect()
            };
            let set_key: Key = set.as_str().into();
            for key in keys {
                let first = self
                    .shards
                    .iter()
                    .filter_map(|p| p.first_owner(&set_key, &key))
                    .min_by(|a, b| a.0.cmp(b.0));
                let Some(s) = self.common.sets.get_mut(&set) else {
                    continue;
                };
                match first {
                    Some((_, k, el)) => {
                        if s.elements.get(&key) != Some(&el) {
                            s.elements.insert(k, el);
                            common_touched.element(&set, &key);
                        }
                    }
                    None => {
                        if s.elements.remove(&key).is_some() {
                            common_touched.element(&set, &key);
                        }
                    }
                }
            }
        }
        if everything {
            compact_sets(&mut self.common);
        }
    }
}

/// The sharded layout (`cfg.shards` > 1): the common table `ferry` first, then one table per
/// shard, each a whole ferry table (own base chains at the same hooks and priorities) holding
/// only its services. A packet for a service of another shard finds nothing in a shard's maps
/// and falls through it untouched; the first table that DNATs a new connection binds its NAT
/// (netfilter skips later NAT chains of the hook). Each table is validated by the kernel on
/// its own, so an endpoint change re-validates one shard. With `shards` <= 1: today's table.
pub fn plan_sharded(cfg: &PlanConfig, services: &[ResolvedService]) -> Vec<Ruleset> {
    if cfg.shards <= 1 {
        return vec![plan(cfg, services)];
    }
    let mut out = vec![plan_common(cfg, services)];
    let scfg = shard_config(cfg);
    for k in 0..cfg.shards {
        let mine: Vec<ResolvedService> = services
            .iter()
            .filter(|s| shard_of(&s.id, cfg.shards) == k)
            .cloned()
            .collect();
        let mut rs = plan(&scfg, &mine);
        rs.table = Some(shard_table(k).into());
        out.push(rs);
    }
    out
}

/// What an incremental plan changed: the chains and elements to look at (None of them may
/// actually differ from before; the differ decides). `full` means everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Touched {
    pub full: bool,
    pub chains: BTreeSet<Key>,
    /// Set name -> key texts.
    pub elements: std::collections::BTreeMap<String, BTreeSet<Key>>,
}

impl Touched {
    /// Records a touched element; a full change compares everything, and records nothing.
    fn element(&mut self, set: &str, key: &Key) {
        if self.full {
            return;
        }
        match self.elements.get_mut(set) {
            Some(keys) => {
                keys.insert(key.clone());
            }
            None => {
                self.elements
                    .insert(set.to_string(), BTreeSet::from([key.clone()]));
            }
        }
    }
    /// Records a touched chain (nothing for a full change, as [`Touched::element`]).
    fn chain(&mut self, name: &Key) {
        if !self.full {
            self.chains.insert(name.clone());
        }
    }
}

/// A change that [`Planner::update_changed`] (or [`ShardedPlanner::update_changed`]) cannot
/// apply: the configuration is not the one the table was planned with, so every service must be
/// planned again with a full update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NeedsFullUpdate;

impl std::fmt::Display for NeedsFullUpdate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the plan configuration changed: every service must be planned again")
    }
}

impl std::error::Error for NeedsFullUpdate {}

/// Plans incrementally and keeps the table it planned: a service whose resolved state is
/// unchanged costs a hash; a changed one is replanned and swapped in, and the caller is told
/// exactly which chains and elements it touched. The result is the same as [`plan`]'s whatever
/// the history (an element several services ask for goes to the smallest namespace/name).
/// [`Planner::update`] takes every service (a resync, a configuration change);
/// [`Planner::update_changed`] only what changed, at the cost of what changed.
#[derive(Debug, Default)]
pub struct Planner {
    cfg: Option<PlanConfig>,
    rs: Ruleset,
    /// Service -> (hash of its resolved state, its fragment). The name is shared with
    /// `owners`.
    /// Boxed: the map's spare slots then cost a pointer each, not a fragment.
    cache: std::collections::HashMap<std::sync::Arc<ferry_model::ObjectRef>, Box<(u64, Fragment)>>,
    /// (set, key) -> the services that ask for that element (what each asks for is in its
    /// fragment: kept once, not copied here).
    /// Sorted, and almost always of one: a Vec costs a fraction of a BTreeSet's node.
    owners: std::collections::HashMap<
        (Key, Key),
        smallvec::SmallVec<[std::sync::Arc<ferry_model::ObjectRef>; 1]>,
    >,
    /// Hairpin address -> how many services besides the first have it as an endpoint (the
    /// table's hairpin set holds the addresses of one service or more: an address of one,
    /// the usual case, costs nothing here).
    hairpins: std::collections::HashMap<IpAddr, u32>,
    /// (endpoint map, frontend key text) -> the services with draws for that frontend, sorted
    /// (see [`Fragment::draws`]).
    draw_owners: std::collections::HashMap<
        (Key, Key),
        smallvec::SmallVec<[std::sync::Arc<ferry_model::ObjectRef>; 1]>,
    >,
    /// Shared chain -> how many services use it (see [`Fragment::shared`]).
    shared: std::collections::HashMap<Key, u32>,
    /// The table planned (None: [`TABLE`]).
    table: Option<Key>,
}

/// Rebuilds the sets' element maps packed: filled one element at a time (a whole table
/// planned afresh), their nodes are a third empty; built from their sorted elements, full.
/// Costs a pass over the elements (they are moved, not copied).
fn compact_sets(rs: &mut Ruleset) {
    for s in rs.sets.values_mut() {
        if s.elements.len() > 64 {
            s.elements = std::mem::take(&mut s.elements).into_iter().collect();
        }
    }
}

/// A stable 64-bit hash of everything planning reads from a service.
fn service_hash(svc: &ResolvedService) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = fnv::FnvHasher::default();
    svc.id.hash(&mut h);
    (svc.type_ as u8).hash(&mut h);
    svc.cluster_ip.hash(&mut h);
    svc.secondary_cluster_ip.hash(&mut h);
    svc.external_ips.hash(&mut h);
    svc.load_balancer_ips.hash(&mut h);
    (svc.external_traffic_policy as u8).hash(&mut h);
    (svc.internal_traffic_policy as u8).hash(&mut h);
    svc.affinity_timeout.hash(&mut h);
    svc.load_balancer_source_ranges.hash(&mut h);
    svc.health_check_node_port.hash(&mut h);
    for p in &svc.ports {
        p.name.hash(&mut h);
        p.protocol.hash(&mut h);
        p.port.hash(&mut h);
        p.node_port.hash(&mut h);
        for e in &p.endpoints {
            (e.addr, e.port, &e.node, e.ready, e.serving, e.terminating).hash(&mut h);
            e.zone_hints.hash(&mut h);
        }
    }
    h.finish()
}

impl Planner {
    /// A planner of the table `name` (a shard of [`plan_sharded`]'s layout).
    pub fn for_table(name: &str) -> Planner {
        Planner {
            table: Some(name.into()),
            ..Planner::default()
        }
    }

    /// The table as last planned.
    pub fn ruleset(&self) -> &Ruleset {
        &self.rs
    }

    /// The first service (by namespace/name) asking for the element `key` of `set`, with the
    /// element's key and what it holds (shared with the table).
    fn first_owner(
        &self,
        set: &Key,
        key: &Key,
    ) -> Option<(&ferry_model::ObjectRef, Key, std::sync::Arc<Element>)> {
        let id = &**self.owners.get(&(set.clone(), key.clone()))?.first()?;
        let (k, el) = self.rs.sets.get(&**set)?.elements.get_key_value(key)?;
        Some((id, k.clone(), el.clone()))
    }

    /// The planned table (a copy; [`Planner::update`] avoids it).
    pub fn plan(&mut self, cfg: &PlanConfig, services: &[ResolvedService]) -> Ruleset {
        self.update(cfg, services);
        self.rs.clone()
    }

    /// Brings the planned table up to date; returns it and what changed.
    pub fn update(
        &mut self,
        cfg: &PlanConfig,
        services: &[ResolvedService],
    ) -> (&Ruleset, Touched) {
        self.update_refs(cfg, services)
    }

    /// [`Planner::update`] of services held elsewhere (a shard's, picked from all).
    pub fn update_refs<'s>(
        &mut self,
        cfg: &PlanConfig,
        services: impl IntoIterator<Item = &'s ResolvedService>,
    ) -> (&Ruleset, Touched) {
        let services = services.into_iter();
        let mut touched = Touched::default();
        if self.cfg.as_ref() != Some(cfg) {
            self.configure(cfg);
            touched.full = true;
        }
        let mut seen = std::collections::HashSet::with_capacity(services.size_hint().0);
        for svc in services {
            if !seen.insert(&svc.id) {
                continue; // the same service twice: the first one counts
            }
            self.put(cfg, svc, &mut touched);
        }
        let gone: Vec<ferry_model::ObjectRef> = self
            .cache
            .keys()
            .filter(|id| !seen.contains(&***id))
            .map(|id| (**id).clone())
            .collect();
        for id in gone {
            self.forget(&id, &mut touched);
        }
        if touched.full {
            compact_sets(&mut self.rs);
        }
        (&self.rs, touched)
    }

    /// Brings the planned table up to date from what changed since the last update: the
    /// services in `changed` are added or replace the ones of their names (of one name twice,
    /// the first counts), then the services named in `removed` are taken out (a name in both
    /// is removed). Costs what the changed services cost to plan, whatever the number of
    /// services planned before; the table is the one [`Planner::update`] of the services
    /// that result would give. Returns what changed.
    ///
    /// A first update may be a change (from no services). A configuration different from the
    /// last update's needs every service planned again: refused with [`NeedsFullUpdate`]
    /// (nothing changed; call [`Planner::update`] with every service).
    pub fn update_changed<'a, 'b>(
        &mut self,
        cfg: &PlanConfig,
        changed: impl IntoIterator<Item = &'a ResolvedService>,
        removed: impl IntoIterator<Item = &'b ferry_model::ObjectRef>,
    ) -> Result<Touched, NeedsFullUpdate> {
        let mut touched = Touched::default();
        match &self.cfg {
            Some(c) if c == cfg => {}
            Some(_) => return Err(NeedsFullUpdate),
            None => {
                self.configure(cfg);
                touched.full = true;
            }
        }
        let removed: std::collections::HashSet<&ferry_model::ObjectRef> =
            removed.into_iter().collect();
        let mut seen = std::collections::HashSet::new();
        for svc in changed {
            if removed.contains(&svc.id) || !seen.insert(&svc.id) {
                continue;
            }
            self.put(cfg, svc, &mut touched);
        }
        for id in removed {
            self.forget(id, &mut touched);
        }
        Ok(touched)
    }

    /// Starts over with `cfg`: the skeleton and no service.
    fn configure(&mut self, cfg: &PlanConfig) {
        self.cfg = Some(cfg.clone());
        self.rs = skeleton(cfg);
        self.rs.table = self.table.clone();
        self.cache.clear();
        self.owners.clear();
        self.hairpins.clear();
        self.shared.clear();
        self.draw_owners.clear();
    }

    /// Plans `svc` into the table unless it is planned already as it is.
    fn put(&mut self, cfg: &PlanConfig, svc: &ResolvedService, touched: &mut Touched) {
        let hash = service_hash(svc);
        if self.cache.get(&svc.id).is_some_and(|c| c.0 == hash) {
            return;
        }
        self.forget(&svc.id, touched);
        let fr = plan_service(cfg, svc);
        let id = std::sync::Arc::new(svc.id.clone());
        self.cache.insert(id.clone(), Box::new((hash, fr)));
        self.add(&id, touched);
    }

    /// Takes the service `id` (if planned) out of the table.
    fn forget(&mut self, id: &ferry_model::ObjectRef, touched: &mut Touched) {
        if let Some(old) = self.cache.remove(id) {
            self.remove(id, &old.1, touched);
        }
    }

    /// Adds the fragment cached for `id` to the table.
    fn add(&mut self, id: &std::sync::Arc<ferry_model::ObjectRef>, t: &mut Touched) {
        let Planner {
            rs,
            cache,
            owners,
            hairpins,
            shared,
            draw_owners,
            ..
        } = self;
        let Some(fr) = cache.get(&**id).map(|c| &c.1) else {
            return;
        };
        for s in &fr.sets {
            // A set is new to the kernel: the differ compares everything (see diff_touched).
            rs.sets.insert(s.name.clone(), s.clone());
        }
        for c in &fr.chains {
            rs.chains.insert(c.name.clone(), c.clone());
            t.chain(&c.name);
        }
        for c in &fr.shared {
            let n = shared.entry(c.name.clone()).or_insert(0);
            *n += 1;
            if *n == 1 {
                rs.chains.insert(c.name.clone(), c.clone());
                t.chain(&c.name);
            }
        }
        for (set, key, _) in &fr.elements {
            let who = owners.entry((set.clone(), key.clone())).or_default();
            if let Err(at) = who.binary_search(id) {
                who.insert(at, id.clone());
            }
            Self::settle(rs, cache, set, key, who);
            t.element(set, key);
        }
        for (map, prefix, _) in &fr.draws {
            let who = draw_owners
                .entry((map.clone(), prefix.clone()))
                .or_default();
            if let Err(at) = who.binary_search(id) {
                who.insert(at, id.clone());
            }
            Self::settle_draws(rs, cache, map, prefix, who, t);
        }
        for a in &fr.hairpins {
            let set = names::hairpin(Family::of(*a));
            let key = key_text(&[Value::Ip(*a), Value::Ip(*a)]);
            let s = rs.set_mut(&set);
            if s.elements.contains_key(key.as_str()) {
                *hairpins.entry(*a).or_insert(0) += 1;
            } else {
                let key: Key = key.into();
                t.element(&set, &key);
                s.elements.insert(key, Element::bare());
            }
        }
    }

    fn remove(&mut self, id: &ferry_model::ObjectRef, fr: &Fragment, t: &mut Touched) {
        for s in &fr.sets {
            self.rs.sets.remove(&s.name);
        }
        for c in &fr.chains {
            self.rs.chains.remove(&c.name);
            t.chain(&c.name);
        }
        for c in &fr.shared {
            if let Some(n) = self.shared.get_mut(&c.name) {
                *n -= 1;
                if *n == 0 {
                    self.shared.remove(&c.name);
                    self.rs.chains.remove(&c.name);
                    t.chain(&c.name);
                }
            }
        }
        for (set, key, _) in &fr.elements {
            let k = (set.clone(), key.clone());
            if let Some(who) = self.owners.get_mut(&k) {
                if let Ok(at) = who.binary_search_by(|w| (**w).cmp(id)) {
                    who.remove(at);
                }
                Self::settle(&mut self.rs, &self.cache, set, key, who);
                if who.is_empty() {
                    self.owners.remove(&k);
                }
            }
            t.element(set, key);
        }
        for (map, prefix, _) in &fr.draws {
            let k = (map.clone(), prefix.clone());
            if let Some(who) = self.draw_owners.get_mut(&k) {
                if let Ok(at) = who.binary_search_by(|w| (**w).cmp(id)) {
                    who.remove(at);
                }
                Self::settle_draws(&mut self.rs, &self.cache, map, prefix, who, t);
                if who.is_empty() {
                    self.draw_owners.remove(&k);
                }
            }
        }
        for a in &fr.hairpins {
            if let Some(n) = self.hairpins.get_mut(a) {
                // Another service still has it.
                *n -= 1;
                if *n == 0 {
                    self.hairpins.remove(a);
                }
                continue;
            }
            let set = names::hairpin(Family::of(*a));
            let key: Key = key_text(&[Value::Ip(*a), Value::Ip(*a)]).into();
            if self.rs.set_mut(&set).elements.remove(&key).is_some() {
                t.element(&set, &key);
            }
        }
    }

    /// The draws a frontend holds in `map`: the first owner's (by namespace/name), or none;
    /// the elements that differ are touched.
    fn settle_draws(
        rs: &mut Ruleset,
        cache: &std::collections::HashMap<
            std::sync::Arc<ferry_model::ObjectRef>,
            Box<(u64, Fragment)>,
        >,
        map: &Key,
        prefix: &Key,
        owners: &[std::sync::Arc<ferry_model::ObjectRef>],
        t: &mut Touched,
    ) {
        let first = owners
            .first()
            .and_then(|id| cache.get(&**id))
            .and_then(|c| {
                c.1.draws
                    .iter()
                    .find(|(m, p, _)| m == map && p == prefix)
                    .map(|(_, _, d)| d.clone())
            });
        let want: &[std::sync::Arc<Element>] = first.as_deref().unwrap_or(&[]);
        let s = rs.set_mut(map);
        let mut key = String::new();
        // The frontend's elements are draws 0..n, n that of its owner before: up to both.
        for k in 0.. {
            draw_key(&mut key, prefix, k);
            match want.get(k) {
                Some(e) => match s.elements.get_key_value(key.as_str()) {
                    Some((kt, old)) => {
                        let kt = kt.clone();
                        if !old.same_value(e) {
                            t.element(map, &kt);
                        }
                        s.elements.insert(kt, e.clone());
                    }
                    None => {
                        let kt: Key = key.as_str().into();
                        t.element(map, &kt);
                        s.elements.insert(kt, e.clone());
                    }
                },
                None => match s.elements.remove_entry(key.as_str()) {
                    Some((kt, _)) => t.element(map, &kt),
                    None => break,
                },
            }
        }
    }

    /// The element a key holds: the first owner's (by namespace/name), or none.
    fn settle(
        rs: &mut Ruleset,
        cache: &std::collections::HashMap<
            std::sync::Arc<ferry_model::ObjectRef>,
            Box<(u64, Fragment)>,
        >,
        set: &Key,
        key: &Key,
        owners: &[std::sync::Arc<ferry_model::ObjectRef>],
    ) {
        let first = owners
            .iter()
            .next()
            .and_then(|id| cache.get(&**id))
            .and_then(|c| {
                c.1.elements
                    .iter()
                    .find(|(s, k, _)| s == set && k == key)
                    .map(|(_, _, e)| e)
            });
        let s = rs.set_mut(set);
        match first {
            Some(e) => {
                s.elements.insert(key.clone(), e.clone());
            }
            None => {
                s.elements.remove(key);
            }
        }
    }
}

/// UDP endpoints (address, port) that served a service port before and no longer do. Their
/// conntrack entries must go: UDP "connections" would otherwise keep reaching a gone endpoint
/// for as long as the client keeps sending (kube-proxy clears them the same way).
pub fn stale_udp_endpoints(old: &[ResolvedService], new: &[ResolvedService]) -> Vec<(IpAddr, u16)> {
    use std::collections::BTreeMap;
    let serving = |list: &[ResolvedService]| {
        let mut m: BTreeMap<(String, u16), BTreeSet<(IpAddr, u16)>> = BTreeMap::new();
        for s in list {
            for p in s.ports.iter().filter(|p| p.protocol == Protocol::Udp) {
                m.entry((s.id.to_string(), p.port)).or_default().extend(
                    usable_endpoints(&p.endpoints, None)
                        .iter()
                        .map(|e| (e.addr, e.port)),
                );
            }
        }
        m
    };
    let (before, after) = (serving(old), serving(new));
    let mut out = BTreeSet::new();
    for (k, eps) in before {
        let now = after.get(&k);
        for e in eps {
            if now.is_none_or(|n| !n.contains(&e)) {
                out.insert(e);
            }
        }
    }
    out.into_iter().collect()
}
