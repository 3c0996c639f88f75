//! Load-balancer addresses: DNAT like cluster IPs, and pool addresses nobody uses are refused
//! (in routed setups such traffic would loop between router and node).

mod common;

use common::*;
use ferry_model::Protocol;
use ferry_plan::plan::plan;
use ferry_plan::trace::{trace, Fate};

fn cfg_with_pool() -> ferry_plan::PlanConfig {
    let mut cfg = config();
    cfg.lb_pools = vec![(ip("192.168.2.200"), ip("192.168.2.225"))];
    cfg
}

fn lb_service() -> Vec<ferry_model::view::ResolvedService> {
    vec![Svc::new("web", "10.43.208.81")
        .node_port(
            Protocol::Tcp,
            80,
            31114,
            &[ep("10.42.0.85", 80), ep("10.42.1.170", 80)],
        )
        .load_balancer_ip("192.168.2.200")
        .build()]
}

#[test]
fn a_load_balancer_address_is_dnated_to_the_endpoints_with_masquerade() {
    let rs = plan(&cfg_with_pool(), &lb_service());
    let out = trace(&rs, &tcp("192.168.2.100", "192.168.2.200", 80));
    assert_total_probability(&out);
    let d = dnat_outcomes(&out);
    assert_eq!(d.len(), 2, "{out:?}");
    for (p, masq) in d.values() {
        assert!((p - 0.5).abs() < 1e-9);
        assert!(*masq, "external traffic is masqueraded");
    }
}

#[test]
fn pool_addresses_without_a_service_on_that_port_are_rejected() {
    let rs = plan(&cfg_with_pool(), &lb_service());
    // An unused pool address.
    let f = only_fate(&trace(&rs, &tcp("192.168.2.100", "192.168.2.210", 80)));
    assert_eq!(f, Fate::Rejected { tcp_reset: true });
    // The used address on a port no service has.
    let f = only_fate(&trace(&rs, &udp("192.168.2.100", "192.168.2.200", 80)));
    assert_eq!(f, Fate::Rejected { tcp_reset: false });
    let f = only_fate(&trace(&rs, &tcp("192.168.2.100", "192.168.2.200", 8080)));
    assert_eq!(f, Fate::Rejected { tcp_reset: true });
    // Outside the pool: left alone.
    let f = only_fate(&trace(&rs, &tcp("192.168.2.100", "192.168.2.226", 80)));
    assert_eq!(f, Fate::Untouched { masquerade: false });
    // The node's own connection to a LAN neighbour whose address a pool covers: never refused
    // (issue 7: a pool over the LAN must not cut the node off).
    let mut own = tcp("192.168.2.11", "192.168.2.210", 80);
    own.local_origin = true;
    let f = only_fate(&trace(&rs, &own));
    assert!(matches!(f, Fate::Untouched { .. }), "{f:?}");
}

#[test]
fn without_pools_nothing_is_rejected_for_being_in_a_pool() {
    let rs = plan(&config(), &lb_service());
    let f = only_fate(&trace(&rs, &tcp("192.168.2.100", "192.168.2.210", 80)));
    assert_eq!(f, Fate::Untouched { masquerade: false });
}
