//! The Kubernetes API source: one watcher per kind, their objects converted as they arrive,
//! and a [`Snapshot`] of all of them on demand.
//!
//! Each object is converted once, when its event arrives, by the same code that reads a
//! manifest ([`ferry_source::manifest::parse_object`]): the same checks, the same typed
//! k8s-openapi decoding, the same error messages (naming the object and the field, without a
//! file). A bad object only drops that object.
//!
//! A kind is *ready* when its watcher has delivered its first complete list; the source is
//! ready when every kind is. A re-list (after a 410 Expired, or a reconnect) is buffered until
//! it is complete and then replaces the kind's objects at once, so a sync never sees half a
//! list. While the API server is away the objects stay as last seen: nothing on the nodes
//! changes because the control plane restarts. Watchers reconnect with kube-runtime's default
//! backoff (exponential with jitter, at most [`BACKOFF_MAX`] apart).
//!
//! The metallb.io kinds are optional: where their CRDs are not installed (404), the kind
//! counts as ready and empty, and is asked for again with backoff.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ferry_model::{Object, ObjectRef};
use ferry_source::manifest::{parse_object, Parsed, RawObject};
use ferry_source::Snapshot;
use futures::StreamExt;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use serde_json::Value;

/// Longest wait between two attempts to reach the API server.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// kube-proxy's selector: Services (and their slices) meant for another proxy, and headless
/// ones, are not ours to program.
pub const PROXY_LABELS: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// Where MetalLB's configuration lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceConfig {
    /// Namespace of the metallb.io objects (IPAddressPool, L2Advertisement, ...).
    pub metallb_namespace: String,
    /// The legacy ConfigMap, "namespace/name".
    pub metallb_config: ObjectRef,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            metallb_namespace: ferry_model::pools::LEGACY_NAMESPACE.to_string(),
            metallb_config: ObjectRef::new(
                ferry_model::pools::LEGACY_NAMESPACE,
                ferry_model::pools::LEGACY_NAME,
            ),
        }
    }
}

/// One watched kind.
#[derive(Debug, Clone)]
struct Watched {
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    /// Namespace to watch in (None: all).
    namespace: Option<String>,
    labels: Option<&'static str>,
    fields: Option<String>,
    /// A CRD that may not be installed, or a kind the agent may not be allowed to read (an
    /// older Role, Secrets): 404 and 403 count as "none".
    optional: bool,
}

impl Watched {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    fn resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(self.group, self.version, self.kind),
            self.plural,
        )
    }
}

fn watched(cfg: &SourceConfig) -> Vec<Watched> {
    let w = |group, version, kind, plural| Watched {
        group,
        version,
        kind,
        plural,
        namespace: None,
        labels: None,
        fields: None,
        optional: false,
    };
    let metallb = |version, kind, plural| Watched {
        namespace: Some(cfg.metallb_namespace.clone()),
        optional: true,
        ..w("metallb.io", version, kind, plural)
    };
    vec![
        Watched {
            labels: Some(PROXY_LABELS),
            ..w("", "v1", "Service", "services")
        },
        Watched {
            labels: Some(PROXY_LABELS),
            ..w("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices")
        },
        w("", "v1", "Node", "nodes"),
        w("", "v1", "Namespace", "namespaces"),
        Watched {
            namespace: Some(cfg.metallb_config.namespace.clone()),
            fields: Some(format!("metadata.name={}", cfg.metallb_config.name)),
            ..w("", "v1", "ConfigMap", "configmaps")
        },
        metallb("v1beta1", "IPAddressPool", "ipaddresspools"),
        metallb("v1beta1", "L2Advertisement", "l2advertisements"),
        metallb("v1beta2", "BGPPeer", "bgppeers"),
        metallb("v1beta1", "BGPAdvertisement", "bgpadvertisements"),
        metallb("v1beta1", "Community", "communities"),
        metallb("v1beta1", "BFDProfile", "bfdprofiles"),
        // BGPPeers' passwordSecret: MetalLB reads them from its own namespace.
        Watched {
            namespace: Some(cfg.metallb_namespace.clone()),
            optional: true,
            ..w("", "v1", "Secret", "secrets")
        },
    ]
}

/// What one object became.
#[derive(Debug, Clone)]
struct Converted {
    parsed: Parsed,
    /// creationTimestamp in ms since the epoch (a Service's AGE).
    created_ms: Option<u64>,
}

#[derive(Debug, Default)]
struct KindState {
    ready: bool,
    /// The CRD is not installed (404).
    absent: bool,
    objects: BTreeMap<(String, String), Converted>,
    /// A list under way: replaces `objects` when complete.
    relist: Option<BTreeMap<(String, String), Converted>>,
    /// The last error, reported once until it changes.
    last_error: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    kinds: BTreeMap<&'static str, KindState>,
    /// Bumped by every change, so a reader can tell whether anything moved.
    generation: u64,
}

type Notify = Arc<dyn Fn() + Send + Sync>;
type Log = Arc<dyn Fn(String) + Send + Sync>;

struct Shared {
    state: Mutex<State>,
    on_change: Notify,
    log: Log,
    config: SourceConfig,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind: keep going with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The API source: cheap to clone; the watchers run on the tokio runtime it was started on,
/// until every clone is dropped... or the runtime ends.
#[derive(Clone)]
pub struct ApiSource {
    shared: Arc<Shared>,
    _tasks: Arc<Tasks>,
}

struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

impl ApiSource {
    /// Starts one watcher per kind on the current tokio runtime. `on_change` is called (from
    /// the runtime) after every change; `log` gets one line per notable event (errors,
    /// recoveries, missing CRDs).
    pub fn start(
        client: Client,
        config: SourceConfig,
        on_change: impl Fn() + Send + Sync + 'static,
        log: impl Fn(String) + Send + Sync + 'static,
    ) -> ApiSource {
        let kinds = watched(&config);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                kinds: kinds
                    .iter()
                    .map(|k| (k.kind, KindState::default()))
                    .collect(),
                generation: 0,
            }),
            on_change: Arc::new(on_change),
            log: Arc::new(log),
            config,
        });
        let tasks = kinds
            .into_iter()
            .map(|k| tokio::spawn(watch_kind(client.clone(), k, Arc::clone(&shared))))
            .collect();
        ApiSource {
            shared,
            _tasks: Arc::new(Tasks(tasks)),
        }
    }

    /// Whether every kind has delivered its first complete list.
    pub fn ready(&self) -> bool {
        self.shared.lock().kinds.values().all(|k| k.ready)
    }

    /// The kinds still waiting for their first list.
    pub fn waiting_for(&self) -> Vec<&'static str> {
        let st = self.shared.lock();
        st.kinds
            .iter()
            .filter(|(_, k)| !k.ready)
            .map(|(n, _)| *n)
            .collect()
    }

    /// Counts changes: equal generations mean equal snapshots.
    pub fn generation(&self) -> u64 {
        self.shared.lock().generation
    }

    /// How many objects of a kind are held (as last seen).
    pub fn kept(&self, kind: &str) -> usize {
        self.shared
            .lock()
            .kinds
            .get(kind)
            .map_or(0, |k| k.objects.len())
    }

    /// Everything as last seen, in the form the manifest source gives.
    pub fn snapshot(&self) -> Snapshot {
        let st = self.shared.lock();
        let mut snap = Snapshot::default();
        for (kind, ks) in &st.kinds {
            for c in ks.objects.values() {
                for o in &c.parsed.objects {
                    push_object(&mut snap, o.clone(), c.created_ms, kind);
                }
                snap.errors.extend(c.parsed.errors.iter().cloned());
                snap.warnings.extend(c.parsed.warnings.iter().cloned());
            }
        }
        // The legacy ConfigMap under another name is read as if it had MetalLB's name.
        let legacy = &self.shared.config.metallb_config;
        for cm in &mut snap.config_maps {
            if &cm.meta.object_ref() == legacy {
                cm.meta.namespace = ferry_model::pools::LEGACY_NAMESPACE.to_string();
                cm.meta.name = ferry_model::pools::LEGACY_NAME.to_string();
            }
        }
        snap
    }
}

fn push_object(snap: &mut Snapshot, o: Object, created_ms: Option<u64>, _kind: &str) {
    match o {
        Object::Service(s) => {
            if let Some(ms) = created_ms {
                snap.service_mtime_ms.insert(s.meta.object_ref(), ms);
            }
            snap.services.push(s)
        }
        Object::EndpointSlice(e) => snap.slices.push(e),
        Object::Node(n) => snap.nodes.push(n),
        Object::ConfigMap(c) => snap.config_maps.push(c),
        Object::Namespace(n) => snap.namespaces.push(n),
        Object::IpAddressPool(p) => snap.ip_pools.push(p),
        Object::L2Advertisement(l) => snap.l2_advertisements.push(l),
        Object::BgpPeer(p) => snap.bgp_peers.push(*p),
        Object::BgpAdvertisement(a) => snap.bgp_advertisements.push(a),
        Object::Community(c) => snap.communities.push(c),
        Object::BfdProfile(b) => snap.bfd_profiles.push(b),
        Object::Secret(s) => snap.secrets.push(s),
    }
}

fn convert(w: &Watched, obj: &DynamicObject) -> ((String, String), Converted) {
    let key = (
        obj.metadata.namespace.clone().unwrap_or_default(),
        obj.metadata.name.clone().unwrap_or_default(),
    );
    let created_ms = obj
        .metadata
        .creation_timestamp
        .as_ref()
        .and_then(|t| u64::try_from(t.0.as_millisecond()).ok());
    let mut value = serde_json::to_value(obj).unwrap_or(Value::Null);
    if let Some(m) = value.as_object_mut() {
        // List items and watch events may leave these out.
        m.insert("apiVersion".into(), Value::String(w.api_version()));
        m.insert("kind".into(), Value::String(w.kind.to_string()));
    }
    let raw = RawObject {
        file: String::new(),
        doc_index: 0,
        base: String::new(),
        kind: w.kind.to_string(),
        api_version: w.api_version(),
        value,
    };
    (
        key,
        Converted {
            parsed: parse_object(&raw),
            created_ms,
        },
    )
}

/// The HTTP code of a watcher error from the API server, if it is one.
fn api_code(e: &watcher::Error) -> Option<u16> {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.code),
        _ => None,
    }
}

/// Whether a watcher error means "this resource does not exist here" (a CRD not installed).
fn is_not_found(e: &watcher::Error) -> bool {
    api_code(e) == Some(404)
}

/// Whether the agent may not read this resource (its Role does not name it).
fn is_forbidden(e: &watcher::Error) -> bool {
    api_code(e) == Some(403)
}

async fn watch_kind(client: Client, w: Watched, shared: Arc<Shared>) {
    let ar = w.resource();
    let api: Api<DynamicObject> = match &w.namespace {
        Some(ns) => Api::namespaced_with(client, ns, &ar),
        None => Api::all_with(client, &ar),
    };
    let mut cfg = watcher::Config::default();
    if let Some(l) = w.labels {
        cfg = cfg.labels(l);
    }
    if let Some(f) = &w.fields {
        cfg = cfg.fields(f);
    }
    let backoff = watcher::ExponentialBackoff::from(
        backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(BACKOFF_MAX)
            .with_jitter()
            .without_max_times(),
    );
    let stream = watcher(api, cfg).backoff(backoff);
    futures::pin_mut!(stream);
    while let Some(ev) = stream.next().await {
        let changed = {
            let mut st = shared.lock();
            let changed = apply_event(&mut st, &w, ev, &shared.log);
            if changed {
                st.generation += 1;
            }
            changed
        };
        if changed {
            (shared.on_change)();
        }
    }
}

/// One watcher event into the state; whether anything a snapshot shows changed.
fn apply_event(
    st: &mut State,
    w: &Watched,
    ev: Result<watcher::Event<DynamicObject>, watcher::Error>,
    log: &Log,
) -> bool {
    let Some(ks) = st.kinds.get_mut(w.kind) else {
        return false;
    };
    match ev {
        Ok(ev) => {
            if ks.last_error.take().is_some() {
                log(format!("watching {}s again", w.kind));
            }
            ks.absent = false;
            match ev {
                watcher::Event::Init => {
                    ks.relist = Some(BTreeMap::new());
                    false
                }
                watcher::Event::InitApply(obj) => {
                    let (k, c) = convert(w, &obj);
                    ks.relist.get_or_insert_with(BTreeMap::new).insert(k, c);
                    false
                }
                watcher::Event::InitDone => {
                    let new = ks.relist.take().unwrap_or_default();
                    let first = !ks.ready;
                    ks.ready = true;
                    let changed = first || !same_objects(&ks.objects, &new);
                    ks.objects = new;
                    changed
                }
                watcher::Event::Apply(obj) => {
                    let (k, c) = convert(w, &obj);
                    ks.objects.insert(k, c);
                    true
                }
                watcher::Event::Delete(obj) => {
                    let (k, _) = convert(w, &obj);
                    ks.objects.remove(&k).is_some()
                }
            }
        }
        Err(e) if w.optional && (is_not_found(&e) || is_forbidden(&e)) => {
            let msg = if is_forbidden(&e) {
                format!(
                    "{}s ({}) may not be read (forbidden: the agent's Role does not name \
                     {}): none are read",
                    w.kind,
                    w.api_version(),
                    w.plural
                )
            } else {
                format!(
                    "{} ({}) is not served by the API server (MetalLB's CRDs not installed?): none are read",
                    w.kind,
                    w.api_version()
                )
            };
            if ks.last_error.as_deref() != Some(&msg) {
                log(msg.clone());
                ks.last_error = Some(msg);
            }
            let changed = !ks.ready || !ks.objects.is_empty();
            ks.ready = true;
            ks.absent = true;
            ks.objects.clear();
            ks.relist = None;
            changed
        }
        Err(e) => {
            let what = match &e {
                watcher::Error::InitialListFailed(k) => format!("listing: {}", crate::describe(k)),
                watcher::Error::WatchStartFailed(k) | watcher::Error::WatchFailed(k) => {
                    format!("watching: {}", crate::describe(k))
                }
                e => e.to_string(),
            };
            let msg = format!("{}s: {what} (retrying; objects kept as last seen)", w.kind);
            if ks.last_error.as_deref() != Some(&msg) {
                log(msg.clone());
                ks.last_error = Some(msg);
            }
            false
        }
    }
}

fn same_objects(
    a: &BTreeMap<(String, String), Converted>,
    b: &BTreeMap<(String, String), Converted>,
) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b.iter())
            .all(|((ka, va), (kb, vb))| ka == kb && va.parsed == vb.parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> watcher::Error {
        let status: kube::core::Status = serde_json::from_value(serde_json::json!({
            "code": code, "message": "no", "reason": "Forbidden",
        }))
        .expect("a Status");
        watcher::Error::InitialListFailed(kube::Error::Api(Box::new(status)))
    }

    fn state_of(kinds: &[Watched]) -> State {
        State {
            kinds: kinds
                .iter()
                .map(|k| (k.kind, KindState::default()))
                .collect(),
            generation: 0,
        }
    }

    /// The BGP kinds and Secrets are watched in MetalLB's namespace; an optional kind the
    /// agent may not read (an older Role) or that is not served counts as ready and empty,
    /// with one log line; a required kind stays not ready.
    #[test]
    fn optional_kinds_forbidden_or_absent_count_as_none() {
        let kinds = watched(&SourceConfig::default());
        let find = |k: &str| kinds.iter().find(|w| w.kind == k).expect(k).clone();
        for k in [
            "BGPPeer",
            "BGPAdvertisement",
            "Community",
            "BFDProfile",
            "Secret",
        ] {
            let w = find(k);
            assert!(w.optional, "{k}");
            assert_eq!(w.namespace.as_deref(), Some("metallb-system"), "{k}");
        }
        assert_eq!(find("BGPPeer").version, "v1beta2");
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let sink = Arc::clone(&lines);
        let log: Log = Arc::new(move |l| sink.lock().unwrap().push(l));
        let mut st = state_of(&kinds);
        let secret = find("Secret");
        assert!(apply_event(&mut st, &secret, Err(api_error(403)), &log));
        assert!(st.kinds["Secret"].ready);
        assert!(!apply_event(&mut st, &secret, Err(api_error(403)), &log));
        let community = find("Community");
        assert!(apply_event(&mut st, &community, Err(api_error(404)), &log));
        let node = find("Node");
        assert!(!apply_event(&mut st, &node, Err(api_error(403)), &log));
        assert!(!st.kinds["Node"].ready, "a required kind waits");
        let lines = lines.lock().unwrap();
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert!(
            lines[0].contains("forbidden") && lines[0].contains("secrets"),
            "{lines:#?}"
        );
        assert!(lines[1].contains("not served"), "{lines:#?}");
    }
}
