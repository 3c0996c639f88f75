//! The lab's fixed topology (LAN bridge, nodes, client), agents, and tearing it all down.

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::state::{
    load_state, now_secs, prefix_flag, save_state, write_atomic, ClientInfo, Ctx, LabLock,
    LabState, NodeInfo,
};
use crate::sys;

pub const CLUSTER_CIDR: &str = "10.42.0.0/16";
pub const SERVICE_CIDR: &str = "10.43.0.0/16";
/// The pods' IPv6 ranges: fd00:42:<node index>::/64 each (beside 10.42.<index>.0/24).
pub const CLUSTER_CIDR6: &str = "fd00:42::/48";
/// The IPv6 service CIDR of the manifest-mode agents (dual-stack Services).
pub const SERVICE_CIDR6: &str = "fd00:43::/108";
pub const MAX_NODES: usize = 50;
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 2, 100);

/// k3s-master-rpi001, k3s-worker-rpi002, k3s-worker-rpi003, ...
pub fn node_name(index: usize) -> String {
    if index == 0 {
        "k3s-master-rpi001".to_string()
    } else {
        format!("k3s-worker-rpi{:03}", index + 1)
    }
}

/// 192.168.2.(11+i)
pub fn node_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 2, 11 + index as u8)
}

/// What `up` will build, before anything exists.
fn plan(ctx: &Ctx, nodes: usize, agents: bool, bgp: bool) -> LabState {
    let nodes: Vec<NodeInfo> = (0..nodes)
        .map(|i| {
            let name = node_name(i);
            NodeInfo {
                ns: ctx.node_ns(&name),
                name,
                index: i,
                ip: node_ip(i),
                ip6: format!("fd00:2::{}", 11 + i),
                pod_cidr: format!("10.42.{i}.0/24"),
                lan_if: format!("n{i}"),
            }
        })
        .collect();
    let mut namespaces = vec![ctx.lan_ns(), ctx.client_ns()];
    namespaces.extend(nodes.iter().map(|n| n.ns.clone()));
    let router = bgp.then(|| crate::router::plan(ctx));
    namespaces.extend(router.iter().map(|r| r.ns.clone()));
    LabState {
        prefix: ctx.prefix.clone(),
        created: now_secs(),
        exe: ctx.exe.clone(),
        agents,
        lan_ns: ctx.lan_ns(),
        client: ClientInfo {
            ns: ctx.client_ns(),
            ip: CLIENT_IP,
            ip6: "fd00:2::100".to_string(),
        },
        nodes,
        pods: Vec::new(),
        deployments: Vec::new(),
        namespaces,
        next_veth: 1,
        slice_files: Vec::new(),
        api: None,
        router,
    }
}

/// What `up` did, for printing.
#[derive(Debug)]
pub struct UpReport {
    pub state: LabState,
    pub warnings: Vec<String>,
}

/// `ferry lab up`. Fails if the lab (or any of its namespaces) exists already.
pub fn up(ctx: &Ctx, nodes: usize, agents: bool) -> Result<UpReport> {
    up_with(ctx, nodes, agents, false)
}

/// `ferry lab up [--api]`: with `api`, the lab runs its API server and runtime, and the
/// agents (if any) watch the API server (see [`crate::cluster`]).
pub fn up_with(ctx: &Ctx, nodes: usize, agents: bool, api: bool) -> Result<UpReport> {
    up_full(ctx, nodes, agents, api, false)
}

/// `ferry lab up [--api] [--bgp]`: with `bgp`, a `router` namespace running BIRD 2 peers with
/// every node (see [`crate::router`]).
pub fn up_full(ctx: &Ctx, nodes: usize, agents: bool, api: bool, bgp: bool) -> Result<UpReport> {
    if nodes == 0 || nodes > MAX_NODES {
        bail!("--nodes must be between 1 and {MAX_NODES}");
    }
    let _lock = LabLock::acquire(ctx)?;
    let down_cmd = format!("ferry lab{} down", prefix_flag(&ctx.prefix));
    if ctx.lab_json().exists() {
        bail!(
            "lab {:?} already exists ({}); run `{down_cmd}` first",
            ctx.prefix,
            ctx.lab_json().display()
        );
    }
    let mut state = plan(ctx, nodes, agents, bgp);
    let leftovers: Vec<String> = sys::list_netns()?
        .into_iter()
        .filter(|ns| ctx.owns_ns_name(ns))
        .collect();
    if !leftovers.is_empty() {
        bail!(
            "namespaces of lab {:?} exist already ({}): a crashed lab? run `{down_cmd}` first",
            ctx.prefix,
            leftovers.join(", ")
        );
    }
    for d in [ctx.manifests(), ctx.state_dir(), ctx.logs(), ctx.pids()] {
        fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    // Record first so that `down` finds everything even if building fails half way.
    save_state(ctx, &state)?;
    if let Err(e) = build(&state) {
        let _ = down_locked(ctx);
        return Err(e.context(format!("building lab {:?} (rolled back)", ctx.prefix)));
    }
    if let Some(r) = &state.router {
        if let Err(e) = crate::router::build(ctx, &state, r) {
            let _ = down_locked(ctx);
            return Err(e.context(format!(
                "starting the router of lab {:?} (rolled back)",
                ctx.prefix
            )));
        }
    }
    if api {
        match crate::cluster::bring_up(ctx, &state) {
            Ok(info) => state.api = Some(info),
            Err(e) => {
                let _ = down_locked(ctx);
                return Err(e.context(format!(
                    "starting the API server of lab {:?} (rolled back)",
                    ctx.prefix
                )));
            }
        }
        save_state(ctx, &state)?;
    } else {
        write_nodes_yaml(ctx, &state)?;
    }
    let mut warnings = Vec::new();
    if agents {
        let mut started = Vec::new();
        for node in &state.nodes {
            match start_agent_locked(ctx, &state, &node.name) {
                Ok(pid) => started.push((node.name.clone(), pid)),
                Err(e) => warnings.push(format!("agent on {}: {e:#}", node.name)),
            }
        }
        warnings.extend(check_agents_alive(ctx, &started));
    }
    state.created = now_secs();
    save_state(ctx, &state)?;
    Ok(UpReport { state, warnings })
}

/// Creates namespaces, links, addresses, routes and sysctls.
fn build(st: &LabState) -> Result<()> {
    sys::add_netns(&st.namespaces)?;

    // The LAN: one bridge, bridge netfilter off so bridged frames never hit netfilter here.
    let lan = &st.lan_ns;
    sys::in_netns(lan, || -> Result<()> {
        for key in [
            "bridge-nf-call-iptables",
            "bridge-nf-call-ip6tables",
            "bridge-nf-call-arptables",
        ] {
            let path = format!("/proc/sys/net/bridge/{key}");
            if Path::new(&path).exists() {
                fs::write(&path, "0").with_context(|| format!("setting {path} in {lan}"))?;
            }
        }
        Ok(())
    })??;
    let mut lines = vec![
        "link set lo up".to_string(),
        "link add br0 type bridge".to_string(),
        "link set br0 up".to_string(),
    ];
    for n in &st.nodes {
        lines.push(format!(
            "link add {} type veth peer name eth0 netns {}",
            n.lan_if, n.ns
        ));
        lines.push(format!("link set {} master br0 up", n.lan_if));
    }
    lines.push(format!(
        "link add c0 type veth peer name eth0 netns {}",
        st.client.ns
    ));
    lines.push("link set c0 master br0 up".to_string());
    sys::ip_batch(Some(lan), &lines)?;

    for n in &st.nodes {
        sys::set_sysctls(
            &n.ns,
            &[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
                ("net.ipv4.conf.all.proxy_arp", "0"),
                ("net.ipv4.conf.default.proxy_arp", "0"),
                ("net.ipv6.conf.all.forwarding", "1"),
                // Pod veths come and go: no duplicate address detection to wait for.
                ("net.ipv6.conf.default.accept_dad", "0"),
            ],
        )?;
        let mut lines = vec![
            "link set lo up".to_string(),
            "link set eth0 up".to_string(),
            format!("addr add {}/24 dev eth0", n.ip),
            format!("addr add {}/64 dev eth0 nodad", n.ip6),
        ];
        for other in st.nodes.iter().filter(|o| o.index != n.index) {
            lines.push(format!("route add {} via {}", other.pod_cidr, other.ip));
            lines.push(format!("route add {} via {}", other.pod_cidr6(), other.ip6));
        }
        lines.push(format!("route add {SERVICE_CIDR} dev eth0"));
        lines.push(format!("route add {SERVICE_CIDR6} dev eth0"));
        sys::ip_batch(Some(&n.ns), &lines)?;
    }

    let c = &st.client;
    sys::ip_batch(
        Some(&c.ns),
        &[
            "link set lo up".to_string(),
            "link set eth0 up".to_string(),
            format!("addr add {}/24 dev eth0", c.ip),
            format!("addr add {}/64 dev eth0 nodad", c.ip6),
        ],
    )?;
    Ok(())
}

/// RFC 3339 UTC timestamp of a Unix time.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// manifests/nodes.yaml: one v1 Node per lab node.
fn write_nodes_yaml(ctx: &Ctx, st: &LabState) -> Result<()> {
    let mut text = String::from("# written by ferry lab\n");
    for n in &st.nodes {
        let role = if n.index == 0 {
            "    node-role.kubernetes.io/control-plane: \"true\"\n    node-role.kubernetes.io/master: \"true\"\n"
        } else {
            ""
        };
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  creationTimestamp: \"{ts}\"\n  labels:\n    kubernetes.io/hostname: {name}\n    kubernetes.io/os: linux\n    topology.kubernetes.io/zone: {zone}\n{role}spec:\n  podCIDR: {cidr}\n  podCIDRs:\n  - {cidr}\nstatus:\n  addresses:\n  - type: InternalIP\n    address: {ip}\n  - type: InternalIP\n    address: {ip6}\n  - type: Hostname\n    address: {name}\n",
            name = n.name,
            zone = n.zone(),
            ts = rfc3339(st.created),
            cidr = n.pod_cidr,
            ip = n.ip,
            ip6 = n.ip6,
        ));
    }
    write_atomic(&ctx.manifests().join("nodes.yaml"), text.as_bytes())
}

/// Spawns `ip netns exec NS EXE ARGS...` with output appended to `log`; returns its PID (that
/// of EXE, since `ip netns exec` execs). The process gets its own process group so a Ctrl-C
/// meant for the `ferry` in the foreground does not reach it.
pub fn spawn_in_ns(ns: &str, exe: &Path, args: &[String], log: &Path) -> Result<u32> {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {} in {ns}", exe.display()))?;
    Ok(child.id())
}

/// The running agent's PID on `node` (checked: alive and inside the node's namespace).
pub fn agent_pid(ctx: &Ctx, st: &LabState, node: &str) -> Option<u32> {
    let n = st.node(node)?;
    let pid: u32 = fs::read_to_string(ctx.agent_pid_file(node))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (sys::pid_alive(pid) && sys::pid_in_netns(pid, &n.ns)).then_some(pid)
}

fn node_or_err<'a>(st: &'a LabState, node: &str) -> Result<&'a NodeInfo> {
    st.node(node).with_context(|| {
        format!(
            "no node {node:?} in this lab (nodes: {})",
            st.node_names().join(", ")
        )
    })
}

/// The agent's arguments on `node`: `--kubeconfig` in a lab with an API server, else
/// `--manifests`.
pub fn agent_args(ctx: &Ctx, node: &str) -> Vec<String> {
    let api = load_state(ctx)
        .ok()
        .flatten()
        .is_some_and(|s| s.api.is_some());
    agent_args_for(ctx, api, node)
}

fn agent_args_for(ctx: &Ctx, api: bool, node: &str) -> Vec<String> {
    let mut args = vec!["agent".to_string()];
    if api {
        args.extend(crate::cluster::agent_source_args(ctx));
    } else {
        args.extend(["--manifests".into(), ctx.manifests().display().to_string()]);
    }
    args.extend([
        "--node".into(),
        node.into(),
        "--state-dir".into(),
        ctx.state_dir().display().to_string(),
        "--cluster-cidr".into(),
        format!("{CLUSTER_CIDR},{CLUSTER_CIDR6}"),
        "--service-cidr".into(),
        format!("{SERVICE_CIDR},{SERVICE_CIDR6}"),
        // Each node's own loopback: `ferry lab exec NODE -- curl -s 127.0.0.1:10249/metrics`.
        "--metrics-addr".into(),
        "127.0.0.1:10249".into(),
    ]);
    args.extend(extra_agent_args(ctx, node));
    args
}

/// The extra arguments kept for `node`'s agent.
pub fn extra_agent_args(ctx: &Ctx, node: &str) -> Vec<String> {
    fs::read_to_string(ctx.agent_args_file(node))
        .map(|t| {
            t.lines()
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Keeps `args` as extra arguments of `node`'s agent (from its next start): replaces what was
/// kept when `args` is not empty, forgets it with `reset`.
pub fn set_extra_agent_args(ctx: &Ctx, node: &str, reset: bool, args: &[String]) -> Result<()> {
    let file = ctx.agent_args_file(node);
    if reset {
        match fs::remove_file(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", file.display())),
        }
    }
    if args.is_empty() {
        return Ok(());
    }
    if let Some(bad) = args.iter().find(|a| a.contains('\n')) {
        bail!("agent argument {bad:?} holds a line break");
    }
    let mut text = args.join("\n");
    text.push('\n');
    write_atomic(&file, text.as_bytes()).with_context(|| format!("writing {}", file.display()))
}

fn start_agent_locked(ctx: &Ctx, st: &LabState, node: &str) -> Result<u32> {
    let n = node_or_err(st, node)?;
    if let Some(pid) = agent_pid(ctx, st, node) {
        bail!("the agent on {node} is running already (pid {pid})");
    }
    let exe = ctx.require_exe(crate::state::FERRY_EXE_NAME)?;
    let log = ctx.agent_log(node);
    let args = agent_args_for(ctx, st.api.is_some(), node);
    {
        let mut f = OpenOptions::new().create(true).append(true).open(&log)?;
        writeln!(
            f,
            "--- ferry lab {}: ip netns exec {} {} {}",
            rfc3339(now_secs()),
            n.ns,
            exe.display(),
            args.join(" ")
        )?;
    }
    let pid = spawn_in_ns(&n.ns, exe, &args, &log)?;
    write_atomic(&ctx.agent_pid_file(node), format!("{pid}\n").as_bytes())?;
    Ok(pid)
}

/// Gives fresh agents a moment; returns a warning per agent that already exited.
fn check_agents_alive(ctx: &Ctx, started: &[(String, u32)]) -> Vec<String> {
    if started.is_empty() {
        return Vec::new();
    }
    std::thread::sleep(Duration::from_millis(200));
    let mut warnings = Vec::new();
    for (node, pid) in started {
        if !sys::pid_alive(*pid) {
            let log = ctx.agent_log(node);
            warnings.push(format!(
                "the agent on {node} (pid {pid}) exited at once; last lines of {}:\n{}",
                log.display(),
                tail(&log, 5)
            ));
        }
    }
    warnings
}

/// Last `n` lines of a file, indented.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What an agent command did, for printing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentAction {
    Start,
    Stop,
    Restart,
    Kill,
}

/// `ferry lab agent start|stop|restart|kill NODE`. Returns lines to print and warnings.
pub fn agent(ctx: &Ctx, node: &str, action: AgentAction) -> Result<(Vec<String>, Vec<String>)> {
    let _lock = LabLock::acquire(ctx)?;
    let st = crate::state::require_state(ctx)?;
    let n = node_or_err(&st, node)?;
    let mut lines = Vec::new();
    let mut warnings = Vec::new();
    if matches!(
        action,
        AgentAction::Stop | AgentAction::Restart | AgentAction::Kill
    ) {
        match agent_pid(ctx, &st, node) {
            Some(pid) => {
                let hard = action == AgentAction::Kill;
                let ns = n.ns.clone();
                sys::stop_pids(&[pid], hard, Duration::from_secs(5), |p| {
                    sys::pid_in_netns(p, &ns)
                });
                let _ = fs::remove_file(ctx.agent_pid_file(node));
                lines.push(format!(
                    "agent on {node} (pid {pid}) {}",
                    if hard { "killed" } else { "stopped" }
                ));
            }
            None if action == AgentAction::Restart => {
                lines.push(format!("agent on {node} was not running"));
            }
            None => bail!("the agent on {node} is not running"),
        }
    }
    if matches!(action, AgentAction::Start | AgentAction::Restart) {
        let pid = start_agent_locked(ctx, &st, node)?;
        lines.push(format!("agent on {node} started (pid {pid})"));
        warnings.extend(check_agents_alive(ctx, &[(node.to_string(), pid)]));
    }
    Ok((lines, warnings))
}

/// What `down` did.
#[derive(Debug, Default)]
pub struct DownReport {
    pub namespaces: Vec<String>,
    pub processes: usize,
    pub existed: bool,
}

/// `ferry lab down`: works on a healthy lab, a half-built one, and after a crash.
pub fn down(ctx: &Ctx) -> Result<DownReport> {
    let lock = LabLock::acquire(ctx)?;
    let report = down_locked(ctx);
    // Remove the lock file while still holding it (lockers re-check the inode).
    let _ = fs::remove_file(ctx.lock_path());
    drop(lock);
    report
}

fn pids_from_files(dir: &Path) -> Vec<u32> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| fs::read_to_string(e.path()).ok())
        .filter_map(|t| t.trim().parse().ok())
        .collect()
}

pub(crate) fn down_locked(ctx: &Ctx) -> Result<DownReport> {
    // lab.json may be missing or half-written after a crash: then rely on the name patterns.
    let state = load_state(ctx).ok().flatten();
    let existing: BTreeSet<String> = sys::list_netns()?.into_iter().collect();
    let mut namespaces: BTreeSet<String> = existing
        .iter()
        .filter(|ns| ctx.owns_ns_name(ns))
        .cloned()
        .collect();
    if let Some(st) = &state {
        namespaces.extend(
            st.namespaces
                .iter()
                .filter(|ns| existing.contains(*ns))
                .cloned(),
        );
    }

    // The runtime first (it would make pods), the API server last; both live in the root
    // namespace and are recognized by their command line.
    let mut processes = usize::from(crate::cluster::stop_proc(
        ctx,
        crate::cluster::RUNTIME_PROC,
        false,
    ));
    let mut pids: BTreeSet<u32> = pids_from_files(&ctx.pids()).into_iter().collect();
    if let Some(st) = &state {
        pids.extend(st.pods.iter().filter_map(|p| p.pid));
    }
    for ns in &namespaces {
        pids.extend(sys::netns_pids(ns));
    }
    let pids: Vec<u32> = pids.into_iter().collect();
    processes += sys::stop_pids(&pids, false, Duration::from_secs(5), |pid| {
        namespaces.iter().any(|ns| sys::pid_in_netns(pid, ns))
    });
    processes += usize::from(crate::cluster::stop_proc(
        ctx,
        crate::cluster::API_PROC,
        false,
    ));

    let ns_list: Vec<String> = namespaces.iter().cloned().collect();
    sys::del_netns(&ns_list)?;
    let existed = state.is_some() || !ns_list.is_empty() || ctx.dir().exists();
    match fs::remove_dir_all(ctx.dir()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", ctx.dir().display())),
    }
    Ok(DownReport {
        namespaces: ns_list,
        processes,
        existed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses() {
        assert_eq!(node_name(0), "k3s-master-rpi001");
        assert_eq!(node_name(1), "k3s-worker-rpi002");
        assert_eq!(node_name(11), "k3s-worker-rpi012");
        assert_eq!(node_ip(0), Ipv4Addr::new(192, 168, 2, 11));
        assert_eq!(node_ip(MAX_NODES - 1), Ipv4Addr::new(192, 168, 2, 60));
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
