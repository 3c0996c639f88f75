//! `meta.k8s.io/v1` Tables, which `kubectl get` asks for: the columns kubectl users expect for
//! Services, Leases, Events, Pods and EndpointSlices; NAME and AGE for the rest.

use serde_json::{json, Value};

use crate::resources::Resource;

fn s(v: &Value, ptr: &str) -> String {
    v.pointer(ptr)
        .map(|x| match x {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        })
        .unwrap_or_default()
}

fn or_none(x: String) -> String {
    if x.is_empty() {
        "<none>".into()
    } else {
        x
    }
}

/// How long ago an RFC 3339 time was, as kubectl prints ages (ferry's one implementation of
/// kubectl's `HumanDuration`: `5s`, `3m4s`, `2h`, `4d`).
pub fn age(ts: &str) -> String {
    let Ok(t) = ts.parse::<jiff::Timestamp>() else {
        return "<unknown>".into();
    };
    let secs = (jiff::Timestamp::now().as_second() - t.as_second()).max(0);
    ferry_model::display::human_age(std::time::Duration::from_secs(secs.unsigned_abs()))
}

fn list(v: &Value, ptr: &str, f: impl Fn(&Value) -> String) -> String {
    v.pointer(ptr)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(f)
                .filter(|x| !x.is_empty())
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

/// (column names, cells of one object) for a resource.
fn columns(res: &Resource, o: &Value) -> (Vec<&'static str>, Vec<String>) {
    let name = s(o, "/metadata/name");
    let created = age(&s(o, "/metadata/creationTimestamp"));
    match (res.group, res.resource) {
        ("", "services") => {
            let ty = s(o, "/spec/type");
            let ty = if ty.is_empty() {
                "ClusterIP".to_string()
            } else {
                ty
            };
            let ingress = list(o, "/status/loadBalancer/ingress", |i| {
                let ip = s(i, "/ip");
                if ip.is_empty() {
                    s(i, "/hostname")
                } else {
                    ip
                }
            });
            let external = list(o, "/spec/externalIPs", |x| {
                x.as_str().unwrap_or_default().to_string()
            });
            let ext = match (ty.as_str(), ingress.is_empty(), external.is_empty()) {
                ("LoadBalancer", true, true) => "<pending>".to_string(),
                (_, false, true) => ingress,
                (_, true, false) => external,
                (_, false, false) => format!("{ingress},{external}"),
                (_, true, true) => "<none>".to_string(),
            };
            let ports = list(o, "/spec/ports", |p| {
                let proto = s(p, "/protocol");
                let proto = if proto.is_empty() {
                    "TCP".to_string()
                } else {
                    proto
                };
                match s(p, "/nodePort") {
                    np if np.is_empty() => format!("{}/{proto}", s(p, "/port")),
                    np => format!("{}:{np}/{proto}", s(p, "/port")),
                }
            });
            (
                vec![
                    "Name",
                    "Type",
                    "Cluster-IP",
                    "External-IP",
                    "Port(s)",
                    "Age",
                ],
                vec![
                    name,
                    ty,
                    or_none(s(o, "/spec/clusterIP")),
                    ext,
                    or_none(ports),
                    created,
                ],
            )
        }
        ("coordination.k8s.io", "leases") => (
            vec!["Name", "Holder", "Age"],
            vec![name, s(o, "/spec/holderIdentity"), created],
        ),
        ("", "events") => (
            vec!["Last Seen", "Type", "Reason", "Object", "Message"],
            vec![
                age(&[
                    s(o, "/lastTimestamp"),
                    s(o, "/eventTime"),
                    s(o, "/metadata/creationTimestamp"),
                ]
                .into_iter()
                .find(|t| !t.is_empty())
                .unwrap_or_default()),
                s(o, "/type"),
                s(o, "/reason"),
                format!(
                    "{}/{}",
                    s(o, "/involvedObject/kind").to_ascii_lowercase(),
                    s(o, "/involvedObject/name")
                ),
                s(o, "/message"),
            ],
        ),
        ("events.k8s.io", "events") => (
            vec!["Last Seen", "Type", "Reason", "Object", "Message"],
            vec![
                age(&[s(o, "/eventTime"), s(o, "/metadata/creationTimestamp")]
                    .into_iter()
                    .find(|t| !t.is_empty())
                    .unwrap_or_default()),
                s(o, "/type"),
                s(o, "/reason"),
                format!(
                    "{}/{}",
                    s(o, "/regarding/kind").to_ascii_lowercase(),
                    s(o, "/regarding/name")
                ),
                s(o, "/note"),
            ],
        ),
        ("", "pods") => {
            let total = o
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            let ready = o
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array)
                .map_or(0, |c| c.iter().filter(|c| c["ready"] == true).count());
            (
                vec!["Name", "Ready", "Status", "IP", "Node", "Age"],
                vec![
                    name,
                    format!("{ready}/{total}"),
                    or_none(s(o, "/status/phase")),
                    or_none(s(o, "/status/podIP")),
                    or_none(s(o, "/spec/nodeName")),
                    created,
                ],
            )
        }
        ("discovery.k8s.io", "endpointslices") => (
            vec!["Name", "AddressType", "Ports", "Endpoints", "Age"],
            vec![
                name,
                s(o, "/addressType"),
                or_none(list(o, "/ports", |p| s(p, "/port"))),
                or_none(list(o, "/endpoints", |e| {
                    list(e, "/addresses", |a| {
                        a.as_str().unwrap_or_default().to_string()
                    })
                })),
                created,
            ],
        ),
        ("apps", "deployments") => {
            let n = |ptr: &str| o.pointer(ptr).and_then(Value::as_i64).unwrap_or(0);
            let want = o
                .pointer("/spec/replicas")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            (
                vec!["Name", "Ready", "Up-to-date", "Available", "Age"],
                vec![
                    name,
                    format!("{}/{want}", n("/status/readyReplicas")),
                    n("/status/updatedReplicas").to_string(),
                    n("/status/availableReplicas").to_string(),
                    created,
                ],
            )
        }
        ("", "nodes") => {
            let ready = o
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
                .map(|c| c["status"] == "True");
            let status = match ready {
                Some(true) => "Ready",
                Some(false) => "NotReady",
                None => "Unknown",
            };
            let mut roles: Vec<&str> = o
                .pointer("/metadata/labels")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .filter_map(|(k, _)| k.strip_prefix("node-role.kubernetes.io/"))
                .collect();
            roles.sort_unstable();
            (
                vec!["Name", "Status", "Roles", "Age", "Version"],
                vec![
                    name,
                    status.to_string(),
                    if roles.is_empty() {
                        "<none>".to_string()
                    } else {
                        roles.join(",")
                    },
                    created,
                    or_none(s(o, "/status/nodeInfo/kubeletVersion")),
                ],
            )
        }
        _ => (vec!["Name", "Age"], vec![name, created]),
    }
}

/// A Table of `objects` (each row carries its whole object). `with_columns: false` leaves out
/// the column definitions (later events of a watch).
pub fn table(res: &Resource, objects: &[Value], rv: Option<u64>, with_columns: bool) -> Value {
    let mut names = Vec::new();
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let (n, cells) = columns(res, o);
            names = n;
            json!({"cells": cells, "object": o})
        })
        .collect();
    if names.is_empty() {
        names = columns(res, &json!({})).0;
    }
    let mut t = json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {},
        "rows": rows,
    });
    if let Some(rv) = rv {
        t["metadata"]["resourceVersion"] = json!(rv.to_string());
    }
    if with_columns {
        t["columnDefinitions"] = Value::Array(
            names
                .iter()
                .map(|n| {
                    json!({
                        "name": n,
                        "type": "string",
                        "format": if *n == "Name" { "name" } else { "" },
                        "description": n,
                        "priority": 0,
                    })
                })
                .collect(),
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::find;

    #[test]
    fn deployment_and_node_columns() {
        let d = json!({
            "metadata": {"name": "web", "creationTimestamp": "2020-01-01T00:00:00Z"},
            "spec": {"replicas": 3},
            "status": {"readyReplicas": 2, "updatedReplicas": 3, "availableReplicas": 2},
        });
        let t = table(find("apps", "v1", "deployments").unwrap(), &[d], None, true);
        let cells = &t["rows"][0]["cells"];
        assert_eq!(cells[1], "2/3");
        assert_eq!((&cells[2], &cells[3]), (&json!("3"), &json!("2")));
        assert_eq!(t["columnDefinitions"][2]["name"], "Up-to-date");
        let fresh = json!({"metadata": {"name": "new"}, "spec": {"replicas": 2}});
        let t = table(
            find("apps", "v1", "deployments").unwrap(),
            &[fresh],
            None,
            false,
        );
        assert_eq!(t["rows"][0]["cells"][1], "0/2");
        let n = json!({
            "metadata": {"name": "n1", "labels": {"node-role.kubernetes.io/master": "true",
                "node-role.kubernetes.io/control-plane": "true"}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}],
                       "nodeInfo": {"kubeletVersion": "v1.33.0"}},
        });
        let t = table(find("", "v1", "nodes").unwrap(), &[n], None, true);
        let cells = &t["rows"][0]["cells"];
        assert_eq!(cells[1], "Ready");
        assert_eq!(cells[2], "control-plane,master");
        assert_eq!(cells[4], "v1.33.0");
        let t = table(
            find("", "v1", "nodes").unwrap(),
            &[json!({"metadata": {"name": "n2"}})],
            None,
            false,
        );
        assert_eq!(t["rows"][0]["cells"][1], "Unknown");
        assert_eq!(t["rows"][0]["cells"][2], "<none>");
    }

    #[test]
    fn service_columns() {
        let svc = json!({
            "metadata": {"name": "web", "creationTimestamp": "2020-01-01T00:00:00Z"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                     "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}]},
        });
        let t = table(
            find("", "v1", "services").unwrap(),
            std::slice::from_ref(&svc),
            Some(7),
            true,
        );
        assert_eq!(t["metadata"]["resourceVersion"], "7");
        let cells = &t["rows"][0]["cells"];
        assert_eq!(cells[0], "web");
        assert_eq!(cells[3], "<pending>");
        assert_eq!(cells[4], "80:30080/TCP,53/UDP");
        assert!(cells[5].as_str().unwrap().ends_with('d'));
        let mut assigned = svc;
        assigned["status"] = json!({"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}});
        let t = table(
            find("", "v1", "services").unwrap(),
            &[assigned],
            None,
            false,
        );
        assert_eq!(t["rows"][0]["cells"][3], "192.0.2.1");
        assert!(t.get("columnDefinitions").is_none());
    }

    #[test]
    fn ages() {
        assert_eq!(age("not a time"), "<unknown>");
        let t = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(185);
        assert_eq!(age(&t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()), "3m5s");
    }
}
