//! `ferry explain` asked of a live lab node (`ferry lab explain NODE -- ...`): the seed's
//! load-balancer service traced through the node's table, the node that announces the address
//! named with the election's reason, and the kernel's table read back: as planned, then (with
//! the agent stopped and one map element deleted by hand) the difference on the connection's
//! way. JSON output for scripts.

mod common;

use std::time::Duration;

use common::{demo, pod_names, until_all_answer, wait_external_ips, wait_one_announcer};

const LB: &str = "nextcloud-dev-loadbalancer";
const VIP: &str = "192.168.2.200";
const CLIENT: &str = "192.168.2.100";

fn explain_json(lab: &common::Lab, node: &str) -> serde_json::Value {
    let out = lab
        .explain(
            node,
            &[
                "--from",
                CLIENT,
                "--to",
                &format!("{VIP}:80/tcp"),
                "-o",
                "json",
            ],
        )
        .expect("explain runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn explain_reads_the_live_node() {
    let Some(lab) = common::lab_manifests("e2e_explain/explain_reads_the_live_node", 2) else {
        return;
    };
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    lab.apply_yaml(demo::NEXTCLOUD_DEV_LOADBALANCER).unwrap();
    lab.apply_yaml(demo::METALLB_CONFIG).unwrap();
    wait_external_ips(&lab, LB, &[VIP]);
    let pods = pod_names(&lab, "nextcloud-dev", 2);
    until_all_answer(&lab, "client", &format!("http://{VIP}/"), &pods);
    let announcer = wait_one_announcer(&lab, VIP, Duration::from_millis(300));

    for node in ["k3s-master-rpi001", "k3s-worker-rpi002"] {
        // The text: the service, both endpoints, masquerade, the announcer and the kernel.
        let out = lab
            .explain(
                node,
                &["--from", CLIENT, "--to", &format!("{VIP}:80"), "--rules"],
            )
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{text}");
        assert!(text.contains(&format!("service default/{LB}")), "{text}");
        assert!(
            text.contains(&format!(
                "announced (layer2) by {announcer}: {announcer} is first"
            )),
            "{text}"
        );
        assert!(text.contains("kernel: as planned"), "{text}");
        assert!(text.contains("matched services: "), "{text}");

        let v = explain_json(&lab, node);
        assert_eq!(v["service"], format!("default/{LB}"), "{v}");
        let outcomes = v["outcomes"].as_array().unwrap();
        assert_eq!(outcomes.len(), 2, "{v}");
        for o in outcomes {
            assert_eq!(o["fate"], "dnat", "{v}");
            assert_eq!(o["masquerade"], true, "{v}");
            assert!(
                (o["probability"].as_f64().unwrap() - 0.5).abs() < 1e-9,
                "{v}"
            );
            // The rules that matched: the services map, then the DNAT to this endpoint.
            let rules: Vec<&str> = o["rules"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|r| r.as_str())
                .collect();
            assert!(
                rules
                    .iter()
                    .any(|r| r.starts_with("services: ") && r.contains("vmap @service-ips-v4")),
                "{rules:?}"
            );
            // The service chain goes to the draw among its two endpoints, which finds this
            // one in the endpoint map.
            let ep: std::net::SocketAddr = o["endpoint"].as_str().unwrap().parse().unwrap();
            assert!(
                rules
                    .iter()
                    .any(|r| r == &format!("service-default/{LB}/tcp/80: goto choose-2-tcp-v4")),
                "{rules:?}"
            );
            assert!(
                rules.iter().any(|r| r.starts_with("choose-2-tcp-v4: ")
                    && r.contains("map @endpoints-tcp-v4")
                    && r.ends_with(&format!(": {} . {})", ep.ip(), ep.port()))),
                "{rules:?}"
            );
        }
        assert_eq!(v["announcement"]["mode"], "layer2", "{v}");
        assert_eq!(v["announcement"]["nodes"][0], announcer.as_str(), "{v}");
        assert_eq!(
            v["announcement"]["order"].as_array().unwrap().len(),
            2,
            "{v}"
        );
        assert_eq!(v["kernel"]["as_planned"], true, "{v}");
    }

    // The kernel no longer as planned: with the agent stopped (it would repair it at once),
    // the address's entry deleted from the services map.
    let node = "k3s-worker-rpi002";
    lab.agent_stop(node).unwrap();
    let out = lab
        .exec(
            node,
            &[
                "nft",
                "delete",
                "element",
                "inet",
                "ferry",
                "service-ips-v4",
                &format!("{{ {VIP} . tcp . 80 }}"),
            ],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = explain_json(&lab, node);
    assert_eq!(v["kernel"]["as_planned"], false, "{v}");
    let diffs: Vec<&str> = v["kernel"]["differences"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d.as_str())
        .collect();
    assert!(
        diffs
            .iter()
            .any(|d| d.starts_with("service-ips-v4: element 192.168.2.200 . tcp . 80 missing")),
        "{v}"
    );
    // The agent puts it back.
    lab.agent_start(node).unwrap();
    let deadline = std::time::Instant::now() + common::CONVERGE;
    loop {
        let v = explain_json(&lab, node);
        if v["kernel"]["as_planned"] == true {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not repaired: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
