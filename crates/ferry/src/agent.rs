//! `ferry agent`: the node agent. Source (manifest directory) -> model (allocation, endpoints)
//! -> plan -> dataplane, again whenever a manifest changes.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use ferry_model::alloc::AllocConfig;
use ferry_model::cidr::Cidr;
use ferry_model::view::resolve;
use ferry_nft::{Dataplane, Nft};
use ferry_plan::plan::DEFAULT_MASQUERADE_MARK;
use ferry_plan::PlanConfig;

use crate::announce::Announcer;
use crate::source::{self, Snapshot};
use crate::state::StateDir;

#[derive(Debug, Args, Clone)]
pub struct AgentArgs {
    /// Directory of Kubernetes-format manifests (*.yaml, *.yml, *.json, read recursively).
    #[arg(long)]
    pub manifests: PathBuf,
    /// This node's name: its Node object gives the addresses node ports are served on.
    #[arg(long)]
    pub node: String,
    /// Where allocations are kept; agents sharing it agree on cluster IPs and node ports.
    #[arg(long, default_value = "/var/lib/ferry")]
    pub state_dir: PathBuf,
    /// Pod CIDR(s), comma-separated: traffic to cluster IPs from outside is masqueraded.
    #[arg(long, default_value = "10.42.0.0/16", value_delimiter = ',')]
    pub cluster_cidr: Vec<Cidr>,
    /// Service CIDR(s), comma-separated: cluster IPs come from the first.
    #[arg(long, default_value = "10.43.0.0/16", value_delimiter = ',')]
    pub service_cidr: Vec<Cidr>,
    /// Node port range.
    #[arg(long, default_value = "30000-32767", value_parser = parse_port_range)]
    pub node_port_range: (u16, u16),
    /// How often to look for manifest changes, in milliseconds.
    #[arg(long, default_value_t = 100)]
    pub poll_ms: u64,
    /// UDP port of the agents' SWIM membership gossip (on the node's address).
    #[arg(long, default_value_t = 7946)]
    pub member_port: u16,
    /// Do not announce load-balancer addresses in layer 2 (no ARP/NDP, no membership).
    #[arg(long)]
    pub no_l2: bool,
    /// Re-read the kernel's table and repair it this often, in seconds (0: never).
    #[arg(long, default_value_t = 300)]
    pub resync_s: u64,
}

pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected FROM-TO"))?;
    let a: u16 = a
        .trim()
        .parse()
        .map_err(|_| format!("{a:?} is not a port"))?;
    let b: u16 = b
        .trim()
        .parse()
        .map_err(|_| format!("{b:?} is not a port"))?;
    if a == 0 || a > b {
        return Err(format!("{s:?}: empty range"));
    }
    Ok((a, b))
}

impl AgentArgs {
    pub fn alloc_config(&self) -> AllocConfig {
        AllocConfig {
            service_cidrs: self.service_cidr.clone(),
            node_port_range: self.node_port_range.0..=self.node_port_range.1,
        }
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
    }
}

pub fn timestamp() -> String {
    let ms = source::now_ms();
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60,
        ms % 1000
    )
}

/// The host's own unicast addresses (fallback when there is no Node object).
pub fn host_addresses() -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = interface_addresses()
        .into_iter()
        .map(|(_, ip)| ip)
        .collect();
    out.retain(|ip| match ip {
        IpAddr::V4(a) => !a.is_loopback() && !a.is_link_local(),
        IpAddr::V6(a) => !a.is_loopback() && (a.segments()[0] & 0xffc0) != 0xfe80,
    });
    out.sort();
    out.dedup();
    out
}

/// The interface that holds `ip`.
pub fn interface_of(ip: IpAddr) -> Option<String> {
    interface_addresses()
        .into_iter()
        .find(|(_, a)| *a == ip)
        .map(|(n, _)| n)
}

/// (interface name, address) for every address of this network namespace.
fn interface_addresses() -> Vec<(String, IpAddr)> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we walk read-only and free with freeifaddrs.
    unsafe {
        if libc::getifaddrs(&mut ifap) != 0 {
            return out;
        }
        let mut p = ifap;
        while !p.is_null() {
            let ifa = &*p;
            if !ifa.ifa_addr.is_null() {
                match i32::from((*ifa.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        let name = std::ffi::CStr::from_ptr(ifa.ifa_name)
                            .to_string_lossy()
                            .into_owned();
                        out.push((
                            name,
                            IpAddr::from(u32::from_be(sa.sin_addr.s_addr).to_be_bytes()),
                        ));
                    }
                    libc::AF_INET6 => {
                        let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        let name = std::ffi::CStr::from_ptr(ifa.ifa_name)
                            .to_string_lossy()
                            .into_owned();
                        out.push((name, IpAddr::from(sa.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            p = ifa.ifa_next;
        }
        libc::freeifaddrs(ifap);
    }
    out
}

/// Everything one pass computes from a snapshot (exposed for `ferry plan`-style tools/tests).
pub struct Pass {
    /// What the plan changed (the table itself is the planner's).
    pub touched: ferry_plan::plan::Touched,
    pub services: Vec<ferry_model::view::ResolvedService>,
    pub node_ips: Vec<IpAddr>,
    /// Problems to report: rejected services, pending load balancers, pool errors.
    pub rejected: Vec<String>,
    pub pools: ferry_model::pools::PoolConfig,
    /// Load-balancer addresses for the layer-2 election.
    pub lb_addresses: Vec<crate::announce::LbAddress>,
}

pub fn compute(
    planner: &mut ferry_plan::plan::Planner,
    args: &AgentArgs,
    state: &StateDir,
    snap: &Snapshot,
    snapshot_ms: u64,
) -> Result<Pass> {
    let (pools, pool_errors) =
        ferry_model::pools::load(&snap.config_maps, &snap.ip_pools, &snap.l2_advertisements);
    let (results, lb) = state.sync(
        &snap.services,
        &snap.namespaces,
        &pools,
        &args.alloc_config(),
        snapshot_ms,
        source::now_ms(),
    )?;
    let mut rejected: Vec<String> = pool_errors.iter().map(|e| format!("pools: {e}")).collect();
    let mut allocations = BTreeMap::new();
    for (r, res) in results {
        match res {
            Ok(a) => {
                allocations.insert(r, a);
            }
            Err(e) => rejected.push(format!("rejected: {e}")),
        }
    }
    // Load-balancer addresses become the services' ingress addresses.
    let mut services = snap.services.clone();
    for svc in &mut services {
        match lb.get(&svc.meta.object_ref()) {
            Some(Ok(a)) => svc.load_balancer_ingress = a.ips.clone(),
            Some(Err(p)) => {
                svc.load_balancer_ingress.clear();
                rejected.push(format!(
                    "Service {} pending: {}",
                    svc.meta.object_ref(),
                    p.reason
                ));
            }
            None => {}
        }
    }
    let node_ips = match snap.nodes.iter().find(|n| n.meta.name == args.node) {
        Some(n) if !n.internal_ips().is_empty() => n.internal_ips(),
        _ => host_addresses(),
    };
    let resolved = resolve(&services, &allocations, &snap.slices);
    let cfg = PlanConfig {
        node_name: args.node.clone(),
        node_ips: node_ips.clone(),
        cluster_cidrs: args.cluster_cidr.clone(),
        masquerade_mark: DEFAULT_MASQUERADE_MARK,
        lb_pools: pools
            .pools
            .iter()
            .flat_map(|p| p.ranges.iter().map(|r| (r.first(), r.last())))
            .collect(),
    };
    let lb_addresses = services
        .iter()
        .filter(|s| !s.load_balancer_ingress.is_empty())
        .map(|s| {
            let r = resolved.iter().find(|r| r.id == s.meta.object_ref());
            crate::announce::LbAddress::of(
                s.load_balancer_ingress.clone(),
                s.external_traffic_policy,
                r,
            )
        })
        .collect();
    Ok(Pass {
        lb_addresses,
        touched: planner.update(&cfg, &resolved).1,
        services: resolved,
        node_ips,
        rejected,
        pools,
    })
}

/// The agent's loop state: what it last applied and reported.
struct Agent {
    args: AgentArgs,
    reader: source::Reader,
    planner: ferry_plan::plan::Planner,
    state: StateDir,
    dp: Dataplane,
    /// Problems reported on the last pass (each is logged once, not on every pass).
    problems: Vec<String>,
    node_ips: Vec<IpAddr>,
    /// The services as last applied (to find UDP endpoints that went away).
    served: Vec<ferry_model::view::ResolvedService>,
    passes: u64,
    /// Layer-2 announcement (None with --no-l2).
    announcer: Option<Announcer>,
    /// What the election reads, from the last pass.
    nodes: Vec<ferry_model::Node>,
    pools: ferry_model::pools::PoolConfig,
    lb_addresses: Vec<crate::announce::LbAddress>,
    /// The interface holding the node's address (where addresses are announced by default).
    default_iface: Option<String>,
}

pub fn run(args: AgentArgs) -> Result<i32> {
    install_signal_handlers();
    let state = StateDir::new(&args.state_dir)?;
    std::fs::metadata(&args.manifests)
        .with_context(|| format!("manifest directory {}", args.manifests.display()))?;
    let nft = Nft::new();
    log!(
        "ferry agent on node {} (pid {}): manifests {}, state {}, nftables via {}",
        args.node,
        std::process::id(),
        args.manifests.display(),
        args.state_dir.display(),
        nft.backend_name()
    );
    warn_about_sysctls();
    let announcer = (!args.no_l2)
        .then(|| Announcer::new(&args.node, args.member_port, state.announcements_dir()));
    let mut agent = Agent {
        reader: source::Reader::new(&args.manifests),
        planner: ferry_plan::plan::Planner::default(),
        args,
        state,
        dp: Dataplane::new(nft),
        problems: Vec::new(),
        node_ips: Vec::new(),
        served: Vec::new(),
        passes: 0,
        announcer,
        nodes: Vec::new(),
        pools: Default::default(),
        lb_addresses: Vec::new(),
        default_iface: None,
    };
    let args = agent.args.clone();
    let mut last_stamp: Option<source::DirStamp> = None;
    let mut last_poll: Option<Instant> = None;
    let mut retry_at: Option<Instant> = None;
    let mut resync_at = Instant::now() + Duration::from_secs(args.resync_s.max(1));
    while !STOP.load(Ordering::SeqCst) {
        // Manifests: every poll interval.
        if last_poll.is_none_or(|t| t.elapsed() >= Duration::from_millis(args.poll_ms.max(10))) {
            last_poll = Some(Instant::now());
            let stamp = source::stamp(&args.manifests).unwrap_or_default();
            let due_retry = retry_at.is_some_and(|t| Instant::now() >= t);
            let due_resync = args.resync_s > 0 && Instant::now() >= resync_at;
            if last_stamp.as_ref() != Some(&stamp) || due_retry || due_resync {
                if due_resync {
                    // Re-read the kernel's table: repairs anything changed behind our back.
                    agent.dp.resync();
                    resync_at = Instant::now() + Duration::from_secs(args.resync_s);
                }
                match agent.pass(source::now_ms()) {
                    Ok(()) => retry_at = None,
                    Err(e) => {
                        log!("error: {e:#} (retrying in 1s)");
                        agent.dp.resync();
                        retry_at = Some(Instant::now() + Duration::from_secs(1));
                    }
                }
                last_stamp = Some(stamp);
            }
        }
        // Layer 2: every tick, and at once when membership changes.
        agent.announce();
        match &agent.announcer {
            Some(a) => a.wait(Duration::from_millis(L2_TICK_MS)),
            None => std::thread::sleep(Duration::from_millis(args.poll_ms.max(10))),
        }
    }
    if let Some(a) = agent.announcer.take() {
        a.shutdown();
    }
    log!("stopping; ferry's rules stay in place (`ferry cleanup` removes them)");
    Ok(0)
}

/// How often the layer-2 election is re-evaluated (quorum leases expire between membership
/// events).
const L2_TICK_MS: u64 = 20;

/// Forwarding must be on for pods and node ports; say so once if it is not.
fn warn_about_sysctls() {
    if let Ok(v) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward") {
        if v.trim() == "0" {
            log!("warning: net.ipv4.ip_forward is 0: traffic to pods on other nodes and node ports will not be forwarded");
        }
    }
}

/// Deletes UDP conntrack entries whose replies come from a removed endpoint (`conntrack -D`).
fn flush_udp_conntrack(addr: IpAddr, port: u16) {
    let out = std::process::Command::new("conntrack")
        .args([
            "-D",
            "-p",
            "udp",
            "--reply-src",
            &addr.to_string(),
            "--reply-port-src",
            &port.to_string(),
        ])
        .output();
    match out {
        // conntrack exits 1 when there was nothing to delete.
        Ok(o) if o.status.success() => {
            log!("cleared UDP conntrack entries of removed endpoint {addr}:{port}")
        }
        Ok(_) => {}
        Err(e) => {
            log!("warning: cannot clear UDP conntrack entries of {addr}:{port}: conntrack: {e}")
        }
    }
}

impl Agent {
    /// Runs the layer-2 election with the latest view and applies it.
    fn announce(&mut self) {
        let Some(a) = &mut self.announcer else { return };
        let (alive, lease) = a.views();
        let d = crate::announce::decide(&crate::announce::L2Input {
            me: &self.args.node,
            nodes: &self.nodes,
            alive: &alive,
            lease: &lease,
            pools: &self.pools,
            addresses: &self.lb_addresses,
        });
        let iface = self.node_ips.iter().find_map(|ip| interface_of(*ip));
        a.apply(&d, iface.as_deref());
    }

    /// One pass: read the manifests, allocate, plan, apply what differs.
    fn pass(&mut self, snapshot_ms: u64) -> Result<()> {
        let args = &self.args;
        let t0 = Instant::now();
        let snap = self
            .reader
            .read()
            .with_context(|| format!("reading {}", args.manifests.display()))?;
        let p = compute(&mut self.planner, args, &self.state, &snap, snapshot_ms)?;
        let mut problems: Vec<String> = snap.errors.iter().map(|e| format!("error: {e}")).collect();
        problems.extend(snap.warnings.iter().map(|w| format!("warning: {w}")));
        problems.extend(p.rejected.iter().cloned());
        for pr in &problems {
            if !self.problems.contains(pr) {
                log!("{pr}");
            }
        }
        self.problems = problems;
        if p.node_ips != self.node_ips {
            let shown: Vec<String> = p.node_ips.iter().map(|i| i.to_string()).collect();
            log!("node ports served on {}", shown.join(", "));
            self.node_ips = p.node_ips.clone();
        }
        let t_plan = t0.elapsed();
        let changes = self.dp.apply_touched(self.planner.ruleset(), &p.touched)?;
        for (addr, port) in ferry_plan::plan::stale_udp_endpoints(&self.served, &p.services) {
            flush_udp_conntrack(addr, port);
        }
        self.served = p.services;
        self.pools = p.pools;
        self.lb_addresses = p.lb_addresses;
        self.default_iface = p.node_ips.iter().find_map(|ip| interface_of(*ip));
        self.nodes = snap.nodes.clone();
        if let Some(a) = &mut self.announcer {
            let my_ip = p
                .node_ips
                .iter()
                .find(|i| i.is_ipv4())
                .or(p.node_ips.first())
                .copied();
            a.ensure_membership(my_ip, &self.nodes);
        }
        if !changes.is_empty() || self.passes == 0 {
            let what = if changes.is_empty() {
                "table already as planned, nothing to change".to_string()
            } else {
                changes.to_string()
            };
            log!(
                "{} services: {what} (read+plan {:.1} ms, apply {:.1} ms)",
                snap.services.len(),
                t_plan.as_secs_f64() * 1e3,
                (t0.elapsed() - t_plan).as_secs_f64() * 1e3
            );
        }
        self.passes += 1;
        Ok(())
    }
}
