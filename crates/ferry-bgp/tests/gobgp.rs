//! Interoperability with GoBGP (Debian `gobgpd`) as the peer, in the lab of tests/lab/mod.rs
//! (GoBGP in the router namespace; it keeps a RIB but installs nothing in the kernel, so its
//! RIB is what is checked): routes and attributes over IPv4 and MP-BGP IPv6, SIGTERM withdraws,
//! SIGKILL kept as stale by GoBGP's graceful restart helper until the speaker comes back, and a
//! passive speaker with TCP MD5 that GoBGP connects to.
//!
//! Needs root and gobgpd (scripts/install-deps.sh); skips otherwise (fails under CI).
//!
//! Run: `cargo test -p ferry-bgp --test gobgp -- --test-threads 1 --nocapture`

mod lab;

use std::time::Duration;

use lab::*;

/// GoBGP's RIB line for `prefix` (None: not there).
fn rib_line(lab: &Lab, family: &str, prefix: &str) -> Option<String> {
    lab.gobgp(&format!("global rib -a {family}"))
        .lines()
        .find(|l| l.contains(prefix))
        .map(str::to_string)
}

#[test]
fn gobgp_gets_routes_with_attributes_and_sigterm_withdraws() {
    if !ready(
        "gobgp_gets_routes_with_attributes_and_sigterm_withdraws",
        Router::Gobgp,
    ) {
        return;
    }
    let mut lab = Lab::new(Router::Gobgp, &[NodePeer::default()]);
    let mut args = ROUTES.to_vec();
    args.extend([
        "--med",
        "7",
        "--community",
        "64601:100",
        "--large-community",
        "64601:1:2",
    ]);
    lab.speaker(1, &args);
    wait(Duration::from_secs(10), "session up", || lab.established(1));
    wait(Duration::from_secs(5), "routes in GoBGP", || {
        rib_line(&lab, "ipv4", "10.96.200.1/32").is_some()
            && rib_line(&lab, "ipv6", "fd00:96:200::1/128").is_some()
    });
    let v4 = rib_line(&lab, "ipv4", "10.96.200.1/32").unwrap();
    for want in [
        "10.96.0.11",
        "64601",
        "{Origin: i}",
        "{Med: 7}",
        "{Communities: 64601:100}",
        "64601:1:2",
    ] {
        assert!(v4.contains(want), "lacks {want:?}: {v4}");
    }
    let v6 = rib_line(&lab, "ipv6", "fd00:96:200::1/128").unwrap();
    assert!(v6.contains("fd00:96::11"), "{v6}");
    lab.stop_speaker(1, Some(libc::SIGTERM));
    wait(Duration::from_secs(2), "withdrawn", || {
        rib_line(&lab, "ipv4", "10.96.200.1/32").is_none()
            && rib_line(&lab, "ipv6", "fd00:96:200::1/128").is_none()
    });
}

#[test]
fn gobgp_keeps_stale_routes_over_a_sigkill() {
    if !ready("gobgp_keeps_stale_routes_over_a_sigkill", Router::Gobgp) {
        return;
    }
    let mut lab = Lab::new(Router::Gobgp, &[NodePeer::default()]);
    lab.speaker(1, &ROUTES);
    wait(Duration::from_secs(10), "session up", || lab.established(1));
    wait(Duration::from_secs(5), "routes in GoBGP", || {
        rib_line(&lab, "ipv6", "fd00:96:200::1/128").is_some()
    });
    lab.stop_speaker(1, None);
    wait(
        Duration::from_secs(5),
        "GoBGP sees the session gone",
        || !lab.established(1),
    );
    let v4 = rib_line(&lab, "ipv4", "10.96.200.1/32").expect("kept");
    assert!(v4.trim_start().starts_with('S'), "not stale: {v4}");
    // Back with the IPv4 route only: after End-of-RIB the IPv6 one goes, the IPv4 one is fresh.
    lab.speaker(1, &["--route", "10.96.200.1/32", "--restarted"]);
    wait(Duration::from_secs(15), "session back", || {
        lab.established(1)
    });
    wait(Duration::from_secs(5), "stale IPv6 route flushed", || {
        rib_line(&lab, "ipv6", "fd00:96:200::1/128").is_none()
    });
    let v4 = rib_line(&lab, "ipv4", "10.96.200.1/32").expect("still there");
    assert!(!v4.trim_start().starts_with('S'), "still stale: {v4}");
}

#[test]
fn gobgp_connects_to_a_passive_speaker_with_md5() {
    if !ready(
        "gobgp_connects_to_a_passive_speaker_with_md5",
        Router::Gobgp,
    ) {
        return;
    }
    let pw = NodePeer {
        password: Some("sesame-96"),
        ..NodePeer::default()
    };
    let mut lab = Lab::new(Router::Gobgp, &[pw]);
    // The speaker opens nothing: the session is GoBGP's connection to its listener.
    lab.speaker(
        1,
        &[
            "--route",
            "10.96.200.1/32",
            "--passive",
            "--listen",
            "0.0.0.0:179",
            "--password",
            "sesame-96",
        ],
    );
    wait(Duration::from_secs(15), "session up", || lab.established(1));
    wait(Duration::from_secs(5), "route in GoBGP", || {
        rib_line(&lab, "ipv4", "10.96.200.1/32").is_some()
    });
}
