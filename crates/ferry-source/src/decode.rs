//! A JSON value (one object of a manifest) into a typed Kubernetes object, with the field path
//! of the first value that does not fit (`serde_path_to_error`) and a message in ferry's words
//! ("must be an integer, got string \"80\"").
//!
//! As in Kubernetes, a field set to `null` is the same as a missing field (inside a map of
//! strings, such as labels, it is the empty string).

use serde::de::DeserializeOwned;
use serde_json::Value;

/// Fields whose value is a map of strings: their keys are shown as `labels[app]`, and a value
/// of another type gets "(quote it)" added.
const STRING_MAPS: &[&str] = &[
    "labels",
    "annotations",
    "data",
    "matchLabels",
    "nodeSelector",
];

/// A problem found while decoding: the field path and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// Decode `value` as `T`. `extra_maps` are further field paths holding maps of strings (e.g.
/// `spec.selector` of a Service).
pub fn decode<T: DeserializeOwned>(value: &Value, extra_maps: &[&str]) -> Result<T, FieldError> {
    let is_map = |path: &str| {
        let last = path.rsplit('.').next().unwrap_or(path);
        STRING_MAPS.contains(&last) || extra_maps.contains(&path)
    };
    let value = without_nulls(value, "", &is_map);
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let (parent, key, in_map) = render_path(e.path(), &is_map);
        let field = match &key {
            Some(k) if in_map => format!("{parent}[{k}]"),
            Some(k) if parent.is_empty() => k.clone(),
            Some(k) => format!("{parent}.{k}"),
            None => parent.clone(),
        };
        translate(&e.inner().to_string(), field, in_map)
    })
}

/// `value` with null object entries removed (null in a string map becomes "").
fn without_nulls(value: &Value, path: &str, is_map: &dyn Fn(&str) -> bool) -> Value {
    match value {
        Value::Object(m) => {
            let map = is_map(path);
            let mut out = serde_json::Map::new();
            for (k, v) in m {
                let child = if path.is_empty() {
                    k.clone()
                } else if map {
                    format!("{path}[{k}]")
                } else {
                    format!("{path}.{k}")
                };
                match v {
                    Value::Null if map => {
                        out.insert(k.clone(), Value::String(String::new()));
                    }
                    Value::Null => {}
                    v => {
                        out.insert(k.clone(), without_nulls(v, &child, is_map));
                    }
                }
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| without_nulls(v, &format!("{path}[{i}]"), is_map))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// (path of the parent, last key if the last segment is a key, whether the parent is a map of
/// strings).
fn render_path(
    path: &serde_path_to_error::Path,
    is_map: &dyn Fn(&str) -> bool,
) -> (String, Option<String>, bool) {
    use serde_path_to_error::Segment;
    let segments: Vec<&Segment> = path.iter().collect();
    let mut out = String::new();
    let mut last_key = None;
    let mut in_map = false;
    for (i, seg) in segments.iter().enumerate() {
        let is_last = i + 1 == segments.len();
        match seg {
            Segment::Seq { index } => {
                out.push_str(&format!("[{index}]"));
            }
            Segment::Map { key } | Segment::Enum { variant: key } => {
                let parent_is_map = !out.is_empty() && is_map(&out);
                if is_last {
                    last_key = Some(key.clone());
                    in_map = parent_is_map;
                } else if parent_is_map {
                    out.push_str(&format!("[{key}]"));
                } else if out.is_empty() {
                    out.push_str(key);
                } else {
                    out.push('.');
                    out.push_str(key);
                }
            }
            Segment::Unknown => {}
        }
    }
    (out, last_key, in_map)
}

/// serde's "invalid type: string \"x\", expected i32" in ferry's words.
fn translate(message: &str, field: String, in_map: bool) -> FieldError {
    let quote_it = if in_map { " (quote it)" } else { "" };
    if let Some(rest) = message.strip_prefix("missing field `") {
        let name = rest.split('`').next().unwrap_or("");
        let field = if field.is_empty() {
            name.to_string()
        } else {
            format!("{field}.{name}")
        };
        return FieldError {
            field,
            message: "required".to_string(),
        };
    }
    let (kind, rest) = if let Some(r) = message.strip_prefix("invalid type: ") {
        ("type", r)
    } else if let Some(r) = message.strip_prefix("invalid value: ") {
        ("value", r)
    } else if field.ends_with("Timestamp") || field.ends_with("Time") {
        return FieldError {
            message: format!("must be an RFC 3339 time (2024-01-31T12:00:00Z): {message}"),
            field,
        };
    } else {
        return FieldError {
            field,
            message: message.to_string(),
        };
    };
    let (got, expected) = match rest.rsplit_once(", expected ") {
        Some((g, e)) => (g, e),
        None => (rest, ""),
    };
    let got_text = describe_unexpected(got);
    let integer = matches!(
        expected,
        "i8" | "i16" | "i32" | "i64" | "u8" | "u16" | "u32" | "u64" | "a 32-bit integer"
    ) || expected == "IntOrString";
    if kind == "value" && integer {
        // An integer that does not fit the type.
        let number = got_text.strip_prefix("number ").unwrap_or(&got_text);
        let message = match port_range(&field) {
            Some((lo, hi)) => format!("must be between {lo} and {hi}, got {number}"),
            None => format!("must be a 32-bit integer, got {number}"),
        };
        return FieldError { field, message };
    }
    if got == "null" || got == "unit value" {
        return FieldError {
            field,
            message: "required".to_string(),
        };
    }
    let want = if integer {
        "an integer"
    } else if expected == "a string" || expected == "string" {
        "a string"
    } else if expected == "a boolean" || expected == "bool" {
        return FieldError {
            field,
            message: format!("must be true or false, got {got_text}"),
        };
    } else if expected.starts_with("a sequence") || expected.starts_with("a vec") {
        "a list"
    } else if expected == "Time" || expected == "a timestamp" || expected.contains("RFC 3339") {
        "an RFC 3339 time"
    } else if kind == "value" {
        return FieldError {
            field,
            message: format!("invalid value {got_text}: expected {expected}"),
        };
    } else {
        "a mapping"
    };
    FieldError {
        field,
        message: format!("must be {want}, got {got_text}{quote_it}"),
    }
}

/// The range of a port field, by its last path segment.
pub(crate) fn port_range(field: &str) -> Option<(i64, i64)> {
    let last = field.rsplit('.').next().unwrap_or(field);
    match last {
        "port" | "containerPort" | "hostPort" => Some((1, 65535)),
        "targetPort" | "nodePort" => Some((0, 65535)),
        _ => None,
    }
}

/// serde's `Unexpected` text in ferry's words: `integer `5`` -> `number 5`.
fn describe_unexpected(got: &str) -> String {
    let inner = |prefix: &str| {
        got.strip_prefix(prefix)
            .map(|s| s.trim_matches('`').to_string())
    };
    if let Some(n) = inner("integer ").or_else(|| inner("floating point ")) {
        return format!("number {n}");
    }
    if let Some(b) = inner("boolean ") {
        return format!("boolean {b}");
    }
    match got {
        "map" => "a mapping".to_string(),
        "sequence" => "a list".to_string(),
        "unit value" => "null".to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Debug, serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    #[allow(dead_code)]
    struct Thing {
        name: String,
        port: Option<i32>,
        labels: Option<BTreeMap<String, String>>,
        items: Option<Vec<Item>>,
        on: Option<bool>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Item {
        port: u16,
    }

    fn err(v: Value) -> FieldError {
        decode::<Thing>(&v, &[]).unwrap_err()
    }

    #[test]
    fn messages_and_paths() {
        let e = err(serde_json::json!({"name": "a", "port": "80"}));
        assert_eq!(e.field, "port");
        assert_eq!(e.message, "must be an integer, got string \"80\"");
        let e = err(serde_json::json!({"name": "a", "labels": {"app": 2}}));
        assert_eq!(e.field, "labels[app]");
        assert_eq!(e.message, "must be a string, got number 2 (quote it)");
        let e = err(serde_json::json!({"name": "a", "items": [{"port": 1}, {}]}));
        assert_eq!(e.field, "items[1].port");
        assert_eq!(e.message, "required");
        let e = err(serde_json::json!({"name": "a", "items": [{"port": 70000}]}));
        assert_eq!(e.field, "items[0].port");
        assert_eq!(e.message, "must be between 1 and 65535, got 70000");
        let e = err(serde_json::json!({"name": "a", "items": 5}));
        assert_eq!(e.message, "must be a list, got number 5");
        let e = err(serde_json::json!({"name": "a", "on": "yes"}));
        assert_eq!(e.message, "must be true or false, got string \"yes\"");
        let e = err(serde_json::json!({"name": "a", "items": [5]}));
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("items[0]", "must be a mapping, got number 5")
        );
        let e = err(serde_json::json!({"port": 1}));
        assert_eq!((e.field.as_str(), e.message.as_str()), ("name", "required"));
    }

    #[test]
    fn null_is_missing() {
        let v = serde_json::json!({"name": "a", "port": null, "labels": {"x": null}});
        let t: Thing = decode(&v, &[]).unwrap();
        assert_eq!(t.port, None);
        assert_eq!(t.labels.unwrap()["x"], "");
    }
}
