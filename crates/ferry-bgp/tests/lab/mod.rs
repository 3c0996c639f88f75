//! The lab the interop tests share: a router namespace `<p>-r` with bridge br0 (10.96.0.1/24,
//! fd00:96::1/64) running a routing daemon (BIRD 2 or FRR: its own config, control socket and
//! pid file, started and killed by PID), node namespaces `<p>-nI` (eth0 10.96.0.1I/24,
//! fd00:96::1I/64) each running `ferry-bgp-peer`. Everything a lab starts is killed by PID and
//! every namespace deleted when it drops, also on panic.
#![allow(dead_code)]

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub static NEXT: AtomicUsize = AtomicUsize::new(0);

pub const ROUTER_ASN: u32 = 64600;
pub const NODE_ASN: u32 = 64601;
pub const VIP4: &str = "10.96.200.1";
pub const VIP6: &str = "fd00:96:200::1";

pub fn run(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

pub fn must(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The routing daemon in the router namespace.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Router {
    /// BIRD 2 (Debian `bird2`).
    Bird,
    /// FRR's zebra and bgpd (Debian `frr`).
    Frr,
    /// GoBGP (Debian `gobgpd`): a peer with a RIB, no FIB.
    Gobgp,
}

const FRR: &str = "/usr/lib/frr";

/// Root and the router's daemon installed; else the test skips (fails under CI).
pub fn ready(test: &str, router: Router) -> bool {
    if !ferry_testkit::require_root(test) {
        return false;
    }
    let (check, package) = match router {
        Router::Bird => ("command -v bird && command -v birdc".to_string(), "bird2"),
        Router::Frr => (
            format!("test -x {FRR}/zebra && test -x {FRR}/bgpd && command -v vtysh"),
            "frr",
        ),
        Router::Gobgp => (
            "command -v gobgpd && command -v gobgp".to_string(),
            "gobgpd",
        ),
    };
    let found = Command::new("sh")
        .args(["-c", &check])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        ferry_testkit::skip(
            test,
            &format!("{package} is not installed (scripts/install-deps.sh)"),
        );
    }
    found
}

/// How the router peers with one node.
#[derive(Clone, Default)]
pub struct NodePeer {
    /// The node's ASN as BIRD expects it (default NODE_ASN; ROUTER_ASN for iBGP).
    pub asn: Option<u32>,
    pub password: Option<&'static str>,
    /// The session over IPv6 (fd00:96::1 to fd00:96::1I) instead of IPv4 (BIRD only).
    pub ipv6: bool,
}

/// A router namespace `<p>-r` with bridge br0 (10.96.0.1/24, fd00:96::1/64) and node
/// namespaces `<p>-nI` (eth0: 10.96.0.1I/24, fd00:96::1I/64) for I = 1..; BIRD or FRR in
/// the router.
pub struct Lab {
    prefix: String,
    dir: PathBuf,
    pub kind: Router,
    namespaces: Vec<String>,
    /// The router's daemons, killed last first.
    daemons: Vec<Child>,
    speakers: Vec<Option<Child>>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in self.speakers.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for d in self.daemons.iter_mut().rev() {
            let _ = d.kill();
            let _ = d.wait();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = run(&["ip", "netns", "del", ns]);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

pub fn node_addr(i: usize) -> String {
    format!("10.96.0.1{i}")
}

impl Lab {
    pub fn new(kind: Router, nodes: &[NodePeer]) -> Lab {
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
            kind,
            namespaces: Vec::new(),
            daemons: Vec::new(),
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
        match kind {
            Router::Bird => lab.start_bird(nodes),
            Router::Frr => lab.start_frr(nodes),
            Router::Gobgp => lab.start_gobgp(nodes),
        }
        lab
    }

    pub fn router(&self) -> String {
        format!("{}-r", self.prefix)
    }

    pub fn node(&self, i: usize) -> String {
        format!("{}-n{i}", self.prefix)
    }

    fn netns(&mut self, name: &str) {
        must(&["ip", "netns", "add", name]);
        self.namespaces.push(name.to_string());
        must(&["ip", "-n", name, "link", "set", "lo", "up"]);
    }

    pub fn sock(&self) -> String {
        self.dir.join("bird.ctl").display().to_string()
    }

    pub fn start_bird(&mut self, nodes: &[NodePeer]) {
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
  local {local} as {ROUTER_ASN}; neighbor {nb} as {asn}; {pw} {direct}
  hold time 9; connect delay time 1; connect retry time 1; error wait time 1, 2;
  ipv4 {{ import all; export none; }};
  ipv6 {{ import all; export none; }};
}}
",
                nb = if n.ipv6 {
                    format!("fd00:96::1{i}")
                } else {
                    node_addr(i)
                },
                local = if n.ipv6 { "fd00:96::1" } else { "10.96.0.1" },
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
        self.daemons.push(child);
        let sock = self.sock();
        let up = measure(Duration::from_secs(5), || {
            run(&["birdc", "-s", &sock, "show", "status"])
                .status
                .success()
        });
        assert!(up.is_some(), "BIRD did not start: {}", self.log("bird.err"));
    }

    pub fn birdc(&self, cmd: &str) -> String {
        let mut a = vec!["birdc", "-s"];
        let sock = self.sock();
        a.push(&sock);
        a.extend(cmd.split_whitespace());
        must(&a)
    }

    /// Starts ferry-bgp-peer in node `i` (killing one already running there).
    pub fn speaker(&mut self, i: usize, extra: &[&str]) {
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
            "--hold-time".into(),
            "9".into(),
            "--connect-retry".into(),
            "1".into(),
        ];
        if !extra.contains(&"--peer") {
            args.extend([
                "--peer".into(),
                format!("10.96.0.1,{ROUTER_ASN}"),
                "--next-hop-v6".into(),
                format!("fd00:96::1{i}"),
            ]);
        }
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
    pub fn stop_speaker(&mut self, i: usize, signal: Option<i32>) {
        if let Some(mut c) = self.speakers[i - 1].take() {
            let sig = signal.unwrap_or(libc::SIGKILL);
            // SAFETY: kill(2) on the PID of a child not reaped yet (so not reused).
            unsafe { libc::kill(c.id() as libc::pid_t, sig) };
            let _ = c.wait();
        }
    }

    pub fn established(&self, i: usize) -> bool {
        match self.kind {
            Router::Bird => self
                .birdc(&format!("show protocols n{i}"))
                .contains("Established"),
            Router::Frr => self
                .vtysh(&format!("show bgp neighbors {}", node_addr(i)))
                .contains("BGP state = Established"),
            Router::Gobgp => self
                .gobgp(&format!("neighbor {}", node_addr(i)))
                .contains("BGP state = ESTABLISHED"),
        }
    }

    /// GoBGP's view: `gobgp ARGS` in the router namespace (its API on the namespace's own
    /// loopback).
    pub fn gobgp(&self, args: &str) -> String {
        let r = self.router();
        let mut a = vec!["ip", "netns", "exec", &r, "gobgp"];
        a.extend(args.split_whitespace());
        let out = run(&a);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn start_gobgp(&mut self, nodes: &[NodePeer]) {
        let mut conf = String::from(
            "[global.config]\n  as = 64600\n  router-id = \"10.96.0.1\"\n  local-address-list = [\"10.96.0.1\"]\n",
        );
        for (i, n) in nodes.iter().enumerate() {
            let a = node_addr(i + 1);
            let asn = n.asn.unwrap_or(NODE_ASN);
            conf += &format!(
                "[[neighbors]]\n  [neighbors.config]\n    neighbor-address = \"{a}\"\n    peer-as = {asn}\n"
            );
            if let Some(pw) = n.password {
                conf += &format!("    auth-password = \"{pw}\"\n");
            }
            conf += "  [neighbors.timers.config]\n    connect-retry = 1\n    hold-time = 9\n    keepalive-interval = 3\n    idle-hold-time-after-reset = 1\n";
            conf += "  [neighbors.graceful-restart.config]\n    enabled = true\n    helper-only = true\n";
            for fam in ["ipv4-unicast", "ipv6-unicast"] {
                conf += &format!("  [[neighbors.afi-safis]]\n    [neighbors.afi-safis.config]\n      afi-safi-name = \"{fam}\"\n    [neighbors.afi-safis.mp-graceful-restart.config]\n      enabled = true\n");
            }
        }
        let path = self.dir.join("gobgpd.toml");
        fs::write(&path, conf).unwrap();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.router(),
                "gobgpd",
                "--pprof-disable",
                "-f",
            ])
            .arg(&path)
            .stdout(fs::File::create(self.dir.join("gobgpd.log")).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("start gobgpd");
        self.daemons.push(child);
        let up = measure(Duration::from_secs(5), || {
            self.gobgp("neighbor").contains(&node_addr(1))
        });
        assert!(
            up.is_some(),
            "gobgpd did not start: {}",
            self.log("gobgpd.log")
        );
    }

    /// FRR's view: `vtysh -c CMD` against this lab's daemons.
    pub fn vtysh(&self, cmd: &str) -> String {
        let dir = self.dir.join("frr").display().to_string();
        let out = run(&["vtysh", "--vty_socket", &dir, "-c", cmd]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn start_frr(&mut self, nodes: &[NodePeer]) {
        let dir = self.dir.join("frr");
        fs::create_dir_all(&dir).unwrap();
        // The daemons drop to user frr: it must write its sockets and pid files here.
        must(&["chown", "-R", "frr:frr", &self.dir.display().to_string()]);
        let mut conf = String::from(
            "frr defaults traditional
hostname router
router bgp 64600
 bgp router-id 10.96.0.1
 no bgp ebgp-requires-policy
",
        );
        let mut v6 = String::new();
        for (i, n) in nodes.iter().enumerate() {
            let a = node_addr(i + 1);
            let asn = n.asn.unwrap_or(NODE_ASN);
            conf += &format!(" neighbor {a} remote-as {asn}\n neighbor {a} timers 3 9\n neighbor {a} timers connect 1\n");
            if let Some(pw) = n.password {
                conf += &format!(" neighbor {a} password {pw}\n");
            }
            v6 += &format!("  neighbor {a} activate\n");
        }
        conf += " address-family ipv4 unicast\n  maximum-paths 8\n  maximum-paths ibgp 8\n exit-address-family\n";
        conf +=
            &format!(" address-family ipv6 unicast\n{v6}  maximum-paths 8\n exit-address-family\n");
        fs::write(dir.join("bgpd.conf"), conf).unwrap();
        fs::write(dir.join("zebra.conf"), "hostname router\n").unwrap();
        for daemon in ["zebra", "bgpd"] {
            let d = dir.display().to_string();
            let child = Command::new("ip")
                .args(["netns", "exec", &self.router()])
                .arg(format!("{FRR}/{daemon}"))
                .args(["-N", &self.prefix, "-u", "frr", "-g", "frr"])
                .args(["-f", &format!("{d}/{daemon}.conf")])
                .args(["-i", &format!("{d}/{daemon}.pid")])
                .args(["-z", &format!("{d}/zserv.api")])
                .args(["--vty_socket", &d])
                .stdout(Stdio::null())
                .stderr(fs::File::create(dir.join(format!("{daemon}.err"))).unwrap())
                .spawn()
                .expect("start FRR");
            self.daemons.push(child);
            let sock = dir.join(format!("{daemon}.vty"));
            let up = measure(Duration::from_secs(5), || sock.exists());
            assert!(
                up.is_some(),
                "FRR {daemon} did not start: {}",
                self.log(&format!("frr/{daemon}.err"))
            );
        }
    }

    pub fn kernel_route(&self, addr: &str) -> String {
        let v6 = if addr.contains(':') { "-6" } else { "-4" };
        must(&["ip", "-n", &self.router(), v6, "route", "show", addr])
    }

    pub fn log(&self, name: &str) -> String {
        fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    pub fn dump(&self) -> String {
        let router = match self.kind {
            Router::Bird => format!(
                "--- birdc show protocols all\n{}\n--- show route all\n{}",
                self.birdc("show protocols all"),
                self.birdc("show route all")
            ),
            Router::Frr => format!(
                "--- show bgp summary\n{}\n--- show bgp ipv4\n{}",
                self.vtysh("show bgp summary"),
                self.vtysh("show bgp ipv4 unicast")
            ),
            Router::Gobgp => format!(
                "--- gobgp neighbor\n{}\n--- global rib\n{}\n--- gobgpd.log\n{}",
                self.gobgp("neighbor"),
                self.gobgp("global rib -a ipv4"),
                self.log("gobgpd.log")
            ),
        };
        format!(
            "{router}\n--- n1.log\n{}\n--- n2.log\n{}",
            self.log("n1.log"),
            self.log("n2.log"),
        )
    }
}

pub fn wait(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out after {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls until `f` holds; the time it took.
pub fn measure(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
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
pub fn nexthops(route: &str) -> Vec<String> {
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

pub fn routes_listed(route: &str, prefix: &str) -> usize {
    route.lines().filter(|l| l.starts_with(prefix)).count()
}

pub const ROUTES: [&str; 4] = ["--route", "10.96.200.1/32", "--route", "fd00:96:200::1/128"];

/// Two nodes announcing VIP4 and VIP6 (plus `extra` flags each), both sessions up and the
/// kernel's ECMP route in place.
pub fn ecmp_lab(kind: Router, nodes: &[NodePeer], extra: [&[&str]; 2]) -> Lab {
    let mut lab = Lab::new(kind, nodes);
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
