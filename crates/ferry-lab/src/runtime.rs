//! `ferry lab serve-runtime` (hidden): the kubelet, Deployment controller and EndpointSlice
//! controller of a lab brought up with `--api`.
//!
//! It watches Deployments, Pods, Services and EndpointSlices on the lab API server; every
//! change (and every few seconds) starts a *pass*, which lists them and makes the lab match:
//! - Deployments get Pod objects (`NAME-TEMPLATEHASH-XXXXX`, the template's labels
//!   plus `pod-template-hash`, an ownerReference to the Deployment): scaled, replaced when the
//!   template changes, deleted with their Deployment (the API server has no garbage collector);
//! - every Pod object gets a lab pod (network namespace, veth, `ferry lab serve-pod`; see
//!   [`crate::pods`]), and lab pods whose Pod is gone are removed; the Pod's `spec.nodeName`
//!   and `status` (podIP, hostIP, phase, conditions) are written back as a kubelet would;
//! - the annotation [`READY_ANNOTATION`]` = "false"` (set by `ferry lab set-ready POD false`)
//!   makes a pod not ready;
//! - Deployment `status` (replicas, readyReplicas, ...);
//! - every Service with a selector gets EndpointSlices (label `kubernetes.io/service-name`,
//!   [`MANAGED_BY`], an ownerReference to the Service, nodeName, ready/serving/terminating,
//!   named target ports resolved), and slices of Services that are gone are deleted.
//!
//! After a pass it writes [`Synced`] to `runtime.json` in the lab dir: the resourceVersion up
//! to which the lab matches the API, and the objects it could not run. `ferry lab apply`
//! waits for it, so that a Deployment's pods exist when `apply` returns, as before.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result};
use ferry_model::{Object, Service as ModelService};
use ferry_source::check::Ck;
use ferry_source::manifest::{parse_object, RawObject};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, ResourceExt};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::cluster;
use crate::manifests::{hash10, port_infos, slice_docs};
use crate::pods::{create_pods, delete_pods, PodSpec};
use crate::state::{
    load_state, now_secs, save_state, write_atomic, Ctx, LabLock, LabState, PodInfo,
};
use crate::topology::rfc3339;
use crate::workloads;

/// `endpointslice.kubernetes.io/managed-by` of the slices the runtime keeps.
pub const MANAGED_BY: &str = "endpointslice-controller.lab.ferry.dev";
/// Pod annotation: `"false"` makes the pod not ready (`ferry lab set-ready`).
pub const READY_ANNOTATION: &str = "lab.ferry.dev/ready";
const TEMPLATE_HASH: &str = "pod-template-hash";

/// What the runtime has reconciled: runtime.json.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Synced {
    /// Every change up to this resourceVersion is reflected in the lab.
    pub resource_version: u64,
    /// Objects it could not run: `Kind/namespace/name` and why.
    pub errors: BTreeMap<String, String>,
    pub at: u64,
}

pub fn read_synced(ctx: &Ctx) -> Option<Synced> {
    let text = std::fs::read_to_string(ctx.runtime_synced_file()).ok()?;
    serde_json::from_str(&text).ok()
}

/// The hidden command: runs until killed.
pub fn serve_runtime(ctx: &Ctx) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(ctx))
}

fn trigger<K>(client: &Client, tx: tokio::sync::mpsc::Sender<()>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    let api: Api<K> = Api::all(client.clone());
    tokio::spawn(async move {
        let mut events = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(ev) = events.next().await {
            match ev {
                Ok(_) => {
                    let _ = tx.try_send(());
                }
                Err(e) => eprintln!("watch {}: {e}", K::kind(&())),
            }
        }
    });
}

async fn run(ctx: &Ctx) -> Result<()> {
    let client = cluster::client(ctx).await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    trigger::<Deployment>(&client, tx.clone());
    trigger::<Pod>(&client, tx.clone());
    trigger::<Service>(&client, tx.clone());
    trigger::<EndpointSlice>(&client, tx.clone());
    println!("ferry lab {}: runtime started", ctx.prefix);
    let mut last_errors = BTreeMap::new();
    let mut last_failure: Option<String> = None;
    loop {
        match pass(ctx, &client).await {
            Ok(synced) => {
                if last_failure.take().is_some() {
                    eprintln!("{} pass succeeded again", rfc3339(now_secs()));
                }
                if synced.errors != last_errors {
                    for (k, e) in &synced.errors {
                        if last_errors.get(k) != Some(e) {
                            eprintln!("{k}: {e}");
                            warn_event(&client, k, e).await;
                        }
                    }
                    last_errors.clone_from(&synced.errors);
                }
                let text = serde_json::to_string_pretty(&synced)?;
                write_atomic(&ctx.runtime_synced_file(), text.as_bytes())?;
            }
            Err(e) => {
                // Once per distinct failure (the API server stopped: every 500 ms otherwise).
                let text = format!("{e:#}");
                if last_failure.as_deref() != Some(text.as_str()) {
                    eprintln!("{} pass failed (retrying): {text}", rfc3339(now_secs()));
                    last_failure = Some(text);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        }
        // A change, or a resync every 5 s; changes arriving together make one pass.
        let _ = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        while rx.try_recv().is_ok() {}
    }
}

/// A Warning Event on the object the runtime could not run (`kubectl get events`, `kubectl
/// describe`), as a kubelet or controller would record one.
async fn warn_event(client: &Client, key: &str, message: &str) {
    let mut parts = key.splitn(3, '/');
    let (Some(kind), Some(ns), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    let api_version = if kind == "Deployment" {
        "apps/v1"
    } else {
        "v1"
    };
    let now = rfc3339(now_secs());
    let event = json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": format!("{name}."), "namespace": ns},
        "involvedObject": {"apiVersion": api_version, "kind": kind, "namespace": ns, "name": name},
        "reason": "FailedCreate", "type": "Warning", "message": message,
        "source": {"component": "ferry-lab-runtime"},
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
    });
    let api: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), ns);
    let r = match serde_json::from_value(event) {
        Ok(ev) => api.create(&PostParams::default(), &ev).await.map(|_| ()),
        Err(e) => {
            eprintln!("event for {key}: {e}");
            return;
        }
    };
    if let Err(e) = r {
        eprintln!("recording an event for {key}: {e}");
    }
}

fn rv_of<K>(list: &kube::core::ObjectList<K>) -> u64
where
    K: Clone,
{
    list.metadata
        .resource_version
        .as_deref()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn key(kind: &str, ns: &str, name: &str) -> String {
    format!("{kind}/{ns}/{name}")
}

fn ck_message(ck: Ck) -> String {
    ck.errors
        .iter()
        .map(|(f, m)| {
            if f.is_empty() {
                m.clone()
            } else {
                format!("{f}: {m}")
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The Deployment that owns a Pod (by ownerReference).
fn owner_uid(p: &Pod) -> Option<String> {
    p.owner_references()
        .iter()
        .find(|o| o.kind == "Deployment" && o.controller == Some(true))
        .map(|o| o.uid.clone())
}

/// What a lab pod is made from: for a Deployment's pods the template hash, else a hash of the
/// Pod's spec without `nodeName` (which the runtime writes itself).
fn pod_spec_hash(p: &Pod) -> String {
    if owner_uid(p).is_some() {
        if let Some(h) = p.labels().get(TEMPLATE_HASH) {
            return h.clone();
        }
    }
    let mut spec = serde_json::to_value(&p.spec).unwrap_or(Value::Null);
    if let Some(o) = spec.as_object_mut() {
        o.remove("nodeName");
    }
    hash10(&spec.to_string())
}

async fn pass(ctx: &Ctx, client: &Client) -> Result<Synced> {
    let deps_api: Api<Deployment> = Api::all(client.clone());
    let pods_api: Api<Pod> = Api::all(client.clone());
    let svc_api: Api<Service> = Api::all(client.clone());
    let slice_api: Api<EndpointSlice> = Api::all(client.clone());
    let lp = ListParams::default();
    let deps = deps_api.list(&lp).await.context("listing Deployments")?;
    let pods = pods_api.list(&lp).await.context("listing Pods")?;
    let svcs = svc_api.list(&lp).await.context("listing Services")?;
    let slices = slice_api
        .list(&ListParams::default().labels(&format!(
            "endpointslice.kubernetes.io/managed-by={MANAGED_BY}"
        )))
        .await
        .context("listing EndpointSlices")?;
    let rv = [rv_of(&deps), rv_of(&pods), rv_of(&svcs), rv_of(&slices)]
        .into_iter()
        .min()
        .unwrap_or(0);
    let mut errors = BTreeMap::new();
    let st = crate::state::require_state(ctx)?;

    // 1. Deployments -> Pod objects.
    let mut pod_objs: Vec<Pod> = pods.items;
    let dep_uids: BTreeSet<String> = deps.items.iter().filter_map(|d| d.uid()).collect();
    // Pods of Deployments that are gone (the API server has no garbage collector).
    let mut keep = Vec::new();
    for p in pod_objs {
        match owner_uid(&p) {
            Some(uid) if !dep_uids.contains(&uid) => {
                delete_pod_obj(client, &p).await?;
            }
            _ => keep.push(p),
        }
    }
    pod_objs = keep;
    let mut dep_status = Vec::new();
    for d in &deps.items {
        let ns = d.namespace().unwrap_or_default();
        let name = d.name_any();
        let mut ck = Ck::default();
        let parsed = workloads::deployment(&mut ck, d);
        if !ck.errors.is_empty() {
            errors.insert(key("Deployment", &ns, &name), ck_message(ck));
            continue;
        }
        let template = serde_json::to_value(d.spec.as_ref().map(|s| &s.template))?;
        let hash = hash10(&template.to_string());
        let uid = d.uid().unwrap_or_default();
        let (stale, mut current): (Vec<Pod>, Vec<Pod>) = pod_objs
            .iter()
            .filter(|p| owner_uid(p).as_deref() == Some(uid.as_str()))
            .cloned()
            .partition(|p| p.labels().get(TEMPLATE_HASH) != Some(&hash));
        for p in &stale {
            delete_pod_obj(client, p).await?;
        }
        let want = parsed.replicas as usize;
        if current.len() > want {
            let victims = pick_victims(&st, &current, current.len() - want);
            for p in current.iter().filter(|p| victims.contains(&p.name_any())) {
                delete_pod_obj(client, p).await?;
            }
            current.retain(|p| !victims.contains(&p.name_any()));
        }
        let ns_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
        while current.len() < want {
            let pod_name = format!("{name}-{hash}-{}", crate::sys::random_suffix(5));
            let mut labels = parsed.template.labels.clone();
            labels.insert(TEMPLATE_HASH.into(), hash.clone());
            let spec = template.get("spec").cloned().unwrap_or(json!({}));
            let obj: Pod = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": pod_name, "namespace": ns, "labels": labels,
                    "ownerReferences": [{
                        "apiVersion": "apps/v1", "kind": "Deployment", "name": name,
                        "uid": uid, "controller": true, "blockOwnerDeletion": true,
                    }],
                },
                "spec": spec,
            }))?;
            match ns_api.create(&PostParams::default(), &obj).await {
                Ok(p) => current.push(p),
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(e).with_context(|| format!("creating pod {pod_name}")),
            }
        }
        let gone: BTreeSet<String> = stale.iter().map(|p| p.name_any()).collect();
        pod_objs.retain(|p| {
            owner_uid(p).as_deref() != Some(uid.as_str()) || !gone.contains(&p.name_any())
        });
        for p in &current {
            if !pod_objs.iter().any(|o| o.uid() == p.uid()) {
                pod_objs.push(p.clone());
            }
        }
        pod_objs.retain(|p| {
            owner_uid(p).as_deref() != Some(uid.as_str())
                || current.iter().any(|c| c.uid() == p.uid())
        });
        dep_status.push((d.clone(), hash, format!("{ns}/{name}")));
    }

    // 2. Pod objects <-> lab pods.
    let mut want: Vec<(PodSpec, bool)> = Vec::new();
    for p in &pod_objs {
        let ns = p.namespace().unwrap_or_default();
        let name = p.name_any();
        let mut ck = Ck::default();
        let parsed = workloads::pod(&mut ck, p);
        if !ck.errors.is_empty() {
            errors.insert(key("Pod", &ns, &name), ck_message(ck));
            continue;
        }
        if let Some(node) = &parsed.node_name {
            if st.node(node).is_none() {
                errors.insert(
                    key("Pod", &ns, &name),
                    format!(
                        "spec.nodeName: {node:?} is not a node of this lab (nodes: {})",
                        st.node_names().join(", ")
                    ),
                );
                continue;
            }
        }
        let owner = owner_uid(p).and_then(|uid| {
            deps.items
                .iter()
                .find(|d| d.uid().as_deref() == Some(uid.as_str()))
                .map(|d| format!("{ns}/{}", d.name_any()))
        });
        let ready = p.annotations().get(READY_ANNOTATION).map(String::as_str) != Some("false");
        want.push((
            PodSpec {
                name,
                namespace: ns,
                node: parsed.node_name.clone(),
                labels: parsed.meta.labels.clone(),
                ports: port_infos(&parsed.ports),
                owner,
                spec_hash: pod_spec_hash(p),
            },
            ready,
        ));
    }
    let st = sync_lab_pods(ctx, &st, &want, &mut errors)?;

    // 3. Pod nodeName and status, as a kubelet.
    for p in &pod_objs {
        let Some(info) = st
            .pods
            .iter()
            .find(|i| i.name == p.name_any() && Some(&i.namespace) == p.namespace().as_ref())
        else {
            continue;
        };
        write_pod(client, &st, p, info).await?;
    }

    // 4. Deployment status.
    for (d, hash, owner) in &dep_status {
        let mine: Vec<&PodInfo> = st
            .pods
            .iter()
            .filter(|p| p.owner.as_deref() == Some(owner.as_str()))
            .collect();
        let ready = mine.iter().filter(|p| p.ready).count();
        let updated = mine.iter().filter(|p| p.spec_hash == *hash).count();
        let status = json!({
            "observedGeneration": d.metadata.generation.unwrap_or(1),
            "replicas": mine.len(), "updatedReplicas": updated,
            "readyReplicas": ready, "availableReplicas": ready,
            "unavailableReplicas": mine.len() - ready,
        });
        let old = serde_json::to_value(&d.status)?;
        let same = [
            "observedGeneration",
            "replicas",
            "updatedReplicas",
            "readyReplicas",
        ]
        .iter()
        .all(|k| old.get(*k).and_then(Value::as_i64) == status[*k].as_i64())
            && old.get("availableReplicas").and_then(Value::as_i64)
                == status["availableReplicas"].as_i64();
        if !same {
            let api: Api<Deployment> =
                Api::namespaced(client.clone(), &d.namespace().unwrap_or_default());
            let patch = json!({"status": status});
            api.patch_status(
                &d.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .with_context(|| format!("writing the status of deployment {}", d.name_any()))?;
        }
    }

    // 5. EndpointSlices.
    let mut wanted: BTreeSet<(String, String)> = BTreeSet::new();
    for s in &svcs.items {
        let ns = s.namespace().unwrap_or_default();
        let name = s.name_any();
        let has_selector = s
            .spec
            .as_ref()
            .and_then(|sp| sp.selector.as_ref())
            .is_some_and(|sel| !sel.is_empty());
        if !has_selector {
            continue;
        }
        let model = match model_service(s) {
            Ok(m) => m,
            Err(e) => {
                errors.insert(key("Service", &ns, &name), e);
                continue;
            }
        };
        for doc in slice_docs(&model, &st.pods, &st.nodes, MANAGED_BY) {
            let mut v = serde_json::to_value(&doc)?;
            v["metadata"]["ownerReferences"] = json!([{
                "apiVersion": "v1", "kind": "Service", "name": name,
                "uid": s.uid().unwrap_or_default(), "controller": true,
                "blockOwnerDeletion": true,
            }]);
            let slice_name = doc.metadata.name.clone();
            wanted.insert((ns.clone(), slice_name.clone()));
            let old = slices
                .items
                .iter()
                .find(|o| o.name_any() == slice_name && o.namespace().as_deref() == Some(&ns));
            if let Some(old) = old {
                let old = serde_json::to_value(old)?;
                let same = ["endpoints", "ports", "addressType"]
                    .iter()
                    .all(|k| normalize(old.get(*k)) == normalize(v.get(*k)))
                    && old["metadata"]["labels"] == v["metadata"]["labels"]
                    && old["metadata"]["ownerReferences"] == v["metadata"]["ownerReferences"];
                if same {
                    continue;
                }
            }
            let api: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
            let obj: EndpointSlice = serde_json::from_value(v)?;
            let r = if old.is_some() {
                api.replace(&slice_name, &PostParams::default(), &obj).await
            } else {
                api.create(&PostParams::default(), &obj).await
            };
            r.with_context(|| format!("writing EndpointSlice {ns}/{slice_name}"))?;
        }
    }
    for old in &slices.items {
        let ns = old.namespace().unwrap_or_default();
        if !wanted.contains(&(ns.clone(), old.name_any())) {
            let api: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
            match api.delete(&old.name_any(), &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e).context("deleting an EndpointSlice"),
            }
        }
    }
    Ok(Synced {
        resource_version: rv,
        errors,
        at: now_secs(),
    })
}

/// Empty lists and missing fields compare alike (the API drops neither, serde may).
fn normalize(v: Option<&Value>) -> Value {
    match v {
        None | Some(Value::Null) => json!([]),
        Some(Value::Object(o)) => Value::Object(
            o.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), normalize(Some(v))))
                .collect(),
        ),
        Some(Value::Array(a)) => Value::Array(a.iter().map(|x| normalize(Some(x))).collect()),
        Some(other) => other.clone(),
    }
}

/// A Service from the API read as ferry reads a manifest.
fn model_service(s: &Service) -> std::result::Result<ModelService, String> {
    let raw = RawObject {
        file: "<api>".into(),
        doc_index: 0,
        base: String::new(),
        kind: "Service".into(),
        api_version: "v1".into(),
        value: serde_json::to_value(s).map_err(|e| e.to_string())?,
    };
    let parsed = parse_object(&raw);
    if !parsed.errors.is_empty() {
        return Err(parsed
            .errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "));
    }
    match parsed.objects.into_iter().next() {
        Some(Object::Service(m)) => Ok(m),
        _ => Err("not read as a Service".into()),
    }
}

async fn delete_pod_obj(client: &Client, p: &Pod) -> Result<()> {
    let api: Api<Pod> = Api::namespaced(client.clone(), &p.namespace().unwrap_or_default());
    match api.delete(&p.name_any(), &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting pod {}", p.name_any())),
    }
}

/// `n` pods to remove when scaling down: from the node running most of them, the newest (as
/// the manifest-mode lab does).
fn pick_victims(st: &LabState, current: &[Pod], n: usize) -> Vec<String> {
    let mut victims: Vec<String> = Vec::new();
    for _ in 0..n {
        let left: Vec<(&str, String, u64)> = current
            .iter()
            .filter(|p| !victims.contains(&p.name_any()))
            .map(|p| {
                let info = st.pod(&p.name_any());
                (
                    info.map_or("", |i| i.node.as_str()),
                    p.name_any(),
                    info.map_or(u64::MAX, |i| i.created),
                )
            })
            .collect();
        let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
        for (node, _, _) in &left {
            *per_node.entry(node).or_default() += 1;
        }
        let Some(pick) = left
            .iter()
            .max_by_key(|(node, name, created)| {
                (per_node.get(node).copied(), *created, name.clone())
            })
            .map(|(_, name, _)| name.clone())
        else {
            break;
        };
        victims.push(pick);
    }
    victims
}

/// Makes lab pods match `want` (create, remove, relabel, readiness); takes the lab lock only
/// when something changes. Returns the lab state after.
fn sync_lab_pods(
    ctx: &Ctx,
    st: &LabState,
    want: &[(PodSpec, bool)],
    errors: &mut BTreeMap<String, String>,
) -> Result<LabState> {
    let differs = |st: &LabState| {
        st.pods.len() != want.len()
            || want.iter().any(|(w, ready)| {
                st.pod(&w.name).is_none_or(|p| {
                    p.namespace != w.namespace
                        || p.spec_hash != w.spec_hash
                        || p.labels != w.labels
                        || p.ready != *ready
                        || p.owner != w.owner
                        || w.node.as_ref().is_some_and(|n| *n != p.node)
                })
            })
    };
    if !differs(st) {
        return Ok(st.clone());
    }
    let _lock = LabLock::acquire(ctx)?;
    let Some(mut st) = load_state(ctx)? else {
        anyhow::bail!("lab.json is gone (the lab is going down)");
    };
    let stale: Vec<String> = st
        .pods
        .iter()
        .filter(|p| {
            !want.iter().any(|(w, _)| {
                w.name == p.name
                    && w.namespace == p.namespace
                    && w.spec_hash == p.spec_hash
                    && w.node.as_ref().is_none_or(|n| *n == p.node)
            })
        })
        .map(|p| p.name.clone())
        .collect();
    let r = delete_pods(ctx, &mut st, &stale);
    save_state(ctx, &st)?;
    r?;
    for (w, ready) in want {
        if let Some(p) = st.pods.iter_mut().find(|p| p.name == w.name) {
            p.labels.clone_from(&w.labels);
            p.ready = *ready;
            p.owner.clone_from(&w.owner);
        }
    }
    let new: Vec<&(PodSpec, bool)> = want
        .iter()
        .filter(|(w, _)| st.pod(&w.name).is_none())
        .collect();
    for (spec, ready) in new {
        // One at a time: a pod that cannot be made does not hold up the others.
        match create_pods(ctx, &mut st, std::slice::from_ref(spec)) {
            Ok(_) => {
                if let Some(p) = st.pods.iter_mut().find(|p| p.name == spec.name) {
                    p.ready = *ready;
                }
            }
            Err(e) => {
                errors.insert(
                    key("Pod", &spec.namespace, &spec.name),
                    format!("making the lab pod: {e:#}"),
                );
            }
        }
    }
    save_state(ctx, &st)?;
    Ok(st)
}

/// Writes a Pod's nodeName and status from its lab pod, when they differ.
async fn write_pod(client: &Client, st: &LabState, p: &Pod, info: &PodInfo) -> Result<()> {
    let api: Api<Pod> = Api::namespaced(client.clone(), &info.namespace);
    let name = info.name.clone();
    if p.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(info.node.as_str()) {
        let patch = json!({"spec": {"nodeName": info.node}});
        let r = api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await;
        gone_is_fine(r).with_context(|| format!("writing spec.nodeName of pod {name}"))?;
    }
    let alive = info.pid.is_some_and(crate::sys::pid_alive);
    let ready = info.ready && alive;
    let phase = if alive { "Running" } else { "Failed" };
    let host_ip = st
        .node(&info.node)
        .map(|n| n.ip.to_string())
        .unwrap_or_default();
    let old = p.status.as_ref();
    let old_ready = old
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status == "True");
    if old.and_then(|s| s.phase.as_deref()) == Some(phase)
        && old.and_then(|s| s.pod_ip.as_deref()) == Some(info.ip.to_string().as_str())
        && old.and_then(|s| s.host_ip.as_deref()) == Some(host_ip.as_str())
        && old_ready == Some(ready)
    {
        return Ok(());
    }
    let now = rfc3339(now_secs());
    let started = rfc3339(info.created);
    let flag = |b: bool| if b { "True" } else { "False" };
    let cond = |t: &str, b: bool| json!({"type": t, "status": flag(b), "lastTransitionTime": now, "lastProbeTime": null});
    let status = json!({
        "phase": phase,
        "podIP": info.ip.to_string(), "podIPs": [{"ip": info.ip.to_string()}],
        "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
        "startTime": started,
        "conditions": [
            cond("PodScheduled", true), cond("Initialized", true),
            cond("ContainersReady", ready), cond("Ready", ready),
        ],
    });
    let mut status = status;
    let containers: Vec<Value> = p
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|c| {
            json!({
                "name": c.name, "ready": ready, "started": alive, "restartCount": 0,
                "image": c.image.clone().unwrap_or_default(), "imageID": "",
                "containerID": format!("ferry-lab://{}", info.pid.unwrap_or(0)),
                "state": if alive {
                    json!({"running": {"startedAt": started}})
                } else {
                    json!({"terminated": {"exitCode": 1, "reason": "Error"}})
                },
            })
        })
        .collect();
    status["containerStatuses"] = Value::Array(containers);
    let patch = json!({"status": status});
    let r = api
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await;
    gone_is_fine(r).with_context(|| format!("writing the status of pod {name}"))?;
    Ok(())
}

/// An object deleted since the pass listed it is no error: the next pass sees it gone.
fn gone_is_fine<T>(r: kube::Result<T>) -> kube::Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(v: Value) -> Pod {
        serde_json::from_value(v).expect("pod")
    }

    #[test]
    fn spec_hash_ignores_the_node_the_lab_wrote() {
        let a = pod(json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}}));
        let b = pod(json!({"metadata": {"name": "p"},
            "spec": {"nodeName": "n1", "containers": [{"name": "c"}]}}));
        let c = pod(json!({"metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 80}]}]}}));
        assert_eq!(pod_spec_hash(&a), pod_spec_hash(&b));
        assert_ne!(pod_spec_hash(&a), pod_spec_hash(&c));
        // A Deployment's pod: its template hash.
        let d = pod(
            json!({"metadata": {"name": "p", "labels": {"pod-template-hash": "abc"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "d",
                                 "uid": "u", "controller": true}]},
            "spec": {"containers": [{"name": "c"}]}}),
        );
        assert_eq!(pod_spec_hash(&d), "abc");
        assert_eq!(owner_uid(&d).as_deref(), Some("u"));
        assert_eq!(owner_uid(&a), None);
    }

    #[test]
    fn normalized_comparison() {
        assert_eq!(normalize(None), normalize(Some(&json!([]))));
        assert_eq!(
            normalize(Some(&json!({"a": 1, "b": null}))),
            normalize(Some(&json!({"a": 1})))
        );
        assert_ne!(
            normalize(Some(&json!([{"a": 1}]))),
            normalize(Some(&json!([{"a": 2}])))
        );
    }

    #[test]
    fn services_from_the_api_read_as_manifests() {
        let s: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"selector": {"app": "web"}, "clusterIP": "10.43.1.1",
                     "ports": [{"port": 80, "targetPort": "http", "protocol": "TCP"}]},
        }))
        .unwrap();
        let m = model_service(&s).unwrap();
        assert_eq!(m.meta.name, "web");
        assert_eq!(m.selector.get("app").map(String::as_str), Some("web"));
        let bad: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"ports": [{"port": 0}]},
        }))
        .unwrap();
        assert!(model_service(&bad).unwrap_err().contains("port"));
    }
}
