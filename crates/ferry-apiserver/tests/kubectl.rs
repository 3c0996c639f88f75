//! The real kubectl against the test double: create, apply (create, then a change through a
//! strategic merge patch), get, get -o yaml, get -w, label, patch --subresource=status,
//! delete, and the metallb.io kinds (JSON merge patch). Skips without kubectl unless `CI`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{kubectl_path, require_or_skip, Lab};
use ferry_apiserver::resources::find;
use ferry_apiserver::store::Part;
use serde_json::{json, Value};

struct Kubectl {
    bin: PathBuf,
    lab: Lab,
}

impl Kubectl {
    fn new() -> Option<Kubectl> {
        let Some(bin) = kubectl_path() else {
            require_or_skip("kubectl");
            return None;
        };
        Some(Kubectl {
            bin,
            lab: Lab::quick(),
        })
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--kubeconfig")
            .arg(&self.lab.kubeconfig)
            .arg("--cache-dir")
            .arg(self.lab.path("cache"))
            .args(args);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run kubectl")
    }

    /// Runs kubectl and returns stdout; panics with stderr when it fails.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "kubectl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn svc(&self, name: &str) -> Result<Value, ferry_apiserver::ApiError> {
        let res = find("", "v1", "services").expect("services");
        self.lab.server.server().store.get(res, "default", name)
    }
}

const WEB: &str = "apiVersion: v1
kind: Service
metadata:
  name: web
  labels: {app: web}
spec:
  type: LoadBalancer
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: https, port: 443, targetPort: 8443}
";

#[test]
fn create_get_label_status_watch_delete() {
    let Some(k) = Kubectl::new() else { return };
    let f = k.lab.write("web.yaml", WEB);
    let f = f.to_str().expect("utf-8 path");
    let out = k.ok(&["create", "-f", f]);
    assert!(out.contains("service/web created"), "{out}");
    let stored = k.svc("web").expect("stored");
    assert_eq!(stored["spec"]["ports"][1]["targetPort"], 8443);

    let again = k.run(&["create", "-f", f]);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("AlreadyExists") && err.contains("\"web\" already exists"),
        "{err}"
    );

    // kubectl asks for a Table: the columns of a real cluster.
    let out = k.ok(&["get", "svc"]);
    let header: Vec<&str> = out
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE"
        ],
        "{out}"
    );
    let row: Vec<&str> = out
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    // The server allocated the cluster IP (K3s's default range) and the node ports.
    assert_eq!(
        row[..5],
        [
            "web",
            "LoadBalancer",
            "10.43.1.1",
            "<pending>",
            "80:30000/TCP,443:30001/TCP"
        ],
        "{out}"
    );
    let yaml = k.ok(&["get", "svc", "web", "-o", "yaml"]);
    let rv = stored["metadata"]["resourceVersion"].as_str().expect("rv");
    assert!(
        yaml.contains(&format!("resourceVersion: \"{rv}\"")),
        "{yaml}"
    );
    assert!(
        yaml.contains("targetPort: 8443") && yaml.contains("uid: "),
        "{yaml}"
    );
    let json_out: Value =
        serde_json::from_str(&k.ok(&["get", "svc", "-o", "json"])).expect("a JSON list");
    assert_eq!(json_out["items"][0]["metadata"]["name"], "web");
    // Categories ("all") and describe (which also lists the Service's Events).
    assert_eq!(k.ok(&["get", "all", "-o", "name"]).trim(), "service/web");
    let described = k.ok(&["describe", "svc", "web"]);
    assert!(
        described.contains("IP:                       10.43.1.1"),
        "{described}"
    );
    assert!(
        described.contains("NodePort:                 https  30001/TCP"),
        "{described}"
    );
    // Short names come from discovery.
    assert!(k
        .ok(&["get", "ns", "-o", "name"])
        .contains("namespace/default"));

    // get -w in the background sees a change arrive.
    let mut watch = k
        .cmd(&["get", "svc", "-w", "--output-watch-events"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start kubectl get -w");
    let stdout = watch.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("a first watch line");
    let mut lines = vec![first];
    while !lines
        .iter()
        .any(|l| l.starts_with("ADDED") && l.contains("web"))
    {
        lines.push(
            rx.recv_timeout(Duration::from_secs(20))
                .expect("the ADDED line"),
        );
    }

    let out = k.ok(&["label", "svc", "web", "tier=front"]);
    assert!(out.contains("service/web labeled"), "{out}");
    assert_eq!(
        k.svc("web").expect("stored")["metadata"]["labels"]["tier"],
        "front"
    );
    let modified = loop {
        let l = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no MODIFIED from kubectl get -w; saw {lines:?}"));
        if l.starts_with("MODIFIED") {
            break l;
        }
        lines.push(l);
    };
    assert!(modified.contains("web"), "{modified}");
    // End the watcher by its PID.
    watch.kill().expect("kill kubectl get -w");
    let _ = watch.wait();

    assert_eq!(
        k.ok(&["get", "svc", "-l", "tier=front", "-o", "name"])
            .trim(),
        "service/web"
    );
    assert_eq!(
        k.ok(&["get", "svc", "-l", "tier notin (front)", "-o", "name"])
            .trim(),
        ""
    );
    assert_eq!(
        k.ok(&["get", "svc", "-l", "!tier", "-o", "name"]).trim(),
        ""
    );
    assert_eq!(
        k.ok(&[
            "get",
            "svc",
            "--field-selector",
            "metadata.name=web",
            "-o",
            "name"
        ])
        .trim(),
        "service/web"
    );

    let out = k.ok(&[
        "patch",
        "svc",
        "web",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"loadBalancer":{"ingress":[{"ip":"192.0.2.10","ipMode":"VIP"}]}},"spec":{"type":"ClusterIP"}}"#,
    ]);
    assert!(out.contains("service/web patched"), "{out}");
    let s = k.svc("web").expect("stored");
    assert_eq!(
        s["status"]["loadBalancer"]["ingress"][0]["ip"],
        "192.0.2.10"
    );
    assert_eq!(
        s["spec"]["type"], "LoadBalancer",
        "a status patch leaves spec alone"
    );
    let ip = k.ok(&[
        "get",
        "svc",
        "web",
        "-o",
        "jsonpath={.status.loadBalancer.ingress[0].ip}",
    ]);
    assert_eq!(ip, "192.0.2.10");
    let out = k.ok(&["get", "svc", "web"]);
    assert!(
        out.lines()
            .nth(1)
            .is_some_and(|l| l.split_whitespace().nth(3) == Some("192.0.2.10")),
        "{out}"
    );

    let out = k.ok(&["delete", "svc", "web"]);
    assert!(out.contains("service \"web\" deleted"), "{out}");
    assert_eq!(k.svc("web").expect_err("deleted").code, 404);
    let gone = k.run(&["get", "svc", "web"]);
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("NotFound"));
}

#[test]
fn apply_creates_then_patches_with_merge_keys() {
    let Some(k) = Kubectl::new() else { return };
    let f = k.lab.write("web.yaml", WEB);
    let f = f.to_str().expect("utf-8 path");
    let out = k.ok(&["apply", "-f", f]);
    assert!(out.contains("service/web created"), "{out}");
    let created = k.svc("web").expect("stored");
    assert!(
        created["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
            .is_string()
    );

    // The server allocated a cluster IP and node ports (not in the manifest), and a
    // load-balancer controller writes status; apply must keep all of them.
    let ip = created["spec"]["clusterIP"]
        .as_str()
        .expect("a cluster IP")
        .to_string();
    assert!(ip.starts_with("10.43."), "{ip}");
    let node_ports: Vec<u64> = created["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| p["nodePort"].as_u64().expect("a node port"))
        .collect();
    let res = find("", "v1", "services").expect("services");
    let store = &k.lab.server.server().store;
    let mut with_status = created.clone();
    with_status["status"] = json!({"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}});
    store
        .update(res, "default", "web", with_status, Part::Status)
        .expect("set status");

    // Change only the https port's targetPort: kubectl sends a strategic merge patch with
    // that one element (merge key `port`) and $setElementOrder.
    k.lab.write(
        "web.yaml",
        &WEB.replace("targetPort: 8443", "targetPort: 9443"),
    );
    let out = k.ok(&["apply", "-f", f]);
    assert!(out.contains("service/web configured"), "{out}");
    let s = k.svc("web").expect("stored");
    let ports = s["spec"]["ports"].as_array().expect("ports");
    assert_eq!(ports.len(), 2, "{ports:?}");
    assert_eq!(ports[0]["targetPort"], 8080);
    assert_eq!(ports[1]["targetPort"], 9443);
    assert_eq!(s["spec"]["clusterIP"], json!(ip));
    assert_eq!(ports[0]["nodePort"], node_ports[0]);
    assert_eq!(ports[1]["nodePort"], node_ports[1]);
    assert_eq!(s["status"]["loadBalancer"]["ingress"][0]["ip"], "192.0.2.1");
    assert_eq!(s["metadata"]["generation"], 2);

    // Dropping a port from the manifest removes it (a $patch: delete element).
    let one_port = WEB.replace("  - {name: https, port: 443, targetPort: 8443}\n", "");
    k.lab.write("web.yaml", &one_port);
    k.ok(&["apply", "-f", f]);
    let ports = k.svc("web").expect("stored")["spec"]["ports"].clone();
    assert_eq!(
        ports,
        json!([{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": node_ports[0]}])
    );
    let out = k.ok(&["apply", "-f", f]);
    assert!(out.contains("service/web unchanged"), "{out}");
}

#[test]
fn metallb_kinds_apply_with_merge_patch() {
    let Some(k) = Kubectl::new() else { return };
    let pool = "apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {name: lab, namespace: metallb-system}
spec:
  addresses: [192.0.2.0/28]
---
apiVersion: metallb.io/v1beta1
kind: L2Advertisement
metadata: {name: lab, namespace: metallb-system}
spec:
  ipAddressPools: [lab]
---
apiVersion: metallb.io/v1beta2
kind: BGPPeer
metadata: {name: router, namespace: metallb-system}
spec: {myASN: 64500, peerASN: 64501, peerAddress: 192.0.2.254, bfdProfile: fast,
  passwordSecret: {name: router-md5, namespace: metallb-system}}
---
apiVersion: metallb.io/v1beta1
kind: BGPAdvertisement
metadata: {name: lab, namespace: metallb-system}
spec: {ipAddressPools: [lab], communities: [no-advertise]}
---
apiVersion: metallb.io/v1beta1
kind: Community
metadata: {name: aliases, namespace: metallb-system}
spec:
  communities: [{name: no-advertise, value: '65535:65282'}]
---
apiVersion: metallb.io/v1beta1
kind: BFDProfile
metadata: {name: fast, namespace: metallb-system}
spec: {receiveInterval: 100, transmitInterval: 100}
---
apiVersion: v1
kind: Secret
metadata: {name: router-md5, namespace: metallb-system}
type: kubernetes.io/basic-auth
stringData: {password: lab}
";
    // The namespace first: creating in a missing one is 404, as on a real cluster.
    let ns = k.lab.write(
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: metallb-system}\n",
    );
    let ns = ns.to_str().expect("utf-8 path");
    let f = k.lab.write("pool.yaml", pool);
    let missing = k.run(&["apply", "-f", f.to_str().expect("utf-8 path")]);
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("namespaces \"metallb-system\" not found"),
        "{err}"
    );
    let out = k.ok(&["apply", "-f", ns]);
    assert!(out.contains("namespace/metallb-system created"), "{out}");
    let f = f.to_str().expect("utf-8 path");
    let out = k.ok(&["apply", "--validate=false", "-f", f]);
    assert!(
        out.contains("ipaddresspool.metallb.io/lab created"),
        "{out}"
    );
    assert!(out.contains("bgppeer.metallb.io/router created"), "{out}");
    for made in [
        "bgpadvertisement.metallb.io/lab created",
        "community.metallb.io/aliases created",
        "bfdprofile.metallb.io/fast created",
        "secret/router-md5 created",
    ] {
        assert!(out.contains(made), "{made}: {out}");
    }
    k.lab.write("pool.yaml", &pool.replace("/28", "/27"));
    let out = k.ok(&["apply", "--validate=false", "-f", f]);
    assert!(
        out.contains("ipaddresspool.metallb.io/lab configured"),
        "{out}"
    );
    let got = k.ok(&[
        "get",
        "ipaddresspools",
        "-n",
        "metallb-system",
        "lab",
        "-o",
        "jsonpath={.spec.addresses}",
    ]);
    assert_eq!(got, r#"["192.0.2.0/27"]"#);
    let out = k.ok(&["get", "bgppeers", "-A", "-o", "name"]);
    assert_eq!(out.trim(), "bgppeer.metallb.io/router");
    // A strategic merge patch is refused for custom resources (kubectl knows it from the
    // real server's behaviour and refuses before sending).
    let o = k.run(&[
        "patch",
        "-n",
        "metallb-system",
        "ipaddresspool",
        "lab",
        "--type=strategic",
        "-p",
        "{}",
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not supported"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Server-side apply (served as create, then a merge: no field managers).
    let cm = k.lab.write(
        "cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: config, namespace: metallb-system}\ndata: {config: 'a: 1'}\n",
    );
    let cm = cm.to_str().expect("utf-8 path");
    let out = k.ok(&["apply", "--server-side", "-f", cm]);
    assert!(out.contains("configmap/config serverside-applied"), "{out}");
    k.lab.write(
        "cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: config, namespace: metallb-system}\ndata: {config: 'a: 2'}\n",
    );
    k.ok(&["apply", "--server-side", "-f", cm]);
    let got = k.ok(&[
        "get",
        "cm",
        "-n",
        "metallb-system",
        "config",
        "-o",
        "jsonpath={.data.config}",
    ]);
    assert_eq!(got, "a: 2");
    let out = k.ok(&["delete", "-f", f]);
    assert!(
        out.contains("l2advertisement.metallb.io \"lab\" deleted"),
        "{out}"
    );
    // Deleting the namespace deletes what is in it.
    k.ok(&["delete", "-f", ns]);
    let out = k.ok(&["get", "cm", "-A", "-o", "name"]);
    assert_eq!(out.trim(), "", "{out}");
}

#[test]
fn scale_a_deployment() {
    let Some(k) = Kubectl::new() else { return };
    let f = k.lab.write(
        "deploy.yaml",
        "apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: c, image: x}]}
",
    );
    k.ok(&["apply", "-f", f.to_str().expect("utf-8 path")]);
    let out = k.ok(&["scale", "deployment", "web", "--replicas=5"]);
    assert!(out.contains("deployment.apps/web scaled"), "{out}");
    let got = k.ok(&[
        "get",
        "deployment",
        "web",
        "-o",
        "jsonpath={.spec.replicas}",
    ]);
    assert_eq!(got, "5");
    // The Scale itself, and a precondition that does not hold.
    let scale: Value = serde_json::from_str(&k.ok(&[
        "get",
        "--raw",
        "/apis/apps/v1/namespaces/default/deployments/web/scale",
    ]))
    .expect("Scale JSON");
    assert_eq!(scale["kind"], "Scale");
    assert_eq!(scale["spec"]["replicas"], 5);
    assert_eq!(scale["status"]["selector"], "app=web");
    let o = k.run(&[
        "scale",
        "deployment",
        "web",
        "--current-replicas=2",
        "--replicas=1",
    ]);
    assert!(!o.status.success());
    let got = k.ok(&[
        "get",
        "deployment",
        "web",
        "-o",
        "jsonpath={.spec.replicas}",
    ]);
    assert_eq!(got, "5");
    let o = k.run(&["scale", "deployment", "missing", "--replicas=1"]);
    assert!(!o.status.success());
}
