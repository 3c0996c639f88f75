//! Interoperability with FRR (Debian `frr`, zebra and bgpd) as the router, in the same lab as
//! tests/bird.rs (see tests/lab/mod.rs): ECMP over two nodes in the kernel FIB (IPv4 and IPv6
//! over MP-BGP), attributes, TCP MD5, SIGTERM withdraws, SIGKILL kept as stale by FRR's
//! graceful restart helper until the speaker comes back.
//!
//! Needs root and frr (scripts/install-deps.sh); skips otherwise (fails under CI).
//!
//! Run: `cargo test -p ferry-bgp --test frr -- --test-threads 1 --nocapture`

mod lab;

use std::time::{Duration, Instant};

use lab::*;

#[test]
fn frr_two_nodes_give_one_ecmp_route_v4_and_v6() {
    if !ready("frr_two_nodes_give_one_ecmp_route_v4_and_v6", Router::Frr) {
        return;
    }
    let lab = ecmp_lab(
        Router::Frr,
        &[NodePeer::default(), NodePeer::default()],
        [&[], &[]],
    );
    let k4 = lab.kernel_route(VIP4);
    assert_eq!(routes_listed(&k4, VIP4), 1, "one route: {k4}");
    assert_eq!(nexthops(&k4), ["10.96.0.11", "10.96.0.12"], "{k4}");
    wait(Duration::from_secs(5), "IPv6 ECMP route", || {
        nexthops(&lab.kernel_route(VIP6)).len() == 2
    });
    let k6 = lab.kernel_route(VIP6);
    assert_eq!(nexthops(&k6), ["fd00:96::11", "fd00:96::12"], "{k6}");
    let b = lab.vtysh(&format!("show bgp ipv4 unicast {VIP4}/32"));
    assert!(b.contains("multipath"), "{b}");
    println!("ECMP (FRR):\n{k4}{k6}");
}

#[test]
fn frr_attributes_arrive_as_configured() {
    if !ready("frr_attributes_arrive_as_configured", Router::Frr) {
        return;
    }
    let ibgp = NodePeer {
        asn: Some(ROUTER_ASN),
        ..NodePeer::default()
    };
    let mut lab = Lab::new(Router::Frr, &[ibgp, NodePeer::default()]);
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
    wait(Duration::from_secs(5), "routes in FRR", || {
        let t = lab.vtysh("show bgp ipv4 unicast");
        t.contains("10.96.200.1/32") && t.contains("10.96.200.2/32")
    });
    let r1 = lab.vtysh("show bgp ipv4 unicast 10.96.200.1/32");
    for want in [
        "metric 50",
        "localpref 250",
        "internal",
        "Community: 64600:100 64600:200",
        "Large Community: 64600:1:2",
    ] {
        assert!(r1.contains(want), "iBGP route lacks {want:?}:\n{r1}");
    }
    let r2 = lab.vtysh("show bgp ipv4 unicast 10.96.200.2/32");
    for want in ["metric 50", "external", "Community: 64600:100 64600:200"] {
        assert!(r2.contains(want), "eBGP route lacks {want:?}:\n{r2}");
    }
    assert!(
        !r2.contains("localpref 250"),
        "LOCAL_PREF sent to eBGP:\n{r2}"
    );
}

#[test]
fn frr_md5_session_only_with_the_same_password() {
    if !ready("frr_md5_session_only_with_the_same_password", Router::Frr) {
        return;
    }
    let pw = NodePeer {
        password: Some("sesame-96"),
        ..NodePeer::default()
    };
    let mut lab = Lab::new(Router::Frr, &[pw.clone(), pw]);
    lab.speaker(1, &["--route", "10.96.200.1/32", "--password", "sesame-96"]);
    lab.speaker(2, &["--route", "10.96.200.1/32", "--password", "wrong"]);
    wait(Duration::from_secs(10), "the MD5 session", || {
        lab.established(1)
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !lab.established(2),
        "wrong password established:\n{}",
        lab.dump()
    );
}

#[test]
fn frr_sigterm_withdraws_and_sigkill_keeps_stale() {
    if !ready("frr_sigterm_withdraws_and_sigkill_keeps_stale", Router::Frr) {
        return;
    }
    let mut lab = ecmp_lab(
        Router::Frr,
        &[NodePeer::default(), NodePeer::default()],
        [&[], &[]],
    );
    // SIGKILL node 1: FRR keeps its path (stale, graceful restart helper).
    lab.stop_speaker(1, None);
    wait(Duration::from_secs(5), "FRR sees node 1 gone", || {
        !lab.established(1)
    });
    let r = lab.vtysh(&format!("show bgp ipv4 unicast {VIP4}/32"));
    assert!(r.contains("(stale)"), "{r}");
    assert_eq!(
        nexthops(&lab.kernel_route(VIP4)),
        ["10.96.0.11", "10.96.0.12"]
    );
    // SIGTERM node 2: withdrawn at once.
    let start = Instant::now();
    lab.stop_speaker(2, Some(libc::SIGTERM));
    wait(Duration::from_secs(2), "node 2 withdrawn", || {
        nexthops(&lab.kernel_route(VIP4)) == ["10.96.0.11"]
    });
    println!("SIGTERM to withdrawn in FRR's FIB: {:?}", start.elapsed());
    // Node 1 comes back: the route is fresh again.
    lab.speaker(1, &["--route", "10.96.200.1/32", "--restarted"]);
    wait(Duration::from_secs(10), "node 1 back", || {
        lab.established(1)
    });
    wait(Duration::from_secs(5), "no stale path left", || {
        !lab.vtysh(&format!("show bgp ipv4 unicast {VIP4}/32"))
            .contains("(stale)")
    });
    assert_eq!(nexthops(&lab.kernel_route(VIP4)), ["10.96.0.11"]);
}
