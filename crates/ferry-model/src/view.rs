//! The validated internal model: services with their allocations joined to their endpoints.
//!
//! This is what planning consumes; it knows nothing of nftables.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::alloc::Allocation;
use crate::cidr::Cidr;
use crate::objects::{
    AddressType, ClusterIpSpec, EndpointSlice, IpFamily, ObjectRef, Protocol, Service, ServiceType,
    SharedStr, TargetPort, TrafficPolicy, ZoneHints,
};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ResolvedEndpoint {
    pub addr: IpAddr,
    pub port: u16,
    /// Shared with the slice's endpoint it comes from.
    pub node: Option<SharedStr>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// The zones this endpoint is hinted for (None: no hints).
    /// Shared with the slice's endpoint it comes from.
    pub zone_hints: Option<ZoneHints>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedPort {
    /// spec.ports[].name ("" when unnamed).
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
    /// Every endpoint known for this port, deduplicated and sorted.
    pub endpoints: Vec<ResolvedEndpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedService {
    pub id: ObjectRef,
    pub type_: ServiceType,
    /// The primary cluster IP (spec.clusterIPs[0]).
    pub cluster_ip: Option<IpAddr>,
    /// The other family's cluster IP of a dual-stack service (spec.clusterIPs[1]). Everything
    /// else (external and load-balancer addresses, source ranges, each port's endpoints) holds
    /// the entries of both families; [`ResolvedService::family`] gives one family's view.
    pub secondary_cluster_ip: Option<IpAddr>,
    /// Of the families the service has a cluster IP of.
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ips: Vec<IpAddr>,
    pub external_traffic_policy: TrafficPolicy,
    pub internal_traffic_policy: TrafficPolicy,
    pub ports: Vec<ResolvedPort>,
    /// ClientIP session affinity: its timeout in seconds; None without affinity.
    pub affinity_timeout: Option<u32>,
    /// Who may reach the load-balancer addresses (only those of the service's family are
    /// kept); empty: everyone.
    pub load_balancer_source_ranges: Vec<Cidr>,
    /// The health-check node port (LoadBalancer with externalTrafficPolicy Local).
    pub health_check_node_port: Option<u16>,
}

impl ResolvedService {
    /// The cluster IPs, primary first.
    pub fn cluster_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.cluster_ip
            .iter()
            .chain(&self.secondary_cluster_ip)
            .copied()
    }

    /// Whether the service has cluster IPs of both families.
    pub fn is_dual_stack(&self) -> bool {
        self.secondary_cluster_ip.is_some()
    }

    /// The service as one family sees it (what kube-proxy's per-family proxier gets): that
    /// family's cluster IP as `cluster_ip`, and only that family's external and load-balancer
    /// addresses, source ranges and endpoints. None when the service has no cluster IP of it.
    pub fn family(&self, family: IpFamily) -> Option<ResolvedService> {
        let cip = self.cluster_ips().find(|ip| IpFamily::of(*ip) == family)?;
        let mine = |ip: &IpAddr| IpFamily::of(*ip) == family;
        Some(ResolvedService {
            id: self.id.clone(),
            type_: self.type_,
            cluster_ip: Some(cip),
            secondary_cluster_ip: None,
            external_ips: self.external_ips.iter().copied().filter(mine).collect(),
            load_balancer_ips: self
                .load_balancer_ips
                .iter()
                .copied()
                .filter(mine)
                .collect(),
            external_traffic_policy: self.external_traffic_policy,
            internal_traffic_policy: self.internal_traffic_policy,
            ports: self
                .ports
                .iter()
                .map(|p| ResolvedPort {
                    endpoints: p
                        .endpoints
                        .iter()
                        .filter(|e| mine(&e.addr))
                        .cloned()
                        .collect(),
                    ..p.clone()
                })
                .collect(),
            affinity_timeout: self.affinity_timeout,
            load_balancer_source_ranges: self
                .load_balancer_source_ranges
                .iter()
                .copied()
                .filter(|c| mine(&c.network()))
                .collect(),
            health_check_node_port: self.health_check_node_port,
        })
    }

    /// One view per family the service has a cluster IP of, primary first.
    pub fn families(&self) -> Vec<ResolvedService> {
        self.cluster_ips()
            .filter_map(|ip| self.family(IpFamily::of(ip)))
            .collect()
    }
}

/// Joins services (with their allocation) to the EndpointSlices that name them.
/// Services without an allocation (rejected) or without a virtual IP (headless, ExternalName)
/// are left out: they get no rules.
pub fn resolve(
    services: &[Service],
    allocations: &BTreeMap<ObjectRef, Allocation>,
    slices: &[EndpointSlice],
) -> Vec<ResolvedService> {
    resolve_refs(services, allocations, slices)
}

/// [`resolve`] of services held elsewhere (some of them changed copies: the agent's
/// load-balancer addresses).
pub fn resolve_refs<'s>(
    services: impl IntoIterator<Item = &'s Service>,
    allocations: &BTreeMap<ObjectRef, Allocation>,
    slices: &[EndpointSlice],
) -> Vec<ResolvedService> {
    let services = services.into_iter();
    let mut by_service: BTreeMap<ObjectRef, Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices {
        by_service
            .entry(ObjectRef::new(
                s.meta.namespace.clone(),
                s.service_name.clone(),
            ))
            .or_default()
            .push(s);
    }
    // Kept until the next sync (10,000 services): sized once, no spare room.
    let mut out = Vec::with_capacity(services.size_hint().0);
    for svc in services {
        let id = svc.meta.object_ref();
        let Some(alloc) = allocations.get(&id) else {
            continue;
        };
        let Some(cluster_ip) = alloc.cluster_ip else {
            continue;
        };
        let secondary = alloc
            .secondary_cluster_ip
            .filter(|ip| ip.is_ipv4() != cluster_ip.is_ipv4());
        // Addresses of a family the service has a cluster IP of (kube-proxy's per-family
        // proxiers each take their own; one of no family of the service goes nowhere).
        let family_ok = |ip: &IpAddr| {
            ip.is_ipv4() == cluster_ip.is_ipv4()
                || secondary.is_some_and(|s| s.is_ipv4() == ip.is_ipv4())
        };
        if svc.type_ == ServiceType::ExternalName {
            continue;
        }
        let my_slices = by_service.get(&id).map(Vec::as_slice).unwrap_or(&[]);
        let ports = svc
            .ports
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut eps: BTreeSet<ResolvedEndpoint> = BTreeSet::new();
                for sl in my_slices {
                    if sl.address_type == AddressType::Fqdn {
                        continue;
                    }
                    // The slice port that serves this service port: same name and protocol.
                    let Some(sp) = sl
                        .ports
                        .iter()
                        .find(|sp| sp.name == p.name && sp.protocol == p.protocol)
                    else {
                        continue;
                    };
                    for e in &sl.endpoints {
                        for a in &e.addresses {
                            // Only endpoints of the service's families.
                            if !family_ok(a) {
                                continue;
                            }
                            eps.insert(ResolvedEndpoint {
                                addr: *a,
                                port: sp.port,
                                node: e.node_name.clone(),
                                ready: e.conditions.ready,
                                serving: e.conditions.serving,
                                terminating: e.conditions.terminating,
                                zone_hints: e.zone_hints.clone(),
                            });
                        }
                    }
                }
                // The same address:port from two slices: keep the "most ready" one.
                let mut dedup: BTreeMap<(IpAddr, u16), ResolvedEndpoint> = BTreeMap::new();
                for e in eps {
                    let k = (e.addr, e.port);
                    match dedup.get(&k) {
                        Some(old) if (old.ready, old.serving) >= (e.ready, e.serving) => {}
                        _ => {
                            dedup.insert(k, e);
                        }
                    }
                }
                let _ = &p.target_port; // resolved by whoever writes the slices
                ResolvedPort {
                    name: p.name.clone(),
                    protocol: p.protocol,
                    port: p.port,
                    node_port: alloc.node_ports.get(i).copied().flatten(),
                    endpoints: dedup.into_values().collect(),
                }
            })
            .collect();
        out.push(ResolvedService {
            id,
            type_: svc.type_,
            cluster_ip: Some(cluster_ip),
            secondary_cluster_ip: secondary,
            external_ips: svc
                .extra
                .external_ips
                .iter()
                .copied()
                .filter(family_ok)
                .collect(),
            load_balancer_ips: if svc.type_ == ServiceType::LoadBalancer {
                svc.extra
                    .load_balancer_ingress
                    .iter()
                    .copied()
                    .filter(family_ok)
                    .collect()
            } else {
                vec![]
            },
            external_traffic_policy: svc.external_traffic_policy,
            internal_traffic_policy: svc.internal_traffic_policy,
            ports,
            affinity_timeout: svc.session_affinity.timeout_seconds(),
            load_balancer_source_ranges: svc
                .extra
                .load_balancer_source_ranges
                .iter()
                .copied()
                .filter(|c| family_ok(&c.network()))
                .collect(),
            health_check_node_port: alloc.health_check_node_port,
        });
    }
    out.shrink_to_fit();
    out
}

/// The endpoints traffic may go to, as kube-proxy chooses them: the ready ones; if none is
/// ready, the serving-and-terminating ones (so connections drain during a rolling update);
/// `local_only` keeps those on `node`.
pub fn usable_endpoints<'a>(
    eps: &'a [ResolvedEndpoint],
    local_only: Option<&str>,
) -> Vec<&'a ResolvedEndpoint> {
    let here = |e: &&ResolvedEndpoint| match local_only {
        Some(n) => e.node.as_deref() == Some(n),
        None => true,
    };
    let ready: Vec<_> = eps.iter().filter(here).filter(|e| e.ready).collect();
    if !ready.is_empty() {
        return ready;
    }
    eps.iter()
        .filter(here)
        .filter(|e| e.serving && e.terminating)
        .collect()
}

/// Topology-aware routing as kube-proxy does it, for traffic that may go to any endpoint of the
/// cluster: when every one of `eps` carries zone hints, this node has a zone, and some endpoint
/// is hinted for it, only those; otherwise all of `eps` (hints missing anywhere, or a zone left
/// without endpoints, must never black-hole traffic).
pub fn topology_endpoints<'a>(
    eps: Vec<&'a ResolvedEndpoint>,
    node_zone: Option<&str>,
) -> Vec<&'a ResolvedEndpoint> {
    let Some(zone) = node_zone else {
        return eps;
    };
    if eps.is_empty() || eps.iter().any(|e| e.zone_hints.is_none()) {
        return eps;
    }
    let for_zone: Vec<&ResolvedEndpoint> = eps
        .iter()
        .copied()
        .filter(|e| {
            e.zone_hints
                .as_ref()
                .is_some_and(|z| z.iter().any(|h| h == zone))
        })
        .collect();
    if for_zone.is_empty() {
        eps
    } else {
        for_zone
    }
}

/// Resolves a named target port against a pod's container ports (used by slice writers).
pub fn resolve_target_port(
    tp: &TargetPort,
    container_ports: &[(String, u16, Protocol)],
    protocol: Protocol,
) -> Option<u16> {
    match tp {
        TargetPort::Number(n) => Some(*n),
        TargetPort::Name(name) => container_ports
            .iter()
            .find(|(n, _, p)| n == name && *p == protocol)
            .map(|(_, port, _)| *port),
    }
}

/// [`resolve`] pass after pass, telling which services resolve differently from the previous
/// pass: what a planner that takes only what changed needs
/// (`ferry_plan::plan::Planner::update_changed`).
///
/// Each service's inputs (the fields of its Service that [`resolve`] reads, its allocation,
/// and the names and resourceVersions of its EndpointSlices) are fingerprinted; only services
/// whose fingerprint moved are resolved again. EndpointSlices are not read beyond their
/// resourceVersion, which the API server changes on every write: a service with a slice
/// without one (a manifest directory) is resolved again on every pass, then compared. The
/// services resolved are the ones [`resolve`] of the same inputs gives.
#[derive(Debug, Default)]
pub struct Resolver {
    known: fnv::FnvHashMap<ObjectRef, Known>,
    /// Passes so far (marks the services seen in the current one).
    pass: u64,
}

#[derive(Debug)]
struct Known {
    /// The fingerprint of the inputs (None: none could be taken).
    inputs: Option<u64>,
    /// Boxed: the map's table holds every slot, used or not, at its own size.
    resolved: Option<Box<ResolvedService>>,
    /// The last pass that had this service.
    pass: u64,
}

/// Which services' inputs (the Service, its EndpointSlices) may have changed since the last
/// pass, as a source that sees every change tracks them (the API source's watch events): with
/// [`Resolver::update_some`] a pass looks at those only, not at every service. Saying too much
/// is harmless; saying too little would leave a service as it was, so a source that cannot
/// tell (a re-list, a change to pools or nodes) says [`Changed::All`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    All,
    /// These services (by namespace and name), present or gone.
    Only(std::collections::HashSet<ObjectRef>),
}

impl Default for Changed {
    /// Everything: what nobody tracked.
    fn default() -> Changed {
        Changed::All
    }
}

impl Changed {
    /// Nothing yet.
    pub fn none() -> Changed {
        Changed::Only(Default::default())
    }
    /// The service `namespace/name` (or its slices) changed.
    pub fn add(&mut self, namespace: &str, name: &str) {
        if let Changed::Only(set) = self {
            set.insert(ObjectRef::new(namespace, name));
        }
    }
    /// Everything may have changed.
    pub fn all(&mut self) {
        *self = Changed::All;
    }
    /// The least a source that saw every change from one view (`old`: its Services and
    /// EndpointSlices) to another (`new`) must name: every service whose Service, or any slice
    /// of it (by the service it names), differs. The contract the sources are tested against.
    pub fn between(
        old: (&[Service], &[EndpointSlice]),
        new: (&[Service], &[EndpointSlice]),
    ) -> Changed {
        type Inputs<'a> = BTreeMap<(&'a str, &'a str), (Vec<&'a Service>, Vec<&'a EndpointSlice>)>;
        fn inputs<'a>(services: &'a [Service], slices: &'a [EndpointSlice]) -> Inputs<'a> {
            let mut m = Inputs::new();
            for s in services {
                let k = (s.meta.namespace.as_str(), s.meta.name.as_str());
                m.entry(k).or_default().0.push(s);
            }
            for s in slices {
                let k = (s.meta.namespace.as_str(), s.service_name.as_str());
                m.entry(k).or_default().1.push(s);
            }
            m
        }
        let (a, b) = (inputs(old.0, old.1), inputs(new.0, new.1));
        let mut c = Changed::none();
        for k in a.keys().chain(b.keys()) {
            if a.get(k) != b.get(k) {
                c.add(k.0, k.1);
            }
        }
        c
    }

    /// Whether the service `namespace/name` is among those named (always, for `All`).
    pub fn names(&self, namespace: &str, name: &str) -> bool {
        match self {
            Changed::All => true,
            Changed::Only(set) => set.contains(&ObjectRef::new(namespace, name)),
        }
    }
}

/// What a [`Resolver::update`] found changed since the pass before.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvedChanges {
    /// Services that resolve differently (new ones included), in the order of the input.
    pub changed: Vec<ObjectRef>,
    /// Services that resolved before and resolve to nothing now (gone, headless, rejected).
    pub removed: Vec<ObjectRef>,
    /// What the changed and removed services resolved to before (those that resolved to
    /// something): with [`Resolver::changed`], all that comparing this pass with the one
    /// before needs (UDP endpoints gone, counts of changes), without the unchanged services.
    pub previous: Vec<ResolvedService>,
    /// How many services had to be resolved again (their inputs changed, or have no
    /// fingerprint): the pass's cost beyond fingerprinting.
    pub resolved_again: usize,
}

impl ResolvedChanges {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.removed.is_empty()
    }
}

/// Where a [`Resolver`] finds each service's allocation.
#[derive(Clone, Copy)]
pub enum Allocations<'a> {
    /// Kept apart from the Services (a manifest directory's state): by service.
    Map(&'a BTreeMap<ObjectRef, Allocation>),
    /// An allocator's results (a rejected service has none).
    Results(&'a crate::alloc::AllocResults),
    /// In each Service's own spec (the API server allocates): read by this function, which
    /// may read only the Service's type, spec.clusterIP(s), ports' nodePort,
    /// externalTrafficPolicy and healthCheckNodePort (what the fingerprint covers). Only the
    /// services whose Service changed are read.
    FromSpec(&'a dyn Fn(&Service) -> Option<Allocation>),
}

impl std::fmt::Debug for Allocations<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Allocations::Map(_) => "Allocations::Map",
            Allocations::Results(_) => "Allocations::Results",
            Allocations::FromSpec(_) => "Allocations::FromSpec",
        })
    }
}

impl Allocations<'_> {
    /// Service `svc`'s allocation (`id` is its reference).
    fn of(&self, svc: &Service, id: &ObjectRef) -> Option<std::borrow::Cow<'_, Allocation>> {
        use std::borrow::Cow;
        match self {
            Allocations::Map(m) => m.get(id).map(Cow::Borrowed),
            Allocations::Results(r) => r.get(id).and_then(|a| a.as_ref().ok()).map(Cow::Borrowed),
            Allocations::FromSpec(f) => f(svc).map(Cow::Owned),
        }
    }
}

/// A fingerprint of what [`resolve`] reads of one service (None: a slice has no
/// resourceVersion, so its content would have to be read). `slices` is the number of the
/// service's slices and the sum of their (name, version) hashes (None: one has no version).
fn inputs_fingerprint(
    svc: &Service,
    alloc: Option<&Allocation>,
    slices: (usize, Option<u64>),
) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = fnv::FnvHasher::default();
    svc.meta.namespace.hash(&mut h);
    svc.meta.name.hash(&mut h);
    svc.type_.hash(&mut h);
    for p in &svc.ports {
        (&p.name, p.protocol, p.port, p.node_port).hash(&mut h);
    }
    // What an allocation from the spec reads (FromSpec).
    match &svc.cluster_ip {
        ClusterIpSpec::Auto => 0u8.hash(&mut h),
        ClusterIpSpec::None => 1u8.hash(&mut h),
        ClusterIpSpec::Ip(ip) => (2u8, ip).hash(&mut h),
    }
    svc.extra.secondary_cluster_ip.hash(&mut h);
    svc.extra.health_check_node_port.hash(&mut h);
    svc.extra.external_ips.hash(&mut h);
    svc.extra.load_balancer_ingress.hash(&mut h);
    (svc.external_traffic_policy == TrafficPolicy::Local).hash(&mut h);
    (svc.internal_traffic_policy == TrafficPolicy::Local).hash(&mut h);
    svc.session_affinity.hash(&mut h);
    svc.extra.load_balancer_source_ranges.hash(&mut h);
    match alloc {
        Some(a) => {
            1u8.hash(&mut h);
            a.cluster_ip.hash(&mut h);
            a.secondary_cluster_ip.hash(&mut h);
            a.node_ports.hash(&mut h);
            a.health_check_node_port.hash(&mut h);
        }
        None => 0u8.hash(&mut h),
    }
    (slices.0, slices.1?).hash(&mut h);
    Some(h.finish())
}

/// One slice's name and version, hashed (None: it has no version).
fn slice_fingerprint(sl: &EndpointSlice) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut hs = fnv::FnvHasher::default();
    sl.meta.name.hash(&mut hs);
    sl.meta.extra.resource_version.as_ref()?.hash(&mut hs);
    Some(hs.finish())
}

impl Resolver {
    /// Resolves `services` as [`resolve`] does, again only where their inputs changed, and
    /// returns which services resolve differently from the previous pass. Of a service given
    /// twice, the first counts.
    pub fn update(
        &mut self,
        services: &[Service],
        allocations: &BTreeMap<ObjectRef, Allocation>,
        slices: &[EndpointSlice],
    ) -> ResolvedChanges {
        let refs: Vec<&Service> = services.iter().collect();
        self.update_refs(&refs, Allocations::Map(allocations), slices)
    }

    /// [`Resolver::update`] of services held elsewhere, with their allocations wherever they
    /// are.
    pub fn update_refs(
        &mut self,
        services: &[&Service],
        allocations: Allocations<'_>,
        slices: &[EndpointSlice],
    ) -> ResolvedChanges {
        self.update_inner(services, allocations, slices, None)
    }

    /// [`Resolver::update_refs`] where only the services `changed` names may have changed
    /// (their Service or slices): the others are not looked at (not even fingerprinted), so a
    /// pass costs what changed, not the number of services. A named service absent from
    /// `services` is gone. With [`Changed::All`], as [`Resolver::update_refs`].
    pub fn update_some(
        &mut self,
        services: &[&Service],
        allocations: Allocations<'_>,
        slices: &[EndpointSlice],
        changed: &Changed,
    ) -> ResolvedChanges {
        match changed {
            Changed::All => self.update_inner(services, allocations, slices, None),
            Changed::Only(set) => self.update_inner(services, allocations, slices, Some(set)),
        }
    }

    fn update_inner(
        &mut self,
        services: &[&Service],
        allocations: Allocations<'_>,
        slices: &[EndpointSlice],
        only: Option<&std::collections::HashSet<ObjectRef>>,
    ) -> ResolvedChanges {
        self.pass += 1;
        let pass = self.pass;
        let only_keys: Option<fnv::FnvHashSet<(&str, &str)>> = only.map(|o| {
            o.iter()
                .map(|r| (r.namespace.as_str(), r.name.as_str()))
                .collect()
        });
        let looked_at = |key: &(&str, &str)| only_keys.as_ref().is_none_or(|o| o.contains(key));
        // Per service: how many slices, and the sum of their fingerprints (in any order).
        let mut by_service: fnv::FnvHashMap<(&str, &str), (usize, Option<u64>)> =
            fnv::FnvHashMap::default();
        by_service.reserve(only_keys.as_ref().map_or(slices.len(), |o| o.len()));
        for s in slices {
            let key = (s.meta.namespace.as_str(), s.service_name.as_str());
            if !looked_at(&key) {
                continue;
            }
            let e = by_service.entry(key).or_insert((0, Some(0)));
            e.0 += 1;
            e.1 = match (e.1, slice_fingerprint(s)) {
                (Some(sum), Some(f)) => Some(sum.wrapping_add(f)),
                _ => None,
            };
        }
        // Allocations kept apart are part of the fingerprint; from the spec, the Service is.
        let alloc_apart = !matches!(allocations, Allocations::FromSpec(_));
        // The services whose inputs moved: (index in `services`, fingerprint).
        let mut stale: Vec<(usize, Option<u64>)> = Vec::new();
        for (i, svc) in services.iter().enumerate() {
            let id_key = (svc.meta.namespace.as_str(), svc.meta.name.as_str());
            if !looked_at(&id_key) {
                continue;
            }
            let mine = by_service.get(&id_key).copied().unwrap_or((0, Some(0)));
            let id = svc.meta.object_ref();
            let alloc = match alloc_apart {
                true => allocations.of(svc, &id),
                false => None,
            };
            let fp = inputs_fingerprint(svc, alloc.as_deref(), mine);
            match self.known.get_mut(&id) {
                Some(k) if k.pass == pass => {} // given twice: the first counts
                Some(k) => {
                    k.pass = pass;
                    if fp.is_none() || k.inputs != fp {
                        stale.push((i, fp));
                    }
                }
                None => {
                    self.known.insert(
                        id,
                        Known {
                            inputs: None,
                            resolved: None,
                            pass,
                        },
                    );
                    stale.push((i, fp));
                }
            }
        }
        let mut changes = ResolvedChanges {
            resolved_again: stale.len(),
            ..ResolvedChanges::default()
        };
        // The slices of the stale services (all of them when many are).
        let many = stale.len() > services.len() / 4;
        let wanted: std::collections::HashSet<(&str, &str)> = match many {
            true => Default::default(),
            false => stale
                .iter()
                .map(|(i, _)| {
                    let s = services[*i];
                    (s.meta.namespace.as_str(), s.meta.name.as_str())
                })
                .collect(),
        };
        let mut slices_of: fnv::FnvHashMap<(&str, &str), Vec<&EndpointSlice>> =
            fnv::FnvHashMap::default();
        if !many && !wanted.is_empty() {
            for s in slices {
                let k = (s.meta.namespace.as_str(), s.service_name.as_str());
                if wanted.contains(&k) {
                    slices_of.entry(k).or_default().push(s);
                }
            }
        }
        // Many stale (the first pass): resolve them all at once.
        let mut bulk: Option<std::collections::HashMap<ObjectRef, ResolvedService>> =
            many.then(|| {
                let mut allocs: BTreeMap<ObjectRef, Allocation> = BTreeMap::new();
                let mut of: Vec<&Service> = Vec::with_capacity(stale.len());
                for (i, _) in &stale {
                    let svc = services[*i];
                    let id = svc.meta.object_ref();
                    if let Some(a) = allocations.of(svc, &id) {
                        allocs.entry(id).or_insert_with(|| a.into_owned());
                    }
                    of.push(svc);
                }
                let mut m = std::collections::HashMap::new();
                for r in resolve_refs(of, &allocs, slices) {
                    m.entry(r.id.clone()).or_insert(r);
                }
                m
            });
        for (i, fp) in stale {
            let svc = services[i];
            let id = svc.meta.object_ref();
            let now = match &mut bulk {
                Some(m) => m.remove(&id),
                None => {
                    let id_key = (svc.meta.namespace.as_str(), svc.meta.name.as_str());
                    let mine: Vec<EndpointSlice> = slices_of
                        .get(&id_key)
                        .map(|v| v.iter().map(|s| (*s).clone()).collect())
                        .unwrap_or_default();
                    let alloc: BTreeMap<ObjectRef, Allocation> = allocations
                        .of(svc, &id)
                        .map(|a| BTreeMap::from([(id.clone(), a.into_owned())]))
                        .unwrap_or_default();
                    resolve(std::slice::from_ref(svc), &alloc, &mine).pop()
                }
            };
            let Some(k) = self.known.get_mut(&id) else {
                continue; // inserted above
            };
            k.inputs = fp;
            let same = k.resolved.as_deref() == now.as_ref();
            let before = std::mem::replace(&mut k.resolved, now.map(Box::new));
            if same {
                continue;
            }
            match &k.resolved {
                None => changes.removed.push(id),
                Some(_) => changes.changed.push(id),
            }
            changes.previous.extend(before.map(|b| *b));
        }
        // Services not given this pass are gone (of those looked at).
        match only {
            None => self.known.retain(|id, k| {
                if k.pass == pass {
                    return true;
                }
                if let Some(before) = k.resolved.take() {
                    changes.removed.push(id.clone());
                    changes.previous.push(*before);
                }
                false
            }),
            Some(named) => {
                // In order, so that a pass's result does not depend on the set's.
                let mut named: Vec<&ObjectRef> = named.iter().collect();
                named.sort_unstable();
                for id in named {
                    if self.known.get(id).is_some_and(|k| k.pass != pass) {
                        if let Some(before) = self.known.remove(id).and_then(|k| k.resolved) {
                            changes.removed.push(id.clone());
                            changes.previous.push(*before);
                        }
                    }
                }
            }
        }
        changes
    }

    /// The resolved state of service `id` as of the last update (None: it resolves to no
    /// rules).
    pub fn get(&self, id: &ObjectRef) -> Option<&ResolvedService> {
        self.known.get(id).and_then(|k| k.resolved.as_deref())
    }

    /// The services `changes` says changed, as resolved now (what a planner of changes takes).
    pub fn changed<'a>(
        &'a self,
        changes: &'a ResolvedChanges,
    ) -> impl Iterator<Item = &'a ResolvedService> + 'a {
        changes.changed.iter().filter_map(|id| self.get(id))
    }

    /// Every service that resolves to rules, in no particular order.
    pub fn services(&self) -> impl Iterator<Item = &ResolvedService> {
        self.known.values().filter_map(|k| k.resolved.as_deref())
    }

    /// Forgets every fingerprint: the next update resolves every service again (a resync).
    pub fn reset(&mut self) {
        self.known.clear();
    }

    /// Distrusts every fingerprint but keeps what each service resolved to: the next update
    /// resolves every service again and still reports only the services that resolve
    /// differently (a safety resync that also sees what fingerprints would miss).
    pub fn invalidate(&mut self) {
        for k in self.known.values_mut() {
            k.inputs = None;
        }
    }

    /// How many services resolve to rules.
    pub fn len(&self) -> usize {
        self.known.values().filter(|k| k.resolved.is_some()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(last: u8, hints: Option<&[&str]>) -> ResolvedEndpoint {
        ResolvedEndpoint {
            addr: IpAddr::from([10, 42, 0, last]),
            port: 80,
            node: None,
            ready: true,
            serving: true,
            terminating: false,
            zone_hints: hints.map(|h| h.iter().map(|z| z.to_string()).collect::<Vec<_>>().into()),
        }
    }

    fn addrs(v: Vec<&ResolvedEndpoint>) -> Vec<u8> {
        v.iter()
            .map(|e| match e.addr {
                IpAddr::V4(a) => a.octets()[3],
                IpAddr::V6(_) => 0,
            })
            .collect()
    }

    #[test]
    fn resolved_endpoints_are_small() {
        // 100,000 resolved endpoints are kept (10,000 services of 10): each one's size counts.
        // The node's name and the zone hints are one pointer each, shared with the slice.
        use std::mem::size_of;
        assert_eq!(size_of::<ResolvedEndpoint>(), 40);
        // One per port and per service: guarded against growing.
        assert_eq!(size_of::<ResolvedPort>(), 56);
        assert_eq!(size_of::<ResolvedService>(), 200);
    }

    #[test]
    fn dual_stack_services_carry_each_familys_ip_and_endpoints() {
        use crate::objects::*;
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let svc = Service {
            meta: Meta {
                name: "web".into(),
                namespace: "default".into(),
                ..Meta::default()
            },
            type_: ServiceType::LoadBalancer,
            ports: vec![ServicePort {
                name: String::new(),
                protocol: Protocol::Tcp,
                port: 80,
                target_port: TargetPort::Number(8080),
                node_port: None,
            }],
            extra: ServiceExtra {
                load_balancer_ingress: vec![ip("192.168.2.201"), ip("fd00:200::11")],
                ..ServiceExtra::default()
            }
            .into(),
            ..Service::default()
        };
        let slice = |name: &str, t: AddressType, addr: &str| EndpointSlice {
            meta: Meta {
                name: name.into(),
                namespace: "default".into(),
                ..Meta::default()
            },
            service_name: "web".into(),
            address_type: t,
            endpoints: vec![Endpoint {
                addresses: vec![ip(addr)].into(),
                conditions: EndpointConditions {
                    ready: true,
                    serving: true,
                    terminating: false,
                },
                node_name: None,
                zone_hints: None,
            }],
            ports: vec![EndpointPort {
                name: String::new(),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
        };
        let slices = [
            slice("web-v4", AddressType::IPv4, "10.42.1.5"),
            slice("web-v6", AddressType::IPv6, "fd00:42:1::5"),
        ];
        let alloc = |second: Option<IpAddr>| {
            BTreeMap::from([(
                ObjectRef::new("default", "web"),
                Allocation {
                    cluster_ip: Some(ip("10.43.0.50")),
                    secondary_cluster_ip: second,
                    node_ports: vec![Some(30080)],
                    health_check_node_port: None,
                },
            )])
        };
        let r = resolve(
            std::slice::from_ref(&svc),
            &alloc(Some(ip("fd00:43::50"))),
            &slices,
        );
        let r = &r[0];
        assert_eq!(r.cluster_ips().count(), 2);
        assert_eq!(r.ports[0].endpoints.len(), 2);
        assert_eq!(r.load_balancer_ips.len(), 2);
        let v6 = r.family(IpFamily::IPv6).unwrap();
        assert_eq!(v6.cluster_ip, Some(ip("fd00:43::50")));
        assert_eq!(v6.load_balancer_ips, vec![ip("fd00:200::11")]);
        let eps: Vec<IpAddr> = v6.ports[0].endpoints.iter().map(|e| e.addr).collect();
        assert_eq!(eps, vec![ip("fd00:42:1::5")]);
        let v4 = r.family(IpFamily::IPv4).unwrap();
        assert_eq!(v4.cluster_ip, Some(ip("10.43.0.50")));
        assert_eq!(v4.ports[0].endpoints[0].addr, ip("10.42.1.5"));
        assert_eq!(r.families().len(), 2);
        // Single-stack: the other family's endpoints and addresses are left out.
        let r = resolve(&[svc], &alloc(None), &slices);
        assert_eq!(r[0].ports[0].endpoints.len(), 1);
        assert_eq!(r[0].load_balancer_ips, vec![ip("192.168.2.201")]);
        assert!(r[0].family(IpFamily::IPv6).is_none());
    }

    #[test]
    fn topology_hints_as_kube_proxy_uses_them() {
        let hinted = [
            ep(1, Some(&["a"])),
            ep(2, Some(&["b"])),
            ep(3, Some(&["a", "c"])),
        ];
        let all: Vec<&ResolvedEndpoint> = hinted.iter().collect();
        // This node's zone: only the endpoints hinted for it.
        assert_eq!(addrs(topology_endpoints(all.clone(), Some("a"))), [1, 3]);
        assert_eq!(addrs(topology_endpoints(all.clone(), Some("b"))), [2]);
        // A zone nobody is hinted for, or no zone: everything (never a black hole).
        assert_eq!(addrs(topology_endpoints(all.clone(), Some("d"))), [1, 2, 3]);
        assert_eq!(addrs(topology_endpoints(all, None)), [1, 2, 3]);
        // One endpoint without hints: hints are not used at all.
        let partly = [ep(1, Some(&["a"])), ep(2, None)];
        let partly: Vec<&ResolvedEndpoint> = partly.iter().collect();
        assert_eq!(addrs(topology_endpoints(partly, Some("a"))), [1, 2]);
        assert!(topology_endpoints(Vec::new(), Some("a")).is_empty());
    }

    mod resolver {
        use super::super::*;
        use crate::objects::*;
        use proptest::prelude::*;

        /// The little world the passes change: 5 services, their slices and allocations.
        #[derive(Debug, Clone)]
        struct World {
            services: Vec<Service>,
            slices: Vec<EndpointSlice>,
            allocations: BTreeMap<ObjectRef, Allocation>,
            version: u64,
        }

        #[derive(Debug, Clone)]
        enum Op {
            /// Slice j of the list: one endpoint's address and readiness set (a new version
            /// unless the slice has none).
            Endpoint(usize, u8, bool),
            /// A new slice for service k (versioned or not).
            AddSlice(usize, bool),
            DropSlice(usize),
            /// Service k gone, or back.
            ToggleService(usize),
            /// Service k's allocation: another node port, or none.
            Allocation(usize, Option<u16>),
            /// Service k's port number.
            Port(usize, u16),
            /// Service k given twice (a changed copy after it).
            Twice(usize),
            /// Nothing changes.
            Nothing,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => (0usize..8, any::<u8>(), any::<bool>()).prop_map(|(j, a, r)| Op::Endpoint(j, a, r)),
                1 => (0usize..5, any::<bool>()).prop_map(|(k, v)| Op::AddSlice(k, v)),
                1 => (0usize..8).prop_map(Op::DropSlice),
                1 => (0usize..5).prop_map(Op::ToggleService),
                1 => (0usize..5, proptest::option::of(30000u16..30004)).prop_map(|(k, p)| Op::Allocation(k, p)),
                1 => (0usize..5, 80u16..83).prop_map(|(k, p)| Op::Port(k, p)),
                1 => (0usize..5).prop_map(Op::Twice),
                1 => Just(Op::Nothing),
            ]
        }

        fn name(k: usize) -> String {
            format!("svc-{k}")
        }

        fn service(k: usize, port: u16) -> Service {
            Service {
                meta: Meta {
                    name: name(k),
                    namespace: "default".into(),
                    ..Meta::default()
                },
                type_: ServiceType::NodePort,
                ports: vec![ServicePort {
                    name: String::new(),
                    protocol: Protocol::Tcp,
                    port,
                    target_port: TargetPort::Number(8080),
                    node_port: None,
                }],
                ..Service::default()
            }
        }

        fn slice(k: usize, n: u64, version: Option<u64>) -> EndpointSlice {
            EndpointSlice {
                meta: Meta {
                    name: format!("{}-{n}", name(k)),
                    namespace: "default".into(),
                    extra: MetaExtra {
                        resource_version: version.map(|v| v.to_string()),
                        ..Default::default()
                    }
                    .into(),
                    ..Meta::default()
                },
                service_name: name(k),
                address_type: AddressType::IPv4,
                endpoints: vec![Endpoint {
                    addresses: [IpAddr::from([10, 42, k as u8, n as u8])].into(),
                    conditions: EndpointConditions {
                        ready: true,
                        serving: true,
                        terminating: false,
                    },
                    node_name: None,
                    zone_hints: None,
                }],
                ports: vec![EndpointPort {
                    name: String::new(),
                    protocol: Protocol::Tcp,
                    port: 8080,
                }],
            }
        }

        fn world() -> World {
            let mut w = World {
                services: (0..5).map(|k| service(k, 80)).collect(),
                slices: Vec::new(),
                allocations: BTreeMap::new(),
                version: 100,
            };
            for k in 0..5 {
                w.slices.push(slice(k, 1, Some(k as u64)));
                // Service 4 has no allocation: it resolves to nothing until it gets one.
                if k < 4 {
                    w.allocations.insert(
                        ObjectRef::new("default", name(k)),
                        Allocation {
                            cluster_ip: Some(IpAddr::from([10, 43, 0, k as u8 + 1])),
                            secondary_cluster_ip: None,
                            node_ports: vec![Some(30000 + k as u16)],
                            health_check_node_port: None,
                        },
                    );
                }
            }
            w
        }

        fn apply(w: &mut World, op: &Op) {
            w.version += 1;
            let v = w.version;
            match op {
                Op::Endpoint(j, a, ready) => {
                    let n = w.slices.len();
                    if n == 0 {
                        return;
                    }
                    let sl = &mut w.slices[j % n];
                    sl.endpoints[0].addresses = [IpAddr::from([10, 42, 9, *a % 4])].into();
                    sl.endpoints[0].conditions.ready = *ready;
                    if sl.meta.extra.resource_version.is_some() {
                        sl.meta.extra.resource_version = Some(v.to_string());
                    }
                }
                Op::AddSlice(k, versioned) => {
                    w.slices.push(slice(*k, v, versioned.then_some(v)));
                }
                Op::DropSlice(j) => {
                    let n = w.slices.len();
                    if n > 0 {
                        w.slices.remove(j % n);
                    }
                }
                Op::ToggleService(k) => {
                    let before = w.services.len();
                    w.services.retain(|s| s.meta.name != name(*k));
                    if w.services.len() == before {
                        w.services.push(service(*k, 80));
                    }
                }
                Op::Allocation(k, port) => {
                    let id = ObjectRef::new("default", name(*k));
                    match port {
                        Some(p) => {
                            w.allocations.insert(
                                id,
                                Allocation {
                                    cluster_ip: Some(IpAddr::from([10, 43, 0, *k as u8 + 1])),
                                    secondary_cluster_ip: None,
                                    node_ports: vec![Some(*p)],
                                    health_check_node_port: None,
                                },
                            );
                        }
                        None => {
                            w.allocations.remove(&id);
                        }
                    }
                }
                Op::Port(k, p) => {
                    for s in w.services.iter_mut().filter(|s| s.meta.name == name(*k)) {
                        s.ports[0].port = *p;
                    }
                }
                Op::Twice(k) => {
                    if let Some(s) = w.services.iter().find(|s| s.meta.name == name(*k)) {
                        let mut copy = s.clone();
                        copy.ports[0].port = 9999;
                        w.services.push(copy);
                    }
                }
                Op::Nothing => {}
            }
        }

        /// What `resolve` gives, the first of a name counting.
        fn expected(w: &World) -> BTreeMap<ObjectRef, ResolvedService> {
            let mut m = BTreeMap::new();
            for r in resolve(&w.services, &w.allocations, &w.slices) {
                m.entry(r.id.clone()).or_insert(r);
            }
            m
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]

            /// Pass after pass, the resolver holds what `resolve` gives, and says exactly
            /// which services resolve differently than at the pass before.
            #[test]
            fn the_resolver_follows_resolve(ops in proptest::collection::vec(op(), 1..24)) {
                follow(&ops, false)?;
            }

            /// The same when each pass is told which services' inputs changed (as the API
            /// source tells it) and looks at those only.
            #[test]
            fn the_resolver_told_what_changed_follows_resolve(
                ops in proptest::collection::vec(op(), 1..24)
            ) {
                follow(&ops, true)?;
            }
        }

        /// The services whose inputs `op` changes in `w` (what a source that saw it names).
        fn named_by(w: &World, op: &Op) -> Changed {
            let mut c = Changed::none();
            let slice_of = |j: usize| {
                let n = w.slices.len();
                (n > 0).then(|| w.slices[j % n].service_name.clone())
            };
            let k_name = match op {
                Op::Endpoint(j, ..) | Op::DropSlice(j) => slice_of(*j),
                Op::AddSlice(k, _)
                | Op::ToggleService(k)
                | Op::Allocation(k, _)
                | Op::Port(k, _)
                | Op::Twice(k) => Some(name(*k)),
                Op::Nothing => None,
            };
            if let Some(n) = k_name {
                c.add("default", &n);
            }
            c
        }

        fn follow(ops: &[Op], hinted: bool) -> Result<(), TestCaseError> {
            let mut w = world();
            let mut r = Resolver::default();
            let mut before: BTreeMap<ObjectRef, ResolvedService> = BTreeMap::new();
            for (i, op) in std::iter::once(&Op::Nothing).chain(ops).enumerate() {
                // The first pass is told nothing: everything is new.
                let named = match hinted && i > 0 {
                    true => named_by(&w, op),
                    false => Changed::All,
                };
                apply(&mut w, op);
                let refs: Vec<&Service> = w.services.iter().collect();
                let ch = r.update_some(&refs, Allocations::Map(&w.allocations), &w.slices, &named);
                let now = expected(&w);
                let mine: BTreeMap<ObjectRef, ResolvedService> =
                    r.services().map(|s| (s.id.clone(), s.clone())).collect();
                prop_assert_eq!(&mine, &now);
                let changed: BTreeSet<ObjectRef> = now
                    .iter()
                    .filter(|(id, s)| before.get(*id) != Some(*s))
                    .map(|(id, _)| id.clone())
                    .collect();
                let removed: BTreeSet<ObjectRef> = before
                    .keys()
                    .filter(|id| !now.contains_key(*id))
                    .cloned()
                    .collect();
                prop_assert_eq!(ch.changed.iter().cloned().collect::<BTreeSet<_>>(), changed);
                prop_assert_eq!(
                    ch.changed.len(),
                    ch.changed.iter().collect::<BTreeSet<_>>().len()
                );
                prop_assert_eq!(ch.removed.iter().cloned().collect::<BTreeSet<_>>(), removed);
                prop_assert_eq!(r.changed(&ch).count(), ch.changed.len());
                let previous: BTreeMap<ObjectRef, ResolvedService> = before
                    .iter()
                    .filter(|(id, s)| now.get(*id) != Some(*s))
                    .map(|(id, s)| (id.clone(), s.clone()))
                    .collect();
                prop_assert_eq!(ch.previous.len(), previous.len());
                prop_assert_eq!(
                    ch.previous
                        .iter()
                        .map(|s| (s.id.clone(), s.clone()))
                        .collect::<BTreeMap<_, _>>(),
                    previous
                );
                before = now;
            }
            Ok(())
        }

        #[test]
        fn unchanged_versioned_inputs_are_not_resolved_again() {
            let mut w = world();
            let mut r = Resolver::default();
            let ch = r.update(&w.services, &w.allocations, &w.slices);
            assert_eq!(ch.changed.len(), 4);
            assert_eq!(ch.resolved_again, 5);
            let ch = r.update(&w.services, &w.allocations, &w.slices);
            assert!(ch.is_empty());
            assert_eq!(ch.resolved_again, 0);
            // One slice written: its service only.
            apply(&mut w, &Op::Endpoint(2, 7, true));
            let ch = r.update(&w.services, &w.allocations, &w.slices);
            assert_eq!(ch.changed, vec![ObjectRef::new("default", "svc-2")]);
            assert_eq!(ch.resolved_again, 1);
            // A slice without a version: its service is resolved every pass (and found
            // unchanged when it is).
            w.slices[0].meta.extra.resource_version = None;
            let ch = r.update(&w.services, &w.allocations, &w.slices);
            assert_eq!(ch.resolved_again, 1);
            assert!(ch.is_empty());
            let ch = r.update(&w.services, &w.allocations, &w.slices);
            assert_eq!(ch.resolved_again, 1);
            r.reset();
            let ch = r.update(&w.services, &w.allocations, &w.slices);
            assert_eq!(ch.changed.len(), 4);
        }
    }
}
