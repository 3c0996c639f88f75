//! The install manifests in deploy/: every document decodes as its Kubernetes type, and the
//! DaemonSet asks for what the agent needs and no more (the RBAC half is proven against the
//! lab API server in e2e_kube.rs, `rbac_is_least_privilege`).

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

fn docs(file: &str) -> Vec<Value> {
    let path = format!("{}/../../deploy/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    serde_saphyr::from_multiple::<Value>(&text)
        .unwrap()
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

fn decode<T: serde::de::DeserializeOwned>(d: &Value) -> T {
    serde_path_to_error::deserialize(d.clone())
        .unwrap_or_else(|e| panic!("{} {}: {e}", d["kind"], d["metadata"]["name"]))
}

#[test]
fn every_document_is_a_valid_object() {
    let mut kinds = Vec::new();
    for d in docs("ferry.yaml") {
        let kind = d["kind"].as_str().unwrap().to_string();
        match kind.as_str() {
            "Namespace" => drop(decode::<Namespace>(&d)),
            "ServiceAccount" => drop(decode::<ServiceAccount>(&d)),
            "ClusterRole" => drop(decode::<ClusterRole>(&d)),
            "ClusterRoleBinding" => drop(decode::<ClusterRoleBinding>(&d)),
            "Role" => drop(decode::<Role>(&d)),
            "RoleBinding" => drop(decode::<RoleBinding>(&d)),
            "DaemonSet" => drop(decode::<DaemonSet>(&d)),
            other => panic!("unexpected kind {other} in deploy/ferry.yaml"),
        }
        kinds.push(kind);
    }
    assert!(kinds.contains(&"DaemonSet".to_string()));
    let crds: Vec<CustomResourceDefinition> =
        docs("metallb-crds.yaml").iter().map(decode).collect();
    let names: Vec<&str> = crds.iter().map(|c| c.spec.names.kind.as_str()).collect();
    for kind in [
        "IPAddressPool",
        "L2Advertisement",
        "BGPPeer",
        "BGPAdvertisement",
    ] {
        assert!(names.contains(&kind), "{kind} CRD missing");
    }
    let peer = crds
        .iter()
        .find(|c| c.spec.names.kind == "BGPPeer")
        .unwrap();
    let storage: Vec<&str> = peer
        .spec
        .versions
        .iter()
        .filter(|v| v.storage)
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(storage, ["v1beta2"], "MetalLB stores BGPPeer as v1beta2");
}

#[test]
fn the_daemonset_asks_for_what_the_agent_needs() {
    let d = docs("ferry.yaml")
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .unwrap();
    let ds: DaemonSet = decode(&d);
    let spec = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tol = spec.tolerations.unwrap();
    assert!(
        tol.iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "runs on every node, tainted ones included"
    );
    let c = &spec.containers[0];
    let sc = c.security_context.clone().unwrap();
    assert_ne!(sc.privileged, Some(true));
    let caps = sc.capabilities.unwrap();
    assert_eq!(caps.drop.unwrap(), ["ALL"]);
    let mut add = caps.add.unwrap();
    add.sort();
    assert_eq!(add, ["NET_ADMIN", "NET_RAW"]);
    // The probes hit the agent's health endpoint where --metrics-addr puts it.
    let args = c.args.clone().unwrap();
    assert!(args.contains(&"--metrics-addr=127.0.0.1:10249".to_string()));
    for (probe, path) in [
        (c.liveness_probe.clone().unwrap(), "/healthz"),
        (c.readiness_probe.clone().unwrap(), "/readyz"),
    ] {
        let h = probe.http_get.unwrap();
        assert_eq!(h.path.as_deref(), Some(path));
        assert_eq!(h.host.as_deref(), Some("127.0.0.1"));
        assert_eq!(
            h.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(10249)
        );
    }
    // The node name and namespace the agent reads.
    let env: Vec<String> = c.env.clone().unwrap().into_iter().map(|e| e.name).collect();
    assert!(env.contains(&"NODE_NAME".to_string()) && env.contains(&"POD_NAMESPACE".to_string()));
    assert!(args.contains(&"--node=$(NODE_NAME)".to_string()));
    // Never without an agent longer than the hand-over.
    let ru = ds_update(&d);
    assert_eq!(ru, ("1".to_string(), "0".to_string()));
}

/// (maxSurge, maxUnavailable) of the DaemonSet's rolling update.
fn ds_update(d: &Value) -> (String, String) {
    let ru = &d["spec"]["updateStrategy"]["rollingUpdate"];
    (ru["maxSurge"].to_string(), ru["maxUnavailable"].to_string())
}
