//! BGP configuration as MetalLB has it, as one validated model, and the pure decision of what
//! a node announces to which peer.
//!
//! ferry reads a MetalLB user's BGP configuration as it is:
//!
//! - the legacy ConfigMap `metallb-system/config` (MetalLB up to 0.12): `peers:` (`peer-address,
//!   peer-asn, my-asn, peer-port, hold-time, keepalive-time, router-id, source-address,
//!   node-selectors, password, bfd-profile, ebgp-multihop`), `bgp-communities:` (alias ->
//!   value), `bfd-profiles:` and, on `protocol: bgp` pools, `bgp-advertisements:`
//!   (`aggregation-length, aggregation-length-v6, localpref, communities`). A bgp pool without
//!   `bgp-advertisements` is announced with the defaults (as MetalLB did);
//! - the CRDs `BGPPeer` (`metallb.io/v1beta2`, and `v1beta1`), `BGPAdvertisement`,
//!   `Community` and `BFDProfile` (`metallb.io/v1beta1`), and the Secrets BGPPeers name in
//!   `passwordSecret`.
//!
//! [`load`] turns them into a [`BgpConfig`] plus [`PoolError`]s naming object and field, in the
//! style of [`crate::pools::load`]. A bad object never takes down the others: an invalid peer,
//! advertisement, profile or alias is dropped with an error and the rest stands. Defaults and
//! checks follow MetalLB (`api/v1beta2/bgppeer_types.go`, `internal/config/config.go`):
//!
//! - ASNs 1-4294967295 (0 is "missing"); an eBGP multi-hop peer must be eBGP;
//! - port 179; hold time 90 s, 0 or at least 3 s (whole seconds; at most 65535 s);
//!   keepalive a third of the hold time and never above it;
//! - router ID an IPv4 address (a BGP identifier has 4 bytes); source address of the peer
//!   address's family;
//! - `password` or `passwordSecret` (a `kubernetes.io/basic-auth` Secret, key `password`), not
//!   both; TCP MD5 keys have at most 80 bytes;
//! - `bfdProfile` must name a BFDProfile; `vrf` is not supported (an error: the session would
//!   run in the wrong VRF);
//! - aggregation length 32 / 128 by default, at most 32 / 128, and never shorter than a
//!   selected pool's own prefixes allow (an aggregate would cover addresses outside the pool):
//!   that pool is left out of that advertisement;
//! - communities `65535:65282` (16-bit halves), `large:1:2:3` (32-bit parts) or alias names
//!   (Community CRs, legacy `bgp-communities`);
//! - BFD intervals 10-60000 ms (defaults 300, 300, echo 50), multiplier 2-255 (3), minimum
//!   TTL 1-254 (254).
//!
//! [`BgpConfig::announcements`] is the decision: for a node and the load-balancer addresses
//! (with per address whether this node is eligible to announce it), the routes for each peer
//! that selects the node. Everything here is pure.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use ipnet::IpNet;
use serde_json::Value;

use crate::cidr::to_u128;
use crate::objects::{
    BfdProfileCr, BgpAdvertisementCr, BgpPeerCr, CommunityCr, ConfigMap, LabelSelector,
    LabelSelectorRequirement, ObjectRef, Secret, SecretRef, SelectorOperator,
};
use crate::pools::{
    describe, IpRange, PoolConfig, PoolError, PoolProtocol, PoolSource, Report, Severity,
    LEGACY_KEY, LEGACY_NAME, LEGACY_NAMESPACE,
};

type Mapping = serde_json::Map<String, Value>;

/// MetalLB's default hold time.
pub const DEFAULT_HOLD_TIME: Duration = Duration::from_secs(90);
/// The BGP port.
pub const DEFAULT_PEER_PORT: u16 = 179;
/// The longest TCP MD5 key Linux takes (TCP_MD5SIG_MAXKEYLEN).
pub const MAX_PASSWORD_LEN: usize = 80;
/// The Secret type a `passwordSecret` must have.
pub const BASIC_AUTH_SECRET_TYPE: &str = "kubernetes.io/basic-auth";

// ---------------------------------------------------------------------------------------------
// Communities

/// A BGP community value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Community {
    /// RFC 1997: `high:low`, 16 bits each, as one u32.
    Standard(u32),
    /// RFC 8092: `large:global:local1:local2`, 32 bits each.
    Large([u32; 3]),
}

impl fmt::Display for Community {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Community::Standard(v) => write!(f, "{}:{}", v >> 16, v & 0xffff),
            Community::Large([a, b, c]) => write!(f, "large:{a}:{b}:{c}"),
        }
    }
}

/// Why a community text is not a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommunityError {
    /// Not of either form (maybe an alias name).
    Format,
    /// Of a form, with a bad part (the message says which).
    Value(String),
}

/// `65535:65282` or `large:1:2:3`.
pub fn parse_community(s: &str) -> Result<Community, CommunityError> {
    let parts: Vec<&str> = s.split(':').collect();
    let num = |p: &str, max: u64| -> Result<u64, CommunityError> {
        let n: u64 = p.parse().map_err(|_| {
            CommunityError::Value(format!(
                "{p:?} in {s:?} is not a number between 0 and {max}"
            ))
        })?;
        if n > max {
            return Err(CommunityError::Value(format!("{n} in {s:?} is over {max}")));
        }
        Ok(n)
    };
    match parts.as_slice() {
        [a, b]
            if a.chars().all(|c| c.is_ascii_digit()) || b.chars().all(|c| c.is_ascii_digit()) =>
        {
            let (a, b) = (num(a, 0xffff)?, num(b, 0xffff)?);
            Ok(Community::Standard(((a << 16) | b) as u32))
        }
        ["large", a, b, c] => {
            let max = u64::from(u32::MAX);
            Ok(Community::Large([
                num(a, max)? as u32,
                num(b, max)? as u32,
                num(c, max)? as u32,
            ]))
        }
        [marker, _, _, _] => Err(CommunityError::Value(format!(
            "{s:?}: a large community is written large:GLOBAL:LOCAL1:LOCAL2, not {marker:?}:..."
        ))),
        _ => Err(CommunityError::Format),
    }
}

// ---------------------------------------------------------------------------------------------
// Durations

/// A Go duration (`time.ParseDuration`, which Kubernetes' metav1.Duration uses): `90s`,
/// `1m30s`, `1.5h`, `300ms`, `0`. Negative durations are refused.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let bad = |why: &str| format!("{s:?} is not a duration ({why}; e.g. 90s, 1m30s)");
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    if t.is_empty() {
        return Err(bad("empty"));
    }
    if t.starts_with('-') {
        return Err(bad("negative"));
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    let mut rest = t;
    let mut total_ns: f64 = 0.0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(bad("a number must come before each unit"));
        }
        let value: f64 = rest[..num_len].parse().map_err(|_| bad("not a number"))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            "" => return Err(bad("missing unit")),
            _ => return Err(bad("unknown unit; units are ns, us, ms, s, m, h")),
        };
        rest = &rest[unit_len..];
        total_ns += value * scale;
    }
    if !total_ns.is_finite() || total_ns > 1e18 {
        return Err(bad("too long"));
    }
    Ok(Duration::from_nanos(total_ns as u64))
}

// ---------------------------------------------------------------------------------------------
// The model

/// A TCP MD5 password; its Debug output does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(pub String);

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Password(<{} bytes>)", self.0.len())
    }
}

/// A validated BGP peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BgpPeer {
    /// metadata.name; `peers[N]` for a legacy peer.
    pub name: String,
    /// "BGPPeer metallb-system/r1" or "ConfigMap metallb-system/config".
    pub source: String,
    pub my_asn: u32,
    pub peer_asn: u32,
    pub peer_address: IpAddr,
    pub peer_port: u16,
    /// Whole seconds; zero or at least 3 s.
    pub hold_time: Duration,
    /// Whole seconds, at most the hold time.
    pub keepalive_time: Duration,
    /// None: the speaker picks (MetalLB: the node's IPv4 address).
    pub router_id: Option<Ipv4Addr>,
    pub source_address: Option<IpAddr>,
    /// Nodes that peer: any selector matching; empty: every node.
    pub node_selectors: Vec<LabelSelector>,
    /// From `password`, or read from `password_secret`.
    pub password: Option<Password>,
    /// Where the password came from, if from a Secret (namespace/name).
    pub password_secret: Option<ObjectRef>,
    pub ebgp_multihop: bool,
    /// Names a profile of [`BgpConfig::bfd_profiles`].
    pub bfd_profile: Option<String>,
}

impl BgpPeer {
    pub fn selects_node(&self, node_labels: &BTreeMap<String, String>) -> bool {
        self.node_selectors.is_empty() || self.node_selectors.iter().any(|s| s.matches(node_labels))
    }
    /// iBGP (same AS on both ends).
    pub fn is_ibgp(&self) -> bool {
        self.my_asn == self.peer_asn
    }
}

/// A validated advertisement: a BGPAdvertisement with its pool selection resolved, or one of
/// a legacy bgp pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BgpAdvertisement {
    /// metadata.name; `<pool>.bgp-advertisements[N]` for a legacy one.
    pub name: String,
    /// "BGPAdvertisement metallb-system/adv" or "ConfigMap metallb-system/config".
    pub source: String,
    /// Names of the pools it covers, sorted.
    pub pools: Vec<String>,
    /// Prefix length IPv4 addresses are aggregated to (32: host routes).
    pub aggregation_length: u8,
    /// Prefix length IPv6 addresses are aggregated to (128: host routes).
    pub aggregation_length_v6: u8,
    /// LOCAL_PREF; None when not set (MetalLB reads 0 as not set).
    pub local_pref: Option<u32>,
    /// Sorted, no duplicates; aliases resolved.
    pub communities: Vec<Community>,
    /// Peer names it is announced to; empty: every peer.
    pub peers: Vec<String>,
    /// Nodes it is announced from: any selector matching; empty: every node.
    pub node_selectors: Vec<LabelSelector>,
}

impl BgpAdvertisement {
    pub fn selects_node(&self, node_labels: &BTreeMap<String, String>) -> bool {
        self.node_selectors.is_empty() || self.node_selectors.iter().any(|s| s.matches(node_labels))
    }
    pub fn selects_peer(&self, peer: &str) -> bool {
        self.peers.is_empty() || self.peers.iter().any(|p| p == peer)
    }
    /// The aggregation length for an address of this family.
    pub fn aggregation_for(&self, ip: IpAddr) -> u8 {
        if ip.is_ipv4() {
            self.aggregation_length
        } else {
            self.aggregation_length_v6
        }
    }
}

/// A validated BFD profile (intervals in milliseconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BfdProfile {
    pub name: String,
    pub source: String,
    pub receive_interval_ms: u32,
    pub transmit_interval_ms: u32,
    pub detect_multiplier: u8,
    pub echo_interval_ms: u32,
    pub echo_mode: bool,
    pub passive_mode: bool,
    pub minimum_ttl: u8,
}

/// The validated BGP configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BgpConfig {
    /// Sorted by name (legacy peers `peers[N]` first); names unique.
    pub peers: Vec<BgpPeer>,
    /// Legacy ones first (pool order), then BGPAdvertisements by namespace/name.
    pub advertisements: Vec<BgpAdvertisement>,
    /// Sorted by name; names unique.
    pub bfd_profiles: Vec<BfdProfile>,
    /// Community aliases (legacy `bgp-communities` and Community CRs).
    pub communities: BTreeMap<String, Community>,
}

/// The inputs of [`load`] besides the pools; `Default` is "none".
#[derive(Debug, Clone, Copy, Default)]
pub struct BgpInputs<'a> {
    /// Only `metallb-system/config` is read.
    pub config_maps: &'a [ConfigMap],
    pub peers: &'a [BgpPeerCr],
    pub advertisements: &'a [BgpAdvertisementCr],
    pub communities: &'a [CommunityCr],
    pub bfd_profiles: &'a [BfdProfileCr],
    /// Secrets `passwordSecret`s may name (others are ignored).
    pub secrets: &'a [Secret],
}

/// One load-balancer address, as the caller sees it for this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbAddress {
    pub ip: IpAddr,
    /// The pool it was allocated from.
    pub pool: String,
    /// Whether this node may announce it: for `externalTrafficPolicy: Cluster` every node
    /// (the advertisements' node selectors still apply); for `Local` only nodes with a ready
    /// local endpoint.
    pub eligible: bool,
}

/// One route to announce to a peer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    /// The address aggregated to the advertisement's length (host bits cleared).
    pub prefix: IpNet,
    pub local_pref: Option<u32>,
    /// Standard communities, sorted.
    pub communities: Vec<u32>,
    /// Large communities, sorted.
    pub large_communities: Vec<[u32; 3]>,
}

/// The routes for one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRoutes {
    pub peer: String,
    /// Sorted by prefix; one route per prefix.
    pub routes: Vec<Route>,
}

impl BgpConfig {
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
    pub fn peer(&self, name: &str) -> Option<&BgpPeer> {
        self.peers.iter().find(|p| p.name == name)
    }
    pub fn bfd_profile(&self, name: &str) -> Option<&BfdProfile> {
        self.bfd_profiles.iter().find(|p| p.name == name)
    }
    /// The peers a node with these labels has sessions with.
    pub fn peers_for_node<'a>(
        &'a self,
        node_labels: &'a BTreeMap<String, String>,
    ) -> impl Iterator<Item = &'a BgpPeer> + 'a {
        self.peers.iter().filter(|p| p.selects_node(node_labels))
    }
    /// Whether any advertisement covers `pool` (its addresses are announced by BGP).
    pub fn announces_pool(&self, pool: &str) -> bool {
        self.advertisements
            .iter()
            .any(|a| a.pools.iter().any(|p| p == pool))
    }

    /// What a node announces: for every peer selecting the node (in name order, even with no
    /// route), the routes for the addresses this node is eligible for, through every
    /// advertisement that covers the address's pool, selects the node and selects the peer.
    /// Each address is aggregated to the advertisement's length, so several addresses may
    /// share one prefix. When two advertisements give one peer the same prefix, the route
    /// carries the union of their communities and the highest LOCAL_PREF (MetalLB refuses
    /// different LOCAL_PREFs there; [`load`] warns).
    pub fn announcements(
        &self,
        node_labels: &BTreeMap<String, String>,
        addresses: &[LbAddress],
    ) -> Vec<PeerRoutes> {
        // The advertisements that apply on this node, per pool.
        let mut by_pool: BTreeMap<&str, Vec<&BgpAdvertisement>> = BTreeMap::new();
        for a in self
            .advertisements
            .iter()
            .filter(|a| a.selects_node(node_labels))
        {
            for p in &a.pools {
                by_pool.entry(p.as_str()).or_default().push(a);
            }
        }
        let mut out = Vec::new();
        for peer in self.peers_for_node(node_labels) {
            let mut routes: BTreeMap<IpNet, Route> = BTreeMap::new();
            for addr in addresses.iter().filter(|a| a.eligible) {
                let Some(advs) = by_pool.get(addr.pool.as_str()) else {
                    continue;
                };
                for a in advs.iter().filter(|a| a.selects_peer(&peer.name)) {
                    let Some(prefix) = aggregate(addr.ip, a.aggregation_for(addr.ip)) else {
                        continue;
                    };
                    let r = routes.entry(prefix).or_insert_with(|| Route {
                        prefix,
                        local_pref: None,
                        communities: Vec::new(),
                        large_communities: Vec::new(),
                    });
                    r.local_pref = r.local_pref.max(a.local_pref);
                    for c in &a.communities {
                        match c {
                            Community::Standard(v) => r.communities.push(*v),
                            Community::Large(v) => r.large_communities.push(*v),
                        }
                    }
                }
            }
            let routes = routes
                .into_values()
                .map(|mut r| {
                    r.communities.sort_unstable();
                    r.communities.dedup();
                    r.large_communities.sort_unstable();
                    r.large_communities.dedup();
                    r
                })
                .collect();
            out.push(PeerRoutes {
                peer: peer.name.clone(),
                routes,
            });
        }
        out
    }
}

/// The load-balancer addresses with their pools and whether `node` may announce them, for
/// [`BgpConfig::announcements`]: `services` pairs each Service with its addresses (its
/// allocation). A Service with `externalTrafficPolicy: Local` makes its addresses eligible
/// only on nodes with a ready endpoint of it (in `slices`); `Cluster`, on every node. An address
/// several Services share is eligible where it is for each of them. Addresses outside every
/// pool are left out. Sorted by address.
pub fn eligible_addresses(
    node: &str,
    services: &[(&crate::Service, &[IpAddr])],
    slices: &[crate::EndpointSlice],
    pools: &PoolConfig,
) -> Vec<LbAddress> {
    let mut by_ip: BTreeMap<IpAddr, LbAddress> = BTreeMap::new();
    for (svc, ips) in services {
        let eligible = svc.external_traffic_policy == crate::TrafficPolicy::Cluster
            || slices.iter().any(|sl| {
                sl.meta.namespace == svc.meta.namespace
                    && sl.service_name == svc.meta.name
                    && sl
                        .endpoints
                        .iter()
                        .any(|e| e.conditions.ready && e.node_name.as_deref() == Some(node))
            });
        for ip in *ips {
            let Some(pool) = pools.pool_of(*ip) else {
                continue;
            };
            by_ip
                .entry(*ip)
                .and_modify(|a| a.eligible &= eligible)
                .or_insert_with(|| LbAddress {
                    ip: *ip,
                    pool: pool.name.clone(),
                    eligible,
                });
        }
    }
    by_ip.into_values().collect()
}

/// `ip` aggregated to `len` (host bits cleared); None when `len` is too long for the family.
pub fn aggregate(ip: IpAddr, len: u8) -> Option<IpNet> {
    IpNet::new(ip, len).ok().map(|n| n.trunc())
}

/// The shortest prefix length among the CIDRs a range splits into (MetalLB's lowest mask of
/// a pool entry): an aggregation shorter than this covers addresses outside the range.
pub fn shortest_prefix_in(r: &IpRange) -> u8 {
    let bits: u32 = if r.is_ipv4() { 32 } else { 128 };
    let (mut start, hi) = (to_u128(r.first()), to_u128(r.last()));
    let mut shortest = bits as u8;
    loop {
        let span = hi - start; // addresses left - 1
        let fit = if span == u128::MAX {
            128
        } else {
            127 - (span + 1).leading_zeros()
        };
        let align = if start == 0 {
            128
        } else {
            start.trailing_zeros()
        };
        let k = fit.min(align).min(bits);
        shortest = shortest.min((bits - k) as u8);
        if k == 128 {
            break;
        }
        let last = start + ((1u128 << k) - 1);
        if last >= hi {
            break;
        }
        start = last + 1;
    }
    shortest
}

// ---------------------------------------------------------------------------------------------
// Field names: one validation for both formats

/// How fields are named in messages: `spec.myASN` (CRDs) or `data[config].peers[0].my-asn`.
#[derive(Clone)]
enum Style {
    Crd,
    Legacy(String),
}

impl Style {
    fn f(&self, crd: &str) -> String {
        match self {
            Style::Crd => format!("spec.{crd}"),
            Style::Legacy(base) => {
                let legacy = match crd {
                    "myASN" => "my-asn",
                    "peerASN" => "peer-asn",
                    "peerAddress" => "peer-address",
                    "peerPort" => "peer-port",
                    "holdTime" => "hold-time",
                    "keepaliveTime" => "keepalive-time",
                    "routerID" => "router-id",
                    "sourceAddress" => "source-address",
                    "nodeSelectors" => "node-selectors",
                    "bfdProfile" => "bfd-profile",
                    "ebgpMultiHop" => "ebgp-multihop",
                    "aggregationLength" => "aggregation-length",
                    "aggregationLengthV6" => "aggregation-length-v6",
                    "localPref" => "localpref",
                    "receiveInterval" => "receive-interval",
                    "transmitInterval" => "transmit-interval",
                    "detectMultiplier" => "detect-multiplier",
                    "echoInterval" => "echo-interval",
                    "echoMode" => "echo-mode",
                    "passiveMode" => "passive-mode",
                    "minimumTtl" => "minimum-ttl",
                    other => other,
                };
                format!("{base}.{legacy}")
            }
        }
    }
}

fn in_range(rep: &mut Report<'_>, field: String, n: u64, min: u64, max: u64) -> Option<u64> {
    if (min..=max).contains(&n) {
        Some(n)
    } else {
        rep.err(field, format!("must be between {min} and {max}, got {n}"));
        None
    }
}

// ---------------------------------------------------------------------------------------------
// Loading

/// Builds the BGP model from MetalLB's legacy ConfigMap and CRDs, for the pools of `pools`
/// (pass [`crate::pools::load`]'s result, before node addresses are taken out). Deterministic:
/// the result does not depend on the order of the inputs.
pub fn load(pools: &PoolConfig, inputs: &BgpInputs<'_>) -> (BgpConfig, Vec<PoolError>) {
    let mut errors = Vec::new();
    let mut legacy = Legacy::default();
    let mut cms: Vec<&ConfigMap> = inputs
        .config_maps
        .iter()
        .filter(|c| c.meta.namespace == LEGACY_NAMESPACE && c.meta.name == LEGACY_NAME)
        .collect();
    cms.sort_by(|a, b| a.data.cmp(&b.data));
    for cm in cms {
        read_legacy(cm, &mut legacy, &mut errors);
    }

    // BFD profiles: legacy first, then CRDs by namespace/name; the first of a name wins.
    let mut bfd: BTreeMap<String, BfdProfile> = BTreeMap::new();
    let mut crd_bfd: Vec<&BfdProfileCr> = inputs.bfd_profiles.iter().collect();
    crd_bfd.sort_by_key(|p| p.meta.object_ref());
    let bfd_inputs = legacy
        .bfd
        .iter()
        .map(|(raw, style)| (legacy.object.clone(), raw, style.clone()))
        .chain(
            crd_bfd
                .into_iter()
                .map(|p| (format!("BFDProfile {}", p.meta.object_ref()), p, Style::Crd)),
        );
    for (object, raw, style) in bfd_inputs {
        let mut rep = Report {
            out: &mut errors,
            object,
        };
        let Some(p) = bfd_profile(&mut rep, raw, &style) else {
            continue;
        };
        if let Some(first) = bfd.get(&p.name) {
            let field = match &style {
                Style::Crd => "metadata.name".to_string(),
                Style::Legacy(base) => format!("{base}.name"),
            };
            rep.err(
                field,
                format!(
                    "duplicate BFD profile name {:?} (also defined by {}): this one is dropped",
                    p.name, first.source
                ),
            );
            continue;
        }
        bfd.insert(p.name.clone(), p);
    }

    // Community aliases: legacy first, then Community CRs by namespace/name.
    let mut aliases: BTreeMap<String, (Community, String)> = BTreeMap::new();
    let mut crd_comms: Vec<&CommunityCr> = inputs.communities.iter().collect();
    crd_comms.sort_by_key(|c| c.meta.object_ref());
    let alias_inputs: Vec<(String, String, String, String, String)> = legacy
        .aliases
        .iter()
        .map(|(n, v, f)| {
            (
                legacy.object.clone(),
                n.clone(),
                v.clone(),
                f.clone(),
                f.clone(),
            )
        })
        .chain(crd_comms.into_iter().flat_map(|c| {
            let object = format!("Community {}", c.meta.object_ref());
            c.communities.iter().enumerate().map(move |(i, (n, v))| {
                (
                    object.clone(),
                    n.clone(),
                    v.clone(),
                    format!("spec.communities[{i}].name"),
                    format!("spec.communities[{i}].value"),
                )
            })
        }))
        .collect();
    for (object, name, value, name_field, value_field) in alias_inputs {
        let mut rep = Report {
            out: &mut errors,
            object: object.clone(),
        };
        if name.is_empty() {
            rep.err(name_field, "required");
            continue;
        }
        let c = match parse_community(&value) {
            Ok(c) => c,
            Err(CommunityError::Format) => {
                rep.err(
                    value_field,
                    format!(
                        "{value:?} is not a community value (65535:65282 or large:1:2:3): \
                         alias {name:?} is dropped"
                    ),
                );
                continue;
            }
            Err(CommunityError::Value(why)) => {
                rep.err(value_field, format!("{why}: alias {name:?} is dropped"));
                continue;
            }
        };
        if let Some((_, first)) = aliases.get(&name) {
            rep.err(
                name_field,
                format!(
                    "duplicate community alias {name:?} (also defined by {first}): this one is \
                     dropped"
                ),
            );
            continue;
        }
        aliases.insert(name, (c, object));
    }
    let communities: BTreeMap<String, Community> =
        aliases.into_iter().map(|(n, (c, _))| (n, c)).collect();

    // Peers: legacy first (peers[N]), then BGPPeers by namespace/name.
    let mut peers: Vec<BgpPeer> = Vec::new();
    let mut crd_peers: Vec<&BgpPeerCr> = inputs.peers.iter().collect();
    crd_peers.sort_by_key(|p| {
        (
            p.meta.object_ref(),
            p.peer_address.clone(),
            p.peer_port,
            p.my_asn,
            p.peer_asn,
        )
    });
    let peer_inputs = legacy
        .peers
        .iter()
        .map(|(name, raw, style)| (legacy.object.clone(), name.clone(), raw, style.clone()))
        .chain(crd_peers.into_iter().map(|p| {
            (
                format!("BGPPeer {}", p.meta.object_ref()),
                p.meta.name.clone(),
                p,
                Style::Crd,
            )
        }));
    for (object, name, raw, style) in peer_inputs {
        let mut rep = Report {
            out: &mut errors,
            object,
        };
        let Some(p) = bgp_peer(&mut rep, name, raw, &style, &bfd, inputs.secrets) else {
            continue;
        };
        let name_field = match &style {
            Style::Crd => "metadata.name".to_string(),
            Style::Legacy(base) => base.clone(),
        };
        if let Some(first) = peers.iter().find(|q| q.name == p.name) {
            rep.err(
                name_field,
                format!(
                    "duplicate peer name {:?} (also defined by {}): this one is dropped",
                    p.name, first.source
                ),
            );
            continue;
        }
        if let Some(first) = peers.iter().find(|q| same_session(q, &p)) {
            rep.err(
                name_field,
                format!(
                    "peer {:?} is the same session as peer {:?} ({}): same address, port, ASNs \
                     and nodes; this one is dropped",
                    p.name, first.name, first.source
                ),
            );
            continue;
        }
        peers.push(p);
    }
    peers.sort_by(|a, b| a.name.cmp(&b.name));

    // Advertisements: legacy bgp pools, then BGPAdvertisements by namespace/name.
    let mut advertisements = Vec::new();
    for p in &pools.pools {
        if !matches!(p.source, PoolSource::ConfigMap(_)) {
            continue;
        }
        let written = legacy.pool_advs.get(&p.name);
        if p.protocol != Some(PoolProtocol::Bgp) {
            if let Some(LegacyAdvs { field, .. }) = written.filter(|w| w.written) {
                Report {
                    out: &mut errors,
                    object: legacy.object.clone(),
                }
                .warn(
                    field.clone(),
                    format!(
                        "ignored: pool {:?} is a layer2 pool (only bgp pools are announced by BGP)",
                        p.name
                    ),
                );
            }
            continue;
        }
        let list: Vec<(usize, BgpAdvertisementCr, Style)> = match written {
            Some(w) if w.written => w.advs.clone(),
            // MetalLB: a bgp pool without advertisements is announced with the defaults.
            _ => vec![(
                0,
                BgpAdvertisementCr::default(),
                Style::Legacy(written.map(|w| w.field.clone()).unwrap_or_default()),
            )],
        };
        for (j, raw, style) in list {
            let mut raw = raw;
            raw.ip_address_pools = vec![p.name.clone()];
            let mut rep = Report {
                out: &mut errors,
                object: legacy.object.clone(),
            };
            let name = format!("{}.bgp-advertisements[{j}]", p.name);
            if let Some(a) =
                bgp_advertisement(&mut rep, name, &raw, &style, pools, &communities, &peers)
            {
                advertisements.push((a, style.f("localPref")));
            }
        }
    }
    let mut crd_advs: Vec<&BgpAdvertisementCr> = inputs.advertisements.iter().collect();
    crd_advs.sort_by_key(|a| a.meta.object_ref());
    for raw in crd_advs {
        let mut rep = Report {
            out: &mut errors,
            object: format!("BGPAdvertisement {}", raw.meta.object_ref()),
        };
        if let Some(a) = bgp_advertisement(
            &mut rep,
            raw.meta.name.clone(),
            raw,
            &Style::Crd,
            pools,
            &communities,
            &peers,
        ) {
            advertisements.push((a, Style::Crd.f("localPref")));
        }
    }
    warn_local_pref_conflicts(pools, &advertisements, &mut errors);
    let advertisements = advertisements.into_iter().map(|(a, _)| a).collect();

    (
        BgpConfig {
            peers,
            advertisements,
            bfd_profiles: bfd.into_values().collect(),
            communities,
        },
        errors,
    )
}

/// MetalLB refuses two advertisements of one pool, with the same aggregation and
/// overlapping peers, that set different LOCAL_PREFs (when a node is selected by both): here a
/// warning (the route gets the higher one).
/// `advs`: each with the field of its LOCAL_PREF.
fn warn_local_pref_conflicts(
    pools: &PoolConfig,
    advs: &[(BgpAdvertisement, String)],
    errors: &mut Vec<PoolError>,
) {
    for (i, (b, b_field)) in advs.iter().enumerate() {
        for (a, _) in &advs[..i] {
            let shared = a.pools.iter().find(|p| b.pools.contains(p));
            let peers_overlap = a.peers.is_empty()
                || b.peers.is_empty()
                || a.peers.iter().any(|p| b.peers.contains(p));
            if let Some(pool) = shared {
                // Same prefixes for a family the pool has.
                let (v4, v6) = pools.pool(pool).map_or((false, false), |p| {
                    (
                        p.ranges.iter().any(|r| r.is_ipv4()),
                        p.ranges.iter().any(|r| !r.is_ipv4()),
                    )
                });
                if a.local_pref != b.local_pref
                    && peers_overlap
                    && ((v4 && a.aggregation_length == b.aggregation_length)
                        || (v6 && a.aggregation_length_v6 == b.aggregation_length_v6))
                {
                    let show = |l: Option<u32>| l.map_or("unset".to_string(), |v| v.to_string());
                    errors.push(PoolError {
                        severity: Severity::Warning,
                        object: b.source.clone(),
                        field: b_field.clone(),
                        message: format!(
                            "advertisement {:?} sets LOCAL_PREF {} and {:?} ({}) sets {} for \
                             pool {pool:?} to the same peers: on a node both select, routes \
                             carry the higher one",
                            b.name,
                            show(b.local_pref),
                            a.name,
                            a.source,
                            show(a.local_pref)
                        ),
                    });
                }
            }
        }
    }
}

fn same_session(a: &BgpPeer, b: &BgpPeer) -> bool {
    a.peer_address == b.peer_address
        && a.peer_port == b.peer_port
        && a.my_asn == b.my_asn
        && a.peer_asn == b.peer_asn
        && a.source_address == b.source_address
        && a.node_selectors == b.node_selectors
}

fn asn(rep: &mut Report<'_>, field: String, v: Option<u64>) -> Option<u32> {
    match v {
        None | Some(0) => {
            rep.err(field, "required: an AS number between 1 and 4294967295");
            None
        }
        Some(n) => in_range(rep, field, n, 1, u64::from(u32::MAX)).map(|n| n as u32),
    }
}

fn bgp_peer(
    rep: &mut Report<'_>,
    name: String,
    raw: &BgpPeerCr,
    st: &Style,
    bfd: &BTreeMap<String, BfdProfile>,
    secrets: &[Secret],
) -> Option<BgpPeer> {
    let mut ok = true;
    if name.is_empty() {
        rep.err("metadata.name", "required");
        ok = false;
    }
    let my_asn = asn(rep, st.f("myASN"), raw.my_asn);
    let peer_asn = asn(rep, st.f("peerASN"), raw.peer_asn);
    let peer_address = match raw.peer_address.trim() {
        "" => {
            rep.err(st.f("peerAddress"), "required: the router's IP address");
            None
        }
        s => match s.parse::<IpAddr>() {
            Ok(ip) if ip.is_unspecified() || ip.is_multicast() => {
                rep.err(
                    st.f("peerAddress"),
                    format!("{ip} is not a unicast address"),
                );
                None
            }
            Ok(ip) => Some(ip),
            Err(_) => {
                rep.err(st.f("peerAddress"), format!("{s:?} is not an IP address"));
                None
            }
        },
    };
    let peer_port = match raw.peer_port {
        None | Some(0) => Some(DEFAULT_PEER_PORT),
        Some(n) => in_range(rep, st.f("peerPort"), n, 1, 65535).map(|n| n as u16),
    };
    let dur =
        |rep: &mut Report<'_>, field: String, s: &Option<String>| -> Result<Option<Duration>, ()> {
            match s.as_deref().map(str::trim) {
                None | Some("") => Ok(None),
                Some(t) => match parse_go_duration(t) {
                    // Whole seconds, as MetalLB rounds them.
                    Ok(d) => Ok(Some(Duration::from_secs(d.as_secs()))),
                    Err(e) => {
                        rep.err(field, e);
                        Err(())
                    }
                },
            }
        };
    let hold = dur(rep, st.f("holdTime"), &raw.hold_time);
    let keepalive = dur(rep, st.f("keepaliveTime"), &raw.keepalive_time);
    let mut timers = None;
    if let (Ok(h), Ok(k)) = (hold, keepalive) {
        let hold_time = h.unwrap_or_else(|| k.map_or(DEFAULT_HOLD_TIME, |k| k * 3));
        let keepalive_time = k.unwrap_or(hold_time / 3);
        let keepalive_time = Duration::from_secs(keepalive_time.as_secs());
        if hold_time != Duration::ZERO && hold_time < Duration::from_secs(3) {
            rep.err(
                st.f("holdTime"),
                format!("must be 0 or at least 3s, got {}s", hold_time.as_secs()),
            );
        } else if hold_time > Duration::from_secs(65535) {
            rep.err(
                st.f("holdTime"),
                format!("must be at most 65535s, got {}s", hold_time.as_secs()),
            );
        } else if keepalive_time > hold_time {
            rep.err(
                st.f("keepaliveTime"),
                format!(
                    "{}s is longer than the hold time {}s: it must be at most the hold time",
                    keepalive_time.as_secs(),
                    hold_time.as_secs()
                ),
            );
        } else {
            timers = Some((hold_time, keepalive_time));
        }
    }
    let router_id = match raw.router_id.trim() {
        "" => Ok(None),
        s => match s.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) if v4.is_unspecified() => {
                rep.err(
                    st.f("routerID"),
                    "0.0.0.0 is not a BGP identifier (it must not be zero)",
                );
                Err(())
            }
            Ok(IpAddr::V4(v4)) => Ok(Some(v4)),
            Ok(IpAddr::V6(_)) => {
                rep.err(
                    st.f("routerID"),
                    format!("{s:?} is IPv6: a BGP router ID is an IPv4 address (4 bytes)"),
                );
                Err(())
            }
            Err(_) => {
                rep.err(st.f("routerID"), format!("{s:?} is not an IPv4 address"));
                Err(())
            }
        },
    };
    let source_address = match raw.source_address.trim() {
        "" => Ok(None),
        s => match s.parse::<IpAddr>() {
            Ok(ip) => match peer_address {
                Some(pa) if pa.is_ipv4() != ip.is_ipv4() => {
                    let fam = |ip: IpAddr| if ip.is_ipv4() { "IPv4" } else { "IPv6" };
                    rep.err(
                        st.f("sourceAddress"),
                        format!(
                            "{ip} is {} but the peer address {pa} is {}: they must be of one \
                             family",
                            fam(ip),
                            fam(pa)
                        ),
                    );
                    Err(())
                }
                _ => Ok(Some(ip)),
            },
            Err(_) => {
                rep.err(st.f("sourceAddress"), format!("{s:?} is not an IP address"));
                Err(())
            }
        },
    };
    if let (Some(m), Some(p)) = (my_asn, peer_asn) {
        if raw.ebgp_multihop && m == p {
            rep.err(
                st.f("ebgpMultiHop"),
                format!("set for an iBGP peer (myASN and peerASN are both {m}): it is for eBGP peers only"),
            );
            ok = false;
        }
    }
    let mut password = None;
    let mut password_secret = None;
    match (&raw.password_secret, raw.password.is_empty()) {
        (Some(r), false) if !r.name.is_empty() => {
            rep.err(
                st.f("passwordSecret"),
                "password and passwordSecret are both set: set one",
            );
            ok = false;
        }
        (Some(SecretRef { name, namespace }), _) if !name.is_empty() => {
            // MetalLB's SecretReference: the peer's namespace when left out.
            let ns = if namespace.is_empty() {
                raw.meta.namespace.clone()
            } else {
                namespace.clone()
            };
            let at = ObjectRef::new(ns, name.clone());
            match secrets.iter().find(|s| s.meta.object_ref() == at) {
                None => {
                    rep.err(
                        st.f("passwordSecret"),
                        format!(
                            "the Secret {at} is not found (ferry reads the password from a \
                             Secret of type {BASIC_AUTH_SECRET_TYPE}, key \"password\"): the peer \
                             is dropped until it exists"
                        ),
                    );
                    ok = false;
                }
                Some(s) if s.type_ != BASIC_AUTH_SECRET_TYPE => {
                    rep.err(
                        st.f("passwordSecret"),
                        format!(
                            "the Secret {at} is of type {:?}: it must be {BASIC_AUTH_SECRET_TYPE}",
                            s.type_
                        ),
                    );
                    ok = false;
                }
                Some(s) => match s.data.get("password") {
                    None => {
                        rep.err(
                            st.f("passwordSecret"),
                            format!("the Secret {at} has no key \"password\""),
                        );
                        ok = false;
                    }
                    Some(bytes) => match String::from_utf8(bytes.clone()) {
                        Ok(p) => {
                            password = Some(p);
                            password_secret = Some(at);
                        }
                        Err(_) => {
                            rep.err(
                                st.f("passwordSecret"),
                                format!("the password in Secret {at} is not UTF-8 text"),
                            );
                            ok = false;
                        }
                    },
                },
            }
        }
        (_, false) => password = Some(raw.password.clone()),
        _ => {}
    }
    if let Some(p) = &password {
        if p.len() > MAX_PASSWORD_LEN {
            let field = if password_secret.is_some() {
                st.f("passwordSecret")
            } else {
                st.f("password")
            };
            rep.err(
                field,
                format!(
                    "a TCP MD5 password has at most {MAX_PASSWORD_LEN} bytes, got {}",
                    p.len()
                ),
            );
            ok = false;
        }
    }
    let bfd_profile = match raw.bfd_profile.trim() {
        "" => None,
        n if bfd.contains_key(n) => Some(n.to_string()),
        n => {
            let known: Vec<&str> = bfd.keys().map(String::as_str).collect();
            rep.err(
                st.f("bfdProfile"),
                format!(
                    "no BFDProfile named {n:?} (known: {}): the peer is dropped",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            );
            ok = false;
            None
        }
    };
    if !raw.vrf.is_empty() {
        rep.err(
            st.f("vrf"),
            format!(
                "{:?}: VRFs are not supported by ferry (its sessions run in the node's default \
                 VRF); remove vrf to peer there",
                raw.vrf
            ),
        );
        ok = false;
    }
    let (
        true,
        Some(my_asn),
        Some(peer_asn),
        Some(peer_address),
        Some(peer_port),
        Some((hold_time, keepalive_time)),
        Ok(router_id),
        Ok(source_address),
    ) = (
        ok,
        my_asn,
        peer_asn,
        peer_address,
        peer_port,
        timers,
        router_id,
        source_address,
    )
    else {
        return None;
    };
    Some(BgpPeer {
        name,
        source: rep.object.clone(),
        my_asn,
        peer_asn,
        peer_address,
        peer_port,
        hold_time,
        keepalive_time,
        router_id,
        source_address,
        node_selectors: raw.node_selectors.clone(),
        password: password.map(Password),
        password_secret,
        ebgp_multihop: raw.ebgp_multihop,
        bfd_profile,
    })
}

fn bgp_advertisement(
    rep: &mut Report<'_>,
    name: String,
    raw: &BgpAdvertisementCr,
    st: &Style,
    pools: &PoolConfig,
    aliases: &BTreeMap<String, Community>,
    peers: &[BgpPeer],
) -> Option<BgpAdvertisement> {
    let mut ok = true;
    let len = |rep: &mut Report<'_>, field: String, v: Option<i64>, default: u8, max: u8| match v {
        None => Some(default),
        Some(n) if (0..=i64::from(max)).contains(&n) => Some(n as u8),
        Some(n) => {
            rep.err(
                field,
                format!("must be between 0 and {max} (a prefix length), got {n}"),
            );
            None
        }
    };
    let agg4 = len(
        rep,
        st.f("aggregationLength"),
        raw.aggregation_length,
        32,
        32,
    );
    let agg6 = len(
        rep,
        st.f("aggregationLengthV6"),
        raw.aggregation_length_v6,
        128,
        128,
    );
    let local_pref = match raw.local_pref {
        None | Some(0) => None,
        Some(n) => match in_range(rep, st.f("localPref"), n, 0, u64::from(u32::MAX)) {
            Some(n) => Some(n as u32),
            None => {
                ok = false;
                None
            }
        },
    };
    let mut communities = BTreeSet::new();
    for (i, c) in raw.communities.iter().enumerate() {
        let field = format!("{}[{i}]", st.f("communities"));
        if let Some(v) = aliases.get(c) {
            communities.insert(*v);
            continue;
        }
        match parse_community(c) {
            Ok(v) => {
                communities.insert(v);
            }
            Err(CommunityError::Format) => {
                rep.err(
                    field,
                    format!(
                        "unknown community alias {c:?}: neither a value (65535:65282, \
                         large:1:2:3) nor a name defined by a Community or bgp-communities"
                    ),
                );
                ok = false;
            }
            Err(CommunityError::Value(why)) => {
                rep.err(field, why);
                ok = false;
            }
        }
    }
    for (i, p) in raw.peers.iter().enumerate() {
        if !peers.iter().any(|q| &q.name == p) {
            rep.warn(
                format!("spec.peers[{i}]"),
                format!("no (valid) BGPPeer named {p:?}: nothing is announced to it"),
            );
        }
    }
    let (Some(agg4), Some(agg6), true) = (agg4, agg6, ok) else {
        return None;
    };
    // Pool selection, as for L2Advertisements; no selection: every pool but legacy layer2 ones.
    let mut names = BTreeSet::new();
    if raw.ip_address_pools.is_empty() && raw.ip_address_pool_selectors.is_empty() {
        names.extend(
            pools
                .pools
                .iter()
                .filter(|p| p.protocol != Some(PoolProtocol::Layer2))
                .map(|p| p.name.clone()),
        );
    } else {
        for (i, n) in raw.ip_address_pools.iter().enumerate() {
            if pools.pool(n).is_some() {
                names.insert(n.clone());
            } else {
                rep.warn(
                    format!("spec.ipAddressPools[{i}]"),
                    format!("no pool named {n:?}: ignored"),
                );
            }
        }
        for p in &pools.pools {
            if raw
                .ip_address_pool_selectors
                .iter()
                .any(|s| s.matches(&p.labels))
            {
                names.insert(p.name.clone());
            }
        }
    }
    // An aggregate must not reach outside the pool (MetalLB's validateBGPAdvPerPool).
    names.retain(|n| {
        let Some(pool) = pools.pool(n) else {
            return false;
        };
        for r in &pool.ranges {
            let (agg, field) = if r.is_ipv4() {
                (agg4, "aggregationLength")
            } else {
                (agg6, "aggregationLengthV6")
            };
            let shortest = shortest_prefix_in(r);
            if agg < shortest {
                rep.err(
                    st.f(field),
                    format!(
                        "{agg} is shorter than the prefixes of {r} in pool {n:?} (/{shortest}): \
                         an aggregate would cover addresses outside the pool; pool {n:?} is not \
                         announced by this advertisement"
                    ),
                );
                return false;
            }
        }
        true
    });
    Some(BgpAdvertisement {
        name,
        source: rep.object.clone(),
        pools: names.into_iter().collect(),
        aggregation_length: agg4,
        aggregation_length_v6: agg6,
        local_pref,
        communities: communities.into_iter().collect(),
        peers: {
            let mut p = raw.peers.clone();
            p.sort();
            p.dedup();
            p
        },
        node_selectors: raw.node_selectors.clone(),
    })
}

fn bfd_profile(rep: &mut Report<'_>, raw: &BfdProfileCr, st: &Style) -> Option<BfdProfile> {
    let name = raw.meta.name.clone();
    if name.is_empty() {
        let field = match st {
            Style::Crd => "metadata.name".to_string(),
            Style::Legacy(base) => format!("{base}.name"),
        };
        rep.err(field, "required");
        return None;
    }
    let mut ok = true;
    let mut int =
        |rep: &mut Report<'_>, f: &str, v: Option<u64>, min: u64, max: u64, default: u64| match v {
            None => default,
            Some(n) => in_range(rep, st.f(f), n, min, max).unwrap_or_else(|| {
                ok = false;
                default
            }),
        };
    let receive = int(rep, "receiveInterval", raw.receive_interval, 10, 60000, 300);
    let transmit = int(
        rep,
        "transmitInterval",
        raw.transmit_interval,
        10,
        60000,
        300,
    );
    let multiplier = int(rep, "detectMultiplier", raw.detect_multiplier, 2, 255, 3);
    let echo = int(rep, "echoInterval", raw.echo_interval, 10, 60000, 50);
    let ttl = int(rep, "minimumTtl", raw.minimum_ttl, 1, 254, 254);
    let echo_mode = raw.echo_mode.unwrap_or(false);
    if echo_mode {
        rep.warn(
            st.f("echoMode"),
            "ferry's BFD does not send echo packets (asynchronous mode only): echo mode is ignored",
        );
    }
    ok.then(|| BfdProfile {
        name,
        source: rep.object.clone(),
        receive_interval_ms: receive as u32,
        transmit_interval_ms: transmit as u32,
        detect_multiplier: multiplier as u8,
        echo_interval_ms: echo as u32,
        echo_mode,
        passive_mode: raw.passive_mode.unwrap_or(false),
        minimum_ttl: ttl as u8,
    })
}

// ---------------------------------------------------------------------------------------------
// The legacy ConfigMap

/// What the legacy ConfigMap says about BGP, as raw objects with their field names.
#[derive(Default)]
struct Legacy {
    object: String,
    /// (peers[N], raw, style).
    peers: Vec<(String, BgpPeerCr, Style)>,
    /// (alias, value, field).
    aliases: Vec<(String, String, String)>,
    bfd: Vec<(BfdProfileCr, Style)>,
    /// Pool name -> its bgp-advertisements.
    pool_advs: BTreeMap<String, LegacyAdvs>,
}

struct LegacyAdvs {
    /// The field (`data[config].address-pools[N].bgp-advertisements`).
    field: String,
    /// Whether a non-empty list (or a bad value) was written: then no defaults.
    written: bool,
    /// The valid ones, with their place in the list.
    advs: Vec<(usize, BgpAdvertisementCr, Style)>,
}

fn read_legacy(cm: &ConfigMap, legacy: &mut Legacy, errors: &mut Vec<PoolError>) {
    let object = format!("ConfigMap {}", cm.meta.object_ref());
    legacy.object = object.clone();
    // A missing key or invalid YAML is reported by pools::load.
    let Some(Ok(Value::Object(top))) = cm.data.get(LEGACY_KEY).map(|t| crate::yaml::from_str(t))
    else {
        return;
    };
    let mut rep = Report {
        out: errors,
        object,
    };
    let base = format!("data[{LEGACY_KEY}]");
    let list = |rep: &mut Report<'_>, key: &str| -> Vec<(usize, String, Mapping)> {
        let field = format!("{base}.{key}");
        match top.get(key) {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .filter_map(|(i, v)| {
                    let f = format!("{field}[{i}]");
                    match v {
                        Value::Object(m) => Some((i, f, m.clone())),
                        other => {
                            rep.err(f, format!("must be a mapping, got {}", describe(other)));
                            None
                        }
                    }
                })
                .collect(),
            Some(other) => {
                rep.err(field, format!("must be a list, got {}", describe(other)));
                vec![]
            }
        }
    };
    for (i, f, m) in list(&mut rep, "peers") {
        if let Some(raw) = legacy_peer(&mut rep, &f, &m) {
            legacy
                .peers
                .push((format!("peers[{i}]"), raw, Style::Legacy(f)));
        }
    }
    for (_, f, m) in list(&mut rep, "bfd-profiles") {
        if let Some(raw) = legacy_bfd(&mut rep, &f, &m) {
            legacy.bfd.push((raw, Style::Legacy(f)));
        }
    }
    match top.get("bgp-communities") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                let f = format!("{base}.bgp-communities.{k}");
                match v {
                    Value::String(s) => legacy.aliases.push((k.clone(), s.clone(), f)),
                    other => rep.err(f, format!("must be a string, got {}", describe(other))),
                }
            }
        }
        Some(other) => rep.err(
            format!("{base}.bgp-communities"),
            format!(
                "must be a mapping of alias to value, got {}",
                describe(other)
            ),
        ),
    }
    for (_, f, m) in list(&mut rep, "address-pools") {
        let Some(Value::String(name)) = m.get("name") else {
            continue; // pools::load reports it
        };
        let af = format!("{f}.bgp-advertisements");
        let mut written = false;
        let advs = match m.get("bgp-advertisements") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => {
                // Written (even if every entry is bad): no fallback to the defaults.
                written = !items.is_empty();
                let mut out = Vec::new();
                for (j, item) in items.iter().enumerate() {
                    let g = format!("{af}[{j}]");
                    match item {
                        Value::Object(am) => {
                            if let Some(raw) = legacy_adv(&mut rep, &g, am) {
                                out.push((j, raw, Style::Legacy(g)));
                            }
                        }
                        other => rep.err(g, format!("must be a mapping, got {}", describe(other))),
                    }
                }
                out
            }
            Some(other) => {
                rep.err(
                    af.clone(),
                    format!("must be a list, got {}", describe(other)),
                );
                written = true;
                Vec::new()
            }
        };
        legacy.pool_advs.insert(
            name.clone(),
            LegacyAdvs {
                field: af,
                written,
                advs,
            },
        );
    }
}

fn unknown_key(rep: &mut Report<'_>, base: &str, key: &str) {
    rep.warn(
        base,
        format!(
            "unknown key {} ignored",
            describe(&Value::String(key.to_string()))
        ),
    );
}

/// A non-negative integer (None when null); Err after reporting.
fn yaml_u64(rep: &mut Report<'_>, field: String, v: &Value) -> Result<Option<u64>, ()> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => n.as_u64().map(Some).ok_or_else(|| {
            rep.err(
                field,
                format!("must be a non-negative integer, got number {n}"),
            );
        }),
        other => {
            rep.err(
                field,
                format!("must be a non-negative integer, got {}", describe(other)),
            );
            Err(())
        }
    }
}

fn yaml_i64(rep: &mut Report<'_>, field: String, v: &Value) -> Result<Option<i64>, ()> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) if n.as_i64().is_some() => Ok(n.as_i64()),
        other => {
            rep.err(
                field,
                format!("must be an integer, got {}", describe(other)),
            );
            Err(())
        }
    }
}

fn yaml_str(rep: &mut Report<'_>, field: String, v: &Value) -> Result<String, ()> {
    match v {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        other => {
            rep.err(field, format!("must be a string, got {}", describe(other)));
            Err(())
        }
    }
}

fn yaml_bool(rep: &mut Report<'_>, field: String, v: &Value) -> Result<Option<bool>, ()> {
    match v {
        Value::Null => Ok(None),
        Value::Bool(b) => Ok(Some(*b)),
        other => {
            rep.err(
                field,
                format!("must be true or false, got {}", describe(other)),
            );
            Err(())
        }
    }
}

fn yaml_strings(rep: &mut Report<'_>, field: String, v: &Value) -> Result<Vec<String>, ()> {
    match v {
        Value::Null => Ok(vec![]),
        Value::Array(items) => {
            let mut out = Vec::new();
            let mut ok = true;
            for (i, item) in items.iter().enumerate() {
                match yaml_str(rep, format!("{field}[{i}]"), item) {
                    Ok(s) => out.push(s),
                    Err(()) => ok = false,
                }
            }
            if ok {
                Ok(out)
            } else {
                Err(())
            }
        }
        other => {
            rep.err(field, format!("must be a list, got {}", describe(other)));
            Err(())
        }
    }
}

/// Legacy `node-selectors: [{match-labels: {k: v}, match-expressions: [{key, operator,
/// values}]}]`.
fn yaml_selectors(
    rep: &mut Report<'_>,
    field: String,
    v: &Value,
) -> Result<Vec<LabelSelector>, ()> {
    let Value::Array(items) = v else {
        if v.is_null() {
            return Ok(vec![]);
        }
        rep.err(field, format!("must be a list, got {}", describe(v)));
        return Err(());
    };
    let mut out = Vec::new();
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let f = format!("{field}[{i}]");
        let Value::Object(m) = item else {
            rep.err(f, format!("must be a mapping, got {}", describe(item)));
            ok = false;
            continue;
        };
        let mut sel = LabelSelector::default();
        for (k, v) in m {
            let g = format!("{f}.{k}");
            match k.as_str() {
                "match-labels" => match v {
                    Value::Null => {}
                    Value::Object(labels) => {
                        for (lk, lv) in labels {
                            match lv {
                                Value::String(s) => {
                                    sel.match_labels.insert(lk.clone(), s.clone());
                                }
                                other => {
                                    rep.err(
                                        format!("{g}.{lk}"),
                                        format!("must be a string, got {}", describe(other)),
                                    );
                                    ok = false;
                                }
                            }
                        }
                    }
                    other => {
                        rep.err(g, format!("must be a mapping, got {}", describe(other)));
                        ok = false;
                    }
                },
                "match-expressions" => {
                    let Value::Array(exprs) = v else {
                        if !v.is_null() {
                            rep.err(g, format!("must be a list, got {}", describe(v)));
                            ok = false;
                        }
                        continue;
                    };
                    for (j, e) in exprs.iter().enumerate() {
                        let h = format!("{g}[{j}]");
                        let Value::Object(em) = e else {
                            rep.err(h, format!("must be a mapping, got {}", describe(e)));
                            ok = false;
                            continue;
                        };
                        let key = em.get("key").and_then(Value::as_str).unwrap_or("");
                        let op = em.get("operator").and_then(Value::as_str).unwrap_or("");
                        let values = em
                            .get("values")
                            .map(|v| yaml_strings(rep, format!("{h}.values"), v))
                            .unwrap_or(Ok(vec![]));
                        let Ok(values) = values else {
                            ok = false;
                            continue;
                        };
                        if key.is_empty() {
                            rep.err(format!("{h}.key"), "required");
                            ok = false;
                            continue;
                        }
                        let Some(operator) = SelectorOperator::parse_k8s(op) else {
                            rep.err(
                                format!("{h}.operator"),
                                format!("must be In, NotIn, Exists or DoesNotExist, got {op:?}"),
                            );
                            ok = false;
                            continue;
                        };
                        let needs_values =
                            matches!(operator, SelectorOperator::In | SelectorOperator::NotIn);
                        if needs_values == values.is_empty() {
                            rep.err(
                                format!("{h}.values"),
                                if needs_values {
                                    "required for In and NotIn"
                                } else {
                                    "must be empty for Exists and DoesNotExist"
                                },
                            );
                            ok = false;
                            continue;
                        }
                        sel.match_expressions.push(LabelSelectorRequirement {
                            key: key.to_string(),
                            operator,
                            values,
                        });
                    }
                }
                other => unknown_key(rep, &f, other),
            }
        }
        out.push(sel);
    }
    if ok {
        Ok(out)
    } else {
        Err(())
    }
}

fn legacy_peer(rep: &mut Report<'_>, base: &str, m: &Mapping) -> Option<BgpPeerCr> {
    let mut raw = BgpPeerCr::default();
    let mut ok = true;
    for (k, v) in m {
        let f = format!("{base}.{k}");
        let r: Result<(), ()> = (|| {
            match k.as_str() {
                "my-asn" => raw.my_asn = yaml_u64(rep, f, v)?,
                "peer-asn" => raw.peer_asn = yaml_u64(rep, f, v)?,
                "peer-address" => raw.peer_address = yaml_str(rep, f, v)?,
                "peer-port" => raw.peer_port = yaml_u64(rep, f, v)?,
                "hold-time" => raw.hold_time = Some(yaml_str(rep, f, v)?),
                "keepalive-time" => raw.keepalive_time = Some(yaml_str(rep, f, v)?),
                "router-id" => raw.router_id = yaml_str(rep, f, v)?,
                "source-address" => raw.source_address = yaml_str(rep, f, v)?,
                "node-selectors" => raw.node_selectors = yaml_selectors(rep, f, v)?,
                "password" => raw.password = yaml_str(rep, f, v)?,
                "bfd-profile" => raw.bfd_profile = yaml_str(rep, f, v)?,
                "ebgp-multihop" => raw.ebgp_multihop = yaml_bool(rep, f, v)?.unwrap_or(false),
                other => unknown_key(rep, base, other),
            }
            Ok(())
        })();
        ok &= r.is_ok();
    }
    ok.then_some(raw)
}

fn legacy_bfd(rep: &mut Report<'_>, base: &str, m: &Mapping) -> Option<BfdProfileCr> {
    let mut raw = BfdProfileCr::default();
    let mut ok = true;
    for (k, v) in m {
        let f = format!("{base}.{k}");
        let r: Result<(), ()> = (|| {
            match k.as_str() {
                "name" => raw.meta.name = yaml_str(rep, f, v)?,
                "receive-interval" => raw.receive_interval = yaml_u64(rep, f, v)?,
                "transmit-interval" => raw.transmit_interval = yaml_u64(rep, f, v)?,
                "detect-multiplier" => raw.detect_multiplier = yaml_u64(rep, f, v)?,
                "echo-interval" => raw.echo_interval = yaml_u64(rep, f, v)?,
                "echo-mode" => raw.echo_mode = yaml_bool(rep, f, v)?,
                "passive-mode" => raw.passive_mode = yaml_bool(rep, f, v)?,
                "minimum-ttl" => raw.minimum_ttl = yaml_u64(rep, f, v)?,
                other => unknown_key(rep, base, other),
            }
            Ok(())
        })();
        ok &= r.is_ok();
    }
    ok.then_some(raw)
}

fn legacy_adv(rep: &mut Report<'_>, base: &str, m: &Mapping) -> Option<BgpAdvertisementCr> {
    let mut raw = BgpAdvertisementCr::default();
    let mut ok = true;
    for (k, v) in m {
        let f = format!("{base}.{k}");
        let r: Result<(), ()> = (|| {
            match k.as_str() {
                "aggregation-length" => raw.aggregation_length = yaml_i64(rep, f, v)?,
                "aggregation-length-v6" => raw.aggregation_length_v6 = yaml_i64(rep, f, v)?,
                "localpref" | "local-pref" => raw.local_pref = yaml_u64(rep, f, v)?,
                "communities" => raw.communities = yaml_strings(rep, f, v)?,
                other => unknown_key(rep, base, other),
            }
            Ok(())
        })();
        ok &= r.is_ok();
    }
    ok.then_some(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::{IpAddressPool, Meta};
    use crate::pools::tests::{crd, legacy};
    use proptest::prelude::*;

    fn meta(name: &str) -> Meta {
        Meta {
            name: name.into(),
            namespace: "metallb-system".into(),
            ..Meta::default()
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sel(pairs: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: labels(pairs),
            match_expressions: vec![],
        }
    }

    fn peer(name: &str, addr: &str) -> BgpPeerCr {
        BgpPeerCr {
            meta: meta(name),
            my_asn: Some(64500),
            peer_asn: Some(64501),
            peer_address: addr.into(),
            ..BgpPeerCr::default()
        }
    }

    fn adv(name: &str) -> BgpAdvertisementCr {
        BgpAdvertisementCr {
            meta: meta(name),
            ..BgpAdvertisementCr::default()
        }
    }

    fn pools_of(list: &[IpAddressPool]) -> PoolConfig {
        let (cfg, errs) = crate::pools::load(&[], list, &[]);
        assert!(errs.is_empty(), "{errs:?}");
        cfg
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn texts(errs: &[PoolError]) -> Vec<String> {
        errs.iter().map(|e| e.to_string()).collect()
    }

    /// The one error at `field`, or a panic listing them all.
    fn error_at<'a>(errs: &'a [PoolError], field: &str) -> &'a PoolError {
        errs.iter()
            .find(|e| e.field == field)
            .unwrap_or_else(|| panic!("no error at {field}: {:#?}", texts(errs)))
    }

    const LEGACY: &str = "\
peers:
- peer-address: 10.0.0.1
  peer-asn: 64501
  my-asn: 64500
- peer-address: 10.0.0.2
  peer-asn: 64502
  my-asn: 64500
  peer-port: 1179
  hold-time: 1m30s
  keepalive-time: 10s
  router-id: 10.0.0.100
  source-address: 10.0.0.50
  password: hunter2
  node-selectors:
  - match-labels: {rack: a}
    match-expressions:
    - {key: role, operator: In, values: [edge]}
bgp-communities:
  no-advertise: 65535:65282
address-pools:
- name: bgp
  protocol: bgp
  addresses: [198.51.100.0/24]
  bgp-advertisements:
  - aggregation-length: 32
    localpref: 100
    communities: [no-advertise, '64500:1']
  - aggregation-length: 24
- name: plain
  protocol: bgp
  addresses: ['fd00:1::/120']
- name: l2
  protocol: layer2
  addresses: [192.168.2.0/24]
";

    #[test]
    fn legacy_configmap() {
        let cm = legacy(LEGACY);
        let (pools, errs) = crate::pools::load(std::slice::from_ref(&cm), &[], &[]);
        assert!(errs.is_empty(), "{errs:?}");
        let (cfg, errs) = load(
            &pools,
            &BgpInputs {
                config_maps: &[cm],
                ..BgpInputs::default()
            },
        );
        assert!(errs.is_empty(), "{:#?}", texts(&errs));
        assert_eq!(cfg.peers.len(), 2);
        let p0 = &cfg.peers[0];
        assert_eq!(p0.name, "peers[0]");
        assert_eq!(p0.source, "ConfigMap metallb-system/config");
        assert_eq!((p0.my_asn, p0.peer_asn), (64500, 64501));
        assert_eq!(p0.peer_port, 179);
        assert_eq!(p0.hold_time, Duration::from_secs(90));
        assert_eq!(p0.keepalive_time, Duration::from_secs(30));
        assert!(p0.password.is_none() && p0.node_selectors.is_empty());
        let p1 = &cfg.peers[1];
        assert_eq!(p1.peer_port, 1179);
        assert_eq!(p1.hold_time, Duration::from_secs(90));
        assert_eq!(p1.keepalive_time, Duration::from_secs(10));
        assert_eq!(p1.router_id, Some("10.0.0.100".parse().unwrap()));
        assert_eq!(p1.source_address, Some(ip("10.0.0.50")));
        assert_eq!(p1.password, Some(Password("hunter2".into())));
        assert!(!format!("{p1:?}").contains("hunter2"), "Debug hides it");
        assert_eq!(
            p1.node_selectors[0].to_string(),
            "rack=a,role in (edge)",
            "legacy selectors"
        );
        assert_eq!(
            cfg.communities.get("no-advertise"),
            Some(&Community::Standard(0xffff_ff02))
        );
        // bgp: two written; plain: the default; l2: none.
        let advs: Vec<(&str, &[String], u8, u8)> = cfg
            .advertisements
            .iter()
            .map(|a| {
                (
                    a.name.as_str(),
                    a.pools.as_slice(),
                    a.aggregation_length,
                    a.aggregation_length_v6,
                )
            })
            .collect();
        assert_eq!(advs.len(), 3, "{advs:?}");
        assert_eq!(advs[0].0, "bgp.bgp-advertisements[0]");
        assert_eq!(advs[1].2, 24);
        assert_eq!(advs[2].0, "plain.bgp-advertisements[0]");
        assert_eq!((advs[2].2, advs[2].3), (32, 128));
        let a = &cfg.advertisements[0];
        assert_eq!(a.local_pref, Some(100));
        assert_eq!(
            a.communities,
            vec![
                Community::Standard((64500 << 16) | 1),
                Community::Standard(0xffff_ff02)
            ]
        );
        assert!(cfg.announces_pool("bgp") && cfg.announces_pool("plain"));
        assert!(!cfg.announces_pool("l2"));
    }

    #[test]
    fn legacy_errors_name_the_field_and_keep_the_rest() {
        let cm = legacy(
            "peers:\n\
             - {peer-address: 10.0.0.1, peer-asn: 64501, my-asn: 0}\n\
             - {peer-address: 10.0.0.300, peer-asn: 64501, my-asn: 64500}\n\
             - {peer-address: 10.0.0.3, peer-asn: 4294967296, my-asn: 64500}\n\
             - {peer-address: 10.0.0.4, peer-asn: 64501, my-asn: 64500, hold-time: 2s}\n\
             - {peer-address: 10.0.0.5, peer-asn: 64501, my-asn: 64500, hold-time: 9s, keepalive-time: 10s}\n\
             - {peer-address: 10.0.0.6, peer-asn: 64501, my-asn: 64500, hold-time: 90}\n\
             - {peer-address: 10.0.0.7, peer-asn: 64501, my-asn: 64500}\n\
             bgp-communities: {bad: '70000:1'}\n\
             address-pools:\n\
             - name: bgp\n  protocol: bgp\n  addresses: [198.51.100.0/28]\n  \
               bgp-advertisements:\n  - {aggregation-length: 33}\n  - {aggregation-length: 24}\n  \
               - {communities: [bad]}\n  - {communities: [nope]}\n  - {localpref: 5}\n",
        );
        let (pools, errs) = crate::pools::load(std::slice::from_ref(&cm), &[], &[]);
        assert!(errs.is_empty(), "{errs:?}");
        let (cfg, errs) = load(
            &pools,
            &BgpInputs {
                config_maps: &[cm],
                ..BgpInputs::default()
            },
        );
        let base = "data[config]";
        assert_eq!(
            cfg.peers
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>(),
            ["peers[6]"]
        );
        let e = error_at(&errs, &format!("{base}.peers[0].my-asn"));
        assert_eq!(e.object, "ConfigMap metallb-system/config");
        assert!(e.message.starts_with("required"), "{e}");
        let e = error_at(&errs, &format!("{base}.peers[1].peer-address"));
        assert!(
            e.message.contains("\"10.0.0.300\" is not an IP address"),
            "{e}"
        );
        let e = error_at(&errs, &format!("{base}.peers[2].peer-asn"));
        assert_eq!(
            e.message,
            "must be between 1 and 4294967295, got 4294967296"
        );
        let e = error_at(&errs, &format!("{base}.peers[3].hold-time"));
        assert!(
            e.message.contains("must be 0 or at least 3s, got 2s"),
            "{e}"
        );
        let e = error_at(&errs, &format!("{base}.peers[4].keepalive-time"));
        assert!(e.message.contains("longer than the hold time 9s"), "{e}");
        let e = error_at(&errs, &format!("{base}.peers[5].hold-time"));
        assert!(e.message.contains("must be a string"), "{e}");
        let e = error_at(&errs, &format!("{base}.bgp-communities.bad"));
        assert!(e.message.contains("70000"), "{e}");
        let adv = format!("{base}.address-pools[0].bgp-advertisements");
        let e = error_at(&errs, &format!("{adv}[0].aggregation-length"));
        assert!(e.message.contains("between 0 and 32"), "{e}");
        let e = error_at(&errs, &format!("{adv}[1].aggregation-length"));
        assert!(
            e.message
                .contains("24 is shorter than the prefixes of 198.51.100.0/28"),
            "{e}"
        );
        let e = error_at(&errs, &format!("{adv}[3].communities[0]"));
        assert!(
            e.message.contains("unknown community alias \"nope\""),
            "{e}"
        );
        // "bad" was dropped as an alias, so it is unknown too.
        error_at(&errs, &format!("{adv}[2].communities[0]"));
        assert!(errs.iter().all(|e| e.severity == Severity::Error));
        // The good advertisement stands; the one with a too-short aggregation keeps no pool.
        let kept: Vec<(&str, usize)> = cfg
            .advertisements
            .iter()
            .map(|a| (a.name.as_str(), a.pools.len()))
            .collect();
        assert_eq!(
            kept,
            [
                ("bgp.bgp-advertisements[1]", 0),
                ("bgp.bgp-advertisements[4]", 1)
            ],
            "named by their place in the list"
        );
        assert_eq!(cfg.advertisements[1].local_pref, Some(5));
    }

    #[test]
    fn legacy_advertisements_keep_their_place() {
        let cm = legacy(
            "address-pools:\n- name: bgp\n  protocol: bgp\n  addresses: [198.51.100.0/24]\n  \
             bgp-advertisements:\n  - {localpref: -1}\n  - {localpref: 5}\n  - {localpref: 7}\n",
        );
        let (pools, _) = crate::pools::load(std::slice::from_ref(&cm), &[], &[]);
        let (cfg, errs) = load(
            &pools,
            &BgpInputs {
                config_maps: &[cm],
                ..BgpInputs::default()
            },
        );
        let names: Vec<&str> = cfg.advertisements.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(
            names,
            ["bgp.bgp-advertisements[1]", "bgp.bgp-advertisements[2]"]
        );
        let base = "data[config].address-pools[0].bgp-advertisements";
        let e = error_at(&errs, &format!("{base}[0].localpref"));
        assert_eq!(e.severity, Severity::Error);
        let w = error_at(&errs, &format!("{base}[2].localpref"));
        assert_eq!(w.severity, Severity::Warning);
        assert!(w.message.contains("LOCAL_PREF 7"), "{w}");
    }

    #[test]
    fn crd_peer_defaults_and_checks() {
        let pools = PoolConfig::default();
        let good = peer("r1", "fd00::1");
        let mut v6_src = peer("v6src", "10.0.0.1");
        v6_src.source_address = "fd00::2".into();
        let mut vrf = peer("vrf", "10.0.0.2");
        vrf.vrf = "red".into();
        let mut bfd = peer("bfd", "10.0.0.3");
        bfd.bfd_profile = "fast".into();
        let mut rid = peer("rid", "10.0.0.4");
        rid.router_id = "fd00::9".into();
        let mut zero = peer("zero", "10.0.0.10");
        zero.router_id = "0.0.0.0".into();
        let mut ibgp = peer("ibgp", "10.0.0.5");
        ibgp.peer_asn = Some(64500);
        ibgp.ebgp_multihop = true;
        let mut both = peer("both", "10.0.0.6");
        both.password = "x".into();
        both.password_secret = Some(SecretRef {
            name: "s".into(),
            namespace: String::new(),
        });
        let mut long = peer("long", "10.0.0.7");
        long.password = "x".repeat(81);
        let mut ka = peer("ka", "10.0.0.8");
        ka.keepalive_time = Some("20s".into());
        let mut port = peer("port", "10.0.0.9");
        port.peer_port = Some(70000);
        let mut dup = peer("dup", "fd00::1");
        dup.meta.namespace = "other".into();
        let (cfg, errs) = load(
            &pools,
            &BgpInputs {
                peers: &[
                    good, v6_src, vrf, bfd, rid, zero, ibgp, both, long, ka, port, dup,
                ],
                ..BgpInputs::default()
            },
        );
        let names: Vec<&str> = cfg.peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["ka", "r1"], "{:#?}", texts(&errs));
        let r1 = cfg.peer("r1").unwrap();
        assert_eq!(r1.peer_address, ip("fd00::1"));
        assert_eq!((r1.peer_port, r1.hold_time.as_secs()), (179, 90));
        // keepaliveTime alone: hold time three times it.
        let ka = cfg.peer("ka").unwrap();
        assert_eq!(
            (ka.hold_time.as_secs(), ka.keepalive_time.as_secs()),
            (60, 20)
        );
        let find = |obj: &str, field: &str| {
            errs.iter()
                .find(|e| e.object == format!("BGPPeer metallb-system/{obj}") && e.field == field)
                .unwrap_or_else(|| panic!("no {obj} {field}: {:#?}", texts(&errs)))
                .message
                .clone()
        };
        assert!(find("v6src", "spec.sourceAddress")
            .contains("fd00::2 is IPv6 but the peer address 10.0.0.1 is IPv4"));
        assert!(find("vrf", "spec.vrf").contains("not supported"));
        assert!(find("bfd", "spec.bfdProfile").contains("no BFDProfile named \"fast\""));
        assert!(find("rid", "spec.routerID").contains("IPv4"));
        assert!(find("zero", "spec.routerID").contains("must not be zero"));
        assert!(find("ibgp", "spec.ebgpMultiHop").contains("iBGP"));
        assert!(find("both", "spec.passwordSecret").contains("both set"));
        assert!(find("long", "spec.password").contains("at most 80 bytes, got 81"));
        assert_eq!(
            find("port", "spec.peerPort"),
            "must be between 1 and 65535, got 70000"
        );
        let e = errs
            .iter()
            .find(|e| e.object == "BGPPeer other/dup")
            .unwrap();
        assert!(
            e.message.contains("duplicate peer name") || e.message.contains("same session"),
            "{e}"
        );
    }

    #[test]
    fn password_secrets() {
        let secret = |name: &str, type_: &str, key: &str| Secret {
            meta: meta(name),
            type_: type_.into(),
            data: [(key.to_string(), b"s3cret".to_vec())].into(),
        };
        let with = |name: &str, secret: &str| {
            let mut p = peer(name, "10.0.0.1");
            p.peer_port = Some(179 + name.len() as u64);
            p.password_secret = Some(SecretRef {
                name: secret.into(),
                namespace: String::new(),
            });
            p
        };
        let secrets = [
            secret("ok", BASIC_AUTH_SECRET_TYPE, "password"),
            secret("opaque", "Opaque", "password"),
            secret("nokey", BASIC_AUTH_SECRET_TYPE, "username"),
        ];
        let (cfg, errs) = load(
            &PoolConfig::default(),
            &BgpInputs {
                peers: &[
                    with("a", "ok"),
                    with("bb", "opaque"),
                    with("ccc", "nokey"),
                    with("dddd", "missing"),
                ],
                secrets: &secrets,
                ..BgpInputs::default()
            },
        );
        assert_eq!(cfg.peers.len(), 1);
        assert_eq!(cfg.peers[0].password, Some(Password("s3cret".into())));
        assert_eq!(
            cfg.peers[0].password_secret,
            Some(ObjectRef::new("metallb-system", "ok"))
        );
        let t = texts(&errs);
        assert_eq!(t.len(), 3, "{t:#?}");
        assert!(t[0].contains("of type \"Opaque\""), "{t:#?}");
        assert!(t[1].contains("no key \"password\""), "{t:#?}");
        assert!(
            t[2].starts_with(
                "BGPPeer metallb-system/dddd: spec.passwordSecret: the Secret \
                 metallb-system/missing is not found"
            ),
            "{t:#?}"
        );
        assert!(!format!("{secrets:?}").contains("s3cret"));
    }

    #[test]
    fn crd_advertisements_bfd_and_communities() {
        let mut lan = crd("lan", &["198.51.100.0/24", "fd00:1::/120"]);
        lan.meta.labels = labels(&[("bgp", "yes")]);
        let pools = pools_of(&[lan, crd("other", &["203.0.113.0/28"])]);
        let comms = CommunityCr {
            meta: meta("c"),
            communities: vec![
                ("no-export".into(), "65535:65281".into()),
                ("big".into(), "large:64500:1:2".into()),
                ("".into(), "1:1".into()),
            ],
        };
        let mut all = adv("all");
        all.communities = vec!["no-export".into(), "big".into(), "64500:7".into()];
        all.local_pref = Some(200);
        let mut by_label = adv("by-label");
        by_label.ip_address_pool_selectors = vec![sel(&[("bgp", "yes")])];
        by_label.aggregation_length = Some(24);
        by_label.aggregation_length_v6 = Some(120);
        by_label.peers = vec!["r2".into(), "r1".into(), "ghost".into()];
        let mut too_short = adv("too-short");
        too_short.ip_address_pools = vec!["other".into()];
        too_short.aggregation_length = Some(24);
        let mut bad = adv("bad");
        bad.communities = vec!["large:1:2".into()];
        let mut over = adv("over");
        over.aggregation_length_v6 = Some(129);
        let fast = BfdProfileCr {
            meta: meta("fast"),
            receive_interval: Some(50),
            transmit_interval: Some(50),
            ..BfdProfileCr::default()
        };
        let slow = BfdProfileCr {
            meta: meta("slow"),
            detect_multiplier: Some(1),
            ..BfdProfileCr::default()
        };
        let mut r1 = peer("r1", "10.0.0.1");
        r1.bfd_profile = "fast".into();
        let mut r2 = peer("r2", "10.0.0.2");
        r2.bfd_profile = "slow".into();
        let (cfg, errs) = load(
            &pools,
            &BgpInputs {
                peers: &[r1, r2],
                advertisements: &[all, by_label, too_short, bad, over],
                communities: &[comms],
                bfd_profiles: &[fast, slow],
                ..BgpInputs::default()
            },
        );
        let t = texts(&errs);
        let fast = cfg.bfd_profile("fast").unwrap();
        assert_eq!(
            (
                fast.receive_interval_ms,
                fast.transmit_interval_ms,
                fast.detect_multiplier,
                fast.echo_interval_ms,
                fast.minimum_ttl
            ),
            (50, 50, 3, 50, 254)
        );
        assert!(cfg.bfd_profile("slow").is_none());
        assert!(t.contains(
            &"BFDProfile metallb-system/slow: spec.detectMultiplier: must be between 2 and 255, got 1"
                .to_string()
        ), "{t:#?}");
        assert!(t.iter().any(|e| e.starts_with("BGPPeer metallb-system/r2: spec.bfdProfile: no BFDProfile named \"slow\" (known: fast)")), "{t:#?}");
        assert!(
            t.contains(
                &"Community metallb-system/c: spec.communities[2].name: required".to_string()
            ),
            "{t:#?}"
        );
        let a = |n: &str| cfg.advertisements.iter().find(|a| a.name == n);
        let all = a("all").unwrap();
        assert_eq!(all.pools, ["lan", "other"]);
        assert_eq!(all.local_pref, Some(200));
        assert_eq!(
            all.communities,
            vec![
                Community::Standard((64500 << 16) | 7),
                Community::Standard(0xffff_ff01),
                Community::Large([64500, 1, 2])
            ]
        );
        let by_label = a("by-label").unwrap();
        assert_eq!(by_label.pools, ["lan"]);
        assert_eq!(by_label.peers, ["ghost", "r1", "r2"]);
        assert!(
            t.iter()
                .any(|e| e.contains("spec.peers[2]: no (valid) BGPPeer named \"ghost\"")),
            "{t:#?}"
        );
        assert_eq!(a("too-short").unwrap().pools, Vec::<String>::new());
        assert!(t.iter().any(|e| e.starts_with("BGPAdvertisement metallb-system/too-short: spec.aggregationLength: 24 is shorter than the prefixes of 203.0.113.0/28 in pool \"other\" (/28)")), "{t:#?}");
        assert!(a("bad").is_none() && a("over").is_none());
        assert!(t.iter().any(|e| e.starts_with("BGPAdvertisement metallb-system/bad: spec.communities[0]:")), "{t:#?}");
        assert!(t.contains(&"BGPAdvertisement metallb-system/over: spec.aggregationLengthV6: must be between 0 and 128 (a prefix length), got 129".to_string()), "{t:#?}");
    }

    #[test]
    fn decision_aggregates_and_selects() {
        let pools = pools_of(&[
            crd("lan", &["198.51.100.0/24", "fd00:1::/120"]),
            crd("dmz", &["203.0.113.0/24"]),
        ]);
        let mut r1 = peer("r1", "10.0.0.1");
        r1.node_selectors = vec![sel(&[("rack", "a")])];
        let r2 = peer("r2", "10.0.0.2");
        let mut host = adv("host");
        host.ip_address_pools = vec!["lan".into()];
        host.communities = vec!["64500:1".into()];
        let mut agg = adv("agg");
        agg.ip_address_pools = vec!["lan".into(), "dmz".into()];
        agg.aggregation_length = Some(24);
        agg.aggregation_length_v6 = Some(120);
        agg.peers = vec!["r2".into()];
        agg.local_pref = Some(50);
        let mut edge_only = adv("edge-only");
        edge_only.ip_address_pools = vec!["dmz".into()];
        edge_only.node_selectors = vec![sel(&[("role", "edge")])];
        edge_only.communities = vec!["large:1:2:3".into()];
        let (cfg, errs) = load(
            &pools,
            &BgpInputs {
                peers: &[r1, r2],
                advertisements: &[host, agg, edge_only],
                ..BgpInputs::default()
            },
        );
        assert!(errs.is_empty(), "{:#?}", texts(&errs));
        let addrs = [
            LbAddress {
                ip: ip("198.51.100.10"),
                pool: "lan".into(),
                eligible: true,
            },
            LbAddress {
                ip: ip("198.51.100.20"),
                pool: "lan".into(),
                eligible: true,
            },
            LbAddress {
                ip: ip("198.51.100.30"),
                pool: "lan".into(),
                eligible: false,
            },
            LbAddress {
                ip: ip("fd00:1::5"),
                pool: "lan".into(),
                eligible: true,
            },
            LbAddress {
                ip: ip("203.0.113.7"),
                pool: "dmz".into(),
                eligible: true,
            },
            LbAddress {
                ip: ip("192.0.2.9"),
                pool: "gone".into(),
                eligible: true,
            },
        ];
        // Rack b, not edge: only r2; host routes for lan (from "host"), /24 aggregates (from
        // "agg", which names r2).
        let out = cfg.announcements(&labels(&[("rack", "b")]), &addrs);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].peer, "r2");
        let got: Vec<(String, Option<u32>, usize, usize)> = out[0]
            .routes
            .iter()
            .map(|r| {
                (
                    r.prefix.to_string(),
                    r.local_pref,
                    r.communities.len(),
                    r.large_communities.len(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("198.51.100.0/24".to_string(), Some(50), 0, 0),
                ("198.51.100.10/32".to_string(), None, 1, 0),
                ("198.51.100.20/32".to_string(), None, 1, 0),
                ("203.0.113.0/24".to_string(), Some(50), 0, 0),
                ("fd00:1::/120".to_string(), Some(50), 0, 0),
                ("fd00:1::5/128".to_string(), None, 1, 0),
            ]
        );
        // Rack a, edge: r1 too, which "agg" does not name; the edge host route for dmz.
        let out = cfg.announcements(&labels(&[("rack", "a"), ("role", "edge")]), &addrs);
        assert_eq!(
            out.iter().map(|p| p.peer.as_str()).collect::<Vec<_>>(),
            ["r1", "r2"]
        );
        let r1: Vec<String> = out[0].routes.iter().map(|r| r.prefix.to_string()).collect();
        assert_eq!(
            r1,
            [
                "198.51.100.10/32",
                "198.51.100.20/32",
                "203.0.113.7/32",
                "fd00:1::5/128"
            ]
        );
        assert_eq!(out[0].routes[2].large_communities, vec![[1, 2, 3]]);
        // Nothing eligible: the sessions, no routes.
        let none: Vec<LbAddress> = addrs
            .iter()
            .cloned()
            .map(|a| LbAddress {
                eligible: false,
                ..a
            })
            .collect();
        let out = cfg.announcements(&labels(&[("rack", "a")]), &none);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|p| p.routes.is_empty()));
    }

    #[test]
    fn eligibility_follows_the_traffic_policy() {
        use crate::{
            AddressType, Endpoint, EndpointConditions, EndpointSlice, Service, TrafficPolicy,
        };
        let pools = pools_of(&[crd("lan", &["198.51.100.0/24"])]);
        let svc = |name: &str, policy| Service {
            meta: Meta {
                name: name.into(),
                namespace: "default".into(),
                ..Meta::default()
            },
            external_traffic_policy: policy,
            ..Service::default()
        };
        let slice = |svc: &str, node: &str, ready: bool| EndpointSlice {
            meta: Meta {
                name: format!("{svc}-{node}"),
                namespace: "default".into(),
                ..Meta::default()
            },
            service_name: svc.into(),
            address_type: AddressType::IPv4,
            endpoints: vec![Endpoint {
                addresses: vec![ip("10.42.0.5")].into(),
                conditions: EndpointConditions {
                    ready,
                    serving: ready,
                    terminating: false,
                },
                node_name: Some(node.into()),
                zone_hints: None,
            }],
            ports: vec![],
        };
        let (web, local, shared) = (
            svc("web", TrafficPolicy::Cluster),
            svc("local", TrafficPolicy::Local),
            svc("shared", TrafficPolicy::Local),
        );
        let slices = [
            slice("local", "n1", true),
            slice("local", "n2", false),
            slice("shared", "n2", true),
        ];
        let a = [ip("198.51.100.1")];
        let b = [ip("198.51.100.2")];
        let outside = [ip("192.0.2.1")];
        let services: Vec<(&Service, &[IpAddr])> =
            vec![(&web, &a), (&local, &b), (&shared, &b), (&web, &outside)];
        let got = |node: &str| -> Vec<(String, bool)> {
            eligible_addresses(node, &services, &slices, &pools)
                .into_iter()
                .map(|a| (a.ip.to_string(), a.eligible))
                .collect()
        };
        // n1: local has an endpoint, shared not: the shared address is not eligible.
        assert_eq!(
            got("n1"),
            [
                ("198.51.100.1".into(), true),
                ("198.51.100.2".into(), false)
            ]
        );
        // n2: local's endpoint there is not ready.
        assert_eq!(got("n2")[1], ("198.51.100.2".into(), false));
        let only_local: Vec<(&Service, &[IpAddr])> = vec![(&local, &b)];
        assert!(eligible_addresses("n1", &only_local, &slices, &pools)[0].eligible);
        assert!(!eligible_addresses("n3", &only_local, &slices, &pools)[0].eligible);
    }

    #[test]
    fn one_prefix_merges_its_advertisements() {
        let pools = pools_of(&[crd("lan", &["198.51.100.0/24"])]);
        let mut a = adv("a");
        a.communities = vec!["1:1".into()];
        a.local_pref = Some(100);
        let mut b = adv("b");
        b.communities = vec!["2:2".into(), "1:1".into()];
        b.local_pref = Some(200);
        let (cfg, errs) = load(
            &pools,
            &BgpInputs {
                peers: &[peer("r", "10.0.0.1")],
                advertisements: &[a, b],
                ..BgpInputs::default()
            },
        );
        assert_eq!(errs.len(), 1, "{:#?}", texts(&errs));
        assert_eq!(errs[0].severity, Severity::Warning);
        assert!(errs[0].message.contains("LOCAL_PREF 200"), "{}", errs[0]);
        let out = cfg.announcements(
            &BTreeMap::new(),
            &[LbAddress {
                ip: ip("198.51.100.1"),
                pool: "lan".into(),
                eligible: true,
            }],
        );
        assert_eq!(
            out[0].routes,
            vec![Route {
                prefix: net("198.51.100.1/32"),
                local_pref: Some(200),
                communities: vec![(1 << 16) | 1, (2 << 16) | 2],
                large_communities: vec![],
            }]
        );
    }

    #[test]
    fn values() {
        assert_eq!(
            parse_community("65535:65282"),
            Ok(Community::Standard(0xffff_ff02))
        );
        assert_eq!(
            parse_community("large:1:2:3"),
            Ok(Community::Large([1, 2, 3]))
        );
        assert_eq!(
            parse_community("large:4294967295:0:1").map(|c| c.to_string()),
            Ok("large:4294967295:0:1".into())
        );
        assert_eq!(Community::Standard(0xffff_ff02).to_string(), "65535:65282");
        assert!(matches!(
            parse_community("65536:1"),
            Err(CommunityError::Value(_))
        ));
        assert!(matches!(
            parse_community("1:x"),
            Err(CommunityError::Value(_))
        ));
        assert!(matches!(
            parse_community("big:1:2:3"),
            Err(CommunityError::Value(_))
        ));
        assert!(matches!(
            parse_community("large:1:4294967296:3"),
            Err(CommunityError::Value(_))
        ));
        assert_eq!(parse_community("no-export"), Err(CommunityError::Format));
        assert_eq!(parse_community("a:b"), Err(CommunityError::Format));

        let d = |s: &str| parse_go_duration(s);
        assert_eq!(d("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(d("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(d("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(d("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(d("0"), Ok(Duration::ZERO));
        for bad in ["", "90", "-3s", "3x", "s", "1..5s"] {
            assert!(d(bad).is_err(), "{bad}");
        }

        let r = |s: &str| shortest_prefix_in(&crate::pools::parse_address_entry(s).unwrap());
        assert_eq!(r("10.0.0.0/24"), 24);
        assert_eq!(r("10.0.0.5-10.0.0.9"), 31);
        assert_eq!(r("10.0.0.1-10.0.0.254"), 26);
        assert_eq!(r("0.0.0.0/0"), 0);
        assert_eq!(r("::/0"), 0);
        assert_eq!(r("fd00::/120"), 120);
        assert_eq!(r("fd00::1-fd00::1"), 128);
        assert_eq!(aggregate(ip("10.1.2.3"), 8), Some(net("10.0.0.0/8")));
        assert_eq!(aggregate(ip("10.1.2.3"), 33), None);
    }

    #[test]
    fn load_is_order_independent() {
        let pools = pools_of(&[crd("lan", &["198.51.100.0/24"])]);
        let peers = vec![
            peer("b", "10.0.0.2"),
            peer("a", "10.0.0.1"),
            peer("a", "10.0.0.3"),
        ];
        let advs = vec![adv("y"), adv("x")];
        let run = |peers: &[BgpPeerCr], advs: &[BgpAdvertisementCr]| {
            let (c, mut e) = load(
                &pools,
                &BgpInputs {
                    peers,
                    advertisements: advs,
                    ..BgpInputs::default()
                },
            );
            e.sort_by_key(|e| e.to_string());
            (c, e)
        };
        let mut rp = peers.clone();
        rp.reverse();
        let mut ra = advs.clone();
        ra.reverse();
        assert_eq!(run(&peers, &advs), run(&rp, &ra));
    }

    proptest! {
        /// The decision against a direct reading of the rules: a peer is in the output iff
        /// its nodeSelectors select the node; an address's routes to a peer are exactly the
        /// aggregates of the advertisements that cover its pool and select node and peer; no
        /// route covers an address that is not eligible unless an eligible one shares it.
        #[test]
        fn announcements_follow_the_rules(
            node_rack in 0u8..3,
            peer_racks in proptest::collection::vec(proptest::option::of(0u8..3), 1..4),
            advs in proptest::collection::vec(
                (0usize..3, proptest::option::of(0u8..3), proptest::option::of(0usize..4), 24u8..=32, 0u32..3),
                0..5,
            ),
            addrs in proptest::collection::vec((0usize..3, 0u8..=255, any::<bool>()), 0..12),
        ) {
            let pool_names = ["p0", "p1", "p2"];
            let pools = pools_of(&[
                crd("p0", &["198.51.100.0/24"]),
                crd("p1", &["203.0.113.0/24"]),
                crd("p2", &["192.0.2.0/24"]),
            ]);
            let peers: Vec<BgpPeerCr> = peer_racks.iter().enumerate().map(|(i, rack)| {
                let mut p = peer(&format!("r{i}"), &format!("10.0.0.{}", i + 1));
                p.node_selectors = rack.iter().map(|r| sel(&[("rack", &r.to_string())])).collect();
                p
            }).collect();
            let advs_cr: Vec<BgpAdvertisementCr> = advs.iter().enumerate().map(|(i, (pool, rack, peer, agg, lp))| {
                let mut a = adv(&format!("a{i}"));
                a.ip_address_pools = vec![pool_names[*pool].to_string()];
                a.node_selectors = rack.iter().map(|r| sel(&[("rack", &r.to_string())])).collect();
                a.peers = peer.iter().map(|p| format!("r{p}")).collect();
                a.aggregation_length = Some(i64::from(*agg));
                a.local_pref = Some(u64::from(*lp));
                a
            }).collect();
            let (cfg, _) = load(&pools, &BgpInputs { peers: &peers, advertisements: &advs_cr, ..BgpInputs::default() });
            let node = labels(&[("rack", &node_rack.to_string())]);
            let lbs: Vec<LbAddress> = addrs.iter().map(|(pool, last, eligible)| {
                let base = ["198.51.100", "203.0.113", "192.0.2"][*pool];
                LbAddress { ip: ip(&format!("{base}.{last}")), pool: pool_names[*pool].into(), eligible: *eligible }
            }).collect();
            let out = cfg.announcements(&node, &lbs);
            // Peers: exactly those selecting the node.
            let expected_peers: Vec<String> = peer_racks.iter().enumerate()
                .filter(|(_, r)| r.is_none_or(|r| r == node_rack))
                .map(|(i, _)| format!("r{i}")).collect();
            let got_peers: Vec<String> = out.iter().map(|p| p.peer.clone()).collect();
            prop_assert_eq!(&got_peers, &expected_peers);
            for pr in &out {
                let prefixes: BTreeSet<IpNet> = pr.routes.iter().map(|r| r.prefix).collect();
                prop_assert_eq!(prefixes.len(), pr.routes.len(), "one route per prefix");
                // Every route comes from some eligible address through a matching advertisement.
                let mut expected: BTreeSet<IpNet> = BTreeSet::new();
                for a in lbs.iter().filter(|a| a.eligible) {
                    for (i, (pool, rack, peer, agg, _)) in advs.iter().enumerate() {
                        let covers = pool_names[*pool] == a.pool;
                        let node_ok = rack.is_none_or(|r| r == node_rack);
                        let peer_ok = peer.is_none_or(|p| pr.peer == format!("r{p}"));
                        if covers && node_ok && peer_ok {
                            let want = aggregate(a.ip, *agg).unwrap();
                            prop_assert!(prefixes.contains(&want), "a{} for {} missing", i, a.ip);
                            expected.insert(want);
                        }
                    }
                }
                prop_assert_eq!(&prefixes, &expected);
                // An ineligible address is only covered by an aggregate an eligible one made.
                for a in lbs.iter().filter(|a| !a.eligible) {
                    for r in &pr.routes {
                        if r.prefix.contains(&a.ip) {
                            prop_assert!(lbs.iter().any(|e| e.eligible && r.prefix.contains(&e.ip)));
                        }
                    }
                }
            }
        }
    }
}
