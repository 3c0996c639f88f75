//! ClientIP session affinity and loadBalancerSourceRanges, planned and traced.

mod common;

use common::*;
use ferry_model::view::ResolvedService;
use ferry_model::Protocol;
use ferry_plan::diff::{LiveSet, LiveState};
use ferry_plan::ir::Set;
use ferry_plan::trace::{trace, trace_remembering, Fate, Outcome};
use ferry_plan::{diff, plan, Ruleset};

const CIP: &str = "10.43.9.9";
const LB_IP: &str = "192.168.2.200";
const NODE_PORT: u16 = 31111;
const POD_CLIENT: &str = "10.42.1.250";

fn web(timeout: Option<u32>, eps: &[&str]) -> ResolvedService {
    let eps: Vec<_> = eps.iter().map(|a| ep(a, 8080)).collect();
    let mut s = Svc::new("web", CIP)
        .node_port(Protocol::Tcp, 80, NODE_PORT, &eps)
        .load_balancer_ip(LB_IP)
        .external_ip("172.16.0.9")
        .build();
    s.affinity_timeout = timeout;
    s
}

const THREE: [&str; 3] = ["10.42.0.5", "10.42.1.6", "10.42.2.7"];

fn affinity_maps(rs: &Ruleset) -> Vec<&Set> {
    rs.sets
        .values()
        .filter(|s| s.name.starts_with("affinity-") && s.name != "affinity-frontends-v4")
        .filter(|s| s.name != "affinity-frontends-v6")
        .collect()
}

fn notes(out: &[Outcome]) -> String {
    out.iter()
        .flat_map(|o| o.notes.iter().cloned())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn new_clients_spread_remembered_ones_go_back_to_their_endpoint() {
    let rs = plan(&config(), &[web(Some(10800), &THREE)]);
    for p in [
        tcp(POD_CLIENT, CIP, 80),
        tcp("192.168.2.100", LB_IP, 80),
        tcp("192.168.2.100", "192.168.2.11", NODE_PORT),
        tcp("192.168.2.100", "172.16.0.9", 80),
    ] {
        // A new client: each endpoint 1/3, and where it went is remembered for 10800 s.
        let out = trace(&rs, &p);
        assert_total_probability(&out);
        let d = dnat_outcomes(&out);
        assert_eq!(d.len(), 3, "{p:?}: {out:?}");
        for (prob, _) in d.values() {
            assert!((prob - 1.0 / 3.0).abs() < 1e-9);
        }
        let n = notes(&out);
        assert!(n.contains("nothing remembered for"), "{n}");
        assert!(
            n.contains("remembered on 10.42.1.6:8080 for 10800 s after its last connection"),
            "{p:?}: {n}"
        );
        for o in &out {
            assert!(
                o.path
                    .iter()
                    .any(|c| c == "remember-service-default/web/tcp/80"),
                "the external paths share the service chain's memory: {:?}",
                o.path
            );
        }
        // A client remembered on an endpoint: that endpoint, always.
        let e = (ip("10.42.2.7"), 8080);
        let out = trace_remembering(&rs, &p, Some(e));
        let fate = only_fate(&out);
        assert!(
            matches!(fate, Fate::Dnat { addr, port, .. } if (addr, port) == e),
            "{p:?}: {fate:?}"
        );
        assert!(notes(&out).contains("is remembered on 10.42.2.7:8080, its endpoint again"));
    }
    // Without affinity: no memory at all.
    let rs = plan(&config(), &[web(None, &THREE)]);
    assert!(affinity_maps(&rs).is_empty());
    let out = trace_remembering(
        &rs,
        &tcp(POD_CLIENT, CIP, 80),
        Some((ip("10.42.2.7"), 8080)),
    );
    assert_eq!(dnat_outcomes(&out).len(), 3);
    assert!(!notes(&out).contains("affinity"));
}

#[test]
fn the_memory_is_a_dynamic_map_replaced_when_endpoints_or_timeout_change() {
    let rs = plan(&config(), &[web(Some(10800), &THREE)]);
    let maps = affinity_maps(&rs);
    assert_eq!(maps.len(), 1, "one per endpoint-choosing chain");
    let m = maps[0];
    assert!(m.dynamic && m.elements.is_empty());
    assert!(m.name.starts_with("affinity-service-default/web/tcp/80-"));
    assert_eq!(m.signature(), "ipv4_addr : ipv4_addr");
    assert!(m.render_def().contains("flags dynamic,timeout;"));
    let script = rs.render_full();
    assert!(
        script.contains(&format!(
            "meta l4proto tcp dnat ip to ip saddr map @{} : 8080",
            m.name
        )),
        "{script}"
    );
    assert!(script.contains(&format!(
        "update @{} {{ ip saddr timeout 10800s : ip daddr }}",
        m.name
    )));
    assert!(script.contains(
        "ct status dnat meta l4proto { tcp, udp, sctp } ct original ip daddr . meta l4proto . \
         ct original proto-dst vmap @affinity-frontends-v4"
    ));
    // Every way in is sent to the remembering chain: cluster IP, LB and external IP, node port.
    let frontends = &rs.sets["affinity-frontends-v4"].elements;
    for k in [
        "10.43.9.9 . tcp . 80",
        "192.168.2.200 . tcp . 80",
        "172.16.0.9 . tcp . 80",
        "192.168.2.11 . tcp . 31111",
    ] {
        assert!(frontends.contains_key(k), "{k}: {frontends:?}");
    }

    // The same endpoints: the same map; one gone, or another timeout: a new, empty map.
    let same = plan(&config(), &[web(Some(10800), &THREE)]);
    assert_eq!(affinity_maps(&same)[0].name, m.name);
    let fewer = plan(&config(), &[web(Some(10800), &THREE[..2])]);
    let shorter = plan(&config(), &[web(Some(2), &THREE)]);
    for other in [&fewer, &shorter] {
        let n = &affinity_maps(other)[0].name;
        assert_ne!(n, &m.name);
        assert!(n.starts_with("affinity-service-default/web/tcp/80-"));
    }
    // A client remembered on the endpoint that went is not sent there.
    let out = trace_remembering(
        &fewer,
        &tcp(POD_CLIENT, CIP, 80),
        Some((ip(THREE[2]), 8080)),
    );
    assert_eq!(dnat_outcomes(&out).len(), 2);
    assert!(notes(&out).contains("nothing remembered"));
}

#[test]
fn the_differ_leaves_what_packets_wrote_and_swaps_whole_maps() {
    let rs = plan(&config(), &[web(Some(10800), &THREE)]);
    let name = affinity_maps(&rs)[0].name.clone();
    // The kernel's map holds what connections wrote: nothing to do about it.
    let mut live = LiveState::of(&rs);
    let m = live.sets.get_mut(&name).expect("planned");
    m.elements
        .insert("192.168.2.100".into(), LiveSet::element(None));
    m.elements
        .insert("10.42.1.250".into(), LiveSet::element(None));
    assert!(diff(&live, &rs).is_empty());

    // An endpoint goes: the old map (with whatever it held) is deleted, a new one created, and
    // no element of either is touched one by one.
    let fewer = plan(&config(), &[web(Some(10800), &THREE[..2])]);
    let new_name = &affinity_maps(&fewer)[0].name;
    let ch = diff(&live, &fewer);
    assert!(!ch.full);
    assert!(ch
        .script
        .contains(&format!("delete map inet ferry {name}\n")));
    assert!(ch.script.contains(&format!(
        "add map inet ferry {new_name} {{ type ipv4_addr : ipv4_addr; flags dynamic,timeout;"
    )));
    for line in ch.script.lines() {
        assert!(
            !(line.contains("element") && line.contains("affinity-service")),
            "{line}"
        );
    }
    // Flushing the chains that name the old map comes before deleting it.
    let del = ch.script.find("delete map").expect("deleted");
    let flush = ch
        .script
        .find("flush chain inet ferry service-default/web/tcp/80")
        .expect("refilled");
    assert!(flush < del);
}

#[test]
fn external_traffic_policy_local_remembers_only_local_endpoints() {
    let mut s = Svc::new("web", CIP)
        .node_port(
            Protocol::Tcp,
            80,
            NODE_PORT,
            &[ep("10.42.0.5", 8080).on(NODE), ep("10.42.1.6", 8080)],
        )
        .load_balancer_ip(LB_IP)
        .external_policy_local()
        .build();
    s.affinity_timeout = Some(60);
    let rs = plan(&config(), &[s]);
    assert_eq!(affinity_maps(&rs).len(), 2, "service and local chains");
    let from_outside = tcp("192.168.2.100", LB_IP, 80);
    // Remembered (by the cluster IP path) on the other node's pod: not from outside.
    let out = trace_remembering(&rs, &from_outside, Some((ip("10.42.1.6"), 8080)));
    assert!(
        matches!(only_fate(&out), Fate::Dnat { addr, .. } if addr == ip("10.42.0.5")),
        "{out:?}"
    );
    assert!(out[0]
        .path
        .iter()
        .any(|c| c == "remember-local-default/web/tcp/80"));
}

#[test]
fn ipv6_endpoints_on_different_ports_get_no_affinity() {
    // libnftables 1.0.6 aborts on an IPv6 address . port map statement; the same port is fine.
    let mut s = Svc::new("v6", "fd00:43::9")
        .port(
            Protocol::Tcp,
            80,
            &[ep("fd00:42::5", 8080), ep("fd00:42::6", 8081)],
        )
        .build();
    s.affinity_timeout = Some(60);
    let rs = plan(&dual_stack_config(), &[s.clone()]);
    assert!(affinity_maps(&rs).is_empty());
    s.ports[0].endpoints[1].port = 8080;
    let rs = plan(&dual_stack_config(), &[s]);
    assert_eq!(affinity_maps(&rs).len(), 1);
    let script = rs.render_full();
    assert!(script.contains("dnat ip6 to ip6 saddr map @affinity-service-default/v6/tcp/80-"));
}

fn with_ranges(ranges: &[&str]) -> ResolvedService {
    let mut s = web(None, &THREE);
    s.load_balancer_source_ranges = ranges.iter().map(|r| r.parse().expect("cidr")).collect();
    s
}

#[test]
fn source_ranges_drop_outsiders_on_the_load_balancer_address_only() {
    let rs = plan(
        &config(),
        &[with_ranges(&["10.1.0.0/16", "192.168.2.112/28"])],
    );
    let script = rs.render_full();
    assert!(
        script.contains(
            "add rule inet ferry firewall-default/web ip saddr != { 10.1.0.0/16, 192.168.2.112/28 } drop"
        ),
        "{script}"
    );
    // Outside the ranges, to the LB address: dropped (not rejected), and the tracer says why.
    let out = trace(&rs, &tcp("192.168.2.100", LB_IP, 80));
    assert_eq!(only_fate(&out), Fate::Dropped);
    assert!(out[0].path.iter().any(|c| c == "firewall-default/web"));
    assert!(notes(&out).contains(
        "source 192.168.2.100 is outside the allowed source ranges (10.1.0.0/16, 192.168.2.112/28)"
    ));
    // Inside: on to the endpoints.
    for src in ["10.1.7.7", "192.168.2.120"] {
        let out = trace(&rs, &tcp(src, LB_IP, 80));
        assert_eq!(dnat_outcomes(&out).len(), 3, "{src}: {out:?}");
        assert!(notes(&out).contains("is inside the allowed source ranges"));
    }
    // The node port, the external IP and the cluster IP are not filtered (as kube-proxy).
    for p in [
        tcp("192.168.2.100", "192.168.2.11", NODE_PORT),
        tcp("192.168.2.100", "172.16.0.9", 80),
        tcp("192.168.2.100", CIP, 80),
    ] {
        assert_eq!(dnat_outcomes(&trace(&rs, &p)).len(), 3, "{p:?}");
    }
}

#[test]
fn source_ranges_that_allow_everything_or_hold_the_node() {
    // 0.0.0.0/0: nothing to filter, no firewall at all.
    let rs = plan(&config(), &[with_ranges(&["10.1.0.0/16", "0.0.0.0/0"])]);
    assert!(!rs.chains.contains_key("firewall-default/web"));
    assert!(rs.sets["firewall-ips-v4"].elements.is_empty());
    // A range holding this node's address: the LB address is an allowed source too (a node
    // reaching a VIP held locally sends from the VIP), as kube-proxy.
    let rs = plan(&config(), &[with_ranges(&["192.168.2.0/28"])]);
    let script = rs.render_full();
    assert!(
        script.contains("ip saddr != { 192.168.2.0/28, 192.168.2.200/32 } drop"),
        "{script}"
    );
    // Without a load-balancer address there is nothing to guard.
    let mut s = with_ranges(&["10.1.0.0/16"]);
    s.load_balancer_ips.clear();
    let rs = plan(&config(), &[s]);
    assert!(!rs.chains.contains_key("firewall-default/web"));
}
