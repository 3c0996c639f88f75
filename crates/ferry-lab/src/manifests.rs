//! `apply` / `delete`: Deployments and Pods become lab pods, every other object a file in
//! manifests/ (what the agents read); EndpointSlices are generated for selector Services.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use ferry_model::{ClusterIpSpec, IpFamily, IpFamilyPolicy, Object, Service, TargetPort};
use ferry_source::check::{
    is_dns1123_label, is_dns1123_subdomain, quote, DNS1123_LABEL, DNS1123_SUBDOMAIN,
};
use ferry_source::manifest::{parse_object, split_objects, RawObject};
use serde::Serialize;
use serde_json::Value;

use crate::pods::{create_pods, delete_pods, PodSpec};
use crate::state::{
    fnv64, now_secs, write_atomic, Ctx, DeploymentInfo, LabState, PodInfo, PortInfo,
};
use crate::topology::rfc3339;
use crate::workloads::{self, ContainerPort, Deployment, Pod, Workload};

/// Label on every EndpointSlice the lab writes.
pub const MANAGED_BY: &str = "ferry-lab";

/// One object from a manifest file.
#[derive(Debug, Clone)]
pub struct Doc {
    pub file: String,
    pub index: usize,
    /// Where the object is in its document: "" or `items[3]` for an item of a `List`.
    pub base: String,
    pub value: Value,
    pub kind: String,
    pub api_version: String,
    pub name: String,
    pub namespace: String,
}

impl Doc {
    fn group(&self) -> Option<&str> {
        self.api_version.split_once('/').map(|(g, _)| g)
    }
    /// kubectl's resource spelling: `deployment.apps`, `service`, ...
    pub fn resource(&self) -> String {
        let kind = self.kind.to_lowercase();
        match self.group() {
            Some(g) => format!("{kind}.{g}"),
            None => kind,
        }
    }
    /// Plural, for "not found" messages: `deployments.apps`, `services`.
    pub fn plural(&self) -> String {
        let kind = self.kind.to_lowercase();
        match self.group() {
            Some(g) => format!("{kind}s.{g}"),
            None => format!("{kind}s"),
        }
    }
    /// The file in manifests/ holding this object.
    pub fn file_name(&self) -> String {
        object_file_name(&self.kind, &self.namespace, &self.name)
    }
    pub(crate) fn at(&self) -> String {
        format!("{} document {}", self.file, self.index)
    }
    /// The object as ferry-source splits it.
    fn raw(&self) -> RawObject {
        RawObject {
            file: self.file.clone(),
            doc_index: self.index,
            base: self.base.clone(),
            kind: self.kind.clone(),
            api_version: self.api_version.clone(),
            value: self.value.clone(),
        }
    }
}

pub fn object_file_name(kind: &str, namespace: &str, name: &str) -> String {
    let kind = kind.to_lowercase();
    if namespace.is_empty() {
        format!("{kind}-{name}.yaml")
    } else {
        format!("{kind}-{namespace}-{name}.yaml")
    }
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for key in path {
        cur = cur.get(*key)?;
    }
    cur.as_str()
}

/// Splits a file (multi-document YAML or JSON, `List`s unpacked) into objects, with
/// ferry-source's splitter and name checks; every object needs a name.
pub fn split_docs(file: &str, text: &str) -> (Vec<Doc>, Vec<String>) {
    let (objects, split_errors) = split_objects(file, text);
    let mut errors: Vec<String> = split_errors.iter().map(ToString::to_string).collect();
    let mut docs = Vec::new();
    for raw in objects {
        let Some(name) = raw.name().map(str::to_string) else {
            errors.push(raw.problem("metadata.name", "required").to_string());
            continue;
        };
        if !is_dns1123_subdomain(&name) {
            let message = format!("{DNS1123_SUBDOMAIN}; got {}", quote(&name));
            errors.push(raw.problem("metadata.name", message).to_string());
            continue;
        }
        let namespace = raw.namespace().to_string();
        if !namespace.is_empty() && !is_dns1123_label(&namespace) {
            let message = format!("{DNS1123_LABEL}; got {}", quote(&namespace));
            errors.push(raw.problem("metadata.namespace", message).to_string());
            continue;
        }
        docs.push(Doc {
            file: raw.file,
            index: raw.doc_index,
            base: raw.base,
            value: raw.value,
            kind: raw.kind,
            api_version: raw.api_version,
            name,
            namespace,
        });
    }
    (docs, errors)
}

/// A document read: a kind ferry's model knows, or one the lab runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Typed {
    Object(Object),
    Workload(Workload),
}

/// The typed object of a document, via ferry-source (the lab's own kinds via
/// [`crate::workloads`]). Ok(None) for kinds neither knows.
pub fn typed(doc: &Doc) -> std::result::Result<Option<Typed>, String> {
    let raw = doc.raw();
    let errors = match workloads::parse(&raw) {
        Some(Ok(w)) => return Ok(Some(Typed::Workload(w))),
        Some(Err(errors)) => errors,
        None => {
            let parsed = parse_object(&raw);
            if parsed.errors.is_empty() {
                return Ok(parsed.objects.into_iter().next().map(Typed::Object));
            }
            parsed.errors
        }
    };
    let msgs: Vec<String> = errors
        .iter()
        .map(|e| {
            if e.at.field.is_empty() {
                e.message.clone()
            } else {
                format!("{}: {}", e.at.field, e.message)
            }
        })
        .collect();
    Err(format!(
        "{} ({} {}): {}",
        doc.at(),
        doc.kind,
        doc.name,
        msgs.join("; ")
    ))
}

/// Reads `-f` arguments: files, directories (their *.yaml, *.yml, *.json) or `-` (stdin).
pub fn read_inputs(paths: &[PathBuf]) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for p in paths {
        if p.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text)?;
            out.push(("<stdin>".to_string(), text));
        } else if p.is_dir() {
            let mut files: Vec<PathBuf> = fs::read_dir(p)
                .with_context(|| format!("reading {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
                })
                .collect();
            files.sort();
            for f in files {
                let text =
                    fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
                out.push((f.display().to_string(), text));
            }
        } else {
            let text = fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            out.push((p.display().to_string(), text));
        }
    }
    Ok(out)
}

/// Output lines (stdout) and errors (stderr) of `apply` / `delete`.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub lines: Vec<String>,
    pub errors: Vec<String>,
}

impl Report {
    fn push(&mut self, r: Result<String>) {
        match r {
            Ok(line) => self.lines.push(line),
            Err(e) => self.errors.push(format!("{e:#}")),
        }
    }
}

pub(crate) fn hash10(text: &str) -> String {
    format!("{:016x}", fnv64(text.as_bytes()))[..10].to_string()
}

pub(crate) fn port_infos(ports: &[ContainerPort]) -> Vec<PortInfo> {
    ports
        .iter()
        .map(|p| PortInfo {
            name: p.name.clone(),
            port: p.container_port,
            protocol: p.protocol.as_k8s().to_string(),
        })
        .collect()
}

pub(crate) fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// `apply`: every document in order, then EndpointSlices. Caller holds the lock and saves.
pub fn apply(ctx: &Ctx, st: &mut LabState, docs: &[Doc]) -> Report {
    let mut report = Report::default();
    for doc in docs {
        let r = match typed(doc) {
            Err(e) => Err(anyhow::anyhow!(e)),
            Ok(Some(Typed::Workload(Workload::Deployment(d)))) => {
                apply_deployment(ctx, st, doc, &d)
            }
            Ok(Some(Typed::Workload(Workload::Pod(p)))) => apply_pod(ctx, st, doc, &p),
            Ok(_) if doc.kind == "Deployment" || doc.kind == "Pod" => Err(anyhow::anyhow!(
                "{}: cannot read this {}",
                doc.at(),
                doc.kind
            )),
            Ok(_) => apply_file_object(ctx, doc),
        };
        report.push(r);
    }
    if let Err(e) = regen_slices(ctx, st) {
        report.errors.push(format!("writing EndpointSlices: {e:#}"));
    }
    report
}

fn apply_file_object(ctx: &Ctx, doc: &Doc) -> Result<String> {
    let path = ctx.manifests().join(doc.file_name());
    let old: Option<Value> = fs::read_to_string(&path)
        .ok()
        .and_then(|t| ferry_model::yaml::from_str(&t).ok());
    let old_ts = old
        .as_ref()
        .and_then(|v| str_at(v, &["metadata", "creationTimestamp"]))
        .map(str::to_string);
    let mut value = doc.value.clone();
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        let key = "creationTimestamp".to_string();
        if !meta.contains_key(&key) {
            let ts = old_ts.unwrap_or_else(|| rfc3339(now_secs()));
            meta.insert(key, Value::from(ts));
        }
    }
    let verb = match &old {
        Some(o) if *o == value => "unchanged",
        Some(_) => "configured",
        None => "created",
    };
    if verb != "unchanged" {
        let text = serde_saphyr::to_string(&value)?;
        write_atomic(&path, text.as_bytes())?;
    }
    Ok(format!("{}/{} {verb}", doc.resource(), doc.name))
}

fn apply_deployment(ctx: &Ctx, st: &mut LabState, doc: &Doc, d: &Deployment) -> Result<String> {
    if d.selector.is_empty() {
        bail!(
            "{}: Deployment {}: spec.selector.matchLabels is required",
            doc.at(),
            doc.name
        );
    }
    if !selector_matches(&d.selector, &d.template.labels) {
        bail!(
            "{}: Deployment {}: `selector` does not match template `labels`",
            doc.at(),
            doc.name
        );
    }
    let manifest = serde_saphyr::to_string(&doc.value)?;
    let template = doc
        .value
        .get("spec")
        .and_then(|s| s.get("template"))
        .map(serde_saphyr::to_string)
        .transpose()?
        .unwrap_or_default();
    let template_hash = hash10(&template);
    let mut pod_labels = d.template.labels.clone();
    pod_labels.insert("pod-template-hash".into(), template_hash.clone());
    let key = format!("{}/{}", doc.namespace, doc.name);
    let existing = st.deployments.iter().position(|e| e.key() == key);
    let verb = match existing {
        None => "created",
        Some(i) if st.deployments[i].manifest == manifest => "unchanged",
        Some(_) => "configured",
    };
    let info = DeploymentInfo {
        namespace: doc.namespace.clone(),
        name: doc.name.clone(),
        replicas: d.replicas,
        template_hash,
        labels: d.meta.labels.clone(),
        pod_labels,
        ports: port_infos(&d.template.ports),
        manifest,
        created: existing.map_or_else(now_secs, |i| st.deployments[i].created),
    };
    match existing {
        Some(i) => st.deployments[i] = info,
        None => st.deployments.push(info),
    }
    reconcile_deployment(ctx, st, &key)?;
    Ok(format!("deployment.apps/{} {verb}", doc.name))
}

/// Makes the pods of a Deployment match it: replaces pods of an old template, scales.
fn reconcile_deployment(ctx: &Ctx, st: &mut LabState, key: &str) -> Result<()> {
    let Some(dep) = st.deployments.iter().find(|d| d.key() == key).cloned() else {
        return Ok(());
    };
    let stale: Vec<String> = st
        .pods
        .iter()
        .filter(|p| p.owner.as_deref() == Some(key) && p.spec_hash != dep.template_hash)
        .map(|p| p.name.clone())
        .collect();
    delete_pods(ctx, st, &stale)?;
    let current = st
        .pods
        .iter()
        .filter(|p| p.owner.as_deref() == Some(key))
        .count();
    let want = dep.replicas as usize;
    if current > want {
        let mut victims = Vec::new();
        for _ in 0..current - want {
            // From the node running most of this Deployment's pods, the newest.
            let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
            for p in st
                .pods
                .iter()
                .filter(|p| p.owner.as_deref() == Some(key) && !victims.contains(&p.name))
            {
                *per_node.entry(&p.node).or_default() += 1;
            }
            let Some(pick) = st
                .pods
                .iter()
                .filter(|p| p.owner.as_deref() == Some(key) && !victims.contains(&p.name))
                .max_by_key(|p| (per_node.get(p.node.as_str()).copied(), p.created, &p.name))
                .map(|p| p.name.clone())
            else {
                break;
            };
            victims.push(pick);
        }
        delete_pods(ctx, st, &victims)?;
    } else if current < want {
        let mut specs = Vec::new();
        for _ in current..want {
            let name = loop {
                let candidate = format!(
                    "{}-{}-{}",
                    dep.name,
                    dep.template_hash,
                    crate::sys::random_suffix(5)
                );
                if st.pod(&candidate).is_none()
                    && !specs.iter().any(|s: &PodSpec| s.name == candidate)
                {
                    break candidate;
                }
            };
            specs.push(PodSpec {
                name,
                namespace: dep.namespace.clone(),
                node: None,
                labels: dep.pod_labels.clone(),
                ports: dep.ports.clone(),
                owner: Some(key.to_string()),
                spec_hash: dep.template_hash.clone(),
            });
        }
        create_pods(ctx, st, &specs)?;
    }
    Ok(())
}

fn apply_pod(ctx: &Ctx, st: &mut LabState, doc: &Doc, p: &Pod) -> Result<String> {
    // Labels may change in place; anything else recreates the pod.
    let mut without_labels = doc.value.clone();
    if let Some(meta) = without_labels
        .get_mut("metadata")
        .and_then(Value::as_object_mut)
    {
        meta.remove("labels");
        meta.remove("annotations");
    }
    let spec_hash = hash10(&serde_saphyr::to_string(&without_labels)?);
    if let Some(node) = &p.node_name {
        if st.node(node).is_none() {
            bail!(
                "{}: pod {}: nodeName {node:?} is not a node of this lab (nodes: {})",
                doc.at(),
                doc.name,
                st.node_names().join(", ")
            );
        }
    }
    let mut verb = "created";
    if let Some(old) = st.pod(&doc.name).cloned() {
        if let Some(owner) = &old.owner {
            bail!(
                "{}: pod {} belongs to deployment {owner}; change the Deployment instead",
                doc.at(),
                doc.name
            );
        }
        if old.namespace != doc.namespace {
            bail!(
                "{}: a pod named {} exists in namespace {} (lab pod names are global)",
                doc.at(),
                doc.name,
                old.namespace
            );
        }
        if old.spec_hash == spec_hash {
            if old.labels == p.meta.labels {
                return Ok(format!("pod/{} unchanged", doc.name));
            }
            if let Some(rec) = st.pods.iter_mut().find(|r| r.name == doc.name) {
                rec.labels = p.meta.labels.clone();
            }
            return Ok(format!("pod/{} configured", doc.name));
        }
        delete_pods(ctx, st, std::slice::from_ref(&doc.name))?;
        verb = "configured";
    }
    create_pods(
        ctx,
        st,
        &[PodSpec {
            name: doc.name.clone(),
            namespace: doc.namespace.clone(),
            node: p.node_name.clone(),
            labels: p.meta.labels.clone(),
            ports: port_infos(&p.ports),
            owner: None,
            spec_hash,
        }],
    )?;
    Ok(format!("pod/{} {verb}", doc.name))
}

/// `delete -f`: every document in order, then EndpointSlices. Caller holds the lock and saves.
pub fn delete(ctx: &Ctx, st: &mut LabState, docs: &[Doc]) -> Report {
    let mut report = Report::default();
    for doc in docs {
        report.push(delete_one(ctx, st, doc));
    }
    if let Err(e) = regen_slices(ctx, st) {
        report.errors.push(format!("writing EndpointSlices: {e:#}"));
    }
    report
}

fn not_found(doc: &Doc) -> anyhow::Error {
    anyhow::anyhow!(
        "Error from server (NotFound): {} \"{}\" not found",
        doc.plural(),
        doc.name
    )
}

fn delete_one(ctx: &Ctx, st: &mut LabState, doc: &Doc) -> Result<String> {
    match doc.kind.as_str() {
        "Deployment" => {
            let key = format!("{}/{}", doc.namespace, doc.name);
            if !st.deployments.iter().any(|d| d.key() == key) {
                return Err(not_found(doc));
            }
            let pods: Vec<String> = st
                .pods
                .iter()
                .filter(|p| p.owner.as_deref() == Some(key.as_str()))
                .map(|p| p.name.clone())
                .collect();
            delete_pods(ctx, st, &pods)?;
            st.deployments.retain(|d| d.key() != key);
        }
        "Pod" => {
            let Some(pod) = st
                .pod(&doc.name)
                .filter(|p| p.namespace == doc.namespace)
                .cloned()
            else {
                return Err(not_found(doc));
            };
            delete_pods(ctx, st, std::slice::from_ref(&pod.name))?;
            // A Deployment replaces its deleted pods, as in Kubernetes.
            if let Some(owner) = &pod.owner {
                reconcile_deployment(ctx, st, owner)?;
            }
        }
        _ => {
            let path = ctx.manifests().join(doc.file_name());
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_found(doc)),
                Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
            }
        }
    }
    Ok(format!("{} \"{}\" deleted", doc.resource(), doc.name))
}

/// kind and apiVersion of a kubectl-style resource name (`svc`, `deployments`, ...).
pub fn resolve_kind(resource: &str) -> Option<(&'static str, &'static str)> {
    let r = resource.to_lowercase();
    let r = r.split('.').next().unwrap_or("");
    Some(match r {
        "svc" | "service" | "services" => ("Service", "v1"),
        "deploy" | "deployment" | "deployments" => ("Deployment", "apps/v1"),
        "po" | "pod" | "pods" => ("Pod", "v1"),
        "cm" | "configmap" | "configmaps" => ("ConfigMap", "v1"),
        "endpointslice" | "endpointslices" => ("EndpointSlice", "discovery.k8s.io/v1"),
        _ => return None,
    })
}

/// `delete KIND NAME...`.
pub fn delete_named(
    ctx: &Ctx,
    st: &mut LabState,
    resource: &str,
    namespace: &str,
    names: &[String],
) -> Result<Report> {
    let docs = named_docs(resource, namespace, names)?;
    Ok(delete(ctx, st, &docs))
}

/// The documents `delete KIND NAME...` stands for.
pub fn named_docs(resource: &str, namespace: &str, names: &[String]) -> Result<Vec<Doc>> {
    let Some((kind, api_version)) = resolve_kind(resource) else {
        bail!("error: the server doesn't have a resource type \"{resource}\"");
    };
    let docs: Vec<Doc> = names
        .iter()
        .map(|name| Doc {
            file: "<command line>".into(),
            index: 0,
            base: String::new(),
            value: Value::Null,
            kind: kind.into(),
            api_version: api_version.into(),
            name: name.clone(),
            namespace: namespace.into(),
        })
        .collect();
    Ok(docs)
}

/// Every Service in manifests/ (ignoring files the lab generated).
pub fn manifest_services(ctx: &Ctx, st: &LabState) -> Result<Vec<Service>> {
    let mut files: Vec<PathBuf> = match fs::read_dir(ctx.manifests()) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).context("reading manifests/"),
    };
    files.sort();
    let mut services = Vec::new();
    for f in files {
        let Some(name) = f.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let manifest_ext = [".yaml", ".yml", ".json"].iter().any(|e| name.ends_with(e));
        if name.starts_with('.') || !manifest_ext || st.slice_files.iter().any(|s| s == name) {
            continue;
        }
        let Ok(text) = fs::read_to_string(&f) else {
            continue;
        };
        let (docs, _) = split_docs(name, &text);
        for doc in docs.iter().filter(|d| d.kind == "Service") {
            if let Ok(Some(Typed::Object(Object::Service(s)))) = typed(doc) {
                services.push(s);
            }
        }
    }
    Ok(services)
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SliceDoc {
    api_version: &'static str,
    kind: &'static str,
    pub(crate) metadata: SliceMeta,
    address_type: &'static str,
    endpoints: Vec<SliceEndpoint>,
    ports: Vec<SlicePort>,
}

#[derive(Debug, Serialize)]
pub(crate) struct SliceMeta {
    pub(crate) name: String,
    namespace: String,
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SliceEndpoint {
    addresses: Vec<String>,
    conditions: SliceConditions,
    node_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    zone: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hints: Option<SliceHints>,
    target_ref: SliceTargetRef,
}

/// `hints.forZones`, as an EndpointSlice controller writes them for `PreferClose`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SliceHints {
    for_zones: Vec<SliceZone>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct SliceZone {
    name: String,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct SliceConditions {
    ready: bool,
    serving: bool,
    terminating: bool,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct SliceTargetRef {
    kind: &'static str,
    name: String,
    namespace: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct SlicePort {
    name: String,
    protocol: String,
    port: u16,
}

/// The EndpointSlice documents of one Service: pods whose ports resolve alike share a slice.
fn slices_for(svc: &Service, st: &LabState) -> String {
    let mut text = String::from("# generated by ferry lab\n");
    for doc in slice_docs(svc, &st.pods, &st.nodes, MANAGED_BY) {
        text.push_str("---\n");
        // Serializing plain structs of strings, numbers and bools cannot fail.
        text.push_str(&serde_saphyr::to_string(&doc).unwrap_or_default());
    }
    text
}

/// The EndpointSlices of one Service over `pods` (named `SVC-lab`, `SVC-lab-2`, ...), labelled
/// as managed by `managed_by`.
pub(crate) fn slice_docs(
    svc: &Service,
    pods: &[PodInfo],
    nodes: &[crate::state::NodeInfo],
    managed_by: &str,
) -> Vec<SliceDoc> {
    let mut groups: BTreeMap<Vec<SlicePort>, Vec<SliceEndpoint>> = BTreeMap::new();
    let mut pods: Vec<_> = pods
        .iter()
        .filter(|p| p.namespace == svc.meta.namespace && selector_matches(&svc.selector, &p.labels))
        .collect();
    pods.sort_by(|a, b| a.name.cmp(&b.name));
    for p in &pods {
        let ports: Vec<SlicePort> = svc
            .ports
            .iter()
            .filter_map(|sp| {
                let port = match &sp.target_port {
                    TargetPort::Number(n) => *n,
                    TargetPort::Name(name) => {
                        p.ports
                            .iter()
                            .find(|cp| cp.name == *name && cp.protocol == sp.protocol.as_k8s())?
                            .port
                    }
                };
                Some(SlicePort {
                    name: sp.name.clone(),
                    protocol: sp.protocol.as_k8s().to_string(),
                    port,
                })
            })
            .collect();
        if ports.is_empty() && !svc.ports.is_empty() {
            continue;
        }
        // Each endpoint carries its node's zone; with PreferClose, the hint to serve that zone
        // (what Kubernetes' EndpointSlice controller does for trafficDistribution).
        let zone = nodes.iter().find(|n| n.name == p.node).map(|n| n.zone());
        let hints = zone
            .clone()
            .filter(|_| svc.prefer_close)
            .map(|z| SliceHints {
                for_zones: vec![SliceZone { name: z }],
            });
        groups.entry(ports).or_default().push(SliceEndpoint {
            addresses: vec![p.ip.to_string()],
            conditions: SliceConditions {
                ready: p.ready,
                serving: p.ready,
                terminating: false,
            },
            node_name: p.node.clone(),
            zone,
            hints,
            target_ref: SliceTargetRef {
                kind: "Pod",
                name: p.name.clone(),
                namespace: p.namespace.clone(),
            },
        });
    }
    if groups.is_empty() {
        let ports = svc
            .ports
            .iter()
            .filter_map(|sp| match sp.target_port {
                TargetPort::Number(n) => Some(SlicePort {
                    name: sp.name.clone(),
                    protocol: sp.protocol.as_k8s().to_string(),
                    port: n,
                }),
                TargetPort::Name(_) => None,
            })
            .collect();
        groups.insert(ports, Vec::new());
    }
    let mut docs = Vec::new();
    for family in service_families(svc) {
        let (tag, address_type) = match family {
            IpFamily::IPv4 => ("lab", "IPv4"),
            IpFamily::IPv6 => ("lab6", "IPv6"),
        };
        for (i, (ports, endpoints)) in groups.iter().enumerate() {
            let name = if i == 0 {
                format!("{}-{tag}", svc.meta.name)
            } else {
                format!("{}-{tag}-{}", svc.meta.name, i + 1)
            };
            let mut labels = BTreeMap::new();
            labels.insert(
                "kubernetes.io/service-name".to_string(),
                svc.meta.name.clone(),
            );
            labels.insert(
                "endpointslice.kubernetes.io/managed-by".to_string(),
                managed_by.to_string(),
            );
            let endpoints = endpoints
                .iter()
                .map(|e| SliceEndpoint {
                    addresses: e
                        .addresses
                        .iter()
                        .map(|a| match (family, a.parse::<std::net::Ipv4Addr>()) {
                            (IpFamily::IPv6, Ok(v4)) => crate::state::pod_ip6(v4).to_string(),
                            _ => a.clone(),
                        })
                        .collect(),
                    ..e.clone()
                })
                .collect();
            docs.push(SliceDoc {
                api_version: "discovery.k8s.io/v1",
                kind: "EndpointSlice",
                metadata: SliceMeta {
                    name,
                    namespace: svc.meta.namespace.clone(),
                    labels,
                },
                address_type,
                endpoints,
                ports: ports.clone(),
            });
        }
    }
    docs
}

/// The IP families of a Service's EndpointSlices, as the EndpointSlice controller takes them
/// from its spec.ipFamilies (which the API server fills in; the lab's manifest-mode agents have
/// service CIDRs of both families): the cluster IP's family or the first one listed (IPv4 when
/// neither says), and the other one too unless the Service is SingleStack.
fn service_families(svc: &Service) -> Vec<IpFamily> {
    let primary = match svc.cluster_ip {
        ClusterIpSpec::Ip(ip) => IpFamily::of(ip),
        _ => svc.ip_families.first().copied().unwrap_or(IpFamily::IPv4),
    };
    let mut out = vec![primary];
    if svc.effective_ip_family_policy() != IpFamilyPolicy::SingleStack {
        out.push(primary.other());
    }
    out
}

/// Rewrites manifests/endpointslice-<ns>-<svc>.yaml for every Service with a selector (only
/// when the content changes) and removes the slices of Services that are gone.
pub fn regen_slices(ctx: &Ctx, st: &mut LabState) -> Result<()> {
    let services = manifest_services(ctx, st)?;
    let mut wanted = BTreeSet::new();
    for svc in services.iter().filter(|s| !s.selector.is_empty()) {
        let file = object_file_name("EndpointSlice", &svc.meta.namespace, &svc.meta.name);
        let path = ctx.manifests().join(&file);
        let text = slices_for(svc, st);
        if fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            write_atomic(&path, text.as_bytes())?;
        }
        wanted.insert(file);
    }
    for old in &st.slice_files {
        if !wanted.contains(old) {
            let _ = fs::remove_file(ctx.manifests().join(old));
        }
    }
    st.slice_files = wanted.into_iter().collect();
    Ok(())
}

/// `set-ready POD true|false`: a lab-only readiness switch. Caller holds the lock and saves.
pub fn set_ready(ctx: &Ctx, st: &mut LabState, pod: &str, ready: bool) -> Result<String> {
    let Some(rec) = st.pods.iter_mut().find(|p| p.name == pod) else {
        bail!("Error from server (NotFound): pods \"{pod}\" not found");
    };
    rec.ready = ready;
    regen_slices(ctx, st)?;
    Ok(format!("pod/{pod} ready={ready}"))
}

/// Reads a file's documents, for callers that hold a path.
pub fn docs_from_files(paths: &[PathBuf]) -> Result<(Vec<Doc>, Vec<String>)> {
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for (label, text) in read_inputs(paths)? {
        let (d, e) = split_docs(&label, &text);
        docs.extend(d);
        errors.extend(e);
    }
    Ok((docs, errors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_of_each_family_the_service_has() {
        let pod = PodInfo {
            name: "web-1".into(),
            namespace: "default".into(),
            ns: "lab-web-1".into(),
            node: "n0".into(),
            ip: "10.42.0.10".parse().unwrap(),
            veth: "vp1".into(),
            pid: None,
            ports: vec![],
            tcp: vec![80],
            udp: vec![80],
            labels: BTreeMap::from([("app".to_string(), "web".to_string())]),
            owner: None,
            ready: true,
            created: 0,
            spec_hash: String::new(),
        };
        let svc = |spec: &str| -> Service {
            let text =
                format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec: {spec}\n");
            let parsed = ferry_source::manifest::parse_text("svc.yaml", &text);
            match parsed.objects.as_slice() {
                [Object::Service(s)] => s.clone(),
                _ => panic!("{parsed:?}"),
            }
        };
        let families = |spec: &str| -> Vec<(String, String, Vec<String>)> {
            slice_docs(&svc(spec), std::slice::from_ref(&pod), &[], "test")
                .into_iter()
                .map(|d| {
                    let addrs = d
                        .endpoints
                        .iter()
                        .flat_map(|e| e.addresses.clone())
                        .collect();
                    (d.metadata.name, d.address_type.to_string(), addrs)
                })
                .collect()
        };
        let ports = "ports: [{port: 80}], selector: {app: web}";
        let v4 = (
            "web-lab".to_string(),
            "IPv4".to_string(),
            vec!["10.42.0.10".to_string()],
        );
        let v6 = (
            "web-lab6".to_string(),
            "IPv6".to_string(),
            vec!["fd00:42::a".to_string()],
        );
        assert_eq!(families(&format!("{{{ports}}}")), vec![v4.clone()]);
        assert_eq!(
            families(&format!("{{ipFamilyPolicy: PreferDualStack, {ports}}}")),
            vec![v4.clone(), v6.clone()]
        );
        assert_eq!(
            families(&format!("{{ipFamilies: [IPv6], {ports}}}")),
            vec![v6.clone()]
        );
        assert_eq!(
            families(&format!("{{ipFamilies: [IPv6, IPv4], {ports}}}")),
            vec![v6, v4]
        );
    }

    #[test]
    fn split_seed() {
        let text = include_str!("../manifests/seed/nextcloud-dev.yaml");
        let (docs, errors) = split_docs("nextcloud-dev.yaml", text);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(docs.len(), 1);
        assert_eq!(docs[0].kind, "Deployment");
        assert_eq!(docs[0].resource(), "deployment.apps");
        assert_eq!(docs[0].namespace, "default");
        let text = include_str!("../manifests/seed/metallb-config.yaml");
        let (docs, _) = split_docs("m.yaml", text);
        assert_eq!(docs[0].file_name(), "configmap-metallb-system-config.yaml");
    }

    #[test]
    fn split_list_and_errors() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: a}\n- apiVersion: v1\n  kind: Service\n  metadata: {name: B}\n---\nkind: Service\n";
        let (docs, errors) = split_docs("f", text);
        assert_eq!(docs.len(), 1);
        assert_eq!(errors.len(), 2, "{errors:?}");
        let (docs, errors) = split_docs(
            "f",
            "{\"apiVersion\":\"v1\",\"kind\":\"Node\",\"metadata\":{\"name\":\"n\"}}",
        );
        assert!(errors.is_empty());
        assert_eq!(docs[0].namespace, "");
        assert_eq!(docs[0].file_name(), "node-n.yaml");
    }

    #[test]
    fn kind_lists() {
        let text = "apiVersion: v1\nkind: ServiceList\nitems:\n- metadata: {name: a}\n  spec: {ports: [{port: 80}]}\n";
        let (docs, errors) = split_docs("f", text);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            (docs[0].kind.as_str(), docs[0].api_version.as_str()),
            ("Service", "v1")
        );
        assert!(matches!(
            typed(&docs[0]),
            Ok(Some(Typed::Object(Object::Service(_))))
        ));
    }

    #[test]
    fn typed_errors() {
        let text =
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 0}]}\n";
        let (docs, _) = split_docs("f", text);
        let err = typed(&docs[0]).unwrap_err();
        assert!(err.contains("spec.ports[0].port"), "{err}");
    }

    #[test]
    fn kinds() {
        assert_eq!(resolve_kind("svc"), Some(("Service", "v1")));
        assert_eq!(
            resolve_kind("deployments.apps"),
            Some(("Deployment", "apps/v1"))
        );
        assert_eq!(resolve_kind("frobs"), None);
    }
}
