//! End to end: the dataplane's edges in a lab. Refusing (not black-holing) services without
//! endpoints and unknown cluster-IP ports, node ports on nodes without a local pod
//! (masquerade), hairpin, no lost requests across agent restarts, a bad manifest document that
//! spoils nothing else, `ferry cleanup`, deleted and recreated services, external IPs, and a
//! restarted agent adopting the kernel's table instead of flushing it; a UDP socket reaching a
//! new endpoint once its old one left (conntrack flushed), pool addresses refusing ports no
//! Service uses, and the 1/n split of connections over endpoints (a statistical bound).
//!
//! Each test brings up its own lab (downed on drop, also on panic) and bounds every wait.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{curl_client_addr_ok, demo, pods_of, v4, Lab, CONVERGE};

/// How long a refused connection may take: well under curl's 3 s --max-time, so that a
/// black hole (which times out) cannot pass for a refusal.
const REFUSED_WITHIN: Duration = Duration::from_millis(1500);

/// One `curl -sSv --max-time 3 URL` from `from`: Ok(elapsed) when it was refused (exit 7 and
/// "Connection refused" in curl's verbose output), Err(what happened) otherwise.
fn refused_once(lab: &Lab, from: &str, url: &str) -> Result<Duration, String> {
    let t0 = Instant::now();
    let out = lab
        .exec(from, &["curl", "-sSv", "--max-time", "3", url])
        .expect("exec curl");
    let elapsed = t0.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(7) && stderr.contains("Connection refused") {
        Ok(elapsed)
    } else {
        Err(format!(
            "curl {url} from {from}: {} after {elapsed:?}; stdout {:?}; stderr:\n{stderr}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        ))
    }
}

/// Waits (bounded) until `url` is refused from `from`, then checks that 5 more attempts are all
/// refused within [`REFUSED_WITHIN`]; the slowest of those.
fn refused_quickly(lab: &Lab, from: &str, url: &str) -> Duration {
    let deadline = Instant::now() + CONVERGE;
    loop {
        match refused_once(lab, from, url) {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "never refused: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        let took = refused_once(lab, from, url).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            took < REFUSED_WITHIN,
            "{url} from {from}: refused only after {took:?}"
        );
        slowest = slowest.max(took);
    }
    slowest
}

/// Waits (bounded) until the agent log of `node`, from byte `offset` on, has a line containing
/// `needle`; that line.
fn log_line_after(lab: &Lab, node: &str, offset: usize, needle: &str) -> String {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let log = lab.agent_log(node);
        let tail = log.get(offset..).unwrap_or_default();
        if let Some(line) = tail.lines().find(|l| l.contains(needle)) {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "agent log of {node} has no {needle:?} after byte {offset}:\n{tail}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Restarts the agent on `node` (SIGTERM, start) and waits for its first pass; that pass's log
/// line.
fn restart_and_wait(lab: &Lab, node: &str) -> String {
    let offset = lab.agent_log(node).len();
    let old = lab.agent_pid(node);
    lab.agent_restart(node).expect("agent restart");
    let new = lab.agent_pid(node);
    assert!(
        new.is_some() && new != old,
        "{node}: pid {old:?} -> {new:?}"
    );
    log_line_after(lab, node, offset, " services: ")
}

/// `nft` in a node's namespace; stdout.
fn nft(lab: &Lab, node: &str, args: &[&str]) -> String {
    let mut cmd = vec!["nft"];
    cmd.extend_from_slice(args);
    let out = lab.exec(node, &cmd).expect("exec nft");
    assert!(
        out.status.success(),
        "nft {args:?} in {node}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A Service of the nextcloud pods (selector app=nextcloud, environment=dev).
fn nextcloud_svc(name: &str, extra_spec: &str, ports: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
spec:
  selector:
    app: nextcloud
    environment: dev
{extra_spec}  ports:
{ports}"
    )
}

/// Writes a file into the manifest directory atomically (a dot file first: agents skip those).
fn write_manifest(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("writing manifest");
    std::fs::rename(&tmp, dir.join(name)).expect("renaming manifest");
}

#[test]
fn reject_without_endpoints() {
    let Some(lab) = common::lab("reject_without_endpoints", 2) else {
        return;
    };
    // Both select app=nextcloud, environment=dev: no such pod yet.
    lab.apply_yaml(demo::NEXTCLOUD_DEV_CLUSTERIP).unwrap();
    lab.apply_yaml(demo::NEXTCLOUD_DEV_NODEPORT).unwrap();
    let from = common::debian(&lab);
    let (ip, _) = common::svc_addr(&lab, "nextcloud-dev-clusterip");
    let port = common::node_port(&lab, "nextcloud-dev-nodeport");
    let cluster_url = format!("http://{ip}:8080/");
    let slowest = refused_quickly(&lab, &from, &cluster_url);
    eprintln!("reject_without_endpoints: cluster IP refused within {slowest:?} (slowest of 5)");
    for i in 0..2 {
        let url = format!("http://{}:{port}/", lab.node_ip(i));
        let slowest = refused_quickly(&lab, "client", &url);
        eprintln!("reject_without_endpoints: node port on node {i} refused within {slowest:?}");
    }
    // The node port from a pod, too (the node's own address seen from inside).
    refused_quickly(&lab, &from, &format!("http://{}:{port}/", lab.node_ip(1)));
    // UDP without endpoints: ICMP port unreachable, seen as "refused" by a connected socket.
    lab.apply_yaml(
        "apiVersion: v1
kind: Service
metadata: {name: dns-nobody}
spec:
  selector: {app: nobody}
  ports:
  - {name: dns, protocol: UDP, port: 53}
",
    )
    .unwrap();
    let (dns_ip, _) = common::svc_addr(&lab, "dns-nobody");
    let deadline = Instant::now() + CONVERGE;
    loop {
        match udp_connected(&lab, &from, SocketAddr::from((dns_ip, 53))) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            r => assert!(Instant::now() < deadline, "UDP {dns_ip}:53: {r:?}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // Endpoints appear: both start answering, from every pod.
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    let pods = common::pod_names(&lab, "nextcloud-dev", 2);
    assert_eq!(pods.len(), 2);
    common::until_all_answer(&lab, &from, &cluster_url, &pods);
    for i in 0..2 {
        let url = format!("http://{}:{port}/", lab.node_ip(i));
        common::until_all_answer(&lab, "client", &url, &pods);
    }
}

#[test]
fn cluster_ip_wrong_port_rejected() {
    let Some(lab) = common::lab("cluster_ip_wrong_port_rejected", 2) else {
        return;
    };
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    lab.apply_yaml(demo::NEXTCLOUD_DEV_CLUSTERIP).unwrap();
    let from = common::debian(&lab);
    let (ip, _) = common::svc_addr(&lab, "nextcloud-dev-clusterip");
    // The right port answers (so the rules are in place) ...
    common::curl_ok(&lab, &from, &format!("http://{ip}:8080/"));
    // ... the pods' own port 80 is not a port of the service, nor is 9999.
    for port in [80, 9999] {
        let slowest = refused_quickly(&lab, &from, &format!("http://{ip}:{port}/"));
        eprintln!("cluster_ip_wrong_port_rejected: {ip}:{port} refused within {slowest:?}");
    }
    // Also from a node (locally originated traffic goes through filter-output).
    refused_quickly(&lab, &lab.node_name(1), &format!("http://{ip}:9999/"));
    // UDP on the TCP port: rejected too (ICMP port unreachable), not silently dropped.
    let r = udp_connected(&lab, &from, SocketAddr::from((ip, 8080)));
    let err = r.expect_err("UDP to a TCP-only service port answered");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "UDP to {ip}:8080 was not refused: {err}"
    );
}

/// One datagram from a connected UDP socket in `from`'s namespace (so that an ICMP error comes
/// back as an error); the answer.
fn udp_connected(lab: &Lab, from: &str, to: SocketAddr) -> std::io::Result<String> {
    let ns = ferry_lab::ops::target_ns(lab.ctx(), from).expect("target namespace");
    ferry_lab::sys::in_netns(&ns, || -> std::io::Result<String> {
        let sock = std::net::UdpSocket::bind(("0.0.0.0", 0))?;
        sock.set_read_timeout(Some(Duration::from_secs(1)))?;
        sock.connect(to)?;
        sock.send(b"q")?;
        let mut buf = [0u8; 2048];
        let n = sock.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
    .expect("entering namespace")
}

#[test]
fn node_port_on_node_without_local_pod() {
    let Some(lab) = common::lab("node_port_on_node_without_local_pod", 3) else {
        return;
    };
    lab.apply_yaml(&demo::NEXTCLOUD_DEV.replace("replicas: 2", "replicas: 1"))
        .unwrap();
    lab.apply_yaml(demo::NEXTCLOUD_DEV_NODEPORT).unwrap();
    let pods = pods_of(&lab, "nextcloud-dev");
    assert_eq!(pods.len(), 1, "{pods:?}");
    let pod = &pods[0];
    let port = common::node_port(&lab, "nextcloud-dev-nodeport");
    let st = lab.state().unwrap();
    let pod_node = st.node(&pod.node).unwrap().index;
    for i in 0..3 {
        let url = format!("http://{}:{port}/", lab.node_ip(i));
        for _ in 0..3 {
            let (body, seen) = curl_client_addr_ok(&lab, "client", &url);
            assert_eq!(body, pod.name, "{url}");
            let seen_ip = v4(seen);
            assert_ne!(seen_ip, lab.client_ip(), "{url}: not masqueraded");
            if i == pod_node {
                // Local pod: masqueraded to the node's address on the pod's veth (or its LAN
                // address).
                let gw = Ipv4Addr::new(10, 42, i as u8, 1);
                assert!(
                    seen_ip == gw || seen_ip == lab.node_ip(i),
                    "{url}: pod saw {seen}"
                );
            } else {
                // Forwarded to another node: masqueraded to the receiving node's LAN address.
                assert_eq!(seen_ip, lab.node_ip(i), "{url}: pod saw {seen}");
            }
            eprintln!("node_port_on_node_without_local_pod: via node {i} the pod saw {seen}");
        }
    }
}

#[test]
fn hairpin() {
    let Some(lab) = common::lab("hairpin", 2) else {
        return;
    };
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    lab.apply_yaml(demo::NEXTCLOUD_DEV_CLUSTERIP).unwrap();
    let (ip, _) = common::svc_addr(&lab, "nextcloud-dev-clusterip");
    let url = format!("http://{ip}:8080/");
    let pods = pods_of(&lab, "nextcloud-dev");
    assert_eq!(pods.len(), 2);
    for me in &pods {
        let other = pods.iter().find(|p| p.name != me.name).unwrap();
        let node = lab.state().unwrap().node(&me.node).unwrap().index;
        let (mut by_me, mut by_other, mut tries) = (0, 0, 0);
        for _ in 0..40 {
            tries += 1;
            let (body, seen) = curl_client_addr_ok(&lab, &me.name, &url);
            let seen_ip = v4(seen);
            if body == me.name {
                by_me += 1;
                // Answered by itself: masqueraded, or the reply would never reach the socket.
                assert_ne!(seen_ip, me.ip, "hairpin not masqueraded");
                assert_eq!(seen_ip, Ipv4Addr::new(10, 42, node as u8, 1), "{body}");
            } else {
                assert_eq!(body, other.name);
                by_other += 1;
                // Pod to pod through the service: the source stays the pod's own address.
                assert_eq!(seen_ip, me.ip, "pod-to-pod via service was masqueraded");
            }
            if by_me > 0 && by_other > 0 {
                break;
            }
        }
        eprintln!(
            "hairpin: {} answered by itself {by_me}x and by {} {by_other}x in {tries} tries",
            me.name, other.name
        );
        assert!(
            by_me > 0,
            "{} never answered itself in {tries} tries",
            me.name
        );
        assert!(
            by_other > 0,
            "{} never reached {} in {tries} tries",
            me.name,
            other.name
        );
    }
}

/// Shell loop: `curl` of every URL, each iteration, at least `min` iterations and then until
/// `stop` exists (at most `max` iterations); prints one HTTP code per request ("000": failed).
fn request_loop(urls: &[String], stop: &Path, min: usize, max: usize) -> String {
    format!(
        "i=0; while [ $i -lt {max} ] && {{ [ $i -lt {min} ] || [ ! -e '{}' ]; }}; do \
         for u in {}; do \
         curl -s -o /dev/null -w '%{{http_code}}\\n' --max-time 2 \"$u\"; done; \
         sleep 0.02; i=$((i+1)); done",
        stop.display(),
        urls.join(" ")
    )
}

/// (200s, all requests, the other codes) of a loop's output.
fn count_codes(out: &[u8]) -> (usize, usize, Vec<String>) {
    let text = String::from_utf8_lossy(out);
    let codes: Vec<&str> = text.lines().collect();
    let bad: Vec<String> = codes
        .iter()
        .filter(|c| **c != "200")
        .map(|c| c.to_string())
        .collect();
    (codes.len() - bad.len(), codes.len(), bad)
}

#[test]
fn no_loss_across_agent_restarts() {
    let Some(lab) = common::lab("no_loss_across_agent_restarts", 2) else {
        return;
    };
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    lab.apply_yaml(demo::NEXTCLOUD_DEV_CLUSTERIP).unwrap();
    lab.apply_yaml(demo::NEXTCLOUD_DEV_NODEPORT).unwrap();
    let from = common::debian(&lab);
    let (ip, _) = common::svc_addr(&lab, "nextcloud-dev-clusterip");
    let port = common::node_port(&lab, "nextcloud-dev-nodeport");
    let cluster_url = format!("http://{ip}:8080/");
    let node_urls: Vec<String> = (0..2)
        .map(|i| format!("http://{}:{port}/", lab.node_ip(i)))
        .collect();
    let pods = common::pod_names(&lab, "nextcloud-dev", 2);
    common::until_all_answer(&lab, &from, &cluster_url, &pods);
    for u in &node_urls {
        common::until_all_answer(&lab, "client", u, &pods);
    }

    let stop = lab.dir().join("stop-loops");
    let mut pod_loop = lab
        .spawn(
            &from,
            &[
                "bash",
                "-c",
                &request_loop(std::slice::from_ref(&cluster_url), &stop, 300, 5000),
            ],
        )
        .unwrap();
    let mut client_loop = lab
        .spawn(
            "client",
            &["bash", "-c", &request_loop(&node_urls, &stop, 300, 5000)],
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    for round in 0..5 {
        for node in lab.node_names() {
            let line = restart_and_wait(&lab, &node);
            assert!(
                line.contains("nothing to change"),
                "round {round}, {node}: restarted agent changed the table: {line}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let restarts_took = t0.elapsed();
    // The loops must still be running, or the restarts happened without traffic.
    assert!(
        pod_loop.try_wait().unwrap().is_none(),
        "pod loop ended early"
    );
    assert!(
        client_loop.try_wait().unwrap().is_none(),
        "client loop ended early"
    );
    std::fs::write(&stop, "").unwrap();
    let pod_out = pod_loop.wait_with_output().unwrap();
    let client_out = client_loop.wait_with_output().unwrap();
    let (pod_ok, pod_n, pod_bad) = count_codes(&pod_out.stdout);
    let (client_ok, client_n, client_bad) = count_codes(&client_out.stdout);
    eprintln!(
        "no_loss_across_agent_restarts: 10 restarts in {restarts_took:?}; \
         cluster IP from a pod {pod_ok}/{pod_n} ok, node ports from the client \
         {client_ok}/{client_n} ok"
    );
    assert!(pod_n >= 300, "only {pod_n} requests from the pod");
    assert!(client_n >= 600, "only {client_n} requests from the client");
    assert_eq!(pod_ok, pod_n, "failed requests from the pod: {pod_bad:?}");
    assert_eq!(
        client_ok, client_n,
        "failed requests from the client: {client_bad:?}"
    );
}

#[test]
fn bad_manifest_isolated() {
    // It writes files into the manifest directory: the manifest mode's test.
    let Some(lab) = common::lab_manifests("bad_manifest_isolated", 2) else {
        return;
    };
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    let from = common::debian(&lab);
    let nodes = lab.node_names();
    let pids: Vec<Option<u32>> = nodes.iter().map(|n| lab.agent_pid(n)).collect();
    assert!(pids.iter().all(Option::is_some), "{pids:?}");
    let offsets: Vec<usize> = nodes.iter().map(|n| lab.agent_log(n).len()).collect();

    let port = |p: u32| format!("  - port: {p}\n    targetPort: 80\n");
    let good_a = nextcloud_svc("good-a", "", &port(8080));
    let bad = nextcloud_svc("bad", "", &port(70000));
    let good_b = nextcloud_svc("good-b", "", &port(8081));
    let dir = lab.manifests_dir();
    write_manifest(
        &dir,
        "mixed.yaml",
        &format!("{good_a}---\n{bad}---\n{good_b}"),
    );
    // Let the lab write the EndpointSlices of the services in the new file.
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();

    let pods = common::pod_names(&lab, "nextcloud-dev", 2);
    for (svc, p) in [("good-a", 8080), ("good-b", 8081)] {
        let (ip, _) = common::svc_addr(&lab, svc);
        common::until_all_answer(&lab, &from, &format!("http://{ip}:{p}/"), &pods);
    }
    for (i, node) in nodes.iter().enumerate() {
        let line = log_line_after(&lab, node, offsets[i], "mixed.yaml document 1");
        for want in ["Service default/bad", "spec.ports[0].port", "70000"] {
            assert!(line.contains(want), "{node}: {want:?} missing in {line:?}");
        }
        eprintln!("bad_manifest_isolated: {node} logged: {line}");
        assert_eq!(
            lab.agent_pid(node),
            pids[i],
            "agent on {node} did not survive"
        );
    }

    // Later good changes apply: the bad document fixed, and a new service.
    let fixed = nextcloud_svc("bad", "", &port(8082));
    write_manifest(
        &dir,
        "mixed.yaml",
        &format!("{good_a}---\n{fixed}---\n{good_b}"),
    );
    lab.apply_yaml(&nextcloud_svc("good-c", "", &port(8083)))
        .unwrap();
    for (svc, p) in [("bad", 8082), ("good-c", 8083), ("good-a", 8080)] {
        let (ip, _) = common::svc_addr(&lab, svc);
        common::until_all_answer(&lab, &from, &format!("http://{ip}:{p}/"), &pods);
    }
    for (i, node) in nodes.iter().enumerate() {
        assert_eq!(
            lab.agent_pid(node),
            pids[i],
            "agent on {node} did not survive"
        );
    }
}

#[test]
fn cleanup_removes_table() {
    let Some(lab) = common::lab("cleanup_removes_table", 2) else {
        return;
    };
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    lab.apply_yaml(demo::NEXTCLOUD_DEV_NODEPORT).unwrap();
    let port = common::node_port(&lab, "nextcloud-dev-nodeport");
    let url = |i: usize| format!("http://{}:{port}/", lab.node_ip(i));
    common::curl_ok(&lab, "client", &url(0));
    common::curl_ok(&lab, "client", &url(1));

    let node0 = lab.node_name(0);
    assert!(nft(&lab, &node0, &["list", "tables"]).contains("table inet ferry"));
    lab.agent_stop(&node0).unwrap();
    assert!(lab.agent_pid(&node0).is_none());
    // Stopping leaves the rules: the node port still works.
    common::curl_ok(&lab, "client", &url(0));

    let cleanup = |expect: &str| {
        let out = lab.exec(&node0, &[common::FERRY, "cleanup"]).unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "ferry cleanup: {}: {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(expect), "ferry cleanup said {stdout:?}");
    };
    cleanup("removed table inet ferry");
    let tables = nft(&lab, &node0, &["list", "tables"]);
    assert!(!tables.contains("ferry"), "still there: {tables}");
    cleanup("nothing to do");

    // Node 0 no longer serves the node port (nothing listens: refused); node 1 still does.
    refused_quickly(&lab, "client", &url(0));
    common::curl_ok(&lab, "client", &url(1));
    assert!(nft(&lab, &lab.node_name(1), &["list", "tables"]).contains("table inet ferry"));

    // A fresh agent puts it all back.
    lab.agent_start(&node0).unwrap();
    common::curl_ok(&lab, "client", &url(0));
}

#[test]
fn service_deleted_and_recreated_keeps_working() {
    let Some(lab) = common::lab("service_deleted_and_recreated_keeps_working", 2) else {
        return;
    };
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    lab.apply_yaml(demo::NEXTCLOUD_DEV_CLUSTERIP).unwrap();
    lab.apply_yaml(demo::NEXTCLOUD_DEV_NODEPORT).unwrap();
    let from = common::debian(&lab);
    let pods = common::pod_names(&lab, "nextcloud-dev", 2);
    let (mut ip, _) = common::svc_addr(&lab, "nextcloud-dev-clusterip");
    let mut port = common::node_port(&lab, "nextcloud-dev-nodeport");
    common::until_all_answer(&lab, &from, &format!("http://{ip}:8080/"), &pods);
    let node1_url = format!("http://{}:{port}/", lab.node_ip(1));
    common::until_all_answer(&lab, "client", &node1_url, &pods);

    for round in 0..2 {
        lab.delete("svc", "nextcloud-dev-clusterip").unwrap();
        lab.delete("svc", "nextcloud-dev-nodeport").unwrap();
        common::until_fails(&lab, &from, &format!("http://{ip}:8080/"));
        for i in 0..2 {
            let url = format!("http://{}:{port}/", lab.node_ip(i));
            common::until_fails(&lab, "client", &url);
        }

        lab.apply_yaml(demo::NEXTCLOUD_DEV_CLUSTERIP).unwrap();
        lab.apply_yaml(demo::NEXTCLOUD_DEV_NODEPORT).unwrap();
        let (new_ip, _) = common::svc_addr(&lab, "nextcloud-dev-clusterip");
        let new_port = common::node_port(&lab, "nextcloud-dev-nodeport");
        eprintln!(
            "service_deleted_and_recreated_keeps_working: round {round}: cluster IP {ip} -> \
             {new_ip}, node port {port} -> {new_port}"
        );
        (ip, port) = (new_ip, new_port);
        common::until_all_answer(&lab, &from, &format!("http://{ip}:8080/"), &pods);
        for i in 0..2 {
            let url = format!("http://{}:{port}/", lab.node_ip(i));
            common::until_all_answer(&lab, "client", &url, &pods);
        }
    }
}

#[test]
fn external_ips() {
    let Some(lab) = common::lab("external_ips", 2) else {
        return;
    };
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    let ext = Ipv4Addr::new(192, 168, 2, 50);
    lab.apply_yaml(&nextcloud_svc(
        "external",
        "  externalIPs:\n  - 192.168.2.50\n",
        "  - port: 8080\n    targetPort: 80\n",
    ))
    .unwrap();
    let pods = common::pod_names(&lab, "nextcloud-dev", 2);
    let url = format!("http://{ext}:8080/");
    // Nobody owns 192.168.2.50 on the LAN: the client sends it to a node, as a router would.
    for i in 0..2 {
        let node_ip = lab.node_ip(i).to_string();
        let out = lab
            .exec(
                "client",
                &["ip", "route", "replace", "192.168.2.50/32", "via", &node_ip],
            )
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        common::until_all_answer(&lab, "client", &url, &pods);
        for _ in 0..4 {
            let (body, seen) = curl_client_addr_ok(&lab, "client", &url);
            assert!(pods.contains(&body), "{body}");
            // externalTrafficPolicy Cluster: masqueraded by the receiving node, to its LAN
            // address, or to its pod-side address when the pod is its own.
            let pod_node = lab
                .state()
                .unwrap()
                .node(&lab.pod(&body).unwrap().node)
                .unwrap()
                .index;
            let mut allowed = vec![lab.node_ip(i)];
            if pod_node == i {
                allowed.push(Ipv4Addr::new(10, 42, i as u8, 1));
            }
            assert!(
                allowed.contains(&v4(seen)),
                "via node {i}, {body} saw {seen}"
            );
        }
        eprintln!("external_ips: {url} answered by {pods:?} via node {i}");
    }
    // Only the service's ports are served on the external IP.
    let other = format!("http://{ext}:8081/");
    assert!(lab.curl("client", &other).is_err(), "{other} answered");

    // No ready endpoint left: the external IP refuses (externalTrafficPolicy Cluster).
    for p in &pods {
        lab.set_ready(p, false).unwrap();
    }
    let slowest = refused_quickly(&lab, "client", &url);
    eprintln!("external_ips: without endpoints {url} refused within {slowest:?}");
    lab.set_ready(&pods[0], true).unwrap();
    common::until_all_answer(&lab, "client", &url, &pods[..1]);
}

#[test]
fn restart_adopts_without_flush() {
    let Some(lab) = common::lab("restart_adopts_without_flush", 2) else {
        return;
    };
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    lab.apply_yaml(demo::NEXTCLOUD_DEV_CLUSTERIP).unwrap();
    lab.apply_yaml(demo::NEXTCLOUD_DEV_NODEPORT).unwrap();
    let from = common::debian(&lab);
    let pods = common::pod_names(&lab, "nextcloud-dev", 2);
    let (ip, _) = common::svc_addr(&lab, "nextcloud-dev-clusterip");
    let port = common::node_port(&lab, "nextcloud-dev-nodeport");
    common::until_all_answer(&lab, &from, &format!("http://{ip}:8080/"), &pods);
    for i in 0..2 {
        let url = format!("http://{}:{port}/", lab.node_ip(i));
        common::until_all_answer(&lab, "client", &url, &pods);
    }
    // Let any pass still under way (the debian pod's slice changes nothing, but still) finish.
    std::thread::sleep(Duration::from_millis(500));

    for node in lab.node_names() {
        // With handles: a table, chain, rule or set deleted and made again would show.
        let before = nft(&lab, &node, &["-a", "list", "table", "inet", "ferry"]);
        let first = before.lines().next().unwrap_or_default();
        assert!(first.contains("table inet ferry { # handle"), "{first}");
        let line = restart_and_wait(&lab, &node);
        eprintln!("restart_adopts_without_flush: {node}: {line}");
        assert!(
            line.contains("services: table already as planned, nothing to change"),
            "{node}: restarted agent did not adopt the table: {line}\nlog:\n{}",
            lab.agent_log(&node)
        );
        let after = nft(&lab, &node, &["-a", "list", "table", "inet", "ferry"]);
        assert_eq!(before, after, "{node}: table changed by the restart");
    }
    common::until_all_answer(&lab, &from, &format!("http://{ip}:8080/"), &pods);
}

/// A UDP "connection" (one source port) to a Service keeps its conntrack entry, and so its
/// endpoint, for as long as it keeps sending: when that endpoint leaves the Service the agents
/// delete the entries, so the same socket reaches the new endpoint (the pod that left still
/// runs and would answer otherwise).
#[test]
fn udp_conntrack_flushed_when_endpoint_goes() {
    let Some(lab) = common::lab("udp_conntrack_flushed_when_endpoint_goes", 2) else {
        return;
    };
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    lab.apply_yaml(&nextcloud_svc(
        "dns",
        "",
        "  - {name: dns, protocol: UDP, port: 53, targetPort: 80}\n",
    ))
    .unwrap();
    let from = common::debian(&lab);
    let (ip, _) = common::svc_addr(&lab, "dns");
    let to = SocketAddr::from((ip, 53));
    let pods = common::pod_names(&lab, "nextcloud-dev", 2);
    let (a, b) = (&pods[0], &pods[1]);
    // Both pods answer first (both started and ready) ...
    let deadline = Instant::now() + CONVERGE;
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 2 {
        if let Ok(x) = lab.udp(&from, to, b"q", Duration::from_millis(300)) {
            seen.insert(x.trim().to_string());
        }
        assert!(Instant::now() < deadline, "{to}: only {seen:?} answered");
    }
    // ... then only a is an endpoint: fresh sockets (new conntrack entries) reach a only. 30 in
    // a row: while b is still in the rules, each has even odds, so a false "done" is 1 in 1e9.
    lab.set_ready(b, false).unwrap();
    let deadline = Instant::now() + CONVERGE;
    let mut run = 0;
    while run < 30 {
        let got = lab.udp(&from, to, b"q", Duration::from_millis(300));
        run = if matches!(&got, Ok(x) if x.trim() == a) {
            run + 1
        } else {
            0
        };
        assert!(
            Instant::now() < deadline,
            "{to} never answered by {a} only: {got:?}"
        );
    }
    // One socket, one source port, one conntrack entry: answered by a.
    let ns = common::ns_of(&lab, &from);
    let sock = ferry_lab::sys::in_netns(&ns, || std::net::UdpSocket::bind(("0.0.0.0", 0)))
        .unwrap()
        .unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let ask = |sock: &std::net::UdpSocket| -> Result<String, String> {
        sock.send_to(b"q", to).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 512];
        let (n, _) = sock.recv_from(&mut buf).map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
    };
    assert_eq!(ask(&sock).as_deref(), Ok(a.as_str()));
    // Swap the endpoints: b in, a out. The socket keeps sending (the entry never idles out).
    lab.set_ready(b, true).unwrap();
    lab.set_ready(a, false).unwrap();
    let t0 = Instant::now();
    let mut answers = Vec::new();
    loop {
        let got = ask(&sock);
        if got.as_deref() == Ok(b.as_str()) {
            break;
        }
        answers.push(got);
        assert!(
            t0.elapsed() < CONVERGE,
            "the same UDP socket still reaches {a} (not an endpoint) after {:?}: last answers \
             {:?}; log of the client's node:\n{}",
            t0.elapsed(),
            &answers[answers.len().saturating_sub(5)..],
            lab.agent_log(&lab.pod(&from).unwrap().node)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "udp_conntrack_flushed_when_endpoint_goes: the same socket reached {b} after {:?} \
         ({} answers before)",
        t0.elapsed(),
        answers.len()
    );
}

/// Traffic to a load-balancer pool address on a port no Service uses there is refused at
/// once (not forwarded, not black-holed): an address of the pool no Service has, and the
/// Service's own address on another port.
#[test]
fn pool_addresses_refuse_ports_without_service() {
    let Some(lab) = common::lab("pool_addresses_refuse_ports_without_service", 2) else {
        return;
    };
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    lab.apply_yaml(demo::NEXTCLOUD_DEV_LOADBALANCER).unwrap();
    lab.apply_yaml(demo::METALLB_CONFIG).unwrap();
    common::wait_external_ips(&lab, "nextcloud-dev-loadbalancer", &["192.168.2.200"]);
    let pods = common::pod_names(&lab, "nextcloud-dev", 2);
    // Send both addresses to node 0, as a router would (no layer 2 needed here).
    let node_ip = lab.node_ip(0).to_string();
    for dst in ["192.168.2.200/32", "192.168.2.201/32"] {
        common::run_ok(
            &lab,
            "client",
            &["ip", "route", "replace", dst, "via", &node_ip],
        );
    }
    // The route works: the Service answers on its port.
    common::until_all_answer(&lab, "client", "http://192.168.2.200/", &pods);
    for url in ["http://192.168.2.200:8081/", "http://192.168.2.201/"] {
        let slowest = refused_quickly(&lab, "client", url);
        eprintln!("pool_addresses_refuse_ports_without_service: {url} refused within {slowest:?}");
    }
}

/// Each of n endpoints gets 1/n of new connections, measured on real TCP connections to a
/// cluster IP. Bound: Hoeffding, P(|count - N/n| >= t) <= 2 exp(-2 t^2 / N) per endpoint; with
/// the union over n endpoints, t = sqrt(N ln(2n * 10^6) / 2) makes a false failure rarer than
/// once in a million runs. It still catches the classic skew (1/2, 1/4, 1/4 of three).
#[test]
fn connections_split_evenly_over_endpoints() {
    let Some(lab) = common::lab("connections_split_evenly_over_endpoints", 2) else {
        return;
    };
    const N: usize = 900;
    lab.apply_yaml(&demo::NEXTCLOUD_DEV.replace("replicas: 2", "replicas: 3"))
        .unwrap();
    lab.apply_yaml(demo::NEXTCLOUD_DEV_CLUSTERIP).unwrap();
    let from = common::debian(&lab);
    let (ip, _) = common::svc_addr(&lab, "nextcloud-dev-clusterip");
    let pods = common::pod_names(&lab, "nextcloud-dev", 3);
    common::until_all_answer(&lab, &from, &format!("http://{ip}:8080/"), &pods);
    let to = SocketAddr::from((ip, 8080));
    let ns = common::ns_of(&lab, &from);
    let bodies = ferry_lab::sys::in_netns(&ns, || -> Result<Vec<String>, String> {
        use std::io::{Read, Write};
        (0..N)
            .map(|i| {
                // A new connection each time: a new source port, a new conntrack entry.
                let mut c = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))
                    .map_err(|e| format!("connection {i}: {e}"))?;
                c.set_read_timeout(Some(Duration::from_secs(2)))
                    .map_err(|e| e.to_string())?;
                c.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
                    .map_err(|e| format!("connection {i}: {e}"))?;
                let mut text = String::new();
                c.read_to_string(&mut text)
                    .map_err(|e| format!("connection {i}: {e}"))?;
                let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
                Ok(body.trim().to_string())
            })
            .collect()
    })
    .unwrap()
    .unwrap_or_else(|e| panic!("{e}"));
    let n = pods.len() as f64;
    let t = (N as f64 * (2.0 * n * 1e6).ln() / 2.0).sqrt();
    let expected = N as f64 / n;
    let mut counts = std::collections::BTreeMap::new();
    for b in &bodies {
        *counts.entry(b.as_str()).or_insert(0usize) += 1;
    }
    eprintln!(
        "connections_split_evenly_over_endpoints: {N} connections: {counts:?} (expected \
         {expected:.0} each, allowed +-{t:.0})"
    );
    assert_eq!(
        counts.len(),
        pods.len(),
        "answers from {counts:?}, pods {pods:?}"
    );
    for p in &pods {
        let got = counts.get(p.as_str()).copied().unwrap_or(0) as f64;
        assert!(
            (got - expected).abs() < t,
            "{p}: {got} of {N} connections, expected {expected:.0} +- {t:.0}: {counts:?}"
        );
    }
}
