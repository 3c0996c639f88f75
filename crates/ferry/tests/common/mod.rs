//! Shared helpers of the end-to-end tests: a lab of network namespaces whose agents and pods
//! run this build's `ferry`, plus polling helpers with bounded waits.
//!
//! Every test needs root. Without it a test prints why and returns (skips), unless $CI is set:
//! then it fails.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

pub use ferry_lab::{demo, Lab, LabConfig, PodInfo};

/// The `ferry` binary under test.
pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// How long anything may take to converge (agents poll manifests every 100 ms).
pub const CONVERGE: Duration = Duration::from_secs(10);

/// True when the test may run (root); prints why it skips otherwise, panics when $CI is set.
pub fn root(test: &str) -> bool {
    ferry_lab::require_root(test)
}

/// A lab with `nodes` nodes and agents, or None when the test must skip. Downed on drop.
pub fn lab(test: &str, nodes: usize) -> Option<Lab> {
    if !root(test) {
        return None;
    }
    let lab = LabConfig::new(Lab::unique_prefix())
        .nodes(nodes)
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

/// Curls repeatedly until every pod in `want` has answered (bounded); the set of answers.
pub fn until_all_answer(lab: &Lab, from: &str, url: &str, want: &[String]) -> BTreeSet<String> {
    let deadline = Instant::now() + CONVERGE;
    let mut seen = BTreeSet::new();
    let mut last_err = String::new();
    while Instant::now() < deadline {
        match lab.curl(from, url) {
            Ok(body) => {
                seen.insert(body.trim().to_string());
            }
            Err(e) => last_err = format!("{e:#}"),
        }
        if want.iter().all(|w| seen.contains(w)) {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "{url} from {from}: wanted answers from {want:?}, got {seen:?} (last error: {last_err})"
    );
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
