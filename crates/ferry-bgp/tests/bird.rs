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

mod lab;

use std::time::{Duration, Instant};

use lab::*;

#[test]
fn two_nodes_give_one_ecmp_route_v4_and_v6() {
    if !ready("two_nodes_give_one_ecmp_route_v4_and_v6", Router::Bird) {
        return;
    }
    let lab = ecmp_lab(
        Router::Bird,
        &[NodePeer::default(), NodePeer::default()],
        [&[], &[]],
    );
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
    if !ready("attributes_arrive_as_configured", Router::Bird) {
        return;
    }
    // Node 1 internal (LOCAL_PREF goes to internal peers only), node 2 external.
    let ibgp = NodePeer {
        asn: Some(ROUTER_ASN),
        ..NodePeer::default()
    };
    let mut lab = Lab::new(Router::Bird, &[ibgp, NodePeer::default()]);
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
    if !ready("md5_session_only_with_the_same_password", Router::Bird) {
        return;
    }
    let pw = NodePeer {
        password: Some("sesame-96"),
        ..NodePeer::default()
    };
    let mut lab = Lab::new(Router::Bird, &[pw.clone(), pw]);
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
    if !ready("sigterm_withdraws_at_once", Router::Bird) {
        return;
    }
    let mut lab = ecmp_lab(
        Router::Bird,
        &[NodePeer::default(), NodePeer::default()],
        [&[], &[]],
    );
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
    if !ready("sigkill_keeps_routes_with_graceful_restart", Router::Bird) {
        return;
    }
    // Node 1 offers graceful restart (the default), node 2 does not.
    let mut lab = ecmp_lab(
        Router::Bird,
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

#[test]
fn ipv6_session_with_its_own_next_hop() {
    if !ready("ipv6_session_with_its_own_next_hop", Router::Bird) {
        return;
    }
    let v6 = NodePeer {
        ipv6: true,
        ..NodePeer::default()
    };
    let mut lab = Lab::new(Router::Bird, &[v6.clone(), v6]);
    for i in 1..=2 {
        // No --next-hop-v6: the session's own (IPv6) local address is the next hop; the IPv4
        // route has no next hop of its family and is left out (said on the speaker's output).
        lab.speaker(
            i,
            &[
                "--peer",
                &format!("fd00:96::1,{ROUTER_ASN}"),
                "--route",
                "fd00:96:200::1/128",
                "--route",
                "10.96.200.1/32",
            ],
        );
    }
    wait(Duration::from_secs(10), "IPv6 sessions up", || {
        lab.established(1) && lab.established(2)
    });
    wait(Duration::from_secs(5), "IPv6 ECMP route", || {
        nexthops(&lab.kernel_route(VIP6)).len() == 2
    });
    assert_eq!(
        nexthops(&lab.kernel_route(VIP6)),
        ["fd00:96::11", "fd00:96::12"]
    );
    assert!(nexthops(&lab.kernel_route(VIP4)).is_empty());
    assert!(
        lab.log("n1.log").contains("1 route(s) not announced"),
        "{}",
        lab.log("n1.log")
    );
}
