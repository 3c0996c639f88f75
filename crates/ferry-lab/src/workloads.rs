//! Deployment and Pod: the kinds the lab runs itself (pods in network namespaces). ferry's
//! agent only needs the EndpointSlices the lab writes for them, so these types live here, not
//! in ferry-model. They are read like every other kind, through ferry-source: the same file
//! splitting, decoding into k8s-openapi's types with field paths, and the same checks.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ferry_model::{Meta, Protocol};
use ferry_source::check::{
    is_iana_svc_name, join, meta, non_empty, quote, Ck, NameRule, Scope, IANA_SVC_NAME,
};
use ferry_source::manifest::{ManifestError, RawObject};
use k8s_openapi::api::apps::v1 as apps;
use k8s_openapi::api::core::v1 as core;

/// A container port of a pod template (for named target ports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerPort {
    pub name: String,
    pub container_port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodTemplate {
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<ContainerPort>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    pub meta: Meta,
    pub replicas: u32,
    pub selector: BTreeMap<String, String>,
    pub template: PodTemplate,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub meta: Meta,
    pub node_name: Option<String>,
    pub ports: Vec<ContainerPort>,
    /// status.podIP if present.
    pub pod_ip: Option<IpAddr>,
}

/// A lab kind, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workload {
    Deployment(Deployment),
    Pod(Pod),
}

/// The apiVersion of a kind the lab runs, `None` for other kinds.
pub fn workload_api_version(kind: &str) -> Option<&'static str> {
    match kind {
        "Deployment" => Some("apps/v1"),
        "Pod" => Some("v1"),
        _ => None,
    }
}

/// Read a Deployment or Pod (`None` for other kinds): its errors name the file, document,
/// object and field, as ferry-source's do.
pub fn parse(raw: &RawObject) -> Option<Result<Workload, Vec<ManifestError>>> {
    let want = workload_api_version(&raw.kind)?;
    if raw.api_version != want {
        return Some(Err(vec![raw.problem(
            "apiVersion",
            format!(
                "kind {} needs apiVersion {want}, got {}",
                raw.kind,
                quote(&raw.api_version)
            ),
        )]));
    }
    let mut ck = Ck::default();
    let workload = if raw.kind == "Deployment" {
        raw.decode::<apps::Deployment>(&mut ck, &[])
            .map(|d| Workload::Deployment(deployment(&mut ck, &d)))
    } else {
        raw.decode::<core::Pod>(&mut ck, &[])
            .map(|p| Workload::Pod(pod(&mut ck, &p)))
    };
    let object = raw.describe_in(Scope::Namespaced);
    Some(match workload {
        Some(w) if ck.errors.is_empty() => Ok(w),
        _ => Err(ck
            .errors
            .into_iter()
            .map(|(field, message)| {
                let mut e = raw.problem(&field, message);
                e.at.object.clone_from(&object);
                e
            })
            .collect()),
    })
}

/// The container ports of a pod spec at `base`.
pub fn container_ports(ck: &mut Ck, pod_spec: &core::PodSpec, base: &str) -> Vec<ContainerPort> {
    if pod_spec.containers.is_empty() {
        ck.err(join(base, "containers"), "required: at least one container");
    }
    let mut ports = Vec::new();
    let mut names: BTreeMap<&str, String> = BTreeMap::new();
    for (i, c) in pod_spec.containers.iter().enumerate() {
        let cbase = format!("{}[{i}]", join(base, "containers"));
        ck.required(&c.name, &join(&cbase, "name"));
        for (j, p) in c.ports.iter().flatten().enumerate() {
            let pbase = format!("{cbase}.ports[{j}]");
            let name = p.name.as_deref().unwrap_or("");
            if !name.is_empty() {
                if !is_iana_svc_name(name) {
                    ck.err(
                        join(&pbase, "name"),
                        format!("{IANA_SVC_NAME}; got {}", quote(name)),
                    );
                } else if let Some(other) = names.insert(name, pbase.clone()) {
                    ck.err(
                        join(&pbase, "name"),
                        format!("duplicate port name {} (also {other})", quote(name)),
                    );
                }
            }
            let container_port = ck.port(p.container_port, &join(&pbase, "containerPort"));
            let protocol = ck.protocol(p.protocol.as_deref(), &join(&pbase, "protocol"));
            if let Some(container_port) = container_port {
                ports.push(ContainerPort {
                    name: name.to_string(),
                    container_port,
                    protocol,
                });
            }
        }
    }
    ports
}

/// `spec` is required for both kinds; decoding leaves it `None` when missing.
pub fn deployment(ck: &mut Ck, d: &apps::Deployment) -> Deployment {
    let meta = meta(
        ck,
        &d.metadata,
        Scope::Namespaced,
        NameRule::Dns1123Subdomain,
    );
    let mut replicas = 1;
    let mut selector = BTreeMap::new();
    let mut template = PodTemplate {
        labels: BTreeMap::new(),
        ports: Vec::new(),
    };
    let Some(spec) = &d.spec else {
        ck.err("spec", "required");
        return Deployment {
            meta,
            replicas,
            selector,
            template,
        };
    };
    if let Some(n) = spec.replicas {
        replicas = ck
            .int_in(i64::from(n), "spec.replicas", 0, i64::from(i32::MAX))
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(1);
    }
    let sel = &spec.selector;
    selector = sel.match_labels.clone().unwrap_or_default();
    if sel
        .match_expressions
        .as_ref()
        .is_some_and(|e| !e.is_empty())
    {
        ck.err(
            "spec.selector.matchExpressions",
            "matchExpressions is not supported by ferry; use matchLabels",
        );
    } else if sel.match_labels.is_none() && sel.match_expressions.is_none() {
        ck.err(
            "spec.selector",
            "required: ferry needs a non-empty matchLabels selector",
        );
    } else if selector.is_empty() {
        ck.err(
            "spec.selector.matchLabels",
            "required: ferry needs a non-empty matchLabels selector",
        );
    }
    template.labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let missing: Vec<String> = selector
        .iter()
        .filter(|(k, v)| template.labels.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if !missing.is_empty() {
        ck.err(
            "spec.template.metadata.labels",
            format!(
                "selector does not match template labels: missing {}",
                missing.join(", ")
            ),
        );
    }
    match &spec.template.spec {
        Some(tspec) => template.ports = container_ports(ck, tspec, "spec.template.spec"),
        None => ck.err("spec.template.spec", "required"),
    }
    Deployment {
        meta,
        replicas,
        selector,
        template,
    }
}

pub fn pod(ck: &mut Ck, p: &core::Pod) -> Pod {
    let meta = meta(
        ck,
        &p.metadata,
        Scope::Namespaced,
        NameRule::Dns1123Subdomain,
    );
    let mut node_name = None;
    let mut ports = Vec::new();
    match &p.spec {
        Some(spec) => {
            node_name = non_empty(spec.node_name.as_deref()).map(str::to_string);
            ports = container_ports(ck, spec, "spec");
        }
        None => ck.err("spec", "required"),
    }
    let mut pod_ip = None;
    if let Some(status) = &p.status {
        pod_ip = ck.opt_ip(status.pod_ip.as_deref(), "status.podIP");
        if pod_ip.is_none() {
            if let Some(first) = status.pod_ips.as_ref().and_then(|v| v.first()) {
                pod_ip = ck.opt_ip(Some(first.ip.as_str()), "status.podIPs[0].ip");
            }
        }
    }
    Pod {
        meta,
        node_name,
        ports,
        pod_ip,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_source::manifest::split_objects;

    /// The seed's Deployment, as the lab ships it.
    const DEPLOYMENT_SEED: &str = crate::seed::NEXTCLOUD_DEV;

    fn strings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn meta(name: &str, namespace: &str) -> Meta {
        Meta {
            name: name.to_string(),
            namespace: namespace.to_string(),
            ..Meta::default()
        }
    }

    fn read(text: &str) -> Result<Workload, Vec<ManifestError>> {
        let (objects, errors) = split_objects("test.yaml", text);
        assert!(errors.is_empty(), "{errors:#?}");
        assert_eq!(objects.len(), 1);
        parse(&objects[0]).expect("a lab kind")
    }

    /// Exactly one workload, no errors.
    fn one(text: &str) -> Workload {
        read(text).unwrap_or_else(|e| panic!("errors: {e:#?}"))
    }

    /// The object is refused with (at least) an error at `field` whose message contains `msg`.
    #[track_caller]
    fn assert_error(text: &str, field: &str, msg: &str) -> ManifestError {
        let errors = read(text).expect_err("refused");
        match errors
            .iter()
            .find(|e| e.at.field == field && e.message.contains(msg))
        {
            Some(e) => e.clone(),
            None => panic!("no error at {field:?} containing {msg:?}; got {errors:#?}"),
        }
    }

    #[test]
    fn other_kinds_are_not_the_labs() {
        let (objects, _) =
            split_objects("f", "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n");
        assert!(parse(&objects[0]).is_none());
        assert_error(
            "apiVersion: extensions/v1beta1\nkind: Deployment\nmetadata: {name: d}\n",
            "apiVersion",
            "needs apiVersion apps/v1",
        );
    }

    #[test]
    fn seed_deployment() {
        let app = strings(&[("app", "nextcloud"), ("environment", "dev")]);
        let expected = Deployment {
            meta: Meta {
                labels: app.clone(),
                ..meta("nextcloud-dev", "default")
            },
            replicas: 2,
            selector: app.clone(),
            template: PodTemplate {
                labels: app,
                ports: vec![ContainerPort {
                    name: String::new(),
                    container_port: 80,
                    protocol: Protocol::Tcp,
                }],
            },
        };
        assert_eq!(one(DEPLOYMENT_SEED), Workload::Deployment(expected));
    }

    #[test]
    fn deployment_defaults_and_ports() {
        let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\n\
                    spec:\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web, tier: fe}}\n    \
                    spec:\n      containers:\n      - name: web\n        ports:\n        - {name: http, containerPort: 8080}\n        \
                    - {name: dns, containerPort: 53, protocol: UDP}\n      - name: sidecar\n";
        let Workload::Deployment(d) = one(text) else {
            panic!()
        };
        assert_eq!(d.replicas, 1);
        assert_eq!(d.selector, strings(&[("app", "web")]));
        assert_eq!(
            d.template.labels,
            strings(&[("app", "web"), ("tier", "fe")])
        );
        assert_eq!(
            d.template.ports,
            vec![
                ContainerPort {
                    name: "http".into(),
                    container_port: 8080,
                    protocol: Protocol::Tcp
                },
                ContainerPort {
                    name: "dns".into(),
                    container_port: 53,
                    protocol: Protocol::Udp
                },
            ]
        );
        let Workload::Deployment(d) = one(&DEPLOYMENT_SEED.replace("replicas: 2", "replicas: 0"))
        else {
            panic!()
        };
        assert_eq!(d.replicas, 0);
    }

    #[test]
    fn deployment_errors() {
        let cases: &[(&str, &str, &str, &str)] = &[
            (
                "    matchLabels:\n      app: nextcloud\n      environment: dev\n",
                "    matchExpressions:\n    - {key: app, operator: In, values: [nextcloud]}\n",
                "spec.selector.matchExpressions",
                "not supported by ferry",
            ),
            ("    matchLabels:\n      app: nextcloud\n      environment: dev\n", "    matchLabels: {}\n", "spec.selector.matchLabels", "non-empty"),
            ("  selector:\n    matchLabels:\n      app: nextcloud\n      environment: dev\n", "", "spec.selector", "required"),
            ("        environment: dev\n    spec:", "        environment: prod\n    spec:", "spec.template.metadata.labels", "selector does not match template labels: missing environment=dev"),
            ("replicas: 2", "replicas: -1", "spec.replicas", "must be between 0 and 2147483647, got -1"),
            ("replicas: 2", "replicas: two", "spec.replicas", "must be an integer"),
            ("containerPort: 80", "containerPort: 0", "spec.template.spec.containers[0].ports[0].containerPort", "got 0"),
            ("- containerPort: 80", "- name: web\n          containerPort: 80\n        - name: web\n          containerPort: 81", "spec.template.spec.containers[0].ports[1].name", "duplicate port name \"web\""),
            ("- containerPort: 80", "- name: http_port\n          containerPort: 80", "spec.template.spec.containers[0].ports[0].name", "IANA"),
            ("- containerPort: 80", "- protocol: TCP", "spec.template.spec.containers[0].ports[0].containerPort", "required"),
            ("      - name: nextcloud\n        image: nextcloud:latest\n", "      - image: x\n", "spec.template.spec.containers[0].name", "required"),
            ("      containers:", "      initContainers:", "spec.template.spec.containers", "at least one container"),
            ("    spec:\n", "    nospec:\n", "spec.template.spec", "required"),
        ];
        for (from, to, field, msg) in cases {
            let text = DEPLOYMENT_SEED.replacen(from, to, 1);
            assert_ne!(text, DEPLOYMENT_SEED, "{from}");
            let e = assert_error(&text, field, msg);
            assert_eq!(
                e.at.object.as_deref(),
                Some("Deployment default/nextcloud-dev")
            );
        }
        assert_error(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n",
            "spec",
            "required",
        );
    }

    #[test]
    fn pod() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: web-0, labels: {app: web}}\n\
                    spec:\n  nodeName: node-1\n  containers:\n  - name: web\n    ports: [{name: http, containerPort: 8080}]\n\
                    status: {podIP: 10.244.1.5}\n";
        let Workload::Pod(p) = one(text) else {
            panic!()
        };
        assert_eq!(p.node_name.as_deref(), Some("node-1"));
        assert_eq!(p.pod_ip, Some(ip("10.244.1.5")));
        assert_eq!(p.ports[0].name, "http");
        assert_eq!(p.meta.labels, strings(&[("app", "web")]));

        let Workload::Pod(p) =
            one(&text.replace("{podIP: 10.244.1.5}", "{podIPs: [{ip: 'fd00::5'}]}"))
        else {
            panic!()
        };
        assert_eq!(p.pod_ip, Some(ip("fd00::5")));
        let Workload::Pod(p) = one(&text.replace("status: {podIP: 10.244.1.5}\n", "")) else {
            panic!()
        };
        assert_eq!(p.pod_ip, None);

        let e = assert_error(
            &text.replace("10.244.1.5", "10.244.1"),
            "status.podIP",
            "must be an IP address",
        );
        assert_eq!(e.at.object.as_deref(), Some("Pod default/web-0"));
        assert_error(
            &text.replace("8080", "80000"),
            "spec.containers[0].ports[0].containerPort",
            "got 80000",
        );
        assert_error(
            &text.replace("nodeName: node-1", "nodeName: 7"),
            "spec.nodeName",
            "must be a string",
        );
    }
}
