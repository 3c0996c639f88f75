//! Label selectors (`=`, `==`, `!=`, `in`, `notin`, exists, `!`exists) and field selectors
//! (`path=value`, `path==value`, `path!=value` on dotted paths such as `metadata.name`).

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    NotExists,
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelSelector(Vec<(String, Op)>);

/// Splits at commas outside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn check_key(key: &str, whole: &str) -> Result<String, String> {
    let ok = !key.is_empty()
        && key.len() <= 317
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if ok {
        Ok(key.to_string())
    } else {
        Err(format!("invalid label key {key:?} in selector {whole:?}"))
    }
}

fn check_value(v: &str, whole: &str) -> Result<String, String> {
    let ok = v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(v.to_string())
    } else {
        Err(format!("invalid label value {v:?} in selector {whole:?}"))
    }
}

impl LabelSelector {
    /// Parses the `labelSelector` query parameter.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(LabelSelector(reqs));
        }
        for part in split_top(s) {
            let p = part.trim();
            if p.is_empty() {
                return Err(format!("empty requirement in selector {s:?}"));
            }
            if let Some(key) = p.strip_prefix('!') {
                reqs.push((check_key(key.trim(), s)?, Op::NotExists));
            } else if let Some(open) = p.find('(') {
                let close = p
                    .rfind(')')
                    .filter(|c| *c == p.len() - 1 && *c > open)
                    .ok_or_else(|| format!("unbalanced parentheses in selector {s:?}"))?;
                let head = p[..open].trim();
                let values = p[open + 1..close]
                    .split(',')
                    .map(|v| check_value(v.trim(), s))
                    .collect::<Result<Vec<_>, _>>()?;
                let (key, op) = if let Some(k) = head.strip_suffix("notin") {
                    (k, Op::NotIn(values))
                } else if let Some(k) = head.strip_suffix("in") {
                    (k, Op::In(values))
                } else {
                    return Err(format!(
                        "expected 'in' or 'notin' in {p:?} (selector {s:?})"
                    ));
                };
                if !key.ends_with(char::is_whitespace) {
                    return Err(format!("expected a space before the operator in {p:?}"));
                }
                reqs.push((check_key(key.trim(), s)?, op));
            } else if let Some((k, v)) = p.split_once("!=") {
                reqs.push((
                    check_key(k.trim(), s)?,
                    Op::NotEq(check_value(v.trim(), s)?),
                ));
            } else if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
                reqs.push((check_key(k.trim(), s)?, Op::Eq(check_value(v.trim(), s)?)));
            } else {
                reqs.push((check_key(p, s)?, Op::Exists));
            }
        }
        Ok(LabelSelector(reqs))
    }

    /// Whether an object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels");
        self.0.iter().all(|(key, op)| {
            let v = labels.and_then(|l| l.get(key)).and_then(Value::as_str);
            match op {
                Op::Eq(want) => v == Some(want.as_str()),
                Op::NotEq(want) => v != Some(want.as_str()),
                Op::In(set) => v.is_some_and(|v| set.iter().any(|s| s == v)),
                Op::NotIn(set) => !v.is_some_and(|v| set.iter().any(|s| s == v)),
                Op::Exists => v.is_some(),
                Op::NotExists => v.is_none(),
            }
        })
    }
}

/// A parsed field selector: requirements on dotted paths, all of which must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// Parses the `fieldSelector` query parameter.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(FieldSelector(reqs));
        }
        for part in s.split(',') {
            let p = part.trim();
            let (path, eq, value) = if let Some((k, v)) = p.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
                (k, true, v)
            } else {
                return Err(format!("invalid field selector requirement {p:?} in {s:?}"));
            };
            let path = path.trim();
            if path.is_empty()
                || !path
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_')
            {
                return Err(format!(
                    "invalid field path {path:?} in field selector {s:?}"
                ));
            }
            reqs.push((path.to_string(), eq, value.trim().to_string()));
        }
        Ok(FieldSelector(reqs))
    }

    /// Whether the object satisfies every requirement (a missing field compares as `""`).
    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(path, eq, want)| {
            let mut cur = Some(obj);
            for seg in path.split('.') {
                cur = cur.and_then(|c| c.get(seg));
            }
            let got = match cur {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(v) => v.to_string(),
            };
            (got == *want) == *eq
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "web", "namespace": "default", "labels": labels}})
    }

    #[test]
    fn label_operators() {
        let o = obj(json!({"app": "web", "tier": "front"}));
        let yes = [
            "",
            "app=web",
            "app==web",
            "app!=db",
            "missing!=x",
            "app in (web, db)",
            "app notin (db)",
            "missing notin (db)",
            "app",
            "!missing",
            "app=web,tier in (front,back)",
        ];
        for s in yes {
            assert!(LabelSelector::parse(s).unwrap().matches(&o), "{s}");
        }
        let no = [
            "app=db",
            "app!=web",
            "app in (db)",
            "missing in (web)",
            "app notin (web,db)",
            "missing",
            "!app",
            "app=web,tier=back",
        ];
        for s in no {
            assert!(!LabelSelector::parse(s).unwrap().matches(&o), "{s}");
        }
        assert!(LabelSelector::parse("!app")
            .unwrap()
            .matches(&json!({"metadata": {}})));
    }

    #[test]
    fn bad_label_selectors_are_errors() {
        for s in [
            "app=(x",
            "app in x)",
            "app inn (x)",
            "a b=c",
            "app=web,",
            "app=v v",
        ] {
            assert!(LabelSelector::parse(s).is_err(), "{s}");
        }
    }

    #[test]
    fn field_selectors() {
        let o = obj(json!({}));
        for s in [
            "metadata.name=web",
            "metadata.name==web,metadata.namespace=default",
            "metadata.name!=db",
            "spec.nodeName=",
        ] {
            assert!(FieldSelector::parse(s).unwrap().matches(&o), "{s}");
        }
        for s in ["metadata.name=db", "metadata.namespace!=default"] {
            assert!(!FieldSelector::parse(s).unwrap().matches(&o), "{s}");
        }
        assert!(FieldSelector::parse("metadata.name").is_err());
        assert!(FieldSelector::parse("meta data=x").is_err());
    }
}
