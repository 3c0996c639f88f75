//! `ferry get` and `ferry plan` only read the allocation state: run against a state directory,
//! they leave every file in it as it was (nothing created, nothing rewritten), show what the
//! agents allocated, and show `<none>` / `<pending>` for what no agent has allocated yet.
//! (No root needed: neither touches the kernel.)

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

const SERVICES: &str = "\
apiVersion: v1
kind: Service
metadata: {name: known, namespace: default}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: new, namespace: default}
spec:
  selector: {app: web}
  ports: [{port: 81}]
";

/// What an agent would have kept for `default/known`.
const ALLOCATIONS: &str = r#"{
  "services": {
    "default/known": {
      "cluster_ip": "10.43.7.7",
      "node_ports": { "80/TCP": 30777 },
      "updated_ms": 1
    }
  }
}"#;

/// Every file under `dir` with its bytes and modification time.
fn files(dir: &Path) -> BTreeMap<String, (Vec<u8>, std::time::SystemTime)> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let m = e.metadata().unwrap();
        if m.is_file() {
            out.insert(
                e.file_name().to_string_lossy().into_owned(),
                (std::fs::read(e.path()).unwrap(), m.modified().unwrap()),
            );
        }
    }
    out
}

fn ferry(args: &[&str]) -> String {
    let out = Command::new(FERRY).args(args).output().expect("ferry runs");
    assert!(
        out.status.success(),
        "ferry {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn get_and_plan_never_write_the_state() {
    let tmp = std::env::temp_dir().join(format!("ferry-readonly-{}", std::process::id()));
    let (manifests, state) = (tmp.join("manifests"), tmp.join("state"));
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(manifests.join("svc.yaml"), SERVICES).unwrap();
    let m = manifests.to_str().unwrap();
    let s = state.to_str().unwrap();

    // An empty state directory stays empty.
    let table = ferry(&["get", "svc", "--manifests", m, "--state-dir", s]);
    assert!(
        files(&state).is_empty(),
        "ferry get wrote {:?}",
        files(&state).keys()
    );
    for name in ["known", "new"] {
        let row = table
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_default();
        assert!(
            row.contains("<none>"),
            "no cluster IP allocated yet: {row:?}\n{table}"
        );
    }
    ferry(&["plan", "--manifests", m, "--node", "n1", "--state-dir", s]);
    assert!(
        files(&state).is_empty(),
        "ferry plan wrote {:?}",
        files(&state).keys()
    );

    // A state directory that does not exist is not created.
    let missing = tmp.join("missing");
    ferry(&[
        "get",
        "svc",
        "--manifests",
        m,
        "--state-dir",
        missing.to_str().unwrap(),
    ]);
    ferry(&[
        "plan",
        "--manifests",
        m,
        "--node",
        "n1",
        "--state-dir",
        missing.to_str().unwrap(),
    ]);
    assert!(!missing.exists(), "get/plan created the state directory");

    // With an agent's allocations: shown as they are, and the file is left alone.
    std::fs::write(state.join("allocations.json"), ALLOCATIONS).unwrap();
    let before = files(&state);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let table = ferry(&["get", "svc", "--manifests", m, "--state-dir", s]);
    let known = table
        .lines()
        .find(|l| l.starts_with("known"))
        .unwrap_or_default();
    assert!(
        known.contains("10.43.7.7") && known.contains("80:30777/TCP"),
        "{table}"
    );
    let new = table
        .lines()
        .find(|l| l.starts_with("new"))
        .unwrap_or_default();
    assert!(new.contains("<none>"), "{table}");
    let script = ferry(&["plan", "--manifests", m, "--node", "n1", "--state-dir", s]);
    assert!(
        script.contains("10.43.7.7"),
        "plan uses the kept cluster IP:\n{script}"
    );
    assert_eq!(
        files(&state),
        before,
        "get/plan changed the state directory"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}

/// `ferry explain` traces a connection through the node's planned rules, from the manifests
/// and the kept allocations, and writes nothing.
#[test]
fn explain_traces_a_connection_and_writes_nothing() {
    let tmp = std::env::temp_dir().join(format!("ferry-explain-{}", std::process::id()));
    let (manifests, state) = (tmp.join("manifests"), tmp.join("state"));
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(manifests.join("svc.yaml"), SERVICES).unwrap();
    std::fs::write(
        manifests.join("slices.yaml"),
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: known-1\n  \
         namespace: default\n  labels: {kubernetes.io/service-name: known}\naddressType: IPv4\n\
         endpoints:\n- addresses: [10.42.0.5]\n  conditions: {ready: true}\n- addresses: [10.42.1.6]\n  \
         conditions: {ready: true}\nports: [{port: 80, protocol: TCP}]\n\
         ---\napiVersion: v1\nkind: Node\nmetadata: {name: n1}\n\
         status: {addresses: [{type: InternalIP, address: 192.168.2.11}]}\n",
    )
    .unwrap();
    std::fs::write(state.join("allocations.json"), ALLOCATIONS).unwrap();
    let before = files(&state);
    let (m, s) = (manifests.to_str().unwrap(), state.to_str().unwrap());
    let base = [
        "explain",
        "--manifests",
        m,
        "--state-dir",
        s,
        "--node",
        "n1",
    ];
    // From a client outside the cluster to the node port: two endpoints, half each, masqueraded.
    let mut args = base.to_vec();
    args.extend(["--from", "192.168.2.100", "--to", "192.168.2.11:30777"]);
    let out = ferry(&args);
    assert!(out.contains("service default/known"), "{out}");
    for ep in ["10.42.0.5:80", "10.42.1.6:80"] {
        let line = out
            .lines()
            .find(|l| l.contains(ep))
            .unwrap_or_else(|| panic!("{ep} missing:\n{out}"));
        assert!(
            line.contains(" 50.0%") && line.contains("masqueraded"),
            "{line}"
        );
    }
    assert!(out.contains("chains: "), "{out}");
    // From a pod to the cluster IP: not masqueraded.
    let mut args = base.to_vec();
    args.extend(["--from", "10.42.0.9", "--to", "10.43.7.7:80"]);
    let out = ferry(&args);
    assert!(out.contains("source kept"), "{out}");
    // Not a service address: left alone.
    let mut args = base.to_vec();
    args.extend(["--from", "192.168.2.100", "--to", "192.168.2.50:80"]);
    assert!(ferry(&args).contains("left alone"));
    // Refused, and why: a port the service lacks; an address of the service CIDR no service
    // has (dropped, as kube-proxy does).
    let mut args = base.to_vec();
    args.extend(["--from", "10.42.0.9", "--to", "10.43.7.7:81/tcp"]);
    let out = ferry(&args);
    assert!(
        out.contains("rejected (tcp reset): a cluster IP on a port its service lacks"),
        "{out}"
    );
    let mut args = base.to_vec();
    args.extend(["--from", "10.42.0.9", "--to", "10.43.9.9:80", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&ferry(&args)).unwrap();
    assert_eq!(v["outcomes"][0]["fate"], "dropped", "{v}");
    assert_eq!(
        v["outcomes"][0]["why"], "an address of the service CIDR that no service has",
        "{v}"
    );
    assert_eq!(
        files(&state),
        before,
        "explain wrote to the state directory"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}
