//! End to end, in a lab of two nodes: what counts as a pod's traffic (kube-proxy's local-traffic
//! detection) and what follows from it.
//! - `externalTrafficPolicy: Local` addresses: a pod on a node without a local endpoint, and
//!   that node itself, still reach the load-balancer address (kube-proxy's "short-circuit pod
//!   traffic" and "short-circuit local traffic", the node's masqueraded); an outside client
//!   through that node's node port does not, and through the endpoint's node keeps its address.
//! - `--masquerade-all`, `--detect-local-mode InterfaceNamePrefix`: whose traffic to a cluster
//!   IP keeps its source.
//! - An address of the service CIDR that no service has: dropped (a timeout, not a refusal).

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use common::{curl_client_addr, curl_client_addr_ok, demo, v4, Lab, CONVERGE};

fn pinned_pod(name: &str, app: &str, node: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: {app}}}}}
spec:
  nodeName: {node}
  containers: [{{name: c, image: web, ports: [{{containerPort: 80}}]}}]
"
    )
}

/// The first load-balancer address of a Service (polled until it has one).
fn lb_address(lab: &Lab, name: &str) -> String {
    let deadline = Instant::now() + CONVERGE;
    loop {
        if let Some(ip) = common::external_ips(lab, name).first() {
            return ip.clone();
        }
        assert!(Instant::now() < deadline, "{name} has no address");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls until a request from `from` to `url` is answered by a pod that saw `seen` as the
/// client's address.
fn until_seen_as(lab: &Lab, from: &str, url: &str, seen: Ipv4Addr) -> String {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let got = curl_client_addr(lab, from, url);
        match &got {
            Ok((body, addr)) if v4(*addr) == seen => return body.clone(),
            _ => assert!(
                Instant::now() < deadline,
                "{url} from {from}: wanted the pod to see {seen}, last: {got:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// curl's exit code for one request (0 when it was answered).
fn curl_exit(lab: &Lab, from: &str, url: &str) -> i32 {
    let out = lab
        .exec(
            from,
            &["curl", "-sS", "-o", "/dev/null", "--max-time", "2", url],
        )
        .expect("exec curl");
    out.status.code().unwrap_or(-1)
}

#[test]
fn pods_and_nodes_reach_local_policy_addresses_and_masquerade_follows_detection() {
    let Some(lab) = common::lab("local_traffic", 2) else {
        return;
    };
    let (n0, n1) = (lab.node_name(0), lab.node_name(1));
    lab.apply_yaml(demo::METALLB_CONFIG).unwrap();
    lab.apply_yaml(&pinned_pod("web-a", "web", &n0)).unwrap();
    lab.apply_yaml(&pinned_pod("shell-b", "shell", &n1))
        .unwrap();
    lab.apply_yaml(
        "apiVersion: v1
kind: Service
metadata: {name: web-local}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector: {app: web}
  ports: [{port: 80}]
",
    )
    .unwrap();
    let lb = lb_address(&lab, "web-local");
    let (cluster_ip, node_port) = common::svc_addr(&lab, "web-local");
    let node_port = node_port.expect("a LoadBalancer has a node port");
    let shell_ip = lab.pod_ip("shell-b").expect("shell-b runs");
    let n1_ip = lab.node_ip(1);
    let url_lb = format!("http://{lb}/");

    // A pod on the node without the endpoint: short-circuited to the service, as from inside
    // (its own address kept).
    let body = until_seen_as(&lab, "shell-b", &url_lb, shell_ip);
    assert_eq!(body, "web-a");
    // That node itself: masqueraded, on to the endpoint on the other node.
    let body = until_seen_as(&lab, &n1, &url_lb, n1_ip);
    assert_eq!(body, "web-a");
    // From outside: the endpoint's node keeps the client's address; the other node's node
    // port has no local endpoint and drops it (kube-proxy's Local semantics).
    let client: Ipv4Addr = "192.168.2.100".parse().unwrap();
    let (_, seen) = curl_client_addr_ok(
        &lab,
        "client",
        &format!("http://{}:{node_port}/", lab.node_ip(0)),
    );
    assert_eq!(v4(seen), client);
    assert_eq!(
        curl_exit(&lab, "client", &format!("http://{n1_ip}:{node_port}/")),
        28,
        "node port of the node without an endpoint"
    );

    // Cluster IP from the pod: its address kept (ClusterCIDR detection, 10.42.0.0/16).
    let url_cip = format!("http://{cluster_ip}/");
    until_seen_as(&lab, "shell-b", &url_cip, shell_ip);
    // --masquerade-all on its node: masqueraded to that node's address.
    lab.agent_restart_with(&n1, &["--masquerade-all"]).unwrap();
    until_seen_as(&lab, "shell-b", &url_cip, n1_ip);
    // Pods told by their interfaces' names instead: the lab's pod veths are vp<N>.
    lab.agent_restart_with(
        &n1,
        &[
            "--detect-local-mode",
            "InterfaceNamePrefix",
            "--pod-interface-name-prefix",
            "vp",
        ],
    )
    .unwrap();
    until_seen_as(&lab, "shell-b", &url_cip, shell_ip);
    // A prefix no pod interface has: the pod's traffic counts as from outside.
    lab.agent_restart_with(
        &n1,
        &[
            "--detect-local-mode",
            "InterfaceNamePrefix",
            "--pod-interface-name-prefix",
            "nomatch",
        ],
    )
    .unwrap();
    until_seen_as(&lab, "shell-b", &url_cip, n1_ip);
    lab.agent_restart_with(&n1, &[]).unwrap();
    until_seen_as(&lab, "shell-b", &url_cip, shell_ip);

    // An unused address of the service CIDR (10.43.0.0/16): dropped, so a timeout.
    let unused: IpAddr = "10.43.250.250".parse().unwrap();
    assert_ne!(IpAddr::V4(cluster_ip), unused);
    let deadline = Instant::now() + CONVERGE;
    loop {
        let code = curl_exit(&lab, "shell-b", &format!("http://{unused}/"));
        if code == 28 {
            break;
        }
        assert!(Instant::now() < deadline, "curl exit {code}, not a timeout");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn prefer_close_keeps_cluster_traffic_in_the_zone() {
    let Some(lab) = common::lab("prefer_close", 2) else {
        return;
    };
    // The lab's nodes alternate zones: node 0 in lab-zone-a, node 1 in lab-zone-b.
    let (n0, n1) = (lab.node_name(0), lab.node_name(1));
    for (pod, node) in [("web-a", &n0), ("web-b", &n1)] {
        lab.apply_yaml(&pinned_pod(pod, "zoned", node)).unwrap();
    }
    for (pod, node) in [("shell-a", &n0), ("shell-b", &n1)] {
        lab.apply_yaml(&pinned_pod(pod, "shell", node)).unwrap();
    }
    let service = |distribution: &str| {
        format!(
            "apiVersion: v1
kind: Service
metadata: {{name: zoned}}
spec:
  selector: {{app: zoned}}
  ports: [{{port: 80}}]
{distribution}"
        )
    };
    lab.apply_yaml(&service("  trafficDistribution: PreferClose\n"))
        .unwrap();
    let (ip, _) = common::svc_addr(&lab, "zoned");
    let url = format!("http://{ip}/");
    // Each client's node keeps it in its zone: 20 answers in a row from the zone's pod (by
    // chance from a 1/2 split: 2^-20).
    for (from, want) in [("shell-a", "web-a"), ("shell-b", "web-b")] {
        common::until_only(&lab, from, &url, want, 5);
        let next = common::answers(&lab, from, &url, 20);
        assert!(next.iter().all(|b| b == want), "{from}: {next:?}");
    }
    // Zone b without a ready endpoint: its node falls back to every endpoint (web-a).
    lab.set_ready("web-b", false).unwrap();
    common::until_only(&lab, "shell-b", &url, "web-a", 20);
    lab.set_ready("web-b", true).unwrap();
    common::until_only(&lab, "shell-b", &url, "web-b", 20);
    // Without trafficDistribution: no hints, both pods from either zone.
    lab.apply_yaml(&service("")).unwrap();
    let both = vec!["web-a".to_string(), "web-b".to_string()];
    common::until_all_answer(&lab, "shell-a", &url, &both);
}
