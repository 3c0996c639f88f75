//! The sharded layout (`PlanConfig::shards` > 1): every packet gets the same fate, with the
//! same probability, through the common table and N shard tables as through the one table.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;

use common::*;
use ferry_model::view::ResolvedService;
use ferry_model::Protocol;
use ferry_plan::plan::{plan_sharded, shard_of, shard_table};
use ferry_plan::trace::{trace_remembering, trace_tables_remembering, Outcome, Packet};
use ferry_plan::{plan, PlanConfig};
use proptest::prelude::*;

/// Fate -> probability (fates keyed by their debug text: paths differ between layouts).
fn fates(out: &[Outcome]) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    for o in out {
        *m.entry(format!("{:?}", o.fate)).or_insert(0.0) += o.probability;
    }
    m
}

fn same(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, pa), (kb, pb))| ka == kb && (pa - pb).abs() < 1e-9)
}

/// Packets worth asking about: every service address and port (and one port off), from a pod,
/// from outside and from the node; node ports; addresses no service has.
fn packets(services: &[ResolvedService]) -> Vec<Packet> {
    let mut out = Vec::new();
    for svc in services {
        let v6 = svc.cluster_ip.is_some_and(|a| a.is_ipv6());
        let (pod, outside, node_ip) = if v6 {
            ("fd00:42::ffff", "2001:db8:9::1", "2001:db8:2::11")
        } else {
            ("10.42.1.250", "192.168.9.1", "192.168.2.11")
        };
        let addrs: Vec<IpAddr> = svc
            .cluster_ip
            .iter()
            .chain(&svc.external_ips)
            .chain(&svc.load_balancer_ips)
            .copied()
            .collect();
        for port in &svc.ports {
            for a in &addrs {
                for src in [pod, outside] {
                    for dport in [port.port, port.port.wrapping_add(1)] {
                        out.push(packet(port.protocol, src, &a.to_string(), dport));
                    }
                }
                out.push(from_node(packet(
                    port.protocol,
                    node_ip,
                    &a.to_string(),
                    port.port,
                )));
            }
            if let Some(np) = port.node_port {
                out.push(packet(port.protocol, outside, node_ip, np));
                out.push(packet(port.protocol, pod, node_ip, np));
            }
            for e in &port.endpoints {
                // A pod reaching itself through its service (hairpin).
                if let Some(a) = svc.cluster_ip {
                    out.push(packet(
                        port.protocol,
                        &e.addr.to_string(),
                        &a.to_string(),
                        port.port,
                    ));
                }
            }
        }
    }
    for (d, port) in [
        ("10.43.250.250", 80),
        ("fd00:43::ffff", 80),
        ("192.168.2.210", 443),
        ("192.168.5.9", 80),
        ("fd00:200::11", 80),
        ("10.44.0.1", 80),
        ("192.168.2.11", 22),
    ] {
        let src = if d.contains(':') {
            "2001:db8:9::1"
        } else {
            "192.168.9.1"
        };
        out.push(packet(Protocol::Tcp, src, d, port));
        out.push(packet(Protocol::Udp, src, d, port));
    }
    out
}

fn check(cfg: &PlanConfig, services: &[ResolvedService]) -> Result<(), TestCaseError> {
    let one = plan(cfg, services);
    let tables = plan_sharded(cfg, services);
    prop_assert_eq!(tables.len(), usize::from(cfg.shards) + 1);
    for t in &tables {
        assert_references_resolve(t);
    }
    for p in packets(services) {
        let a = fates(&trace_remembering(&one, &p, None));
        let b = fates(&trace_tables_remembering(&tables, &p, None));
        prop_assert!(
            same(&a, &b),
            "{:?}: one table {:?}, {} shards {:?}",
            p,
            a,
            cfg.shards,
            b
        );
        // Client affinity: a client remembered on each endpoint.
        for svc in services.iter().filter(|s| s.affinity_timeout.is_some()) {
            for port in &svc.ports {
                for e in &port.endpoints {
                    let r = Some((e.addr, e.port));
                    let a = fates(&trace_remembering(&one, &p, r));
                    let b = fates(&trace_tables_remembering(&tables, &p, r));
                    prop_assert!(
                        same(&a, &b),
                        "{:?} remembered on {:?}: {:?} vs {:?}",
                        p,
                        r,
                        a,
                        b
                    );
                }
            }
        }
    }
    Ok(())
}

#[test]
fn one_shard_is_the_one_table_of_today() {
    let cfg = dual_stack_config();
    let services = seed_services();
    assert_eq!(plan_sharded(&cfg, &services), vec![plan(&cfg, &services)]);
    let cfg = PlanConfig { shards: 1, ..cfg };
    assert_eq!(plan_sharded(&cfg, &services), vec![plan(&cfg, &services)]);
    assert_eq!(plan(&cfg, &services).table_name(), "ferry");
}

#[test]
fn shards_are_stable_and_spread() {
    let mut counts = [0usize; 8];
    for i in 0..8000 {
        let id = ferry_model::ObjectRef {
            namespace: format!("ns-{}", i % 7),
            name: format!("svc-{i}"),
        };
        let k = shard_of(&id, 8);
        assert_eq!(k, shard_of(&id, 8));
        counts[usize::from(k)] += 1;
    }
    assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
    let web = ferry_model::ObjectRef {
        namespace: "default".into(),
        name: "web".into(),
    };
    // Pinned: a change of hash would move every service on upgrade.
    assert_eq!(shard_of(&web, 16), shard_of(&web, 16));
    assert_eq!(shard_table(3), "ferry-3");
}

#[test]
fn seed_services_have_the_same_fates_over_shards() {
    for n in [2u16, 3, 8] {
        let cfg = PlanConfig {
            shards: n,
            ..with_lb_pools(dual_stack_config())
        };
        check(&cfg, &seed_services()).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn random_services_have_the_same_fates_over_shards(
        specs in service_specs(12),
        n in prop_oneof![Just(2u16), Just(3), Just(5)],
    ) {
        let cfg = PlanConfig { shards: n, ..with_lb_pools(dual_stack_config()) };
        check(&cfg, &services_from_specs(&specs))?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The incremental sharded planner gives exactly the fresh sharded plan whatever came
    /// before, and what it says it touched is all a differ needs to look at.
    #[test]
    fn sharded_planner_equals_fresh_sharded_plans(
        a in service_specs(12),
        other in service_specs(12),
        c1 in proptest::collection::vec(change(), 14),
        c2 in proptest::collection::vec(change(), 14),
        n in prop_oneof![Just(2u16), Just(4)],
    ) {
        use ferry_plan::diff::{diff_touched, LiveState};
        use ferry_plan::plan::ShardedPlanner;
        let cfg = PlanConfig { shards: n, ..with_lb_pools(dual_stack_config()) };
        let history = [
            services_from_specs(&a),
            evolve(&a, &other, &c1),
            evolve(&other, &a, &c2),
            services_from_specs(&a),
        ];
        let mut p = ShardedPlanner::default();
        let t0 = p.update(&cfg, &history[0]);
        prop_assert!(t0[0].full);
        let mut live: Vec<LiveState> = p.tables().into_iter().map(LiveState::of).collect();
        for snap in &history[1..] {
            let touched = p.update(&cfg, snap);
            let tables = p.tables();
            let fresh = plan_sharded(&cfg, snap);
            prop_assert_eq!(tables.len(), fresh.len());
            for (k, ((rs, want), t)) in tables.iter().zip(&fresh).zip(&touched).enumerate() {
                prop_assert_eq!(*rs, want, "table {}", k);
                prop_assert!(!t.full);
                match diff_touched(&live[k], rs, t) {
                    Some(_) => live[k].update_touched(rs, t),
                    None => live[k] = LiveState::of(rs),
                }
                prop_assert_eq!(&live[k], &LiveState::of(rs), "table {}", k);
            }
        }
    }
}
