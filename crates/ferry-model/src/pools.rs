//! LoadBalancer address pools: MetalLB's configuration, both formats, as one validated model.
//!
//! ferry reads a MetalLB user's configuration as it is:
//!
//! - the legacy ConfigMap `metallb-system/config` (MetalLB up to 0.12), whose key `config`
//!   holds YAML with an `address-pools:` list of `{name, protocol: layer2|bgp, addresses,
//!   auto-assign, avoid-buggy-ips}`; `bgp` pools are kept with [`PoolProtocol::Bgp`], and
//!   `peers`, `bgp-communities`, `bfd-profiles` and the pools' `bgp-advertisements` are read by
//!   [`crate::bgp::load`]. Legacy `layer2` pools are announced as if an L2Advertisement named
//!   them;
//! - `metallb.io/v1beta1` [`IpAddressPool`]s and [`L2Advertisement`]s (in any namespace).
//!
//! [`load`] turns them into a [`PoolConfig`] plus a list of [`PoolError`]s (errors: the pool or
//! object was dropped; warnings: something was ignored). A bad pool never takes down the others:
//!
//! - an address that is neither a CIDR (`192.168.2.0/28`, `fd00::/120`) nor a range
//!   (`192.168.2.200-192.168.2.225`, same family, start <= end), an empty address list, or two
//!   entries of one pool that overlap drop that pool;
//! - pool names are unique across both formats: the first one (legacy pools first, then
//!   IPAddressPools by namespace/name) is kept, later ones are dropped;
//! - two pools sharing any address: the one whose name sorts first is kept, the other dropped,
//!   and the error names both.
//!
//! Addresses of a pool are kept as sorted, non-overlapping [`IpRange`]s (IPv4 first) and never
//! materialized (a pool may be an IPv6 /64): [`Pool::addresses`] iterates them lowest first,
//! skipping `.0` and `.255` IPv4 addresses when the pool avoids "buggy" IPs (MetalLB's rule:
//! any IPv4 address whose last byte is 0 or 255, whatever the prefix).
//!
//! Everything here is pure: text and objects in, model out.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use serde_json::Value;

type Mapping = serde_json::Map<String, Value>;

use crate::cidr::{from_u128, to_u128, Cidr};
use crate::objects::{
    ConfigMap, IpAddressPool, L2Advertisement, LabelSelector, ObjectRef, ServiceAllocation,
};

/// Namespace of MetalLB's legacy ConfigMap.
pub const LEGACY_NAMESPACE: &str = "metallb-system";
/// Name of MetalLB's legacy ConfigMap.
pub const LEGACY_NAME: &str = "config";
/// Key of the legacy ConfigMap holding the YAML configuration.
pub const LEGACY_KEY: &str = "config";

/// Kubernetes sets this label on every namespace to the namespace's name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

// ---------------------------------------------------------------------------------------------
// Addresses

/// An inclusive range of addresses of one family, `first <= last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpRange {
    first: IpAddr,
    last: IpAddr,
}

impl IpRange {
    /// None when the families differ or `first > last`.
    pub fn new(first: IpAddr, last: IpAddr) -> Option<IpRange> {
        (first.is_ipv4() == last.is_ipv4() && to_u128(first) <= to_u128(last))
            .then_some(IpRange { first, last })
    }
    pub fn from_cidr(c: &Cidr) -> IpRange {
        let first = c.network();
        let max = if c.is_ipv4() { 32u32 } else { 128 };
        let host_bits = max - u32::from(c.prefix_len());
        let host_mask = if host_bits >= 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        };
        IpRange {
            first,
            last: from_u128(to_u128(first) | host_mask, c.is_ipv4()),
        }
    }
    pub fn first(&self) -> IpAddr {
        self.first
    }
    pub fn last(&self) -> IpAddr {
        self.last
    }
    pub fn is_ipv4(&self) -> bool {
        self.first.is_ipv4()
    }
    fn lo(&self) -> u128 {
        to_u128(self.first)
    }
    fn hi(&self) -> u128 {
        to_u128(self.last)
    }
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.is_ipv4() && (self.lo()..=self.hi()).contains(&to_u128(ip))
    }
    pub fn overlaps(&self, other: &IpRange) -> bool {
        self.is_ipv4() == other.is_ipv4() && self.lo() <= other.hi() && other.lo() <= self.hi()
    }
    /// Number of addresses, saturating at u128::MAX.
    pub fn size(&self) -> u128 {
        (self.hi() - self.lo()).saturating_add(1)
    }
    /// The prefix covering exactly this range, if there is one.
    pub fn as_cidr(&self) -> Option<Cidr> {
        let max = if self.is_ipv4() { 32u32 } else { 128 };
        let span = self.hi() - self.lo(); // size - 1
        let host_bits = 128 - span.leading_zeros();
        let aligned = span.count_ones() == host_bits // span is 2^k - 1
            && (host_bits == 128 || self.lo() & ((1u128 << host_bits) - 1) == 0);
        if !aligned || host_bits > max {
            return None;
        }
        Cidr::new(self.first, (max - host_bits) as u8)
    }
}

impl fmt::Display for IpRange {
    /// `192.168.2.0/28` when the range is a prefix, else `192.168.2.200-192.168.2.225`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.as_cidr() {
            Some(c) => write!(f, "{c}"),
            None => write!(f, "{}-{}", self.first, self.last),
        }
    }
}

/// Whether MetalLB's avoid-buggy-ips skips this address: IPv4 ending in .0 or .255.
pub fn is_buggy_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => matches!(v4.octets()[3], 0 | 255),
        IpAddr::V6(_) => false,
    }
}

/// The block of addresses no host can be given that `ip` falls in, as (first, last), if any:
/// IPv4 0.0.0.0/8 ("this network"), loopback, link-local, multicast, reserved and broadcast
/// (224.0.0.0-255.255.255.255); IPv6 unspecified, loopback, link-local and multicast. Never
/// handed out, whatever the pool says (a pool of 0.0.0.0/0 starts at 1.0.0.0).
pub fn unassignable_block(ip: IpAddr) -> Option<(IpAddr, IpAddr)> {
    use std::net::{Ipv4Addr, Ipv6Addr};
    let v4 = |a: [u8; 4], b: [u8; 4]| Some((Ipv4Addr::from(a).into(), Ipv4Addr::from(b).into()));
    match ip {
        IpAddr::V4(a) => match a.octets() {
            [0, ..] => v4([0, 0, 0, 0], [0, 255, 255, 255]),
            [127, ..] => v4([127, 0, 0, 0], [127, 255, 255, 255]),
            [169, 254, ..] => v4([169, 254, 0, 0], [169, 254, 255, 255]),
            [224..=255, ..] => v4([224, 0, 0, 0], [255, 255, 255, 255]),
            _ => None,
        },
        IpAddr::V6(a) => {
            let x = u128::from(a);
            let block = |first: u128, last: u128| {
                Some((Ipv6Addr::from(first).into(), Ipv6Addr::from(last).into()))
            };
            if x <= 1 {
                block(0, 1)
            } else if a.segments()[0] & 0xffc0 == 0xfe80 {
                block(0xfe80 << 112, (0xfebf << 112) | ((1u128 << 112) - 1))
            } else if a.segments()[0] & 0xff00 == 0xff00 {
                block(0xff00 << 112, u128::MAX)
            } else {
                None
            }
        }
    }
}

/// One entry of a pool's address list: `a.b.c.d/len`, `x::/len` or `first-last`.
/// The error is a complete sentence naming the entry.
pub fn parse_address_entry(s: &str) -> Result<IpRange, String> {
    let t = s.trim();
    if let Some((a, b)) = t.split_once('-') {
        let bad = |why: String| format!("{s:?} is not an IP range: {why}");
        let (a, b) = (a.trim(), b.trim());
        let first: IpAddr = a
            .parse()
            .map_err(|_| bad(format!("{a:?} is not an IP address")))?;
        let last: IpAddr = b
            .parse()
            .map_err(|_| bad(format!("{b:?} is not an IP address")))?;
        if first.is_ipv4() != last.is_ipv4() {
            return Err(bad("start and end are of different IP families".into()));
        }
        return IpRange::new(first, last)
            .ok_or_else(|| bad(format!("start {first} is after end {last}")));
    }
    if t.contains('/') {
        return t
            .parse::<Cidr>()
            .map(|c| IpRange::from_cidr(&c))
            .map_err(|e| format!("{s:?} is not a CIDR: {}", e.reason));
    }
    if let Ok(ip) = t.parse::<IpAddr>() {
        let len = if ip.is_ipv4() { 32 } else { 128 };
        return Err(format!(
            "{s:?} is not a CIDR or an IP range (for a single address write {ip}/{len})"
        ));
    }
    Err(format!(
        "{s:?} is not a CIDR (192.168.2.0/28) or an IP range (192.168.2.200-192.168.2.225)"
    ))
}

// ---------------------------------------------------------------------------------------------
// The model

/// The announcement protocol of a legacy ConfigMap pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PoolProtocol {
    Layer2,
    Bgp,
}

/// Where a pool was defined.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PoolSource {
    /// The legacy ConfigMap (its namespace/name).
    ConfigMap(ObjectRef),
    IpAddressPool(ObjectRef),
}

impl fmt::Display for PoolSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolSource::ConfigMap(r) => write!(f, "ConfigMap {r}"),
            PoolSource::IpAddressPool(r) => write!(f, "IPAddressPool {r}"),
        }
    }
}

/// Why a pool does not admit a service (its spec.serviceAllocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NotAdmitted {
    /// The namespace is neither listed nor selected.
    Namespace,
    /// The service's labels match none of the serviceSelectors.
    ServiceLabels,
}

/// A validated address pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    pub source: PoolSource,
    /// `layer2`/`bgp` for legacy pools; None for IPAddressPools (advertisements decide).
    pub protocol: Option<PoolProtocol>,
    /// Sorted (IPv4 first, ascending) and non-overlapping; never empty.
    pub ranges: Vec<IpRange>,
    pub auto_assign: bool,
    pub avoid_buggy_ips: bool,
    /// spec.serviceAllocation, with a priority of 0 or less read as unset (as MetalLB does).
    pub allocation: Option<ServiceAllocation>,
    /// The IPAddressPool's labels (for ipAddressPoolSelectors); empty for legacy pools.
    pub labels: BTreeMap<String, String>,
}

impl Pool {
    /// Whether `ip` is inside one of the pool's ranges (assignable or not).
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.ranges.iter().any(|r| r.contains(ip))
    }
    /// Whether `ip` may be handed out: inside the pool and not avoided.
    pub fn is_assignable(&self, ip: IpAddr) -> bool {
        self.contains(ip)
            && !(self.avoid_buggy_ips && is_buggy_ip(ip))
            && unassignable_block(ip).is_none()
    }
    /// Every assignable address, IPv4 first, lowest first. Lazy: pools may be huge.
    pub fn addresses(&self) -> Addresses<'_> {
        Addresses {
            ranges: &self.ranges,
            idx: 0,
            next: None,
            avoid_buggy: self.avoid_buggy_ips,
            family: None,
        }
    }
    /// The assignable addresses of one family, lowest first.
    pub fn addresses_of(&self, ipv6: bool) -> Addresses<'_> {
        Addresses {
            family: Some(ipv6),
            ..self.addresses()
        }
    }
    /// Whether the pool has an assignable address of this family.
    pub fn has_family(&self, ipv6: bool) -> bool {
        self.addresses_of(ipv6).next().is_some()
    }
    /// The priority for automatic allocation (lower first); None is lowest.
    pub fn priority(&self) -> Option<i32> {
        self.allocation.as_ref().and_then(|a| a.priority)
    }
    /// Whether spec.serviceAllocation restricts the pool to some namespaces or services.
    pub fn is_dedicated(&self) -> bool {
        self.allocation.as_ref().is_some_and(|a| {
            !a.namespaces.is_empty()
                || !a.namespace_selectors.is_empty()
                || !a.service_selectors.is_empty()
        })
    }
    /// Whether the pool may serve a service in `namespace` (whose labels are `namespace_labels`)
    /// with labels `service_labels`.
    pub fn admits(
        &self,
        namespace: &str,
        namespace_labels: &BTreeMap<String, String>,
        service_labels: &BTreeMap<String, String>,
    ) -> Result<(), NotAdmitted> {
        let Some(a) = &self.allocation else {
            return Ok(());
        };
        let ns_restricted = !a.namespaces.is_empty() || !a.namespace_selectors.is_empty();
        if ns_restricted
            && !a.namespaces.iter().any(|n| n == namespace)
            && !a
                .namespace_selectors
                .iter()
                .any(|s| s.matches(namespace_labels))
        {
            return Err(NotAdmitted::Namespace);
        }
        if !a.service_selectors.is_empty()
            && !a
                .service_selectors
                .iter()
                .any(|s| s.matches(service_labels))
        {
            return Err(NotAdmitted::ServiceLabels);
        }
        Ok(())
    }
}

/// Iterator over a pool's assignable addresses (see [`Pool::addresses`]).
#[derive(Debug, Clone)]
pub struct Addresses<'a> {
    ranges: &'a [IpRange],
    idx: usize,
    /// Next address inside `ranges[idx]`; None: its first.
    next: Option<u128>,
    avoid_buggy: bool,
    /// Some(ipv6): only that family.
    family: Option<bool>,
}

impl Iterator for Addresses<'_> {
    type Item = IpAddr;
    fn next(&mut self) -> Option<IpAddr> {
        loop {
            let r = self.ranges.get(self.idx)?;
            if self.family.is_some_and(|v6| v6 == r.is_ipv4()) {
                self.idx += 1;
                self.next = None;
                continue;
            }
            let cur = self.next.unwrap_or(r.lo());
            if cur >= r.hi() {
                self.idx += 1;
                self.next = None;
            } else {
                self.next = Some(cur + 1);
            }
            let ip = from_u128(cur, r.is_ipv4());
            if let Some((_, last)) = unassignable_block(ip) {
                // Skip the whole block at once (it may hold millions of addresses).
                let end = to_u128(last);
                if end >= r.hi() {
                    self.idx += 1;
                    self.next = None;
                } else {
                    self.next = Some(end + 1);
                }
                continue;
            }
            if self.avoid_buggy && is_buggy_ip(ip) {
                continue;
            }
            return Some(ip);
        }
    }
}

/// Which pools are announced in layer 2, from which nodes, on which interfaces: an
/// L2Advertisement with its pool selection resolved, or the implicit one of a legacy `layer2`
/// pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L2Announcement {
    /// "L2Advertisement metallb-system/l2" or "ConfigMap metallb-system/config".
    pub source: String,
    /// Names of the pools it covers, sorted.
    pub pools: Vec<String>,
    /// Nodes it applies to: any selector matching; empty: every node.
    pub node_selectors: Vec<LabelSelector>,
    /// Interfaces to announce on; empty: no restriction (the default interface).
    pub interfaces: Vec<String>,
}

impl L2Announcement {
    pub fn selects_node(&self, node_labels: &BTreeMap<String, String>) -> bool {
        self.node_selectors.is_empty() || self.node_selectors.iter().any(|s| s.matches(node_labels))
    }
}

/// The validated pools and layer-2 announcements.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolConfig {
    /// Sorted by name; names unique, no two pools share an address.
    pub pools: Vec<Pool>,
    pub l2: Vec<L2Announcement>,
}

impl PoolConfig {
    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }
    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.name == name)
    }
    /// The pool whose ranges contain `ip` (assignable or not: see [`Pool::is_assignable`]).
    pub fn pool_of(&self, ip: IpAddr) -> Option<&Pool> {
        self.pools.iter().find(|p| p.contains(ip))
    }
    /// Whether a node with `node_labels` announces addresses of `pool` in layer 2, and on which
    /// interfaces: None when no announcement covering the pool selects the node; Some(empty)
    /// for "no restriction" (the default interface); else the union of the interfaces named.
    pub fn l2_announcers(
        &self,
        pool: &str,
        node_labels: &BTreeMap<String, String>,
    ) -> Option<Vec<String>> {
        let mut any = false;
        let mut unrestricted = false;
        let mut interfaces = BTreeSet::new();
        for a in &self.l2 {
            if !a.pools.iter().any(|p| p == pool) || !a.selects_node(node_labels) {
                continue;
            }
            any = true;
            if a.interfaces.is_empty() {
                unrestricted = true;
            }
            interfaces.extend(a.interfaces.iter().cloned());
        }
        match (any, unrestricted) {
            (false, _) => None,
            (true, true) => Some(Vec::new()),
            (true, false) => Some(interfaces.into_iter().collect()),
        }
    }
}

/// How bad a [`PoolError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Something (a pool, an entry) was dropped.
    Error,
    /// Something was ignored; nothing dropped.
    Warning,
}

/// A problem in the configuration, naming the object and field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolError {
    pub severity: Severity,
    /// "IPAddressPool metallb-system/lan", "ConfigMap metallb-system/config", ...
    pub object: String,
    /// "spec.addresses[1]", "data[config].address-pools[0].protocol"; may be empty.
    pub field: String,
    pub message: String,
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.object, self.message)
        } else {
            write!(f, "{}: {}: {}", self.object, self.field, self.message)
        }
    }
}

impl std::error::Error for PoolError {}

/// `ranges` without the addresses in `holes`, each range split around them (ranges of
/// either family; holes of the other family are ignored).
pub fn split_around(ranges: impl IntoIterator<Item = IpRange>, holes: &[IpAddr]) -> Vec<IpRange> {
    let mut holes: Vec<IpAddr> = holes.to_vec();
    holes.sort_by_key(|ip| (ip.is_ipv6(), to_u128(*ip)));
    holes.dedup();
    let mut out = Vec::new();
    for r in ranges {
        let v4 = r.is_ipv4();
        let (mut lo, hi) = (r.lo(), r.hi());
        let inside: Vec<u128> = holes
            .iter()
            .filter(|h| h.is_ipv4() == v4)
            .map(|h| to_u128(*h))
            .filter(|h| (lo..=hi).contains(h))
            .collect();
        let mut done = false;
        for h in inside {
            if h > lo {
                out.push(IpRange {
                    first: from_u128(lo, v4),
                    last: from_u128(h - 1, v4),
                });
            }
            if h == hi {
                done = true;
                break;
            }
            lo = h + 1;
        }
        if !done {
            out.push(IpRange {
                first: from_u128(lo, v4),
                last: from_u128(hi, v4),
            });
        }
    }
    out
}

/// The pools without `holes` (the nodes' own addresses): a pool over the LAN never hands a
/// node's address to a Service (nobody could announce it). A pool left with no address is
/// dropped, with an error.
pub fn without_addresses(mut cfg: PoolConfig, holes: &[IpAddr]) -> (PoolConfig, Vec<PoolError>) {
    let mut errors = Vec::new();
    cfg.pools.retain_mut(|p| {
        let out = split_around(p.ranges.iter().copied(), holes);
        if out.is_empty() {
            errors.push(PoolError {
                severity: Severity::Error,
                object: p.source.to_string(),
                field: String::new(),
                message: format!(
                    "pool {:?} holds only node addresses: the pool is not used",
                    p.name
                ),
            });
            return false;
        }
        p.ranges = out;
        true
    });
    (cfg, errors)
}

/// Drops the pools that overlap a service CIDR, with an error each: an address there could be
/// a Service's cluster IP too, and traffic to it would reach the wrong Service. (MetalLB does
/// not know the service CIDR; kube-apiserver does, and so does ferry.)
pub fn without_service_cidrs(
    mut cfg: PoolConfig,
    service_cidrs: &[crate::cidr::Cidr],
) -> (PoolConfig, Vec<PoolError>) {
    let mut errors = Vec::new();
    cfg.pools.retain(|p| {
        let hit = service_cidrs.iter().find(|c| {
            let cr = IpRange::from_cidr(c);
            p.ranges.iter().any(|r| r.overlaps(&cr))
        });
        match hit {
            Some(c) => {
                errors.push(PoolError {
                    severity: Severity::Error,
                    object: p.source.to_string(),
                    field: String::new(),
                    message: format!(
                        "pool {:?} overlaps the service CIDR {c} (cluster IPs come from there): \
                         the pool is not used; give it addresses outside {c}",
                        p.name
                    ),
                });
                false
            }
            None => true,
        }
    });
    (cfg, errors)
}

// ---------------------------------------------------------------------------------------------
// Loading

/// A pool before the cross-pool checks, with the field each range came from.
struct Candidate {
    pool: Pool,
    /// Object description for messages.
    object: String,
    /// Field of the pool's name ("metadata.name", "data[config].address-pools[0].name").
    name_field: String,
    /// (range, field it was written in), in the order written.
    entries: Vec<(IpRange, String)>,
}

pub(crate) struct Report<'a> {
    pub(crate) out: &'a mut Vec<PoolError>,
    pub(crate) object: String,
}

impl Report<'_> {
    pub(crate) fn err(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.push(Severity::Error, field.into(), message.into());
    }
    pub(crate) fn warn(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.push(Severity::Warning, field.into(), message.into());
    }
    fn push(&mut self, severity: Severity, field: String, message: String) {
        self.out.push(PoolError {
            severity,
            object: self.object.clone(),
            field,
            message,
        });
    }
}

/// Builds the pool model from MetalLB's legacy ConfigMap (only `metallb-system/config` is
/// read; pass any ConfigMaps), IPAddressPools and L2Advertisements. Deterministic: the result
/// does not depend on the order of the inputs.
pub fn load(
    config_maps: &[ConfigMap],
    pools: &[IpAddressPool],
    l2: &[L2Advertisement],
) -> (PoolConfig, Vec<PoolError>) {
    let mut errors = Vec::new();
    let mut candidates = Vec::new();

    let mut legacy: Vec<&ConfigMap> = config_maps
        .iter()
        .filter(|c| c.meta.namespace == LEGACY_NAMESPACE && c.meta.name == LEGACY_NAME)
        .collect();
    legacy.sort_by(|a, b| a.data.cmp(&b.data));
    for cm in legacy {
        legacy_pools(cm, &mut candidates, &mut errors);
    }
    let mut crds: Vec<&IpAddressPool> = pools.iter().collect();
    crds.sort_by(|a, b| {
        (a.meta.object_ref(), &a.addresses).cmp(&(b.meta.object_ref(), &b.addresses))
    });
    for p in crds {
        if let Some(c) = crd_pool(p, &mut errors) {
            candidates.push(c);
        }
    }

    // Unique names: the first definition wins.
    let mut by_name: BTreeMap<String, Candidate> = BTreeMap::new();
    for c in candidates {
        if let Some(first) = by_name.get(&c.pool.name) {
            errors.push(PoolError {
                severity: Severity::Error,
                object: c.object.clone(),
                field: c.name_field.clone(),
                message: format!(
                    "duplicate pool name {:?} (also defined by {}): this one is dropped",
                    c.pool.name, first.object
                ),
            });
            continue;
        }
        by_name.insert(c.pool.name.clone(), c);
    }

    // No address in two pools: in name order, a pool overlapping a kept one is dropped. The
    // kept ranges are disjoint, so one ordered map finds a clash in O(log n).
    let mut kept: Vec<Candidate> = Vec::new();
    let mut taken: Disjoint<(usize, usize)> = Disjoint::default();
    for c in by_name.into_values() {
        let clash = c.entries.iter().find_map(|(r, field)| {
            taken.overlapping(r).map(|&(ki, ei)| {
                let k = &kept[ki];
                let (kr, kfield) = &k.entries[ei];
                (r, field, k, kr, kfield)
            })
        });
        if let Some((r, field, k, kr, kfield)) = clash {
            errors.push(PoolError {
                severity: Severity::Error,
                object: c.object.clone(),
                field: field.clone(),
                message: format!(
                    "{r} overlaps {kr} of pool {:?} ({}, {kfield}): pool {:?} is dropped",
                    k.pool.name, k.object, c.pool.name
                ),
            });
            continue;
        }
        for (ei, (r, _)) in c.entries.iter().enumerate() {
            taken.insert(r, (kept.len(), ei));
        }
        kept.push(c);
    }
    let pools: Vec<Pool> = kept.into_iter().map(|c| c.pool).collect();

    // Layer 2: legacy layer2 pools announce themselves everywhere.
    let mut announcements = Vec::new();
    for p in &pools {
        if let (PoolSource::ConfigMap(r), Some(PoolProtocol::Layer2)) = (&p.source, p.protocol) {
            announcements.push(L2Announcement {
                source: format!("ConfigMap {r}"),
                pools: vec![p.name.clone()],
                node_selectors: Vec::new(),
                interfaces: Vec::new(),
            });
        }
    }
    let mut advs: Vec<&L2Advertisement> = l2.iter().collect();
    advs.sort_by_key(|a| a.meta.object_ref());
    for adv in advs {
        let mut rep = Report {
            out: &mut errors,
            object: format!("L2Advertisement {}", adv.meta.object_ref()),
        };
        let mut names = BTreeSet::new();
        if adv.ip_address_pools.is_empty() && adv.ip_address_pool_selectors.is_empty() {
            // No selection: every pool (but legacy BGP pools, which are not layer-2 pools).
            names.extend(
                pools
                    .iter()
                    .filter(|p| p.protocol != Some(PoolProtocol::Bgp))
                    .map(|p| p.name.clone()),
            );
        } else {
            for (i, n) in adv.ip_address_pools.iter().enumerate() {
                if pools.iter().any(|p| &p.name == n) {
                    names.insert(n.clone());
                } else {
                    rep.warn(
                        format!("spec.ipAddressPools[{i}]"),
                        format!("no pool named {n:?}: ignored"),
                    );
                }
            }
            for p in &pools {
                if adv
                    .ip_address_pool_selectors
                    .iter()
                    .any(|s| s.matches(&p.labels))
                {
                    names.insert(p.name.clone());
                }
            }
        }
        let mut interfaces: Vec<String> = adv.interfaces.clone();
        interfaces.sort();
        interfaces.dedup();
        announcements.push(L2Announcement {
            source: rep.object.clone(),
            pools: names.into_iter().collect(),
            node_selectors: adv.node_selectors.clone(),
            interfaces,
        });
    }

    (
        PoolConfig {
            pools,
            l2: announcements,
        },
        errors,
    )
}

/// Parses the address list of a pool; None (after reporting) when one entry is bad, the list
/// is empty, or two entries overlap.
fn parse_entries(
    rep: &mut Report<'_>,
    field: &str,
    addresses: &[(String, String)],
) -> Option<Vec<(IpRange, String)>> {
    if addresses.is_empty() {
        rep.err(field, "required: at least one address (CIDR or range)");
        return None;
    }
    let mut ok = true;
    let mut entries: Vec<(IpRange, String)> = Vec::new();
    // The entries that overlapped nothing before them (disjoint): O(log n) per entry, so a
    // list of 50,000 /32s is read at once, not in seconds.
    let mut seen: Disjoint<usize> = Disjoint::default();
    for (text, f) in addresses {
        match parse_address_entry(text) {
            Ok(r) => {
                if let Some(&i) = seen.overlapping(&r) {
                    let (other, of) = &entries[i];
                    rep.err(f, format!("{r} overlaps {other} ({of})"));
                    ok = false;
                } else {
                    seen.insert(&r, entries.len());
                }
                entries.push((r, f.clone()));
            }
            Err(e) => {
                rep.err(f, e);
                ok = false;
            }
        }
    }
    ok.then_some(entries)
}

/// Disjoint ranges with a value each, ordered: which one overlaps a range, in O(log n).
struct Disjoint<T> {
    /// (IPv6?, first) -> (last, value).
    map: BTreeMap<(bool, u128), (u128, T)>,
}

impl<T> Default for Disjoint<T> {
    fn default() -> Self {
        Disjoint {
            map: BTreeMap::new(),
        }
    }
}

impl<T> Disjoint<T> {
    /// The value of a range overlapping `r`, if any. The ranges being disjoint, only the
    /// last one starting at or before `r`'s end can.
    fn overlapping(&self, r: &IpRange) -> Option<&T> {
        let v6 = !r.is_ipv4();
        let (&(fam, _), (hi, v)) = self.map.range(..=(v6, r.hi())).next_back()?;
        (fam == v6 && *hi >= r.lo()).then_some(v)
    }

    /// Adds `r`, which must overlap nothing already in.
    fn insert(&mut self, r: &IpRange, v: T) {
        self.map.insert((!r.is_ipv4(), r.lo()), (r.hi(), v));
    }
}

fn sorted_ranges(entries: &[(IpRange, String)]) -> Vec<IpRange> {
    let mut ranges: Vec<IpRange> = entries.iter().map(|(r, _)| *r).collect();
    ranges.sort_by_key(|r| (!r.is_ipv4(), r.lo()));
    ranges
}

fn crd_pool(p: &IpAddressPool, errors: &mut Vec<PoolError>) -> Option<Candidate> {
    let r = p.meta.object_ref();
    let mut rep = Report {
        out: errors,
        object: format!("IPAddressPool {r}"),
    };
    if p.meta.name.is_empty() {
        rep.err("metadata.name", "required");
        return None;
    }
    let addresses: Vec<(String, String)> = p
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| (a.clone(), format!("spec.addresses[{i}]")))
        .collect();
    let entries = parse_entries(&mut rep, "spec.addresses", &addresses)?;
    let allocation = p.service_allocation.clone().map(|mut a| {
        a.priority = a.priority.filter(|&n| n > 0);
        a
    });
    Some(Candidate {
        pool: Pool {
            name: p.meta.name.clone(),
            source: PoolSource::IpAddressPool(r),
            protocol: None,
            ranges: sorted_ranges(&entries),
            auto_assign: p.auto_assign,
            avoid_buggy_ips: p.avoid_buggy_ips,
            allocation,
            labels: p.meta.labels.clone(),
        },
        object: rep.object,
        name_field: "metadata.name".into(),
        entries,
    })
}

/// A short description of a YAML value for messages.
pub(crate) fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "a mapping".into(),
    }
}

/// The legacy ConfigMap's pools, appended to `out` in the order written.
fn legacy_pools(cm: &ConfigMap, out: &mut Vec<Candidate>, errors: &mut Vec<PoolError>) {
    let r = cm.meta.object_ref();
    let object = format!("ConfigMap {r}");
    let mut rep = Report {
        out: errors,
        object: object.clone(),
    };
    let base = format!("data[{LEGACY_KEY}]");
    let Some(text) = cm.data.get(LEGACY_KEY) else {
        rep.err(
            "data",
            format!("no key {LEGACY_KEY:?} (MetalLB's configuration): no pools read"),
        );
        return;
    };
    let root: Value = match crate::yaml::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            rep.err(base, format!("invalid YAML: {e}"));
            return;
        }
    };
    let root = &root;
    let empty = Mapping::new();
    let top = match root {
        Value::Null => &empty,
        Value::Object(m) => m,
        other => {
            rep.err(base, format!("must be a mapping, got {}", describe(other)));
            return;
        }
    };
    let mut items: &[Value] = &[];
    for (k, v) in top {
        let key = k.as_str();
        match key {
            "address-pools" => match v {
                Value::Array(s) => items = s,
                Value::Null => {}
                other => rep.err(
                    format!("{base}.address-pools"),
                    format!("must be a list, got {}", describe(other)),
                ),
            },
            // Read by crate::bgp::load.
            "peers" | "bgp-communities" | "bfd-profiles" => {}
            _ => rep.warn(
                base.clone(),
                format!(
                    "unknown key {} ignored",
                    describe(&Value::String(k.clone()))
                ),
            ),
        }
    }
    for (i, item) in items.iter().enumerate() {
        let pbase = format!("{base}.address-pools[{i}]");
        if let Some(c) = legacy_pool(&mut rep, &r, &pbase, item) {
            out.push(c);
        }
    }
}

fn legacy_pool(
    rep: &mut Report<'_>,
    cm: &ObjectRef,
    base: &str,
    item: &Value,
) -> Option<Candidate> {
    let Value::Object(m) = item else {
        rep.err(base, format!("must be a mapping, got {}", describe(item)));
        return None;
    };
    let mut ok = true;
    let mut name = None;
    let mut protocol = None;
    let mut protocol_given = false;
    let mut addresses: Option<Vec<(String, String)>> = None;
    let mut auto_assign = true;
    let mut avoid_buggy_ips = false;
    for (k, v) in m {
        let key = k.as_str();
        let field = format!("{base}.{key}");
        match key {
            "name" => match v {
                Value::String(s) if !s.is_empty() => name = Some(s.clone()),
                Value::String(_) | Value::Null => {}
                other => {
                    rep.err(field, format!("must be a string, got {}", describe(other)));
                    ok = false;
                }
            },
            "protocol" => {
                protocol_given |= !v.is_null();
                match v {
                    Value::String(s) if s == "layer2" => protocol = Some(PoolProtocol::Layer2),
                    Value::String(s) if s == "bgp" => protocol = Some(PoolProtocol::Bgp),
                    Value::Null => {}
                    other => {
                        rep.err(
                            field,
                            format!("must be layer2 or bgp, got {}", describe(other)),
                        );
                        ok = false;
                    }
                }
            }
            "addresses" => match v {
                Value::Array(s) => {
                    let mut list = Vec::new();
                    for (j, a) in s.iter().enumerate() {
                        let f = format!("{field}[{j}]");
                        match a {
                            Value::String(s) => list.push((s.clone(), f)),
                            other => {
                                rep.err(f, format!("must be a string, got {}", describe(other)));
                                ok = false;
                            }
                        }
                    }
                    addresses = Some(list);
                }
                Value::Null => {}
                other => {
                    rep.err(field, format!("must be a list, got {}", describe(other)));
                    ok = false;
                }
            },
            "auto-assign" | "avoid-buggy-ips" => match v {
                Value::Bool(b) if key == "auto-assign" => auto_assign = *b,
                Value::Bool(b) => avoid_buggy_ips = *b,
                Value::Null => {}
                other => {
                    rep.err(
                        field,
                        format!("must be true or false, got {}", describe(other)),
                    );
                    ok = false;
                }
            },
            // Read by crate::bgp::load.
            "bgp-advertisements" => {}
            _ => rep.warn(
                base,
                format!(
                    "unknown key {} ignored",
                    describe(&Value::String(k.clone()))
                ),
            ),
        }
    }
    if name.is_none() {
        rep.err(format!("{base}.name"), "required");
        ok = false;
    }
    if !protocol_given {
        rep.err(format!("{base}.protocol"), "required: layer2 or bgp");
        ok = false;
    }
    let entries = match addresses {
        Some(list) => parse_entries(rep, &format!("{base}.addresses"), &list),
        None => {
            rep.err(
                format!("{base}.addresses"),
                "required: at least one address (CIDR or range)",
            );
            None
        }
    };
    let (Some(name), Some(entries), true) = (name, entries, ok) else {
        return None;
    };
    Some(Candidate {
        pool: Pool {
            name,
            source: PoolSource::ConfigMap(cm.clone()),
            protocol,
            ranges: sorted_ranges(&entries),
            auto_assign,
            avoid_buggy_ips,
            allocation: None,
            labels: BTreeMap::new(),
        },
        object: rep.object.clone(),
        name_field: format!("{base}.name"),
        entries,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::objects::{LabelSelectorRequirement, Meta, SelectorOperator};

    #[test]
    fn many_entries_are_checked_for_overlaps_in_n_log_n() {
        // 50,000 /32s and one overlapping range at the end: quick, and the overlap found.
        let mut text =
            String::from("address-pools:\n- name: big\n  protocol: layer2\n  addresses:\n");
        for i in 0..50_000u32 {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i * 2);
            text.push_str(&format!("  - {ip}/32\n"));
        }
        text.push_str("  - 10.0.0.4-10.0.0.5\n");
        let cm = legacy(&text);
        let (cfg, errs) = load(&[cm], &[], &[]);
        assert!(cfg.pools.is_empty());
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].message.contains("10.0.0.4/31 overlaps 10.0.0.4/32"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn node_addresses_are_never_in_a_pool() {
        let cm = legacy("address-pools:\n- name: lan\n  protocol: layer2\n  addresses: [192.168.50.0/29]\n- name: one\n  protocol: layer2\n  addresses: [192.168.50.20/32]\n");
        let (cfg, errs) = load(&[cm], &[], &[]);
        assert!(errs.is_empty(), "{errs:?}");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let (cfg, errs) = without_addresses(
            cfg,
            &[
                ip("192.168.50.1"),
                ip("192.168.50.7"),
                ip("192.168.50.20"),
                ip("fd00::1"),
            ],
        );
        assert_eq!(cfg.pools.len(), 1);
        let ranges: Vec<String> = cfg.pools[0].ranges.iter().map(|r| r.to_string()).collect();
        assert_eq!(ranges, ["192.168.50.0/32", "192.168.50.2-192.168.50.6"]);
        assert!(!cfg.pools[0].contains(ip("192.168.50.1")));
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0]
                .message
                .contains("\"one\" holds only node addresses"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn pools_overlapping_the_service_cidr_are_refused() {
        let cm = legacy("address-pools:\n- name: bad\n  protocol: layer2\n  addresses: [10.43.255.0/24]\n- name: good\n  protocol: layer2\n  addresses: [192.168.2.200/29]\n");
        let (cfg, errs) = load(&[cm], &[], &[]);
        assert!(errs.is_empty(), "{errs:?}");
        let (cfg, errs) = without_service_cidrs(cfg, &["10.43.0.0/16".parse().unwrap()]);
        let names: Vec<&str> = cfg.pools.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["good"]);
        assert_eq!(errs.len(), 1);
        assert_eq!(
            errs[0].to_string(),
            "ConfigMap metallb-system/config: pool \"bad\" overlaps the service CIDR 10.43.0.0/16 (cluster IPs come from there): the pool is not used; give it addresses outside 10.43.0.0/16"
        );
    }
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    pub(crate) fn legacy(config: &str) -> ConfigMap {
        ConfigMap {
            meta: Meta {
                name: "config".into(),
                namespace: "metallb-system".into(),
                ..Meta::default()
            },
            data: [("config".to_string(), config.to_string())].into(),
        }
    }

    pub(crate) fn crd(name: &str, addresses: &[&str]) -> IpAddressPool {
        IpAddressPool {
            meta: Meta {
                name: name.into(),
                namespace: "metallb-system".into(),
                ..Meta::default()
            },
            addresses: addresses.iter().map(|s| s.to_string()).collect(),
            auto_assign: true,
            avoid_buggy_ips: false,
            service_allocation: None,
        }
    }

    const SEED: &str = "address-pools:\n- name: default\n  protocol: layer2\n  addresses:\n  \
                        - 192.168.2.200-192.168.2.225\n";

    #[test]
    fn seed_configmap() {
        let (cfg, errs) = load(&[legacy(SEED)], &[], &[]);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(cfg.pools.len(), 1);
        let p = &cfg.pools[0];
        assert_eq!(p.name, "default");
        assert_eq!(p.protocol, Some(PoolProtocol::Layer2));
        assert!(p.auto_assign && !p.avoid_buggy_ips);
        assert_eq!(p.addresses().next(), Some(ip("192.168.2.200")));
        assert_eq!(p.addresses().count(), 26);
        assert_eq!(p.addresses().last(), Some(ip("192.168.2.225")));
        assert!(p.contains(ip("192.168.2.210")) && !p.contains(ip("192.168.2.226")));
        assert_eq!(
            cfg.pool_of(ip("192.168.2.225")).map(|p| &p.name[..]),
            Some("default")
        );
        assert!(cfg.pool_of(ip("192.168.2.199")).is_none());
        // Legacy layer2 pools announce from every node on the default interface.
        assert_eq!(cfg.l2_announcers("default", &BTreeMap::new()), Some(vec![]));
        assert_eq!(p.source.to_string(), "ConfigMap metallb-system/config");
        // Other ConfigMaps are not MetalLB's.
        let mut other = legacy(SEED);
        other.meta.namespace = "default".into();
        assert!(load(&[other], &[], &[]).0.is_empty());
    }

    #[test]
    fn crd_equivalent() {
        let (cfg, errs) = load(
            &[],
            &[crd("default", &["192.168.2.200-192.168.2.225"])],
            &[],
        );
        assert!(errs.is_empty(), "{errs:?}");
        let p = &cfg.pools[0];
        assert_eq!(p.protocol, None);
        assert_eq!(p.addresses().next(), Some(ip("192.168.2.200")));
        // No L2Advertisement: not announced.
        assert_eq!(cfg.l2_announcers("default", &BTreeMap::new()), None);
    }

    #[test]
    fn address_entries() {
        let r = parse_address_entry("192.168.2.0/28").unwrap();
        assert_eq!(
            (r.first(), r.last()),
            (ip("192.168.2.0"), ip("192.168.2.15"))
        );
        assert_eq!(r.to_string(), "192.168.2.0/28");
        let r = parse_address_entry(" 10.0.0.5 - 10.0.0.9 ").unwrap();
        assert_eq!(r.to_string(), "10.0.0.5-10.0.0.9");
        assert_eq!(r.size(), 5);
        let r = parse_address_entry("fd00::10-fd00::1f").unwrap();
        assert_eq!(r.to_string(), "fd00::10/124");
        let r = parse_address_entry("fd00:1::/64").unwrap();
        assert_eq!(r.size(), 1 << 64);
        let all = parse_address_entry("::/0").unwrap();
        assert_eq!(all.size(), u128::MAX);
        assert_eq!(all.to_string(), "::/0");
        assert_eq!(parse_address_entry("0.0.0.0/0").unwrap().size(), 1 << 32);
        // Host bits are cleared, as Go's ParseCIDR does.
        assert_eq!(
            parse_address_entry("192.168.2.7/24").unwrap().to_string(),
            "192.168.2.0/24"
        );
        for (bad, msg) in [
            (
                "192.168.2.300-192.168.2.310",
                "\"192.168.2.300-192.168.2.310\" is not an IP range: \"192.168.2.300\" is not an IP address",
            ),
            ("10.0.0.9-10.0.0.5", "start 10.0.0.9 is after end 10.0.0.5"),
            ("10.0.0.1-fd00::1", "different IP families"),
            ("10.0.0.0/33", "is not a CIDR: prefix length too long"),
            ("10.0.0.1", "for a single address write 10.0.0.1/32"),
            ("fd00::1", "write fd00::1/128"),
            ("", "is not a CIDR"),
            ("pool", "is not a CIDR"),
        ] {
            let e = parse_address_entry(bad).unwrap_err();
            assert!(e.contains(msg), "{bad}: {e}");
        }
    }

    #[test]
    fn unassignable_addresses_are_never_handed_out() {
        let cm = legacy(
            "address-pools:\n- name: p\n  protocol: layer2\n  \
             addresses: [0.0.0.0/0, '::/126', 'fe80::/120', 'ff02::/120', 'fd00::/127']\n",
        );
        let (cfg, errs) = load(&[cm], &[], &[]);
        assert!(errs.is_empty(), "{errs:?}");
        let p = &cfg.pools[0];
        // 0.0.0.0/0 starts at 1.0.0.0 (0.0.0.0/8 skipped at once, not one by one).
        let v4: Vec<IpAddr> = p.addresses_of(false).take(2).collect();
        assert_eq!(v4, vec![ip("1.0.0.0"), ip("1.0.0.1")]);
        for bad in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "169.254.1.1",
            "224.0.0.1",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            assert!(p.contains(ip(bad)) && !p.is_assignable(ip(bad)), "{bad}");
        }
        assert!(p.is_assignable(ip("192.168.2.200")));
        let v6: Vec<IpAddr> = p.addresses_of(true).collect();
        assert_eq!(v6, vec![ip("::2"), ip("::3"), ip("fd00::"), ip("fd00::1")]);
    }

    #[test]
    fn avoid_buggy_ips() {
        let cm = legacy(
            "address-pools:\n- name: p\n  protocol: layer2\n  avoid-buggy-ips: true\n  \
             addresses: [192.168.1.254-192.168.3.1, 'fd00::ff/128']\n",
        );
        let (cfg, errs) = load(&[cm], &[], &[]);
        assert!(errs.is_empty(), "{errs:?}");
        let p = &cfg.pools[0];
        let v4: Vec<IpAddr> = p.addresses_of(false).collect();
        assert_eq!(v4.first(), Some(&ip("192.168.1.254")));
        assert!(!v4.contains(&ip("192.168.1.255")));
        assert!(!v4.contains(&ip("192.168.2.0")));
        assert!(!v4.contains(&ip("192.168.3.0")));
        assert!(v4.contains(&ip("192.168.2.1")));
        assert_eq!(v4.len(), 1 + 254 + 1);
        assert!(!p.is_assignable(ip("192.168.2.255")) && p.contains(ip("192.168.2.255")));
        // IPv6 addresses are never "buggy".
        assert_eq!(
            p.addresses_of(true).collect::<Vec<_>>(),
            vec![ip("fd00::ff")]
        );
        assert_eq!(p.addresses().count(), v4.len() + 1);
    }

    #[test]
    fn huge_pools_are_lazy() {
        let (cfg, errs) = load(&[], &[crd("v6", &["fd00:1::/64", "10.0.0.0/8"])], &[]);
        assert!(errs.is_empty(), "{errs:?}");
        let p = &cfg.pools[0];
        let first: Vec<IpAddr> = p.addresses().take(2).collect();
        assert_eq!(first, vec![ip("10.0.0.0"), ip("10.0.0.1")]);
        assert_eq!(p.addresses_of(true).nth(3), Some(ip("fd00:1::3")));
        let full = IpRange::from_cidr(&"::/0".parse().unwrap());
        let p = Pool {
            ranges: vec![full],
            ..p.clone()
        };
        // :: and ::1 are never handed out.
        assert_eq!(p.addresses().nth(1), Some(ip("::3")));
    }

    #[test]
    fn errors_name_object_and_field_and_keep_good_pools() {
        let bad = crd("lan", &["192.168.2.0/28", "192.168.2.300-192.168.2.310"]);
        let empty = crd("empty", &[]);
        let good = crd("good", &["10.0.0.0/24"]);
        let (cfg, errs) = load(&[], &[bad, empty, good], &[]);
        assert_eq!(
            cfg.pools.iter().map(|p| &p.name[..]).collect::<Vec<_>>(),
            ["good"]
        );
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert!(
            text.contains(
                &"IPAddressPool metallb-system/lan: spec.addresses[1]: \
                  \"192.168.2.300-192.168.2.310\" is not an IP range: \
                  \"192.168.2.300\" is not an IP address"
                    .to_string()
            ),
            "{text:#?}"
        );
        assert!(
            text.iter()
                .any(|t| t
                    .starts_with("IPAddressPool metallb-system/empty: spec.addresses: required")),
            "{text:#?}"
        );
        assert!(errs.iter().all(|e| e.severity == Severity::Error));
        // Two entries of one pool overlapping.
        let (cfg, errs) = load(
            &[],
            &[crd("twice", &["10.0.0.0/24", "10.0.0.10-10.0.0.20"])],
            &[],
        );
        assert!(cfg.is_empty());
        assert_eq!(errs[0].field, "spec.addresses[1]");
        assert!(
            errs[0]
                .message
                .contains("overlaps 10.0.0.0/24 (spec.addresses[0])"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn duplicates_and_overlaps() {
        // Same name in both formats: the legacy one wins.
        let (cfg, errs) = load(&[legacy(SEED)], &[crd("default", &["10.0.0.0/24"])], &[]);
        assert_eq!(cfg.pools.len(), 1);
        assert!(matches!(cfg.pools[0].source, PoolSource::ConfigMap(_)));
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].object, "IPAddressPool metallb-system/default");
        assert!(errs[0].message.contains("duplicate pool name \"default\""));
        assert!(errs[0].message.contains("ConfigMap metallb-system/config"));
        // Overlap: the pool whose name sorts first is kept, the error names both.
        let a = crd("b-lan", &["192.168.2.0/24"]);
        let b = crd("a-lan", &["10.0.0.0/24", "192.168.2.250-192.168.3.10"]);
        for input in [vec![a.clone(), b.clone()], vec![b.clone(), a.clone()]] {
            let (cfg, errs) = load(&[], &input, &[]);
            assert_eq!(
                cfg.pools.iter().map(|p| &p.name[..]).collect::<Vec<_>>(),
                ["a-lan"]
            );
            assert_eq!(errs.len(), 1, "{errs:?}");
            let e = &errs[0];
            assert_eq!(e.object, "IPAddressPool metallb-system/b-lan");
            assert_eq!(e.field, "spec.addresses[0]");
            assert!(e.message.contains("\"a-lan\""), "{e}");
            assert!(e.message.contains("192.168.2.250-192.168.3.10"), "{e}");
            assert!(e.message.contains("pool \"b-lan\" is dropped"), "{e}");
        }
    }

    #[test]
    fn legacy_details() {
        let cm = legacy(
            "peers:\n- peer-address: 10.0.0.1\n  peer-asn: 64501\n  my-asn: 64500\n\
             bgp-communities: {a: '1:1'}\n\
             address-pools:\n\
             - name: bgp\n  protocol: bgp\n  auto-assign: false\n  addresses: [10.1.0.0/24]\n  \
               bgp-advertisements: [{aggregation-length: 32}]\n\
             - name: noproto\n  addresses: [10.2.0.0/24]\n\
             - name: badproto\n  protocol: arp\n  addresses: [10.3.0.0/24]\n\
             - protocol: layer2\n  addresses: [10.4.0.0/24]\n\
             - name: v6\n  protocol: layer2\n  addresses: ['fd00::/120']\n  auto-assign: yes\n\
             - name: l2\n  protocol: layer2\n  addresses: [10.5.0.0/24]\n",
        );
        let (cfg, errs) = load(&[cm], &[], &[]);
        let names: Vec<&str> = cfg.pools.iter().map(|p| &p.name[..]).collect();
        assert_eq!(names, ["bgp", "l2"]);
        assert_eq!(cfg.pools[0].protocol, Some(PoolProtocol::Bgp));
        assert!(!cfg.pools[0].auto_assign);
        let find = |field: &str, sev: Severity| {
            errs.iter()
                .find(|e| e.field == field && e.severity == sev)
                .unwrap_or_else(|| panic!("no {sev:?} at {field}: {errs:#?}"))
                .clone()
        };
        // BGP keys are crate::bgp's: no warning here.
        assert!(
            !errs.iter().any(|e| e.field.contains("peers")
                || e.field.contains("bgp-communities")
                || e.field.contains("bgp-advertisements")),
            "{errs:#?}"
        );
        find("data[config].address-pools[1].protocol", Severity::Error);
        let e = find("data[config].address-pools[2].protocol", Severity::Error);
        assert!(
            e.message
                .contains("must be layer2 or bgp, got string \"arp\""),
            "{e}"
        );
        find("data[config].address-pools[3].name", Severity::Error);
        // `yes` is a string in YAML 1.2.
        find("data[config].address-pools[4].auto-assign", Severity::Error);
        // BGP pools get no implicit layer-2 announcement; layer2 ones do.
        assert_eq!(cfg.l2_announcers("bgp", &BTreeMap::new()), None);
        assert_eq!(cfg.l2_announcers("l2", &BTreeMap::new()), Some(vec![]));

        let (cfg, errs) = load(&[legacy("address-pools: [")], &[], &[]);
        assert!(cfg.is_empty());
        assert!(errs[0].message.starts_with("invalid YAML"), "{errs:?}");
        assert_eq!(errs[0].field, "data[config]");
        let mut no_key = legacy("");
        no_key.data.clear();
        let (_, errs) = load(&[no_key], &[], &[]);
        assert_eq!(errs[0].field, "data");
        let (cfg, errs) = load(&[legacy("")], &[], &[]);
        assert!(cfg.is_empty() && errs.is_empty());
    }

    fn sel(pairs: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            match_expressions: vec![],
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_selectors() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        assert!(LabelSelector::default().matches(&l));
        assert!(LabelSelector::default().matches(&BTreeMap::new()));
        assert!(sel(&[("app", "web")]).matches(&l));
        assert!(!sel(&[("app", "db")]).matches(&l));
        let expr = |key: &str, operator, values: &[&str]| LabelSelector {
            match_labels: BTreeMap::new(),
            match_expressions: vec![LabelSelectorRequirement {
                key: key.into(),
                operator,
                values: values.iter().map(|s| s.to_string()).collect(),
            }],
        };
        use SelectorOperator::*;
        assert!(expr("tier", In, &["front", "back"]).matches(&l));
        assert!(!expr("zone", In, &["a"]).matches(&l));
        assert!(!expr("tier", NotIn, &["front"]).matches(&l));
        assert!(expr("zone", NotIn, &["a"]).matches(&l));
        assert!(expr("app", Exists, &[]).matches(&l));
        assert!(!expr("zone", Exists, &[]).matches(&l));
        assert!(expr("zone", DoesNotExist, &[]).matches(&l));
        assert!(!expr("app", DoesNotExist, &[]).matches(&l));
        let mut both = expr("tier", NotIn, &["back"]);
        both.match_labels = labels(&[("app", "web")]);
        assert!(both.matches(&l));
        assert_eq!(both.to_string(), "app=web,tier notin (back)");
    }

    #[test]
    fn admission() {
        let mut p = crd("p", &["10.0.0.0/24"]);
        p.service_allocation = Some(ServiceAllocation {
            priority: Some(0),
            namespaces: vec!["shop".into()],
            namespace_selectors: vec![sel(&[("team", "web")])],
            service_selectors: vec![sel(&[("expose", "public")])],
        });
        let (cfg, _) = load(&[], &[p], &[]);
        let p = &cfg.pools[0];
        assert_eq!(p.priority(), None, "0 means unset");
        assert!(p.is_dedicated());
        let public = labels(&[("expose", "public")]);
        let none = BTreeMap::new();
        assert_eq!(p.admits("shop", &none, &public), Ok(()));
        assert_eq!(
            p.admits("blog", &labels(&[("team", "web")]), &public),
            Ok(())
        );
        assert_eq!(
            p.admits("blog", &none, &public),
            Err(NotAdmitted::Namespace)
        );
        assert_eq!(
            p.admits("shop", &none, &none),
            Err(NotAdmitted::ServiceLabels)
        );
    }

    #[test]
    fn l2_advertisements() {
        let mut lan = crd("lan", &["192.168.2.0/24"]);
        lan.meta.labels = labels(&[("site", "home")]);
        let dmz = crd("dmz", &["192.168.3.0/24"]);
        let lab = crd("lab", &["192.168.4.0/24"]);
        let adv = |name: &str| L2Advertisement {
            meta: Meta {
                name: name.into(),
                namespace: "metallb-system".into(),
                ..Meta::default()
            },
            ..L2Advertisement::default()
        };
        let all = adv("all");
        let mut by_label = adv("by-label");
        by_label.ip_address_pool_selectors = vec![sel(&[("site", "home")])];
        by_label.node_selectors = vec![sel(&[("role", "edge")])];
        by_label.interfaces = vec!["eth1".into(), "eth0".into()];
        let mut by_name = adv("by-name");
        by_name.ip_address_pools = vec!["dmz".into(), "nope".into()];
        by_name.node_selectors = vec![sel(&[("role", "dmz")])];
        by_name.interfaces = vec!["eth2".into()];

        let (cfg, errs) = load(
            &[],
            &[lan.clone(), dmz.clone(), lab.clone()],
            &[by_label.clone(), by_name.clone()],
        );
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].severity, Severity::Warning);
        assert_eq!(errs[0].field, "spec.ipAddressPools[1]");
        let edge = labels(&[("role", "edge")]);
        let dmz_node = labels(&[("role", "dmz")]);
        assert_eq!(
            cfg.l2_announcers("lan", &edge),
            Some(vec!["eth0".into(), "eth1".into()])
        );
        assert_eq!(cfg.l2_announcers("lan", &dmz_node), None);
        assert_eq!(
            cfg.l2_announcers("dmz", &dmz_node),
            Some(vec!["eth2".into()])
        );
        assert_eq!(cfg.l2_announcers("dmz", &edge), None);
        assert_eq!(cfg.l2_announcers("lab", &edge), None);
        // An advertisement without pool selection covers every pool, on every node.
        let (cfg, _) = load(&[], &[lan, dmz, lab], &[by_label, all]);
        assert_eq!(cfg.l2_announcers("lab", &BTreeMap::new()), Some(vec![]));
        assert_eq!(
            cfg.l2_announcers("lan", &edge),
            Some(vec![]),
            "all interfaces wins"
        );
    }

    #[test]
    fn load_is_order_independent() {
        let pools = vec![
            crd("c", &["10.0.2.0/24"]),
            crd("a", &["10.0.0.0/24"]),
            crd("b", &["10.0.0.128/25"]),
            crd("a", &["10.0.9.0/24"]),
        ];
        let mut rev = pools.clone();
        rev.reverse();
        let (c1, e1) = load(&[], &pools, &[]);
        let (c2, mut e2) = load(&[], &rev, &[]);
        assert_eq!(c1, c2);
        let mut e1 = e1;
        e1.sort_by_key(|e| e.to_string());
        e2.sort_by_key(|e| e.to_string());
        assert_eq!(e1, e2);
    }

    proptest! {
        /// Pool iteration: ascending within a family, IPv4 first, inside the pool, assignable,
        /// and exactly the assignable addresses of small ranges.
        #[test]
        fn iteration_matches_membership(
            specs in proptest::collection::vec((0u32..600, 0u32..40, any::<bool>()), 1..4),
            avoid in any::<bool>(),
        ) {
            let addresses: Vec<String> = specs.iter().map(|(start, len, v6)| {
                let a = 0x0a00_0000u32 + start * 3;
                if *v6 {
                    format!("fd00::{:x}-fd00::{:x}", a & 0xfff, (a & 0xfff) + len)
                } else {
                    format!("{}-{}", std::net::Ipv4Addr::from(a), std::net::Ipv4Addr::from(a + len))
                }
            }).collect();
            let mut p = crd("p", &addresses.iter().map(String::as_str).collect::<Vec<_>>());
            p.avoid_buggy_ips = avoid;
            let (cfg, _) = load(&[], &[p], &[]);
            let Some(pool) = cfg.pools.first() else { return Ok(()); }; // overlapping entries
            let got: Vec<IpAddr> = pool.addresses().collect();
            for w in got.windows(2) {
                prop_assert!(w[0].is_ipv4() && w[1].is_ipv6() || (w[0].is_ipv4() == w[1].is_ipv4() && w[0] < w[1]));
            }
            for a in &got {
                prop_assert!(pool.is_assignable(*a));
            }
            let expected: u128 = pool.ranges.iter().map(|r| {
                (r.lo()..=r.hi()).filter(|v| !(avoid && is_buggy_ip(from_u128(*v, r.is_ipv4())))).count() as u128
            }).sum();
            prop_assert_eq!(got.len() as u128, expected);
        }
    }
}
