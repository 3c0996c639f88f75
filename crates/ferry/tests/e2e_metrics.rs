//! End to end: the agent's health and metrics endpoint in a 3-node lab running the seed's
//! LoadBalancer journey: `/healthz`, `/readyz`, and `/metrics` checked for content (the
//! announcing node reports the address, every node the programmed service and the pool) and
//! for format by Prometheus's own `promtool check metrics`.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{run_ok, wait_external_ips, wait_one_announcer};
use ferry_lab::demo;

const METRICS: &str = "http://127.0.0.1:10249";

/// The value of the sample whose line starts with `series` (name and labels exactly).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .trim()
            .split(' ')
            .next()?
            .parse()
            .ok()
    })
}

/// Runs `promtool check metrics` on `text`: (exit code, its messages).
fn promtool(text: &str) -> Option<(i32, String)> {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            ferry_lab::skip(
                "the promtool check",
                &format!("promtool is missing ({e}): scripts/install-deps.sh installs prometheus"),
            );
            return None;
        }
    };
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(text.as_bytes())
        .expect("writing to promtool");
    let out = child.wait_with_output().expect("promtool runs");
    let msgs = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.code().unwrap_or(-1), msgs))
}

#[test]
fn health_readiness_and_metrics_of_the_seed_journey() {
    let Some(lab) = common::lab("e2e_metrics", 3) else {
        return;
    };
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    lab.apply_yaml(demo::NEXTCLOUD_DEV_LOADBALANCER).unwrap();
    lab.apply_yaml(demo::METALLB_CONFIG).unwrap();
    wait_external_ips(&lab, "nextcloud-dev-loadbalancer", &["192.168.2.200"]);
    let announcer = wait_one_announcer(&lab, "192.168.2.200", Duration::from_millis(300));
    let nodes = lab.node_names();
    assert_eq!(nodes.len(), 3);
    for node in &nodes {
        let health = run_ok(
            &lab,
            node,
            &[
                "curl",
                "-s",
                "-w",
                " %{http_code}",
                &format!("{METRICS}/healthz"),
            ],
        );
        assert_eq!(
            health.split_whitespace().collect::<Vec<_>>(),
            ["ok", "200"],
            "{node} /healthz"
        );
        let ready = run_ok(
            &lab,
            node,
            &[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("{METRICS}/readyz"),
            ],
        );
        assert_eq!(ready.trim(), "200", "{node} /readyz");
        // The announced metric follows the layer-2 thread's status, refreshed every second.
        let deadline = Instant::now() + Duration::from_secs(5);
        let text = loop {
            let text = run_ok(&lab, node, &["curl", "-sf", &format!("{METRICS}/metrics")]);
            let announced = sample(
                &text,
                &format!("metallb_speaker_announced{{ip=\"192.168.2.200\",node=\"{node}\",protocol=\"layer2\",service=\"default/nextcloud-dev-loadbalancer\"}}"),
            );
            let want = (*node == announcer).then_some(1.0);
            if announced == want || Instant::now() > deadline {
                assert_eq!(announced, want, "{node} (announcer {announcer}):\n{text}");
                break text;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(
            sample(&text, "ferry_programmed_services"),
            Some(1.0),
            "{node}"
        );
        assert_eq!(
            sample(&text, "ferry_programmed_endpoints"),
            Some(2.0),
            "{node}"
        );
        assert_eq!(
            sample(
                &text,
                "metallb_allocator_addresses_in_use_total{pool=\"default\"}"
            ),
            Some(1.0),
            "{node}"
        );
        assert_eq!(sample(&text, "ferry_membership_alive"), Some(3.0), "{node}");
        assert_eq!(
            sample(&text, "ferry_membership_quorum"),
            Some(1.0),
            "{node}"
        );
        assert!(
            sample(&text, "kubeproxy_sync_proxy_rules_duration_seconds_count")
                .is_some_and(|n| n >= 1.0),
            "{node}: {text}"
        );
        if let Some((code, msgs)) = promtool(&text) {
            // 0, or 3 for lint warnings only about MetalLB's own names (gauges ending in
            // _total, as MetalLB registers them).
            let lint_only = msgs
                .lines()
                .filter(|l| !l.trim().is_empty())
                .all(|l| l.starts_with("metallb_allocator_addresses"));
            assert!(
                code == 0 || (code == 3 && lint_only),
                "promtool exit {code}:\n{msgs}"
            );
        }
    }
    eprintln!("announcer {announcer}: /healthz, /readyz and /metrics checked on {nodes:?}");
}
