//! Dual-stack services: each family's cluster IP, node ports, external and load-balancer
//! addresses go to that family's endpoints only, checked by tracing packets through the plan.

mod common;

use std::net::IpAddr;

use common::*;
use ferry_model::view::{ResolvedEndpoint, ResolvedService};
use ferry_model::Protocol;
use ferry_plan::trace::{trace, Fate, Packet};
use ferry_plan::{plan, PlanConfig};
use proptest::prelude::*;

const CIP4: &str = "10.43.0.50";
const CIP6: &str = "fd00:43::50";
const LB4: &str = "192.168.2.201";
const LB6: &str = "fd00:200::11";
const NODE4: &str = "192.168.2.11";
const NODE6: &str = "2001:db8:2::11";

fn web(eps: &[ResolvedEndpoint]) -> ResolvedService {
    Svc::new("web", CIP4)
        .secondary_cluster_ip(CIP6)
        .node_port(Protocol::Tcp, 80, 30080, eps)
        .load_balancer_ip(LB4)
        .load_balancer_ip(LB6)
        .build()
}

fn both_families() -> Vec<ResolvedEndpoint> {
    vec![
        ep("10.42.1.5", 8080),
        ep("10.42.2.5", 8080),
        ep("fd00:42:1::5", 8080),
        ep("fd00:42:2::5", 8080),
    ]
}

/// Where a packet may go: the endpoints' addresses, or Err(fate) when it is not DNATed.
fn destinations(
    cfg: &PlanConfig,
    svcs: &[ResolvedService],
    p: &Packet,
) -> Result<Vec<IpAddr>, Fate> {
    let rs = plan(cfg, svcs);
    assert_references_resolve(&rs);
    let out = trace(&rs, p);
    assert_total_probability(&out);
    let mut addrs = Vec::new();
    for o in &out {
        match &o.fate {
            Fate::Dnat { addr, .. } => addrs.push(*addr),
            other => return Err(other.clone()),
        }
    }
    addrs.sort();
    Ok(addrs)
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = list.iter().map(|s| ip(s)).collect();
    v.sort();
    v
}

#[test]
fn each_family_reaches_its_own_endpoints() {
    let cfg = dual_stack_config();
    let svcs = [web(&both_families())];
    let v4 = ips(&["10.42.1.5", "10.42.2.5"]);
    let v6 = ips(&["fd00:42:1::5", "fd00:42:2::5"]);
    let cases = [
        // Pods to the cluster IPs.
        (tcp("10.42.0.9", CIP4, 80), &v4),
        (tcp("fd00:42::9", CIP6, 80), &v6),
        // Outside clients to the node ports and the load-balancer addresses.
        (tcp("192.168.2.100", NODE4, 30080), &v4),
        (tcp("2001:db8:2::100", NODE6, 30080), &v6),
        (tcp("192.168.2.100", LB4, 80), &v4),
        (tcp("2001:db8:2::100", LB6, 80), &v6),
        // The node itself.
        (from_node(tcp(NODE6, CIP6, 80)), &v6),
    ];
    for (p, want) in cases {
        assert_eq!(destinations(&cfg, &svcs, &p).as_ref(), Ok(want), "{p:?}");
    }
    // Each family has its own chains.
    let rs = plan(&cfg, &svcs);
    assert!(rs.chains.contains_key("service-default/web/tcp/80"));
    assert!(rs.chains.contains_key("service-default/web/tcp/80/ipv6"));
    assert!(rs.chains.contains_key("external-default/web/tcp/80/ipv6"));
}

#[test]
fn a_family_without_endpoints_is_rejected_and_the_other_still_served() {
    let cfg = dual_stack_config();
    let svcs = [web(&[ep("10.42.1.5", 8080)])];
    let rejected = Err(Fate::Rejected { tcp_reset: true });
    for p in [
        tcp("fd00:42::9", CIP6, 80),
        tcp("2001:db8:2::100", LB6, 80),
        tcp("2001:db8:2::100", NODE6, 30080),
    ] {
        assert_eq!(destinations(&cfg, &svcs, &p), rejected, "{p:?}");
    }
    assert_eq!(
        destinations(&cfg, &svcs, &tcp("192.168.2.100", LB4, 80)),
        Ok(ips(&["10.42.1.5"]))
    );
}

#[test]
fn a_single_stack_service_has_nothing_on_the_other_family() {
    let cfg = dual_stack_config();
    // Resolved single-stack: only its family's endpoints and addresses.
    let svcs = [Svc::new("v4", CIP4)
        .node_port(Protocol::Tcp, 80, 30080, &[ep("10.42.1.5", 8080)])
        .build()];
    // The IPv6 node address's node port is not this service's: untouched.
    assert!(matches!(
        destinations(&cfg, &svcs, &tcp("2001:db8:2::100", NODE6, 30080)),
        Err(Fate::Untouched { .. })
    ));
    assert_eq!(
        destinations(&cfg, &svcs, &tcp("192.168.2.100", NODE4, 30080)),
        Ok(ips(&["10.42.1.5"]))
    );
}

#[test]
fn the_primary_family_may_be_ipv6() {
    let cfg = dual_stack_config();
    let svcs = [Svc::new("web", CIP6)
        .secondary_cluster_ip(CIP4)
        .port(Protocol::Tcp, 80, &both_families())
        .build()];
    assert_eq!(
        destinations(&cfg, &svcs, &tcp("10.42.0.9", CIP4, 80)),
        Ok(ips(&["10.42.1.5", "10.42.2.5"]))
    );
    let rs = plan(&cfg, &svcs);
    assert!(rs.chains.contains_key("service-default/web/tcp/80"));
    assert!(rs.chains.contains_key("service-default/web/tcp/80/ipv4"));
}

proptest! {
    /// Whatever the endpoints of each family, every address of a family goes to that family's
    /// usable endpoints, or is rejected when it has none.
    #[test]
    fn dnat_never_crosses_families(
        v4 in proptest::collection::btree_set(1u8..30, 0..4),
        v6 in proptest::collection::btree_set(1u8..30, 0..4),
        not_ready in proptest::collection::btree_set(1u8..30, 0..3),
    ) {
        let mut eps = Vec::new();
        for i in &v4 {
            let e = ep(&format!("10.42.1.{i}"), 8080);
            eps.push(if not_ready.contains(i) { e.not_ready() } else { e });
        }
        for i in &v6 {
            let e = ep(&format!("fd00:42:1::{i}"), 8080);
            eps.push(if not_ready.contains(i) { e.not_ready() } else { e });
        }
        let usable = |v6: bool| -> Vec<IpAddr> {
            let mut v: Vec<IpAddr> = eps.iter().filter(|e| e.ready && e.addr.is_ipv6() == v6).map(|e| e.addr).collect();
            v.sort();
            v
        };
        let cfg = dual_stack_config();
        let svcs = [web(&eps)];
        for (p, fam6) in [
            (tcp("10.42.0.9", CIP4, 80), false),
            (tcp("fd00:42::9", CIP6, 80), true),
            (tcp("192.168.2.100", NODE4, 30080), false),
            (tcp("2001:db8:2::100", NODE6, 30080), true),
            (tcp("192.168.2.100", LB4, 80), false),
            (tcp("2001:db8:2::100", LB6, 80), true),
        ] {
            let want = usable(fam6);
            let got = destinations(&cfg, &svcs, &p);
            if want.is_empty() {
                prop_assert_eq!(got, Err(Fate::Rejected { tcp_reset: true }));
            } else {
                prop_assert_eq!(got, Ok(want));
            }
        }
    }
}
