//! Planning checked by tracing packets through the planned table: which endpoints a connection
//! can reach, how likely each is, and whether its source is masqueraded.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use common::*;
use ferry_model::view::{ResolvedEndpoint, ResolvedService};
use ferry_model::{Protocol, TrafficPolicy};
use ferry_plan::trace::{trace, trace_remembering, Fate, Outcome, Packet};
use ferry_plan::{plan, PlanConfig, Ruleset};
use proptest::prelude::*;

const CLUSTER_IP: &str = "10.43.7.203";
const CLIENT_POD: &str = "10.42.1.171";
const OUTSIDE_CLIENT: &str = "192.168.2.100";
const NODE_IP: &str = "192.168.2.11";

fn nextcloud_pods() -> [ResolvedEndpoint; 2] {
    [ep("10.42.0.85", 80).on(NODE), ep("10.42.1.170", 80)]
}

fn nextcloud_clusterip(eps: &[ResolvedEndpoint]) -> ResolvedService {
    Svc::new("nextcloud-dev-clusterip", CLUSTER_IP)
        .port(Protocol::Tcp, 8080, eps)
        .build()
}

fn nextcloud_nodeport(eps: &[ResolvedEndpoint]) -> Svc {
    Svc::new("nextcloud-dev-nodeport", "10.43.120.17").node_port(Protocol::Tcp, 80, 32540, eps)
}

fn run(services: &[ResolvedService], p: &Packet) -> Vec<Outcome> {
    run_with(&config(), services, p)
}

fn run_with(cfg: &PlanConfig, services: &[ResolvedService], p: &Packet) -> Vec<Outcome> {
    let rs = plan(cfg, services);
    let out = trace(&rs, p);
    assert_total_probability(&out);
    out
}

fn endpoint(addr: &str, port: u16) -> (IpAddr, u16) {
    (ip(addr), port)
}

fn assert_half(p: f64) {
    assert!((p - 0.5).abs() < 1e-9, "probability {p}, not 1/2");
}

#[test]
fn cluster_ip_spreads_evenly_over_ready_endpoints_without_masquerade() {
    let svcs = [nextcloud_clusterip(&nextcloud_pods())];
    let out = run(&svcs, &tcp(CLIENT_POD, CLUSTER_IP, 8080));
    let d = dnat_outcomes(&out);
    assert_eq!(
        d.keys().copied().collect::<Vec<_>>(),
        [endpoint("10.42.0.85", 80), endpoint("10.42.1.170", 80)]
    );
    for (p, masquerade) in d.values() {
        assert_half(*p);
        assert!(!masquerade, "pod to service is not masqueraded");
    }
    for o in &out {
        assert!(o.path.iter().any(|c| c == "services"), "{:?}", o.path);
        assert!(
            o.path
                .iter()
                .any(|c| c == "service-default/nextcloud-dev-clusterip/tcp/8080"),
            "{:?}",
            o.path
        );
    }
}

#[test]
fn each_of_n_endpoints_gets_exactly_one_nth() {
    for n in 1..=7u8 {
        let eps: Vec<ResolvedEndpoint> = (0..n)
            .map(|i| ep(&format!("10.42.2.{}", i + 1), 80))
            .collect();
        let out = run(
            &[nextcloud_clusterip(&eps)],
            &tcp(CLIENT_POD, CLUSTER_IP, 8080),
        );
        let d = dnat_outcomes(&out);
        assert_eq!(d.len(), usize::from(n));
        for ((addr, _), (p, _)) in &d {
            let want = 1.0 / f64::from(n);
            assert!(
                (p - want).abs() < 1e-9,
                "n={n}: {addr} gets {p}, not {want}"
            );
        }
    }
}

#[test]
fn traffic_from_outside_the_cluster_cidr_is_masqueraded() {
    let svcs = [nextcloud_clusterip(&nextcloud_pods())];
    for p in [
        from_node(tcp(NODE_IP, CLUSTER_IP, 8080)),
        tcp(OUTSIDE_CLIENT, CLUSTER_IP, 8080),
    ] {
        let d = dnat_outcomes(&run(&svcs, &p));
        assert_eq!(d.len(), 2, "{p:?}");
        for (p_, masquerade) in d.values() {
            assert_half(*p_);
            assert!(masquerade, "{p:?} must be masqueraded");
        }
    }
}

#[test]
fn a_pod_reaching_itself_through_the_service_is_masqueraded() {
    let svcs = [nextcloud_clusterip(&nextcloud_pods())];
    let d = dnat_outcomes(&run(&svcs, &tcp("10.42.0.85", CLUSTER_IP, 8080)));
    assert!(d[&endpoint("10.42.0.85", 80)].1, "hairpin: to itself");
    assert!(!d[&endpoint("10.42.1.170", 80)].1, "to the other pod");
}

#[test]
fn node_port_dnats_from_outside_with_masquerade_on_node_ips_only() {
    let svcs = [nextcloud_nodeport(&nextcloud_pods()).build()];
    let d = dnat_outcomes(&run(&svcs, &tcp(OUTSIDE_CLIENT, NODE_IP, 32540)));
    assert_eq!(
        d.keys().copied().collect::<Vec<_>>(),
        [endpoint("10.42.0.85", 80), endpoint("10.42.1.170", 80)]
    );
    for (p, masquerade) in d.values() {
        assert_half(*p);
        assert!(masquerade);
    }
    // The node itself connecting to its own node port.
    let d = dnat_outcomes(&run(&svcs, &from_node(tcp(NODE_IP, NODE_IP, 32540))));
    assert_eq!(d.len(), 2);
    // Not one of this node's addresses.
    assert_eq!(
        only_fate(&run(&svcs, &tcp(OUTSIDE_CLIENT, "192.168.2.99", 32540))),
        Fate::Untouched { masquerade: false }
    );
    // The node port is TCP only.
    assert_eq!(
        only_fate(&run(&svcs, &udp(OUTSIDE_CLIENT, NODE_IP, 32540))),
        Fate::Untouched { masquerade: false }
    );
    // The service port itself is not a node port.
    assert_eq!(
        only_fate(&run(&svcs, &tcp(OUTSIDE_CLIENT, NODE_IP, 80))),
        Fate::Untouched { masquerade: false }
    );
}

#[test]
fn udp_and_tcp_on_the_same_port_number_are_different_services() {
    // Kubernetes lets a UDP and a TCP port share a node port number too.
    let svcs = [Svc::new("dns", "10.43.0.10")
        .node_port(Protocol::Udp, 53, 30053, &[ep("10.42.0.3", 5353)])
        .node_port(Protocol::Tcp, 53, 30053, &[ep("10.42.0.4", 53)])
        .build()];
    let cases = [
        (
            udp(CLIENT_POD, "10.43.0.10", 53),
            endpoint("10.42.0.3", 5353),
        ),
        (tcp(CLIENT_POD, "10.43.0.10", 53), endpoint("10.42.0.4", 53)),
        (
            udp(OUTSIDE_CLIENT, NODE_IP, 30053),
            endpoint("10.42.0.3", 5353),
        ),
        (
            tcp(OUTSIDE_CLIENT, NODE_IP, 30053),
            endpoint("10.42.0.4", 53),
        ),
    ];
    for (p, want) in cases {
        let d = dnat_outcomes(&run(&svcs, &p));
        assert_eq!(d.keys().copied().collect::<Vec<_>>(), [want], "{p:?}");
    }
    // Neither is SCTP.
    assert_eq!(
        only_fate(&run(
            &svcs,
            &packet(Protocol::Sctp, OUTSIDE_CLIENT, NODE_IP, 30053)
        )),
        Fate::Untouched { masquerade: false }
    );
    assert_eq!(
        only_fate(&run(
            &svcs,
            &packet(Protocol::Sctp, CLIENT_POD, "10.43.0.10", 53)
        )),
        Fate::Rejected { tcp_reset: false },
        "a cluster IP on a protocol it lacks"
    );
}

#[test]
fn services_without_endpoints_reject_tcp_with_reset_and_udp_with_icmp() {
    let svcs = [Svc::new("empty", CLUSTER_IP)
        .node_port(Protocol::Tcp, 8080, 30080, &[])
        .node_port(Protocol::Udp, 8080, 30081, &[])
        .build()];
    let cases = [
        (tcp(CLIENT_POD, CLUSTER_IP, 8080), true),
        (udp(CLIENT_POD, CLUSTER_IP, 8080), false),
        (tcp(OUTSIDE_CLIENT, NODE_IP, 30080), true),
        (udp(OUTSIDE_CLIENT, NODE_IP, 30081), false),
        (from_node(tcp(NODE_IP, NODE_IP, 30080)), true),
    ];
    for (p, tcp_reset) in cases {
        let out = run(&svcs, &p);
        assert_eq!(only_fate(&out), Fate::Rejected { tcp_reset }, "{p:?}");
        assert!(
            out[0].path.iter().any(|c| c == "reject-service"),
            "{:?}",
            out[0].path
        );
    }
}

#[test]
fn cluster_ip_on_a_port_the_service_lacks_is_rejected_unused_service_addresses_dropped() {
    let svcs = [nextcloud_clusterip(&nextcloud_pods())];
    assert_eq!(
        only_fate(&run(&svcs, &tcp(CLIENT_POD, CLUSTER_IP, 9999))),
        Fate::Rejected { tcp_reset: true }
    );
    assert_eq!(
        only_fate(&run(&svcs, &udp(CLIENT_POD, CLUSTER_IP, 8080))),
        Fate::Rejected { tcp_reset: false },
        "8080 is TCP only"
    );
    // An address of the service CIDR that no service has: dropped, as kube-proxy's nftables
    // mode does (the config's service CIDR is 10.43.0.0/16).
    assert_eq!(
        only_fate(&run(&svcs, &tcp(CLIENT_POD, "10.43.7.204", 8080))),
        Fate::Dropped,
        "not a cluster IP, inside the service CIDR"
    );
    assert_eq!(
        only_fate(&run(&svcs, &tcp(CLIENT_POD, "10.44.7.204", 8080))),
        Fate::Untouched { masquerade: false },
        "outside the service CIDR"
    );
    assert_eq!(
        only_fate(&run(&svcs, &tcp(CLIENT_POD, "1.1.1.1", 443))),
        Fate::Untouched { masquerade: false }
    );
}

#[test]
fn terminating_endpoints_are_used_only_when_nothing_is_ready() {
    let draining = [
        ep("10.42.0.85", 80).terminating(),
        ep("10.42.1.170", 80).terminating(),
    ];
    let d = dnat_outcomes(&run(
        &[nextcloud_clusterip(&draining)],
        &tcp(CLIENT_POD, CLUSTER_IP, 8080),
    ));
    assert_eq!(d.len(), 2);

    // One ready endpoint wins over the draining one.
    let mixed = [
        ep("10.42.0.85", 80).terminating(),
        ep("10.42.1.170", 80),
        ep("10.42.1.172", 80).not_ready(),
    ];
    let d = dnat_outcomes(&run(
        &[nextcloud_clusterip(&mixed)],
        &tcp(CLIENT_POD, CLUSTER_IP, 8080),
    ));
    assert_eq!(
        d.keys().copied().collect::<Vec<_>>(),
        [endpoint("10.42.1.170", 80)]
    );
    assert!((d[&endpoint("10.42.1.170", 80)].0 - 1.0).abs() < 1e-9);

    // Not ready and not serving (terminating or not): nothing to send to.
    let mut gone = ep("10.42.0.85", 80).terminating();
    gone.serving = false;
    let dead = [ep("10.42.1.170", 80).not_ready(), gone];
    assert_eq!(
        only_fate(&run(
            &[nextcloud_clusterip(&dead)],
            &tcp(CLIENT_POD, CLUSTER_IP, 8080)
        )),
        Fate::Rejected { tcp_reset: true }
    );
}

#[test]
fn external_and_load_balancer_ips_dnat_with_masquerade() {
    let svcs = [Svc::new("nextcloud-dev-external", CLUSTER_IP)
        .port(Protocol::Tcp, 80, &nextcloud_pods())
        .external_ip("192.168.2.50")
        .load_balancer_ip("192.168.2.200")
        .build()];
    for to in ["192.168.2.50", "192.168.2.200"] {
        let d = dnat_outcomes(&run(&svcs, &tcp(OUTSIDE_CLIENT, to, 80)));
        assert_eq!(d.len(), 2, "{to}");
        for (p, masquerade) in d.values() {
            assert_half(*p);
            assert!(masquerade, "{to}");
        }
        assert_eq!(
            only_fate(&run(&svcs, &tcp(OUTSIDE_CLIENT, to, 81))),
            Fate::Untouched { masquerade: false },
            "{to}:81 is no service"
        );
    }
}

#[test]
fn external_traffic_policy_local_uses_only_local_endpoints_and_keeps_the_client_address() {
    let svcs = [nextcloud_nodeport(&nextcloud_pods())
        .external_ip("192.168.2.50")
        .external_policy_local()
        .build()];
    for p in [
        tcp(OUTSIDE_CLIENT, NODE_IP, 32540),
        tcp(OUTSIDE_CLIENT, "192.168.2.50", 80),
    ] {
        let d = dnat_outcomes(&run(&svcs, &p));
        assert_eq!(d.len(), 1, "{p:?}");
        let (prob, masquerade) = d[&endpoint("10.42.0.85", 80)];
        assert!((prob - 1.0).abs() < 1e-9);
        assert!(
            !masquerade,
            "{p:?}: externalTrafficPolicy Local keeps the source"
        );
    }
    // Inside the cluster the cluster IP still reaches every endpoint.
    let d = dnat_outcomes(&run(&svcs, &tcp(CLIENT_POD, "10.43.120.17", 80)));
    assert_eq!(d.len(), 2);

    // No endpoint on this node: drop (another node may have one), not reject.
    let remote_only = [
        ep("10.42.1.170", 80).on(OTHER_NODE),
        ep("10.42.1.169", 80).on(OTHER_NODE),
    ];
    let svcs = [nextcloud_nodeport(&remote_only)
        .external_ip("192.168.2.50")
        .external_policy_local()
        .build()];
    for p in [
        tcp(OUTSIDE_CLIENT, NODE_IP, 32540),
        tcp(OUTSIDE_CLIENT, "192.168.2.50", 80),
    ] {
        assert_eq!(only_fate(&run(&svcs, &p)), Fate::Dropped, "{p:?}");
    }
    let d = dnat_outcomes(&run(&svcs, &tcp(CLIENT_POD, "10.43.120.17", 80)));
    assert_eq!(d.len(), 2, "the cluster IP is unaffected");
}

#[test]
fn internal_traffic_policy_local_keeps_cluster_ip_traffic_on_this_node() {
    let pods = [
        ep("10.42.0.85", 80).on(NODE),
        ep("10.42.0.86", 80).on(NODE),
        ep("10.42.1.170", 80).on(OTHER_NODE),
    ];
    let svcs = [nextcloud_nodeport(&pods).internal_policy_local().build()];
    let d = dnat_outcomes(&run(&svcs, &tcp(CLIENT_POD, "10.43.120.17", 80)));
    assert_eq!(
        d.keys().copied().collect::<Vec<_>>(),
        [endpoint("10.42.0.85", 80), endpoint("10.42.0.86", 80)]
    );
    for (p, _) in d.values() {
        assert_half(*p);
    }
    // External traffic (policy Cluster) still reaches all three.
    let d = dnat_outcomes(&run(&svcs, &tcp(OUTSIDE_CLIENT, NODE_IP, 32540)));
    assert_eq!(d.len(), 3);
    for (p, masquerade) in d.values() {
        assert!((p - 1.0 / 3.0).abs() < 1e-9);
        assert!(masquerade);
    }

    // No local endpoint, one elsewhere: the cluster IP drops, as kube-proxy (it refuses only
    // when the service has no endpoint at all).
    let svcs = [nextcloud_nodeport(&[ep("10.42.1.170", 80).on(OTHER_NODE)])
        .internal_policy_local()
        .build()];
    assert_eq!(
        only_fate(&run(&svcs, &tcp(CLIENT_POD, "10.43.120.17", 80))),
        Fate::Dropped
    );
    let d = dnat_outcomes(&run(&svcs, &tcp(OUTSIDE_CLIENT, NODE_IP, 32540)));
    assert_eq!(
        d.len(),
        1,
        "the node port still reaches the remote endpoint"
    );
}

#[test]
fn ipv6_services_work_like_ipv4_ones() {
    let svcs = [
        Svc::new("web6", "fd00:43::10")
            .node_port(
                Protocol::Tcp,
                80,
                30080,
                &[
                    ep("fd00:42::5", 8080).on(NODE),
                    ep("fd00:42::6", 8080).on(NODE),
                ],
            )
            .build(),
        nextcloud_clusterip(&nextcloud_pods()),
    ];
    let cfg = dual_stack_config();
    let d = dnat_outcomes(&run_with(
        &cfg,
        &svcs,
        &tcp("fd00:42::7", "fd00:43::10", 80),
    ));
    assert_eq!(
        d.keys().copied().collect::<Vec<_>>(),
        [endpoint("fd00:42::5", 8080), endpoint("fd00:42::6", 8080)]
    );
    for (p, masquerade) in d.values() {
        assert_half(*p);
        assert!(!masquerade);
    }
    // From outside the v6 cluster CIDR, and to the v6 node address.
    for p in [
        tcp("2001:db8:2::100", "fd00:43::10", 80),
        tcp("2001:db8:2::100", "2001:db8:2::11", 30080),
    ] {
        let d = dnat_outcomes(&run_with(&cfg, &svcs, &p));
        assert_eq!(d.len(), 2, "{p:?}");
        assert!(d.values().all(|(_, m)| *m), "{p:?} masqueraded");
    }
    // Hairpin in v6.
    let d = dnat_outcomes(&run_with(
        &cfg,
        &svcs,
        &tcp("fd00:42::5", "fd00:43::10", 80),
    ));
    assert!(d[&endpoint("fd00:42::5", 8080)].1);
    assert!(!d[&endpoint("fd00:42::6", 8080)].1);
    // A v6 cluster IP on a missing port is refused; a v4 node port on the v6 address is not one.
    assert_eq!(
        only_fate(&run_with(
            &cfg,
            &svcs,
            &udp("fd00:42::7", "fd00:43::10", 80)
        )),
        Fate::Rejected { tcp_reset: false }
    );
    // The v4 service is unaffected by the v6 one.
    let d = dnat_outcomes(&run_with(&cfg, &svcs, &tcp(CLIENT_POD, CLUSTER_IP, 8080)));
    assert_eq!(d.len(), 2);
}

#[test]
fn probabilities_of_every_trace_sum_to_one() {
    let mut svcs = seed_services();
    svcs.push(
        Svc::new("wide", "10.43.9.9")
            .port(
                Protocol::Tcp,
                80,
                &(1..=13)
                    .map(|i| ep(&format!("10.42.3.{i}"), 80))
                    .collect::<Vec<_>>(),
            )
            .build(),
    );
    let rs = plan(&config(), &svcs);
    let mut traced = 0;
    for src in [CLIENT_POD, "10.42.0.85", "10.42.3.4", OUTSIDE_CLIENT] {
        for dst in [
            CLUSTER_IP,
            "10.43.120.17",
            "10.43.9.9",
            NODE_IP,
            "192.168.2.200",
        ] {
            for port in [80, 8080, 32540, 31380, 53, 1] {
                for proto in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
                    for local in [false, true] {
                        let mut p = packet(proto, src, dst, port);
                        p.local_origin = local;
                        assert_total_probability(&trace(&rs, &p));
                        traced += 1;
                    }
                }
            }
        }
    }
    assert_eq!(traced, 4 * 5 * 6 * 3 * 2);
}

// ---- the property ----

/// The endpoints a port's traffic may go to, worked out independently of the planner:
/// the ready ones (of this node when `local`), else the serving-and-terminating ones.
fn expected_endpoints(
    eps: &[ResolvedEndpoint],
    local: bool,
) -> std::collections::BTreeSet<(IpAddr, u16)> {
    let candidates: Vec<_> = eps
        .iter()
        .filter(|e| !local || e.node.as_deref() == Some(NODE))
        .collect();
    let ready: std::collections::BTreeSet<_> = candidates
        .iter()
        .filter(|e| e.ready)
        .map(|e| (e.addr, e.port))
        .collect();
    if !ready.is_empty() {
        return ready;
    }
    candidates
        .iter()
        .filter(|e| e.serving && e.terminating)
        .map(|e| (e.addr, e.port))
        .collect()
}

/// The trace of `p` is a uniform DNAT over `want` (with `masquerade`), or `none` when `want`
/// is empty.
fn check_spread(
    rs: &Ruleset,
    p: &Packet,
    want: &std::collections::BTreeSet<(IpAddr, u16)>,
    masquerade: bool,
    none: Fate,
) -> Result<(), TestCaseError> {
    let out = trace(rs, p);
    let total: f64 = out.iter().map(|o| o.probability).sum();
    prop_assert!((total - 1.0).abs() < 1e-9, "{:?}: sum {}", p, total);
    if want.is_empty() {
        prop_assert_eq!(out.len(), 1, "{:?}: {:?}", p, out);
        prop_assert_eq!(&out[0].fate, &none, "{:?}", p);
        return Ok(());
    }
    let mut got: BTreeMap<(IpAddr, u16), f64> = BTreeMap::new();
    for o in &out {
        match o.fate {
            Fate::Dnat {
                addr,
                port,
                masquerade: m,
            } => {
                prop_assert_eq!(m, masquerade, "{:?} -> {}:{}", p, addr, port);
                *got.entry((addr, port)).or_default() += o.probability;
            }
            ref f => prop_assert!(false, "{:?}: unexpected {:?}", p, f),
        }
    }
    prop_assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.iter().collect::<Vec<_>>()
    );
    let each = 1.0 / want.len() as f64;
    for (e, prob) in &got {
        prop_assert!((prob - each).abs() < 1e-9, "{:?}: {:?} gets {}", p, e, prob);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// For every port of random services: the cluster IP, each node port and each external
    /// address spread evenly over exactly the usable endpoints, or refuse when there are none.
    #[test]
    fn every_service_port_reaches_exactly_its_usable_endpoints(specs in service_specs(12)) {
        let cfg = dual_stack_config();
        let services = services_from_specs(&specs);
        let rs = plan(&cfg, &services);
        assert_references_resolve(&rs);
        for svc in &services {
            let cip = svc.cluster_ip.unwrap();
            let v6 = cip.is_ipv6();
            let (pod, outside, node_ip) = if v6 {
                ("fd00:42::ffff", "2001:db8:9::1", "2001:db8:2::11")
            } else {
                ("10.42.1.250", "192.168.9.1", "192.168.2.11")
            };
            let external_local = svc.external_traffic_policy == TrafficPolicy::Local;
            let internal_local = svc.internal_traffic_policy == TrafficPolicy::Local;
            for port in &svc.ports {
                let reject = Fate::Rejected { tcp_reset: port.protocol == Protocol::Tcp };
                let mut to_cluster_ip = packet(port.protocol, pod, &cip.to_string(), port.port);
                let internal = expected_endpoints(&port.endpoints, internal_local);
                // No endpoint anywhere: refused; internalTrafficPolicy: Local with endpoints on
                // other nodes only: dropped (as kube-proxy).
                let internal_none = if expected_endpoints(&port.endpoints, false).is_empty() {
                    reject.clone()
                } else {
                    Fate::Dropped
                };
                check_spread(&rs, &to_cluster_ip, &internal, false, internal_none.clone())?;
                // From the node itself: masqueraded.
                to_cluster_ip.saddr = ip(node_ip);
                to_cluster_ip.local_origin = true;
                check_spread(&rs, &to_cluster_ip, &internal, true, internal_none.clone())?;

                let external = expected_endpoints(&port.endpoints, external_local);
                // No endpoint anywhere: refused; Local with endpoints on other nodes only:
                // dropped (as kube-proxy).
                let none = if external_local && !expected_endpoints(&port.endpoints, false).is_empty() {
                    Fate::Dropped
                } else {
                    reject.clone()
                };
                let mut targets: Vec<(IpAddr, u16)> = svc
                    .external_ips
                    .iter()
                    .chain(&svc.load_balancer_ips)
                    .map(|a| (*a, port.port))
                    .collect();
                if let Some(np) = port.node_port {
                    targets.push((ip(node_ip), np));
                }
                let ranges = &svc.load_balancer_source_ranges;
                let firewalled = !ranges.is_empty() && ranges.iter().all(|r| r.prefix_len() > 0);
                for (addr, dport) in targets {
                    let p = packet(port.protocol, outside, &addr.to_string(), dport);
                    if firewalled && svc.load_balancer_ips.contains(&addr) {
                        // loadBalancerSourceRanges: an outside source is dropped, one inside
                        // goes on as any other.
                        prop_assert_eq!(only_fate(&trace(&rs, &p)), Fate::Dropped, "{:?}", p);
                        let inside = ranges[0].nth(77).expect("a /24 or /48 has 77");
                        let p = packet(port.protocol, &inside.to_string(), &addr.to_string(), dport);
                        check_spread(&rs, &p, &external, !external_local, none.clone())?;
                    } else {
                        check_spread(&rs, &p, &external, !external_local, none.clone())?;
                    }
                }

                // ClientIP affinity: a remembered client goes back to its endpoint when that
                // endpoint is still usable; otherwise it spreads as a new client.
                // (libnftables 1.0.6 cannot remember IPv6 endpoints on different ports.)
                let one_port = internal.iter().map(|e| e.1).collect::<BTreeSet<_>>().len() <= 1;
                if svc.affinity_timeout.is_some() && (one_port || !v6) {
                    let p = packet(port.protocol, pod, &cip.to_string(), port.port);
                    for e in port.endpoints.iter().map(|e| (e.addr, e.port)) {
                        let out = trace_remembering(&rs, &p, Some(e));
                        if internal.contains(&e) {
                            prop_assert_eq!(
                                only_fate(&out),
                                Fate::Dnat { addr: e.0, port: e.1, masquerade: false }
                            );
                        } else if internal.is_empty() {
                            prop_assert_eq!(only_fate(&out), internal_none.clone());
                        } else {
                            let d = dnat_outcomes(&out);
                            prop_assert_eq!(d.len(), internal.len());
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn local_policy_addresses_short_circuit_pods_and_the_node_as_kube_proxy() {
    let remote_only = [
        ep("10.42.1.170", 80).on(OTHER_NODE),
        ep("10.42.1.169", 80).on(OTHER_NODE),
    ];
    let svcs = [nextcloud_nodeport(&remote_only)
        .external_ip("192.168.2.50")
        .external_policy_local()
        .build()];
    // A pod (cluster CIDR): every endpoint of the cluster, its address kept.
    let d = dnat_outcomes(&run(&svcs, &tcp(CLIENT_POD, "192.168.2.50", 80)));
    assert_eq!(d.len(), 2);
    assert!(d.values().all(|(_, masquerade)| !masquerade), "{d:?}");
    // The node itself: every endpoint, masqueraded.
    let mut from_node = tcp(NODE_IP, "192.168.2.50", 80);
    from_node.local_origin = true;
    let d = dnat_outcomes(&run(&svcs, &from_node));
    assert_eq!(d.len(), 2);
    assert!(d.values().all(|(_, masquerade)| *masquerade), "{d:?}");
    // From outside, still dropped (no endpoint here).
    assert_eq!(
        only_fate(&run(&svcs, &tcp(OUTSIDE_CLIENT, "192.168.2.50", 80))),
        Fate::Dropped
    );
    // --masquerade-all masquerades traffic to the cluster IP only: the short-circuited pod
    // keeps its address, as with kube-proxy.
    let mut all = config();
    all.masquerade_all = true;
    let d = dnat_outcomes(&run_with(&all, &svcs, &tcp(CLIENT_POD, "192.168.2.50", 80)));
    assert_eq!(d.len(), 2);
    assert!(d.values().all(|(_, masquerade)| !masquerade), "{d:?}");
    let d = dnat_outcomes(&run_with(&all, &svcs, &tcp(CLIENT_POD, "10.43.120.17", 80)));
    assert!(d.values().all(|(_, masquerade)| *masquerade), "{d:?}");
}

#[test]
fn local_traffic_detection_by_interface_and_masquerade_all() {
    let svcs = [nextcloud_clusterip(&nextcloud_pods())];
    let masqueraded = |cfg: &PlanConfig, iif: Option<&str>| {
        let mut p = tcp(CLIENT_POD, CLUSTER_IP, 8080);
        p.iif = iif.map(str::to_string);
        let d = dnat_outcomes(&run_with(cfg, &svcs, &p));
        assert_eq!(d.len(), 2);
        let m: BTreeSet<bool> = d.values().map(|(_, m)| *m).collect();
        assert_eq!(m.len(), 1, "{d:?}");
        m.into_iter().next().unwrap_or_default()
    };
    // ClusterCIDR: the pod's address is inside 10.42.0.0/16.
    assert!(!masqueraded(&config(), Some("vp3")));
    // InterfaceNamePrefix vp: a pod's veth counts, another interface does not.
    let mut by_prefix = config();
    by_prefix.local_interface = Some(ferry_plan::plan::LocalInterface {
        name: "vp".into(),
        prefix: true,
    });
    assert!(!masqueraded(&by_prefix, Some("vp3")));
    assert!(masqueraded(&by_prefix, Some("eth0")));
    assert!(
        masqueraded(&by_prefix, None),
        "unknown interface: not a pod's"
    );
    // BridgeInterface cni0: that name exactly.
    let mut by_bridge = config();
    by_bridge.local_interface = Some(ferry_plan::plan::LocalInterface {
        name: "cni0".into(),
        prefix: false,
    });
    assert!(!masqueraded(&by_bridge, Some("cni0")));
    assert!(masqueraded(&by_bridge, Some("cni01")));
    // masquerade-all: everything.
    let mut all = config();
    all.masquerade_all = true;
    assert!(masqueraded(&all, Some("vp3")));
}

#[test]
fn topology_hints_keep_cluster_traffic_in_the_node_zone() {
    let eps = [
        ep("10.42.0.85", 80).on(NODE).hinted(&["zone-a"]),
        ep("10.42.1.170", 80).on(OTHER_NODE).hinted(&["zone-b"]),
    ];
    let svcs = [nextcloud_nodeport(&eps).build()];
    let mut in_a = config();
    in_a.node_zone = Some("zone-a".into());
    for p in [
        tcp(CLIENT_POD, "10.43.120.17", 80),
        tcp(OUTSIDE_CLIENT, NODE_IP, 32540),
    ] {
        let d = dnat_outcomes(&run_with(&in_a, &svcs, &p));
        assert_eq!(
            d.keys().copied().collect::<Vec<_>>(),
            [endpoint("10.42.0.85", 80)],
            "{p:?}"
        );
    }
    // No zone on the node, or a zone without endpoints: every endpoint.
    let mut in_c = config();
    in_c.node_zone = Some("zone-c".into());
    for cfg in [config(), in_c] {
        let d = dnat_outcomes(&run_with(&cfg, &svcs, &tcp(CLIENT_POD, "10.43.120.17", 80)));
        assert_eq!(d.len(), 2, "{:?}", cfg.node_zone);
    }
}

#[test]
fn hairpin_entries_are_kept_for_endpoints_that_can_come_back_through_this_node() {
    // A pod elsewhere reaching a cluster IP is DNATed by its own node: no hairpin entry here.
    let remote = ep("10.42.1.170", 80);
    let local = ep("10.42.0.85", 80).on(NODE);
    let svcs = [Svc::new("web", "10.43.0.20")
        .port(Protocol::Tcp, 80, &[remote.clone(), local.clone()])
        .build()];
    let rs = plan(&config(), &svcs);
    let hairpin = &rs.sets["hairpin-v4"].elements;
    assert!(hairpin.contains_key("10.42.0.85 . 10.42.0.85"));
    assert!(!hairpin.contains_key("10.42.1.170 . 10.42.1.170"));

    // A Local service's node port sends pods' traffic to any endpoint (kube-proxy's
    // short-circuit): a pod of another node coming in to this node's port may be sent back to
    // itself, and is then masqueraded.
    let svcs = [Svc::new("web", "10.43.0.20")
        .node_port(Protocol::Tcp, 80, 30080, &[remote, local])
        .external_policy_local()
        .build()];
    let rs = plan(&config(), &svcs);
    assert!(rs.sets["hairpin-v4"]
        .elements
        .contains_key("10.42.1.170 . 10.42.1.170"));
    let d = dnat_outcomes(&run(&svcs, &tcp("10.42.1.170", NODE_IP, 30080)));
    assert!(
        d[&endpoint("10.42.1.170", 80)].1,
        "back to itself: masqueraded"
    );
    assert!(!d[&endpoint("10.42.0.85", 80)].1, "to the other pod: kept");
}
