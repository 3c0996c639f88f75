//! RBAC for the clients that present a bearer token, and a record of every access they made.
//!
//! So that the ClusterRole ferry ships is *proven*, not guessed: the server is given RBAC
//! objects (Role, ClusterRole, RoleBinding, ClusterRoleBinding: for instance the install
//! manifest itself, whose other kinds are ignored) and tokens naming users
//! (`TOKEN=system:serviceaccount:ferry-system:ferry`). A request with a known token is
//! authorized as kube-apiserver's RBAC authorizer does it for resource requests (verb from
//! the method, `resource/subresource`, API group, namespace, resourceNames; RoleBindings grant
//! within their namespace, ClusterRoleBindings everywhere; ServiceAccount subjects), and
//! refused with 403 Forbidden otherwise; an unknown token gets 401. Requests without a token
//! are the administrator's (kubectl, the lab itself) and are not checked. Every decision is
//! kept, and served at `/debug/ferry/authz`, so a test can fail both when a client needs
//! something the role does not grant and when the role grants something no client used.
//!
//! Not done: non-resource URLs (discovery is open to all), aggregation rules, escalation
//! checks, groups other than `system:serviceaccounts[:ns]` and `system:authenticated`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use serde::Serialize;
use serde_json::Value;

/// One rule of a (Cluster)Role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub api_groups: Vec<String>,
    pub resources: Vec<String>,
    pub verbs: Vec<String>,
    pub resource_names: Vec<String>,
}

/// What a request does, in RBAC's terms.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Access {
    pub user: String,
    pub verb: String,
    #[serde(rename = "apiGroup")]
    pub group: String,
    /// `resource` or `resource/subresource`.
    pub resource: String,
    pub namespace: String,
    pub name: String,
    pub allowed: bool,
}

#[derive(Debug, Clone)]
struct Binding {
    /// None: a ClusterRoleBinding (everywhere).
    namespace: Option<String>,
    /// Role in `namespace`, or a ClusterRole.
    role: (String, Option<String>),
    subjects: Vec<String>,
}

/// The authorizer: roles, bindings, tokens, and the accesses seen.
#[derive(Debug, Default)]
pub struct Authorizer {
    /// (namespace or None for ClusterRoles, name) -> rules.
    roles: BTreeMap<(Option<String>, String), Vec<Rule>>,
    bindings: Vec<Binding>,
    tokens: BTreeMap<String, String>,
    seen: Mutex<BTreeSet<Access>>,
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn str_at<'a>(v: &'a Value, path: &str) -> Option<&'a str> {
    v.pointer(path).and_then(Value::as_str)
}

impl Authorizer {
    /// RBAC objects from YAML or JSON documents (other kinds are skipped), and tokens as
    /// `TOKEN=USER`.
    pub fn from_documents(text: &str, tokens: &[String]) -> Result<Authorizer, String> {
        let mut a = Authorizer::default();
        let docs: Vec<Value> = serde_saphyr::from_multiple(text)
            .map_err(|e| format!("reading the RBAC objects: {e}"))?;
        for doc in docs.iter().filter(|d| !d.is_null()) {
            let kind = str_at(doc, "/kind").unwrap_or("");
            let name = str_at(doc, "/metadata/name").unwrap_or("").to_string();
            let ns = str_at(doc, "/metadata/namespace").map(str::to_string);
            match kind {
                "Role" | "ClusterRole" => {
                    let rules = doc
                        .get("rules")
                        .and_then(Value::as_array)
                        .map(|rs| {
                            rs.iter()
                                .map(|r| Rule {
                                    api_groups: strings(r.get("apiGroups")),
                                    resources: strings(r.get("resources")),
                                    verbs: strings(r.get("verbs")),
                                    resource_names: strings(r.get("resourceNames")),
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    let scope = if kind == "Role" {
                        Some(ns.clone().unwrap_or_else(|| "default".into()))
                    } else {
                        None
                    };
                    a.roles.insert((scope, name), rules);
                }
                "RoleBinding" | "ClusterRoleBinding" => {
                    let role_kind = str_at(doc, "/roleRef/kind").unwrap_or("");
                    let role_name = str_at(doc, "/roleRef/name").unwrap_or("").to_string();
                    let binding_ns = if kind == "RoleBinding" {
                        Some(ns.clone().unwrap_or_else(|| "default".into()))
                    } else {
                        None
                    };
                    let role_scope = if role_kind == "Role" {
                        binding_ns.clone()
                    } else {
                        None
                    };
                    let subjects = doc
                        .get("subjects")
                        .and_then(Value::as_array)
                        .map(|ss| {
                            ss.iter()
                                .filter_map(|s| {
                                    let n = str_at(s, "/name")?;
                                    Some(match str_at(s, "/kind") {
                                        Some("ServiceAccount") => format!(
                                            "system:serviceaccount:{}:{n}",
                                            str_at(s, "/namespace")
                                                .or(binding_ns.as_deref())
                                                .unwrap_or("default")
                                        ),
                                        Some("Group") => format!("group:{n}"),
                                        _ => n.to_string(),
                                    })
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    a.bindings.push(Binding {
                        namespace: binding_ns,
                        role: (role_name, role_scope),
                        subjects,
                    });
                }
                _ => {}
            }
        }
        for t in tokens {
            let (token, user) = t
                .split_once('=')
                .filter(|(t, u)| !t.is_empty() && !u.is_empty())
                .ok_or_else(|| format!("token {t:?}: expected TOKEN=USER"))?;
            a.tokens.insert(token.to_string(), user.to_string());
        }
        Ok(a)
    }

    /// The user a bearer token names (None: not a token this server knows).
    pub fn user_of(&self, token: &str) -> Option<&str> {
        self.tokens.get(token).map(String::as_str)
    }

    /// The groups `user` is in.
    fn groups(user: &str) -> Vec<String> {
        let mut g = vec!["group:system:authenticated".to_string()];
        if let Some(rest) = user.strip_prefix("system:serviceaccount:") {
            g.push("group:system:serviceaccounts".into());
            if let Some((ns, _)) = rest.split_once(':') {
                g.push(format!("group:system:serviceaccounts:{ns}"));
            }
        }
        g
    }

    /// Decides and records one access (`allowed` is filled in).
    pub fn check(&self, mut access: Access) -> bool {
        let mut who = Self::groups(&access.user);
        who.push(access.user.clone());
        let allowed = self.bindings.iter().any(|b| {
            let in_scope = b
                .namespace
                .as_ref()
                .is_none_or(|ns| *ns == access.namespace);
            in_scope
                && b.subjects.iter().any(|s| who.contains(s))
                && self
                    .roles
                    .get(&(b.role.1.clone(), b.role.0.clone()))
                    .is_some_and(|rules| rules.iter().any(|r| matches(r, &access)))
        });
        access.allowed = allowed;
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(access);
        allowed
    }

    /// Every access decided so far.
    pub fn seen(&self) -> Vec<Access> {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

fn has(list: &[String], want: &str) -> bool {
    list.iter().any(|x| x == "*" || x == want)
}

/// Whether `r` grants `a` (kube-apiserver's `RuleAllows` for resource requests).
pub fn matches(r: &Rule, a: &Access) -> bool {
    let resource_ok = r.resources.iter().any(|x| {
        x == "*"
            || *x == a.resource
            || (x.starts_with("*/") && a.resource.split_once('/').map(|(_, s)| s) == x.get(2..))
    });
    has(&r.api_groups, &a.group)
        && has(&r.verbs, &a.verb)
        && resource_ok
        && (r.resource_names.is_empty() || r.resource_names.contains(&a.name))
}

/// The RBAC verb of a request: method, whether it names an object, `watch=true`.
pub fn verb(method: &str, named: bool, watch: bool) -> &'static str {
    match (method, named) {
        ("GET", _) if watch => "watch",
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RBAC: &str = r#"
apiVersion: v1
kind: ServiceAccount
metadata: {name: ferry, namespace: ferry-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: ferry}
rules:
- apiGroups: [""]
  resources: [services, nodes]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [services/status]
  verbs: [update]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: ferry}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: ferry}
subjects: [{kind: ServiceAccount, name: ferry, namespace: ferry-system}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: lease, namespace: ferry-system}
rules:
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  resourceNames: [ferry-lb-controller]
  verbs: [get, update]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: lease, namespace: ferry-system}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: lease}
subjects: [{kind: ServiceAccount, name: ferry}]
"#;

    fn access(verb: &str, group: &str, resource: &str, ns: &str, name: &str) -> Access {
        Access {
            user: "system:serviceaccount:ferry-system:ferry".into(),
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            namespace: ns.into(),
            name: name.into(),
            allowed: false,
        }
    }

    #[test]
    fn cluster_and_namespaced_grants() {
        let a = Authorizer::from_documents(RBAC, &["t=x".into()]).unwrap();
        assert_eq!(a.user_of("t"), Some("x"));
        assert!(a.check(access("watch", "", "services", "", "")));
        assert!(a.check(access("update", "", "services/status", "shop", "web")));
        assert!(
            !a.check(access("update", "", "services", "shop", "web")),
            "not the main resource"
        );
        assert!(!a.check(access("delete", "", "nodes", "", "n1")));
        assert!(a.check(access(
            "update",
            "coordination.k8s.io",
            "leases",
            "ferry-system",
            "ferry-lb-controller"
        )));
        assert!(
            !a.check(access(
                "update",
                "coordination.k8s.io",
                "leases",
                "default",
                "ferry-lb-controller"
            )),
            "a RoleBinding grants in its namespace only"
        );
        assert!(
            !a.check(access(
                "update",
                "coordination.k8s.io",
                "leases",
                "ferry-system",
                "other"
            )),
            "resourceNames"
        );
        let mut other = access("list", "", "services", "", "");
        other.user = "system:serviceaccount:kube-system:other".into();
        assert!(!a.check(other), "another service account");
        assert_eq!(a.seen().iter().filter(|x| x.allowed).count(), 3);
    }

    #[test]
    fn verbs_as_kube_apiserver_names_them() {
        assert_eq!(verb("GET", false, true), "watch");
        assert_eq!(verb("GET", true, false), "get");
        assert_eq!(verb("GET", false, false), "list");
        assert_eq!(verb("DELETE", false, false), "deletecollection");
        assert_eq!(verb("PATCH", true, false), "patch");
    }

    #[test]
    fn bad_tokens_are_refused() {
        assert!(Authorizer::from_documents("", &["nope".into()]).is_err());
    }
}
