//! What one agent pass costs at scale, stage by stage, when one endpoint changed (a unit-level
//! benchmark of [`super::compute`] and the rest of `Worker::sync` but the kernel write, which
//! `ferry bench` measures). Ignored by default; run it optimised:
//!
//! ```text
//! FERRY_PASS_SERVICES=10000 cargo test --release -p ferry --bin ferry agent_pass_at_scale \
//!     -- --ignored --nocapture
//! ```

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use clap::Parser;
use ferry_model::view::{resolve, Resolver};
use ferry_model::{
    AddressType, ClusterIpSpec, Endpoint, EndpointConditions, EndpointPort, EndpointSlice, Meta,
    Node, NodeAddress, Protocol, Service, ServicePort, ServiceType, TargetPort,
};
use ferry_plan::plan::{Planner, DEFAULT_MASQUERADE_MARK};
use ferry_plan::PlanConfig;

use super::*;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    agent: AgentArgs,
}

fn ip(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(n))
}

/// `n` services of `eps` endpoints each, as the API source would hand them over (cluster IPs
/// and node ports in the spec, one versioned EndpointSlice per service).
fn snapshot(n: usize, eps: usize) -> Snapshot {
    let mut snap = Snapshot::default();
    for i in 0..n {
        let meta = |name: String, rv: Option<String>| Meta {
            name,
            namespace: "bench".into(),
            resource_version: rv,
            ..Meta::default()
        };
        let node_port = i % 2 == 1;
        snap.services.push(Service {
            meta: meta(format!("svc-{i}"), Some("1".into())),
            type_: if node_port {
                ServiceType::NodePort
            } else {
                ServiceType::ClusterIP
            },
            cluster_ip: ClusterIpSpec::Ip(ip(0x0a2b_0000 + i as u32 + 1)),
            ports: vec![ServicePort {
                name: String::new(),
                protocol: Protocol::Tcp,
                port: 80,
                target_port: TargetPort::Number(8080),
                node_port: node_port.then_some(30000 + (i / 2 % 2768) as u16),
            }],
            ..Service::default()
        });
        snap.slices.push(EndpointSlice {
            meta: meta(format!("svc-{i}-abcde"), Some("1".into())),
            service_name: format!("svc-{i}"),
            address_type: AddressType::IPv4,
            endpoints: (0..eps)
                .map(|e| Endpoint {
                    addresses: [ip(0x0a2a_0000 + ((i * eps + e) as u32 % 65_000) + 1)].into(),
                    conditions: EndpointConditions {
                        ready: true,
                        serving: true,
                        terminating: false,
                    },
                    node_name: Some(format!("node-{}", e % 3).into()),
                    zone_hints: None,
                })
                .collect(),
            ports: vec![EndpointPort {
                name: String::new(),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
        });
    }
    snap.nodes.push(Node {
        meta: Meta {
            name: "node-0".into(),
            ..Meta::default()
        },
        addresses: vec![NodeAddress {
            type_: "InternalIP".into(),
            address: "192.168.2.11".into(),
        }],
        pod_cidrs: vec![],
    });
    snap
}

/// The allocations `compute` resolves with (no load balancers here).
fn allocations_of(
    snap: &Snapshot,
) -> BTreeMap<ferry_model::ObjectRef, ferry_model::alloc::Allocation> {
    ferry_kube::status::from_api(&snap.services, &PoolConfig::default())
        .0
        .into_iter()
        .filter_map(|(r, a)| a.ok().map(|a| (r, a)))
        .collect()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

#[test]
#[ignore = "a benchmark: run with --release --ignored --nocapture"]
fn agent_pass_at_scale() {
    let n: usize = std::env::var("FERRY_PASS_SERVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let args = Cli::try_parse_from(["agent", "--node", "node-0"])
        .expect("agent flags")
        .agent;
    let host = netwatch::HostNet {
        addrs: vec![("eth0".into(), "192.168.2.11".parse().expect("an address"))],
        gateways: vec![],
    };
    let mut snap = snapshot(n, 10);
    let mut planner = crate::agent::TablePlanner::default();
    // The first pass (cold).
    let t = Instant::now();
    let pools = load_pools(&snap, &args.service_cidr, &host);
    let allocated = ferry_kube::status::from_api(&snap.services, &pools.0);
    let p = compute(&mut planner, &args, &snap, pools, allocated, &host);
    println!(
        "agent pass at {n} services x 10 endpoints: first pass (compute) {:.0} ms",
        ms(t)
    );
    let mut served = p.services;
    // What the planner is configured with (as compute builds it), for the stages timed alone.
    let cfg = PlanConfig {
        node_name: "node-0".into(),
        node_ips: vec!["192.168.2.11".parse().expect("an address")],
        cluster_cidrs: args.cluster_cidr.clone(),
        service_cidrs: args.service_cidr.clone(),
        masquerade_mark: DEFAULT_MASQUERADE_MARK,
        ..PlanConfig::default()
    };
    let mut alone = Planner::default();
    alone.update(&cfg, &served);
    let mut resolver = Resolver::default();
    resolver.update(&snap.services, &allocations_of(&snap), &snap.slices);
    let mut delta_planner = Planner::default();
    delta_planner.update(&cfg, &served);

    let mut stages: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut put = |k: &'static str, v: f64| stages.entry(k).or_default().push(v);
    for k in 0..9usize {
        // One endpoint changes: a new version of its slice.
        let victim = (k * 7919) % n;
        let sl = &mut snap.slices[victim];
        sl.meta.resource_version = Some(format!("{}", k + 2));
        let e = &mut sl.endpoints[0];
        e.conditions.ready = !e.conditions.ready;

        // Today's pass, stage by stage.
        let t = Instant::now();
        let copy = snap.clone();
        put("1 source snapshot (a copy of every object)", ms(t));
        let t = Instant::now();
        let pools = load_pools(&copy, &args.service_cidr, &host);
        let allocated = ferry_kube::status::from_api(&copy.services, &pools.0);
        put("2 pools and allocations (from_api)", ms(t));
        let t = Instant::now();
        let p = compute(&mut planner, &args, &copy, pools, allocated, &host);
        put("3 compute (resolve + Planner::update and the rest)", ms(t));
        let t = Instant::now();
        let stale = ferry_plan::plan::stale_udp_endpoints(&served, &p.services);
        let counted = changes_between(&served, &p.services);
        let checks = crate::healthcheck::wanted(&p.services, &args.node);
        put("4 after: stale UDP, changes, health checks", ms(t));
        assert!(stale.is_empty() && checks.is_empty());
        assert_eq!(counted.0, 1, "one service changed");
        let mine = format!("bench/svc-{victim}/");
        let only_mine = |t: &ferry_plan::plan::Touched| {
            !t.chains.is_empty() && t.chains.iter().all(|c| c.contains(&mine))
        };
        // Over the agent's tables (one, or the shards and the common table).
        let mut chains = p.touched.iter().flat_map(|t| t.chains.iter()).peekable();
        let touched_mine = chains.peek().is_some() && chains.all(|c| c.contains(&mine));
        assert!(touched_mine, "{:?}", p.touched);
        served = p.services;

        // compute's two big parts alone, and what replaces them.
        let allocations = allocations_of(&copy);
        let t = Instant::now();
        let resolved = resolve(&copy.services, &allocations, &copy.slices);
        put("3a of compute: resolve", ms(t));
        let t = Instant::now();
        let touched = alone.update(&cfg, &resolved).1;
        put(
            "3b of compute: Planner::update (every service hashed)",
            ms(t),
        );
        assert!(only_mine(&touched), "{touched:?}");
        let t = Instant::now();
        let ch = resolver.update(&copy.services, &allocations, &copy.slices);
        put("5a instead of 3a: Resolver::update", ms(t));
        assert_eq!(ch.changed.len(), 1);
        assert_eq!(ch.resolved_again, 1);
        let t = Instant::now();
        let touched = delta_planner
            .update_changed(&cfg, resolver.changed(&ch), &ch.removed)
            .expect("the same configuration");
        put("5b instead of 3b: Planner::update_changed", ms(t));
        assert!(only_mine(&touched), "{touched:?}");
        assert_eq!(delta_planner.ruleset(), alone.ruleset());
        let t = Instant::now();
        let now: Vec<ferry_model::view::ResolvedService> = resolver.changed(&ch).cloned().collect();
        let stale = ferry_plan::plan::stale_udp_endpoints(&ch.previous, &now);
        let counted = changes_between(&ch.previous, &now);
        put(
            "5e instead of 4 (but health checks): stale UDP, changes from what changed",
            ms(t),
        );
        assert!(stale.is_empty());
        assert_eq!(counted.0, 1, "one service changed");
        let t = Instant::now();
        let all: Vec<&ferry_model::view::ResolvedService> = resolver.services().collect();
        put("5c every resolved service listed (borrowed)", ms(t));
        let t = Instant::now();
        let owned: Vec<ferry_model::view::ResolvedService> = all.into_iter().cloned().collect();
        put(
            "5d every resolved service copied (what Pass.services holds today)",
            ms(t),
        );
        assert_eq!(owned.len(), n);
    }
    for (k, v) in &mut stages {
        println!("  {k}: {:.2} ms median", median(v));
    }
}
