//! Shared helpers of the end-to-end tests: a lab of network namespaces whose agents and pods
//! run this build's `ferry`, plus polling helpers with bounded waits.
//!
//! Every test needs root. Without it a test prints why and returns (skips), unless $CI is set:
//! then it fails.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

pub use ferry_lab::{demo, Lab, LabConfig, PodInfo};

/// The `ferry` binary under test.
pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// How long anything may take to converge (agents poll manifests every 100 ms).
pub const CONVERGE: Duration = Duration::from_secs(10);

/// True when the test may run (root); prints why it skips otherwise, panics when $CI is set.
/// Makes sure the `ferry-lab` binary is built next to `ferry` first.
pub fn root(test: &str) -> bool {
    if !ferry_lab::require_root(test) {
        return false;
    }
    build_lab_binary();
    true
}

/// The lab's pods (and `ferry lab`/`ferry demo`) run the `ferry-lab` binary next to `ferry`, and
/// cargo builds that only for ferry-lab's own tests: build it (once per test binary, a no-op
/// when it is up to date) with the profile `ferry` was built with.
fn build_lab_binary() {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        build_binary("ferry-lab", "ferry-lab");
    });
}

/// Builds another package's binary next to `ferry` (same profile); returns its path.
pub fn build_binary(package: &str, bin: &str) -> std::path::PathBuf {
    let ferry = std::path::Path::new(FERRY);
    let profile = match ferry.parent().and_then(|d| d.file_name()) {
        Some(d) if d == "debug" => "dev".to_string(),
        Some(d) => d.to_string_lossy().into_owned(),
        None => "dev".to_string(),
    };
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", package, "--bin", bin])
        .args(["--profile", &profile])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("running cargo build");
    assert!(status.success(), "cargo build -p {package} failed");
    let path = ferry.with_file_name(bin);
    assert!(
        path.is_file(),
        "no {} after building it (another target dir?)",
        path.display()
    );
    path
}

/// A lab with `nodes` nodes and agents, or None when the test must skip. Downed on drop.
/// The lab's default source ($FERRY_LAB_API; the API server unless it says 0).
pub fn lab(test: &str, nodes: usize) -> Option<Lab> {
    lab_with(test, nodes, ferry_lab::api::api_default())
}

/// A lab whose agents read a manifest directory (for tests of that mode).
pub fn lab_manifests(test: &str, nodes: usize) -> Option<Lab> {
    lab_with(test, nodes, false)
}

fn lab_with(test: &str, nodes: usize, api: bool) -> Option<Lab> {
    if !root(test) {
        return None;
    }
    let lab = LabConfig::new(Lab::unique_prefix())
        .nodes(nodes)
        .api(api)
        .exe(FERRY)
        .up()
        .expect("lab up");
    for w in &lab.warnings {
        eprintln!("{test}: lab warning: {w}");
    }
    Some(lab)
}

/// Downs a lab by prefix when dropped (for tests that run `ferry` as a subprocess).
pub struct DownOnDrop(pub String);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        if let Ok(ctx) = ferry_lab::state::Ctx::new(&self.0, None, Some(FERRY.into())) {
            let _ = ferry_lab::topology::down(&ctx);
        }
    }
}

/// Network namespaces whose names start with "<prefix>-".
pub fn namespaces_of(prefix: &str) -> Vec<String> {
    ferry_lab::sys::list_netns()
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect()
}

/// The cluster IP and first node port of a Service, from `ferry get svc -o json`, polled until
/// present.
pub fn svc_addr(lab: &Lab, name: &str) -> (Ipv4Addr, Option<u16>) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let json = lab.ferry_get(&["svc", "-o", "json"]);
        if let Ok(json) = &json {
            if let Some((ip, port)) = demo::from_json(json, name) {
                if let Ok(ip) = ip.parse() {
                    return (ip, port);
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "service {name} has no cluster IP: {json:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The node port of a Service (panics if it has none).
pub fn node_port(lab: &Lab, name: &str) -> u16 {
    svc_addr(lab, name)
        .1
        .unwrap_or_else(|| panic!("service {name} has no node port"))
}

/// Pods whose name starts with "<deployment>-".
pub fn pods_of(lab: &Lab, deployment: &str) -> Vec<PodInfo> {
    lab.pods()
        .into_iter()
        .filter(|p| p.owner.as_deref() == Some(&format!("default/{deployment}")))
        .collect()
}

/// Applies the seed's `debian-bash` pod (the client inside the cluster); returns its name.
pub fn debian(lab: &Lab) -> String {
    lab.apply_yaml(demo::DEBIAN_BASH).expect("debian-bash pod");
    "debian-bash".to_string()
}

/// Curls until it succeeds (bounded by CONVERGE); the body.
pub fn curl_ok(lab: &Lab, from: &str, url: &str) -> String {
    lab.curl_until_ok(from, url, CONVERGE)
        .unwrap_or_else(|e| panic!("{url} from {from} never answered: {e:#}"))
        .trim()
        .to_string()
}

/// Curls repeatedly until every pod in `want` has answered since the last answer from anybody
/// else (bounded; see [`ferry_lab::probe::AnswerTally`]); the set of answers. Panics on an
/// empty `want`, and when a pod outside `want` still answers at the deadline.
pub fn until_all_answer(lab: &Lab, from: &str, url: &str, want: &[String]) -> BTreeSet<String> {
    let mut tally = ferry_lab::probe::AnswerTally::new(want)
        .unwrap_or_else(|e| panic!("{url} from {from}: {e}"));
    let deadline = Instant::now() + CONVERGE;
    let mut last_err = String::new();
    while Instant::now() < deadline {
        match lab.curl(from, url) {
            Ok(body) => tally.record(&body),
            Err(e) => last_err = format!("{e:#}"),
        }
        if tally.done() {
            return tally.seen().clone();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let strays = tally.strays();
    panic!(
        "{url} from {from}: wanted answers from {want:?}, got {:?} since the last stray; \
         strays (last 5): {:?} (last error: {last_err})",
        tally.seen(),
        &strays[strays.len().saturating_sub(5)..]
    );
}

/// Curls until `n` answers in a row all come from `pod` (bounded); panics otherwise.
pub fn until_only(lab: &Lab, from: &str, url: &str, pod: &str, n: usize) {
    let deadline = Instant::now() + CONVERGE;
    let mut run = 0;
    let mut last = Vec::new();
    while Instant::now() < deadline {
        let got = lab.curl(from, url).map(|b| b.trim().to_string());
        let ok = matches!(&got, Ok(b) if b == pod);
        run = if ok { run + 1 } else { 0 };
        if run >= n {
            return;
        }
        last.push(format!("{got:?}"));
        if last.len() > 12 {
            last.remove(0);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{url} from {from}: never {n} answers in a row from {pod} only; last: {last:?}");
}

/// The names of the pods of `deployment` (see [`pods_of`]); panics unless there are `n`.
pub fn pod_names(lab: &Lab, deployment: &str, n: usize) -> Vec<String> {
    let pods: Vec<String> = pods_of(lab, deployment)
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(pods.len(), n, "pods of {deployment}: {pods:?}");
    pods
}

/// Waits until `url` stops answering from `from` (bounded); panics if it keeps answering.
pub fn until_fails(lab: &Lab, from: &str, url: &str) {
    let deadline = Instant::now() + CONVERGE;
    while Instant::now() < deadline {
        if lab.curl(from, url).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{url} from {from} still answers");
}

/// `n` answers in a row; panics on a failure.
pub fn answers(lab: &Lab, from: &str, url: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            lab.curl(from, url)
                .unwrap_or_else(|e| panic!("{e:#}"))
                .trim()
                .to_string()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// LoadBalancer services and layer-2 announcement (e2e_loadbalancer, the demo's second half).

/// Milliseconds in a day: the agents' log timestamps are `HH:MM:SS.mmm` UTC.
const DAY_MS: i64 = 86_400_000;

/// Now, in milliseconds since midnight UTC (the clock of the agents' log timestamps).
pub fn ms_of_day_now() -> u64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    ms % DAY_MS as u64
}

/// Signed milliseconds from `from` to `to`, both milliseconds of the day (wraps at midnight).
pub fn ms_between(from: u64, to: u64) -> i64 {
    let d = (to as i64 - from as i64).rem_euclid(DAY_MS);
    if d > DAY_MS / 2 {
        d - DAY_MS
    } else {
        d
    }
}

/// The agent log of `node` as (milliseconds of day, message) for lines that carry a timestamp.
pub fn log_lines(lab: &Lab, node: &str) -> Vec<(u64, String)> {
    lab.agent_log(node)
        .lines()
        .filter_map(|l| {
            let (ts, msg) = l.split_once(' ')?;
            let mut it = ts.split([':', '.']);
            let h: u64 = it.next()?.parse().ok()?;
            let m: u64 = it.next()?.parse().ok()?;
            let s: u64 = it.next()?.parse().ok()?;
            let ms: u64 = it.next()?.parse().ok()?;
            if it.next().is_some() || ts.len() != 12 {
                return None;
            }
            Some((((h * 60 + m) * 60 + s) * 1000 + ms, msg.to_string()))
        })
        .collect()
}

/// The first line of `node`'s log, stamped at or after `since` (milliseconds of day), whose
/// message contains `needle`.
pub fn log_line_since(lab: &Lab, node: &str, since: u64, needle: &str) -> Option<(u64, String)> {
    log_lines(lab, node)
        .into_iter()
        .find(|(t, m)| ms_between(since, *t) >= 0 && m.contains(needle))
}

/// Waits (bounded by `timeout`) for [`log_line_since`].
pub fn wait_log_since(
    lab: &Lab,
    node: &str,
    since: u64,
    needle: &str,
    timeout: Duration,
) -> (u64, String) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(hit) = log_line_since(lab, node, since, needle) {
            return hit;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log of {node} within {timeout:?}; log:\n{}",
            lab.agent_log(node)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The first line, on any node, stamped at or after `since` whose message contains `needle`:
/// (node, milliseconds of day, message).
/// Waits (bounded) until some node's agent logs `needle` after `since`: (node, time, message).
pub fn wait_any_log_since(
    lab: &Lab,
    since: u64,
    needle: &str,
    timeout: Duration,
) -> (String, u64, String) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(hit) = any_log_since(lab, since, needle) {
            return hit;
        }
        assert!(
            Instant::now() < deadline,
            "no agent logged {needle:?} within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn any_log_since(lab: &Lab, since: u64, needle: &str) -> Option<(String, u64, String)> {
    lab.node_names()
        .into_iter()
        .filter_map(|n| log_line_since(lab, &n, since, needle).map(|(t, m)| (n, t, m)))
        .min_by_key(|(_, t, _)| ms_between(since, *t))
}

/// Nodes whose agent is running and whose log says it announces `ip` now (its last
/// `announcing IP on` / `withdrawing IP from` line is an announcement).
pub fn log_announcers(lab: &Lab, ip: &str) -> Vec<String> {
    let on = format!("announcing {ip} on ");
    let off = format!("withdrawing {ip} from ");
    lab.node_names()
        .into_iter()
        .filter(|n| lab.agent_pid(n).is_some())
        .filter(|n| {
            log_lines(lab, n)
                .iter()
                .rev()
                .find(|(_, m)| m.starts_with(&on) || m.starts_with(&off))
                .is_some_and(|(_, m)| m.starts_with(&on))
        })
        .collect()
}

/// Waits (bounded) until exactly one running agent announces `ip`, and still does `settle`
/// later; its node name.
pub fn wait_one_announcer(lab: &Lab, ip: &str, settle: Duration) -> String {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let now = log_announcers(lab, ip);
        if now.len() == 1 {
            std::thread::sleep(settle);
            if log_announcers(lab, ip) == now {
                return now[0].clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{ip}: wanted exactly one announcer, the logs say {now:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Index of a node by name (node i is on bridge port n<i>).
pub fn node_index(lab: &Lab, node: &str) -> usize {
    lab.node_names()
        .iter()
        .position(|n| n == node)
        .unwrap_or_else(|| panic!("no node {node}"))
}

/// The network namespace of a target (node, pod, `client`, `lan`).
pub fn ns_of(lab: &Lab, target: &str) -> String {
    lab.state()
        .expect("lab.json")
        .target_ns(target)
        .unwrap_or_else(|| panic!("no target {target}"))
}

/// Runs a command in a target's namespace; panics unless it exits 0; stdout.
pub fn run_ok(lab: &Lab, target: &str, cmd: &[&str]) -> String {
    let out = lab.exec(target, cmd).expect("exec");
    assert!(
        out.status.success(),
        "{target}: {cmd:?}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The MAC of `eth0` in a target (from `ip -j link show eth0`), lower case.
pub fn eth0_mac(lab: &Lab, target: &str) -> String {
    let text = run_ok(lab, target, &["ip", "-j", "link", "show", "eth0"]);
    let v: serde_json::Value = serde_json::from_str(&text).expect("ip -j link");
    v[0]["address"]
        .as_str()
        .expect("eth0 has an address")
        .to_lowercase()
}

/// What one `arping` run saw.
#[derive(Debug, Clone, Default)]
pub struct Arping {
    /// The MAC of every reply, in order (lower case).
    pub replies: Vec<String>,
    pub output: String,
}

impl Arping {
    pub fn macs(&self) -> BTreeSet<String> {
        self.replies.iter().cloned().collect()
    }
}

/// `arping -i eth0 ARGS... IP` (Habets arping) from a target; its replies. A non-zero exit
/// (no reply) is not an error.
pub fn arping(lab: &Lab, from: &str, ip: &str, args: &[&str]) -> Arping {
    let mut cmd = vec!["arping", "-i", "eth0"];
    cmd.extend_from_slice(args);
    cmd.push(ip);
    let out = lab.exec(from, &cmd).expect("exec arping");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // "60 bytes from e2:b9:2b:db:db:41 (192.168.2.200): index=0 time=9.754 usec"
    let replies = output
        .lines()
        .filter_map(|l| l.split_once(" bytes from ")?.1.split_whitespace().next())
        .map(str::to_lowercase)
        .collect();
    Arping { replies, output }
}

/// `ndisc6 -m -n -r 1 -w WAIT_MS IP eth0` from a target: the MAC of every answer (lower case).
pub fn ndisc6(lab: &Lab, from: &str, ip: &str, wait_ms: u32) -> (Vec<String>, String) {
    let wait = wait_ms.to_string();
    let out = lab
        .exec(
            from,
            &["ndisc6", "-m", "-n", "-r", "1", "-w", &wait, ip, "eth0"],
        )
        .expect("exec ndisc6");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let macs = output
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Target link-layer address:"))
        .map(|m| m.trim().to_lowercase())
        .collect();
    (macs, output)
}

/// The neighbour entry of `ip` on eth0 of a target: (MAC lower case, states), if any.
pub fn neigh(lab: &Lab, from: &str, ip: &str) -> Option<(String, Vec<String>)> {
    let ns = ns_of(lab, from);
    neigh_in(&ns, ip)
}

/// [`neigh`] by namespace name (cheaper in tight loops).
pub fn neigh_in(ns: &str, ip: &str) -> Option<(String, Vec<String>)> {
    let out =
        ferry_lab::sys::exec_output(ns, &["ip", "-j", "neigh", "show", ip, "dev", "eth0"]).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let e = v.as_array()?.first()?;
    let mac = e["lladdr"].as_str().unwrap_or("").to_lowercase();
    let states = e["state"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Some((mac, states))
}

/// The load-balancer ingress addresses of a Service, from `ferry get svc -o json`.
pub fn external_ips(lab: &Lab, name: &str) -> Vec<String> {
    let Ok(json) = lab.ferry_get(&["svc", "-o", "json"]) else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&json) else {
        return Vec::new();
    };
    v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["metadata"]["name"].as_str() == Some(name))
        .and_then(|s| s.pointer("/status/loadBalancer/ingress"))
        .and_then(|i| i.as_array())
        .into_iter()
        .flatten()
        .filter_map(|i| i["ip"].as_str().map(str::to_string))
        .collect()
}

/// Waits (bounded) until the Service's ingress addresses are exactly `want`.
pub fn wait_external_ips(lab: &Lab, name: &str, want: &[&str]) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let got = external_ips(lab, name);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "service {name}: wanted external IPs {want:?}, got {got:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A column of a Service's row in `ferry get svc [-o wide]` (columns are found by the header).
pub fn svc_column(lab: &Lab, name: &str, column: &str, wide: bool) -> Option<String> {
    let mut args = vec!["svc"];
    if wide {
        args.extend(["-o", "wide"]);
    }
    let text = lab.ferry_get(&args).ok()?;
    let mut lines = text.lines();
    let header = lines.next()?;
    let at = header.find(column)?;
    let row = lines.find(|l| l.split_whitespace().next() == Some(name))?;
    row.get(at..)?.split_whitespace().next().map(str::to_string)
}

/// Takes node `i`'s port on the LAN bridge down or up (`ip link set n<i> down|up` in `lan`).
pub fn set_lan_port(lab: &Lab, i: usize, up: bool) {
    let port = format!("n{i}");
    run_ok(
        lab,
        "lan",
        &["ip", "link", "set", &port, if up { "up" } else { "down" }],
    );
}

/// Cuts node `a` off from nodes `others` on the LAN bridge (both ways), leaving everyone else
/// (the client) connected: `table bridge ferrytest` in the `lan` namespace. (The chain cannot
/// be called `fwd`: that is an nft keyword.)
pub fn partition(lab: &Lab, a: usize, others: &[usize]) {
    let set = others
        .iter()
        .map(|i| format!("\"n{i}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let rules = format!(
        "table bridge ferrytest {{\n  chain cut {{\n    type filter hook forward priority 0; policy accept;\n    \
         iifname \"n{a}\" oifname {{ {set} }} drop\n    iifname {{ {set} }} oifname \"n{a}\" drop\n  }}\n}}\n"
    );
    run_ok(lab, "lan", &["nft", &rules]);
}

/// Removes what [`partition`] added.
pub fn heal(lab: &Lab) {
    run_ok(
        lab,
        "lan",
        &["nft", "delete", "table", "bridge", "ferrytest"],
    );
}

/// Sends one UDP datagram from a target to any address (IPv6 too); no answer expected.
pub fn udp_send(lab: &Lab, from: &str, to: std::net::SocketAddr) {
    let ns = ns_of(lab, from);
    ferry_lab::sys::in_netns(&ns, || -> std::io::Result<()> {
        let bind: std::net::SocketAddr = if to.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let sock = std::net::UdpSocket::bind(bind)?;
        sock.send_to(b"ferry", to)?;
        Ok(())
    })
    .expect("entering the namespace")
    .unwrap_or_else(|e| panic!("sending to {to} from {from}: {e}"));
}

/// The client's curl loop and what to read from it: the lab's own (the demo uses it too).
#[allow(unused_imports)] // not every test binary uses all of them
pub use ferry_lab::probe::{longest_outage, probe_loop, recovered_after, Attempt};

/// A raw socket on a target's eth0 receiving frames of `ethertype` (in and out) from now on;
/// read them later with [`drain_frames`].
pub fn raw_socket(lab: &Lab, target: &str, ethertype: u16) -> ferry_l2::socket::PacketSocket {
    let ns = ns_of(lab, target);
    ferry_lab::sys::in_netns(&ns, || {
        ferry_l2::socket::PacketSocket::open("eth0", ethertype)
    })
    .expect("entering the namespace")
    .unwrap_or_else(|e| panic!("raw socket on eth0 in {ns}: {e}"))
}

/// The frames queued on a raw socket (ARP and NDP only; others are skipped), waiting until
/// none has arrived for `quiet`.
pub fn drain_frames(
    sock: &ferry_l2::socket::PacketSocket,
    quiet: Duration,
) -> Vec<(ferry_l2::socket::PacketType, ferry_l2::packet::Frame)> {
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    while sock.wait_readable(quiet).unwrap_or(false) {
        while let Ok(Some(r)) = sock.recv(&mut buf) {
            if let Ok(f) = ferry_l2::packet::Frame::parse(&buf[..r.len]) {
                out.push((r.packet_type, f));
            }
        }
    }
    out
}

/// What the client heard about an IPv4 address during [`arp_watch`].
#[derive(Debug, Clone, Default)]
pub struct ArpWatch {
    /// One entry per ARP request sent: when (from the start) and the MACs that answered it.
    pub samples: Vec<(Duration, BTreeSet<String>)>,
    /// Gratuitous ARPs for the address: when and from which MAC.
    pub gratuitous: Vec<(Duration, String)>,
    /// When the watch began (the times above count from it).
    pub started: Option<Instant>,
}

impl ArpWatch {
    /// Samples answered by more than one MAC.
    pub fn split_brain(&self) -> Vec<&(Duration, BTreeSet<String>)> {
        self.samples.iter().filter(|(_, m)| m.len() > 1).collect()
    }
    /// Samples nobody answered.
    pub fn unanswered(&self) -> usize {
        self.samples.iter().filter(|(_, m)| m.is_empty()).count()
    }
    /// Distinct MACs that answered, in the order first seen.
    pub fn answerers(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for m in self.samples.iter().flat_map(|(_, m)| m) {
            if !out.contains(m) {
                out.push(m.clone());
            }
        }
        out
    }
}

/// From the client's eth0, with a raw socket, for `span`: when `ask`, an ARP request for `ip`
/// every `every`, each answered by the MACs whose replies arrive before the next request
/// (finer than `arping`); gratuitous ARPs for `ip` are recorded either way. Passive
/// (`ask` false) it sends nothing, so the client's own neighbour cache is left alone.
pub fn arp_watch(
    lab: &Lab,
    from: &str,
    ip: Ipv4Addr,
    every: Duration,
    span: Duration,
    ask: bool,
) -> ArpWatch {
    use ferry_l2::packet::{Arp, ArpOperation, Frame, MacAddr, Payload, ETHERTYPE_ARP};
    let ns = ns_of(lab, from);
    let my_ip: Ipv4Addr = if from == "client" {
        lab.client_ip()
    } else {
        panic!("arp_watch runs from the client")
    };
    ferry_lab::sys::in_netns(&ns, || {
        let sock = ferry_l2::socket::PacketSocket::open("eth0", ETHERTYPE_ARP)
            .unwrap_or_else(|e| panic!("raw socket on eth0 in {ns}: {e}"));
        let me = sock.mac();
        let request = Frame {
            dst: MacAddr::BROADCAST,
            src: me,
            payload: Payload::Arp(Arp {
                operation: ArpOperation::Request,
                sender_mac: me,
                sender_ip: my_ip,
                target_mac: MacAddr::ZERO,
                target_ip: ip,
            }),
        }
        .to_bytes();
        let start = Instant::now();
        let mut watch = ArpWatch {
            started: Some(start),
            ..ArpWatch::default()
        };
        let mut buf = [0u8; 2048];
        while start.elapsed() < span {
            let sent_at = start.elapsed();
            if ask {
                sock.send(&request).expect("sending an ARP request");
            }
            let mut macs = BTreeSet::new();
            let window_end = sent_at + every;
            loop {
                let now = start.elapsed();
                if now >= window_end {
                    break;
                }
                if !sock.wait_readable(window_end - now).unwrap_or(false) {
                    continue;
                }
                while let Ok(Some(r)) = sock.recv(&mut buf) {
                    let Ok(frame) = Frame::parse(&buf[..r.len]) else {
                        continue;
                    };
                    let Payload::Arp(arp) = frame.payload else {
                        continue;
                    };
                    if arp.sender_mac == me || arp.sender_ip != ip {
                        continue;
                    }
                    if let Some(a) = frame.announcement() {
                        watch.gratuitous.push((start.elapsed(), a.mac.to_string()));
                    } else if arp.operation == ArpOperation::Reply && arp.target_mac == me {
                        macs.insert(arp.sender_mac.to_string());
                    }
                }
            }
            if ask {
                watch.samples.push((sent_at, macs));
            }
        }
        watch
    })
    .expect("entering the client's namespace")
}

/// `curl -si` from `from`: the body (pod name) and the X-Client-Addr the pod saw.
pub fn curl_client_addr(lab: &Lab, from: &str, url: &str) -> Result<(String, SocketAddr), String> {
    let out = lab
        .exec(from, &["curl", "-sSi", "--max-time", "2", url])
        .expect("exec curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "curl {url} from {from}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let addr = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("X-Client-Addr: "))
        .and_then(|a| a.trim().parse().ok())
        .ok_or_else(|| format!("no X-Client-Addr in:\n{text}"))?;
    let body = text.lines().last().unwrap_or_default().trim().to_string();
    Ok((body, addr))
}

/// The IPv4 address of a socket address (the lab's traffic is IPv4).
pub fn v4(a: SocketAddr) -> Ipv4Addr {
    match a {
        SocketAddr::V4(v4) => *v4.ip(),
        SocketAddr::V6(v6) => panic!("unexpected IPv6 source {v6}"),
    }
}

/// Like [`curl_client_addr`], retried until it works (bounded).
pub fn curl_client_addr_ok(lab: &Lab, from: &str, url: &str) -> (String, SocketAddr) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        match curl_client_addr(lab, from, url) {
            Ok(r) => return r,
            Err(e) => assert!(Instant::now() < deadline, "{e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
