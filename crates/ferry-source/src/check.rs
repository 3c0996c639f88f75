//! The checks the Kubernetes API server makes on the fields ferry uses (names, ports,
//! protocols, IP addresses, label selectors), shared by every kind, collected per object as
//! (field path, message).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ferry_model::{LabelSelector, LabelSelectorRequirement, Meta, Protocol, SelectorOperator};
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;

/// Collects problems of one object as (field path, message).
#[derive(Debug, Default)]
pub struct Ck {
    pub errors: Vec<(String, String)>,
    pub warnings: Vec<(String, String)>,
}

impl Ck {
    pub fn err(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push((field.into(), message.into()));
    }

    pub fn warn(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.warnings.push((field.into(), message.into()));
    }

    /// A port number (1-65535); 0 is what a missing port decodes to, so it is "required".
    pub fn port(&mut self, n: i32, path: &str) -> Option<u16> {
        if n == 0 {
            self.err(
                path,
                "must be between 1 and 65535, got 0 (required: missing or 0)",
            );
            return None;
        }
        self.int_in(i64::from(n), path, 1, 65535)
            .and_then(|n| u16::try_from(n).ok())
    }

    /// An integer within `min..=max`.
    pub fn int_in(&mut self, n: i64, path: &str, min: i64, max: i64) -> Option<i64> {
        if (min..=max).contains(&n) {
            Some(n)
        } else {
            self.err(path, format!("must be between {min} and {max}, got {n}"));
            None
        }
    }

    /// A protocol, TCP when missing or empty.
    pub fn protocol(&mut self, p: Option<&str>, path: &str) -> Protocol {
        match p {
            None | Some("") => Protocol::Tcp,
            Some(s) => Protocol::parse_k8s(s).unwrap_or_else(|| {
                self.err(path, format!("must be TCP, UDP or SCTP, got {}", quote(s)));
                Protocol::Tcp
            }),
        }
    }

    /// An IP address in text.
    pub fn ip(&mut self, s: &str, path: &str) -> Option<IpAddr> {
        match s.parse() {
            Ok(ip) => Some(ip),
            Err(_) => {
                self.err(path, format!("must be an IP address, got {}", quote(s)));
                None
            }
        }
    }

    /// An IP address a host can be reached at, as the API server checks `externalIPs`: not
    /// unspecified, loopback, link-local, multicast or broadcast.
    pub fn unicast_ip(&mut self, s: &str, path: &str) -> Option<IpAddr> {
        let ip = self.ip(s, path)?;
        match special_ip(ip) {
            Some(why) => {
                self.err(path, format!("{ip} may not be {why}"));
                None
            }
            None => Some(ip),
        }
    }

    /// An optional IP address ("" counts as missing).
    pub fn opt_ip(&mut self, s: Option<&str>, path: &str) -> Option<IpAddr> {
        let s = non_empty(s)?;
        self.ip(s, path)
    }

    /// A required string: `None` (with an error) when missing or empty.
    pub fn required<'a>(&mut self, s: &'a str, path: &str) -> Option<&'a str> {
        if s.is_empty() {
            self.err(path, "required (must not be empty)");
            None
        } else {
            Some(s)
        }
    }
}

/// `Some(s)` unless missing or empty.
/// Why `ip` cannot be a service address, if it cannot.
pub fn special_ip(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(a) if a.is_unspecified() => Some("unspecified (0.0.0.0)"),
        IpAddr::V4(a) if a.is_loopback() => Some("in the loopback range (127.0.0.0/8)"),
        IpAddr::V4(a) if a.is_link_local() => Some("in the link-local range (169.254.0.0/16)"),
        IpAddr::V4(a) if a.is_multicast() => Some("a multicast address (224.0.0.0/4)"),
        IpAddr::V4(a) if a.is_broadcast() => Some("the broadcast address"),
        IpAddr::V6(a) if a.is_unspecified() => Some("unspecified (::)"),
        IpAddr::V6(a) if a.is_loopback() => Some("the loopback address (::1)"),
        IpAddr::V6(a) if a.is_multicast() => Some("a multicast address (ff00::/8)"),
        IpAddr::V6(a) if (a.segments()[0] & 0xffc0) == 0xfe80 => {
            Some("in the link-local range (fe80::/10)")
        }
        _ => None,
    }
}

pub fn non_empty(s: Option<&str>) -> Option<&str> {
    s.filter(|s| !s.is_empty())
}

/// `base.key`, or `key` at the root.
pub fn join(base: &str, key: &str) -> String {
    match (base.is_empty(), key.is_empty()) {
        (true, _) => key.to_string(),
        (false, true) => base.to_string(),
        (false, false) => format!("{base}.{key}"),
    }
}

/// `"text"`, shortened if long.
pub fn quote(s: &str) -> String {
    const MAX: usize = 60;
    if s.chars().count() > MAX {
        format!("{:?}...", s.chars().take(MAX).collect::<String>())
    } else {
        format!("{s:?}")
    }
}

// ---------------------------------------------------------------------------------------------
// Names

fn is_label_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'
}

/// RFC 1123 label: lowercase letters, digits and '-', alphanumeric at both ends, at most 63.
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(is_label_char)
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1035 label: an RFC 1123 label starting with a letter.
pub fn is_dns1035_label(s: &str) -> bool {
    is_dns1123_label(s) && s.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
}

/// RFC 1123 subdomain: dot-separated RFC 1123 labels, at most 253 characters.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes().all(is_label_char)
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// IANA service name (named ports): at most 15 lowercase letters, digits and single '-'s, with
/// at least one letter, not starting or ending with '-'.
pub fn is_iana_svc_name(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.bytes().all(is_label_char)
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// ConfigMap keys: letters, digits, '-', '_' and '.'.
pub fn is_config_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        && s != "."
        && !s.starts_with("..")
}

pub const DNS1035_LABEL: &str = "must be a DNS-1035 label: at most 63 lowercase letters, digits \
     or '-', starting with a letter and ending with a letter or digit";
pub const DNS1123_LABEL: &str = "must be a DNS-1123 label: at most 63 lowercase letters, digits \
     or '-', starting and ending with a letter or digit";
pub const DNS1123_SUBDOMAIN: &str = "must be a DNS-1123 subdomain: at most 253 characters, \
     dot-separated parts of lowercase letters, digits or '-', each starting and ending with a \
     letter or digit";
pub const IANA_SVC_NAME: &str = "must be a port number or an IANA service name: at most 15 \
     lowercase letters, digits or single '-', with at least one letter";

/// Whether a kind lives in a namespace.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Scope {
    Namespaced,
    Cluster,
}

/// Which rule an object's name follows.
#[derive(Clone, Copy, Debug)]
pub enum NameRule {
    Dns1035Label,
    Dns1123Label,
    Dns1123Subdomain,
}

/// metadata, checked; `scope` decides the namespace ("default" when left out; "" for cluster
/// objects).
pub fn meta(ck: &mut Ck, md: &meta::ObjectMeta, scope: Scope, rule: NameRule) -> Meta {
    let mut out = Meta {
        namespace: match scope {
            Scope::Namespaced => "default".to_string(),
            Scope::Cluster => String::new(),
        },
        ..Meta::default()
    };
    match md.name.as_deref() {
        None => ck.err("metadata.name", "required"),
        Some(name) => {
            if let Some(name) = ck.required(name, "metadata.name") {
                let (ok, rule_text) = match rule {
                    NameRule::Dns1035Label => (is_dns1035_label(name), DNS1035_LABEL),
                    NameRule::Dns1123Label => (is_dns1123_label(name), DNS1123_LABEL),
                    NameRule::Dns1123Subdomain => (is_dns1123_subdomain(name), DNS1123_SUBDOMAIN),
                };
                if !ok {
                    ck.err("metadata.name", format!("{rule_text}; got {}", quote(name)));
                }
                out.name = name.to_string();
            }
        }
    }
    if scope == Scope::Namespaced {
        if let Some(ns) = non_empty(md.namespace.as_deref()) {
            if !is_dns1123_label(ns) {
                ck.err(
                    "metadata.namespace",
                    format!("{DNS1123_LABEL}; got {}", quote(ns)),
                );
            }
            out.namespace = ns.to_string();
        }
    }
    out.labels = md.labels.clone().unwrap_or_default();
    // Boxed only when one is set.
    out.extra = ferry_model::MetaExtra {
        annotations: md.annotations.clone().unwrap_or_default(),
        creation_timestamp: md.creation_timestamp.as_ref().map(|t| t.0.to_string()),
        uid: non_empty(md.uid.as_deref()).map(str::to_string),
        resource_version: non_empty(md.resource_version.as_deref()).map(str::to_string),
    }
    .into();
    out
}

/// A metav1.LabelSelector at `path`, checked as Kubernetes does.
pub fn label_selector(ck: &mut Ck, sel: &meta::LabelSelector, path: &str) -> LabelSelector {
    let mut out = LabelSelector {
        match_labels: sel.match_labels.clone().unwrap_or_default(),
        ..LabelSelector::default()
    };
    for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
        let base = format!("{}[{i}]", join(path, "matchExpressions"));
        let key = ck.required(&e.key, &join(&base, "key"));
        let operator = ck
            .required(&e.operator, &join(&base, "operator"))
            .and_then(|s| {
                let op = SelectorOperator::parse_k8s(s);
                if op.is_none() {
                    ck.err(
                        join(&base, "operator"),
                        format!(
                            "must be In, NotIn, Exists or DoesNotExist, got {}",
                            quote(s)
                        ),
                    );
                }
                op
            });
        let values = e.values.clone().unwrap_or_default();
        let (Some(key), Some(operator)) = (key, operator) else {
            continue;
        };
        match operator {
            SelectorOperator::In | SelectorOperator::NotIn if values.is_empty() => ck.err(
                join(&base, "values"),
                format!(
                    "required (at least one value) for operator {}",
                    operator.as_k8s()
                ),
            ),
            SelectorOperator::Exists | SelectorOperator::DoesNotExist if !values.is_empty() => ck
                .err(
                    join(&base, "values"),
                    format!("must be empty for operator {}", operator.as_k8s()),
                ),
            _ => {}
        }
        out.match_expressions.push(LabelSelectorRequirement {
            key: key.to_string(),
            operator,
            values,
        });
    }
    out
}

/// A list of label selectors at `path`.
pub fn label_selectors(
    ck: &mut Ck,
    sels: Option<&Vec<meta::LabelSelector>>,
    path: &str,
) -> Vec<LabelSelector> {
    sels.into_iter()
        .flatten()
        .enumerate()
        .map(|(i, s)| label_selector(ck, s, &format!("{path}[{i}]")))
        .collect()
}

/// Keys of a map, for checks over them.
pub fn keys(m: Option<&BTreeMap<String, String>>) -> impl Iterator<Item = &String> {
    m.into_iter().flat_map(|m| m.keys())
}
