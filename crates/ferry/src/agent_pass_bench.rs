//! What one agent pass costs at scale, stage by stage, when one endpoint changed (a unit-level
//! benchmark of [`super::compute`] and the rest of `Worker::sync` but the kernel write, which
//! `ferry bench` measures). Ignored by default; run it optimised:
//!
//! ```text
//! FERRY_PASS_SERVICES=10000 cargo test --release -p ferry --bin ferry agent_pass_at_scale \
//!     -- --ignored --nocapture
//! ```

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use clap::Parser;
use ferry_model::{
    AddressType, ClusterIpSpec, Endpoint, EndpointConditions, EndpointPort, EndpointSlice, Meta,
    Node, NodeAddress, Protocol, Service, ServicePort, ServiceType, TargetPort,
};

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

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// One more service of the generated kind (`i` beyond those of [`snapshot`]), and its slice.
fn one_service(i: usize, eps: usize) -> (Service, EndpointSlice) {
    let mut one = snapshot(1, eps);
    let (Some(mut svc), Some(mut sl)) = (one.services.pop(), one.slices.pop()) else {
        unreachable!("snapshot(1) has one service and one slice")
    };
    svc.meta.name = format!("svc-{i}");
    svc.cluster_ip = ClusterIpSpec::Ip(ip(0x0a2b_0000 + i as u32 + 1));
    sl.meta.name = format!("svc-{i}-abcde");
    sl.service_name = format!("svc-{i}");
    (svc, sl)
}

/// The stages of one agent pass as `Worker::sync` runs them, but the kernel write: the
/// source's snapshot, pools and allocations, `compute`, and what the sync derives after.
struct Timed {
    stages: [(&'static str, f64); 4],
    pass: Pass,
    after: AfterPass,
}

fn agent_pass(
    planner: &mut TablePlanner,
    args: &AgentArgs,
    source: &Snapshot,
    host: &netwatch::HostNet,
) -> Timed {
    let t = Instant::now();
    let snap = source.clone();
    let t_source = ms(t);
    let t = Instant::now();
    let pools = load_pools(&snap, &args.service_cidr, host);
    let t_alloc = ms(t);
    let t = Instant::now();
    let mut pass = compute(planner, args, &snap, pools, Allocated::FromApi, host);
    let t_compute = ms(t);
    let t = Instant::now();
    let changes = std::mem::take(&mut pass.changes);
    let after = after_pass(
        planner,
        &changes.previous,
        &changes.changed,
        Some(&args.node),
    );
    pass.changes = changes;
    let t_after = ms(t);
    drop(snap);
    Timed {
        stages: [
            ("source snapshot", t_source),
            ("pools", t_alloc),
            ("compute (resolve, plan, the rest)", t_compute),
            ("after (stale UDP, counts, health checks)", t_after),
        ],
        pass,
        after,
    }
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
    let mut planner = TablePlanner::default();
    let t = Instant::now();
    let first = agent_pass(&mut planner, &args, &snap, &host);
    println!(
        "agent pass at {n} services x 10 endpoints: first pass {:.0} ms ({} services, {} endpoints)",
        ms(t),
        planner.services().count(),
        first.after.endpoints
    );
    let shown = |name: &str, runs: &mut Vec<[(&'static str, f64); 4]>| {
        let mut total: Vec<f64> = runs.iter().map(|r| r.iter().map(|s| s.1).sum()).collect();
        println!("  {name}: {:.2} ms median pass", median(&mut total));
        for k in 0..4 {
            let mut v: Vec<f64> = runs.iter().map(|r| r[k].1).collect();
            println!("    {}: {:.2} ms", runs[0][k].0, median(&mut v));
        }
    };
    let mut endpoint_runs = Vec::new();
    let mut added_runs = Vec::new();
    let mut removed_runs = Vec::new();
    for k in 0..9usize {
        // One endpoint changes: a new version of its slice.
        let victim = (k * 7919) % n;
        let sl = &mut snap.slices[victim];
        sl.meta.resource_version = Some(format!("{}", k + 2));
        let e = &mut sl.endpoints[0];
        e.conditions.ready = !e.conditions.ready;
        let r = agent_pass(&mut planner, &args, &snap, &host);
        assert_eq!(r.after.service_changes, 1, "one service changed");
        let mine = format!("bench/svc-{victim}/");
        let mut chains = r
            .pass
            .touched
            .iter()
            .flat_map(|t| t.chains.iter())
            .peekable();
        let touched_mine = chains.peek().is_some() && chains.all(|c| c.contains(&mine));
        assert!(touched_mine, "{:?}", r.pass.touched);
        endpoint_runs.push(r.stages);

        // One service added (with its slice).
        let (svc, sl) = one_service(n + k, 10);
        snap.services.push(svc);
        snap.slices.push(sl);
        let r = agent_pass(&mut planner, &args, &snap, &host);
        assert_eq!(r.after.service_changes, 1, "one service added");
        assert_eq!(planner.services().count(), n + 1);
        added_runs.push(r.stages);

        // ... and removed again.
        snap.services.pop();
        snap.slices.pop();
        let r = agent_pass(&mut planner, &args, &snap, &host);
        assert_eq!(r.after.service_changes, 1, "one service removed");
        assert_eq!(planner.services().count(), n);
        removed_runs.push(r.stages);
    }
    shown("one endpoint changed", &mut endpoint_runs);
    shown("one service added", &mut added_runs);
    shown("one service removed", &mut removed_runs);
    // The incremental passes planned what one full pass of the same snapshot plans.
    let mut fresh = TablePlanner::default();
    agent_pass(&mut fresh, &args, &snap, &host);
    assert!(planner.tables() == fresh.tables(), "incremental != full");
}
