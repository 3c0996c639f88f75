//! What the agents forward and announce when the API server is the source (pure).
//!
//! In a cluster the API server allocates cluster IPs and node ports and the load-balancer
//! controller writes addresses into `status.loadBalancer.ingress`: agents take all three from
//! the Service as it is, and allocate nothing. (The manifest-directory mode allocates them in
//! its state directory instead.)

use std::collections::BTreeMap;

use ferry_model::alloc::{AllocError, AllocResults, Allocation};
use ferry_model::lbipam::{LbAllocation, LbResults};
use ferry_model::pools::PoolConfig;
use ferry_model::{ClusterIpSpec, Service, ServiceType};

/// Every Service's cluster IP and node ports from its spec, and the load-balancer addresses in
/// its status (with the pool each is from, "" for addresses no pool of ours holds: written by
/// another load-balancer controller, forwarded all the same, as kube-proxy does).
pub fn from_api(services: &[Service], pools: &PoolConfig) -> (AllocResults, LbResults) {
    let mut allocs = BTreeMap::new();
    let mut lbs = BTreeMap::new();
    for svc in services {
        let r = svc.meta.object_ref();
        let cluster_ip = match (&svc.type_, &svc.cluster_ip) {
            (ServiceType::ExternalName, _) | (_, ClusterIpSpec::None) => Ok(None),
            (_, ClusterIpSpec::Ip(ip)) => Ok(Some(*ip)),
            (_, ClusterIpSpec::Auto) => Err(AllocError {
                service: r.clone(),
                field: "spec.clusterIP".into(),
                message: "not set: the API server has not allocated a cluster IP (yet)".into(),
            }),
        };
        let alloc = cluster_ip.map(|cluster_ip| Allocation {
            cluster_ip,
            secondary_cluster_ip: cluster_ip.and(svc.extra.secondary_cluster_ip),
            node_ports: svc
                .ports
                .iter()
                .map(|p| {
                    if svc.type_.has_node_ports() {
                        p.node_port
                    } else {
                        None
                    }
                })
                .collect(),
            health_check_node_port: (svc.type_ == ServiceType::LoadBalancer
                && svc.external_traffic_policy == ferry_model::TrafficPolicy::Local)
                .then_some(svc.extra.health_check_node_port)
                .flatten(),
        });
        allocs.insert(r.clone(), alloc);
        if svc.type_ == ServiceType::LoadBalancer && !svc.extra.load_balancer_ingress.is_empty() {
            let mut ips = svc.extra.load_balancer_ingress.clone();
            ips.sort_by_key(|ip| (ip.is_ipv6(), *ip));
            ips.dedup();
            let pool = ips
                .iter()
                .find_map(|ip| pools.pool_of(*ip))
                .map(|p| p.name.clone())
                .unwrap_or_default();
            lbs.insert(r, Ok(LbAllocation { ips, pool }));
        }
    }
    (allocs, lbs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::{Meta, Protocol, ServicePort, TargetPort};
    use std::net::IpAddr;

    fn svc(name: &str, type_: ServiceType, ip: ClusterIpSpec, node_port: Option<u16>) -> Service {
        Service {
            meta: Meta {
                name: name.into(),
                namespace: "default".into(),
                ..Meta::default()
            },
            type_,
            cluster_ip: ip,
            ports: vec![ServicePort {
                name: String::new(),
                protocol: Protocol::Tcp,
                port: 80,
                target_port: TargetPort::Number(8080),
                node_port,
            }],
            ..Service::default()
        }
    }

    #[test]
    fn values_come_from_the_spec_and_status() {
        let ip: IpAddr = "10.43.0.20".parse().unwrap();
        let mut lb = svc(
            "lb",
            ServiceType::LoadBalancer,
            ClusterIpSpec::Ip(ip),
            Some(30080),
        );
        lb.extra.load_balancer_ingress = vec!["192.168.2.200".parse().unwrap()];
        let pending = svc(
            "pending",
            ServiceType::LoadBalancer,
            ClusterIpSpec::Ip("10.43.0.21".parse().unwrap()),
            Some(30081),
        );
        let cip = svc(
            "cip",
            ServiceType::ClusterIP,
            ClusterIpSpec::Ip("10.43.0.22".parse().unwrap()),
            Some(30082),
        );
        let headless = svc("hl", ServiceType::ClusterIP, ClusterIpSpec::None, None);
        let unset = svc("unset", ServiceType::ClusterIP, ClusterIpSpec::Auto, None);
        let (allocs, lbs) = from_api(&[lb, pending, cip, headless, unset], &PoolConfig::default());
        let get = |n: &str| allocs[&ferry_model::ObjectRef::new("default", n)].clone();
        assert_eq!(
            get("lb").unwrap(),
            Allocation {
                secondary_cluster_ip: None,
                cluster_ip: Some(ip),
                node_ports: vec![Some(30080)],
                health_check_node_port: None,
            }
        );
        // A ClusterIP Service's stray nodePort is not served.
        assert_eq!(get("cip").unwrap().node_ports, vec![None]);
        assert_eq!(get("hl").unwrap().cluster_ip, None);
        let e = get("unset").unwrap_err();
        assert_eq!(e.field, "spec.clusterIP");
        assert_eq!(lbs.len(), 1, "only Services with addresses in status");
        let a = lbs[&ferry_model::ObjectRef::new("default", "lb")]
            .clone()
            .unwrap();
        assert_eq!(a.pool, "", "no pool of ours holds it");
        assert_eq!(a.ips, vec!["192.168.2.200".parse::<IpAddr>().unwrap()]);
    }
}
