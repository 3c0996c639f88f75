//! `ferry bench` (the `ferry-lab` binary runs it): plan + apply N services with M endpoints
//! each from scratch, then one endpoint change at a time, in the current network namespace (run
//! it in a namespace of its own: `bench/dataplane.sh` does). Prints medians.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use ferry_model::view::{ResolvedEndpoint, ResolvedPort, ResolvedService};
use ferry_model::{ObjectRef, Protocol, ServiceType, TrafficPolicy};
use ferry_nft::{Dataplane, Nft};
use ferry_plan::plan::DEFAULT_MASQUERADE_MARK;
use ferry_plan::{plan, PlanConfig};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[arg(long, default_value_t = 10_000)]
    pub services: usize,
    #[arg(long, default_value_t = 10)]
    pub endpoints_per_service: usize,
    /// Cold loads to time (each starts from no table).
    #[arg(long, default_value_t = 5)]
    pub cold_runs: usize,
    /// Single endpoint changes to time.
    #[arg(long, default_value_t = 50)]
    pub changes: usize,
    /// Use the `nft` command instead of libnftables.
    #[arg(long)]
    pub nft_command: bool,
    /// Every change as libnftables text (as before ferry wrote netlink itself).
    #[arg(long)]
    pub text_loads: bool,
    /// Also time kube-proxy's layout (one anonymous numgen vmap per service) for comparison.
    #[arg(long)]
    pub kube_proxy_layout: bool,
    /// Spread the services over this many tables (the agent's `--nft-shards`; 1: one table).
    #[arg(long, default_value_t = 1)]
    pub shards: u16,
    /// Time the agent's own path instead: its planner and `ferry_nft::Tables` (every table in
    /// one transaction per change, a cold load cut into transactions of at most --max-ops
    /// operations); prints the number of transactions and the longest.
    #[arg(long)]
    pub agent_tables: bool,
    /// With --agent-tables: the most operations in one transaction of a cut load.
    #[arg(long, default_value_t = ferry_nft::tables::MAX_OPS)]
    pub max_ops: usize,
}

fn ip(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(n))
}

/// The benchmark's `n` services of `eps` endpoints each (`generation` moves the first
/// endpoint's port).
pub fn services(n: usize, eps: usize, generation: u32) -> Vec<ResolvedService> {
    (0..n).map(|i| service(i, eps, generation)).collect()
}

/// Service `i` of the benchmark: ClusterIP or NodePort in turn, `eps` endpoints.
fn service(i: usize, eps: usize, generation: u32) -> ResolvedService {
    let i32_ = i as u32;
    ResolvedService {
        id: ObjectRef::new("bench", format!("svc-{i}")),
        type_: if i.is_multiple_of(2) {
            ServiceType::ClusterIP
        } else {
            ServiceType::NodePort
        },
        // 10.43.x.y cluster IPs, 10.42.x.y endpoints (10.42/16 holds 65,536).
        cluster_ip: Some(ip(0x0a2b_0000 + i32_ + 1)),
        secondary_cluster_ip: None,
        external_ips: vec![],
        load_balancer_ips: vec![],
        external_traffic_policy: TrafficPolicy::Cluster,
        affinity_timeout: None,
        load_balancer_source_ranges: vec![],
        health_check_node_port: None,
        internal_traffic_policy: TrafficPolicy::Cluster,
        ports: vec![ResolvedPort {
            name: String::new(),
            protocol: Protocol::Tcp,
            port: 80,
            node_port: (i % 2 == 1).then_some(30000 + (i / 2 % 2768) as u16),
            endpoints: (0..eps)
                .map(|e| ResolvedEndpoint {
                    addr: ip(0x0a2a_0000 + ((i * eps + e) as u32 % 65_000) + 1),
                    port: 8080 + (generation * (e == 0) as u32) as u16,
                    node: Some(format!("node-{}", e % 3).into()),
                    ready: true,
                    serving: true,
                    terminating: false,
                    zone_hints: None,
                })
                .collect(),
        }],
    }
}

/// Whether a change is what one endpoint's port moving costs: its endpoint map element of
/// each frontend (the cluster IP, the node port) replaced (several endpoints: a draw's
/// elements), or its chain's DNAT rule rewritten (one endpoint), and nothing else.
fn one_endpoint_changed(chains_changed: usize, added: usize, deleted: usize) -> bool {
    match chains_changed {
        0 => added == deleted && (1..=2).contains(&added),
        1 => added == 0 && deleted == 0,
        _ => false,
    }
}

/// Flips the port of the first endpoint of service `victim`: one endpoint change.
fn change_endpoint(current: &mut [ResolvedService], victim: usize) {
    let ep = &mut current[victim].ports[0].endpoints[0];
    ep.port = if ep.port == 8080 { 8081 } else { 8080 };
}

/// Medians of (plan, apply) times in ms, printed as "what: total (plan, apply)".
fn report(what: &str, plan: &mut [f64], apply: &mut [f64]) {
    let mut total: Vec<f64> = plan.iter().zip(apply.iter()).map(|(p, a)| p + a).collect();
    println!(
        "{what} (plan + apply), median of {}: {:.1} ms (plan {:.2} ms, apply {:.1} ms)",
        total.len(),
        median(&mut total),
        median(plan),
        median(apply)
    );
}

/// This process's CPU time so far, (user, system), in ms.
fn cpu_ms() -> (f64, f64) {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return (f64::NAN, f64::NAN);
    }
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    (ms(ru.ru_utime), ms(ru.ru_stime))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn kube_proxy_script(svcs: &[ResolvedService]) -> String {
    let mut s = String::from("add table inet kp\nadd chain inet kp services\n");
    for (i, svc) in svcs.iter().enumerate() {
        let _ = writeln!(s, "add chain inet kp svc-{i}");
        let eps = &svc.ports[0].endpoints;
        for (j, e) in eps.iter().enumerate() {
            let _ = writeln!(s, "add chain inet kp sep-{i}-{j}");
            let _ = writeln!(
                s,
                "add rule inet kp sep-{i}-{j} ip saddr {} meta mark set 0x4000",
                e.addr
            );
            let _ = writeln!(
                s,
                "add rule inet kp sep-{i}-{j} meta l4proto tcp dnat ip to {}:{}",
                e.addr, e.port
            );
        }
        let arms: Vec<String> = (0..eps.len())
            .map(|j| format!("{j} : goto sep-{i}-{j}"))
            .collect();
        let _ = writeln!(
            s,
            "add rule inet kp svc-{i} numgen random mod {} vmap {{ {} }}",
            eps.len(),
            arms.join(", ")
        );
    }
    s
}

pub fn run(args: BenchArgs) -> Result<i32> {
    if args.services == 0 || args.endpoints_per_service == 0 {
        bail!("--services and --endpoints-per-service must be positive");
    }
    let cfg = PlanConfig {
        node_name: "node-0".into(),
        node_ips: vec![ip(0xc0a8_020b)],
        cluster_cidrs: vec!["10.42.0.0/16".parse()?],
        masquerade_mark: DEFAULT_MASQUERADE_MARK,
        lb_pools: vec![],
        service_cidrs: vec!["10.43.0.0/16".parse()?],
        ..PlanConfig::default()
    };
    let nft = || {
        if args.nft_command {
            Nft::command()
        } else {
            Nft::new()
        }
    };
    let base = services(args.services, args.endpoints_per_service, 0);
    if args.agent_tables {
        return run_agent_tables(&args, &cfg, &base);
    }
    if args.shards > 1 {
        return run_sharded(&args, &cfg, &base);
    }
    println!(
        "ferry dataplane benchmark: {} services x {} endpoints = {} endpoints, nftables via {}, {}",
        args.services,
        args.endpoints_per_service,
        args.services * args.endpoints_per_service,
        nft().backend_name(),
        if args.text_loads {
            "changes as libnftables text"
        } else {
            "changes over netlink"
        }
    );

    let mut cold_plan = Vec::new();
    let mut cold_apply = Vec::new();
    for _ in 0..args.cold_runs.max(1) {
        ferry_nft::cleanup(&mut nft())?;
        let mut dp = Dataplane::new(nft());
        if args.text_loads {
            dp = dp.text_only();
        }
        let t0 = Instant::now();
        let rs = plan(&cfg, &base);
        let t1 = Instant::now();
        dp.apply(&rs)?;
        let t2 = Instant::now();
        cold_plan.push((t1 - t0).as_secs_f64() * 1e3);
        cold_apply.push((t2 - t1).as_secs_f64() * 1e3);
    }
    // The differ's share of a cold apply: comparing with an empty kernel and rendering the
    // text script (used only when netlink is not).
    let rs = plan(&cfg, &base);
    let t0 = Instant::now();
    let ch = ferry_plan::diff(&ferry_plan::LiveState::default(), &rs);
    let diff_ms = t0.elapsed().as_secs_f64() * 1e3;
    let t0 = Instant::now();
    let batch = ferry_nft::encode::changes(&rs, &ch.ops);
    let encode_ms = t0.elapsed().as_secs_f64() * 1e3;
    println!(
        "of a cold apply: diff and text script {diff_ms:.0} ms ({} MB), netlink batch {encode_ms:.0} ms ({} MB)",
        ch.script.len() >> 20,
        batch.map(|b| b.len() >> 20).unwrap_or(0)
    );
    drop((rs, ch));
    let mut cold_total: Vec<f64> = cold_plan
        .iter()
        .zip(&cold_apply)
        .map(|(a, b)| a + b)
        .collect();
    println!(
        "cold load (plan + apply), median of {}: {:.0} ms (plan {:.0} ms, apply {:.0} ms)",
        cold_total.len(),
        median(&mut cold_total),
        median(&mut cold_plan),
        median(&mut cold_apply)
    );

    // One endpoint change at a time, with everything else present: the planner is told the
    // changed service only (Planner::update_changed).
    let mut dp = Dataplane::new(nft());
    if args.text_loads {
        dp = dp.text_only();
    }
    let mut planner = ferry_plan::plan::Planner::default();
    let (rs, _) = planner.update(&cfg, &base);
    dp.apply(rs)?;
    let mut current = base.clone();
    let (mut change_plan, mut change_apply) = (Vec::new(), Vec::new());
    for k in 0..args.changes.max(1) {
        let victim = (k * 7919) % current.len();
        change_endpoint(&mut current, victim);
        let t0 = Instant::now();
        let touched = planner.update_changed(&cfg, [&current[victim]], [])?;
        let t1 = Instant::now();
        let ch = dp.apply_touched(planner.ruleset(), &touched)?;
        let t2 = Instant::now();
        if !one_endpoint_changed(ch.chains_changed, ch.elements_added, ch.elements_deleted) {
            bail!("expected one changed chain or endpoint element, got {ch}");
        }
        change_plan.push((t1 - t0).as_secs_f64() * 1e3);
        change_apply.push((t2 - t1).as_secs_f64() * 1e3);
    }
    report("one endpoint change", &mut change_plan, &mut change_apply);
    // One service added at a time.
    let (mut add_plan, mut add_apply) = (Vec::new(), Vec::new());
    for k in 0..args.changes.max(1) {
        current.push(service(args.services + k, args.endpoints_per_service, 0));
        let t0 = Instant::now();
        let touched = planner.update_changed(&cfg, current.last(), [])?;
        let t1 = Instant::now();
        let ch = dp.apply_touched(planner.ruleset(), &touched)?;
        let t2 = Instant::now();
        if ch.chains_added == 0 {
            bail!("expected a new chain, got {ch}");
        }
        add_plan.push((t1 - t0).as_secs_f64() * 1e3);
        add_apply.push((t2 - t1).as_secs_f64() * 1e3);
    }
    report("one service added", &mut add_plan, &mut add_apply);
    // What a full pass (every service given, as on a resync) costs the planner.
    change_endpoint(&mut current, 0);
    let t0 = Instant::now();
    let _ = planner.update(&cfg, &current);
    println!(
        "a full planner pass finding one endpoint change among {} services: {:.1} ms",
        current.len(),
        t0.elapsed().as_secs_f64() * 1e3
    );
    ferry_nft::cleanup(&mut nft())?;

    if args.kube_proxy_layout {
        let script = kube_proxy_script(&base);
        let mut n = Nft::new();
        let t0 = Instant::now();
        n.run(&script)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        n.run("delete table inet kp")?;
        println!(
            "kube-proxy layout (anonymous numgen vmap per service), one cold load: {ms:.0} ms"
        );
    }
    Ok(0)
}

/// Deletes the common table and every shard table of `shards`.
fn cleanup_shards(shards: u16) -> Result<()> {
    let mut nft = Nft::new();
    let mut names = vec![ferry_plan::ir::TABLE.to_string()];
    names.extend((0..shards).map(ferry_plan::plan::shard_table));
    for t in names {
        if ferry_nft::netlink::read_live_table(&t)?.table {
            nft.run(&format!("delete table inet {t}"))?;
        }
    }
    Ok(())
}

/// The sharded layout: the common table and `--shards` tables, loaded cold in one transaction
/// (and, for the longest transaction, one table each), then one endpoint change at a time:
/// only the changed service's shard is planned and written.
fn run_sharded(args: &BenchArgs, cfg: &PlanConfig, base: &[ResolvedService]) -> Result<i32> {
    use ferry_plan::diff::Op;
    use ferry_plan::plan::{plan_sharded, ShardedPlanner};
    let n = args.shards;
    let cfg = PlanConfig {
        shards: n,
        ..cfg.clone()
    };
    println!(
        "ferry dataplane benchmark: {} services x {} endpoints = {} endpoints, {} shard tables and the common one, over netlink",
        args.services,
        args.endpoints_per_service,
        args.services * args.endpoints_per_service,
        n
    );
    let mut cold_plan = Vec::new();
    let mut cold_apply = Vec::new();
    for _ in 0..args.cold_runs.max(1) {
        cleanup_shards(n)?;
        let t0 = Instant::now();
        let tables = plan_sharded(&cfg, base);
        let t1 = Instant::now();
        let full = [Op::Full { replace: false }];
        let parts: Vec<(&ferry_plan::Ruleset, &[Op])> =
            tables.iter().map(|t| (t, &full[..])).collect();
        let batch =
            ferry_nft::encode::batch(&parts).map_err(|e| anyhow::anyhow!("not encodable: {e}"))?;
        ferry_nft::netlink::send_batch(&batch)?;
        let t2 = Instant::now();
        cold_plan.push((t1 - t0).as_secs_f64() * 1e3);
        cold_apply.push((t2 - t1).as_secs_f64() * 1e3);
    }
    let mut cold_total: Vec<f64> = cold_plan
        .iter()
        .zip(&cold_apply)
        .map(|(a, b)| a + b)
        .collect();
    println!(
        "cold load in one transaction (plan + apply), median of {}: {:.0} ms (plan {:.0} ms, apply {:.0} ms)",
        cold_total.len(),
        median(&mut cold_total),
        median(&mut cold_plan),
        median(&mut cold_apply)
    );

    // One transaction per table: the longest of them.
    cleanup_shards(n)?;
    let tables = plan_sharded(&cfg, base);
    let mut longest: f64 = 0.0;
    let t0 = Instant::now();
    for t in &tables {
        let batch = ferry_nft::encode::full_load(t, false)
            .map_err(|e| anyhow::anyhow!("not encodable: {e}"))?;
        let t1 = Instant::now();
        ferry_nft::netlink::send_batch(&batch)?;
        longest = longest.max(t1.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "cold load one table per transaction: {:.0} ms in all, longest transaction {longest:.0} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    drop(tables);

    // One endpoint change at a time, through the sharded planner told the changed service
    // only (ShardedPlanner::update_changed): its shard (and the common table, when its
    // addresses change) planned and written.
    cleanup_shards(n)?;
    let mut planner = ShardedPlanner::default();
    planner.update(&cfg, base);
    let mut dps: Vec<Dataplane> = planner
        .tables()
        .iter()
        .map(|t| Dataplane::for_table(Nft::new(), t.table_name()))
        .collect();
    for (dp, t) in dps.iter_mut().zip(planner.tables()) {
        dp.apply(t)?;
    }
    let apply = |dps: &mut [Dataplane],
                 planner: &ShardedPlanner,
                 touched: &[ferry_plan::plan::Touched]|
     -> Result<(usize, usize, usize, usize)> {
        // (chains changed, chains added, elements added, elements deleted)
        let mut chains = (0, 0, 0, 0);
        for ((dp, rs), t) in dps.iter_mut().zip(planner.tables()).zip(touched) {
            if t.full || !t.chains.is_empty() || !t.elements.is_empty() {
                let ch = dp.apply_touched(rs, t)?;
                chains.0 += ch.chains_changed;
                chains.1 += ch.chains_added;
                chains.2 += ch.elements_added;
                chains.3 += ch.elements_deleted;
            }
        }
        Ok(chains)
    };
    let mut current = base.to_vec();
    let (mut change_plan, mut change_apply) = (Vec::new(), Vec::new());
    for k in 0..args.changes.max(1) {
        let victim = (k * 7919) % current.len();
        change_endpoint(&mut current, victim);
        let t0 = Instant::now();
        let touched = planner.update_changed(&cfg, [&current[victim]], [])?;
        let t1 = Instant::now();
        let (chains, _, added, deleted) = apply(&mut dps, &planner, &touched)?;
        let t2 = Instant::now();
        if !one_endpoint_changed(chains, added, deleted) {
            bail!("expected one changed chain or endpoint element, got chains ~{chains}, elements +{added} -{deleted}");
        }
        change_plan.push((t1 - t0).as_secs_f64() * 1e3);
        change_apply.push((t2 - t1).as_secs_f64() * 1e3);
    }
    report("one endpoint change", &mut change_plan, &mut change_apply);
    let (mut add_plan, mut add_apply) = (Vec::new(), Vec::new());
    for k in 0..args.changes.max(1) {
        current.push(service(args.services + k, args.endpoints_per_service, 0));
        let t0 = Instant::now();
        let touched = planner.update_changed(&cfg, current.last(), [])?;
        let t1 = Instant::now();
        let (_, chains, _, _) = apply(&mut dps, &planner, &touched)?;
        let t2 = Instant::now();
        if chains == 0 {
            bail!("expected a new chain, got none");
        }
        add_plan.push((t1 - t0).as_secs_f64() * 1e3);
        add_apply.push((t2 - t1).as_secs_f64() * 1e3);
    }
    report("one service added", &mut add_plan, &mut add_apply);
    change_endpoint(&mut current, 0);
    let t0 = Instant::now();
    let _ = planner.update(&cfg, &current);
    println!(
        "a full planner pass finding one endpoint change among {} services: {:.1} ms",
        current.len(),
        t0.elapsed().as_secs_f64() * 1e3
    );
    cleanup_shards(n)?;
    Ok(0)
}

/// `--agent-tables`: cold loads and single endpoint changes through the agent's planner
/// (`ShardedPlanner`, or `Planner` for one table) and dataplane (`ferry_nft::Tables`).
fn run_agent_tables(args: &BenchArgs, cfg: &PlanConfig, base: &[ResolvedService]) -> Result<i32> {
    use ferry_nft::Tables;
    use ferry_plan::plan::{Planner, ShardedPlanner, Touched};
    let n = args.shards.max(1);
    let cfg = PlanConfig {
        shards: n,
        ..cfg.clone()
    };
    println!(
        "ferry dataplane benchmark, the agent's path: {} services x {} endpoints, {} table(s) \
         (and the common one when more than 1), transactions of <= {} operations when cut",
        args.services, args.endpoints_per_service, n, args.max_ops
    );
    // The planner of the agent: one table, or the common one and the shards.
    enum P {
        One(Box<Planner>),
        Sharded(Box<ShardedPlanner>),
    }
    impl P {
        fn update(&mut self, cfg: &PlanConfig, s: &[ResolvedService]) -> Vec<Touched> {
            match self {
                P::One(p) => vec![p.update(cfg, s).1],
                P::Sharded(p) => p.update(cfg, s),
            }
        }
        fn tables(&self) -> Vec<&ferry_plan::Ruleset> {
            match self {
                P::One(p) => vec![p.ruleset()],
                P::Sharded(p) => p.tables(),
            }
        }
    }
    let fresh = || match n {
        1 => P::One(Box::default()),
        _ => P::Sharded(Box::default()),
    };
    let (mut plan_ms, mut apply_ms, mut longest_ms) = (Vec::new(), Vec::new(), Vec::new());
    let (mut apply_user_ms, mut apply_sys_ms) = (Vec::new(), Vec::new());
    let mut txns = 0;
    for _ in 0..args.cold_runs.max(1) {
        ferry_nft::cleanup(&mut Nft::new())?;
        let mut planner = fresh();
        let mut dp = Tables::new(Nft::new()).with_max_ops(args.max_ops);
        let t0 = Instant::now();
        planner.update(&cfg, base);
        let t1 = Instant::now();
        let c1 = cpu_ms();
        let a = dp.apply(&planner.tables(), None)?;
        let c2 = cpu_ms();
        let t2 = Instant::now();
        plan_ms.push((t1 - t0).as_secs_f64() * 1e3);
        apply_ms.push((t2 - t1).as_secs_f64() * 1e3);
        apply_user_ms.push(c2.0 - c1.0);
        apply_sys_ms.push(c2.1 - c1.1);
        longest_ms.push(a.longest.as_secs_f64() * 1e3);
        txns = a.transactions;
    }
    let mut total: Vec<f64> = plan_ms.iter().zip(&apply_ms).map(|(a, b)| a + b).collect();
    println!(
        "cold load (plan + apply), median of {}: {:.0} ms (plan {:.0} ms, apply {:.0} ms) in {txns} \
         transactions, the longest {:.1} ms (median; max {:.1} ms)",
        total.len(),
        median(&mut total),
        median(&mut plan_ms),
        median(&mut apply_ms),
        median(&mut longest_ms.clone()),
        longest_ms.iter().cloned().fold(0.0, f64::max)
    );
    // CPU time, which other processes on a busy machine do not inflate as they do wall time.
    println!(
        "cold apply's CPU time (median): user {:.0} ms (ferry), system {:.0} ms (the kernel)",
        median(&mut apply_user_ms),
        median(&mut apply_sys_ms)
    );
    // One endpoint change at a time, the agent's way: one apply over every table.
    let mut planner = fresh();
    let mut dp = Tables::new(Nft::new()).with_max_ops(args.max_ops);
    planner.update(&cfg, base);
    dp.apply(&planner.tables(), None)?;
    let mut current = base.to_vec();
    let (mut change_total, mut change_plan) = (Vec::new(), Vec::new());
    for k in 0..args.changes.max(1) {
        let victim = (k * 7919) % current.len();
        let ep = &mut current[victim].ports[0].endpoints[0];
        ep.port = if ep.port == 8080 { 8081 } else { 8080 };
        let t0 = Instant::now();
        let touched = planner.update(&cfg, &current);
        let t1 = Instant::now();
        let a = dp.apply(&planner.tables(), Some(&touched))?;
        let t2 = Instant::now();
        let c = &a.changes;
        if !one_endpoint_changed(c.chains_changed, c.elements_added, c.elements_deleted)
            || a.transactions != 1
        {
            bail!("expected one changed chain or endpoint element in one transaction, got {a}");
        }
        change_plan.push((t1 - t0).as_secs_f64() * 1e3);
        change_total.push((t2 - t0).as_secs_f64() * 1e3);
    }
    let mut change_apply: Vec<f64> = change_total
        .iter()
        .zip(&change_plan)
        .map(|(t, p)| t - p)
        .collect();
    println!(
        "one endpoint change (plan + apply), median of {}: {:.1} ms (plan {:.1} ms, apply {:.1} ms)",
        change_total.len(),
        median(&mut change_total),
        median(&mut change_plan),
        median(&mut change_apply)
    );
    ferry_nft::cleanup(&mut Nft::new())?;
    Ok(0)
}
