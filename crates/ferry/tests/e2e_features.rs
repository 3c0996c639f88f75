//! End to end, in a lab: ClientIP session affinity, loadBalancerSourceRanges and the
//! health-check node port of `externalTrafficPolicy: Local` load balancers, through the agents'
//! nftables rules with real curl.
//!
//! The statistical checks are sized to fail by chance less than once in a million runs.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{demo, Lab};

/// Extra source addresses of the lab's client (it is 192.168.2.100 on the LAN): each is "another
/// client" to the nodes.
fn client_addresses(lab: &Lab, n: u8) -> Vec<String> {
    (0..n)
        .map(|i| {
            let a = format!("192.168.2.{}", 150 + i);
            common::run_ok(
                lab,
                "client",
                &["ip", "addr", "add", &format!("{a}/24"), "dev", "eth0"],
            );
            a
        })
        .collect()
}

/// What one curl got: the status, the head (lower-cased) and the body; or curl's exit code
/// (28: timed out, 7: refused).
struct Fetched {
    status: u16,
    head: String,
    body: String,
}

fn fetch(lab: &Lab, target: &str, src: Option<&str>, url: &str) -> Result<Fetched, i32> {
    let mut cmd = vec!["curl", "-sS", "-i", "--max-time", "2"];
    if let Some(s) = src {
        cmd.extend(["--interface", s]);
    }
    cmd.push(url);
    let out = lab.exec(target, &cmd).expect("exec");
    if !out.status.success() {
        return Err(out.status.code().unwrap_or(-1));
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok(Fetched {
        status,
        head: head.to_ascii_lowercase(),
        body: body.trim().to_string(),
    })
}

/// The pod that answered `url` from `src` (polled until something answers).
fn answer_from(lab: &Lab, src: &str, url: &str) -> String {
    let deadline = Instant::now() + common::CONVERGE;
    loop {
        match fetch(lab, "client", Some(src), url) {
            Ok(f) if f.status == 200 => return f.body,
            other => assert!(
                Instant::now() < deadline,
                "{url} from {src}: {:?}",
                other.map(|f| f.status)
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A field of a Service's JSON as the lab shows it (the API's object in API mode).
fn svc_field(lab: &Lab, name: &str, pointer: &str) -> Option<serde_json::Value> {
    let json = lab.ferry_get(&["svc", "-o", "json"]).ok()?;
    let v: serde_json::Value = serde_json::from_str(&json).ok()?;
    v["items"]
        .as_array()?
        .iter()
        .find(|s| s["metadata"]["name"].as_str() == Some(name))?
        .pointer(pointer)
        .cloned()
}

const STICKY: &str = "apiVersion: v1
kind: Service
metadata: {name: sticky}
spec:
  type: NodePort
  selector: {app: nextcloud, environment: dev}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 2}}
  ports: [{port: 8080, targetPort: 80}]
";

#[test]
fn client_ip_affinity_sticks_until_the_timeout_and_leaves_gone_endpoints() {
    let Some(lab) = common::lab("client_ip_affinity", 2) else {
        return;
    };
    lab.apply_yaml(&demo::NEXTCLOUD_DEV.replace("replicas: 2", "replicas: 3"))
        .unwrap();
    lab.apply_yaml(STICKY).unwrap();
    let pods = common::pod_names(&lab, "nextcloud-dev", 3);
    let (cip, np) = common::svc_addr(&lab, "sticky");
    let np = np.expect("a node port");

    // One client (a pod, through the cluster IP): 20 connections, one endpoint. Without
    // affinity all 20 on one of 3 pods has probability 3^-19 (< 1e-9).
    let from = common::debian(&lab);
    let url = format!("http://{cip}:8080/");
    common::curl_ok(&lab, &from, &url);
    let seen: BTreeSet<String> = common::answers(&lab, &from, &url, 20).into_iter().collect();
    assert_eq!(seen.len(), 1, "one client, one endpoint: {seen:?}");
    assert!(pods.contains(seen.iter().next().unwrap()), "{seen:?}");

    // 16 clients (source addresses) through the node port: they do not all land on one pod
    // (by chance: 3 * 3^-16 < 1e-7).
    let srcs = client_addresses(&lab, 16);
    let url = format!("http://{}:{np}/", lab.node_ip(0));
    let mut first: BTreeMap<String, String> = BTreeMap::new();
    for s in &srcs {
        first.insert(s.clone(), answer_from(&lab, s, &url));
    }
    let spread: BTreeSet<&String> = first.values().collect();
    assert!(spread.len() >= 2, "other clients still spread: {first:?}");
    // A client keeps its pod while it keeps connecting, here every 0.5 s for 3 s, past the
    // 2 s timeout: the timeout counts from its last connection.
    let s0 = &srcs[0];
    let kept = answer_from(&lab, s0, &url);
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(answer_from(&lab, s0, &url), kept, "{s0} moved");
    }
    first.insert(s0.clone(), kept);

    // After the timeout, clients land afresh: not all 16 on the pod they had (each keeps it
    // with probability 1/3: 3^-16 < 1e-7 by chance).
    std::thread::sleep(Duration::from_millis(3000));
    let after: BTreeMap<String, String> = srcs
        .iter()
        .map(|s| (s.clone(), answer_from(&lab, s, &url)))
        .collect();
    let moved = srcs.iter().filter(|s| after[*s] != first[*s]).count();
    assert!(moved > 0, "nobody moved after the timeout: {after:?}");

    // An endpoint that goes (not ready): the clients it had are never sent to it again, and
    // stick to their new endpoint.
    let (src, gone) = after
        .iter()
        .next()
        .map(|(s, p)| (s.clone(), p.clone()))
        .unwrap();
    lab.set_ready(&gone, false).unwrap();
    let deadline = Instant::now() + common::CONVERGE;
    loop {
        let got = answer_from(&lab, &src, &url);
        if got != gone {
            break;
        }
        assert!(Instant::now() < deadline, "{src} still sent to {gone}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let again: BTreeSet<String> = (0..10).map(|_| answer_from(&lab, &src, &url)).collect();
    assert_eq!(again.len(), 1, "{again:?}");
    assert!(!again.contains(&gone), "{again:?}");
}

#[test]
fn load_balancer_source_ranges_filter_the_lb_address_not_the_node_port() {
    let Some(lab) = common::lab("load_balancer_source_ranges", 2) else {
        return;
    };
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    lab.apply_yaml(demo::METALLB_CONFIG).unwrap();
    let guarded = |ranges: &str, annotation: &str| {
        format!(
            "apiVersion: v1
kind: Service
metadata:
  name: guarded
  annotations: {{service.beta.kubernetes.io/load-balancer-source-ranges: '{annotation}'}}
spec:
  type: LoadBalancer
  selector: {{app: nextcloud, environment: dev}}
  loadBalancerSourceRanges: [{ranges}]
  ports: [{{port: 80}}]
"
        )
    };
    // The client's own address is in the range; another of its addresses is not.
    lab.apply_yaml(&guarded("192.168.2.100/32", "")).unwrap();
    common::wait_external_ips(&lab, "guarded", &["192.168.2.200"]);
    let np = common::node_port(&lab, "guarded");
    let outside = client_addresses(&lab, 1).remove(0);
    let lb = "http://192.168.2.200/";
    let pods = common::pod_names(&lab, "nextcloud-dev", 2);
    assert!(pods.contains(&answer_from(&lab, "192.168.2.100", lb)));
    // Outside: dropped (curl times out: 28), not refused.
    for _ in 0..3 {
        assert_eq!(
            fetch(&lab, "client", Some(&outside), lb).err(),
            Some(28),
            "{outside} reached the LB address"
        );
    }
    // The node port is not filtered, from either address, on either node.
    for i in 0..2 {
        let url = format!("http://{}:{np}/", lab.node_ip(i));
        for src in ["192.168.2.100", outside.as_str()] {
            assert!(pods.contains(&answer_from(&lab, src, &url)), "{src} {url}");
        }
    }

    // kube-proxy's annotation, when the field is empty: now the other address is the one let in.
    lab.apply_yaml(&guarded("", &format!("{outside}/32")))
        .unwrap();
    assert!(pods.contains(&answer_from(&lab, &outside, lb)));
    let deadline = Instant::now() + common::CONVERGE;
    while fetch(&lab, "client", Some("192.168.2.100"), lb).err() != Some(28) {
        assert!(
            Instant::now() < deadline,
            "192.168.2.100 still reaches {lb}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn pinned_pod(name: &str, node: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: hc}}}}
spec:
  nodeName: {node}
  containers: [{{name: web, image: web, ports: [{{containerPort: 80}}]}}]
"
    )
}

/// Polls the health port of node `i` until it answers `status`; the answer.
fn health_until(lab: &Lab, i: usize, port: u16, status: u16) -> Fetched {
    let url = format!("http://{}:{port}/", lab.node_ip(i));
    let deadline = Instant::now() + common::CONVERGE;
    loop {
        let got = fetch(lab, "client", None, &url);
        match got {
            Ok(f) if f.status == status => return f,
            other => assert!(
                Instant::now() < deadline,
                "{url}: wanted {status}, got {:?}",
                other.map(|f| (f.status, f.body))
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn health_check_node_port_follows_the_local_endpoints() {
    let Some(lab) = common::lab("health_check_node_port", 2) else {
        return;
    };
    let (n0, n1) = (lab.node_name(0), lab.node_name(1));
    lab.apply_yaml(&pinned_pod("hc-a", &n0)).unwrap();
    lab.apply_yaml(
        "apiVersion: v1
kind: Service
metadata: {name: local-lb}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector: {app: hc}
  ports: [{port: 80}]
",
    )
    .unwrap();
    let deadline = Instant::now() + common::CONVERGE;
    let port = loop {
        if let Some(p) = svc_field(&lab, "local-lb", "/spec/healthCheckNodePort")
            .and_then(|v| v.as_u64())
            .and_then(|p| u16::try_from(p).ok())
        {
            break p;
        }
        assert!(Instant::now() < deadline, "no spec.healthCheckNodePort");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!((30000..=32767).contains(&port), "{port}");
    assert_ne!(Some(port), common::svc_addr(&lab, "local-lb").1);

    // The node with the endpoint: 200 and its count; the other: 503 and 0. Both through
    // ferry's nftables, from outside the cluster.
    let ok = health_until(&lab, 0, port, 200);
    assert!(
        ok.head.contains("content-type: application/json"),
        "{}",
        ok.head
    );
    assert!(
        ok.head.contains("x-content-type-options: nosniff"),
        "{}",
        ok.head
    );
    let body: serde_json::Value = serde_json::from_str(&ok.body).expect("JSON");
    assert_eq!(
        body,
        serde_json::json!({"service": {"namespace": "default", "name": "local-lb"},
                           "localEndpoints": 1, "serviceProxyHealthy": true})
    );
    let none = health_until(&lab, 1, port, 503);
    let body: serde_json::Value = serde_json::from_str(&none.body).expect("JSON");
    assert_eq!(body["localEndpoints"], 0);
    assert_eq!(body["serviceProxyHealthy"], true);

    // The endpoint moves to the other node: the answers follow.
    lab.delete("pod", "hc-a").unwrap();
    lab.apply_yaml(&pinned_pod("hc-b", &n1)).unwrap();
    health_until(&lab, 0, port, 503);
    let ok = health_until(&lab, 1, port, 200);
    assert!(ok.body.contains("\"localEndpoints\":1"), "{}", ok.body);

    // Two endpoints on one node count twice.
    lab.apply_yaml(&pinned_pod("hc-c", &n1)).unwrap();
    let deadline = Instant::now() + common::CONVERGE;
    loop {
        let f = health_until(&lab, 1, port, 200);
        if f.body.contains("\"localEndpoints\":2") {
            break;
        }
        assert!(Instant::now() < deadline, "{}", f.body);
        std::thread::sleep(Duration::from_millis(100));
    }
}
