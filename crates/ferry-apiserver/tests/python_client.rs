//! The official Kubernetes Python client (`pip install kubernetes`) against the test double:
//! a list, a watch with bookmarks from a list's resourceVersion, and a watch from an expired
//! resourceVersion that gets 410. Skips without the client unless `CI` is set.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{require_or_skip, Lab};
use ferry_apiserver::Config;
use serde_json::Value;

fn python() -> Option<String> {
    let py = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", "import kubernetes"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(py)
}

#[test]
fn python_client_list_watch_bookmarks_and_expired() {
    let Some(py) = python() else {
        require_or_skip("python3 with the kubernetes package");
        return;
    };
    let lab = Lab::start(Config {
        // Small enough that the script's writes push resourceVersion 1 out of the history.
        history: 4,
        bookmark_interval: Duration::from_millis(300),
        ..Config::default()
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python_client.py");
    let o = Command::new(&py)
        .arg(script)
        .arg(&lab.kubeconfig)
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "python client script failed: {}\n{stdout}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out: Value = serde_json::from_str(stdout.trim()).expect("the script's JSON");
    assert_eq!(out["list_names"], serde_json::json!(["py-a", "py-b"]));
    assert_eq!(out["duplicate"], 409);
    let list_rv: u64 = out["list_rv"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("list rv");

    let events = out["events"].as_array().expect("events");
    let modified: Vec<&str> = events
        .iter()
        .filter(|e| e[0] == "MODIFIED")
        .filter_map(|e| e[1].as_str())
        .collect();
    assert_eq!(modified, vec!["py-a", "py-b"], "{events:?}");
    assert!(
        !events.iter().any(|e| e[0] == "ADDED"),
        "a watch from a resourceVersion replays only later changes: {events:?}"
    );
    let bookmarks: Vec<u64> = events
        .iter()
        .filter(|e| e[0] == "BOOKMARK")
        .filter_map(|e| e[1].as_str().and_then(|s| s.parse().ok()))
        .collect();
    assert!(!bookmarks.is_empty(), "no BOOKMARK in {events:?}");
    assert!(bookmarks.iter().all(|b| *b > list_rv), "{events:?}");
    // The last bookmark covers both changes.
    let last_mod: u64 = events
        .iter()
        .filter(|e| e[0] == "MODIFIED")
        .filter_map(|e| e[2].as_str().and_then(|s| s.parse().ok()))
        .max()
        .expect("modified rv");
    assert!(
        bookmarks.iter().max().is_some_and(|b| *b >= last_mod),
        "{events:?}"
    );

    assert_eq!(out["expired"][0], 410, "{out}");
    let reason = out["expired"][1].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("Expired: too old resource version"),
        "{reason}"
    );
}
