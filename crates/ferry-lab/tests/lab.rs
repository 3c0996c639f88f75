//! Tests of the lab itself (no agents): topology, pods, EndpointSlices, delete, down.
//! They need root; without it they skip (or fail when $CI is set).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_lab::{demo, require_root, Lab, LabConfig};

const EXE: &str = env!("CARGO_BIN_EXE_ferry-lab");

fn lab(nodes: usize) -> Lab {
    LabConfig::new(Lab::unique_prefix())
        .nodes(nodes)
        .agents(false)
        .exe(EXE)
        .up()
        .expect("lab up")
}

/// A lab without an API server, whatever $FERRY_LAB_API says: for tests of the manifest
/// directory (the files the lab writes for the agents).
fn manifest_lab(nodes: usize) -> Lab {
    LabConfig::new(Lab::unique_prefix())
        .nodes(nodes)
        .agents(false)
        .api(false)
        .exe(EXE)
        .up()
        .expect("lab up")
}

/// Namespaces whose name starts with "<prefix>-".
fn namespaces_of(prefix: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .map(str::to_string)
        .collect()
}

fn slice_file(lab: &Lab, svc: &str) -> PathBuf {
    lab.manifests_dir()
        .join(format!("endpointslice-default-{svc}.yaml"))
}

fn read_yaml(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("slice file");
    let docs: Vec<serde_json::Value> = ferry_source::manifest::documents(&text)
        .into_iter()
        .map(|d| d.expect("yaml"))
        .filter(|v| !v.is_null())
        .collect();
    assert_eq!(docs.len(), 1, "{text}");
    docs.into_iter().next().unwrap_or_default()
}

#[test]
fn seed_deployment_pods_talk_across_nodes() {
    if !require_root("seed_deployment_pods_talk_across_nodes") {
        return;
    }
    let mut lab = lab(2);
    let out = lab.apply_yaml(demo::NEXTCLOUD_DEV).expect("apply");
    assert_eq!(out, "deployment.apps/nextcloud-dev created");
    let pods = lab.pods();
    assert_eq!(pods.len(), 2);
    assert_ne!(pods[0].node, pods[1].node, "spread over both nodes");
    for p in &pods {
        assert!(p.name.starts_with("nextcloud-dev-"), "{}", p.name);
        let parts: Vec<&str> = p.name.rsplitn(3, '-').collect();
        assert_eq!(parts[0].len(), 5, "{}", p.name);
        assert_eq!(parts[1].len(), 10, "{}", p.name);
        let node = lab.state().unwrap().node(&p.node).unwrap().index;
        assert_eq!(p.ip.octets()[..3], [10, 42, node as u8]);
    }
    // Pod to pod by pod IP, both directions.
    for (from, to) in [(&pods[0], &pods[1]), (&pods[1], &pods[0])] {
        let body = lab
            .curl(&from.name, &format!("http://{}/", to.ip))
            .expect("pod to pod");
        assert_eq!(body, format!("{}\n", to.name));
        let udp = lab
            .udp(
                &from.name,
                SocketAddr::from((to.ip, 80)),
                b"hi",
                Duration::from_secs(2),
            )
            .expect("udp");
        assert_eq!(udp, format!("{}\n", to.name));
    }
    // The source a pod sees is the other pod's IP (no NAT between pods).
    let out = lab
        .exec(
            &pods[0].name,
            &["curl", "-sS", "-D", "-", &format!("http://{}/", pods[1].ip)],
        )
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("X-Client-Addr: {}:", pods[0].ip)),
        "{text}"
    );
    // Nodes reach pods; the client reaches node IPs but not pods.
    let node0 = lab.node_name(0);
    assert_eq!(
        lab.curl(&node0, &format!("http://{}/", pods[1].ip))
            .unwrap(),
        format!("{}\n", pods[1].name)
    );
    for i in 0..2 {
        lab.ping("client", lab.node_ip(i))
            .expect("client pings node");
    }
    assert!(lab
        .curl("client", &format!("http://{}/", pods[0].ip))
        .is_err());
    // Re-applying is a no-op.
    assert_eq!(
        lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap(),
        "deployment.apps/nextcloud-dev unchanged"
    );
    assert_eq!(lab.pods().len(), 2);
    lab.down().expect("down");
    lab.down().expect("down twice");
    assert_eq!(namespaces_of(lab.prefix()), Vec::<String>::new());
    assert!(!lab.dir().exists());
}

#[test]
fn endpoint_slices_follow_services_and_pods() {
    if !require_root("endpoint_slices_follow_services_and_pods") {
        return;
    }
    let lab = manifest_lab(2);
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    assert_eq!(
        lab.apply_yaml(demo::NEXTCLOUD_DEV_CLUSTERIP).unwrap(),
        "service/nextcloud-dev-clusterip created"
    );
    assert_eq!(
        lab.apply_yaml(demo::NEXTCLOUD_DEV_CLUSTERIP).unwrap(),
        "service/nextcloud-dev-clusterip unchanged"
    );
    assert!(lab
        .manifests_dir()
        .join("service-default-nextcloud-dev-clusterip.yaml")
        .exists());
    let slice = read_yaml(&slice_file(&lab, "nextcloud-dev-clusterip"));
    assert_eq!(slice["apiVersion"], "discovery.k8s.io/v1");
    assert_eq!(slice["kind"], "EndpointSlice");
    assert_eq!(slice["metadata"]["name"], "nextcloud-dev-clusterip-lab");
    assert_eq!(
        slice["metadata"]["labels"]["kubernetes.io/service-name"],
        "nextcloud-dev-clusterip"
    );
    assert_eq!(slice["addressType"], "IPv4");
    assert_eq!(slice["ports"][0]["port"], 80);
    assert_eq!(slice["ports"][0]["protocol"], "TCP");
    let eps = slice["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), 2);
    let pods = lab.pods();
    for ep in eps {
        let name = ep["targetRef"]["name"].as_str().unwrap();
        let pod = pods.iter().find(|p| p.name == name).unwrap();
        assert_eq!(ep["targetRef"]["kind"], "Pod");
        assert_eq!(ep["addresses"][0], pod.ip.to_string().as_str());
        assert_eq!(ep["nodeName"], pod.node.as_str());
        assert_eq!(ep["conditions"]["ready"], true);
        assert_eq!(ep["conditions"]["serving"], true);
        assert_eq!(ep["conditions"]["terminating"], false);
    }

    // Not ready.
    lab.set_ready(&pods[0].name, false).unwrap();
    let slice = read_yaml(&slice_file(&lab, "nextcloud-dev-clusterip"));
    let ep = slice["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["targetRef"]["name"] == pods[0].name.as_str())
        .unwrap()
        .clone();
    assert_eq!(ep["conditions"]["ready"], false);
    assert_eq!(ep["conditions"]["serving"], false);

    // Named target port, resolved from the pods' container ports; a second protocol.
    let named = "apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        image: x
        ports:
        - {name: http, containerPort: 8080}
        - {name: dns, containerPort: 5353, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: dns, port: 53, targetPort: dns, protocol: UDP}
";
    let out = lab.apply_yaml(named).unwrap();
    assert_eq!(out, "deployment.apps/web created\nservice/web created");
    let slice = read_yaml(&slice_file(&lab, "web"));
    assert_eq!(slice["ports"][0]["name"], "http");
    assert_eq!(slice["ports"][0]["port"], 8080);
    assert_eq!(slice["ports"][0]["protocol"], "TCP");
    assert_eq!(slice["ports"][1]["name"], "dns");
    assert_eq!(slice["ports"][1]["port"], 5353);
    assert_eq!(slice["ports"][1]["protocol"], "UDP");
    let web = lab
        .pods()
        .into_iter()
        .find(|p| p.name.starts_with("web-"))
        .unwrap();
    assert_eq!(
        lab.curl(&pods[0].name, &format!("http://{}:8080/", web.ip))
            .unwrap(),
        format!("{}\n", web.name)
    );

    // Scaling up and down.
    let three = demo::NEXTCLOUD_DEV.replace("replicas: 2", "replicas: 3");
    assert_eq!(
        lab.apply_yaml(&three).unwrap(),
        "deployment.apps/nextcloud-dev configured"
    );
    let nc = |lab: &Lab| {
        lab.pods()
            .into_iter()
            .filter(|p| p.name.starts_with("nextcloud-dev-"))
            .count()
    };
    assert_eq!(nc(&lab), 3);
    let slice = read_yaml(&slice_file(&lab, "nextcloud-dev-clusterip"));
    assert_eq!(slice["endpoints"].as_array().unwrap().len(), 3);
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    assert_eq!(nc(&lab), 2);

    // Deleting a deployment's pod: the Deployment replaces it.
    let victim = lab
        .pods()
        .into_iter()
        .find(|p| p.name.starts_with("nextcloud-dev-"))
        .unwrap();
    assert_eq!(
        lab.delete("pod", &victim.name).unwrap(),
        format!("pod \"{}\" deleted", victim.name)
    );
    assert_eq!(nc(&lab), 2);
    assert!(lab.pod(&victim.name).is_none());
    assert!(!namespaces_of(lab.prefix()).contains(&victim.ns));

    // Deleting the service removes its slice; deleting the deployment its pods.
    assert_eq!(
        lab.delete("svc", "nextcloud-dev-clusterip").unwrap(),
        "service \"nextcloud-dev-clusterip\" deleted"
    );
    assert!(!slice_file(&lab, "nextcloud-dev-clusterip").exists());
    assert!(lab.delete("svc", "nextcloud-dev-clusterip").is_err());
    assert_eq!(
        lab.delete_yaml(demo::NEXTCLOUD_DEV).unwrap(),
        "deployment.apps \"nextcloud-dev\" deleted"
    );
    assert_eq!(nc(&lab), 0);
    let left = namespaces_of(lab.prefix());
    assert!(
        !left.iter().any(|n| n.contains("-pod-nextcloud")),
        "{left:?}"
    );
}

#[test]
fn pods_honour_node_name_and_labels() {
    if !require_root("pods_honour_node_name_and_labels") {
        return;
    }
    let lab = manifest_lab(3);
    let pod = |node: &str, app: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p1\n  labels: {{app: {app}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: x\n"
        )
    };
    assert_eq!(
        lab.apply_yaml(&pod("k3s-worker-rpi003", "a")).unwrap(),
        "pod/p1 created"
    );
    let p = lab.pod("p1").unwrap();
    assert_eq!(p.node, "k3s-worker-rpi003");
    assert_eq!(p.ip, Ipv4Addr::new(10, 42, 2, 10));
    // A label change keeps the pod (same IP, same process).
    assert_eq!(
        lab.apply_yaml(&pod("k3s-worker-rpi003", "b")).unwrap(),
        "pod/p1 configured"
    );
    let q = lab.pod("p1").unwrap();
    assert_eq!((q.pid, q.labels["app"].as_str()), (p.pid, "b"));
    // Another node: recreated there.
    assert_eq!(
        lab.apply_yaml(&pod("k3s-master-rpi001", "b")).unwrap(),
        "pod/p1 configured"
    );
    assert_eq!(lab.pod("p1").unwrap().ip, Ipv4Addr::new(10, 42, 0, 10));
    assert!(lab.apply_yaml(&pod("nope", "b")).is_err());
    // The worker node 3 reaches the pod on node 1 through the LAN.
    assert_eq!(
        lab.curl("k3s-worker-rpi003", "http://10.42.0.10/").unwrap(),
        "p1\n"
    );
    // Other objects are written as manifests.
    assert_eq!(
        lab.apply_yaml(demo::METALLB_CONFIG).unwrap(),
        "configmap/config created"
    );
    assert!(lab
        .manifests_dir()
        .join("configmap-metallb-system-config.yaml")
        .exists());
    // No temp files left behind.
    for e in std::fs::read_dir(lab.manifests_dir()).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with('.'), "{name}");
    }
}

#[test]
fn down_after_a_crash_leaves_nothing() {
    if !require_root("down_after_a_crash_leaves_nothing") {
        return;
    }
    let mut lab = lab(2);
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    let pids: Vec<u32> = lab.pods().iter().filter_map(|p| p.pid).collect();
    assert_eq!(pids.len(), 2);
    // Simulated crash: lab.json is gone.
    std::fs::remove_file(lab.dir().join("lab.json")).unwrap();
    assert!(namespaces_of(lab.prefix()).len() >= 6);
    lab.down().unwrap();
    assert_eq!(namespaces_of(lab.prefix()), Vec::<String>::new());
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z"),
            "pod process {pid} survived: {stat}"
        );
    }
    assert!(!lab.dir().exists());
}

#[test]
fn up_refuses_an_existing_lab_and_cli_works() {
    if !require_root("up_refuses_an_existing_lab_and_cli_works") {
        return;
    }
    let prefix = Lab::unique_prefix();
    let cli = |args: &[&str]| {
        let out = Command::new(EXE)
            .args(["lab", "--prefix", &prefix])
            .args(args)
            .env("FERRY_EXE", EXE)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, _, err) = cli(&["up", "--no-agents", "--nodes", "2"]);
    assert_eq!(code, Some(0), "{err}");
    // Make sure it goes away even if an assertion fails.
    let _guard = Lab::attach(&prefix, None, Some(EXE.into())).map(Lab::down_on_drop);
    let (code, _, err) = cli(&["up", "--no-agents"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("already exists"), "{err}");

    let dir = std::env::temp_dir().join(format!("{prefix}-seed"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("nextcloud-dev.yaml"), demo::NEXTCLOUD_DEV).unwrap();
    let file = dir.join("nextcloud-dev.yaml");
    let (code, out, err) = cli(&["apply", "-f", file.to_str().unwrap()]);
    assert_eq!(
        (code, out.as_str()),
        (Some(0), "deployment.apps/nextcloud-dev created\n"),
        "{err}"
    );
    let (code, out, _) = cli(&["get", "pods", "-o", "wide"]);
    assert_eq!(code, Some(0));
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("NAME "), "{out}");
    assert!(lines[0].contains("READINESS GATES"), "{out}");
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[1].contains("1/1") && lines[1].contains("Running"),
        "{out}"
    );
    let pod = lines[1].split_whitespace().next().unwrap().to_string();
    let (code, out, _) = cli(&["exec", "client", "--", "sh", "-c", "exit 3"]);
    assert_eq!((code, out.as_str()), (Some(3), ""));
    let (code, out, _) = cli(&[
        "exec", &pod, "--", "ip", "-4", "-br", "addr", "show", "eth0",
    ]);
    assert_eq!(code, Some(0));
    assert!(out.contains("10.42."), "{out}");
    let (code, out, _) = cli(&["set-ready", &pod, "false"]);
    assert_eq!(code, Some(0));
    assert_eq!(out, format!("pod/{pod} ready=false\n"));
    let (_, out, _) = cli(&["get", "pods"]);
    assert!(out.contains("0/1"), "{out}");
    let (code, out, _) = cli(&["delete", "-f", file.to_str().unwrap()]);
    assert_eq!(
        (code, out.as_str()),
        (Some(0), "deployment.apps \"nextcloud-dev\" deleted\n")
    );
    let (code, _, err) = cli(&["delete", "svc", "nope"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("services \"nope\" not found"), "{err}");
    let (code, out, _) = cli(&["down"]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out, _) = cli(&["down"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("not up"), "{out}");
    assert_eq!(namespaces_of(&prefix), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(dir);
}
