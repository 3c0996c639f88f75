//! Allocation of cluster IPs and node ports (pure).
//!
//! The state ([`AllocState`]) is what every agent sharing a state directory agrees on; the I/O
//! (locking, reading and writing it) lives in the agent. [`allocate`] takes the state and the
//! services of one snapshot and returns the next state plus, per service, its allocation or the
//! reason it was rejected. It is deterministic: the same inputs give the same outputs, whatever
//! order the services come in.
//!
//! Rules, as Kubernetes does them:
//! - a value already held by a service stays with it (stable across restarts and file order);
//! - explicit values (spec.clusterIP, spec.ports[].nodePort) are honoured when valid and free;
//!   a conflict rejects only the service that asked, naming the holder;
//! - dynamic values come from the upper part of the range first (the lower "static band" is kept
//!   for explicit requests such as 10.43.0.1 and 10.43.0.10), starting at a hash of the
//!   service's name and probing upward;
//! - an entry is released when its service is gone from a snapshot taken after the entry was
//!   made (so an agent reading an older snapshot never frees what another agent just allocated).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};

use crate::cidr::Cidr;
use crate::objects::{
    ClusterIpSpec, IpFamily, IpFamilyPolicy, ObjectRef, Protocol, Service, ServiceType,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocConfig {
    /// Service CIDRs; dynamic cluster IPs come from the first one of each family (a
    /// single-stack service without ipFamilies gets the first one's family).
    pub service_cidrs: Vec<Cidr>,
    pub node_port_range: RangeInclusive<u16>,
    /// How long a Service must be gone before what it held is released (ms; 0: at once).
    pub release_grace_ms: u64,
}

impl Default for AllocConfig {
    fn default() -> Self {
        AllocConfig {
            service_cidrs: vec![Cidr::new(IpAddr::from([10, 43, 0, 0]), 16).expect("valid")],
            node_port_range: 30000..=32767,
            release_grace_ms: 0,
        }
    }
}

/// What one service holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ServiceAlloc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<IpAddr>,
    /// The other family's cluster IP of a dual-stack service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary_cluster_ip: Option<IpAddr>,
    /// "<port>/<PROTOCOL>" -> node port.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_ports: BTreeMap<String, u16>,
    /// When this entry was last changed (ms since the epoch, as passed in).
    pub updated_ms: u64,
    /// Since when its Service has been missing from the snapshots (held for the grace period).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gone_since_ms: Option<u64>,
}

/// The shared allocation state, keyed by "namespace/name".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AllocState {
    pub services: BTreeMap<String, ServiceAlloc>,
}

/// The values a service ends up with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// None for headless and ExternalName services.
    pub cluster_ip: Option<IpAddr>,
    /// The other family's cluster IP of a dual-stack service (spec.clusterIPs[1]).
    pub secondary_cluster_ip: Option<IpAddr>,
    /// One entry per spec.ports[i]; Some for NodePort and LoadBalancer services.
    pub node_ports: Vec<Option<u16>>,
    /// spec.healthCheckNodePort: LoadBalancer services with externalTrafficPolicy Local.
    pub health_check_node_port: Option<u16>,
}

/// The key of the health-check node port among a [`ServiceAlloc`]'s node ports (it comes from
/// the same range and must not clash with them).
pub const HEALTH_CHECK_KEY: &str = "healthCheckNodePort";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Service {service}: {field}: {message}")]
pub struct AllocError {
    pub service: ObjectRef,
    pub field: String,
    pub message: String,
}

pub type AllocResults = BTreeMap<ObjectRef, Result<Allocation, AllocError>>;

pub fn port_key(port: u16, protocol: Protocol) -> String {
    format!("{port}/{}", protocol.as_k8s())
}

fn key_of(r: &ObjectRef) -> String {
    format!("{}/{}", r.namespace, r.name)
}

/// FNV-1a 64 (the `fnv` crate's hasher), stable across builds (unlike std's hasher): spreads
/// start offsets here, and is ferry's one FNV for names elsewhere (the lab's hashes). Its values
/// are persisted and compared across agents: never change it.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = fnv::FnvHasher::default();
    h.write(bytes);
    h.finish()
}

/// For an entry whose Service is missing: `Some(since when it is gone)` while it is held for
/// the grace period (the first snapshot without it starts the period), None once released.
pub fn still_in_grace(gone_since_ms: Option<u64>, grace_ms: u64, now_ms: u64) -> Option<u64> {
    if grace_ms == 0 {
        return None;
    }
    let since = gone_since_ms.unwrap_or(now_ms);
    (now_ms.saturating_sub(since) < grace_ms).then_some(since)
}

/// Size of the low band kept for explicit requests: min(max(16, size/16), 256), as Kubernetes.
fn static_band(size: u128) -> u128 {
    (size / 16).clamp(16, 256).min(size / 2)
}

/// Allocates for one snapshot. `snapshot_ms` is when the snapshot's reading began; `now_ms`
/// stamps entries changed now.
pub fn allocate(
    state: &AllocState,
    services: &[Service],
    cfg: &AllocConfig,
    snapshot_ms: u64,
    now_ms: u64,
) -> (AllocState, AllocResults) {
    let mut order: Vec<&Service> = services.iter().collect();
    order.sort_by(|a, b| {
        let ka = (
            a.meta.extra.creation_timestamp.as_deref().unwrap_or(""),
            a.meta.object_ref(),
        );
        let kb = (
            b.meta.extra.creation_timestamp.as_deref().unwrap_or(""),
            b.meta.object_ref(),
        );
        ka.cmp(&kb)
    });
    let present: BTreeSet<String> = order.iter().map(|s| key_of(&s.meta.object_ref())).collect();

    // Keep the entries of present services, of absent ones that a newer snapshot might see,
    // and of those gone for less than the grace period (a file rewritten, an agent restarted).
    let mut next = AllocState::default();
    for (k, v) in &state.services {
        if present.contains(k) || v.updated_ms >= snapshot_ms {
            next.services.insert(k.clone(), v.clone());
        } else if let Some(gone) = still_in_grace(v.gone_since_ms, cfg.release_grace_ms, now_ms) {
            next.services.insert(
                k.clone(),
                ServiceAlloc {
                    gone_since_ms: Some(gone),
                    ..v.clone()
                },
            );
        }
    }

    // Who holds what, from the kept entries.
    let mut ip_holder: BTreeMap<IpAddr, String> = BTreeMap::new();
    let mut port_holder: BTreeMap<u16, String> = BTreeMap::new();
    for (k, v) in &next.services {
        for ip in v.cluster_ip.iter().chain(&v.secondary_cluster_ip) {
            ip_holder.entry(*ip).or_insert_with(|| k.clone());
        }
        for p in v.node_ports.values() {
            port_holder.entry(*p).or_insert_with(|| k.clone());
        }
    }

    let mut results = AllocResults::new();
    for svc in order {
        let r = svc.meta.object_ref();
        let k = key_of(&r);
        let old = next.services.get(&k).cloned().unwrap_or_default();
        match allocate_one(svc, &k, &old, cfg, &ip_holder, &port_holder) {
            Ok((entry, alloc)) => {
                // Release what the service no longer holds, claim what it now holds.
                for ip in old.cluster_ip.iter().chain(&old.secondary_cluster_ip) {
                    let kept =
                        entry.cluster_ip == Some(*ip) || entry.secondary_cluster_ip == Some(*ip);
                    if !kept && ip_holder.get(ip) == Some(&k) {
                        ip_holder.remove(ip);
                    }
                }
                for p in old.node_ports.values() {
                    if !entry.node_ports.values().any(|q| q == p) && port_holder.get(p) == Some(&k)
                    {
                        port_holder.remove(p);
                    }
                }
                for ip in entry.cluster_ip.iter().chain(&entry.secondary_cluster_ip) {
                    ip_holder.insert(*ip, k.clone());
                }
                for p in entry.node_ports.values() {
                    port_holder.insert(*p, k.clone());
                }
                let changed = entry.cluster_ip != old.cluster_ip
                    || entry.secondary_cluster_ip != old.secondary_cluster_ip
                    || entry.node_ports != old.node_ports;
                let stored = ServiceAlloc {
                    updated_ms: if changed || old.updated_ms == 0 {
                        now_ms
                    } else {
                        old.updated_ms
                    },
                    gone_since_ms: None,
                    ..entry
                };
                if stored.cluster_ip.is_none() && stored.node_ports.is_empty() {
                    next.services.remove(&k);
                } else {
                    next.services.insert(k, stored);
                }
                results.insert(r, Ok(alloc));
            }
            Err(e) => {
                results.insert(r, Err(e));
            }
        }
    }
    (next, results)
}

fn allocate_one(
    svc: &Service,
    key: &str,
    old: &ServiceAlloc,
    cfg: &AllocConfig,
    ip_holder: &BTreeMap<IpAddr, String>,
    port_holder: &BTreeMap<u16, String>,
) -> Result<(ServiceAlloc, Allocation), AllocError> {
    let err = |field: String, message: String| AllocError {
        service: svc.meta.object_ref(),
        field,
        message,
    };
    let free_ip = |ip: &IpAddr| ip_holder.get(ip).is_none_or(|h| h == key);
    let free_port = |p: &u16| port_holder.get(p).is_none_or(|h| h == key);

    let wants_ip = svc.type_ != ServiceType::ExternalName && !svc.is_headless();
    // One cluster IP of `family`: the one asked for (valid, in a service CIDR, free), else the
    // one held, else one picked from the first service CIDR of that family.
    let one_ip = |family: IpFamily,
                  explicit: Option<IpAddr>,
                  held: Option<IpAddr>,
                  field: &str|
     -> Result<IpAddr, AllocError> {
        if let Some(ip) = explicit {
            let Some(cidr) = cfg.service_cidrs.iter().find(|c| c.contains(ip)) else {
                let ranges: Vec<String> = cfg.service_cidrs.iter().map(|c| c.to_string()).collect();
                return Err(err(
                    field.into(),
                    format!("{ip} is not in the service CIDR {}", ranges.join(", ")),
                ));
            };
            if cidr.is_ipv4()
                && (cidr.offset_of(ip) == Some(0) || cidr.offset_of(ip) == Some(cidr.size() - 1))
            {
                return Err(err(
                    field.into(),
                    format!("{ip} is the network or broadcast address of {cidr}"),
                ));
            }
            if !free_ip(&ip) {
                let holder = ip_holder.get(&ip).map(String::as_str).unwrap_or("?");
                return Err(err(
                    field.into(),
                    format!("{ip} is already allocated to Service {holder}"),
                ));
            }
            return Ok(ip);
        }
        let keep = held.filter(|ip| {
            IpFamily::of(*ip) == family
                && cfg.service_cidrs.iter().any(|c| c.contains(*ip))
                && free_ip(ip)
        });
        if let Some(ip) = keep {
            return Ok(ip);
        }
        let Some(cidr) = cfg
            .service_cidrs
            .iter()
            .find(|c| IpFamily::of(c.network()) == family)
        else {
            return Err(err(
                field.into(),
                format!("no {} service CIDR configured", family.as_k8s()),
            ));
        };
        pick_ip(cidr, key, |ip| free_ip(ip))
            .ok_or_else(|| err(field.into(), format!("the service CIDR {cidr} is full")))
    };
    let (cluster_ip, secondary_cluster_ip) = if !wants_ip {
        (None, None)
    } else {
        let explicit = match svc.cluster_ip {
            ClusterIpSpec::Ip(ip) => Some(ip),
            _ => None,
        };
        // The families, as the API server chooses them: those of the addresses given, else
        // spec.ipFamilies, else the first service CIDR's family (then the other one).
        let primary = explicit
            .map(IpFamily::of)
            .or(svc.ip_families.first().copied())
            .or(cfg.service_cidrs.first().map(|c| IpFamily::of(c.network())))
            .unwrap_or(IpFamily::IPv4);
        let field = if explicit.is_some() || svc.ip_families.is_empty() {
            "spec.clusterIP"
        } else {
            "spec.ipFamilies[0]"
        };
        let first = one_ip(primary, explicit, old.cluster_ip, field)?;
        let second_family = primary.other();
        let has_family = cfg
            .service_cidrs
            .iter()
            .any(|c| IpFamily::of(c.network()) == second_family);
        let second = match svc.effective_ip_family_policy() {
            IpFamilyPolicy::SingleStack => None,
            IpFamilyPolicy::PreferDualStack
                if !has_family && svc.extra.secondary_cluster_ip.is_none() =>
            {
                None
            }
            IpFamilyPolicy::RequireDualStack if !has_family => {
                return Err(err(
                    "spec.ipFamilyPolicy".into(),
                    format!(
                        "RequireDualStack, but no {} service CIDR is configured",
                        second_family.as_k8s()
                    ),
                ));
            }
            _ => Some(one_ip(
                second_family,
                svc.extra.secondary_cluster_ip,
                old.secondary_cluster_ip,
                if svc.extra.secondary_cluster_ip.is_some() {
                    "spec.clusterIPs[1]"
                } else {
                    "spec.ipFamilyPolicy"
                },
            )?),
        };
        (Some(first), second)
    };

    let mut node_ports = BTreeMap::new();
    let mut per_port = Vec::with_capacity(svc.ports.len());
    if svc.type_.has_node_ports() {
        // Ports claimed by this service in this pass (a TCP and a UDP port may share a number).
        let mut mine: BTreeMap<u16, ()> = BTreeMap::new();
        for (i, p) in svc.ports.iter().enumerate() {
            let pk = port_key(p.port, p.protocol);
            let field = format!("spec.ports[{i}].nodePort");
            let chosen = if let Some(np) = p.node_port {
                if !cfg.node_port_range.contains(&np) {
                    return Err(err(
                        field,
                        format!(
                            "{np} is outside the node port range {}-{}",
                            cfg.node_port_range.start(),
                            cfg.node_port_range.end()
                        ),
                    ));
                }
                if !free_port(&np) {
                    let holder = port_holder.get(&np).map(String::as_str).unwrap_or("?");
                    return Err(err(
                        field,
                        format!("{np} is already allocated to Service {holder}"),
                    ));
                }
                if node_ports
                    .iter()
                    .any(|(k2, v2): (&String, &u16)| *v2 == np && k2.ends_with(p.protocol.as_k8s()))
                {
                    return Err(err(field, format!("{np} is used twice by this service")));
                }
                np
            } else if let Some(np) = old.node_ports.get(&pk).copied().filter(|np| {
                cfg.node_port_range.contains(np) && free_port(np) && !mine.contains_key(np)
            }) {
                np
            } else {
                pick_port(&cfg.node_port_range, &format!("{key}/{pk}"), |np| {
                    free_port(np) && !mine.contains_key(np)
                })
                .ok_or_else(|| err(field, "the node port range is full".into()))?
            };
            mine.insert(chosen, ());
            node_ports.insert(pk, chosen);
            per_port.push(Some(chosen));
        }
    } else {
        for (i, p) in svc.ports.iter().enumerate() {
            if p.node_port.is_some() {
                return Err(err(
                    format!("spec.ports[{i}].nodePort"),
                    format!("may not be set on a Service of type {}", svc.type_.as_k8s()),
                ));
            }
            per_port.push(None);
        }
    }

    // The health-check node port, as kube-apiserver allocates it: LoadBalancer services with
    // externalTrafficPolicy Local; explicit when valid and free, else kept, else picked.
    let field = "spec.healthCheckNodePort".to_string();
    let wants_health = svc.type_ == ServiceType::LoadBalancer
        && svc.external_traffic_policy == crate::objects::TrafficPolicy::Local;
    let health_check_node_port = if !wants_health {
        if svc.extra.health_check_node_port.is_some() {
            return Err(err(
                field,
                "may only be set on a LoadBalancer Service with externalTrafficPolicy Local".into(),
            ));
        }
        None
    } else {
        let taken_here = |p: &u16| node_ports.values().any(|q| q == p);
        let hc = if let Some(np) = svc.extra.health_check_node_port {
            if !cfg.node_port_range.contains(&np) {
                return Err(err(
                    field,
                    format!(
                        "{np} is outside the node port range {}-{}",
                        cfg.node_port_range.start(),
                        cfg.node_port_range.end()
                    ),
                ));
            }
            if !free_port(&np) || taken_here(&np) {
                let holder = port_holder.get(&np).map(String::as_str).unwrap_or(key);
                return Err(err(
                    field,
                    format!("{np} is already allocated to Service {holder}"),
                ));
            }
            np
        } else if let Some(np) = old
            .node_ports
            .get(HEALTH_CHECK_KEY)
            .copied()
            .filter(|np| cfg.node_port_range.contains(np) && free_port(np) && !taken_here(np))
        {
            np
        } else {
            pick_port(
                &cfg.node_port_range,
                &format!("{key}/{HEALTH_CHECK_KEY}"),
                |np| free_port(np) && !taken_here(np),
            )
            .ok_or_else(|| err(field, "the node port range is full".into()))?
        };
        node_ports.insert(HEALTH_CHECK_KEY.to_string(), hc);
        Some(hc)
    };

    Ok((
        ServiceAlloc {
            cluster_ip,
            secondary_cluster_ip,
            node_ports,
            updated_ms: old.updated_ms,
            gone_since_ms: None,
        },
        Allocation {
            cluster_ip,
            secondary_cluster_ip,
            node_ports: per_port,
            health_check_node_port,
        },
    ))
}

/// Probe from a hash-derived start in the dynamic band, then the static band.
fn pick_ip(cidr: &Cidr, key: &str, free: impl Fn(&IpAddr) -> bool) -> Option<IpAddr> {
    let size = cidr.size();
    // Usable offsets: 1..size-1 for IPv4 (no network/broadcast), 1..size for IPv6.
    let (lo, hi) = if cidr.is_ipv4() {
        (1u128, size.saturating_sub(1))
    } else {
        (1u128, size)
    };
    if hi <= lo {
        return None;
    }
    let band = static_band(size).max(lo);
    let probe = |from: u128, to: u128| -> Option<IpAddr> {
        if to <= from {
            return None;
        }
        let span = to - from;
        let start = u128::from(fnv1a(key.as_bytes())) % span;
        // Bounded: at most 2^20 probes, then give up on this band (huge IPv6 ranges).
        for i in 0..span.min(1 << 20) {
            let ip = cidr.nth(from + (start + i) % span)?;
            if free(&ip) {
                return Some(ip);
            }
        }
        None
    };
    probe(band, hi).or_else(|| probe(lo, band.min(hi)))
}

fn pick_port(range: &RangeInclusive<u16>, key: &str, free: impl Fn(&u16) -> bool) -> Option<u16> {
    let lo = u32::from(*range.start());
    let hi = u32::from(*range.end()) + 1;
    if hi <= lo {
        return None;
    }
    let band = lo + (static_band(u128::from(hi - lo)) as u32);
    let probe = |from: u32, to: u32| -> Option<u16> {
        if to <= from {
            return None;
        }
        let span = to - from;
        let start = (fnv1a(key.as_bytes()) % u64::from(span)) as u32;
        (0..span)
            .map(|i| (from + (start + i) % span) as u16)
            .find(|p| free(p))
    };
    probe(band, hi).or_else(|| probe(lo, band))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::*;
    use proptest::prelude::*;

    fn svc(name: &str, t: ServiceType, ip: ClusterIpSpec, ports: &[(u16, Option<u16>)]) -> Service {
        Service {
            meta: Meta {
                name: name.into(),
                namespace: "default".into(),
                ..Meta::default()
            },
            type_: t,
            cluster_ip: ip,
            ports: ports
                .iter()
                .enumerate()
                .map(|(i, (p, np))| ServicePort {
                    name: format!("p{i}"),
                    protocol: Protocol::Tcp,
                    port: *p,
                    target_port: TargetPort::Number(*p),
                    node_port: *np,
                })
                .collect(),
            selector: Default::default(),
            external_traffic_policy: TrafficPolicy::Cluster,
            internal_traffic_policy: TrafficPolicy::Cluster,
            ..Default::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ok(r: &AllocResults, name: &str) -> Allocation {
        r[&ObjectRef::new("default", name)].clone().unwrap()
    }

    fn dual_cfg() -> AllocConfig {
        AllocConfig {
            service_cidrs: vec![
                "10.43.0.0/16".parse().unwrap(),
                "fd00:43::/108".parse().unwrap(),
            ],
            ..AllocConfig::default()
        }
    }

    fn err_of(r: &AllocResults, name: &str) -> AllocError {
        r[&ObjectRef::new("default", name)].clone().unwrap_err()
    }

    #[test]
    fn ip_families_as_the_api_server_allocates_them() {
        let v4only = AllocConfig::default();
        let dual = dual_cfg();
        let base = svc(
            "web",
            ServiceType::ClusterIP,
            ClusterIpSpec::Auto,
            &[(80, None)],
        );
        let with = |policy: Option<IpFamilyPolicy>, families: &[IpFamily]| Service {
            ip_family_policy: policy,
            ip_families: families.to_vec(),
            ..base.clone()
        };
        let run = |cfg: &AllocConfig, s: &Service| {
            allocate(&AllocState::default(), std::slice::from_ref(s), cfg, 0, 1)
        };
        // SingleStack (the default): one address, of the first CIDR's family.
        let (_, r) = run(&dual, &base);
        let a = ok(&r, "web");
        assert!(a.cluster_ip.unwrap().is_ipv4() && a.secondary_cluster_ip.is_none());
        // PreferDualStack: both when both families are configured, else one.
        let prefer = with(Some(IpFamilyPolicy::PreferDualStack), &[]);
        let (st, r) = run(&dual, &prefer);
        let a = ok(&r, "web");
        assert!(a.cluster_ip.unwrap().is_ipv4());
        let second = a.secondary_cluster_ip.expect("an IPv6 cluster IP");
        assert!(dual.service_cidrs[1].contains(second));
        assert_eq!(
            st.services["default/web"].secondary_cluster_ip,
            Some(second)
        );
        let (_, r) = run(&v4only, &prefer);
        assert_eq!(ok(&r, "web").secondary_cluster_ip, None);
        // RequireDualStack without an IPv6 service CIDR: the Service is rejected.
        let require = with(Some(IpFamilyPolicy::RequireDualStack), &[]);
        let (_, r) = run(&v4only, &require);
        let e = err_of(&r, "web");
        assert_eq!(e.field, "spec.ipFamilyPolicy");
        assert!(e.message.contains("IPv6"), "{e}");
        // ipFamilies [IPv6]: an IPv6 address first; [IPv6, IPv4]: IPv6 primary, both.
        let (_, r) = run(&dual, &with(None, &[IpFamily::IPv6]));
        let a = ok(&r, "web");
        assert!(a.cluster_ip.unwrap().is_ipv6() && a.secondary_cluster_ip.is_none());
        let (_, r) = run(&dual, &with(None, &[IpFamily::IPv6, IpFamily::IPv4]));
        let a = ok(&r, "web");
        assert!(a.cluster_ip.unwrap().is_ipv6());
        assert!(a.secondary_cluster_ip.unwrap().is_ipv4());
        let e = err_of(&run(&v4only, &with(None, &[IpFamily::IPv6])).1, "web");
        assert_eq!(e.field, "spec.ipFamilies[0]");
        // Explicit addresses of both families are honoured (and must be in the CIDRs).
        let explicit = Service {
            cluster_ip: ClusterIpSpec::Ip(ip("10.43.0.10")),
            extra: ServiceExtra {
                secondary_cluster_ip: Some(ip("fd00:43::10")),
                ..ServiceExtra::default()
            }
            .into(),
            ..base.clone()
        };
        let (st, r) = run(&dual, &explicit);
        let a = ok(&r, "web");
        assert_eq!(a.cluster_ip, Some(ip("10.43.0.10")));
        assert_eq!(a.secondary_cluster_ip, Some(ip("fd00:43::10")));
        let e = err_of(&run(&v4only, &explicit).1, "web");
        assert_eq!(e.field, "spec.ipFamilyPolicy");
        // The secondary address is held: another service asking for it is rejected, and it is
        // kept across snapshots.
        let other = Service {
            meta: Meta {
                name: "other".into(),
                namespace: "default".into(),
                ..Meta::default()
            },
            cluster_ip: ClusterIpSpec::Ip(ip("10.43.0.11")),
            extra: ServiceExtra {
                secondary_cluster_ip: Some(ip("fd00:43::10")),
                ..ServiceExtra::default()
            }
            .into(),
            ..base.clone()
        };
        let (st2, r) = allocate(&st, &[explicit.clone(), other], &dual, 2, 3);
        let e = err_of(&r, "other");
        assert_eq!(e.field, "spec.clusterIPs[1]");
        assert!(e.message.contains("default/web"), "{e}");
        let (_, r) = allocate(&st2, std::slice::from_ref(&prefer), &dual, 0, 4);
        assert_eq!(ok(&r, "web").secondary_cluster_ip, Some(ip("fd00:43::10")));
    }

    #[test]
    fn health_check_node_port_for_local_load_balancers_stable_and_released() {
        let cfg = AllocConfig::default();
        let mut lb = svc(
            "lb",
            ServiceType::LoadBalancer,
            ClusterIpSpec::Auto,
            &[(80, None)],
        );
        let (_, r) = allocate(&AllocState::default(), &[lb.clone()], &cfg, 0, 1);
        assert_eq!(
            ok(&r, "lb").health_check_node_port,
            None,
            "Cluster policy: none"
        );
        lb.external_traffic_policy = TrafficPolicy::Local;
        let (st, r) = allocate(&AllocState::default(), &[lb.clone()], &cfg, 0, 1);
        let a = ok(&r, "lb");
        let hc = a.health_check_node_port.expect("allocated");
        assert!(cfg.node_port_range.contains(&hc));
        assert_ne!(
            Some(hc),
            a.node_ports[0],
            "distinct from the service's node port"
        );
        assert_eq!(st.services["default/lb"].node_ports[HEALTH_CHECK_KEY], hc);
        // Stable, and held against an explicit request by another service.
        let (st2, r2) = allocate(&st, &[lb.clone()], &cfg, 2, 3);
        assert_eq!(ok(&r2, "lb"), a);
        let other = svc(
            "other",
            ServiceType::NodePort,
            ClusterIpSpec::Auto,
            &[(80, Some(hc))],
        );
        let (_, r3) = allocate(&st2, &[lb.clone(), other], &cfg, 4, 5);
        let e = r3[&ObjectRef::new("default", "other")].clone().unwrap_err();
        assert!(
            e.message
                .contains("already allocated to Service default/lb"),
            "{e}"
        );
        // An explicit one is honoured; back to Cluster policy, it is released.
        let mut explicit = lb.clone();
        explicit.extra.health_check_node_port = Some(31999);
        let (_, r4) = allocate(&st2, &[explicit], &cfg, 4, 5);
        assert_eq!(ok(&r4, "lb").health_check_node_port, Some(31999));
        lb.external_traffic_policy = TrafficPolicy::Cluster;
        let (st5, r5) = allocate(&st2, &[lb], &cfg, 4, 5);
        assert_eq!(ok(&r5, "lb").health_check_node_port, None);
        assert!(!st5.services["default/lb"]
            .node_ports
            .contains_key(HEALTH_CHECK_KEY));
    }

    #[test]
    fn dynamic_values_are_in_range_outside_static_band_and_stable() {
        let cfg = AllocConfig::default();
        let s = vec![svc(
            "web",
            ServiceType::NodePort,
            ClusterIpSpec::Auto,
            &[(80, None)],
        )];
        let (st, r) = allocate(&AllocState::default(), &s, &cfg, 0, 1);
        let a = ok(&r, "web");
        let cip = a.cluster_ip.unwrap();
        let off = cfg.service_cidrs[0].offset_of(cip).unwrap();
        assert!(off >= 256, "dynamic IP {cip} in the static band");
        let np = a.node_ports[0].unwrap();
        assert!((30173..=32767).contains(&np), "{np}");
        // Same answer on the next pass and from empty state again (deterministic).
        let (st2, r2) = allocate(&st, &s, &cfg, 2, 3);
        assert_eq!(ok(&r2, "web"), a);
        assert_eq!(st2, st);
        let (_, r3) = allocate(&AllocState::default(), &s, &cfg, 0, 1);
        assert_eq!(ok(&r3, "web"), a);
    }

    /// Pinned: agents of different builds must pick the same addresses and ports for the same
    /// services (the picks start at an FNV-1a hash of the service's key).
    #[test]
    fn hashes_and_picks_are_pinned() {
        // FNV-1a 64 test vectors.
        assert_eq!(fnv1a(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x85944171f73967e8);
        assert_eq!(fnv1a(b"default/web"), 0x9d2ba50824d634bb);
        let s = vec![svc(
            "web",
            ServiceType::NodePort,
            ClusterIpSpec::Auto,
            &[(80, None)],
        )];
        let (_, r) = allocate(&AllocState::default(), &s, &AllocConfig::default(), 0, 1);
        let a = ok(&r, "web");
        assert_eq!(a.cluster_ip, Some(IpAddr::from([10, 43, 12, 129])));
        assert_eq!(a.node_ports, [Some(32157)]);
    }

    #[test]
    fn explicit_values_are_honoured_and_conflicts_reject_only_the_asker() {
        let cfg = AllocConfig::default();
        let a = svc(
            "a",
            ServiceType::NodePort,
            ClusterIpSpec::Ip(ip("10.43.0.10")),
            &[(53, Some(30053))],
        );
        let (st, r) = allocate(&AllocState::default(), std::slice::from_ref(&a), &cfg, 0, 1);
        assert_eq!(ok(&r, "a").cluster_ip, Some(ip("10.43.0.10")));
        assert_eq!(ok(&r, "a").node_ports, vec![Some(30053)]);
        let b = svc(
            "b",
            ServiceType::NodePort,
            ClusterIpSpec::Ip(ip("10.43.0.10")),
            &[(80, None)],
        );
        let c = svc(
            "c",
            ServiceType::NodePort,
            ClusterIpSpec::Auto,
            &[(80, Some(30053))],
        );
        let d = svc(
            "d",
            ServiceType::ClusterIP,
            ClusterIpSpec::Ip(ip("10.99.0.1")),
            &[(80, None)],
        );
        let e = svc(
            "e",
            ServiceType::ClusterIP,
            ClusterIpSpec::Auto,
            &[(80, Some(30100))],
        );
        let f = svc(
            "f",
            ServiceType::NodePort,
            ClusterIpSpec::Auto,
            &[(80, Some(80))],
        );
        let all = vec![b, a, c, d, e, f];
        let (_, r) = allocate(&st, &all, &cfg, 2, 3);
        assert!(r[&ObjectRef::new("default", "a")].is_ok());
        let eb = r[&ObjectRef::new("default", "b")].clone().unwrap_err();
        assert_eq!(eb.field, "spec.clusterIP");
        assert!(eb.message.contains("default/a"), "{eb}");
        let ec = r[&ObjectRef::new("default", "c")].clone().unwrap_err();
        assert_eq!(ec.field, "spec.ports[0].nodePort");
        assert!(ec
            .message
            .contains("already allocated to Service default/a"));
        let ed = r[&ObjectRef::new("default", "d")].clone().unwrap_err();
        assert!(
            ed.message.contains("not in the service CIDR 10.43.0.0/16"),
            "{ed}"
        );
        let ee = r[&ObjectRef::new("default", "e")].clone().unwrap_err();
        assert!(ee.message.contains("ClusterIP"), "{ee}");
        let ef = r[&ObjectRef::new("default", "f")].clone().unwrap_err();
        assert!(ef.message.contains("outside the node port range"), "{ef}");
    }

    #[test]
    fn older_explicit_claim_wins_within_one_snapshot() {
        let cfg = AllocConfig::default();
        let mut a = svc(
            "zz-old",
            ServiceType::ClusterIP,
            ClusterIpSpec::Ip(ip("10.43.0.20")),
            &[(80, None)],
        );
        a.meta.extra.creation_timestamp = Some("2020-01-01T00:00:00Z".into());
        let mut b = svc(
            "aa-new",
            ServiceType::ClusterIP,
            ClusterIpSpec::Ip(ip("10.43.0.20")),
            &[(80, None)],
        );
        b.meta.extra.creation_timestamp = Some("2021-01-01T00:00:00Z".into());
        for list in [vec![a.clone(), b.clone()], vec![b.clone(), a.clone()]] {
            let (_, r) = allocate(&AllocState::default(), &list, &cfg, 0, 1);
            assert!(r[&ObjectRef::new("default", "zz-old")].is_ok());
            assert!(r[&ObjectRef::new("default", "aa-new")].is_err());
        }
    }

    #[test]
    fn release_on_delete_only_for_newer_snapshots_and_type_change_frees_node_ports() {
        let cfg = AllocConfig::default();
        let s = svc(
            "web",
            ServiceType::NodePort,
            ClusterIpSpec::Auto,
            &[(80, None)],
        );
        let (st, _) = allocate(
            &AllocState::default(),
            std::slice::from_ref(&s),
            &cfg,
            0,
            100,
        );
        // A snapshot that began before the allocation does not free it.
        let (st_old, _) = allocate(&st, &[], &cfg, 50, 120);
        assert!(st_old.services.contains_key("default/web"));
        // A snapshot that began after does.
        let (st_new, _) = allocate(&st, &[], &cfg, 150, 160);
        assert!(st_new.services.is_empty());
        // NodePort -> ClusterIP: cluster IP kept, node ports released.
        let mut c = s.clone();
        c.type_ = ServiceType::ClusterIP;
        let (st2, r) = allocate(&st, &[c], &cfg, 200, 210);
        assert_eq!(ok(&r, "web").node_ports, vec![None]);
        assert_eq!(
            st2.services["default/web"].cluster_ip,
            st.services["default/web"].cluster_ip
        );
        assert!(st2.services["default/web"].node_ports.is_empty());
        // Headless: nothing held.
        let h = svc(
            "web",
            ServiceType::ClusterIP,
            ClusterIpSpec::None,
            &[(80, None)],
        );
        let (st3, r) = allocate(&st, &[h], &cfg, 200, 210);
        assert_eq!(ok(&r, "web").cluster_ip, None);
        assert!(st3.services.is_empty());
    }

    #[test]
    fn values_of_vanished_services_are_held_for_the_grace_period() {
        let cfg = AllocConfig {
            service_cidrs: vec!["10.43.0.0/30".parse().unwrap()],
            node_port_range: 30000..=30000,
            release_grace_ms: 5_000,
        };
        let a = svc(
            "a",
            ServiceType::NodePort,
            ClusterIpSpec::Auto,
            &[(80, None)],
        );
        let b = svc(
            "b",
            ServiceType::NodePort,
            ClusterIpSpec::Auto,
            &[(80, None)],
        );
        let (st, r) = allocate(
            &AllocState::default(),
            std::slice::from_ref(&a),
            &cfg,
            1_000,
            1_000,
        );
        let held = ok(&r, "a");
        // a vanishes; b cannot have the only node port while a may come back.
        let (st, r) = allocate(&st, std::slice::from_ref(&b), &cfg, 2_000, 2_000);
        assert!(r[&ObjectRef::new("default", "b")].is_err());
        assert_eq!(st.services["default/a"].gone_since_ms, Some(2_000));
        let (back, r) = allocate(&st, std::slice::from_ref(&a), &cfg, 6_000, 6_000);
        assert_eq!(ok(&r, "a"), held, "the same values after coming back");
        assert_eq!(back.services["default/a"].gone_since_ms, None);
        let (_, r) = allocate(&st, std::slice::from_ref(&b), &cfg, 7_000, 7_000);
        assert_eq!(
            ok(&r, "b").node_ports,
            vec![Some(30000)],
            "released after the grace period"
        );
    }

    #[test]
    fn tiny_ranges_fill_up_with_a_clear_error() {
        let cfg = AllocConfig {
            service_cidrs: vec!["10.43.0.0/29".parse().unwrap()],
            node_port_range: 30000..=30001,
            ..AllocConfig::default()
        };
        let list: Vec<Service> = (0..8)
            .map(|i| {
                svc(
                    &format!("s{i}"),
                    ServiceType::NodePort,
                    ClusterIpSpec::Auto,
                    &[(80, None)],
                )
            })
            .collect();
        let (_, r) = allocate(&AllocState::default(), &list, &cfg, 0, 1);
        let oks = r.values().filter(|x| x.is_ok()).count();
        assert_eq!(oks, 2, "two node ports");
        let errs: Vec<String> = r
            .values()
            .filter_map(|x| x.clone().err())
            .map(|e| e.to_string())
            .collect();
        assert!(errs.iter().all(|e| e.contains("full")), "{errs:?}");
    }

    proptest! {
        /// Whatever the services and their order: no IP or node port is held twice, every value is
        /// in range, and reallocating from the resulting state changes nothing.
        #[test]
        fn never_duplicates_and_is_a_fixed_point(
            specs in proptest::collection::vec((0u8..4, proptest::option::of(0u8..12), proptest::option::of(0u16..8)), 1..40),
            rotate in 0usize..40,
        ) {
            let cfg = AllocConfig {
                service_cidrs: vec!["10.43.0.0/27".parse().unwrap()],
                node_port_range: 30000..=30019,
                ..AllocConfig::default()
            };
            let mut list: Vec<Service> = specs.iter().enumerate().map(|(i, (t, ipo, npo))| {
                let t = [ServiceType::ClusterIP, ServiceType::NodePort, ServiceType::LoadBalancer, ServiceType::ClusterIP][*t as usize];
                let ipspec = match ipo { Some(o) => ClusterIpSpec::Ip(cfg.service_cidrs[0].nth(u128::from(*o)).unwrap()), None => ClusterIpSpec::Auto };
                let np = if t.has_node_ports() { npo.map(|n| 30000 + n) } else { None };
                svc(&format!("s{i}"), t, ipspec, &[(80, np)])
            }).collect();
            let n = list.len();
            list.rotate_left(rotate % n);
            let (st, r) = allocate(&AllocState::default(), &list, &cfg, 0, 1);
            let mut ips = BTreeSet::new();
            let mut ports = BTreeSet::new();
            for a in r.values().flatten() {
                if let Some(ip) = a.cluster_ip {
                    prop_assert!(cfg.service_cidrs[0].contains(ip));
                    prop_assert!(ips.insert(ip), "duplicate {}", ip);
                }
                for np in a.node_ports.iter().flatten() {
                    prop_assert!(cfg.node_port_range.contains(np));
                    prop_assert!(ports.insert(*np), "duplicate {}", np);
                }
            }
            let (st2, r2) = allocate(&st, &list, &cfg, 2, 3);
            // Same outcome (the error named may differ: the holder is known earlier now).
            let oks = |r: &AllocResults| r.iter().map(|(k, v)| (k.clone(), v.clone().ok())).collect::<Vec<_>>();
            prop_assert_eq!(oks(&r2), oks(&r));
            prop_assert_eq!(st2.services.keys().collect::<Vec<_>>(), st.services.keys().collect::<Vec<_>>());
        }
    }
}
