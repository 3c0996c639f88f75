//! The HTTP side: routing, discovery, the verbs, and watch streams (hyper 1 on tokio).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};

use crate::error::ApiError;
use crate::events::{from_storage, storage_of, to_storage};
use crate::patch::{self, PatchType};
use crate::resources::{self, Resource};
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{Event, EventType, Part, Store, WatchStart};
use crate::table;

/// The response body: a whole JSON document, or a watch stream.
pub type Body = BoxBody<Bytes, Infallible>;

/// Largest request body accepted (kube-apiserver's limit is 3 MiB too).
const MAX_BODY: usize = 3 * 1024 * 1024;

/// Server settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Events kept for watches that resume from a resourceVersion.
    pub history: usize,
    /// How often a watch with `allowWatchBookmarks=true` gets a BOOKMARK.
    pub bookmark_interval: Duration,
    /// Watch length when the client gives no `timeoutSeconds`.
    pub default_watch_timeout: Duration,
    /// Service CIDR and node-port range for Services.
    pub services: crate::service::ServiceConfig,
    /// Keep the objects in this file across restarts (see [`Store::open`]).
    pub state: Option<std::path::PathBuf>,
    /// RBAC for clients with a bearer token (see [`crate::authz`]).
    pub authz: Option<Arc<crate::authz::Authorizer>>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            history: 1000,
            bookmark_interval: Duration::from_secs(10),
            default_watch_timeout: Duration::from_secs(1800),
            services: crate::service::ServiceConfig::default(),
            state: None,
            authz: None,
        }
    }
}

/// The API server: a store and its settings.
pub struct ApiServer {
    pub store: Store,
    pub config: Config,
}

impl ApiServer {
    /// A server with the namespaces a fresh cluster has (`default`, `kube-system`,
    /// `kube-public`, `kube-node-lease`).
    ///
    /// With `config.state`, the objects are loaded from and saved to that file; reading a
    /// state file that exists but is not valid is an error.
    pub fn new(config: Config) -> Result<Arc<Self>, String> {
        let store = match &config.state {
            Some(path) => Store::open(config.history, config.services.clone(), path)?,
            None => Store::with_services(config.history, config.services.clone()),
        };
        if let Some(ns) = resources::find("", "v1", "namespaces") {
            for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
                // Already there when loaded from a state file.
                let _ = store.create(ns, "", json!({"metadata": {"name": name}}));
            }
        }
        Ok(Arc::new(ApiServer { store, config }))
    }
}

/// Serves connections from `listener` until the future is dropped.
pub async fn serve(listener: tokio::net::TcpListener, server: Arc<ApiServer>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: not a reason to stop serving.
                eprintln!("ferry-apiserver: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let server = server.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(handle(server, req).await) }
            });
            // A client going away mid-request is not the server's problem.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// A kubeconfig for a server at `url` (plain HTTP, no credentials), namespace `default`.
pub fn kubeconfig(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: ferry-lab\n  cluster:\n    server: {url}\n\
         users:\n- name: ferry-lab\n  user: {{}}\ncontexts:\n- name: ferry-lab\n  context:\n    \
         cluster: ferry-lab\n    user: ferry-lab\n    namespace: default\ncurrent-context: ferry-lab\n"
    )
}

fn full(status: StatusCode, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(bytes)).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn ok(body: &Value) -> Response<Body> {
    full(StatusCode::OK, body)
}

fn error(e: &ApiError) -> Response<Body> {
    full(
        StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &e.to_status(),
    )
}

fn not_found_path(path: &str) -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        format!("the server could not find the requested resource ({path})"),
    )
}

/// Decodes `application/x-www-form-urlencoded` text (`+` and `%XX`).
fn url_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Query {
    params: Vec<(String, String)>,
    /// The client accepts `meta.k8s.io` Tables (`kubectl get`).
    table: bool,
    /// The user a bearer token named (None: the administrator).
    user: Option<String>,
}

impl Query {
    fn parse(q: Option<&str>) -> Self {
        Query {
            table: false,
            user: None,
            params: q
                .unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => (url_decode(k), url_decode(v)),
                    None => (url_decode(p), String::new()),
                })
                .collect(),
        }
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true") | Some("1"))
    }
}

async fn handle(server: Arc<ApiServer>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let mut query = Query::parse(req.uri().query());
    query.table = req
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"));
    let segs: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(url_decode)
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let method = req.method().clone();
    // Who asks: a bearer token this server knows names a user whose requests are checked;
    // no token is the administrator.
    let token = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    let user = match (&server.config.authz, token) {
        (Some(a), Some(t)) => match a.user_of(&t) {
            Some(u) => Some(u.to_string()),
            None => {
                return error(&ApiError::new(401, "Unauthorized", "Unauthorized"));
            }
        },
        _ => None,
    };
    query.user = user;
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return error(&ApiError::new(
                413,
                "RequestEntityTooLarge",
                format!("reading the request body: {e}"),
            ))
        }
    };
    let result = route(&server, &method, &path, &segs, &query, &content_type, &body).await;
    match result {
        Ok(resp) => resp,
        Err(e) => error(&e),
    }
}

async fn route(
    server: &Arc<ApiServer>,
    method: &Method,
    path: &str,
    segs: &[&str],
    query: &Query,
    content_type: &str,
    body: &Bytes,
) -> Result<Response<Body>, ApiError> {
    let get = method == Method::GET;
    match segs {
        ["version"] if get => Ok(ok(&json!({
            "major": "1", "minor": "32", "gitVersion": "v1.32.0-ferry-lab",
            "gitCommit": "", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
            "goVersion": "none", "compiler": "none", "platform": "linux/amd64",
        }))),
        ["healthz"] | ["readyz"] | ["livez"] if get => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"ok")).boxed());
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain"),
            );
            Ok(r)
        }
        ["debug", "ferry", "authz"] if get => {
            let seen = server
                .config
                .authz
                .as_ref()
                .map(|a| a.seen())
                .unwrap_or_default();
            Ok(ok(&json!({"accesses": seen})))
        }
        ["openapi", "v3"] if get => Ok(ok(&resources::openapi_v3_index())),
        ["openapi", "v3", "api", v] if get => resources::openapi_v3_doc("", v)
            .map(|d| ok(&d))
            .ok_or_else(|| not_found_path(path)),
        ["openapi", "v3", "apis", g, v] if get => resources::openapi_v3_doc(g, v)
            .map(|d| ok(&d))
            .ok_or_else(|| not_found_path(path)),
        ["api"] if get => Ok(ok(&json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
        }))),
        ["apis"] if get => {
            let groups: Vec<Value> = resources::groups()
                .iter()
                .map(|(g, vs)| group_json(g, vs))
                .collect();
            Ok(ok(
                &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
            ))
        }
        ["api", v] if get => resources::resource_list("", v)
            .map(|l| ok(&l))
            .ok_or_else(|| not_found_path(path)),
        ["apis", g] if get => resources::groups()
            .iter()
            .find(|(name, _)| name == g)
            .map(|(name, vs)| {
                let mut j = group_json(name, vs);
                j["kind"] = json!("APIGroup");
                j["apiVersion"] = json!("v1");
                ok(&j)
            })
            .ok_or_else(|| not_found_path(path)),
        ["apis", g, v] if get => resources::resource_list(g, v)
            .map(|l| ok(&l))
            .ok_or_else(|| not_found_path(path)),
        ["api", v, rest @ ..] if !rest.is_empty() => {
            resource_request(server, method, path, "", v, rest, query, content_type, body).await
        }
        ["apis", g, v, rest @ ..] if !rest.is_empty() => {
            resource_request(server, method, path, g, v, rest, query, content_type, body).await
        }
        _ => Err(not_found_path(path)),
    }
}

fn group_json(name: &str, versions: &[&str]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
        .collect();
    json!({"name": name, "versions": vs, "preferredVersion": vs.first().cloned().unwrap_or(Value::Null)})
}

fn parse_body(body: &Bytes, what: &str) -> Result<Value, ApiError> {
    match serde_json::from_slice(body) {
        Ok(v) => Ok(v),
        Err(json_err) => {
            // Server-side apply bodies may be YAML.
            let text = std::str::from_utf8(body)
                .map_err(|_| ApiError::bad_request(format!("the {what} is not UTF-8")))?;
            serde_saphyr::from_str::<Value>(text).map_err(|_| {
                ApiError::bad_request(format!("the {what} is not valid JSON: {json_err}"))
            })
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn resource_request(
    server: &Arc<ApiServer>,
    method: &Method,
    path: &str,
    group: &str,
    version: &str,
    rest: &[&str],
    query: &Query,
    content_type: &str,
    body: &Bytes,
) -> Result<Response<Body>, ApiError> {
    let (ns, rest) = match rest {
        ["namespaces", ns, r, tail @ ..] if *r != "status" && *r != "finalize" => {
            let mut v = vec![*r];
            v.extend_from_slice(tail);
            (Some(*ns), v)
        }
        _ => (None, rest.to_vec()),
    };
    let res = resources::find(group, version, rest[0]).ok_or_else(|| not_found_path(path))?;
    if (ns.is_some() && !res.namespaced)
        || (ns.is_none() && res.namespaced && rest.len() > 1)
        || rest.len() > 3
    {
        return Err(not_found_path(path));
    }
    if query.get("dryRun").is_some_and(|d| !d.is_empty()) {
        return Err(ApiError::bad_request(
            "dryRun is not supported by this test double of kube-apiserver",
        ));
    }
    if let (Some(authz), Some(user)) = (&server.config.authz, &query.user) {
        let name = rest.get(1).copied().unwrap_or("");
        let verb = crate::authz::verb(method.as_str(), !name.is_empty(), query.flag("watch"));
        let resource = match rest.get(2) {
            Some(sub) => format!("{}/{sub}", rest[0]),
            None => rest[0].to_string(),
        };
        let access = crate::authz::Access {
            user: user.clone(),
            verb: verb.to_string(),
            group: group.to_string(),
            resource: resource.clone(),
            namespace: ns.unwrap_or("").to_string(),
            name: name.to_string(),
            allowed: false,
        };
        if !authz.check(access) {
            let what = if name.is_empty() {
                format!("{resource}.{group}")
            } else {
                format!("{resource}.{group} {name:?}")
            };
            let scope = match ns {
                Some(ns) => format!("in the namespace {ns:?}"),
                None => "at the cluster scope".to_string(),
            };
            return Err(ApiError::new(
                403,
                "Forbidden",
                format!(
                    "{what} is forbidden: User {user:?} cannot {verb} resource {:?} in API group {group:?} {scope}",
                    rest[0]
                ),
            ));
        }
    }
    let store = &server.store;
    // Where the objects live (core/v1 Events are stored as events.k8s.io/v1 Events).
    let sres = storage_of(res);
    let namespace = ns.unwrap_or("");
    if rest.get(2) == Some(&"scale") && resources::has_scale(res) {
        return scale_request(server, res, namespace, rest[1], method, content_type, body);
    }
    let part = match rest.get(2) {
        None => Part::Main,
        Some(&"status") if res.status => Part::Status,
        Some(_) => return Err(not_found_path(path)),
    };
    match (rest.len(), method.clone()) {
        (1, Method::GET) => {
            let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or(""))
                .map_err(ApiError::bad_request)?;
            let fields = FieldSelector::parse(query.get("fieldSelector").unwrap_or(""))
                .map_err(ApiError::bad_request)?;
            if query.flag("watch") {
                return watch(server, res, ns, labels, fields, query);
            }
            let (items, rv) = store.list(sres, ns, &|o| {
                let o = from_storage(res, o.clone());
                labels.matches(&o) && fields.matches(&o)
            });
            let items: Vec<Value> = items.into_iter().map(|o| from_storage(res, o)).collect();
            if query.table {
                return Ok(ok(&table::table(res, &items, Some(rv), true)));
            }
            Ok(ok(&json!({
                "kind": format!("{}List", res.kind),
                "apiVersion": res.api_version(),
                "metadata": {"resourceVersion": rv.to_string()},
                "items": items,
            })))
        }
        (1, Method::POST) => {
            if res.namespaced && ns.is_none() {
                return Err(ApiError::method_not_allowed(format!(
                    "POST {path}: {} are namespaced; post to /namespaces/<ns>/{}",
                    res.resource, res.resource
                )));
            }
            let obj = parse_body(body, &format!("body of the new {}", res.kind))?;
            store
                .create(sres, namespace, to_storage(res, obj))
                .map(|o| full(StatusCode::CREATED, &from_storage(res, o)))
        }
        (2, Method::GET) | (3, Method::GET) => {
            let o = from_storage(res, store.get(sres, namespace, rest[1])?);
            if query.table {
                return Ok(ok(&table::table(res, &[o], None, true)));
            }
            Ok(ok(&o))
        }
        (2, Method::PUT) | (3, Method::PUT) => {
            let obj = parse_body(body, &format!("body of {} {:?}", res.kind, rest[1]))?;
            store
                .update(sres, namespace, rest[1], to_storage(res, obj), part)
                .map(|o| ok(&from_storage(res, o)))
        }
        (2, Method::PATCH) | (3, Method::PATCH) => patch_request(
            server,
            res,
            namespace,
            rest[1],
            part,
            query,
            content_type,
            body,
        ),
        (2, Method::DELETE) => {
            let opts = if body.is_empty() {
                Value::Null
            } else {
                parse_body(body, "DeleteOptions")?
            };
            let pre = opts
                .pointer("/preconditions/resourceVersion")
                .and_then(Value::as_str);
            store
                .delete(sres, namespace, rest[1], pre)
                .map(|o| ok(&from_storage(res, o)))
        }
        _ => Err(ApiError::method_not_allowed(format!(
            "{method} is not supported on {path}"
        ))),
    }
}

#[allow(clippy::too_many_arguments)]
fn patch_request(
    server: &Arc<ApiServer>,
    res: &'static Resource,
    namespace: &str,
    name: &str,
    part: Part,
    query: &Query,
    content_type: &str,
    body: &Bytes,
) -> Result<Response<Body>, ApiError> {
    let pt = PatchType::from_content_type(content_type)
        .ok_or_else(|| ApiError::unsupported_media_type(content_type))?;
    if pt == PatchType::Strategic && !res.builtin {
        // As kube-apiserver: custom resources take no strategic merge patch.
        return Err(ApiError::unsupported_media_type(content_type));
    }
    let p = parse_body(body, &format!("patch of {} {name:?}", res.kind))?;
    let store = &server.store;
    let what = |e: String| ApiError::invalid(res.group, res.resource, name, e);
    let sres = storage_of(res);
    // Patches apply to the object in the form the client addressed.
    let patched = |old: &Value, f: &dyn Fn(&Value) -> Result<Value, String>| {
        f(&from_storage(res, old.clone()))
            .map(|v| to_storage(res, v))
            .map_err(what)
    };
    if pt == PatchType::Apply {
        if query.get("fieldManager").is_none_or(str::is_empty) {
            return Err(ApiError::bad_request(
                "PATCH with application/apply-patch+yaml requires the fieldManager parameter",
            ));
        }
        return match store.get(sres, namespace, name) {
            Err(e) if e.code == 404 => {
                let mut obj = p;
                if obj.pointer("/metadata/name").is_none() {
                    return Err(what("metadata.name: Required value".into()));
                }
                if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                    m.remove("resourceVersion");
                }
                store
                    .create(sres, namespace, to_storage(res, obj))
                    .map(|o| full(StatusCode::CREATED, &from_storage(res, o)))
            }
            Err(e) => Err(e),
            Ok(_) => store
                .update_with(sres, namespace, name, part, |old| {
                    patched(old, &|cur| {
                        if res.builtin {
                            patch::strategic_merge_patch(cur, &p)
                        } else {
                            patch::merge_patch(cur, &p)
                        }
                    })
                })
                .map(|o| ok(&from_storage(res, o))),
        };
    }
    store
        .update_with(sres, namespace, name, part, |old| {
            patched(old, &|cur| match pt {
                PatchType::Json => patch::json_patch(cur, &p),
                PatchType::Merge => patch::merge_patch(cur, &p),
                PatchType::Strategic | PatchType::Apply => patch::strategic_merge_patch(cur, &p),
            })
        })
        .map(|o| ok(&from_storage(res, o)))
}

/// The autoscaling/v1 Scale of a Deployment: `spec.replicas`, and in status the replicas and
/// the selector (as kube-apiserver's deployments/scale).
fn scale_of(o: &Value) -> Value {
    let selector: Vec<String> = o
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    let mut meta = serde_json::Map::new();
    for f in [
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "creationTimestamp",
    ] {
        if let Some(v) = o.pointer(&format!("/metadata/{f}")) {
            meta.insert(f.into(), v.clone());
        }
    }
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": meta,
        "spec": {"replicas": o.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1)},
        "status": {
            "replicas": o.pointer("/status/replicas").and_then(Value::as_i64).unwrap_or(0),
            "selector": selector.join(","),
        },
    })
}

/// The new Scale from the current one.
type ScaleFn<'a> = Box<dyn Fn(&Value) -> Result<Value, ApiError> + 'a>;

/// GET, PUT and PATCH on `deployments/NAME/scale` (`kubectl scale`): a write sets the
/// Deployment's `spec.replicas`.
fn scale_request(
    server: &Arc<ApiServer>,
    res: &'static Resource,
    namespace: &str,
    name: &str,
    method: &Method,
    content_type: &str,
    body: &Bytes,
) -> Result<Response<Body>, ApiError> {
    let store = &server.store;
    let what = |e: String| ApiError::invalid(res.group, res.resource, name, e);
    let new_scale: ScaleFn<'_> = match *method {
        Method::GET => return Ok(ok(&scale_of(&store.get(res, namespace, name)?))),
        Method::PUT => {
            let p = parse_body(body, &format!("Scale of {} {name:?}", res.kind))?;
            Box::new(move |_| Ok(p.clone()))
        }
        Method::PATCH => {
            let pt = PatchType::from_content_type(content_type)
                .ok_or_else(|| ApiError::unsupported_media_type(content_type))?;
            let p = parse_body(
                body,
                &format!("patch of the Scale of {} {name:?}", res.kind),
            )?;
            Box::new(move |cur| {
                match pt {
                    PatchType::Json => patch::json_patch(cur, &p),
                    _ => patch::merge_patch(cur, &p),
                }
                .map_err(what)
            })
        }
        _ => {
            return Err(ApiError::method_not_allowed(format!(
                "{method} is not supported on the scale subresource"
            )))
        }
    };
    store
        .update_with(res, namespace, name, Part::Main, |old| {
            let scale = new_scale(&scale_of(old))?;
            let replicas = scale
                .pointer("/spec/replicas")
                .and_then(Value::as_i64)
                .filter(|r| (0..=i64::from(i32::MAX)).contains(r))
                .ok_or_else(|| what("spec.replicas: Invalid value: must be 0 or more".into()))?;
            let mut new = old.clone();
            new["spec"]["replicas"] = json!(replicas);
            Ok(new)
        })
        .map(|o| ok(&scale_of(&o)))
}

/// A body fed by a channel: each message is one chunk of a watch stream.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn line(kind: &str, object: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

fn stream_response(rx: mpsc::Receiver<Bytes>) -> Response<Body> {
    let mut resp = Response::new(ChannelBody(rx).boxed());
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// What a watcher with these selectors sees of one event, if anything.
fn view(
    res: &Resource,
    ev: &Event,
    labels: &LabelSelector,
    fields: &FieldSelector,
) -> Option<&'static str> {
    let m = |o: &Value| {
        let o = from_storage(res, o.clone());
        labels.matches(&o) && fields.matches(&o)
    };
    let now = m(&ev.object);
    match ev.kind {
        EventType::Added | EventType::Deleted => now.then(|| ev.kind.as_str()),
        EventType::Modified => match (ev.prev.as_ref().is_some_and(m), now) {
            (true, true) => Some("MODIFIED"),
            (false, true) => Some("ADDED"),
            (true, false) => Some("DELETED"),
            (false, false) => None,
        },
    }
}

fn watch(
    server: &Arc<ApiServer>,
    res: &'static Resource,
    ns: Option<&str>,
    labels: LabelSelector,
    fields: FieldSelector,
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    let since = match query.get("resourceVersion") {
        None | Some("") | Some("0") => None,
        Some(s) => Some(s.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!(
                "resourceVersion: Invalid value: {s:?}: must be an unsigned integer"
            ))
        })?),
    };
    let timeout = match query.get("timeoutSeconds") {
        None | Some("") => server.config.default_watch_timeout,
        Some(s) => Duration::from_secs(s.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!(
                "timeoutSeconds: Invalid value: {s:?}: must be an unsigned integer"
            ))
        })?),
    };
    let bookmarks = query.flag("allowWatchBookmarks");
    let as_table = query.table;
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let sres = storage_of(res);
    let (start, mut events) = match server.store.watch(sres, ns, since) {
        Ok(x) => x,
        Err(e) if e.code == 410 => {
            // As kube-apiserver: HTTP 200 and one ERROR event.
            let _ = tx.try_send(line("ERROR", &e.to_status()));
            drop(tx);
            return Ok(stream_response(rx));
        }
        Err(e) => return Err(e),
    };
    let ns = ns.map(str::to_string);
    let interval = server.config.bookmark_interval;
    tokio::spawn(async move {
        let mut first = true;
        let mut encode = move |kind: &str, o: &Value| {
            if kind == "BOOKMARK" {
                return line(kind, o);
            }
            let o = from_storage(res, o.clone());
            if as_table {
                let t = table::table(res, std::slice::from_ref(&o), None, first);
                first = false;
                line(kind, &t)
            } else {
                line(kind, &o)
            }
        };
        let in_scope = |ev: &Event| {
            ev.key.group == sres.group
                && ev.key.version == sres.version
                && ev.key.resource == sres.resource
                && ns.as_ref().is_none_or(|n| *n == ev.key.namespace)
        };
        let mut seen = match start {
            WatchStart::Snapshot { objects, rv } => {
                for o in objects.iter().filter(|o| {
                    let c = from_storage(res, (*o).clone());
                    labels.matches(&c) && fields.matches(&c)
                }) {
                    if tx.send(encode("ADDED", o)).await.is_err() {
                        return;
                    }
                }
                rv
            }
            WatchStart::Replay { events, rv } => {
                for ev in events {
                    if let Some(kind) = view(res, &ev, &labels, &fields) {
                        if tx.send(encode(kind, &ev.object)).await.is_err() {
                            return;
                        }
                    }
                }
                rv
            }
        };
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = tx.closed() => return,
                ev = events.recv() => match ev {
                    Ok(ev) => {
                        if ev.rv <= seen { continue; }
                        seen = ev.rv;
                        if !in_scope(&ev) { continue; }
                        if let Some(kind) = view(res, &ev, &labels, &fields) {
                            if tx.send(encode(kind, &ev.object)).await.is_err() { return; }
                        }
                    }
                    // Too far behind, or the server is going away: end the watch, the client re-watches.
                    Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    let bm = json!({
                        "kind": res.kind,
                        "apiVersion": res.api_version(),
                        "metadata": {"resourceVersion": seen.to_string()},
                    });
                    if tx.send(encode("BOOKMARK", &bm)).await.is_err() { return; }
                }
            }
        }
    });
    Ok(stream_response(rx))
}

/// A server running on its own thread (with its own tokio runtime); stops when dropped.
pub struct Running {
    addr: SocketAddr,
    server: Arc<ApiServer>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Binds `addr` (port 0 picks a free port) and serves on a background thread.
    pub fn start(addr: SocketAddr, config: Config) -> std::io::Result<Running> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let server = ApiServer::new(config).map_err(std::io::Error::other)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let s = server.clone();
        let thread = std::thread::Builder::new()
            .name("ferry-apiserver".into())
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    tokio::select! {
                        _ = serve(listener, s) => {}
                        _ = stopped => {}
                    }
                });
                rt.shutdown_timeout(Duration::from_secs(1));
            })?;
        Ok(Running {
            addr,
            server,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn server(&self) -> &Arc<ApiServer> {
        &self.server
    }

    /// Writes a kubeconfig pointing at this server.
    pub fn write_kubeconfig(&self, path: &std::path::Path) -> std::io::Result<()> {
        std::fs::write(path, kubeconfig(&self.url()))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_decoding() {
        assert_eq!(
            url_decode("app%3Dweb%2Ctier+in+(a%2Cb)"),
            "app=web,tier in (a,b)"
        );
        assert_eq!(url_decode("100%"), "100%");
        assert_eq!(url_decode("%zz"), "%zz");
        assert_eq!(url_decode("%\u{e9}x"), "%\u{e9}x");
        let q = Query::parse(Some("watch=1&labelSelector=a%3Db&x"));
        assert!(q.flag("watch"));
        assert_eq!(q.get("labelSelector"), Some("a=b"));
        assert_eq!(q.get("x"), Some(""));
    }
}
