//! Deployment and Pod: the lab's kinds (the agent only needs their endpoints).

use std::collections::BTreeMap;

use ferry_model::{ContainerPort, Deployment, Pod, PodTemplate};
use k8s_openapi::api::apps::v1 as apps;
use k8s_openapi::api::core::v1 as core;

use crate::check::{
    is_iana_svc_name, join, meta, non_empty, quote, Ck, NameRule, Scope, IANA_SVC_NAME,
};

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
