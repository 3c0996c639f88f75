//! End to end (issue 6): the layer-2 guarantee holds whatever the dataplane is doing.
//!
//! A 3-node lab with the seed's LoadBalancer Service (192.168.2.200 from the MetalLB layer-2
//! pool). The announcing node's agent is restarted on a private copy of the manifest and state
//! directories, so that a load written there reaches that node only. Then several thousand new
//! Services with EndpointSlices arrive in its directory at once, and the moment its agent opens
//! the first of those files (inotify: its sync has begun) the node is cut off from the other
//! agents' gossip (UDP 7946 dropped in and out by a table of the test's own, `inet cut`, in its
//! namespace); the client still reaches it. The client sends a raw ARP request every 10 ms and
//! records which MACs answer each one.
//!
//! Wanted: no request is ever answered by two MACs, and another node takes the address over
//! within the usual failover time (under 1 s from the cut, as `failover_link_down` wants of
//! the client). The timeline of answers is printed either way.
//!
//! Run: `cargo test -p ferry --test e2e_l2_busy -- --nocapture` (as root; skips otherwise,
//! unless $CI is set). About 10 s.
//!
//! On the agent of before issue 6 (the election runs in the loop, after the sync) it fails:
//! in 7 runs another node announced 200-277 ms after the cut and from then on 255-483 requests
//! in a row were answered by both MACs, for 2.9-5.7 s, until the cut node's sync of the 5,000
//! services ended (3.1-5.9 s in a debug build) and it looked at its quorum again. With
//! FERRY_L2_BUSY_SERVICES=20 (a short sync) the same agent passes: the cut node withdraws
//! ~90 ms after the cut, the other takes over at ~200 ms, none answered by two MACs.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{
    arp_watch, demo, eth0_mac, log_line_since, log_lines, ms_between, ms_of_day_now, ns_of, run_ok,
    wait_external_ips, wait_one_announcer, ArpWatch, Lab, FERRY,
};

const LB: &str = "nextcloud-dev-loadbalancer";
const VIP: &str = "192.168.2.200";
const VIP_URL: &str = "http://192.168.2.200/";

/// The load that arrives on the announcing node only: Services (default; $FERRY_L2_BUSY_SERVICES
/// sets another number, e.g. a small one to see the test pass on an agent that is not kept
/// busy), each with an EndpointSlice of LOAD_ENDPOINTS endpoints.
const LOAD_SERVICES: usize = 5_000;
const LOAD_ENDPOINTS: usize = 4;
/// Services per manifest file of the load.
const PER_FILE: usize = 100;

/// The agents' SWIM port (`ferry agent --member-port`, default; the lab does not set it).
const MEMBER_PORT: u16 = 7946;

/// ARP sampling: one request every SAMPLE_EVERY, BASELINE before the load arrives, and the
/// watch lasts WATCH in all (about 3 s after the cut).
const SAMPLE_EVERY: Duration = Duration::from_millis(10);
const BASELINE: Duration = Duration::from_millis(300);
const WATCH: Duration = Duration::from_millis(3_500);

/// The usual failover time: another node answers within this long after the cut.
const TAKEOVER_LIMIT: Duration = Duration::from_secs(1);

/// The cut node's sync must have started within this long of the load's arrival.
const SYNC_START_LIMIT: Duration = Duration::from_secs(5);

/// While two MACs still answer at the end of the watch, it goes on in steps of TAIL_STEP, up
/// to TAIL_LIMIT after the cut (only to measure how long a split brain lasts).
const TAIL_STEP: Duration = Duration::from_millis(500);
const TAIL_LIMIT: Duration = Duration::from_secs(12);
/// Requests in a row answered by at most one MAC that end a split brain.
const TAIL_CLEAN: usize = 20;

/// How long to wait, afterwards, for the cut node's log to say its sync of the load ended.
const SYNC_END_LIMIT: Duration = Duration::from_secs(20);

#[test]
fn busy_announcer_cut_off_from_gossip_never_two_macs() {
    // Its agents restart on private copies of the manifest directory: manifest mode.
    let Some(lab) = common::lab_manifests("busy_announcer_cut_off_from_gossip_never_two_macs", 3)
    else {
        return;
    };
    let load = match std::env::var("FERRY_L2_BUSY_SERVICES") {
        Ok(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or_else(|| panic!("FERRY_L2_BUSY_SERVICES={v:?}: wanted a positive number")),
        Err(_) => LOAD_SERVICES,
    };

    // The seed: pods, the LoadBalancer Service, the MetalLB ConfigMap.
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    lab.apply_yaml(demo::NEXTCLOUD_DEV_LOADBALANCER).unwrap();
    lab.apply_yaml(demo::METALLB_CONFIG).unwrap();
    wait_external_ips(&lab, LB, &[VIP]);
    let pods = common::pod_names(&lab, "nextcloud-dev", 2);
    common::until_all_answer(&lab, "client", VIP_URL, &pods);
    let owner = wait_one_announcer(&lab, VIP, Duration::from_millis(300));

    // The announcer's agent, again, on a private copy of the directories.
    let private = restart_on_private_dirs(&lab, &owner);
    let again = wait_one_announcer(&lab, VIP, Duration::from_millis(1500));
    assert_eq!(
        again, owner,
        "after its restart on private directories, {owner} should announce {VIP} again"
    );
    let names: BTreeMap<String, String> = lab
        .node_names()
        .into_iter()
        .map(|n| (eth0_mac(&lab, &n), n))
        .collect();
    let owner_mac = eth0_mac(&lab, &owner);
    let others: Vec<String> = lab
        .node_names()
        .into_iter()
        .filter(|n| *n != owner)
        .collect();
    // Each agent's last "N services:" line before the load (to show later that the others
    // never got it).
    let before: BTreeMap<String, Option<usize>> = others
        .iter()
        .map(|n| (n.clone(), last_service_count(&lab, n)))
        .collect();

    // The load, written next to the private manifest directory, moved in at once.
    let staging = private.root.join("load-staging");
    let nodes = lab.node_names();
    let written = write_load(&staging, load, LOAD_ENDPOINTS, &nodes)
        .unwrap_or_else(|e| panic!("writing the load in {}: {e}", staging.display()));
    let opened = OpenWatch::new(&staging)
        .unwrap_or_else(|e| panic!("inotify on {}: {e}", staging.display()));
    let load_dir = private.manifests.join("load");

    let mut cut_guard = None;
    let (watch, arrived, sync_started, cut, cut_done, cut_ms) = std::thread::scope(|s| {
        let watcher = s.spawn(|| arp_watch(&lab, "client", vip(), SAMPLE_EVERY, WATCH, true));
        std::thread::sleep(BASELINE);
        let arrived = Instant::now();
        std::fs::rename(&staging, &load_dir).unwrap_or_else(|e| {
            panic!(
                "moving {} to {}: {e}",
                staging.display(),
                load_dir.display()
            )
        });
        if opened.wait(SYNC_START_LIMIT).is_none() {
            let _ = watcher.join();
            panic!(
                "{owner}'s agent did not open a file of the load within {SYNC_START_LIMIT:?} \
                 of its arrival: no sync began"
            );
        }
        let sync_started = Instant::now();
        let cut_ms = ms_of_day_now();
        let cut = Instant::now();
        cut_guard = Some(GossipCut::new(&lab, &owner));
        let cut_done = Instant::now();
        let w = watcher.join().expect("the ARP watch panicked");
        (w, arrived, sync_started, cut, cut_done, cut_ms)
    });

    // The samples, in milliseconds from the cut. While two MACs still answer when the watch
    // ends (today's agent: until the cut node's sync ends), keep watching, so that the output
    // shows how long it lasted (bounded).
    let from_cut = |w: &ArpWatch| -> Vec<Sample> {
        let base = w.started.map(|s| signed_ms(cut, s)).unwrap_or(0);
        w.samples
            .iter()
            .map(|(t, m)| (base + t.as_millis() as i64, m.clone()))
            .collect()
    };
    let watch_start = watch.started.expect("the watch records its start");
    let rel = |t: Instant| signed_ms(cut, t);
    let mut samples = from_cut(&watch);
    let tail_until = cut + TAIL_LIMIT;
    // (A lone answer now and then is the busy node's reply arriving after the next request.)
    let still_split = |v: &[Sample]| v.iter().rev().take(TAIL_CLEAN).any(|(_, m)| m.len() > 1);
    while still_split(&samples) && Instant::now() < tail_until {
        let w = arp_watch(&lab, "client", vip(), SAMPLE_EVERY, TAIL_STEP, true);
        samples.extend(from_cut(&w));
    }
    let tailed = samples.len() > watch.samples.len();

    println!(
        "busy announcer {owner}; the others: {}; MACs: {}",
        others.join(", "),
        names
            .iter()
            .map(|(m, n)| format!("{n} {m}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "load: {written} files, {load} Services x {LOAD_ENDPOINTS} endpoints, moved \
         into {owner}'s private manifest directory at {} ms; its sync began (first file opened) \
         at {} ms; gossip cut (UDP {MEMBER_PORT} in/out, `table inet cut`) at 0 ms, in place \
         at {} ms; ARP watch from {} ms",
        rel(arrived),
        rel(sync_started),
        rel(cut_done),
        rel(watch_start)
    );
    println!(
        "ARP timeline (one raw request every {} ms from the client; ms from the cut, \
         requests, answering MACs){}:",
        SAMPLE_EVERY.as_millis(),
        if tailed {
            " (watched on while two MACs answered)"
        } else {
            ""
        }
    );
    for line in timeline(&samples, &names) {
        println!("  {line}");
    }

    // The takeover, by the ARP samples and by the logs.
    let takeover = samples
        .iter()
        .find(|(t, macs)| *t >= 0 && macs.iter().any(|m| *m != owner_mac))
        .map(|(t, macs)| (*t, macs.clone()));
    let logged = common::any_log_since(&lab, cut_ms, &format!("announcing {VIP} on eth0"))
        .filter(|(n, _, _)| *n != owner);
    let split: Vec<&Sample> = samples.iter().filter(|(_, m)| m.len() > 1).collect();
    let split_span = match (split.first(), split.last()) {
        (Some(a), Some(b)) => Some((a.0, b.0 + SAMPLE_EVERY.as_millis() as i64)),
        _ => None,
    };
    println!(
        "takeover: first answer by another MAC {}; log: {}",
        takeover
            .as_ref()
            .map(|(t, m)| format!("at {t} ms ({})", who(m, &names)))
            .unwrap_or_else(|| "never within the watch".into()),
        logged
            .as_ref()
            .map(|(n, t, _)| format!("{n} announced at {} ms", ms_between(cut_ms, *t)))
            .unwrap_or_else(|| "no other node announced".into())
    );
    match split_span {
        Some((from, to)) => println!(
            "SPLIT BRAIN: {} of {} requests answered by two MACs, from {from} ms to {to} ms \
             after the cut ({} ms){}",
            split.len(),
            samples.len(),
            to - from,
            if still_split(&samples) {
                " and still going when the watch ended"
            } else {
                ""
            }
        ),
        None => println!(
            "no request answered by two MACs ({} requests, {} unanswered)",
            samples.len(),
            samples.iter().filter(|(_, m)| m.is_empty()).count()
        ),
    }

    // The load reached the busy node only: its sync, when it ends, counts it (logged once it
    // is in the kernel); the others' counts did not move.
    let deadline = Instant::now() + SYNC_END_LIMIT;
    let mut synced = None;
    while Instant::now() < deadline {
        synced = service_count_since(&lab, &owner, cut_ms, load);
        if synced.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    match synced {
        Some((t, n)) => println!(
            "{owner}'s sync of {n} services ended {} ms after the cut (its log)",
            ms_between(cut_ms, t)
        ),
        None => println!(
            "(no \"N services:\" line with N >= {load} in {owner}'s log within \
             {SYNC_END_LIMIT:?}: its sync did not end, or the log says it differently)"
        ),
    }
    let withdraw = format!("withdrawing {VIP} from");
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if let Some((t, _)) = log_line_since(&lab, &owner, cut_ms, &withdraw) {
            println!(
                "{owner} withdrew {VIP} {} ms after the cut (its log)",
                ms_between(cut_ms, t)
            );
            break;
        }
        if Instant::now() >= deadline {
            println!("({owner}'s log does not say it withdrew {VIP})");
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for n in &others {
        let after = last_service_count(&lab, n);
        println!(
            "{n}: services in its last sync line before the load {:?}, now {after:?}",
            before[n]
        );
        assert!(
            after.unwrap_or(0) < load,
            "{n} got the load: its log counts {after:?} services"
        );
    }
    drop(cut_guard);

    assert!(
        split.is_empty(),
        "{} ARP requests were answered by two MACs, from {:?} ms after the cut: {owner} kept \
         answering for {VIP} while another node had taken it over",
        split.len(),
        split_span
    );
    let (t_take, _) = takeover.expect("no other node answered for the address after the cut");
    assert!(
        t_take < TAKEOVER_LIMIT.as_millis() as i64,
        "another node answered only {t_take} ms after the cut (limit {TAKEOVER_LIMIT:?})"
    );
    let (new_owner, _, _) = logged.expect("another node's log says it announces the address");
    assert_ne!(new_owner, owner);
    // And it still does at the end, alone (the cut node, still cut off, stays quiet).
    let last = samples.last().map(|(_, m)| m.clone()).unwrap_or_default();
    assert_eq!(
        last,
        [eth0_mac(&lab, &new_owner)].into(),
        "the last request was answered by {}, wanted {new_owner} alone",
        who(&last, &names)
    );
}

/// An ARP request: when it was sent (ms from the cut) and the MACs that answered it.
type Sample = (i64, BTreeSet<String>);

fn vip() -> Ipv4Addr {
    VIP.parse().unwrap()
}

/// Signed milliseconds from `a` to `b`.
fn signed_ms(a: Instant, b: Instant) -> i64 {
    if b >= a {
        (b - a).as_millis() as i64
    } else {
        -((a - b).as_millis() as i64)
    }
}

/// "node (mac)" for each MAC of a set, or "-" for none.
fn who(macs: &BTreeSet<String>, names: &BTreeMap<String, String>) -> String {
    if macs.is_empty() {
        return "-".into();
    }
    macs.iter()
        .map(|m| match names.get(m) {
            Some(n) => format!("{n} ({m})"),
            None => format!("? ({m})"),
        })
        .collect::<Vec<_>>()
        .join(" + ")
}

/// The samples as a compact timeline: stretches of requests answered by the same MACs, one
/// line each ("from .. to ms, requests, who answered (how many)"). Stretches shorter than
/// [`BLIP`] requests (a reply that arrived after the next request, under load) are counted in
/// the line of the stretch around them rather than getting a line of their own.
fn timeline(samples: &[Sample], names: &BTreeMap<String, String>) -> Vec<String> {
    // Runs of equal MAC sets: (first, last, count, set).
    let mut runs: Vec<(i64, i64, usize, &BTreeSet<String>)> = Vec::new();
    for (t, macs) in samples {
        match runs.last_mut() {
            Some((_, last, n, m)) if *m == macs => {
                *last = *t;
                *n += 1;
            }
            _ => runs.push((*t, *t, 1, macs)),
        }
    }
    // Stretches: a run of BLIP or more with another set starts a new one.
    struct Stretch<'a> {
        from: i64,
        to: i64,
        lead: &'a BTreeSet<String>,
        counts: BTreeMap<&'a BTreeSet<String>, usize>,
    }
    let mut out = Vec::new();
    let mut cur: Option<Stretch> = None;
    for (a, b, n, m) in runs {
        match &mut cur {
            Some(c) if n < BLIP || c.lead == m => {
                c.to = b;
                *c.counts.entry(m).or_default() += n;
            }
            _ => {
                if let Some(c) = cur.take() {
                    out.push(stretch_line(c.from, c.to, &c.counts, names));
                }
                cur = Some(Stretch {
                    from: a,
                    to: b,
                    lead: m,
                    counts: [(m, n)].into(),
                });
            }
        }
    }
    if let Some(c) = cur {
        out.push(stretch_line(c.from, c.to, &c.counts, names));
    }
    out
}

/// Runs shorter than this are folded into the stretch around them (see [`timeline`]).
const BLIP: usize = 3;

fn stretch_line(
    a: i64,
    b: i64,
    counts: &BTreeMap<&BTreeSet<String>, usize>,
    names: &BTreeMap<String, String>,
) -> String {
    let total: usize = counts.values().sum();
    let mut by: Vec<(&&BTreeSet<String>, &usize)> = counts.iter().collect();
    by.sort_by(|x, y| y.1.cmp(x.1));
    let who = by
        .iter()
        .map(|(m, n)| format!("{} ({n})", node_names(m, names)))
        .collect::<Vec<_>>()
        .join(", ");
    let mark = if counts.keys().any(|m| m.len() > 1) {
        "  <-- TWO MACs"
    } else {
        ""
    };
    format!("{a:>6} .. {b:>6} ms  {total:>4}  {who}{mark}")
}

/// "node + node" for a set of MACs, "nobody" for none.
fn node_names(macs: &BTreeSet<String>, names: &BTreeMap<String, String>) -> String {
    if macs.is_empty() {
        return "nobody".into();
    }
    macs.iter()
        .map(|m| names.get(m).cloned().unwrap_or_else(|| m.clone()))
        .collect::<Vec<_>>()
        .join(" + ")
}

/// The busy node's private directories (under the lab's directory, removed with it).
struct Private {
    root: PathBuf,
    manifests: PathBuf,
}

/// Stops `node`'s agent and starts it again with a copy of the lab's manifest and state
/// directories of its own, the way the lab starts agents otherwise (same log and PID file, so
/// the lab's helpers and `down` see it).
fn restart_on_private_dirs(lab: &Lab, node: &str) -> Private {
    let ctx = lab.ctx();
    lab.agent_stop(node).expect("stopping the agent");
    let root = lab.dir().join(format!("busy-{node}"));
    let manifests = root.join("manifests");
    let state = root.join("state");
    std::fs::create_dir_all(&root).unwrap();
    copy_dir(&ctx.manifests(), &manifests);
    copy_dir(&ctx.state_dir(), &state);
    let mut args = ferry_lab::topology::agent_args(ctx, node);
    for (flag, value) in [("--manifests", &manifests), ("--state-dir", &state)] {
        let i = args
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("the lab's agent arguments have no {flag}: {args:?}"));
        args[i + 1] = value.display().to_string();
    }
    let ns = ns_of(lab, node);
    let log = ctx.agent_log(node);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&log)
        .unwrap();
    writeln!(
        f,
        "--- e2e_l2_busy: ip netns exec {ns} {FERRY} {}",
        args.join(" ")
    )
    .unwrap();
    let pid = ferry_lab::topology::spawn_in_ns(&ns, Path::new(FERRY), &args, &log)
        .expect("starting the agent");
    ferry_lab::state::write_atomic(&ctx.agent_pid_file(node), format!("{pid}\n").as_bytes())
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        lab.agent_pid(node) == Some(pid),
        "the agent on {node} (pid {pid}) exited at once:\n{}",
        lab.agent_log(node)
    );
    Private { root, manifests }
}

/// `cp -a FROM TO`.
fn copy_dir(from: &Path, to: &Path) {
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()
        .expect("running cp");
    assert!(
        out.status.success(),
        "cp -a {} {}: {}",
        from.display(),
        to.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes `services` ClusterIP Services in namespace `default`, each with an EndpointSlice of
/// `endpoints` ready endpoints spread over `nodes`, into new files under `dir` ([`PER_FILE`]
/// Services per file). The number of files.
fn write_load(
    dir: &Path,
    services: usize,
    endpoints: usize,
    nodes: &[String],
) -> std::io::Result<usize> {
    std::fs::create_dir_all(dir)?;
    let mut files = 0;
    for chunk in 0..services.div_ceil(PER_FILE) {
        let mut text = String::new();
        for i in chunk * PER_FILE..((chunk + 1) * PER_FILE).min(services) {
            let name = format!("busy-{i:05}");
            text.push_str(&format!(
                "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  \
                 namespace: default\nspec:\n  type: ClusterIP\n  ports:\n  - name: http\n    \
                 port: 80\n    targetPort: 8080\n"
            ));
            text.push_str(&format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  \
                 name: {name}-load\n  namespace: default\n  labels:\n    \
                 kubernetes.io/service-name: {name}\naddressType: IPv4\nendpoints:\n"
            ));
            for e in 0..endpoints {
                let k = i * endpoints + e;
                let node = e % nodes.len().max(1);
                text.push_str(&format!(
                    "- addresses: [\"10.42.{node}.{}\"]\n  conditions: {{ready: true}}\n  \
                     nodeName: {}\n",
                    2 + k % 250,
                    nodes.get(node).map(String::as_str).unwrap_or("none")
                ));
            }
            text.push_str("ports:\n- name: http\n  protocol: TCP\n  port: 8080\n");
        }
        std::fs::write(dir.join(format!("load-{chunk:03}.yaml")), text)?;
        files += 1;
    }
    Ok(files)
}

/// The number in the last "N services: ..." line of a node's log (the agent logs one per sync
/// that changed something).
fn last_service_count(lab: &Lab, node: &str) -> Option<usize> {
    log_lines(lab, node)
        .into_iter()
        .rev()
        .find_map(|(_, m)| service_count(&m))
}

/// The first "N services: ..." line since `since` with N >= `min`: (time, N).
fn service_count_since(lab: &Lab, node: &str, since: u64, min: usize) -> Option<(u64, usize)> {
    log_lines(lab, node)
        .into_iter()
        .filter(|(t, _)| ms_between(since, *t) >= 0)
        .filter_map(|(t, m)| service_count(&m).map(|n| (t, n)))
        .find(|(_, n)| *n >= min)
}

fn service_count(line: &str) -> Option<usize> {
    let (n, _) = line.split_once(" services: ")?;
    n.parse().ok()
}

/// Drops the agents' gossip (UDP [`MEMBER_PORT`], both directions) in a node's namespace with a
/// table of the test's own, `table inet cut` (ferry's `inet ferry` is left alone); deleted on
/// drop.
struct GossipCut<'a> {
    lab: &'a Lab,
    node: String,
}

impl<'a> GossipCut<'a> {
    fn new(lab: &'a Lab, node: &str) -> GossipCut<'a> {
        let p = MEMBER_PORT;
        let rules = format!(
            "table inet cut {{\n  \
               chain input {{\n    type filter hook input priority -400; policy accept;\n    \
                 udp dport {p} drop\n    udp sport {p} drop\n  }}\n  \
               chain output {{\n    type filter hook output priority -400; policy accept;\n    \
                 udp dport {p} drop\n    udp sport {p} drop\n  }}\n}}\n"
        );
        run_ok(lab, node, &["nft", &rules]);
        GossipCut {
            lab,
            node: node.to_string(),
        }
    }
}

impl Drop for GossipCut<'_> {
    fn drop(&mut self) {
        let _ = self
            .lab
            .exec(&self.node, &["nft", "delete", "table", "inet", "cut"]);
    }
}

/// An inotify watch for files opened in one directory (the agent opening the load's files is
/// the moment its sync begins: finding the change only stats them).
struct OpenWatch {
    fd: libc::c_int,
}

impl OpenWatch {
    fn new(dir: &Path) -> std::io::Result<OpenWatch> {
        // SAFETY: plain syscalls on a descriptor this struct owns (closed on drop).
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let watch = OpenWatch { fd };
        let path = CString::new(dir.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        // SAFETY: a valid descriptor and a NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(fd, path.as_ptr(), libc::IN_OPEN) };
        if wd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(watch)
    }

    /// Waits (bounded) until a file (not the directory itself) is opened; its name.
    fn wait(&self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut pfd = libc::pollfd {
                fd: self.fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd, valid for the call.
            let rc = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as libc::c_int) };
            if rc <= 0 {
                continue;
            }
            // SAFETY: reading into a buffer we own, of the length given.
            let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                continue;
            }
            let mut off = 0usize;
            let head = std::mem::size_of::<libc::inotify_event>();
            while off + head <= n as usize {
                // SAFETY: the kernel wrote whole events; read_unaligned copes with alignment.
                let ev: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buf[off..].as_ptr().cast()) };
                let name_bytes = &buf[off + head..(off + head + ev.len as usize).min(n as usize)];
                let name = String::from_utf8_lossy(name_bytes)
                    .trim_end_matches('\0')
                    .to_string();
                if ev.mask & libc::IN_ISDIR == 0 && !name.is_empty() {
                    return Some(name);
                }
                off += head + ev.len as usize;
            }
        }
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        // SAFETY: closing the descriptor we own, once.
        unsafe { libc::close(self.fd) };
    }
}
