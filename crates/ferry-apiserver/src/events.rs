//! One storage for Events, two APIs: core/v1 Events are stored as events.k8s.io/v1 Events
//! and converted on the way in and out (the field renames of kube-apiserver's conversion),
//! so an Event recorded through one API (kube-rs's `Recorder` writes events.k8s.io/v1) is
//! listed and watched through the other (`kubectl get events` reads core/v1).

use serde_json::{Map, Value};

use crate::resources::{self, Resource};

/// (core/v1 field, events.k8s.io/v1 field).
const RENAMES: &[(&str, &str)] = &[
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("reportingComponent", "reportingController"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
];

fn is_core_events(res: &Resource) -> bool {
    res.group.is_empty() && res.resource == "events"
}

/// Where objects of `res` are stored.
pub fn storage_of(res: &'static Resource) -> &'static Resource {
    if is_core_events(res) {
        resources::find("events.k8s.io", "v1", "events").unwrap_or(res)
    } else {
        res
    }
}

fn rename(v: Value, from_core: bool, api_version: &str) -> Value {
    let Value::Object(m) = v else { return v };
    let mut out = Map::new();
    for (k, val) in m {
        let key = RENAMES
            .iter()
            .find_map(|(core, ev)| match from_core {
                true if k == *core => Some(ev.to_string()),
                false if k == *ev => Some(core.to_string()),
                _ => None,
            })
            .unwrap_or(k);
        out.insert(key, val);
    }
    // Only a matching apiVersion is translated; anything else is left for the kind check.
    let expected_in = if from_core { "v1" } else { "events.k8s.io/v1" };
    if out
        .get("apiVersion")
        .and_then(Value::as_str)
        .is_none_or(|a| a == expected_in)
    {
        out.insert("apiVersion".into(), Value::from(api_version));
    }
    Value::Object(out)
}

/// An object of `res` as sent by a client, in its stored form.
pub fn to_storage(res: &Resource, v: Value) -> Value {
    if is_core_events(res) {
        rename(v, true, "events.k8s.io/v1")
    } else {
        v
    }
}

/// A stored object in the form of `res`.
pub fn from_storage(res: &Resource, v: Value) -> Value {
    if is_core_events(res) {
        rename(v, false, "v1")
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trip_and_identity() {
        let core = resources::find("", "v1", "events").unwrap();
        let ev = json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": "web.1", "namespace": "default"},
            "involvedObject": {"kind": "Service", "name": "web"},
            "reason": "IPAllocated", "message": "Assigned IP [\"192.0.2.1\"]", "type": "Normal",
            "count": 2, "source": {"component": "ferry"},
        });
        let stored = to_storage(core, ev.clone());
        assert_eq!(stored["apiVersion"], "events.k8s.io/v1");
        assert_eq!(stored["regarding"]["name"], "web");
        assert_eq!(stored["note"], ev["message"]);
        assert_eq!(stored["deprecatedCount"], 2);
        assert!(stored.get("message").is_none());
        assert_eq!(from_storage(core, stored), ev);
        assert_eq!(storage_of(core).group, "events.k8s.io");
        let svc = resources::find("", "v1", "services").unwrap();
        assert_eq!(to_storage(svc, ev.clone()), ev);
        assert!(std::ptr::eq(storage_of(svc), svc));
        // A wrong apiVersion is not translated (so the kind check rejects it).
        assert_eq!(
            to_storage(core, json!({"apiVersion": "x/v9"}))["apiVersion"],
            "x/v9"
        );
    }
}
