//! PATCH bodies: JSON patch (RFC 6902) and JSON merge patch (RFC 7386) through the
//! `json-patch` crate, and a strategic merge patch for built-in kinds with the merge keys of
//! the fields ferry and kubectl touch.

use serde_json::{Map, Value};

/// The PATCH content types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    Strategic,
    /// Server-side apply (`application/apply-patch+yaml`), served as a create-or-merge.
    Apply,
}

impl PatchType {
    /// From a Content-Type header value (parameters ignored).
    pub fn from_content_type(ct: &str) -> Option<Self> {
        match ct.split(';').next().unwrap_or("").trim() {
            "application/json-patch+json" => Some(PatchType::Json),
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/strategic-merge-patch+json" => Some(PatchType::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => {
                Some(PatchType::Apply)
            }
            _ => None,
        }
    }
}

/// Applies an RFC 6902 JSON patch.
pub fn json_patch(doc: &Value, patch: &Value) -> Result<Value, String> {
    let ops: json_patch::Patch =
        serde_json::from_value(patch.clone()).map_err(|e| format!("invalid JSON patch: {e}"))?;
    let mut out = doc.clone();
    json_patch::patch(&mut out, &ops).map_err(|e| format!("JSON patch failed: {e}"))?;
    Ok(out)
}

/// Applies an RFC 7386 JSON merge patch.
pub fn merge_patch(doc: &Value, patch: &Value) -> Result<Value, String> {
    if !patch.is_object() {
        return Err("a merge patch must be a JSON object".into());
    }
    let mut out = doc.clone();
    json_patch::merge(&mut out, patch);
    Ok(out)
}

/// The merge key of a list field, given the names of the fields above it; `None` means the
/// list is replaced as a whole (as for fields without `patchStrategy: merge`).
fn merge_key(path: &[String], field: &str) -> Option<&'static str> {
    let parent = path.last().map(String::as_str).unwrap_or("");
    let in_container = matches!(
        parent,
        "containers" | "initContainers" | "ephemeralContainers"
    );
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "imagePullSecrets" => "name",
        "env" if in_container => "name",
        "ports" if in_container => "containerPort",
        "ports" if parent == "spec" => "port",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "conditions" => "type",
        "ownerReferences" => "uid",
        "hostAliases" => "ip",
        "topologySpreadConstraints" => "topologyKey",
        "addresses" if parent == "status" => "type",
        _ => return None,
    })
}

/// Applies a strategic merge patch (maps merge as in a merge patch; lists with a merge key
/// merge element by element; `$patch: replace|delete|merge`, `$setElementOrder/<field>`,
/// `$retainKeys` and `$deleteFromPrimitiveList/<field>` are honoured).
pub fn strategic_merge_patch(doc: &Value, patch: &Value) -> Result<Value, String> {
    let Value::Object(p) = patch else {
        return Err("a strategic merge patch must be a JSON object".into());
    };
    let mut out = doc.clone();
    merge_map(&mut out, p, &mut Vec::new())?;
    Ok(out)
}

fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

fn merge_map(
    target: &mut Value,
    patch: &Map<String, Value>,
    path: &mut Vec<String>,
) -> Result<(), String> {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            *target = strip_directives(&Value::Object(patch.clone()));
            return Ok(());
        }
        Some("delete") => {
            *target = Value::Null;
            return Ok(());
        }
        Some("merge") | None => {}
        Some(other) => return Err(format!("unknown $patch directive {other:?}")),
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else {
        return Err("internal: target is not an object".into());
    };
    let mut orders = Vec::new();
    for (k, v) in patch {
        if let Some(field) = k.strip_prefix("$setElementOrder/") {
            orders.push((field.to_string(), v.clone()));
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            let drop = v.as_array().cloned().unwrap_or_default();
            if let Some(Value::Array(list)) = t.get_mut(field) {
                list.retain(|x| !drop.contains(x));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        match v {
            Value::Null => {
                t.remove(k);
            }
            Value::Object(pm) => {
                path.push(k.clone());
                let entry = t.entry(k.clone()).or_insert(Value::Null);
                let r = merge_map(entry, pm, path);
                path.pop();
                r?;
                if entry.is_null() {
                    t.remove(k);
                }
            }
            Value::Array(pl) => {
                let merged = merge_list(t.get(k), pl, path, k)?;
                t.insert(k.clone(), merged);
            }
            other => {
                t.insert(k.clone(), other.clone());
            }
        }
    }
    for (field, order) in orders {
        let key = merge_key(path, &field);
        if let (Some(Value::Array(list)), Some(order)) = (t.get_mut(&field), order.as_array()) {
            let pos = |item: &Value| {
                order.iter().position(|o| match key {
                    Some(key) => o.get(key).is_some() && o.get(key) == item.get(key),
                    None => o == item,
                })
            };
            let mut keyed: Vec<(usize, Value)> = Vec::new();
            let mut rest = Vec::new();
            for item in list.drain(..) {
                match pos(&item) {
                    Some(i) => keyed.push((i, item)),
                    None => rest.push(item),
                }
            }
            keyed.sort_by_key(|(i, _)| *i);
            list.extend(keyed.into_iter().map(|(_, v)| v));
            list.extend(rest);
        }
    }
    if let Some(Value::Array(keep)) = patch.get("$retainKeys") {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        t.retain(|k, _| keep.contains(&k.as_str()));
    }
    Ok(())
}

fn merge_list(
    current: Option<&Value>,
    patch: &[Value],
    path: &mut Vec<String>,
    field: &str,
) -> Result<Value, String> {
    let key = merge_key(path, field);
    let replace = patch
        .iter()
        .any(|e| e.get("$patch").and_then(Value::as_str) == Some("replace"));
    let (Some(key), false) = (key, replace) else {
        let items = patch
            .iter()
            .filter(|e| e.get("$patch").is_none())
            .map(strip_directives)
            .collect();
        return Ok(Value::Array(items));
    };
    let mut list = current
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    path.push(field.to_string());
    for item in patch {
        let Some(id) = item.get(key) else {
            path.pop();
            return Err(format!("an element of {field} has no merge key {key:?}"));
        };
        let existing = list.iter().position(|e| e.get(key) == Some(id));
        if item.get("$patch").and_then(Value::as_str) == Some("delete") {
            if let Some(i) = existing {
                list.remove(i);
            }
            continue;
        }
        let Value::Object(im) = item else { continue };
        match existing {
            Some(i) => {
                if let Err(e) = merge_map(&mut list[i], im, path) {
                    path.pop();
                    return Err(e);
                }
            }
            None => list.push(strip_directives(item)),
        }
    }
    path.pop();
    Ok(Value::Array(list))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc() -> Value {
        json!({
            "metadata": {"name": "web", "labels": {"a": "1", "b": "2"}},
            "spec": {
                "type": "ClusterIP",
                "clusterIP": "10.96.0.10",
                "ports": [
                    {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                    {"name": "https", "port": 443, "targetPort": 8443, "protocol": "TCP"}
                ]
            }
        })
    }

    #[test]
    fn merge_patch_replaces_lists_and_deletes_nulls() {
        let out = merge_patch(&svc(), &json!({"metadata": {"labels": {"a": null, "c": "3"}}, "spec": {"ports": [{"port": 81}]}})).unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"b": "2", "c": "3"}));
        assert_eq!(out["spec"]["ports"], json!([{"port": 81}]));
        assert!(merge_patch(&svc(), &json!([1])).is_err());
    }

    #[test]
    fn json_patch_ops_and_failed_test() {
        let out = json_patch(
            &svc(),
            &json!([
                {"op": "replace", "path": "/spec/type", "value": "NodePort"},
                {"op": "add", "path": "/metadata/labels/c", "value": "3"},
                {"op": "remove", "path": "/spec/ports/1"}
            ]),
        )
        .unwrap();
        assert_eq!(out["spec"]["type"], "NodePort");
        assert_eq!(out["spec"]["ports"].as_array().unwrap().len(), 1);
        assert!(json_patch(
            &svc(),
            &json!([{"op": "test", "path": "/spec/type", "value": "x"}])
        )
        .is_err());
        assert!(json_patch(&svc(), &json!({"op": "add"})).is_err());
    }

    #[test]
    fn strategic_merges_service_ports_by_port() {
        // What kubectl apply sends when one port's targetPort changes.
        let p = json!({"spec": {
            "$setElementOrder/ports": [{"port": 443}, {"port": 80}],
            "ports": [{"port": 80, "targetPort": 9090}]
        }});
        let out = strategic_merge_patch(&svc(), &p).unwrap();
        let ports = out["spec"]["ports"].as_array().unwrap();
        assert_eq!(ports.len(), 2);
        assert_eq!(ports[0]["port"], 443);
        assert_eq!(ports[1]["targetPort"], 9090);
        assert_eq!(ports[1]["name"], "http", "other fields of the element stay");
        assert_eq!(out["spec"]["clusterIP"], "10.96.0.10");
        // Delete one element, add one.
        let p = json!({"spec": {"ports": [{"port": 443, "$patch": "delete"}, {"port": 8081, "name": "x"}]}});
        let out = strategic_merge_patch(&svc(), &p).unwrap();
        let ports: Vec<i64> = out["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["port"].as_i64().unwrap())
            .collect();
        assert_eq!(ports, vec![80, 8081]);
        // An element without its merge key is an error.
        assert!(
            strategic_merge_patch(&svc(), &json!({"spec": {"ports": [{"name": "x"}]}})).is_err()
        );
    }

    #[test]
    fn strategic_merges_containers_by_name_and_directives() {
        let dep = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "a", "image": "a:1", "ports": [{"containerPort": 80}], "env": [{"name": "X", "value": "1"}]},
            {"name": "b", "image": "b:1"}
        ]}}}});
        let p = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "a", "image": "a:2", "env": [{"name": "Y", "value": "2"}]}
        ]}}}});
        let out = strategic_merge_patch(&dep, &p).unwrap();
        let cs = out["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        assert_eq!(cs.len(), 2);
        assert_eq!(cs[0]["image"], "a:2");
        assert_eq!(cs[0]["env"].as_array().unwrap().len(), 2);
        assert_eq!(cs[0]["ports"][0]["containerPort"], 80);
        // Lists without a merge key are replaced; $patch: replace replaces a map.
        let out = strategic_merge_patch(
            &json!({"a": [1, 2], "m": {"x": 1, "y": 2}}),
            &json!({"a": [3], "m": {"$patch": "replace", "z": 3}}),
        )
        .unwrap();
        assert_eq!(out, json!({"a": [3], "m": {"z": 3}}));
        let out = strategic_merge_patch(
            &json!({"spec": {"finalizers": ["a", "b"]}}),
            &json!({"spec": {"$deleteFromPrimitiveList/finalizers": ["a"]}}),
        )
        .unwrap();
        assert_eq!(out["spec"]["finalizers"], json!(["b"]));
        let out = strategic_merge_patch(
            &json!({"s": {"type": "A", "a": 1, "b": 2}}),
            &json!({"s": {"$retainKeys": ["type", "b"], "type": "B"}}),
        )
        .unwrap();
        assert_eq!(out["s"], json!({"type": "B", "b": 2}));
    }
}
