//! The validated internal model: services with their allocations joined to their endpoints.
//!
//! This is what planning consumes; it knows nothing of nftables.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::alloc::Allocation;
use crate::cidr::Cidr;
use crate::objects::{
    AddressType, EndpointSlice, IpFamily, ObjectRef, Protocol, Service, ServiceType, TargetPort,
    TrafficPolicy,
};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ResolvedEndpoint {
    pub addr: IpAddr,
    pub port: u16,
    /// Shared with the slice's endpoint it comes from.
    pub node: Option<std::sync::Arc<str>>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// The zones this endpoint is hinted for (None: no hints).
    /// Shared with the slice's endpoint it comes from.
    pub zone_hints: Option<std::sync::Arc<[String]>>,
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
    let mut out = Vec::with_capacity(services.len());
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
            load_balancer_ingress: vec![ip("192.168.2.201"), ip("fd00:200::11")],
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
}
