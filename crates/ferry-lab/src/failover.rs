//! `ferry lab bench-failover`: client-visible failover time of a LoadBalancer address, for
//! ferry's layer-2 announcement and, as the anchor, for keepalived (VRRP).
//!
//! This is a benchmark, not a timed test: it prints numbers, it asserts nothing about them.
//!
//! # Method
//!
//! * A 3-node lab in the normal topology (LAN bridge `br0` in `P-lan`, nodes 192.168.2.11-13 on
//!   their `eth0`, the client 192.168.2.100). The virtual address is 192.168.2.200, port 80.
//! * **keepalived** mode: no ferry agents. Every node runs an HTTP server on 0.0.0.0:80
//!   (`ferry lab serve-pod --name NODE --tcp 80`, answering with the node's name) and
//!   `keepalived -n -l -D -G -P` with a private config, log and pid files in the lab dir:
//!   `vrrp_version 3`, one instance (`state BACKUP`, `interface eth0`, `virtual_router_id 51`,
//!   `priority 101+i`, `advert_int 0.1`, default preemption), VIP 192.168.2.200/24 on eth0.
//!   Whoever holds the VIP answers. The owner is the node whose eth0 carries the VIP
//!   (`ip -j addr`).
//! * **ferry** mode: agents on all 3 nodes; apply the seed Deployment (2 replicas), the seed
//!   MetalLB ConfigMap (pool 192.168.2.200-225, layer2) and the seed LoadBalancer Service. The
//!   owner is the node whose agent log last said `announcing 192.168.2.200` (and not
//!   `withdrawing 192.168.2.200` after it); if several do, the one whose MAC address the
//!   client's neighbour entry for the VIP holds.
//! * The probe runs in the client namespace (worker threads that `setns` into it): every 10 ms
//!   a fresh TCP connect + `GET /` to 192.168.2.200:80, the whole request bounded by 50 ms.
//!   Several workers share one schedule so a slow (timing-out) attempt never delays the next
//!   start. Every attempt is recorded with its monotonic start and end time.
//! * One trial: wait until the cluster is steady (one owner, the same before and after 20
//!   consecutive successful requests), then set the owner's bridge port `n<i>` in `P-lan` down
//!   (the `SIOCSIFFLAGS` ioctl of `ip link set n<i> down`, done in-process so t0 is the instant
//!   just before the kernel call). The failover time is the end of the first successful request
//!   *started* at or after t0, minus t0. Then the port goes up again, 3 s pause, and the next
//!   trial waits for steadiness again (keepalived's preemption may move the VIP back).
//! * Bounded waits: a trial that sees no success within 10 s, or a cluster that is not steady
//!   within 10 s, is recorded as a failed trial and the run goes on.
//! * Resolution: one probe start every 10 ms, so a figure is up to ~10 ms (plus one request's
//!   round trip) later than the moment the address worked again.
//!
//! The summary is `failover (<mode>): median X ms, p99 Y ms, max Z ms over N trials` (over the
//! trials that recovered; p99 is nearest-rank, so with 20 trials it is the maximum). The lab is
//! always removed at the end, also on errors and on Ctrl-C; keepalived and the HTTP servers are
//! stopped by PID first.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

use crate::api::{Lab, LabConfig};
use crate::seed::{METALLB_CONFIG, NEXTCLOUD_DEV, NEXTCLOUD_DEV_LOADBALANCER};
use crate::state::LabState;
use crate::sys;
use crate::topology;

/// The virtual (LoadBalancer) address and port.
pub const VIP: Ipv4Addr = Ipv4Addr::new(192, 168, 2, 200);
pub const VIP_PORT: u16 = 80;
/// Nodes in the bench lab.
pub const NODES: usize = 3;
/// One probe start every PROBE_INTERVAL.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(10);
/// Bound on one probe request (connect + request + response).
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(50);
/// Probe threads sharing the schedule (enough that PROBE_TIMEOUT never delays a start).
const PROBE_WORKERS: usize = 8;
/// Consecutive successes that make the address "steady".
pub const STEADY_SUCCESSES: usize = 20;
/// A trial that sees no success within this is a failed trial.
pub const RECOVERY_LIMIT: Duration = Duration::from_secs(10);
/// Bound on waiting for a steady cluster before a trial.
pub const SETTLE_LIMIT: Duration = Duration::from_secs(10);
/// Pause after the link comes back up, before looking for steadiness: longer than a returning
/// ferry node's 1 s hold-down plus the interim holder's hand-over, so that each trial starts
/// from a settled cluster (an owner lost inside that window is replaced only when the hold-down
/// ends: a different measurement).
const SETTLE_PAUSE: Duration = Duration::from_secs(3);
/// First wait for the address to answer (keepalived's first election, pods starting).
const FIRST_ANSWER_LIMIT: Duration = Duration::from_secs(15);
/// Ferry mode: how long to wait for a node to announce the VIP at all.
const ANNOUNCE_LIMIT: Duration = Duration::from_secs(10);
/// The default `--prefix` of `ferry lab` is never used by the bench (it would replace a lab
/// someone is working in): it becomes this.
pub const DEFAULT_PREFIX: &str = "fo";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// keepalived (VRRP v3, advert_int 0.1) on every node: the anchor.
    Keepalived,
    /// ferry agents announcing the seed LoadBalancer Service's address.
    Ferry,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Keepalived => "keepalived",
            Mode::Ferry => "ferry",
        }
    }
}

/// `ferry lab bench-failover --mode keepalived|ferry [--trials 20] [--prefix fo]`.
#[derive(Debug, Args)]
pub struct FailoverArgs {
    /// Who moves 192.168.2.200 when its owner's link goes down.
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// Number of trials (owner's link down -> first successful request).
    #[arg(long, default_value_t = 20)]
    pub trials: usize,
}

// ---------------------------------------------------------------------------------------------
// Interruption

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: installing a handler that only stores to an atomic.
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps `d`, in short steps so an interruption is seen quickly.
fn nap(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupted()?;
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(20)));
    }
}

// ---------------------------------------------------------------------------------------------
// The probe

/// One probe request.
#[derive(Debug, Clone)]
struct Attempt {
    start: Instant,
    end: Instant,
    /// Ok(first line of the body: who answered) or Err(why it failed).
    result: std::result::Result<String, String>,
}

/// Probe loop in the client namespace; stopped (threads joined) on drop.
struct Probe {
    records: Arc<Mutex<Vec<Attempt>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// Where the steadiness check stands.
#[derive(Debug, PartialEq, Eq)]
enum Window {
    /// A request since the window started failed.
    Failed(String),
    /// `n` consecutive successes since the window started.
    Steady,
    Waiting,
}

impl Probe {
    fn start(ns: &str, target: SocketAddr) -> Result<Probe> {
        let path = Path::new("/run/netns").join(ns);
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let records = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let next_tick = Arc::new(AtomicU64::new(0));
        let origin = Instant::now();
        let (ready_tx, ready_rx) = mpsc::channel::<std::result::Result<(), String>>();
        let mut probe = Probe {
            records: records.clone(),
            stop: stop.clone(),
            threads: Vec::new(),
        };
        for _ in 0..PROBE_WORKERS {
            let fd = file.try_clone()?;
            let records = records.clone();
            let stop = stop.clone();
            let next_tick = next_tick.clone();
            let ready = ready_tx.clone();
            let ns = ns.to_string();
            probe.threads.push(std::thread::spawn(move || {
                // SAFETY: setns on a namespace fd we own; only this thread moves.
                if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    let e = std::io::Error::last_os_error();
                    let _ = ready.send(Err(format!("entering namespace {ns}: {e}")));
                    return;
                }
                drop(fd);
                let _ = ready.send(Ok(()));
                while !stop.load(Ordering::SeqCst) {
                    let tick = next_tick.fetch_add(1, Ordering::SeqCst);
                    let Some(at) = u32::try_from(tick)
                        .ok()
                        .and_then(|t| PROBE_INTERVAL.checked_mul(t))
                        .and_then(|d| origin.checked_add(d))
                    else {
                        return;
                    };
                    // Sleep in short steps so stopping is prompt.
                    loop {
                        let left = at.saturating_duration_since(Instant::now());
                        if left.is_zero() || stop.load(Ordering::SeqCst) {
                            break;
                        }
                        std::thread::sleep(left.min(Duration::from_millis(20)));
                    }
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let start = Instant::now();
                    let result = http_get(target, PROBE_TIMEOUT);
                    let end = Instant::now();
                    if let Ok(mut r) = records.lock() {
                        r.push(Attempt { start, end, result });
                    }
                }
            }));
        }
        drop(ready_tx);
        for _ in 0..PROBE_WORKERS {
            match ready_rx.recv_timeout(Duration::from_secs(5)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => bail!("starting the probe: {e}"),
                Err(_) => bail!("starting the probe: a worker did not start"),
            }
        }
        Ok(probe)
    }

    /// Completed attempts started in `[from, to)`, by start time.
    fn attempts(&self, from: Instant, to: Instant) -> Vec<Attempt> {
        let mut v: Vec<Attempt> = match self.records.lock() {
            Ok(r) => r
                .iter()
                .filter(|a| a.start >= from && a.start < to)
                .cloned()
                .collect(),
            Err(_) => Vec::new(),
        };
        v.sort_by_key(|a| a.start);
        v
    }

    /// The first successful attempt started at or after `t0` (by end time).
    fn first_success_after(&self, t0: Instant) -> Option<Attempt> {
        let r = self.records.lock().ok()?;
        r.iter()
            .filter(|a| a.start >= t0 && a.result.is_ok())
            .min_by_key(|a| a.end)
            .cloned()
    }

    /// Whether the requests started since `since` make `n` consecutive successes. Only
    /// attempts surely finished by now (started more than PROBE_TIMEOUT + 20 ms ago) count.
    fn window(&self, since: Instant, n: usize) -> Window {
        let settled = Instant::now()
            .checked_sub(PROBE_TIMEOUT + Duration::from_millis(20))
            .unwrap_or(since);
        let done = self.attempts(since, settled);
        if let Some(Err(e)) = done.iter().map(|a| &a.result).find(|r| r.is_err()) {
            return Window::Failed(e.clone());
        }
        if done.len() >= n {
            Window::Steady
        } else {
            Window::Waiting
        }
    }

    /// The most recent failure's reason, for error messages.
    fn last_error(&self) -> Option<String> {
        let r = self.records.lock().ok()?;
        r.iter()
            .filter_map(|a| a.result.as_ref().err())
            .next_back()
            .cloned()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One fresh TCP connection and `GET /`, all within `timeout`: Ok(first line of the body).
fn http_get(addr: SocketAddr, timeout: Duration) -> std::result::Result<String, String> {
    let deadline = Instant::now() + timeout;
    let left = || {
        let d = deadline.saturating_duration_since(Instant::now());
        if d.is_zero() {
            Err("timed out".to_string())
        } else {
            Ok(d)
        }
    };
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_write_timeout(Some(left()?))
        .map_err(|e| e.to_string())?;
    let req = format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut resp = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        s.set_read_timeout(Some(left()?))
            .map_err(|e| e.to_string())?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                resp.extend_from_slice(&buf[..n]);
                if resp.len() > 65_536 {
                    break;
                }
            }
            Err(e) => return Err(format!("receive: {e}")),
        }
    }
    parse_response(&resp)
}

/// Ok(first line of the body) for a 200 response.
fn parse_response(resp: &[u8]) -> std::result::Result<String, String> {
    let text = String::from_utf8_lossy(resp);
    let status = text.lines().next().unwrap_or("");
    let code = status.split_whitespace().nth(1);
    if !status.starts_with("HTTP/1.") || code != Some("200") {
        return Err(format!(
            "bad response {:?}",
            status.chars().take(60).collect::<String>()
        ));
    }
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok(body
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .chars()
        .take(64)
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Links and owners

/// Sets link `ifname` in namespace `ns` up or down (what `ip link set IF up|down` does, via
/// SIOCSIFFLAGS). Returns the instant just before the kernel call.
fn set_link(ns: &str, ifname: &str, up: bool) -> Result<Instant> {
    let name = ifname.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        bail!("bad interface name {ifname:?}");
    }
    sys::in_netns(ns, || -> Result<Instant> {
        // SAFETY: a plain socket(2); the fd is owned at once.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("socket for link ioctl");
        }
        // SAFETY: raw is a fresh, valid fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ifreq is plain data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name) {
            *dst = *src as libc::c_char;
        }
        // SAFETY: SIOCGIFFLAGS with a valid ifreq that outlives the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) } < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("reading flags of {ifname} in {ns}"));
        }
        // SAFETY: after SIOCGIFFLAGS the union holds the flags.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        let up_flag = libc::IFF_UP as libc::c_short;
        req.ifr_ifru.ifru_flags = if up {
            flags | up_flag
        } else {
            flags & !up_flag
        };
        let t = Instant::now();
        // SAFETY: SIOCSIFFLAGS with a valid ifreq that outlives the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req) } < 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| {
                format!(
                    "setting {ifname} {} in {ns}",
                    if up { "up" } else { "down" }
                )
            });
        }
        Ok(t)
    })?
}

/// `ip -n NS -j ARGS...` parsed as JSON.
fn ip_json(ns: &str, args: &[&str]) -> Result<serde_json::Value> {
    let mut all = vec!["-n", ns, "-j"];
    all.extend_from_slice(args);
    let out = sys::ip(&all)?;
    if out.trim().is_empty() {
        return Ok(serde_json::Value::Array(Vec::new()));
    }
    serde_json::from_str(&out).with_context(|| format!("parsing `ip {}`", all.join(" ")))
}

/// Whether `ip -j addr` output lists `addr` among the IPv4 addresses.
fn addr_json_has(v: &serde_json::Value, addr: Ipv4Addr) -> bool {
    let want = addr.to_string();
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|link| link.get("addr_info").and_then(|a| a.as_array()))
        .flatten()
        .any(|a| {
            a.get("family").and_then(|f| f.as_str()) == Some("inet")
                && a.get("local").and_then(|l| l.as_str()) == Some(want.as_str())
        })
}

/// Indexes of the nodes whose eth0 carries the VIP.
fn vip_holders(st: &LabState) -> Result<Vec<usize>> {
    let mut holders = Vec::new();
    for n in &st.nodes {
        let v = ip_json(&n.ns, &["addr", "show", "dev", "eth0"])?;
        if addr_json_has(&v, VIP) {
            holders.push(n.index);
        }
    }
    Ok(holders)
}

/// Whether `line` contains `phrase` not followed by a digit (so ".200" is not ".2001").
fn has_phrase(line: &str, phrase: &str) -> bool {
    line.match_indices(phrase).any(|(i, _)| {
        !line[i + phrase.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

/// From an agent log: Some(true) if the last line about the VIP says it announces it,
/// Some(false) if it says it withdraws it, None if no line is about it.
fn log_announces(log: &str, vip: Ipv4Addr) -> Option<bool> {
    let announcing = format!("announcing {vip}");
    let withdrawing = format!("withdrawing {vip}");
    log.lines().rev().find_map(|l| {
        if has_phrase(l, &withdrawing) {
            Some(false)
        } else if has_phrase(l, &announcing) {
            Some(true)
        } else {
            None
        }
    })
}

/// Indexes of the nodes whose agent log says they announce the VIP.
fn announcers(lab: &Lab, st: &LabState) -> Vec<usize> {
    st.nodes
        .iter()
        .filter(|n| {
            let log = fs::read_to_string(lab.ctx().agent_log(&n.name)).unwrap_or_default();
            log_announces(&log, VIP) == Some(true)
        })
        .map(|n| n.index)
        .collect()
}

/// The MAC address the client's neighbour entry for the VIP holds.
fn client_neigh_mac(st: &LabState) -> Option<String> {
    let v = ip_json(&st.client.ns, &["neigh", "show", &VIP.to_string()]).ok()?;
    v.as_array()?
        .iter()
        .find_map(|e| e.get("lladdr").and_then(|m| m.as_str()))
        .map(str::to_lowercase)
}

fn node_mac(ns: &str) -> Option<String> {
    let v = ip_json(ns, &["link", "show", "dev", "eth0"]).ok()?;
    v.as_array()?
        .iter()
        .find_map(|e| e.get("address").and_then(|m| m.as_str()))
        .map(str::to_lowercase)
}

/// One owner out of `candidates`: the only one, or the one the client's ARP entry points at.
fn pick_owner(st: &LabState, candidates: &[usize]) -> Option<usize> {
    match candidates {
        [] => None,
        [one] => Some(*one),
        many => {
            let mac = client_neigh_mac(st)?;
            many.iter()
                .copied()
                .find(|&i| st.nodes.get(i).and_then(|n| node_mac(&n.ns)) == Some(mac.clone()))
        }
    }
}

/// Who holds the VIP now, per mode (None: nobody, or no single answer yet).
fn owner(lab: &Lab, st: &LabState, mode: Mode) -> Result<Option<usize>> {
    let candidates = match mode {
        Mode::Keepalived => vip_holders(st)?,
        Mode::Ferry => announcers(lab, st),
    };
    Ok(pick_owner(st, &candidates))
}

// ---------------------------------------------------------------------------------------------
// Trials

/// Waits until one owner holds the VIP, the same one before and after STEADY_SUCCESSES
/// consecutive successful requests. Returns that owner.
fn settle(lab: &Lab, st: &LabState, mode: Mode, probe: &Probe, limit: Duration) -> Result<usize> {
    let deadline = Instant::now() + limit;
    let mut window: Option<(usize, Instant)> = None;
    let mut why = String::from("no owner yet");
    loop {
        check_interrupted()?;
        if Instant::now() >= deadline {
            bail!("not steady within {} s: {why}", limit.as_secs());
        }
        let Some((first_owner, since)) = window else {
            match owner(lab, st, mode)? {
                Some(o) => window = Some((o, Instant::now())),
                None => {
                    why = format!("no single owner of {VIP}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            continue;
        };
        match probe.window(since, STEADY_SUCCESSES) {
            Window::Failed(e) => {
                why = format!("requests fail ({e})");
                window = None;
                std::thread::sleep(Duration::from_millis(20));
            }
            Window::Waiting => std::thread::sleep(Duration::from_millis(20)),
            Window::Steady => {
                let now_owner = owner(lab, st, mode)?;
                if now_owner == Some(first_owner) {
                    return Ok(first_owner);
                }
                why = "the owner changed".to_string();
                window = None;
            }
        }
    }
}

/// One trial's outcome.
#[derive(Debug, Clone)]
struct Trial {
    owner: Option<String>,
    /// Ok((failover time, who answered first)) or Err(why the trial failed).
    result: std::result::Result<(Duration, String), String>,
}

/// Runs the trials; Err only when the bench cannot go on (a link cannot be set, Ctrl-C).
fn run_trials(
    lab: &Lab,
    st: &LabState,
    mode: Mode,
    probe: &Probe,
    trials: usize,
    first_owner: usize,
) -> Result<Vec<Trial>> {
    let mut out = Vec::new();
    let mut ready = Some(first_owner);
    for i in 1..=trials {
        check_interrupted()?;
        let owner_ix = match ready.take() {
            Some(o) => o,
            None => match settle(lab, st, mode, probe, SETTLE_LIMIT) {
                Ok(o) => o,
                Err(e) => {
                    check_interrupted()?;
                    println!("trial {i:>2}/{trials}: FAILED: {e:#}");
                    out.push(Trial {
                        owner: None,
                        result: Err(format!("{e:#}")),
                    });
                    continue;
                }
            },
        };
        let node = st
            .nodes
            .get(owner_ix)
            .with_context(|| format!("no node with index {owner_ix}"))?;
        let t0 = set_link(&st.lan_ns, &node.lan_if, false)?;
        let mut result = Err(format!(
            "no successful request within {} s",
            RECOVERY_LIMIT.as_secs()
        ));
        while t0.elapsed() < RECOVERY_LIMIT {
            if INTERRUPTED.load(Ordering::SeqCst) {
                break;
            }
            if let Some(a) = probe.first_success_after(t0) {
                let by = a.result.clone().unwrap_or_default();
                result = Ok((a.end.saturating_duration_since(t0), by));
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // Always bring the link back, also when interrupted.
        set_link(&st.lan_ns, &node.lan_if, true)?;
        check_interrupted()?;
        match &result {
            Ok((d, by)) => println!(
                "trial {i:>2}/{trials}: {} ({}) link down -> first success after {} ms (answered by {by})",
                node.name,
                node.lan_if,
                ms(*d)
            ),
            Err(e) => println!(
                "trial {i:>2}/{trials}: {} ({}) link down -> FAILED: {e} (last error: {})",
                node.name,
                node.lan_if,
                probe.last_error().unwrap_or_default()
            ),
        }
        out.push(Trial {
            owner: Some(node.name.clone()),
            result,
        });
        if i < trials {
            nap(SETTLE_PAUSE)?;
        }
    }
    Ok(out)
}

fn ms(d: Duration) -> u128 {
    (d.as_micros() + 500) / 1000
}

/// Nearest-rank percentile (`p` in 0..=100) of sorted values.
fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// Median (mean of the two middle values for an even count).
fn median(sorted: &[Duration]) -> Option<Duration> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => sorted.get(n / 2).copied(),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2),
    }
}

/// The summary line and, if any trial failed, a second line; and whether all recovered.
fn summary(mode: Mode, trials: &[Trial]) -> (Vec<String>, bool) {
    let mut times: Vec<Duration> = trials
        .iter()
        .filter_map(|t| t.result.as_ref().ok().map(|(d, _)| *d))
        .collect();
    times.sort();
    let failed = trials.len() - times.len();
    let mut lines = Vec::new();
    match (median(&times), percentile(&times, 99.0), times.last()) {
        (Some(med), Some(p99), Some(max)) => {
            lines.push(format!(
                "failover ({}): median {} ms, p99 {} ms, max {} ms over {} trials",
                mode.name(),
                ms(med),
                ms(p99),
                ms(*max),
                times.len()
            ));
            let list: Vec<String> = trials
                .iter()
                .map(|t| match &t.result {
                    Ok((d, _)) => ms(*d).to_string(),
                    Err(_) => "failed".to_string(),
                })
                .collect();
            lines.push(format!("per-trial (ms): {}", list.join(" ")));
            let mut owners: Vec<String> = trials.iter().filter_map(|t| t.owner.clone()).collect();
            owners.sort();
            owners.dedup();
            lines.push(format!("owners taken down: {}", owners.join(", ")));
        }
        _ => lines.push(format!(
            "failover ({}): no trial recovered ({} trials)",
            mode.name(),
            trials.len()
        )),
    }
    if failed > 0 {
        lines.push(format!("{failed} of {} trials failed", trials.len()));
    }
    (lines, failed == 0 && !trials.is_empty())
}

// ---------------------------------------------------------------------------------------------
// Modes

/// keepalived's config for node `index` (priority 101 + index).
pub fn keepalived_conf(node: &str, index: usize) -> String {
    format!(
        "# written by ferry lab bench-failover\n\
         global_defs {{\n    router_id {node}\n    vrrp_version 3\n}}\n\
         vrrp_instance VI_1 {{\n    state BACKUP\n    interface eth0\n    virtual_router_id 51\n    \
         priority {prio}\n    advert_int 0.1\n    virtual_ipaddress {{\n        {VIP}/24 dev eth0\n    }}\n}}\n",
        prio = 101 + index
    )
}

/// Processes the bench started itself; stopped by PID on drop.
struct Procs {
    list: Vec<(u32, String)>,
}

impl Procs {
    fn stop(&mut self) {
        for (pid, ns) in self.list.drain(..) {
            sys::stop_pids(&[pid], false, Duration::from_secs(5), |p| {
                sys::pid_in_netns(p, &ns)
            });
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The keepalived executable: in $PATH or /usr/sbin, /sbin.
fn find_keepalived() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join("keepalived"))
        .find(|p| p.is_file())
        .context("keepalived not found (apt-get install keepalived)")
}

/// Starts an HTTP server and keepalived in every node namespace.
fn start_keepalived(lab: &Lab, st: &LabState, procs: &mut Procs) -> Result<()> {
    let ctx = lab.ctx();
    let keepalived = find_keepalived()?;
    let dir = ctx.dir().join("keepalived");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for n in &st.nodes {
        let http_log = ctx.logs().join(format!("http-{}.log", n.name));
        let args: Vec<String> = ["lab", "serve-pod", "--name", &n.name, "--tcp", "80"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let exe = ctx.require_exe(crate::state::LAB_EXE_NAME)?;
        let pid = topology::spawn_in_ns(&n.ns, exe, &args, &http_log)?;
        procs.list.push((pid, n.ns.clone()));
        fs::write(
            ctx.pids().join(format!("http-{}.pid", n.name)),
            format!("{pid}\n"),
        )?;

        let conf = dir.join(format!("{}.conf", n.name));
        fs::write(&conf, keepalived_conf(&n.name, n.index))
            .with_context(|| format!("writing {}", conf.display()))?;
        let pidfile = |what: &str| {
            ctx.pids()
                .join(format!("keepalived-{what}-{}.pid", n.name))
                .display()
                .to_string()
        };
        let args = vec![
            "-n".to_string(),
            "-l".to_string(),
            "-D".to_string(),
            "-G".to_string(),
            "-P".to_string(),
            "-f".to_string(),
            conf.display().to_string(),
            "-p".to_string(),
            pidfile("main"),
            "-r".to_string(),
            pidfile("vrrp"),
            "-c".to_string(),
            pidfile("check"),
        ];
        let log = ctx.logs().join(format!("keepalived-{}.log", n.name));
        let pid = topology::spawn_in_ns(&n.ns, &keepalived, &args, &log)?;
        procs.list.push((pid, n.ns.clone()));
    }
    std::thread::sleep(Duration::from_millis(300));
    for (pid, ns) in &procs.list {
        if !sys::pid_alive(*pid) {
            let node = st.nodes.iter().find(|n| &n.ns == ns);
            let logs = node
                .map(|n| {
                    format!(
                        "{}\n{}",
                        topology::tail(&ctx.logs().join(format!("keepalived-{}.log", n.name)), 8),
                        topology::tail(&ctx.logs().join(format!("http-{}.log", n.name)), 4)
                    )
                })
                .unwrap_or_default();
            bail!("process {pid} in {ns} exited at once:\n{logs}");
        }
    }
    Ok(())
}

/// Applies the seed Deployment, MetalLB config and LoadBalancer Service; waits until an agent
/// announces the VIP.
fn start_ferry(lab: &Lab, st: &LabState) -> Result<()> {
    for (name, yaml) in [
        ("nextcloud-dev.yaml", NEXTCLOUD_DEV),
        ("metallb-config.yaml", METALLB_CONFIG),
        (
            "nextcloud-dev-loadbalancer.yaml",
            NEXTCLOUD_DEV_LOADBALANCER,
        ),
    ] {
        check_interrupted()?;
        let out = lab
            .apply_yaml(yaml)
            .with_context(|| format!("applying {name}"))?;
        println!("{out}");
    }
    let start = Instant::now();
    loop {
        check_interrupted()?;
        if !announcers(lab, st).is_empty() {
            println!(
                "# an agent announces {VIP} after {:.1} s",
                start.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if start.elapsed() >= ANNOUNCE_LIMIT {
            let tails: Vec<String> = st
                .nodes
                .iter()
                .map(|n| {
                    format!(
                        "  {}:\n{}",
                        n.name,
                        topology::tail(&lab.ctx().agent_log(&n.name), 4)
                    )
                })
                .collect();
            bail!(
                "no node announces {VIP} within {} s (no agent log has a line `announcing {VIP}`); last agent log lines:\n{}",
                ANNOUNCE_LIMIT.as_secs(),
                tails.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Everything between `up` and `down`.
fn bench(lab: &Lab, mode: Mode, trials: usize) -> Result<Vec<Trial>> {
    let st = lab.state()?;
    let mut procs = Procs { list: Vec::new() };
    match mode {
        Mode::Keepalived => start_keepalived(lab, &st, &mut procs)?,
        Mode::Ferry => start_ferry(lab, &st)?,
    }
    let target = SocketAddr::V4(SocketAddrV4::new(VIP, VIP_PORT));
    let probe = Probe::start(&st.client.ns, target)?;
    let t = Instant::now();
    let first = settle(lab, &st, mode, &probe, FIRST_ANSWER_LIMIT).with_context(|| {
        format!(
            "{VIP}:{VIP_PORT} did not answer steadily from the client within {} s",
            FIRST_ANSWER_LIMIT.as_secs()
        )
    })?;
    println!(
        "# {VIP}:{VIP_PORT} answers steadily after {:.1} s; owner {}",
        t.elapsed().as_secs_f64(),
        st.nodes.get(first).map(|n| n.name.as_str()).unwrap_or("?")
    );
    let result = run_trials(lab, &st, mode, &probe, trials, first);
    drop(probe);
    procs.stop();
    result
}

/// `ferry lab bench-failover`: returns the exit code (0 when every trial recovered).
pub fn run(prefix: &str, args: &FailoverArgs) -> Result<i32> {
    if args.trials == 0 {
        bail!("--trials must be at least 1");
    }
    install_signal_handlers();
    let prefix = if prefix == "ferry" {
        DEFAULT_PREFIX
    } else {
        prefix
    };
    let mode = args.mode;
    println!(
        "# bench-failover ({}): lab {prefix:?}, {NODES} nodes, {VIP}:{VIP_PORT}, {} trials, probe every {} ms with a {} ms timeout",
        mode.name(),
        args.trials,
        PROBE_INTERVAL.as_millis(),
        PROBE_TIMEOUT.as_millis()
    );
    // A leftover lab with this prefix (a crashed bench) is removed first; the handle downs the
    // lab when dropped, also on errors.
    let mut lab = LabConfig::new(prefix)
        .nodes(NODES)
        .agents(mode == Mode::Ferry)
        .fresh(true)
        .up()?;
    for w in &lab.warnings {
        eprintln!("warning: {w}");
    }
    let result = bench(&lab, mode, args.trials);
    let down = lab.down();
    let trials = result?;
    down.context("removing the lab")?;
    let (lines, all_ok) = summary(mode, &trials);
    for l in lines {
        println!("{l}");
    }
    Ok(if all_ok { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phrases_and_logs() {
        assert!(has_phrase(
            "x announcing 192.168.2.200 on eth0",
            "announcing 192.168.2.200"
        ));
        assert!(has_phrase(
            "announcing 192.168.2.200",
            "announcing 192.168.2.200"
        ));
        assert!(!has_phrase(
            "announcing 192.168.2.2001",
            "announcing 192.168.2.200"
        ));
        let log = "start\nannouncing 192.168.2.200 on eth0\nother\n";
        assert_eq!(log_announces(log, VIP), Some(true));
        let log = "announcing 192.168.2.200 on eth0\nwithdrawing 192.168.2.200\n";
        assert_eq!(log_announces(log, VIP), Some(false));
        let log = "withdrawing 192.168.2.200\nINFO announcing 192.168.2.200 on eth0\n";
        assert_eq!(log_announces(log, VIP), Some(true));
        assert_eq!(
            log_announces("announcing 192.168.2.201 on eth0\n", VIP),
            None
        );
        assert_eq!(log_announces("", VIP), None);
    }

    #[test]
    fn responses() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nnode\n";
        assert_eq!(parse_response(r), Ok("node".to_string()));
        assert!(parse_response(b"HTTP/1.1 503 Unavailable\r\n\r\n").is_err());
        assert!(parse_response(b"").is_err());
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn addr_json() {
        let v: serde_json::Value = serde_json::from_str(
            r#"[{"ifname":"eth0","addr_info":[{"family":"inet","local":"192.168.2.13","prefixlen":24},{"family":"inet","local":"192.168.2.200","prefixlen":24},{"family":"inet6","local":"fd00:2::13"}]}]"#,
        )
        .expect("json");
        assert!(addr_json_has(&v, VIP));
        assert!(!addr_json_has(&v, Ipv4Addr::new(192, 168, 2, 201)));
        assert!(!addr_json_has(&serde_json::Value::Array(vec![]), VIP));
    }

    #[test]
    fn stats() {
        let d = |m: u64| Duration::from_millis(m);
        let v: Vec<Duration> = (1..=20).map(|i| d(i * 10)).collect();
        assert_eq!(median(&v), Some(d(105)));
        assert_eq!(percentile(&v, 99.0), Some(d(200)));
        assert_eq!(percentile(&v, 50.0), Some(d(100)));
        assert_eq!(median(&[d(3), d(5), d(9)]), Some(d(5)));
        assert_eq!(median(&[]), None);
        assert_eq!(percentile(&[], 99.0), None);
        let trials = vec![
            Trial {
                owner: Some("a".into()),
                result: Ok((d(300), "b".into())),
            },
            Trial {
                owner: Some("a".into()),
                result: Err("x".into()),
            },
        ];
        let (lines, ok) = summary(Mode::Keepalived, &trials);
        assert!(!ok);
        assert_eq!(
            lines[0],
            "failover (keepalived): median 300 ms, p99 300 ms, max 300 ms over 1 trials"
        );
        assert_eq!(
            lines.last().map(String::as_str),
            Some("1 of 2 trials failed")
        );
    }

    #[test]
    fn keepalived_config() {
        let c = keepalived_conf("k3s-worker-rpi003", 2);
        assert!(c.contains("vrrp_version 3"));
        assert!(c.contains("priority 103"));
        assert!(c.contains("advert_int 0.1"));
        assert!(c.contains("virtual_router_id 51"));
        assert!(c.contains("192.168.2.200/24 dev eth0"));
        assert!(!c.contains("nopreempt"));
    }
}
