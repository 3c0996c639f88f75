//! The responder on real interfaces: a LAN of network namespaces (a bridge and three hosts
//! a, b, c on veth pairs), the responder on host a, clients on host b (the kernel's own ARP and
//! neighbour discovery, `arping`, `ndisc6`, and raw frames built with this crate).
//!
//! Needs root. Without root every test prints why and passes, unless the environment variable
//! CI is set: then it fails. `arping` (Habets) and `ndisc6` are used when installed; without
//! them the same questions are asked with raw frames only (said on stderr). Every namespace a
//! test creates is deleted when its lab drops, also when the test fails.
//!
//! Run: `cargo test -p ferry-l2 --test netns -- --nocapture` (the measured figures are
//! printed).

use std::collections::BTreeSet;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_l2::packet::{
    solicited_node, Arp, ArpOperation, Frame, Ndp, NdpMessage, NeighborSolicitation, Payload,
    ETHERTYPE_ARP, ETHERTYPE_IPV6,
};
use ferry_l2::socket::PacketSocket;
use ferry_l2::{Config, Counters, L2Error, MacAddr, Responder};

// ---- the lab ----

static NEXT: AtomicUsize = AtomicUsize::new(0);

const HOSTS: [&str; 3] = ["a", "b", "c"];

/// The LAN: namespace `<prefix>-br` holds bridge br0; hosts a, b, c (index 1, 2, 3) each have
/// eth0 with MAC 02:00:00:77:00:0N, 192.168.77.N/24 and fd00:77::N/64. Deleted on drop.
struct Lab {
    prefix: String,
    created: Vec<String>,
}

fn root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    skip(test, "needs root (network namespaces)");
    false
}

/// Whether `tool` is installed; when it is not, the part of `test` that needs it [`skip`]s
/// (fails under CI).
fn installed(test: &str, tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        skip(
            test,
            &format!("{tool} is not installed (scripts/install-deps.sh)"),
        );
    }
    found
}

use ferry_testkit::skip;

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

fn index(host: &str) -> u8 {
    match host {
        "a" => 1,
        "b" => 2,
        "c" => 3,
        _ => panic!("no host {host}"),
    }
}

fn mac(host: &str) -> MacAddr {
    MacAddr([2, 0, 0, 0x77, 0, index(host)])
}

fn v4(host: &str) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 77, index(host))
}

fn v6(host: &str) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, u16::from(index(host)))
}

const VIP4: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 200);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x200);
const OTHER4: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 201);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x201);
const BOGUS: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x99]);

fn ips(list: &[IpAddr]) -> BTreeSet<IpAddr> {
    list.iter().copied().collect()
}

fn both() -> BTreeSet<IpAddr> {
    ips(&[VIP4.into(), VIP6.into()])
}

impl Lab {
    fn new(test: &str) -> Option<Lab> {
        if !root(test) {
            return None;
        }
        let prefix = format!(
            "fl2-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let mut lab = Lab {
            prefix,
            created: Vec::new(),
        };
        let br = lab.ns("br");
        must(&["ip", "netns", "add", &br]);
        lab.created.push(br.clone());
        must(&["ip", "-n", &br, "link", "add", "br0", "type", "bridge"]);
        must(&["ip", "-n", &br, "link", "set", "br0", "up"]);
        for family in ["iptables", "ip6tables", "arptables"] {
            // Absent when bridge netfilter is not loaded: nothing to turn off then.
            let _ = run(&[
                "ip",
                "netns",
                "exec",
                &br,
                "sysctl",
                "-qw",
                &format!("net.bridge.bridge-nf-call-{family}=0"),
            ]);
        }
        for host in HOSTS {
            let ns = lab.ns(host);
            must(&["ip", "netns", "add", &ns]);
            lab.created.push(ns.clone());
            must(&[
                "ip",
                "netns",
                "exec",
                &ns,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ]);
            must(&[
                "ip",
                "-n",
                &ns,
                "link",
                "add",
                "eth0",
                "address",
                &mac(host).to_string(),
                "type",
                "veth",
                "peer",
                "name",
                &format!("port-{host}"),
                "netns",
                &br,
            ]);
            must(&[
                "ip",
                "-n",
                &br,
                "link",
                "set",
                "dev",
                &format!("port-{host}"),
                "master",
                "br0",
                "up",
            ]);
            must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            must(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            must(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", v4(host)),
                "dev",
                "eth0",
            ]);
            must(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/64", v6(host)),
                "dev",
                "eth0",
                "nodad",
            ]);
            // A stale entry in use is probed at once (default: after 5 s).
            must(&[
                "ip",
                "netns",
                "exec",
                &ns,
                "sysctl",
                "-qw",
                "net.ipv4.neigh.eth0.delay_first_probe_time=0",
                "net.ipv6.neigh.eth0.delay_first_probe_time=0",
            ]);
        }
        Some(lab)
    }

    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// `ip netns exec <host> args...`
    fn exec(&self, host: &str, args: &[&str]) -> Output {
        let ns = self.ns(host);
        let mut full = vec!["ip", "netns", "exec", &ns];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Runs `f` on a new thread inside `host`'s network namespace (sockets it opens stay
    /// there) and returns its result.
    fn in_ns<T: Send + 'static>(&self, host: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        match self.spawn_in(host, f).join() {
            Ok(t) => t,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    fn spawn_in<T: Send + 'static>(
        &self,
        host: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let path = format!("/run/netns/{}", self.ns(host));
        std::thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns only changes this (new, short-lived) thread's network namespace;
            // the descriptor is open for the duration of the call.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
    }

    fn responder(&self, host: &str, config: Config) -> Responder {
        self.in_ns(host, move || Responder::start_with("eth0", config))
            .expect("responder starts")
    }

    /// The neighbour entry of `host` for `ip` on eth0: (MAC, state).
    fn neigh(&self, host: &str, ip: IpAddr) -> Option<(MacAddr, String)> {
        let out = self.exec(
            host,
            &["ip", "neigh", "show", &ip.to_string(), "dev", "eth0"],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let words: Vec<&str> = text.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "lladdr")?;
        let mac = words.get(at + 1)?.parse().ok()?;
        let state = words.last()?.to_string();
        Some((mac, state))
    }

    /// Polls `host`'s neighbour entry for `ip` until `want` holds; the time it took.
    fn wait_neigh(
        &self,
        host: &str,
        ip: IpAddr,
        within: Duration,
        want: impl Fn(&(MacAddr, String)) -> bool,
    ) -> Result<Duration, Option<(MacAddr, String)>> {
        let start = Instant::now();
        loop {
            let got = self.neigh(host, ip);
            if got.as_ref().is_some_and(&want) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > within {
                return Err(got);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Makes `host`'s kernel resolve `ip` (or probe it, if cached): one UDP datagram to it.
    fn poke(&self, host: &str, ip: IpAddr) {
        self.in_ns(host, move || {
            let bind = if ip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            let socket = UdpSocket::bind(bind).expect("bind udp");
            socket.send_to(b"ferry-l2", (ip, 9)).expect("send udp");
        });
    }

    /// Sends `question` from `host` on a raw socket and collects, for `wait`, every frame sent
    /// back to the asker that answers for `target` (an ARP reply from it, an NA for it).
    fn ask(&self, host: &str, question: Frame, target: IpAddr, wait: Duration) -> Vec<Frame> {
        let ethertype = question.ethertype();
        self.in_ns(host, move || {
            let socket = PacketSocket::open("eth0", ethertype).expect("raw socket");
            socket.send(&question.to_bytes()).expect("send question");
            capture(&socket, wait)
                .into_iter()
                .map(|(_, f)| f)
                .filter(|f| f.dst == question.src && answers_for(f) == Some(target))
                .collect()
        })
    }

    /// Starts capturing ARP and NDP frames on `host` for `wait` (on another thread).
    fn capture_in(&self, host: &str, wait: Duration) -> JoinHandle<Vec<(Instant, Frame)>> {
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = self.spawn_in(host, move || {
            let arp = PacketSocket::open("eth0", ETHERTYPE_ARP).expect("raw socket");
            let ipv6 = PacketSocket::open("eth0", ETHERTYPE_IPV6).expect("raw socket");
            ipv6.accept_all_multicast().expect("allmulti");
            let _ = tx.send(());
            let (a, b) = std::thread::scope(|s| {
                let a = s.spawn(|| capture(&arp, wait));
                let b = s.spawn(|| capture(&ipv6, wait));
                (a.join().expect("capture"), b.join().expect("capture"))
            });
            let mut all: Vec<(Instant, Frame)> = a.into_iter().chain(b).collect();
            all.sort_by_key(|(t, _)| *t);
            all
        });
        rx.recv().expect("capture started");
        handle
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            let out = run(&["ip", "netns", "del", ns]);
            if !out.status.success() {
                eprintln!(
                    "could not delete netns {ns}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

/// Every parseable ARP/NDP frame read from `socket` within `wait`, with when it arrived.
fn capture(socket: &PacketSocket, wait: Duration) -> Vec<(Instant, Frame)> {
    let end = Instant::now() + wait;
    let mut buf = vec![0u8; 2048];
    let mut got = Vec::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return got;
        }
        if !socket.wait_readable(left).expect("poll") {
            continue;
        }
        while let Some(r) = socket.recv(&mut buf).expect("recv") {
            let at = Instant::now();
            if let Ok(f) = Frame::parse(&buf[..r.len]) {
                got.push((at, f));
            }
        }
    }
}

/// The address a frame answers for: the sender of an ARP reply, the target of an NA.
fn answers_for(f: &Frame) -> Option<IpAddr> {
    match f.payload {
        Payload::Arp(a) if a.operation == ArpOperation::Reply => Some(a.sender_ip.into()),
        Payload::Ndp(Ndp {
            message: NdpMessage::Advertisement(na),
            ..
        }) => Some(na.target.into()),
        _ => None,
    }
}

fn arp_request(from: &str, dst: MacAddr, target: Ipv4Addr) -> Frame {
    Frame {
        dst,
        src: mac(from),
        payload: Payload::Arp(Arp {
            operation: ArpOperation::Request,
            sender_mac: mac(from),
            sender_ip: v4(from),
            target_mac: MacAddr::ZERO,
            target_ip: target,
        }),
    }
}

/// A multicast NS (to the solicited-node group), or a unicast NUD probe to `unicast_to`.
fn ns(from: &str, target: Ipv6Addr, unicast_to: Option<MacAddr>) -> Frame {
    let group = solicited_node(target);
    let (dst, ip_dst) = match unicast_to {
        Some(mac) => (mac, target),
        None => (MacAddr::ipv6_multicast(group), group),
    };
    Frame {
        dst,
        src: mac(from),
        payload: Payload::Ndp(Ndp {
            src: v6(from),
            dst: ip_dst,
            message: NdpMessage::Solicitation(NeighborSolicitation {
                target,
                source_mac: Some(mac(from)),
            }),
        }),
    }
}

/// Polls the responder's counters until `done` holds (or 2 s pass); the last snapshot.
fn settle(r: &Responder, done: impl Fn(&Counters) -> bool) -> Counters {
    let end = Instant::now() + Duration::from_secs(2);
    loop {
        let c = r.counters();
        if done(&c) || Instant::now() > end {
            return c;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

// ---- tests ----

#[test]
fn arp_requests_for_owned_addresses_are_answered_with_our_mac() {
    let Some(lab) = Lab::new("arp_requests_for_owned_addresses_are_answered_with_our_mac") else {
        return;
    };
    let r = lab.responder("a", Config::default());
    assert_eq!(r.mac(), mac("a"));
    r.set_owned(both());

    // A raw request from b: one reply, from a's MAC, unicast to b.
    let answers = lab.ask(
        "b",
        arp_request("b", MacAddr::BROADCAST, VIP4),
        VIP4.into(),
        Duration::from_millis(300),
    );
    assert_eq!(answers.len(), 1, "{answers:?}");
    let reply = answers[0];
    assert_eq!((reply.src, reply.dst), (mac("a"), mac("b")));
    let Payload::Arp(a) = reply.payload else {
        panic!("{reply:?}")
    };
    assert_eq!(
        (a.sender_mac, a.sender_ip, a.target_mac, a.target_ip),
        (mac("a"), VIP4, mac("b"), v4("b"))
    );

    if installed(
        "arp_requests_for_owned_addresses_are_answered_with_our_mac",
        "arping",
    ) {
        let out = lab.exec(
            "b",
            &[
                "arping",
                "-c",
                "1",
                "-w",
                "2",
                "-i",
                "eth0",
                &VIP4.to_string(),
            ],
        );
        let text = stdout(&out);
        assert!(out.status.success(), "arping: {text}");
        assert!(text.contains(&mac("a").to_string()), "arping: {text}");
        let time = text
            .lines()
            .find_map(|l| l.split("time=").nth(1))
            .unwrap_or("?");
        eprintln!("FIGURE arping 192.168.77.200 from b: reply in {time}");
    } else {
        eprintln!("arping not installed: checked with a raw ARP request only");
    }

    // The kernel of b resolves the address to a's MAC.
    lab.poke("b", VIP4.into());
    let took = lab
        .wait_neigh("b", VIP4.into(), Duration::from_secs(2), |(m, s)| {
            *m == mac("a") && s == "REACHABLE"
        })
        .unwrap_or_else(|got| panic!("b's neighbour entry for .200: {got:?}"));
    eprintln!(
        "FIGURE b's kernel resolved 192.168.77.200 (REACHABLE, a's MAC) within {took:?} of sending"
    );

    let c = settle(&r, |c| c.replies >= 2);
    assert!(c.requests_owned >= 2 && c.replies >= 2, "{c:?}");
    assert_eq!(
        (c.garbage, c.conflicts, c.errors),
        (0, 0, 0),
        "{c:?} {:?}",
        r.last_error()
    );
    // a's kernel did not answer for it: the address is on no interface.
    let addrs = stdout(&lab.exec("a", &["ip", "addr"]));
    assert!(
        !addrs.contains("192.168.77.200") && !addrs.contains("fd00:77::200"),
        "{addrs}"
    );
}

#[test]
fn addresses_not_owned_are_never_answered() {
    let Some(lab) = Lab::new("addresses_not_owned_are_never_answered") else {
        return;
    };
    let r = lab.responder("a", Config::default());
    r.set_owned(ips(&[OTHER4.into(), OTHER6.into()]));
    let short = Duration::from_millis(300);

    assert!(lab
        .ask(
            "b",
            arp_request("b", MacAddr::BROADCAST, VIP4),
            VIP4.into(),
            short
        )
        .is_empty());
    assert!(lab
        .ask("b", ns("b", VIP6, None), VIP6.into(), short)
        .is_empty());
    assert!(lab
        .ask("b", ns("b", VIP6, Some(mac("a"))), VIP6.into(), short)
        .is_empty());
    if installed("addresses_not_owned_are_never_answered", "arping") {
        let out = lab.exec(
            "b",
            &[
                "arping",
                "-c",
                "1",
                "-w",
                "1",
                "-i",
                "eth0",
                &VIP4.to_string(),
            ],
        );
        assert!(
            !out.status.success(),
            "arping got an answer: {}",
            stdout(&out)
        );
    }
    let c = settle(&r, |c| c.requests >= 3);
    assert!(c.requests >= 3, "{c:?}");
    assert_eq!((c.requests_owned, c.replies), (0, 0), "{c:?}");

    // The other addresses are answered; then nothing once nothing is owned.
    assert_eq!(
        lab.ask(
            "b",
            arp_request("b", MacAddr::BROADCAST, OTHER4),
            OTHER4.into(),
            short
        )
        .len(),
        1
    );
    r.set_owned(BTreeSet::new());
    assert!(r.owned().is_empty());
    assert!(lab
        .ask(
            "b",
            arp_request("b", MacAddr::BROADCAST, OTHER4),
            OTHER4.into(),
            short
        )
        .is_empty());
    assert!(lab
        .ask("b", ns("b", OTHER6, None), OTHER6.into(), short)
        .is_empty());

    // A unicast question to another host's MAC is not ours to answer, even for an owned
    // address (c's MAC: the bridge forwards it to c only; an unknown MAC: flooded to a too).
    r.set_owned(both());
    for to in [mac("c"), MacAddr([2, 0, 0, 0, 0, 0x77])] {
        assert!(
            lab.ask("b", arp_request("b", to, VIP4), VIP4.into(), short)
                .is_empty(),
            "{to}"
        );
        assert!(
            lab.ask("b", ns("b", VIP6, Some(to)), VIP6.into(), short)
                .is_empty(),
            "{to}"
        );
    }
    // The kernel of b finds nobody for .202.
    lab.poke("b", Ipv4Addr::new(192, 168, 77, 202).into());
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        lab.neigh("b", Ipv4Addr::new(192, 168, 77, 202).into()),
        None
    );
}

#[test]
fn neighbor_solicitations_are_answered() {
    let Some(lab) = Lab::new("neighbor_solicitations_are_answered") else {
        return;
    };
    let r = lab.responder("a", Config::default());
    r.set_owned(both());

    // The solicited-node group is joined (MLD snooping switches then forward NS to a).
    let maddr = stdout(&lab.exec("a", &["ip", "-6", "maddr", "show", "dev", "eth0"]));
    assert!(maddr.contains("ff02::1:ff00:200"), "{maddr}");

    // Multicast NS built here: a solicited NA from a, to b.
    let answers = lab.ask(
        "b",
        ns("b", VIP6, None),
        VIP6.into(),
        Duration::from_millis(300),
    );
    assert_eq!(answers.len(), 1, "{answers:?}");
    let reply = answers[0];
    assert_eq!((reply.src, reply.dst), (mac("a"), mac("b")));
    let Payload::Ndp(ndp) = reply.payload else {
        panic!("{reply:?}")
    };
    assert_eq!((ndp.src, ndp.dst), (VIP6, v6("b")));
    let NdpMessage::Advertisement(na) = ndp.message else {
        panic!("{ndp:?}")
    };
    assert!(na.solicited && na.override_flag && !na.router, "{na:?}");
    assert_eq!(na.target_mac, Some(mac("a")));

    if installed("neighbor_solicitations_are_answered", "ndisc6") {
        let out = lab.exec(
            "b",
            &[
                "ndisc6",
                "-1",
                "-r",
                "2",
                "-w",
                "500",
                &VIP6.to_string(),
                "eth0",
            ],
        );
        let text = stdout(&out).to_lowercase();
        assert!(
            out.status.success() && text.contains(&mac("a").to_string()),
            "ndisc6: {text}"
        );
    } else {
        eprintln!("ndisc6 not installed: checked with a raw multicast NS only");
    }

    // The kernel of b resolves it.
    lab.poke("b", VIP6.into());
    let took = lab
        .wait_neigh("b", VIP6.into(), Duration::from_secs(2), |(m, s)| {
            *m == mac("a") && s == "REACHABLE"
        })
        .unwrap_or_else(|got| panic!("b's neighbour entry for fd00:77::200: {got:?}"));
    eprintln!(
        "FIGURE b's kernel resolved fd00:77::200 (REACHABLE, a's MAC) within {took:?} of sending"
    );

    // Removing the address leaves the group.
    r.set_owned(ips(&[VIP4.into()]));
    let maddr = stdout(&lab.exec("a", &["ip", "-6", "maddr", "show", "dev", "eth0"]));
    assert!(!maddr.contains("ff02::1:ff00:200"), "{maddr}");
    let c = r.counters();
    assert_eq!((c.garbage, c.errors), (0, 0), "{c:?} {:?}", r.last_error());
}

#[test]
fn unicast_nud_probes_are_answered() {
    let Some(lab) = Lab::new("unicast_nud_probes_are_answered") else {
        return;
    };
    let r = lab.responder("a", Config::default());
    r.set_owned(both());

    // A unicast NS to a's MAC, for the address itself, built here.
    let answers = lab.ask(
        "b",
        ns("b", VIP6, Some(mac("a"))),
        VIP6.into(),
        Duration::from_millis(300),
    );
    assert_eq!(answers.len(), 1, "{answers:?}");
    let Payload::Ndp(ndp) = answers[0].payload else {
        panic!()
    };
    let NdpMessage::Advertisement(na) = ndp.message else {
        panic!()
    };
    assert!(na.solicited && na.override_flag);
    assert_eq!((answers[0].dst, ndp.dst), (mac("b"), v6("b")));

    // The kernel's own probes: b has a stale entry at a's MAC and sends traffic; it probes
    // unicast (delay_first_probe_time is 0 in the lab) and only a solicited answer makes the
    // entry REACHABLE.
    for ip in [IpAddr::from(VIP4), IpAddr::from(VIP6)] {
        let capture = lab.capture_in("a", Duration::from_millis(500));
        must(&[
            "ip",
            "-n",
            &lab.ns("b"),
            "neigh",
            "replace",
            &ip.to_string(),
            "lladdr",
            &mac("a").to_string(),
            "dev",
            "eth0",
            "nud",
            "stale",
        ]);
        lab.poke("b", ip);
        let took = lab
            .wait_neigh("b", ip, Duration::from_secs(3), |(m, s)| {
                *m == mac("a") && s == "REACHABLE"
            })
            .unwrap_or_else(|got| panic!("b's entry for {ip}: {got:?}"));
        eprintln!("FIGURE {ip}: b's stale entry probed (unicast) and REACHABLE after {took:?}");
        // The probe a saw was unicast to its MAC.
        let seen = capture.join().expect("capture");
        let probes: Vec<_> = seen
            .iter()
            .filter_map(|(_, f)| f.solicitation().map(|s| (f.dst, s.target())))
            .filter(|(_, t)| *t == ip)
            .collect();
        assert!(
            probes.iter().any(|(dst, _)| *dst == mac("a")),
            "{ip}: no unicast probe: {probes:?}"
        );
    }
    let c = r.counters();
    assert!(c.replies >= 3, "{c:?}");
}

#[test]
fn taking_an_address_over_updates_clients_at_once() {
    let Some(lab) = Lab::new("taking_an_address_over_updates_clients_at_once") else {
        return;
    };
    let a = lab.responder("a", Config::default());
    let c = lab.responder("c", Config::default());
    let b = lab.ns("b");

    // b has stale entries at a wrong MAC (the old owner's, gone).
    for ip in [VIP4.to_string(), VIP6.to_string()] {
        must(&[
            "ip",
            "-n",
            &b,
            "neigh",
            "replace",
            &ip,
            "lladdr",
            &BOGUS.to_string(),
            "dev",
            "eth0",
            "nud",
            "stale",
        ]);
    }
    let capture = lab.capture_in("b", Duration::from_millis(400));
    let t0 = Instant::now();
    a.set_owned(both());
    let mut figures = Vec::new();
    for ip in [IpAddr::from(VIP4), IpAddr::from(VIP6)] {
        let took = lab
            .wait_neigh("b", ip, Duration::from_millis(200), |(m, _)| *m == mac("a"))
            .map(|_| t0.elapsed())
            .unwrap_or_else(|got| panic!("{ip}: b still has {got:?} 200 ms after set_owned"));
        figures.push(format!("{ip} {took:?}"));
    }
    let seen = capture.join().expect("capture");
    let first = |v6: bool| {
        seen.iter()
            .find(|(_, f)| {
                f.announcement()
                    .is_some_and(|a| a.mac == mac("a") && a.ip.is_ipv6() == v6)
            })
            .map(|(t, _)| t.duration_since(t0))
    };
    eprintln!(
        "FIGURE takeover over a stale wrong MAC: set_owned -> b's entry shows a's MAC (polled with `ip neigh`): {}; \
         first gratuitous ARP at b {:?}, first unsolicited NA at b {:?}",
        figures.join(", "),
        first(false),
        first(true)
    );
    assert!(first(false).is_some() && first(true).is_some(), "{seen:?}");

    // Failover to c while b's entries are fresh (REACHABLE at a's MAC).
    for ip in [IpAddr::from(VIP4), IpAddr::from(VIP6)] {
        lab.poke("b", ip);
        lab.wait_neigh("b", ip, Duration::from_secs(2), |(m, s)| {
            *m == mac("a") && s == "REACHABLE"
        })
        .unwrap_or_else(|got| panic!("{ip}: {got:?}"));
    }
    let t0 = Instant::now();
    a.set_owned(BTreeSet::new());
    c.set_owned(both());
    let mut figures = Vec::new();
    for ip in [IpAddr::from(VIP4), IpAddr::from(VIP6)] {
        lab.wait_neigh("b", ip, Duration::from_millis(200), |(m, _)| *m == mac("c"))
            .unwrap_or_else(|got| panic!("{ip}: b still has {got:?} 200 ms after failover"));
        figures.push(format!("{ip} {:?}", t0.elapsed()));
    }
    eprintln!(
        "FIGURE failover a -> c over fresh REACHABLE entries: b at c's MAC after {}",
        figures.join(", ")
    );
    // And b's next question is answered by c alone.
    let answers = lab.ask(
        "b",
        arp_request("b", MacAddr::BROADCAST, VIP4),
        VIP4.into(),
        Duration::from_millis(300),
    );
    assert_eq!(
        answers.iter().map(|f| f.src).collect::<Vec<_>>(),
        vec![mac("c")]
    );
}

#[test]
fn two_owners_see_a_conflict() {
    let Some(lab) = Lab::new("two_owners_see_a_conflict") else {
        return;
    };
    let a = lab.responder("a", Config::default());
    let c = lab.responder("c", Config::default());
    a.set_owned(ips(&[VIP4.into()]));
    c.set_owned(ips(&[VIP4.into()]));
    let (ca, cc) = (
        settle(&a, |x| x.conflicts >= 3),
        settle(&c, |x| x.conflicts >= 3),
    );
    assert!(ca.conflicts >= 3 && cc.conflicts >= 3, "a {ca:?} c {cc:?}");
    assert_eq!(a.counters().replies, 0, "a gratuitous ARP is not answered");
}

#[test]
fn announcements_follow_the_schedule_and_stop_when_released() {
    let Some(lab) = Lab::new("announcements_follow_the_schedule_and_stop_when_released") else {
        return;
    };
    let r = lab.responder("a", Config::default());
    let capture = lab.capture_in("b", Duration::from_millis(2300));
    let t0 = Instant::now();
    r.set_owned(both());
    std::thread::sleep(Duration::from_millis(10));
    r.set_owned(ips(&[VIP4.into(), VIP6.into(), OTHER4.into()]));
    std::thread::sleep(Duration::from_millis(200));
    // Released after its burst: its 1 s and 2 s repeats must not go out.
    r.set_owned(both());
    let seen = capture.join().expect("capture");
    let at = |ip: IpAddr| -> Vec<u128> {
        seen.iter()
            .filter(|(_, f)| {
                f.announcement()
                    .is_some_and(|a| a.ip == ip && a.mac == mac("a"))
            })
            .map(|(t, _)| t.duration_since(t0).as_millis())
            .collect()
    };
    let (a4, a6, other) = (at(VIP4.into()), at(VIP6.into()), at(OTHER4.into()));
    eprintln!("FIGURE announcements seen at b (ms after set_owned): v4 {a4:?} v6 {a6:?}; released address {other:?}");
    for times in [&a4, &a6] {
        assert_eq!(times.len(), 5, "{times:?}");
        for (got, want) in times.iter().zip([0u128, 50, 100, 1000, 2000]) {
            assert!(*got >= want && *got < want + 50, "{times:?}");
        }
    }
    assert_eq!(other.len(), 3, "{other:?}");
    let c = r.counters();
    assert_eq!(c.announcements, 13, "{c:?}");
    // Re-announce on demand.
    let capture = lab.capture_in("b", Duration::from_millis(150));
    r.reannounce();
    let again = capture.join().expect("capture");
    let n = again
        .iter()
        .filter(|(_, f)| f.announcement().is_some())
        .count();
    assert_eq!(n, 6, "3 each for .200 and fd00:77::200");
}

#[test]
fn garbage_is_counted_and_survived() {
    let Some(lab) = Lab::new("garbage_is_counted_and_survived") else {
        return;
    };
    let r = lab.responder("a", Config::default());
    r.set_owned(both());
    let before = r.counters();

    // Random frames (xorshift, fixed seed) with the ARP or IPv6 EtherType, and valid questions
    // with a byte changed; what the parser calls garbage is what a must count. All broadcast:
    // the bridge's MLD snooping drops broken IPv6 sent to a multicast MAC (measured: a
    // damaged NS to 33:33:ff:00:02:00 never reaches a), so those would not count.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut frames = Vec::new();
    for i in 0..600 {
        let mut f = MacAddr::BROADCAST.0.to_vec();
        f.extend_from_slice(&mac("b").0);
        if i % 3 == 2 {
            let mut q = if i % 2 == 0 {
                ns("b", VIP6, None)
            } else {
                arp_request("b", MacAddr::BROADCAST, VIP4)
            };
            q.dst = MacAddr::BROADCAST;
            f = q.to_bytes();
            let at = 14 + (next() as usize) % (f.len() - 14);
            f[at] ^= 1 << (next() % 8);
        } else {
            let ethertype = if i % 2 == 0 {
                ETHERTYPE_ARP
            } else {
                ETHERTYPE_IPV6
            };
            f.extend_from_slice(&ethertype.to_be_bytes());
            if i % 3 == 1 && ethertype == ETHERTYPE_IPV6 {
                f.push(0x60); // looks like IPv6: the rest decides
            }
            for _ in 0..(next() % 120) {
                f.push(next() as u8);
            }
        }
        frames.push(f);
    }
    let garbage = frames
        .iter()
        .filter(|f| Frame::parse(f).is_err_and(|e| e.is_garbage()))
        .count() as u64;
    let answerable = frames
        .iter()
        .filter_map(|f| Frame::parse(f).ok()?.solicitation())
        .filter(|s| s.target() == IpAddr::from(VIP4) || s.target() == IpAddr::from(VIP6))
        .count() as u64;
    let sent = frames.len() as u64;
    lab.in_ns("b", move || {
        let arp = PacketSocket::open("eth0", ETHERTYPE_ARP).expect("raw socket");
        for f in &frames {
            arp.send(f).expect("send garbage");
            std::thread::sleep(Duration::from_micros(200));
        }
    });
    let c = settle(&r, |c| c.garbage - before.garbage >= garbage);
    eprintln!(
        "FIGURE {sent} damaged/random frames from b: a counted garbage {} (parser says {garbage}), \
         answered {} (still-valid questions {answerable})",
        c.garbage - before.garbage,
        c.replies - before.replies
    );
    assert!(
        garbage > sent / 2,
        "the generator makes mostly garbage: {garbage}"
    );
    assert_eq!(c.garbage - before.garbage, garbage, "{c:?}");
    assert_eq!(c.errors, 0, "{:?}", r.last_error());

    // Still answering.
    let answers = lab.ask(
        "b",
        arp_request("b", MacAddr::BROADCAST, VIP4),
        VIP4.into(),
        Duration::from_millis(300),
    );
    assert_eq!(answers.len(), 1);
}

#[test]
fn a_link_flap_is_survived() {
    let Some(lab) = Lab::new("a_link_flap_is_survived") else {
        return;
    };
    let r = lab.responder("a", Config::default());
    r.set_owned(both());
    let short = Duration::from_millis(300);
    let a = lab.ns("a");
    must(&["ip", "-n", &a, "link", "set", "eth0", "down"]);
    std::thread::sleep(Duration::from_millis(60));
    must(&["ip", "-n", &a, "link", "set", "eth0", "up"]);
    // Both sockets report ENETDOWN once (and announcements due meanwhile fail): counted,
    // and the last one kept.
    let c = settle(&r, |c| c.errors >= 2);
    assert!(c.errors >= 2, "{c:?}");
    let last = r.last_error().unwrap_or_default();
    assert!(last.contains("Network is down"), "{last}");
    r.reannounce();
    let answers = lab.ask(
        "b",
        arp_request("b", MacAddr::BROADCAST, VIP4),
        VIP4.into(),
        short,
    );
    assert_eq!(answers.len(), 1, "{answers:?}");
    let answers = lab.ask("b", ns("b", VIP6, None), VIP6.into(), short);
    assert_eq!(answers.len(), 1, "{answers:?}");
}

#[test]
fn stop_is_prompt_and_start_errors_are_clear() {
    let Some(lab) = Lab::new("stop_is_prompt_and_start_errors_are_clear") else {
        return;
    };
    let r = lab.responder("a", Config::default());
    r.set_owned(both());
    std::thread::sleep(Duration::from_millis(20));
    let t0 = Instant::now();
    r.stop();
    let took = t0.elapsed();
    eprintln!("FIGURE stop() returned after {took:?}");
    // Nearly all of it is the kernel closing the two AF_PACKET sockets (an RCU grace period
    // each: 5-16 ms per close() under strace here); the thread itself exits at once.
    assert!(took < Duration::from_millis(500), "{took:?}");
    // Stopped: no answers, and its pending repeats died with it.
    let short = Duration::from_millis(200);
    assert!(lab
        .ask(
            "b",
            arp_request("b", MacAddr::BROADCAST, VIP4),
            VIP4.into(),
            short
        )
        .is_empty());

    // Drop stops too.
    let r = lab.responder("a", Config::default());
    r.set_owned(both());
    drop(r);
    assert!(lab
        .ask(
            "b",
            arp_request("b", MacAddr::BROADCAST, VIP4),
            VIP4.into(),
            short
        )
        .is_empty());

    match lab.in_ns("a", || Responder::start("nope0")) {
        Err(L2Error::NoSuchInterface(name)) => assert_eq!(name, "nope0"),
        other => panic!("{other:?}"),
    }
    match lab.in_ns("a", || Responder::start("lo")) {
        Err(L2Error::NotEthernet { ifname, .. }) => assert_eq!(ifname, "lo"),
        other => panic!("{other:?}"),
    }
}
