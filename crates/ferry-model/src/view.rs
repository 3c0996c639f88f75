//! The validated internal model: services with their allocations joined to their endpoints.
//!
//! This is what planning consumes; it knows nothing of nftables.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::alloc::Allocation;
use crate::cidr::Cidr;
use crate::objects::{
    AddressType, EndpointSlice, ObjectRef, Protocol, Service, ServiceType, TargetPort,
    TrafficPolicy,
};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ResolvedEndpoint {
    pub addr: IpAddr,
    pub port: u16,
    pub node: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// The zones this endpoint is hinted for (None: no hints).
    pub zone_hints: Option<Vec<String>>,
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
    pub cluster_ip: Option<IpAddr>,
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

/// Joins services (with their allocation) to the EndpointSlices that name them.
/// Services without an allocation (rejected) or without a virtual IP (headless, ExternalName)
/// are left out: they get no rules.
pub fn resolve(
    services: &[Service],
    allocations: &BTreeMap<ObjectRef, Allocation>,
    slices: &[EndpointSlice],
) -> Vec<ResolvedService> {
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
    let mut out = Vec::new();
    for svc in services {
        let id = svc.meta.object_ref();
        let Some(alloc) = allocations.get(&id) else {
            continue;
        };
        let Some(cluster_ip) = alloc.cluster_ip else {
            continue;
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
                            // Only endpoints of the service IP's family.
                            if a.is_ipv4() != cluster_ip.is_ipv4() {
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
        let family_ok = |ip: &IpAddr| ip.is_ipv4() == cluster_ip.is_ipv4();
        out.push(ResolvedService {
            id,
            type_: svc.type_,
            cluster_ip: Some(cluster_ip),
            external_ips: svc.external_ips.iter().copied().filter(family_ok).collect(),
            load_balancer_ips: if svc.type_ == ServiceType::LoadBalancer {
                svc.load_balancer_ingress
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
                .load_balancer_source_ranges
                .iter()
                .copied()
                .filter(|c| c.is_ipv4() == cluster_ip.is_ipv4())
                .collect(),
            health_check_node_port: alloc.health_check_node_port,
        });
    }
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
            zone_hints: hints.map(|h| h.iter().map(|z| z.to_string()).collect()),
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
}
