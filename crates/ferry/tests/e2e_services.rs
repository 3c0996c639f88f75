//! End to end: ClusterIP and NodePort Services through the agents' nftables rules, in a lab.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::demo;

#[test]
fn cluster_ip_reaches_every_pod_from_a_pod() {
    let Some(lab) = common::lab("cluster_ip_reaches_every_pod_from_a_pod", 2) else {
        return;
    };
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    lab.apply_yaml(demo::NEXTCLOUD_DEV_CLUSTERIP).unwrap();
    let from = common::debian(&lab);
    let (ip, _) = common::svc_addr(&lab, "nextcloud-dev-clusterip");
    assert!(ip.octets()[..2] == [10, 43], "{ip}");
    let url = format!("http://{ip}:8080/");
    let pods = common::pod_names(&lab, "nextcloud-dev", 2);
    common::until_all_answer(&lab, &from, &url, &pods);
    // Also from a node (host-originated traffic) and from a backend pod itself (hairpin).
    for from in [lab.node_name(0), lab.node_name(1), pods[0].clone()] {
        let body = common::curl_ok(&lab, &from, &url);
        assert!(pods.contains(&body), "{from}: {body}");
    }
    // The client is outside the cluster: no route to the service CIDR.
    assert!(lab.curl("client", &url).is_err());
}

#[test]
fn node_port_answers_on_every_node_from_outside() {
    let Some(lab) = common::lab("node_port_answers_on_every_node_from_outside", 2) else {
        return;
    };
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    lab.apply_yaml(demo::NEXTCLOUD_DEV_NODEPORT).unwrap();
    let port = common::node_port(&lab, "nextcloud-dev-nodeport");
    assert!((30000..=32767).contains(&port), "{port}");
    let pods = common::pod_names(&lab, "nextcloud-dev", 2);
    for i in 0..2 {
        let url = format!("http://{}:{port}/", lab.node_ip(i));
        common::until_all_answer(&lab, "client", &url, &pods);
    }
}

#[test]
fn udp_service() {
    let Some(lab) = common::lab("udp_service", 2) else {
        return;
    };
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    lab.apply_yaml(
        "apiVersion: v1
kind: Service
metadata: {name: dns}
spec:
  selector: {app: nextcloud}
  ports:
  - {name: dns, protocol: UDP, port: 53, targetPort: 80}
",
    )
    .unwrap();
    let from = common::debian(&lab);
    let (ip, _) = common::svc_addr(&lab, "dns");
    let pods = common::pod_names(&lab, "nextcloud-dev", 2);
    let deadline = std::time::Instant::now() + common::CONVERGE;
    let answer = loop {
        match lab.udp(
            &from,
            SocketAddr::from((ip, 53)),
            b"q",
            Duration::from_millis(500),
        ) {
            Ok(a) => break a,
            Err(e) => assert!(std::time::Instant::now() < deadline, "{e:#}"),
        }
    };
    assert!(pods.contains(&answer.trim().to_string()), "{answer}");
}

#[test]
fn endpoints_follow_readiness_scaling_and_deletion() {
    let Some(lab) = common::lab("endpoints_follow_readiness_scaling_and_deletion", 2) else {
        return;
    };
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    lab.apply_yaml(demo::NEXTCLOUD_DEV_CLUSTERIP).unwrap();
    let from = common::debian(&lab);
    let (ip, _) = common::svc_addr(&lab, "nextcloud-dev-clusterip");
    let url = format!("http://{ip}:8080/");
    let pods = common::pod_names(&lab, "nextcloud-dev", 2);
    common::until_all_answer(&lab, &from, &url, &pods);

    // A pod marked not ready gets no new connections.
    lab.set_ready(&pods[0], false).unwrap();
    common::until_only(&lab, &from, &url, &pods[1], 12);
    lab.set_ready(&pods[0], true).unwrap();
    common::until_all_answer(&lab, &from, &url, &pods);

    // Scaling up adds endpoints.
    lab.apply_yaml(&demo::NEXTCLOUD_DEV.replace("replicas: 2", "replicas: 3"))
        .unwrap();
    let three = common::pod_names(&lab, "nextcloud-dev", 3);
    common::until_all_answer(&lab, &from, &url, &three);

    // Deleting the service stops it.
    lab.delete("svc", "nextcloud-dev-clusterip").unwrap();
    common::until_fails(&lab, &from, &url);
}

#[test]
fn agents_restart_and_catch_up() {
    let Some(lab) = common::lab("agents_restart_and_catch_up", 2) else {
        return;
    };
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    lab.apply_yaml(demo::NEXTCLOUD_DEV_NODEPORT).unwrap();
    let port = common::node_port(&lab, "nextcloud-dev-nodeport");
    let url0 = format!("http://{}:{port}/", lab.node_ip(0));
    common::curl_ok(&lab, "client", &url0);

    // Killed agent: the kernel keeps the rules, the service keeps working.
    let node0 = lab.node_name(0);
    lab.agent_kill(&node0).unwrap();
    assert!(lab.agent_pid(&node0).is_none());
    common::answers(&lab, "client", &url0, 3);

    // A service made while the agent is down works once it is back.
    lab.apply_yaml(demo::NEXTCLOUD_DEV_CLUSTERIP).unwrap();
    lab.agent_start(&node0).unwrap();
    let (ip, _) = common::svc_addr(&lab, "nextcloud-dev-clusterip");
    let pods = common::pod_names(&lab, "nextcloud-dev", 2);
    common::until_all_answer(&lab, &node0, &format!("http://{ip}:8080/"), &pods);

    // A restart keeps serving.
    lab.agent_restart(&node0).unwrap();
    assert!(lab.agent_pid(&node0).is_some());
    common::curl_ok(&lab, "client", &url0);
}
