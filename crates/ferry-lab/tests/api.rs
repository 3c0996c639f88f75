//! The lab with its API server (`ferry lab up --api`), driven by the real kubectl: the lab
//! runtime makes pods for Deployments and keeps EndpointSlices current; with agents, the seed's
//! Services answer. Root only (skipped otherwise, failing under $CI); kubectl is needed too.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Once;
use std::time::{Duration, Instant};

use ferry_lab::{demo, require_root, skip, Lab, LabConfig};
use serde_json::Value;

const EXE: &str = env!("CARGO_BIN_EXE_ferry-lab");
const CONVERGE: Duration = Duration::from_secs(30);

fn kubectl_present(test: &str) -> bool {
    let ok = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        skip(test, "needs kubectl");
    }
    ok
}

fn kubectl(lab: &Lab, args: &[&str]) -> Output {
    let kc = lab.kubeconfig().expect("kubeconfig");
    Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kc)
        .args(args)
        .output()
        .expect("running kubectl")
}

fn kubectl_ok(lab: &Lab, args: &[&str]) -> String {
    let out = kubectl(lab, args);
    assert!(
        out.status.success(),
        "kubectl {}: {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr),
        lab.runtime_log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kubectl_apply(lab: &Lab, yaml: &str) -> String {
    let dir = lab.dir().join("test-input");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!(
        "{:016x}.yaml",
        ferry_lab::state::fnv64(yaml.as_bytes())
    ));
    std::fs::write(&file, yaml).unwrap();
    kubectl_ok(lab, &["apply", "-f", &file.display().to_string()])
}

fn json(lab: &Lab, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&kubectl_ok(lab, &all)).expect("kubectl -o json")
}

/// (pod name, address, node, ready) of every endpoint of a Service's slices.
fn endpoints(lab: &Lab, svc: &str) -> Vec<(String, String, String, bool)> {
    let v = json(
        lab,
        &[
            "get",
            "endpointslices",
            "-l",
            &format!("kubernetes.io/service-name={svc}"),
        ],
    );
    let mut out = Vec::new();
    for s in v["items"].as_array().into_iter().flatten() {
        for e in s["endpoints"].as_array().into_iter().flatten() {
            out.push((
                e["targetRef"]["name"].as_str().unwrap_or("").to_string(),
                e["addresses"][0].as_str().unwrap_or("").to_string(),
                e["nodeName"].as_str().unwrap_or("").to_string(),
                e["conditions"]["ready"] == true,
            ));
        }
    }
    out.sort();
    out
}

fn wait_for<T: std::fmt::Debug>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + CONVERGE;
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn namespaces_of(prefix: &str) -> Vec<String> {
    ferry_lab::sys::list_netns()
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect()
}

fn pid_of(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[test]
fn kubectl_drives_pods_and_endpoint_slices() {
    let test = "kubectl_drives_pods_and_endpoint_slices";
    if !require_root(test) || !kubectl_present(test) {
        return;
    }
    let mut lab = LabConfig::new(Lab::unique_prefix())
        .nodes(2)
        .agents(false)
        .api(true)
        .exe(EXE)
        .up()
        .expect("lab up --api");
    let prefix = lab.prefix().to_string();
    let kc = lab.kubeconfig().expect("kubeconfig");
    assert!(kc.starts_with(lab.dir()), "{}", kc.display());
    // `ferry lab kubeconfig` prints the same path.
    let out = Command::new(EXE)
        .args(["lab", "--prefix", &prefix, "kubeconfig"])
        .env("FERRY_LAB_DIR_ROOT", lab.ctx().root.clone())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        kc.display().to_string()
    );
    // The nodes are registered as kubelets would, with their addresses and pod CIDRs, and the
    // namespaces ferry needs exist.
    let nodes = json(&lab, &["get", "nodes"]);
    let names: Vec<&str> = nodes["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["k3s-master-rpi001", "k3s-worker-rpi002"]);
    assert_eq!(nodes["items"][1]["spec"]["podCIDR"], "10.42.1.0/24");
    assert_eq!(
        nodes["items"][1]["status"]["addresses"][0]["address"],
        "192.168.2.12"
    );
    for ns in ["ferry-system", "metallb-system"] {
        kubectl_ok(&lab, &["get", "namespace", ns]);
    }

    let out = kubectl_apply(
        &lab,
        &format!(
            "{}\n---\n{}",
            demo::NEXTCLOUD_DEV,
            demo::NEXTCLOUD_DEV_CLUSTERIP
        ),
    );
    assert!(
        out.contains("deployment.apps/nextcloud-dev created"),
        "{out}"
    );
    // Pods made by the runtime, Pod objects with IPs and nodes, an EndpointSlice listing them.
    let pods = wait_for("two pods", || {
        let p = lab.pods();
        (p.len() == 2).then_some(p)
    });
    assert_ne!(pods[0].node, pods[1].node);
    let want: Vec<(String, String, String, bool)> = {
        let mut w: Vec<_> = pods
            .iter()
            .map(|p| (p.name.clone(), p.ip.to_string(), p.node.clone(), true))
            .collect();
        w.sort();
        w
    };
    wait_for("the EndpointSlice of both pods", || {
        (endpoints(&lab, "nextcloud-dev-clusterip") == want).then_some(())
    });
    let api_pods = json(&lab, &["get", "pods"]);
    for p in api_pods["items"].as_array().unwrap() {
        let name = p["metadata"]["name"].as_str().unwrap();
        let info = lab.pod(name).expect("lab pod of a Pod object");
        assert_eq!(p["status"]["podIP"], info.ip.to_string());
        assert_eq!(p["spec"]["nodeName"], info.node.as_str());
        assert_eq!(p["metadata"]["ownerReferences"][0]["kind"], "Deployment");
    }
    let slice = json(
        &lab,
        &[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=nextcloud-dev-clusterip",
        ],
    );
    let meta = &slice["items"][0]["metadata"];
    assert_eq!(meta["ownerReferences"][0]["kind"], "Service");
    assert_eq!(
        meta["labels"]["endpointslice.kubernetes.io/managed-by"],
        ferry_lab::runtime::MANAGED_BY
    );
    assert_eq!(slice["items"][0]["ports"][0]["port"], 80);
    // Pods reach each other.
    assert_eq!(
        lab.curl(&pods[0].name, &format!("http://{}/", pods[1].ip))
            .unwrap(),
        format!("{}\n", pods[1].name)
    );

    // `kubectl get svc` shows the cluster IP the API server allocated; so does `ferry lab get`.
    let svc = json(&lab, &["get", "svc", "nextcloud-dev-clusterip"]);
    let cip = svc["spec"]["clusterIP"].as_str().unwrap().to_string();
    assert!(cip.starts_with("10.43."), "{cip}");
    let table = kubectl_ok(&lab, &["get", "svc"]);
    let row = table
        .lines()
        .find(|l| l.starts_with("nextcloud-dev-clusterip "))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains(&cip), "{table}");
    let mine = lab.get("svc", false).unwrap();
    assert!(
        mine.starts_with("NAME ") && mine.contains("CLUSTER-IP") && mine.contains(&cip),
        "{mine}"
    );
    assert!(lab
        .ferry_get(&["svc", "-o", "json"])
        .unwrap()
        .contains(&cip));

    // Scale up: a third pod and endpoint.
    kubectl_ok(
        &lab,
        &["scale", "deployment", "nextcloud-dev", "--replicas=3"],
    );
    wait_for("three endpoints", || {
        (endpoints(&lab, "nextcloud-dev-clusterip").len() == 3 && lab.pods().len() == 3)
            .then_some(())
    });
    // Not ready (the lab's switch) -> the endpoint says so.
    let victim = lab.pods()[0].name.clone();
    lab.set_ready(&victim, false).unwrap();
    let eps = endpoints(&lab, "nextcloud-dev-clusterip");
    assert!(
        eps.iter().any(|e| e.0 == victim && !e.3) && eps.iter().filter(|e| e.3).count() == 2,
        "{eps:?}"
    );
    // A deleted pod is replaced, and the slice follows.
    kubectl_ok(&lab, &["delete", "pod", &victim]);
    wait_for("the replacement pod", || {
        let eps = endpoints(&lab, "nextcloud-dev-clusterip");
        (eps.len() == 3 && eps.iter().all(|e| e.0 != victim && e.3)).then_some(())
    });
    assert!(lab.pod(&victim).is_none());
    assert!(!namespaces_of(&prefix).contains(&lab.ctx().pod_ns(&victim)));
    // Scale down through `ferry lab apply` (same manifest as before: 2 replicas).
    assert_eq!(
        lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap(),
        "deployment.apps/nextcloud-dev configured"
    );
    assert_eq!(lab.pods().len(), 2);
    assert_eq!(endpoints(&lab, "nextcloud-dev-clusterip").len(), 2);
    assert_eq!(
        lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap(),
        "deployment.apps/nextcloud-dev unchanged"
    );
    // A Pod the lab cannot run (no such node): a Warning Event says why; `ferry lab apply`
    // refuses it up front; nothing else changes.
    let lost = "apiVersion: v1\nkind: Pod\nmetadata: {name: lost}\nspec:\n  nodeName: nowhere\n  containers: [{name: c, image: x}]\n";
    let err = lab.apply_yaml(lost).unwrap_err().to_string();
    assert!(err.contains("nodeName \"nowhere\" is not a node"), "{err}");
    kubectl_apply(&lab, lost);
    let ev = wait_for("the FailedCreate event", || {
        let ev = kubectl_ok(
            &lab,
            &[
                "get",
                "events",
                "--field-selector",
                "involvedObject.name=lost",
            ],
        );
        ev.contains("FailedCreate").then_some(ev)
    });
    assert!(ev.contains("nowhere"), "{ev}");
    assert!(lab.pod("lost").is_none());
    assert_eq!(lab.pods().len(), 2);
    kubectl_ok(&lab, &["delete", "pod", "lost"]);
    // The API server restarted keeps its objects and its address; the runtime carries on.
    let before = lab.pod_names();
    let old_pid = lab.api_pid().expect("API server running");
    lab.api_stop().unwrap();
    assert!(!kubectl(&lab, &["get", "svc"]).status.success());
    assert!(lab.api_stop().is_err());
    lab.api_start().unwrap();
    assert_ne!(lab.api_pid(), Some(old_pid));
    let svc = json(&lab, &["get", "svc", "nextcloud-dev-clusterip"]);
    assert_eq!(svc["spec"]["clusterIP"], cip.as_str());
    assert_eq!(lab.pod_names(), before);
    kubectl_ok(
        &lab,
        &[
            "patch",
            "deployment",
            "nextcloud-dev",
            "-p",
            r#"{"spec":{"replicas":1}}"#,
        ],
    );
    wait_for("one endpoint after the restart", || {
        (endpoints(&lab, "nextcloud-dev-clusterip").len() == 1 && lab.pods().len() == 1)
            .then_some(())
    });
    // Deleting the Deployment removes its pods; the slice stays, empty.
    kubectl_ok(&lab, &["delete", "deployment", "nextcloud-dev"]);
    wait_for("no pods and no endpoints", || {
        (lab.pods().is_empty() && endpoints(&lab, "nextcloud-dev-clusterip").is_empty())
            .then_some(())
    });
    assert_eq!(
        namespaces_of(&prefix).len(),
        4,
        "{:?}",
        namespaces_of(&prefix)
    );
    // Deleting the Service removes its slice.
    assert_eq!(
        lab.delete("svc", "nextcloud-dev-clusterip").unwrap(),
        "service \"nextcloud-dev-clusterip\" deleted"
    );
    let slices = json(&lab, &["get", "endpointslices"]);
    assert_eq!(
        slices["items"].as_array().map(Vec::len),
        Some(0),
        "{slices}"
    );
    assert!(lab.delete("svc", "nextcloud-dev-clusterip").is_err());

    // Down leaves nothing: namespaces, processes (the API server and the runtime live in the
    // root namespace), files.
    let api_pid = pid_of(&lab.ctx().proc_pid_file(ferry_lab::cluster::API_PROC)).unwrap();
    let rt_pid = pid_of(&lab.ctx().proc_pid_file(ferry_lab::cluster::RUNTIME_PROC)).unwrap();
    assert!(ferry_lab::sys::pid_alive(api_pid) && ferry_lab::sys::pid_alive(rt_pid));
    let dir: PathBuf = lab.dir();
    lab.down().expect("down");
    assert!(namespaces_of(&prefix).is_empty());
    assert!(!ferry_lab::sys::pid_alive(api_pid));
    assert!(!ferry_lab::sys::pid_alive(rt_pid));
    assert!(!dir.exists());
}

static BUILD_FERRY: Once = Once::new();

/// The `ferry` executable next to `ferry-lab`, built when missing (the agents run it).
fn ferry_exe() -> PathBuf {
    let ferry = Path::new(EXE).with_file_name("ferry");
    BUILD_FERRY.call_once(|| {
        let profile = Path::new(EXE)
            .parent()
            .and_then(|d| d.file_name())
            .map(|d| d.to_string_lossy().into_owned())
            .unwrap_or_else(|| "debug".into());
        let profile = if profile == "debug" {
            "dev".to_string()
        } else {
            profile
        };
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "-q",
                "-p",
                "ferry",
                "--bin",
                "ferry",
                "--profile",
                &profile,
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("running cargo build -p ferry");
        assert!(status.success(), "cargo build -p ferry failed");
    });
    assert!(ferry.is_file(), "no {}", ferry.display());
    ferry
}

/// The seed's journey with agents watching the lab API server: ClusterIP from a pod, NodePort
/// from the client, LoadBalancer pending until MetalLB's ConfigMap, then assigned and answering.
#[test]
fn seed_journey_with_agents_on_the_api() {
    let test = "seed_journey_with_agents_on_the_api";
    if !require_root(test) || !kubectl_present(test) {
        return;
    }
    let lab = LabConfig::new(Lab::unique_prefix())
        .nodes(2)
        .api(true)
        .exe(ferry_exe())
        .up()
        .expect("lab up --api with agents");
    for w in &lab.warnings {
        eprintln!("{test}: {w}");
    }
    // Every agent runs with --kubeconfig (the nodes' kubeconfig, the LAN address).
    let cmdline = |node: &str| {
        let pid = lab.agent_pid(node).expect("agent running");
        std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
            .unwrap()
            .replace('\0', " ")
    };
    for node in lab.node_names() {
        let c = cmdline(&node);
        assert!(
            c.contains("--kubeconfig") && !c.contains("--manifests"),
            "{c}"
        );
    }
    let kc_nodes = std::fs::read_to_string(lab.ctx().kubeconfig_nodes()).unwrap();
    assert!(kc_nodes.contains("http://192.168.2.5:6443"), "{kc_nodes}");

    kubectl_apply(
        &lab,
        &[
            demo::NEXTCLOUD_DEV,
            demo::NEXTCLOUD_DEV_CLUSTERIP,
            demo::NEXTCLOUD_DEV_NODEPORT,
            demo::DEBIAN_BASH,
        ]
        .join("\n---\n"),
    );
    let svc = json(&lab, &["get", "svc", "nextcloud-dev-clusterip"]);
    let cip = svc["spec"]["clusterIP"].as_str().unwrap().to_string();
    let port = svc["spec"]["ports"][0]["port"].as_u64().unwrap();
    let np = json(&lab, &["get", "svc", "nextcloud-dev-nodeport"])["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .unwrap();
    let pods: Vec<String> = lab
        .pods()
        .into_iter()
        .filter(|p| p.name.starts_with("nextcloud-dev-"))
        .map(|p| format!("{}\n", p.name))
        .collect();
    assert_eq!(pods.len(), 2);
    let body = lab
        .curl_until_ok("debian-bash", &format!("http://{cip}:{port}/"), CONVERGE)
        .unwrap_or_else(|e| panic!("ClusterIP: {e:#}\n{}", lab.agent_log(&lab.node_name(0))));
    assert!(pods.contains(&body), "{body}");
    for i in 0..2 {
        let url = format!("http://{}:{np}/", lab.node_ip(i));
        let body = lab
            .curl_until_ok("client", &url, CONVERGE)
            .unwrap_or_else(|e| panic!("NodePort {url}: {e:#}"));
        assert!(pods.contains(&body), "{body}");
    }
    // LoadBalancer: pending without a pool, assigned from the seed's ConfigMap.
    kubectl_apply(&lab, demo::NEXTCLOUD_DEV_LOADBALANCER);
    let ext = |lab: &Lab| {
        let t = kubectl_ok(lab, &["get", "svc", "nextcloud-dev-loadbalancer"]);
        t.lines()
            .nth(1)
            .and_then(|l| l.split_whitespace().nth(3))
            .map(str::to_string)
    };
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ext(&lab).as_deref(), Some("<pending>"));
    kubectl_apply(&lab, demo::METALLB_CONFIG);
    let ip = wait_for("an external IP", || {
        ext(&lab).filter(|e| e.starts_with("192.168.2."))
    });
    assert_eq!(ip, "192.168.2.200");
    let body = lab
        .curl_until_ok("client", &format!("http://{ip}/"), CONVERGE)
        .unwrap_or_else(|e| panic!("LoadBalancer: {e:#}"));
    assert!(pods.contains(&body), "{body}");
}

/// The lab API server stopped for 10 s while the client keeps requesting through a ClusterIP,
/// a NodePort and the LoadBalancer address: no request fails (rules and announcements stay as
/// they are); after it returns, the agents and the runtime watch again and a change is applied.
#[test]
fn api_server_outage_changes_nothing_on_the_nodes() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let test = "api_server_outage_changes_nothing_on_the_nodes";
    if !require_root(test) || !kubectl_present(test) {
        return;
    }
    let lab = LabConfig::new(Lab::unique_prefix())
        .nodes(2)
        .api(true)
        .exe(ferry_exe())
        .up()
        .expect("lab up --api with agents");
    kubectl_apply(
        &lab,
        &[
            demo::NEXTCLOUD_DEV,
            demo::NEXTCLOUD_DEV_CLUSTERIP,
            demo::NEXTCLOUD_DEV_NODEPORT,
            demo::DEBIAN_BASH,
            demo::METALLB_CONFIG,
            demo::NEXTCLOUD_DEV_LOADBALANCER,
        ]
        .join("\n---\n"),
    );
    let cip = json(&lab, &["get", "svc", "nextcloud-dev-clusterip"])["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .to_string();
    let np = json(&lab, &["get", "svc", "nextcloud-dev-nodeport"])["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .unwrap();
    let lb = wait_for("the load-balancer address", || {
        json(&lab, &["get", "svc", "nextcloud-dev-loadbalancer"])
            .pointer("/status/loadBalancer/ingress/0/ip")
            .and_then(Value::as_str)
            .map(str::to_string)
    });
    let st = lab.state().unwrap();
    let debian_ns = st.target_ns("debian-bash").unwrap();
    let probes = [
        (debian_ns, format!("http://{cip}:8080/")),
        (
            st.client.ns.clone(),
            format!("http://{}:{np}/", lab.node_ip(0)),
        ),
        (st.client.ns.clone(), format!("http://{lb}/")),
    ];
    for (ns, url) in &probes {
        wait_for(&format!("{url} answering"), || {
            ferry_lab::probe::curl_once(ns, url).ok()
        });
    }
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = probes
            .iter()
            .map(|(ns, url)| s.spawn(|| ferry_lab::probe::probe_loop(ns, url, start, &stop)))
            .collect();
        std::thread::sleep(Duration::from_secs(1));
        lab.api_stop().expect("stopping the API server");
        std::thread::sleep(Duration::from_secs(10));
        lab.api_start().expect("starting the API server");
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::SeqCst);
        handles
            .into_iter()
            .map(|h| h.join().expect("probe thread"))
            .collect::<Vec<_>>()
    });
    for ((_, url), attempts) in probes.iter().zip(&results) {
        let failed: Vec<_> = attempts.iter().filter(|a| a.result.is_err()).collect();
        assert!(
            attempts.len() > 50,
            "{url}: only {} requests",
            attempts.len()
        );
        assert!(
            failed.is_empty(),
            "{url}: {} of {} requests failed, first {:?}",
            failed.len(),
            attempts.len(),
            failed.first()
        );
    }
    // After the outage a change is applied: a third pod answers on the LoadBalancer address.
    kubectl_ok(
        &lab,
        &["scale", "deployment", "nextcloud-dev", "--replicas=3"],
    );
    let pods = wait_for("three pods", || {
        let p: Vec<String> = lab
            .pods()
            .into_iter()
            .filter(|p| p.name.starts_with("nextcloud-dev-"))
            .map(|p| p.name)
            .collect();
        (p.len() == 3).then_some(p)
    });
    let mut tally = ferry_lab::probe::AnswerTally::new(&pods).unwrap();
    wait_for("every pod answering on the LoadBalancer address", || {
        if let Ok(body) = ferry_lab::probe::curl_once(&st.client.ns, &format!("http://{lb}/")) {
            tally.record(&body);
        }
        tally.done().then_some(())
    });
}
