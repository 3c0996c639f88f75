//! Interoperability with BIRD 2 (Debian `bird2`): a router namespace running BIRD (its own
//! config, control socket and pid file; started and killed by PID) on a bridge with node
//! namespaces, each running `ferry-bgp-peer`. The router's kernel FIB is checked with
//! `ip -n ROUTER route`, BIRD's view with `birdc -s SOCKET show route all`.
//!
//! Needs root and bird2 (scripts/install-deps.sh); without them each test prints
//! `ferry-test-skipped: ...` and passes, unless CI is set: then it fails. Everything a test
//! starts is killed by PID and every namespace deleted when its lab drops, also on panic.
//!
//! Run: `cargo test -p ferry-bgp --test bird -- --test-threads 1 --nocapture`

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicUsize = AtomicUsize::new(0);

const ROUTER_ASN: u32 = 64600;
const NODE_ASN: u32 = 64601;
const VIP4: &str = "10.96.200.1";
const VIP6: &str = "fd00:96:200::1";

fn run(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn must(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ready(test: &str) -> bool {
    if !ferry_testkit::require_root(test) {
        return false;
    }
    let found = Command::new("sh")
        .args(["-c", "command -v bird && command -v birdc"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        ferry_testkit::skip(test, "bird2 is not installed (scripts/install-deps.sh)");
    }
    found
}

/// How BIRD peers with one node.
#[derive(Clone, Default)]
struct NodePeer {
    /// The node's ASN as BIRD expects it (default NODE_ASN; ROUTER_ASN for iBGP).
    asn: Option<u32>,
    password: Option<&'static str>,
}

/// A router namespace `<p>-r` with bridge br0 (10.96.0.1/24, fd00:96::1/64) and node
/// namespaces `<p>-nI` (eth0: 10.96.0.1I/24, fd00:96::1I/64) for I = 1..; BIRD in the router.
struct Lab {
    prefix: String,
    dir: PathBuf,
    namespaces: Vec<String>,
    bird: Option<Child>,
    speakers: Vec<Option<Child>>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in self.speakers.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(b) = &mut self.bird {
            let _ = b.kill();
            let _ = b.wait();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = run(&["ip", "netns", "del", ns]);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn node_addr(i: usize) -> String {
    format!("10.96.0.1{i}")
}

impl Lab {
    fn new(nodes: &[NodePeer]) -> Lab {
        let prefix = format!(
            "fbgp{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(&prefix);
        fs::create_dir_all(&dir).unwrap();
        let mut lab = Lab {
            prefix: prefix.clone(),
            dir,
            namespaces: Vec::new(),
            bird: None,
            speakers: Vec::new(),
        };
        let r = lab.router();
        lab.netns(&r);
        let ip = |args: &str| {
            let mut a = vec!["ip", "-n", &r];
            a.extend(args.split_whitespace());
            must(&a);
        };
        ip("link add br0 type bridge");
        ip("link set br0 up");
        ip("addr add 10.96.0.1/24 dev br0");
        ip("addr add fd00:96::1/64 dev br0 nodad");
        for key in ["iptables", "ip6tables", "arptables"] {
            // Bridge netfilter may not be there at all: then nothing to turn off.
            let _ = run(&[
                "ip",
                "netns",
                "exec",
                &r,
                "sysctl",
                "-qw",
                &format!("net.bridge.bridge-nf-call-{key}=0"),
            ]);
        }
        for i in 1..=nodes.len() {
            let n = lab.node(i);
            lab.netns(&n);
            ip(&format!("link add v{i} type veth peer name eth0 netns {n}"));
            ip(&format!("link set v{i} master br0 up"));
            let nip = |args: String| {
                let mut a = vec!["ip", "-n", &n];
                a.extend(args.split_whitespace());
                must(&a);
            };
            nip("link set eth0 up".into());
            nip(format!("addr add {}/24 dev eth0", node_addr(i)));
            nip(format!("addr add fd00:96::1{i}/64 dev eth0 nodad"));
            lab.speakers.push(None);
        }
        lab.start_bird(nodes);
        lab
    }

    fn router(&self) -> String {
        format!("{}-r", self.prefix)
    }

    fn node(&self, i: usize) -> String {
        format!("{}-n{i}", self.prefix)
    }

    fn netns(&mut self, name: &str) {
        must(&["ip", "netns", "add", name]);
        self.namespaces.push(name.to_string());
        must(&["ip", "-n", name, "link", "set", "lo", "up"]);
    }

    fn sock(&self) -> String {
        self.dir.join("bird.ctl").display().to_string()
    }

    fn start_bird(&mut self, nodes: &[NodePeer]) {
        let mut conf = format!(
            "router id 10.96.0.1;
log \"{log}\" all;
protocol device {{ scan time 10; }}
protocol kernel k4 {{ ipv4 {{ export all; import none; }}; merge paths on; }}
protocol kernel k6 {{ ipv6 {{ export all; import none; }}; merge paths on; }}
",
            log = self.dir.join("bird.log").display()
        );
        for (i, n) in nodes.iter().enumerate() {
            let i = i + 1;
            let asn = n.asn.unwrap_or(NODE_ASN);
            // An internal peer's next hop is on the shared link (no IGP here to resolve it).
            let direct = if asn == ROUTER_ASN { "direct;" } else { "" };
            let pw = n
                .password
                .map(|p| format!("password \"{p}\";"))
                .unwrap_or_default();
            // Short waits so that tests do not sit out BIRD's defaults (5 s, 60-300 s).
            conf += &format!(
                "protocol bgp n{i} {{
  local 10.96.0.1 as {ROUTER_ASN}; neighbor {nb} as {asn}; {pw} {direct}
  hold time 9; connect delay time 1; connect retry time 1; error wait time 1, 2;
  ipv4 {{ import all; export none; }};
  ipv6 {{ import all; export none; }};
}}
",
                nb = node_addr(i)
            );
        }
        let path = self.dir.join("bird.conf");
        fs::write(&path, conf).unwrap();
        let pid = self.dir.join("bird.pid");
        // `ip netns exec` execs BIRD: the child's PID is BIRD's.
        let child = Command::new("ip")
            .args(["netns", "exec", &self.router(), "bird", "-f", "-c"])
            .arg(&path)
            .arg("-s")
            .arg(self.sock())
            .arg("-P")
            .arg(&pid)
            .stdout(Stdio::null())
            .stderr(fs::File::create(self.dir.join("bird.err")).unwrap())
            .spawn()
            .expect("start bird");
        self.bird = Some(child);
        let sock = self.sock();
        let up = measure(Duration::from_secs(5), || {
            run(&["birdc", "-s", &sock, "show", "status"])
                .status
                .success()
        });
        assert!(up.is_some(), "BIRD did not start: {}", self.log("bird.err"));
    }

    fn birdc(&self, cmd: &str) -> String {
        let mut a = vec!["birdc", "-s"];
        let sock = self.sock();
        a.push(&sock);
        a.extend(cmd.split_whitespace());
        must(&a)
    }

    /// Starts ferry-bgp-peer in node `i` (killing one already running there).
    fn speaker(&mut self, i: usize, extra: &[&str]) {
        self.stop_speaker(i, None);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("n{i}.log")))
            .unwrap();
        let addr = node_addr(i);
        let mut args: Vec<String> = vec![
            "netns".into(),
            "exec".into(),
            self.node(i),
            env!("CARGO_BIN_EXE_ferry-bgp-peer").into(),
            "--router-id".into(),
            addr.clone(),
            "--peer".into(),
            format!("10.96.0.1,{ROUTER_ASN}"),
            "--hold-time".into(),
            "9".into(),
            "--connect-retry".into(),
            "1".into(),
            "--next-hop-v6".into(),
            format!("fd00:96::1{i}"),
        ];
        if !extra.contains(&"--local-asn") {
            args.extend(["--local-asn".into(), NODE_ASN.to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new("ip")
            .args(&args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start ferry-bgp-peer");
        self.speakers[i - 1] = Some(child);
    }

    /// Stops node `i`'s speaker with `signal` (None: SIGKILL and no questions).
    fn stop_speaker(&mut self, i: usize, signal: Option<i32>) {
        if let Some(mut c) = self.speakers[i - 1].take() {
            let sig = signal.unwrap_or(libc::SIGKILL);
            // SAFETY: kill(2) on the PID of a child not reaped yet (so not reused).
            unsafe { libc::kill(c.id() as libc::pid_t, sig) };
            let _ = c.wait();
        }
    }

    fn established(&self, i: usize) -> bool {
        self.birdc(&format!("show protocols n{i}"))
            .contains("Established")
    }

    fn kernel_route(&self, addr: &str) -> String {
        let v6 = if addr.contains(':') { "-6" } else { "-4" };
        must(&["ip", "-n", &self.router(), v6, "route", "show", addr])
    }

    fn log(&self, name: &str) -> String {
        fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    fn dump(&self) -> String {
        format!(
            "--- birdc show protocols all\n{}\n--- show route all\n{}\n--- n1.log\n{}\n--- n2.log\n{}",
            self.birdc("show protocols all"),
            self.birdc("show route all"),
            self.log("n1.log"),
            self.log("n2.log"),
        )
    }
}

fn wait(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out after {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls until `f` holds; the time it took.
fn measure(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// The kernel route's next hops ("nexthop via X" lines, or the single "via X").
fn nexthops(route: &str) -> Vec<String> {
    let mut out: Vec<String> = route
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "via")
        .map(|w| w[1].to_string())
        .collect();
    out.sort();
    out
}

fn routes_listed(route: &str, prefix: &str) -> usize {
    route.lines().filter(|l| l.starts_with(prefix)).count()
}

const ROUTES: [&str; 4] = ["--route", "10.96.200.1/32", "--route", "fd00:96:200::1/128"];

fn ecmp_lab(nodes: &[NodePeer], extra: [&[&str]; 2]) -> Lab {
    let mut lab = Lab::new(nodes);
    for i in 1..=2 {
        let mut args = ROUTES.to_vec();
        args.extend_from_slice(extra[i - 1]);
        lab.speaker(i, &args);
    }
    wait(Duration::from_secs(10), "both sessions Established", || {
        lab.established(1) && lab.established(2)
    });
    wait(Duration::from_secs(5), "ECMP route in the kernel", || {
        nexthops(&lab.kernel_route(VIP4)).len() == 2
    });
    lab
}

#[test]
fn two_nodes_give_one_ecmp_route_v4_and_v6() {
    if !ready("two_nodes_give_one_ecmp_route_v4_and_v6") {
        return;
    }
    let lab = ecmp_lab(&[NodePeer::default(), NodePeer::default()], [&[], &[]]);
    let bird = lab.birdc(&format!("show route {VIP4}/32 all"));
    assert!(
        bird.contains("via 10.96.0.11") && bird.contains("via 10.96.0.12"),
        "{}",
        lab.dump()
    );
    assert!(bird.contains(&format!("BGP.as_path: {NODE_ASN}")), "{bird}");
    let k4 = lab.kernel_route(VIP4);
    assert_eq!(routes_listed(&k4, VIP4), 1, "one route: {k4}");
    assert_eq!(nexthops(&k4), ["10.96.0.11", "10.96.0.12"], "{k4}");
    // IPv6 over MP-BGP (on the IPv4 sessions), next hops on the shared link.
    wait(Duration::from_secs(5), "IPv6 ECMP route", || {
        nexthops(&lab.kernel_route(VIP6)).len() == 2
    });
    let k6 = lab.kernel_route(VIP6);
    assert_eq!(routes_listed(&k6, VIP6), 1, "{k6}");
    assert_eq!(nexthops(&k6), ["fd00:96::11", "fd00:96::12"], "{k6}");
    let b6 = lab.birdc(&format!("show route {VIP6}/128 all"));
    assert!(b6.contains("BGP.next_hop: fd00:96::11"), "{b6}");
    println!("ECMP:\n{k4}{k6}");
}

#[test]
fn attributes_arrive_as_configured() {
    if !ready("attributes_arrive_as_configured") {
        return;
    }
    // Node 1 internal (LOCAL_PREF goes to internal peers only), node 2 external.
    let ibgp = NodePeer {
        asn: Some(ROUTER_ASN),
        ..NodePeer::default()
    };
    let mut lab = Lab::new(&[ibgp, NodePeer::default()]);
    let attrs = [
        "--local-pref",
        "250",
        "--med",
        "50",
        "--community",
        "64600:100",
        "--community",
        "64600:200",
        "--large-community",
        "64600:1:2",
        "--large-community",
        "4200000000:3:4",
    ];
    let mut a1 = vec!["--route", "10.96.200.1/32", "--local-asn", "64600"];
    a1.extend_from_slice(&attrs);
    lab.speaker(1, &a1);
    let mut a2 = vec!["--route", "10.96.200.2/32"];
    a2.extend_from_slice(&attrs);
    lab.speaker(2, &a2);
    wait(Duration::from_secs(10), "sessions up", || {
        lab.established(1) && lab.established(2)
    });
    wait(Duration::from_secs(5), "routes in BIRD", || {
        lab.birdc("show route").contains("10.96.200.2/32")
            && lab.birdc("show route").contains("10.96.200.1/32")
    });
    let r1 = lab.birdc("show route 10.96.200.1/32 all");
    for want in [
        "BGP.local_pref: 250",
        "BGP.med: 50",
        "BGP.community: (64600,100) (64600,200)",
        "BGP.large_community: (64600, 1, 2) (4200000000, 3, 4)",
        "BGP.origin: IGP",
        "BGP.next_hop: 10.96.0.11",
    ] {
        assert!(r1.contains(want), "iBGP route lacks {want:?}:\n{r1}");
    }
    let r2 = lab.birdc("show route 10.96.200.2/32 all");
    for want in [
        "BGP.as_path: 64601",
        "BGP.med: 50",
        "BGP.community: (64600,100) (64600,200)",
        "BGP.large_community: (64600, 1, 2) (4200000000, 3, 4)",
    ] {
        assert!(r2.contains(want), "eBGP route lacks {want:?}:\n{r2}");
    }
    // Not sent to an external peer: BIRD's default 100 stands.
    assert!(r2.contains("BGP.local_pref: 100"), "{r2}");
}

#[test]
fn md5_session_only_with_the_same_password() {
    if !ready("md5_session_only_with_the_same_password") {
        return;
    }
    let pw = NodePeer {
        password: Some("sesame-96"),
        ..NodePeer::default()
    };
    let mut lab = Lab::new(&[pw.clone(), pw]);
    lab.speaker(1, &["--route", "10.96.200.1/32", "--password", "sesame-96"]);
    lab.speaker(2, &["--route", "10.96.200.1/32", "--password", "wrong"]);
    wait(
        Duration::from_secs(10),
        "the MD5 session with the right password",
        || lab.established(1),
    );
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        !lab.established(2),
        "wrong password established:\n{}",
        lab.dump()
    );
    let k = lab.kernel_route(VIP4);
    assert_eq!(nexthops(&k), ["10.96.0.11"], "{k}");
    // With the password fixed it comes up.
    lab.speaker(2, &["--route", "10.96.200.1/32", "--password", "sesame-96"]);
    wait(Duration::from_secs(10), "the second MD5 session", || {
        lab.established(2)
    });
}

#[test]
fn sigterm_withdraws_at_once() {
    if !ready("sigterm_withdraws_at_once") {
        return;
    }
    let mut lab = ecmp_lab(&[NodePeer::default(), NodePeer::default()], [&[], &[]]);
    let start = Instant::now();
    lab.stop_speaker(1, Some(libc::SIGTERM));
    let took = measure(Duration::from_secs(3), || {
        nexthops(&lab.kernel_route(VIP4)) == ["10.96.0.12"]
    });
    let took = took.unwrap_or_else(|| panic!("not withdrawn in 3 s:\n{}", lab.dump()));
    println!(
        "SIGTERM to kernel route withdrawn: {:?} (signal to exit {:?})",
        took,
        start.elapsed() - took
    );
    assert!(took < Duration::from_secs(1), "{took:?}");
    let p = lab.birdc("show protocols all n1");
    assert!(
        p.contains("Administrative shutdown"),
        "BIRD did not get a Cease:\n{p}"
    );
    assert!(lab.log("n1.log").contains("stopping: Cease"));
}

#[test]
fn sigkill_keeps_routes_with_graceful_restart() {
    if !ready("sigkill_keeps_routes_with_graceful_restart") {
        return;
    }
    // Node 1 offers graceful restart (the default), node 2 does not.
    let mut lab = ecmp_lab(
        &[NodePeer::default(), NodePeer::default()],
        [&[], &["--graceful-restart", "0"]],
    );
    lab.stop_speaker(1, None);
    lab.stop_speaker(2, None);
    // Node 2's route goes as soon as BIRD sees the connection close; node 1's stays (stale).
    wait(Duration::from_secs(3), "node 2's path withdrawn", || {
        nexthops(&lab.kernel_route(VIP4)) == ["10.96.0.11"]
    });
    wait(Duration::from_secs(3), "BIRD sees node 1 gone", || {
        !lab.established(1)
    });
    std::thread::sleep(Duration::from_secs(2));
    let k = lab.kernel_route(VIP4);
    assert_eq!(
        nexthops(&k),
        ["10.96.0.11"],
        "stale path kept:\n{}",
        lab.dump()
    );
    let p = lab.birdc("show protocols all n1");
    assert!(p.contains("Neighbor graceful restart active"), "{p}");
    // The speaker comes back (restarted), re-announces one of its two routes and End-of-RIB:
    // BIRD ends the restart, keeps the route announced again and flushes the other.
    lab.speaker(1, &["--route", "10.96.200.1/32", "--restarted"]);
    wait(Duration::from_secs(10), "node 1 back", || {
        lab.established(1)
    });
    wait(Duration::from_secs(5), "graceful restart over", || {
        !lab.birdc("show protocols all n1")
            .contains("Neighbor graceful restart active")
    });
    wait(Duration::from_secs(3), "stale IPv6 route flushed", || {
        nexthops(&lab.kernel_route(VIP6)).is_empty()
    });
    assert_eq!(nexthops(&lab.kernel_route(VIP4)), ["10.96.0.11"]);
}
