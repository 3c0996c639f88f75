//! `ferry lab apply/delete/get/set-ready` in a lab with an API server: through the API, as
//! kubectl would, then (for the kinds the lab runtime acts on) waiting until the runtime has
//! caught up, so that a Deployment's pods exist when `apply` returns, as in manifest mode.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::Client;
use serde_json::{json, Value};

use crate::cluster::{block_on, client};
use crate::get::{table, NsFilter};
use crate::manifests::{typed, Doc, Report, Typed};
use crate::runtime::{read_synced, READY_ANNOTATION};
use crate::state::{Ctx, LabState};
use crate::workloads::Workload;

/// Kinds whose changes the lab runtime acts on (and `apply` waits for).
const RUNTIME_KINDS: [&str; 4] = ["Deployment", "Pod", "Service", "EndpointSlice"];

/// How long `apply` waits for the runtime.
const SYNC_TIMEOUT: Duration = Duration::from_secs(90);

/// The API resource of a kind, from the lab API server's own table; and whether it is
/// namespaced.
pub fn api_resource(api_version: &str, kind: &str) -> Option<(ApiResource, bool)> {
    let r = ferry_apiserver::resources::RESOURCES
        .iter()
        .find(|r| r.api_version() == api_version && r.kind == kind)?;
    let gvk = GroupVersionKind::gvk(r.group, r.version, r.kind);
    Some((
        ApiResource::from_gvk_with_plural(&gvk, r.resource),
        r.namespaced,
    ))
}

fn dyn_api(client: &Client, doc: &Doc) -> Result<Api<DynamicObject>> {
    let Some((ar, namespaced)) = api_resource(&doc.api_version, &doc.kind) else {
        bail!(
            "{}: no matches for kind {:?} in version {:?} (the lab API server does not serve it)",
            doc.at(),
            doc.kind,
            doc.api_version
        );
    };
    Ok(if namespaced {
        Api::namespaced_with(client.clone(), &doc.namespace, &ar)
    } else {
        Api::all_with(client.clone(), &ar)
    })
}

fn rv(obj: &DynamicObject) -> u64 {
    obj.metadata
        .resource_version
        .as_deref()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

/// The checks manifest mode makes before running a Deployment or Pod.
fn check(st: &LabState, doc: &Doc) -> Result<()> {
    match typed(doc) {
        Err(e) => bail!("{e}"),
        Ok(Some(Typed::Workload(Workload::Pod(p)))) => {
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
            if let Some(old) = st.pod(&doc.name) {
                if let Some(owner) = &old.owner {
                    bail!(
                        "{}: pod {} belongs to deployment {owner}; change the Deployment instead",
                        doc.at(),
                        doc.name
                    );
                }
            }
            Ok(())
        }
        Ok(None) if doc.kind == "Deployment" || doc.kind == "Pod" => {
            bail!("{}: cannot read this {}", doc.at(), doc.kind)
        }
        Ok(_) => Ok(()),
    }
}

async fn apply_one(client: &Client, doc: &Doc) -> Result<(String, u64)> {
    let api = dyn_api(client, doc)?;
    let mut obj: DynamicObject = serde_json::from_value(doc.value.clone())
        .with_context(|| format!("{}: reading {} {}", doc.at(), doc.kind, doc.name))?;
    if obj.metadata.namespace.is_none() && !doc.namespace.is_empty() {
        obj.metadata.namespace = Some(doc.namespace.clone());
    }
    let name = &doc.name;
    let err = |e: kube::Error| anyhow::anyhow!("{}: {} {name}: {}", doc.at(), doc.kind, api_err(e));
    match api.get_opt(name).await.map_err(err)? {
        None => {
            let made = api
                .create(&PostParams::default(), &obj)
                .await
                .map_err(err)?;
            Ok((format!("{}/{name} created", doc.resource()), rv(&made)))
        }
        Some(old) => {
            obj.metadata.resource_version = None;
            // The node a pod runs on was written by the lab (as by a scheduler).
            if doc.kind == "Pod" && obj.data.pointer("/spec/nodeName").is_none() {
                if let Some(node) = old.data.pointer("/spec/nodeName").cloned() {
                    if let Some(spec) = obj.data.get_mut("spec").and_then(Value::as_object_mut) {
                        spec.insert("nodeName".into(), node);
                    }
                }
            }
            let new = api
                .replace(name, &PostParams::default(), &obj)
                .await
                .map_err(err)?;
            let verb = if rv(&new) == rv(&old) {
                "unchanged"
            } else {
                "configured"
            };
            Ok((format!("{}/{name} {verb}", doc.resource()), rv(&new)))
        }
    }
}

/// kube's error, as kubectl prints one from the server.
fn api_err(e: kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("Error from server ({}): {}", s.reason, s.message),
        other => format!("{other}"),
    }
}

/// Keys (as the runtime reports errors) of what a document makes.
fn keys_of(doc: &Doc) -> Vec<String> {
    let k = format!("{}/{}/{}", doc.kind, doc.namespace, doc.name);
    if doc.kind == "Deployment" {
        vec![k, format!("Pod/{}/{}-", doc.namespace, doc.name)]
    } else {
        vec![k]
    }
}

/// Waits until the runtime has reconciled resourceVersion `rv`; its errors about `keys`.
fn wait_synced(ctx: &Ctx, rv: u64, keys: &[String]) -> Result<Vec<String>> {
    let deadline = Instant::now() + SYNC_TIMEOUT;
    loop {
        if let Some(s) = read_synced(ctx) {
            if s.resource_version >= rv {
                return Ok(s
                    .errors
                    .iter()
                    .filter(|(k, _)| keys.iter().any(|want| k.starts_with(want.as_str())))
                    .map(|(k, e)| format!("{k}: {e}"))
                    .collect());
            }
        }
        if crate::cluster::proc_pid(ctx, crate::cluster::RUNTIME_PROC).is_none() {
            bail!(
                "the lab runtime is not running (see {})",
                ctx.proc_log(crate::cluster::RUNTIME_PROC).display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the lab runtime did not catch up with resourceVersion {rv} within {SYNC_TIMEOUT:?} \
                 (see {})",
                ctx.proc_log(crate::cluster::RUNTIME_PROC).display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until the lab runtime has caught up with everything written so far (after writes
/// made by someone else, e.g. kubectl). At most one resync period longer when the last write
/// was of a kind the runtime does not watch.
pub fn wait_caught_up(ctx: &Ctx) -> Result<()> {
    let rv = block_on(async {
        let client = client(ctx).await?;
        let v = get_raw(&client, "/api/v1/namespaces", false).await?;
        anyhow::Ok(
            v.pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .and_then(|r| r.parse::<u64>().ok())
                .unwrap_or(0),
        )
    })??;
    wait_synced(ctx, rv, &[]).map(|_| ())
}

/// `apply` through the API.
pub fn apply(ctx: &Ctx, st: &LabState, docs: &[Doc]) -> Result<Report> {
    let mut report = Report::default();
    let (max_rv, keys) = block_on(async {
        let client = client(ctx).await?;
        let mut max_rv = 0;
        let mut keys = Vec::new();
        for doc in docs {
            let r = match check(st, doc) {
                Err(e) => Err(e),
                Ok(()) => apply_one(&client, doc).await,
            };
            match r {
                Ok((line, rv)) => {
                    report.lines.push(line);
                    if RUNTIME_KINDS.contains(&doc.kind.as_str()) {
                        max_rv = max_rv.max(rv);
                        keys.extend(keys_of(doc));
                    }
                }
                Err(e) => report.errors.push(format!("{e:#}")),
            }
        }
        anyhow::Ok((max_rv, keys))
    })??;
    if max_rv > 0 {
        report.errors.extend(wait_synced(ctx, max_rv, &keys)?);
    }
    Ok(report)
}

/// `delete` through the API.
pub fn delete(ctx: &Ctx, docs: &[Doc]) -> Result<Report> {
    let mut report = Report::default();
    let max_rv = block_on(async {
        let client = client(ctx).await?;
        let mut max_rv = 0;
        for doc in docs {
            let r: Result<u64> = async {
                let api = dyn_api(&client, doc)?;
                match api.delete(&doc.name, &DeleteParams::default()).await {
                    Ok(either) => Ok(either.left().map_or(0, |o| rv(&o))),
                    Err(kube::Error::Api(e)) if e.code == 404 => bail!(
                        "Error from server (NotFound): {} \"{}\" not found",
                        doc.plural(),
                        doc.name
                    ),
                    Err(e) => bail!("{}", api_err(e)),
                }
            }
            .await;
            match r {
                Ok(rv) => {
                    report
                        .lines
                        .push(format!("{} \"{}\" deleted", doc.resource(), doc.name));
                    if RUNTIME_KINDS.contains(&doc.kind.as_str()) {
                        max_rv = max_rv.max(rv);
                    }
                }
                Err(e) => report.errors.push(format!("{e:#}")),
            }
        }
        anyhow::Ok(max_rv)
    })??;
    if max_rv > 0 {
        wait_synced(ctx, max_rv, &[])?;
    }
    Ok(report)
}

/// `set-ready POD true|false`: the Pod's [`READY_ANNOTATION`], which the runtime turns into the
/// Pod's Ready condition and its endpoints' conditions.
pub fn set_ready(ctx: &Ctx, st: &LabState, pod: &str, ready: bool) -> Result<String> {
    let Some(info) = st.pod(pod) else {
        bail!("Error from server (NotFound): pods \"{pod}\" not found");
    };
    let ns = info.namespace.clone();
    let rv = block_on(async {
        let client = client(ctx).await?;
        let api: Api<DynamicObject> =
            Api::namespaced_with(client, &ns, &api_resource("v1", "Pod").context("pods")?.0);
        let patch = json!({"metadata": {"annotations": {READY_ANNOTATION: ready.to_string()}}});
        let o = api
            .patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| anyhow::anyhow!("{}", api_err(e)))?;
        anyhow::Ok(rv(&o))
    })??;
    wait_synced(ctx, rv, &[])?;
    Ok(format!("pod/{pod} ready={ready}"))
}

async fn get_raw(client: &Client, path: &str, table: bool) -> Result<Value> {
    let mut req = http::Request::get(path).body(Vec::new())?;
    let accept = if table {
        "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
    } else {
        "application/json"
    };
    req.headers_mut()
        .insert(http::header::ACCEPT, http::HeaderValue::from_static(accept));
    let text = client
        .request_text(req)
        .await
        .map_err(|e| anyhow::anyhow!("GET {path}: {}", api_err(e)))?;
    serde_json::from_str(&text).with_context(|| format!("GET {path}: not JSON"))
}

fn list_path(prefix: &str, resource: &str, ns: &NsFilter) -> String {
    match ns {
        NsFilter::All => format!("{prefix}/{resource}"),
        NsFilter::One(n) => format!("{prefix}/namespaces/{n}/{resource}"),
    }
}

/// `get svc` from the API server's Table: kubectl's columns NAME TYPE CLUSTER-IP EXTERNAL-IP
/// PORT(S) AGE (and SELECTOR with `wide`, NAMESPACE first with `-A`). None when empty.
pub fn services_table(ctx: &Ctx, ns: &NsFilter, wide: bool, multi: bool) -> Result<Option<String>> {
    let t = block_on(async {
        let client = client(ctx).await?;
        get_raw(&client, &list_path("/api/v1", "services", ns), true).await
    })??;
    let all = matches!(ns, NsFilter::All);
    let mut header: Vec<String> = Vec::new();
    if all {
        header.push("NAMESPACE".into());
    }
    header.extend(
        t["columnDefinitions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["priority"].as_i64().unwrap_or(0) == 0 || wide)
            .map(|c| c["name"].as_str().unwrap_or("").to_uppercase()),
    );
    let shown: Vec<usize> = t["columnDefinitions"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .filter(|(_, c)| c["priority"].as_i64().unwrap_or(0) == 0 || wide)
        .map(|(i, _)| i)
        .collect();
    if wide {
        header.push("SELECTOR".into());
        header.push("ANNOUNCED-BY".into());
    }
    let announcers = read_announcers(ctx);
    let mut rows = vec![header];
    let mut items: Vec<&Value> = t["rows"].as_array().into_iter().flatten().collect();
    items.sort_by_key(|r| {
        (
            r.pointer("/object/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            r.pointer("/object/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        )
    });
    if items.is_empty() {
        return Ok(None);
    }
    for r in items {
        let cells: Vec<String> = r["cells"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| match c {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect();
        let mut row = Vec::new();
        if all {
            row.push(
                r.pointer("/object/metadata/namespace")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            );
        }
        for (k, i) in shown.iter().enumerate() {
            let cell = cells.get(*i).cloned().unwrap_or_default();
            row.push(if k == 0 && multi {
                format!("service/{cell}")
            } else {
                cell
            });
        }
        if wide {
            let sel: Vec<String> = r
                .pointer("/object/spec/selector")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect();
            row.push(if sel.is_empty() {
                "<none>".into()
            } else {
                sel.join(",")
            });
            let by: Vec<String> = r
                .pointer("/object/status/loadBalancer/ingress")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|i| i["ip"].as_str().and_then(|s| s.parse::<IpAddr>().ok()))
                .flat_map(|ip| announcers.get(&ip).cloned().unwrap_or_default())
                .collect();
            row.push(if by.is_empty() {
                "<none>".into()
            } else {
                by.join(",")
            });
        }
        rows.push(row);
    }
    Ok(Some(table(&rows)))
}

/// Which nodes announce which addresses: the agents' announcement files in the lab's state
/// dir, as `ferry get svc -o wide` reads them for its ANNOUNCED-BY column.
fn read_announcers(ctx: &Ctx) -> std::collections::BTreeMap<IpAddr, Vec<String>> {
    ferry_announce::claims::read(&ctx.state_dir().join("announcements"))
}

/// The Services as a v1 List (what `ferry get svc -o json` prints).
pub fn services_json(ctx: &Ctx, ns: &NsFilter) -> Result<String> {
    let v = block_on(async {
        let client = client(ctx).await?;
        get_raw(&client, &list_path("/api/v1", "services", ns), false).await
    })??;
    let items = v["items"].clone();
    Ok(serde_json::to_string_pretty(&json!({
        "apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""},
        "items": items,
    }))?)
}

/// `get deployments` from the API: NAME READY UP-TO-DATE AVAILABLE AGE (and SELECTOR).
pub fn deployments_table(
    ctx: &Ctx,
    ns: &NsFilter,
    wide: bool,
    multi: bool,
) -> Result<Option<String>> {
    let v = block_on(async {
        let client = client(ctx).await?;
        get_raw(
            &client,
            &list_path("/apis/apps/v1", "deployments", ns),
            false,
        )
        .await
    })??;
    let mut items: Vec<&Value> = v["items"].as_array().into_iter().flatten().collect();
    if items.is_empty() {
        return Ok(None);
    }
    items.sort_by_key(|d| {
        (
            d.pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            d.pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        )
    });
    let all = matches!(ns, NsFilter::All);
    let mut header: Vec<String> = Vec::new();
    if all {
        header.push("NAMESPACE".into());
    }
    header.extend(
        ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]
            .iter()
            .map(|s| s.to_string()),
    );
    if wide {
        header.push("SELECTOR".into());
    }
    let mut rows = vec![header];
    let num = |d: &Value, p: &str| d.pointer(p).and_then(Value::as_i64).unwrap_or(0);
    for d in items {
        let name = d["metadata"]["name"].as_str().unwrap_or("").to_string();
        let mut row = Vec::new();
        if all {
            row.push(
                d["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            );
        }
        row.push(if multi {
            format!("deployment.apps/{name}")
        } else {
            name
        });
        let want = d
            .pointer("/spec/replicas")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        row.push(format!("{}/{want}", num(d, "/status/readyReplicas")));
        row.push(num(d, "/status/updatedReplicas").to_string());
        row.push(num(d, "/status/availableReplicas").to_string());
        row.push(ferry_apiserver::table::age(
            d.pointer("/metadata/creationTimestamp")
                .and_then(Value::as_str)
                .unwrap_or(""),
        ));
        if wide {
            let sel: Vec<String> = d
                .pointer("/spec/selector/matchLabels")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect();
            row.push(sel.join(","));
        }
        rows.push(row);
    }
    Ok(Some(table(&rows)))
}

/// `ferry get ARGS` emulated from the API in an API-mode lab: `svc [-o json|wide] [-A|-n NS]`.
pub fn ferry_get(ctx: &Ctx, args: &[&str]) -> Result<String> {
    let mut it = args.iter();
    let mut what = None;
    let mut output = None;
    let mut ns = NsFilter::One("default".into());
    while let Some(a) = it.next() {
        match *a {
            "-o" | "--output" => output = it.next().copied(),
            "-A" | "--all-namespaces" => ns = NsFilter::All,
            "-n" | "--namespace" => {
                ns = NsFilter::One(it.next().copied().unwrap_or("default").to_string())
            }
            other if what.is_none() => what = Some(other),
            other => bail!("`ferry get {}`: unexpected {other:?}", args.join(" ")),
        }
    }
    if !matches!(what, Some("svc" | "service" | "services")) {
        bail!(
            "`ferry get {}`: in a lab with an API server only `get svc` is served from the API",
            args.join(" ")
        );
    }
    match output {
        Some("json") => services_json(ctx, &ns),
        Some("wide") => Ok(services_table(ctx, &ns, true, false)?.unwrap_or_default()),
        None => Ok(services_table(ctx, &ns, false, false)?.unwrap_or_default()),
        Some(o) => bail!("`ferry get svc -o {o}`: only json and wide"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_of_kinds() {
        let (ar, namespaced) = api_resource("apps/v1", "Deployment").unwrap();
        assert_eq!((ar.plural.as_str(), namespaced), ("deployments", true));
        let (ar, namespaced) = api_resource("v1", "Node").unwrap();
        assert_eq!((ar.plural.as_str(), namespaced), ("nodes", false));
        assert!(api_resource("v1", "Deployment").is_none());
        assert!(api_resource("example.com/v1", "Frob").is_none());
    }

    #[test]
    fn list_paths() {
        assert_eq!(
            list_path("/api/v1", "services", &NsFilter::One("x".into())),
            "/api/v1/namespaces/x/services"
        );
        assert_eq!(
            list_path("/apis/apps/v1", "deployments", &NsFilter::All),
            "/apis/apps/v1/deployments"
        );
    }
}
