//! Membership over real UDP sockets on loopback (127.0.0.2-.4, ports picked by the kernel):
//! convergence, crash detection, graceful leave, restart, garbage. Timings are printed; the
//! assertions leave room for a loaded 2-core machine.

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use ferry_member::{has_quorum, MemberConfig, Membership};

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn cfg(name: &str, bind: SocketAddr, seeds: &[SocketAddr]) -> MemberConfig {
    let mut c = MemberConfig::new(name, bind);
    c.seeds = seeds.to_vec();
    c
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

/// Polls every millisecond until `pred` holds for every member; returns the time it took.
fn until_all(
    members: &[&Membership],
    limit: Duration,
    pred: impl Fn(&Membership) -> bool,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if members.iter().all(|m| pred(m)) {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

struct Trio {
    a: Membership,
    b: Membership,
    c: Option<Membership>,
    c_addr: SocketAddr,
}

fn start_trio(ip_a: &str, ip_b: &str, ip_c: &str) -> Trio {
    let a = Membership::start(cfg("node-a", addr(&format!("{ip_a}:0")), &[])).expect("start a");
    let b = Membership::start(cfg("node-b", addr(&format!("{ip_b}:0")), &[a.local_addr()]))
        .expect("start b");
    let c = Membership::start(cfg(
        "node-c",
        addr(&format!("{ip_c}:0")),
        &[a.local_addr(), b.local_addr()],
    ))
    .expect("start c");
    a.set_seeds(vec![b.local_addr(), c.local_addr()]);
    let c_addr = c.local_addr();
    Trio {
        a,
        b,
        c: Some(c),
        c_addr,
    }
}

impl Trio {
    fn restart_c(&mut self) -> &Membership {
        let seeds = [self.a.local_addr(), self.b.local_addr()];
        self.c
            .insert(Membership::start(cfg("node-c", self.c_addr, &seeds)).expect("restart c"))
    }
}

#[test]
fn three_members_converge_detect_crashes_and_rejoin() {
    let all = set(&["node-a", "node-b", "node-c"]);
    let started = Instant::now();
    let mut trio = start_trio("127.0.0.2", "127.0.0.3", "127.0.0.4");
    let c = trio.c.as_ref().expect("c");
    let t = until_all(&[&trio.a, &trio.b, c], Duration::from_secs(1), |m| {
        m.alive() == all
    });
    let t = t.unwrap_or_else(|| {
        panic!(
            "no convergence in 1 s: a={:?} b={:?} c={:?}",
            trio.a.alive(),
            trio.b.alive(),
            c.alive()
        )
    });
    eprintln!(
        "loopback: 3 members converged in {t:?} ({:?} after the first start)",
        started.elapsed()
    );
    assert!(has_quorum(trio.a.alive().len(), 3));

    let mut crash = Vec::new();
    let mut rejoin = Vec::new();
    let mut c_boots = BTreeSet::new();
    for run in 0..5 {
        let c = trio.c.take().expect("c");
        c_boots.insert(c.identity().boot);
        // Let the cluster settle, then crash c (no goodbye).
        std::thread::sleep(Duration::from_millis(200 + run * 37));
        c.halt();
        let t = until_all(&[&trio.a, &trio.b], Duration::from_secs(2), |m| {
            m.alive() == set(&["node-a", "node-b"])
        })
        .unwrap_or_else(|| {
            panic!(
                "run {run}: crash not detected: a={:?} b={:?}",
                trio.a.alive(),
                trio.b.alive()
            )
        });
        crash.push(t);
        // a and b keep their majority (2 of 3).
        assert!(has_quorum(trio.a.alive().len(), 3));
        // Restart c on the same address: its new boot id supersedes the old identity.
        trio.restart_c();
        let c = trio.c.as_ref().expect("c");
        let t = until_all(&[&trio.a, &trio.b, c], Duration::from_secs(2), |m| {
            m.alive() == all
        })
        .unwrap_or_else(|| {
            panic!(
                "run {run}: no rejoin: a={:?} b={:?} c={:?}",
                trio.a.alive(),
                trio.b.alive(),
                c.alive()
            )
        });
        rejoin.push(t);
    }
    eprintln!(
        "loopback: crash detected in {crash:?}, median {:?}",
        median(&crash)
    );
    eprintln!(
        "loopback: restart rejoined in {rejoin:?}, median {:?}",
        median(&rejoin)
    );
    assert!(
        median(&crash) < Duration::from_millis(600),
        "median crash detection too slow"
    );
    assert!(
        median(&rejoin) < Duration::from_millis(500),
        "median rejoin too slow"
    );

    // Graceful stop: the others know at once.
    let c = trio.c.take().expect("c");
    let generation = trio.a.generation();
    let rx = trio.a.subscribe();
    assert_eq!(
        rx.recv_timeout(Duration::from_millis(100)).ok(),
        Some(all.clone())
    );
    let t0 = Instant::now();
    c.stop();
    let seen = trio
        .a
        .wait_for(Duration::from_secs(1), |s| s == &set(&["node-a", "node-b"]));
    let t = t0.elapsed();
    assert!(seen.is_some(), "leave not seen");
    assert!(trio.a.generation() > generation);
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(1)).ok(),
        Some(set(&["node-a", "node-b"]))
    );
    eprintln!("loopback: graceful leave seen in {t:?}");
    assert!(t < Duration::from_millis(200), "leave took {t:?}");
    let c = trio.restart_c();
    assert!(
        c.wait_for(Duration::from_secs(2), |s| s == &all).is_some(),
        "rejoin after leave"
    );
    c_boots.insert(c.identity().boot);
    assert_eq!(c_boots.len(), 6, "every restart has its own boot id");
}

#[test]
fn garbage_datagrams_are_counted_and_ignored() {
    let trio = start_trio("127.0.0.5", "127.0.0.6", "127.0.0.7");
    let all = set(&["node-a", "node-b", "node-c"]);
    assert!(trio
        .a
        .wait_for(Duration::from_secs(1), |s| s == &all)
        .is_some());
    let sock = UdpSocket::bind("127.0.0.8:0").expect("bind");
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut sent = 0u64;
    for i in 0..3000usize {
        let len = (i * 7) % 1700;
        let mut d: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        // Half of them with our envelope, to reach the SWIM decoder.
        if i % 2 == 0 && d.len() >= 4 {
            d[..4].copy_from_slice(&[b'f', b'r', b'y', 1]);
        }
        if sock.send_to(&d, trio.a.local_addr()).is_ok() {
            sent += 1;
        }
        if i % 50 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let s = trio.a.stats();
    eprintln!("garbage: sent {sent}, stats {s:?}");
    // (The kernel may drop some of the burst.)
    assert!(s.garbage + s.rejected >= sent / 2, "{s:?}");
    // Membership is intact, and no stranger joined.
    assert_eq!(trio.a.alive(), all);
    assert_eq!(trio.b.alive(), all);
}
