//! What one agent pass costs at scale, stage by stage, when one endpoint changed, one service
//! was added and one removed (a unit-level benchmark of `Worker::sync` with the API source but
//! the kernel write, which `ferry bench` measures): the source's view, pools, [`super::compute`]
//! and what the sync derives after. The objects go through the API source as its watchers
//! would hand them over. Ignored by default; run it optimised:
//!
//! ```text
//! FERRY_PASS_SERVICES=10000 cargo test --release -p ferry --bin ferry agent_pass_at_scale \
//!     -- --ignored --nocapture
//! ```

use std::net::Ipv4Addr;
use std::time::Instant;

use clap::Parser;
use kube::api::DynamicObject;
use kube::runtime::watcher::Event;

use super::*;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    agent: AgentArgs,
}

fn ip(n: u32) -> String {
    Ipv4Addr::from(n).to_string()
}

fn dynamic(v: serde_json::Value) -> DynamicObject {
    serde_json::from_value(v).expect("a DynamicObject")
}

/// Service `i` as the API server has it (cluster IP and node port in the spec).
fn service(i: usize) -> DynamicObject {
    let node_port = i % 2 == 1;
    let mut port = serde_json::json!({"port": 80, "targetPort": 8080, "protocol": "TCP"});
    if node_port {
        port["nodePort"] = (30000 + (i / 2 % 2768)).into();
    }
    dynamic(serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "bench", "name": format!("svc-{i}"), "resourceVersion": "1"},
        "spec": {
            "type": if node_port { "NodePort" } else { "ClusterIP" },
            "clusterIP": ip(0x0a2b_0000 + i as u32 + 1),
            "ports": [port],
        },
    }))
}

/// Service `i`'s EndpointSlice of `eps` endpoints, at version `rv`, endpoint 0 ready or not.
fn slice(i: usize, eps: usize, rv: usize, first_ready: bool) -> DynamicObject {
    let endpoints: Vec<serde_json::Value> = (0..eps)
        .map(|e| {
            let ready = e != 0 || first_ready;
            serde_json::json!({
                "addresses": [ip(0x0a2a_0000 + ((i * eps + e) as u32 % 65_000) + 1)],
                "conditions": {"ready": ready, "serving": ready, "terminating": false},
                "nodeName": format!("node-{}", e % 3),
            })
        })
        .collect();
    dynamic(serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "bench", "name": format!("svc-{i}-abcde"),
                     "resourceVersion": rv.to_string(),
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"port": 8080, "protocol": "TCP"}],
    }))
}

/// An API source holding `n` services of `eps` endpoints each and this node.
fn source(n: usize, eps: usize) -> ferry_kube::ApiSource {
    let src = ferry_kube::ApiSource::detached(Default::default());
    let list = |kind: &str, objects: &mut dyn Iterator<Item = DynamicObject>| {
        src.inject(kind, Event::Init);
        for o in objects {
            src.inject(kind, Event::InitApply(o));
        }
        src.inject(kind, Event::InitDone);
    };
    list("Service", &mut (0..n).map(service));
    list("EndpointSlice", &mut (0..n).map(|i| slice(i, eps, 1, true)));
    list(
        "Node",
        &mut std::iter::once(dynamic(serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-0"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.2.11"}]},
        }))),
    );
    src
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// The stages of one agent pass as `Worker::sync` runs them with the API source, but the
/// kernel write: the source's view, pools, `compute`, and what the sync derives after.
struct Timed {
    stages: [(&'static str, f64); 4],
    pass: Pass,
    after: AfterPass,
}

fn agent_pass(
    planner: &mut TablePlanner,
    args: &AgentArgs,
    src: &ferry_kube::ApiSource,
    host: &netwatch::HostNet,
) -> Timed {
    let t = Instant::now();
    let (snap, named) = src.view_and_changes();
    let t_source = ms(t);
    let t = Instant::now();
    let pools = load_pools(&snap, &args.service_cidr, host);
    let t_alloc = ms(t);
    let t = Instant::now();
    let mut pass = compute(planner, args, &snap, pools, Allocated::FromApi(named), host);
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
            ("source view", t_source),
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
    let src = source(n, 10);
    let mut planner = TablePlanner::default();
    let t = Instant::now();
    let first = agent_pass(&mut planner, &args, &src, &host);
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
    let (mut endpoint_runs, mut added_runs, mut removed_runs) =
        (Vec::new(), Vec::new(), Vec::new());
    let (mut events, mut copies) = (Vec::new(), Vec::new());
    for k in 0..9usize {
        // One endpoint changes: a new version of its slice (endpoint 0 not ready).
        let victim = (k * 7919) % n;
        let t = Instant::now();
        assert!(src.inject(
            "EndpointSlice",
            Event::Apply(slice(victim, 10, k + 2, false))
        ));
        events.push(ms(t));
        let r = agent_pass(&mut planner, &args, &src, &host);
        assert_eq!(r.after.service_changes, 1, "one service changed");
        let mine = format!("bench/svc-{victim}/");
        let mut chains = r
            .pass
            .touched
            .iter()
            .flat_map(|t| t.chains.iter())
            .peekable();
        // Its own chains, and the shared draw chain of its new endpoint count.
        let touched_mine = chains.peek().is_some()
            && chains.all(|c| c.contains(&mine) || c.starts_with("choose-"));
        assert!(touched_mine, "{:?}", r.pass.touched);
        endpoint_runs.push(r.stages);
        // Back to ready, unmeasured.
        src.inject(
            "EndpointSlice",
            Event::Apply(slice(victim, 10, k + 100, true)),
        );
        agent_pass(&mut planner, &args, &src, &host);

        // One service added (with its slice).
        src.inject("Service", Event::Apply(service(n + k)));
        src.inject("EndpointSlice", Event::Apply(slice(n + k, 10, 1, true)));
        let r = agent_pass(&mut planner, &args, &src, &host);
        assert_eq!(r.after.service_changes, 1, "one service added");
        assert_eq!(planner.services().count(), n + 1);
        added_runs.push(r.stages);

        // ... and removed again.
        src.inject("Service", Event::Delete(service(n + k)));
        src.inject("EndpointSlice", Event::Delete(slice(n + k, 10, 1, true)));
        let r = agent_pass(&mut planner, &args, &src, &host);
        assert_eq!(r.after.service_changes, 1, "one service removed");
        assert_eq!(planner.services().count(), n);
        removed_runs.push(r.stages);

        // What the source's view saves: a copy of every object.
        let t = Instant::now();
        let copy = src.snapshot();
        copies.push(ms(t));
        assert_eq!(copy.services.len(), n);
    }
    shown("one endpoint changed", &mut endpoint_runs);
    shown("one service added", &mut added_runs);
    shown("one service removed", &mut removed_runs);
    println!(
        "  (outside the pass: one watch event converted {:.2} ms; a copy of every object, what a \
         pass took before the view, {:.2} ms)",
        median(&mut events),
        median(&mut copies)
    );
    // The incremental passes planned what one full pass of the same objects plans.
    let mut fresh = TablePlanner::default();
    agent_pass(&mut fresh, &args, &src, &host);
    assert!(planner.tables() == fresh.tables(), "incremental != full");
}
