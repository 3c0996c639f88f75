//! The resource table: which kinds the server knows, and how discovery describes them.

/// One served resource (a group/version/resource and how it behaves).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// API group; `""` for the core group.
    pub group: &'static str,
    pub version: &'static str,
    /// Plural, lower-case name used in URLs (`services`).
    pub resource: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    /// Has a `/status` subresource (status is then ignored by main-resource writes).
    pub status: bool,
    /// A built-in kind (strategic merge patch allowed); `false` for custom resources.
    pub builtin: bool,
}

impl Resource {
    /// `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Singular name as discovery reports it (lower-case kind).
    pub fn singular(&self) -> String {
        self.kind.to_ascii_lowercase()
    }
}

#[allow(clippy::too_many_arguments)] // a table row, read positionally
const fn r(
    group: &'static str,
    version: &'static str,
    resource: &'static str,
    kind: &'static str,
    namespaced: bool,
    short_names: &'static [&'static str],
    status: bool,
    builtin: bool,
) -> Resource {
    Resource {
        group,
        version,
        resource,
        kind,
        namespaced,
        short_names,
        status,
        builtin,
    }
}

/// Every resource the server serves.
pub static RESOURCES: &[Resource] = &[
    r(
        "",
        "v1",
        "namespaces",
        "Namespace",
        false,
        &["ns"],
        true,
        true,
    ),
    r("", "v1", "nodes", "Node", false, &["no"], true, true),
    r("", "v1", "services", "Service", true, &["svc"], true, true),
    r(
        "",
        "v1",
        "endpoints",
        "Endpoints",
        true,
        &["ep"],
        false,
        true,
    ),
    r(
        "",
        "v1",
        "configmaps",
        "ConfigMap",
        true,
        &["cm"],
        false,
        true,
    ),
    r("", "v1", "pods", "Pod", true, &["po"], true, true),
    // For BGPPeers' passwordSecret.
    r("", "v1", "secrets", "Secret", true, &[], false, true),
    r("", "v1", "events", "Event", true, &["ev"], false, true),
    r(
        "discovery.k8s.io",
        "v1",
        "endpointslices",
        "EndpointSlice",
        true,
        &[],
        false,
        true,
    ),
    r(
        "apps",
        "v1",
        "deployments",
        "Deployment",
        true,
        &["deploy"],
        true,
        true,
    ),
    r(
        "coordination.k8s.io",
        "v1",
        "leases",
        "Lease",
        true,
        &[],
        false,
        true,
    ),
    r(
        "events.k8s.io",
        "v1",
        "events",
        "Event",
        true,
        &["ev"],
        false,
        true,
    ),
    r(
        "metallb.io",
        "v1beta1",
        "ipaddresspools",
        "IPAddressPool",
        true,
        &[],
        true,
        false,
    ),
    r(
        "metallb.io",
        "v1beta1",
        "l2advertisements",
        "L2Advertisement",
        true,
        &[],
        true,
        false,
    ),
    r(
        "metallb.io",
        "v1beta1",
        "bgpadvertisements",
        "BGPAdvertisement",
        true,
        &[],
        true,
        false,
    ),
    r(
        "metallb.io",
        "v1beta1",
        "communities",
        "Community",
        true,
        &[],
        true,
        false,
    ),
    r(
        "metallb.io",
        "v1beta1",
        "bfdprofiles",
        "BFDProfile",
        true,
        &[],
        true,
        false,
    ),
    r(
        "metallb.io",
        "v1beta2",
        "bgppeers",
        "BGPPeer",
        true,
        &[],
        true,
        false,
    ),
    // What an install manifest holds (deploy/ferry.yaml), stored as sent: no controller
    // runs a DaemonSet, RBAC objects are not enforced from the store (see `authz`), and a
    // CustomResourceDefinition does not make the server serve its kind.
    r(
        "",
        "v1",
        "serviceaccounts",
        "ServiceAccount",
        true,
        &["sa"],
        false,
        true,
    ),
    r(
        "apps",
        "v1",
        "daemonsets",
        "DaemonSet",
        true,
        &["ds"],
        true,
        true,
    ),
    r(
        "rbac.authorization.k8s.io",
        "v1",
        "clusterroles",
        "ClusterRole",
        false,
        &[],
        false,
        true,
    ),
    r(
        "rbac.authorization.k8s.io",
        "v1",
        "clusterrolebindings",
        "ClusterRoleBinding",
        false,
        &[],
        false,
        true,
    ),
    r(
        "rbac.authorization.k8s.io",
        "v1",
        "roles",
        "Role",
        true,
        &[],
        false,
        true,
    ),
    r(
        "rbac.authorization.k8s.io",
        "v1",
        "rolebindings",
        "RoleBinding",
        true,
        &[],
        false,
        true,
    ),
    r(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        false,
        &["crd", "crds"],
        true,
        true,
    ),
];

/// Finds a resource by group, version and plural name.
pub fn find(group: &str, version: &str, resource: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.resource == resource)
}

/// The groups other than the core group, in first-seen order, with their versions.
pub fn groups() -> Vec<(&'static str, Vec<&'static str>)> {
    let mut out: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
    for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
        match out.iter_mut().find(|(g, _)| *g == r.group) {
            Some((_, versions)) => {
                if !versions.contains(&r.version) {
                    versions.push(r.version);
                }
            }
            None => out.push((r.group, vec![r.version])),
        }
    }
    out
}

/// The verbs discovery lists for a main resource.
pub const VERBS: &[&str] = &[
    "create", "delete", "get", "list", "patch", "update", "watch",
];

/// Whether a resource has the `/scale` subresource (autoscaling/v1 Scale): Deployments.
pub fn has_scale(r: &Resource) -> bool {
    r.group == "apps" && r.resource == "deployments"
}

/// An `APIResourceList` for one group/version, with `*/status` subresources.
pub fn resource_list(group: &str, version: &str) -> Option<serde_json::Value> {
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    let mut items = Vec::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let mut item = serde_json::json!({
            "name": r.resource,
            "singularName": r.singular(),
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": VERBS,
        });
        if !r.short_names.is_empty() {
            item["shortNames"] = serde_json::json!(r.short_names);
        }
        // `kubectl get all`.
        if matches!(
            (r.group, r.resource),
            ("", "services") | ("", "pods") | ("apps", "deployments")
        ) {
            item["categories"] = serde_json::json!(["all"]);
        }
        items.push(item);
        if r.status {
            items.push(serde_json::json!({
                "name": format!("{}/status", r.resource),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if has_scale(r) {
            items.push(serde_json::json!({
                "name": format!("{}/scale", r.resource),
                "singularName": "",
                "namespaced": r.namespaced,
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    if items.is_empty() {
        return None;
    }
    Some(serde_json::json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": gv,
        "resources": items,
    }))
}

/// The `/openapi/v3` index: one entry per group/version, as kube-apiserver serves it.
pub fn openapi_v3_index() -> serde_json::Value {
    let mut paths = serde_json::Map::new();
    let mut gvs: Vec<(&str, &str)> = Vec::new();
    for r in RESOURCES {
        if !gvs.contains(&(r.group, r.version)) {
            gvs.push((r.group, r.version));
        }
    }
    for (g, v) in gvs {
        let key = gv_path(g, v);
        paths.insert(
            key.clone(),
            serde_json::json!({ "serverRelativeURL": format!("/openapi/v3/{key}") }),
        );
    }
    serde_json::json!({ "paths": paths })
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// A minimal OpenAPI v3 document for one group/version: only the PATCH operations, with
/// their group/version/kind and the `fieldValidation` parameter. That is what kubectl looks
/// for to leave validation to the server (which this test double does not do: it accepts
/// unknown fields), so `kubectl apply -f` works without `--validate=false`. No schemas:
/// kubectl then builds strategic merge patches from its compiled-in types.
pub fn openapi_v3_doc(group: &str, version: &str) -> Option<serde_json::Value> {
    let mut paths = serde_json::Map::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let base = gv_path(group, version);
        let path = if r.namespaced {
            format!("/{base}/namespaces/{{namespace}}/{}/{{name}}", r.resource)
        } else {
            format!("/{base}/{}/{{name}}", r.resource)
        };
        paths.insert(
            path,
            serde_json::json!({
                "patch": {
                    "operationId": format!("patch{}", r.kind),
                    "x-kubernetes-group-version-kind": {
                        "group": r.group, "version": r.version, "kind": r.kind,
                    },
                    "parameters": [
                        {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
                        {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {"200": {"description": "OK"}},
                }
            }),
        );
    }
    if paths.is_empty() {
        return None;
    }
    Some(serde_json::json!({
        "openapi": "3.0.0",
        "info": {"title": "ferry-apiserver (a test double of kube-apiserver)", "version": "v1.32.0"},
        "paths": paths,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_lists_status_subresources_and_short_names() {
        let list = resource_list("", "v1").unwrap();
        let names: Vec<&str> = list["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"services/status"));
        assert!(!names.contains(&"configmaps/status"));
        let svc = list["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "services")
            .unwrap();
        assert_eq!(svc["shortNames"][0], "svc");
        assert!(resource_list("metallb.io", "v1beta2").is_some());
        assert!(resource_list("metallb.io", "v1").is_none());
    }

    #[test]
    fn groups_collect_versions() {
        let g = groups();
        let metallb = g.iter().find(|(n, _)| *n == "metallb.io").unwrap();
        assert_eq!(metallb.1, vec!["v1beta1", "v1beta2"]);
    }
}
