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

use ferry_model::view::Changed;
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
    /// What [`ApiSource::view`] lends: the objects of the big kinds (Services and
    /// EndpointSlices, each list sorted by namespace and name) are held here only (their
    /// [`KindState`] entries keep the rest: problems, creation time), patched as events come;
    /// the other kinds and the problems are copied in when they changed.
    view: Arc<Snapshot>,
    /// Changes to the big kinds that came while the view was lent, in order.
    pending: Vec<Pending>,
    /// The view's small kinds or problems are out of date.
    view_stale: bool,
    /// The services whose Service or EndpointSlices changed in the view since the agent's last
    /// pass took it ([`ApiSource::view_and_changes`]): all, after a re-list or a change to
    /// another kind.
    changed: Changed,
}

/// The kinds whose objects live in the view only (the ones there are thousands of).
fn is_big(kind: &str) -> bool {
    matches!(kind, "Service" | "EndpointSlice")
}

/// A change to a big kind's objects.
#[derive(Debug)]
enum Pending {
    /// The objects of one key (none: gone).
    Put(&'static str, (String, String), Vec<Object>),
    /// Every object of a kind (a re-list), sorted.
    Replace(&'static str, Vec<Object>),
}

impl Pending {
    /// Into the view; the services it changes go to `changed`.
    fn apply(self, snap: &mut Snapshot, changed: &mut Changed) {
        match self {
            Pending::Put(kind, key, objects) => {
                let at = (key.0.as_str(), key.1.as_str());
                match kind {
                    "Service" => {
                        changed.add(at.0, at.1);
                        put_sorted(&mut snap.services, at, objects, |o| match o {
                            Object::Service(s) => Some(s),
                            _ => None,
                        })
                    }
                    _ => {
                        // The service the slice belonged to, and the one it belongs to now.
                        let start = snap.slices.partition_point(|o| o.key() < at);
                        for old in snap.slices[start..].iter().take_while(|o| o.key() == at) {
                            changed.add(&old.meta.namespace, &old.service_name);
                        }
                        for o in &objects {
                            if let Object::EndpointSlice(s) = o {
                                changed.add(&s.meta.namespace, &s.service_name);
                            }
                        }
                        put_sorted(&mut snap.slices, at, objects, |o| match o {
                            Object::EndpointSlice(s) => Some(s),
                            _ => None,
                        })
                    }
                }
            }
            Pending::Replace(kind, objects) => {
                changed.all();
                let mut fresh = Snapshot::default();
                for o in objects {
                    push_object(&mut fresh, o, None, kind);
                }
                match kind {
                    "Service" => snap.services = fresh.services,
                    _ => snap.slices = fresh.slices,
                }
            }
        }
    }
}

/// Replaces the objects of `key` in a list sorted by (namespace, name) with `objects` (of the
/// list's kind; others are dropped).
fn put_sorted<T, F>(list: &mut Vec<T>, key: (&str, &str), objects: Vec<Object>, of: F)
where
    T: HasMeta,
    F: Fn(Object) -> Option<T>,
{
    let start = list.partition_point(|o| o.key() < key);
    let end = start + list[start..].iter().take_while(|o| o.key() == key).count();
    list.splice(start..end, objects.into_iter().filter_map(of));
}

trait HasMeta {
    fn key(&self) -> (&str, &str);
}

impl HasMeta for ferry_model::Service {
    fn key(&self) -> (&str, &str) {
        (self.meta.namespace.as_str(), self.meta.name.as_str())
    }
}

impl HasMeta for ferry_model::EndpointSlice {
    fn key(&self) -> (&str, &str) {
        (self.meta.namespace.as_str(), self.meta.name.as_str())
    }
}

/// A change to a big kind: into the view now if nobody holds it, else queued.
fn change(view: &mut Arc<Snapshot>, pending: &mut Vec<Pending>, changed: &mut Changed, p: Pending) {
    match Arc::get_mut(view) {
        Some(v) if pending.is_empty() => p.apply(v, changed),
        _ => pending.push(p),
    }
}

impl State {
    /// Brings the view up to date (the queued changes, the small kinds, the problems).
    fn refresh_view(&mut self, legacy: &ObjectRef) {
        if self.pending.is_empty() && !self.view_stale {
            return;
        }
        // Copies the snapshot only if a previous view is still held by someone.
        let view = Arc::make_mut(&mut self.view);
        for p in self.pending.drain(..) {
            p.apply(view, &mut self.changed);
        }
        if std::mem::take(&mut self.view_stale) {
            // Pools, nodes or problems moved: what they change is not tracked by service.
            self.changed.all();
            let big = (
                std::mem::take(&mut view.services),
                std::mem::take(&mut view.slices),
            );
            *view = small_kinds(&self.kinds, legacy, false);
            (view.services, view.slices) = big;
        }
    }
}

/// The objects of the small kinds (all kinds, with `big`: a copy of their objects is not
/// there, the caller adds the view's), and everyone's problems, as a snapshot.
fn small_kinds(
    kinds: &BTreeMap<&'static str, KindState>,
    legacy: &ObjectRef,
    times: bool,
) -> Snapshot {
    let mut snap = Snapshot::default();
    for (kind, ks) in kinds {
        for c in ks.objects.values() {
            if !is_big(kind) {
                for o in &c.parsed.objects {
                    push_object(&mut snap, o.clone(), c.created_ms, kind);
                }
            }
            snap.errors.extend(c.parsed.errors.iter().cloned());
            snap.warnings.extend(c.parsed.warnings.iter().cloned());
        }
    }
    if times {
        if let Some(ks) = kinds.get("Service") {
            for ((ns, name), c) in &ks.objects {
                if let Some(ms) = c.created_ms {
                    snap.service_mtime_ms
                        .insert(ObjectRef::new(ns.clone(), name.clone()), ms);
                }
            }
        }
    } else {
        snap.service_mtime_ms.clear();
    }
    // The legacy ConfigMap under another name is read as if it had MetalLB's name.
    for cm in &mut snap.config_maps {
        if &cm.meta.object_ref() == legacy {
            cm.meta.namespace = ferry_model::pools::LEGACY_NAMESPACE.to_string();
            cm.meta.name = ferry_model::pools::LEGACY_NAME.to_string();
        }
    }
    snap
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
                ..State::default()
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

    /// A source without watchers, fed by [`ApiSource::inject`] only (tests and benchmarks).
    pub fn detached(config: SourceConfig) -> ApiSource {
        let kinds = watched(&config);
        ApiSource {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    kinds: kinds
                        .iter()
                        .map(|k| (k.kind, KindState::default()))
                        .collect(),
                    ..State::default()
                }),
                on_change: Arc::new(|| {}),
                log: Arc::new(|_| {}),
                config,
            }),
            _tasks: Arc::new(Tasks(Vec::new())),
        }
    }

    /// Takes in one event of kind `kind` ("Service", "EndpointSlice", ...) as its watcher
    /// would; whether anything a snapshot shows changed. For tests and benchmarks (a started
    /// source's watchers do this themselves).
    pub fn inject(&self, kind: &str, ev: watcher::Event<DynamicObject>) -> bool {
        let Some(w) = watched(&self.shared.config)
            .into_iter()
            .find(|w| w.kind == kind)
        else {
            return false;
        };
        let mut st = self.shared.lock();
        let changed = apply_event(&mut st, &w, Ok(ev), &self.shared.log);
        if changed {
            st.generation += 1;
        }
        changed
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

    /// Everything as last seen, in the form the manifest source gives (a copy: see
    /// [`ApiSource::view`] for one without).
    pub fn snapshot(&self) -> Snapshot {
        let mut st = self.shared.lock();
        st.refresh_view(&self.shared.config.metallb_config);
        let mut snap = small_kinds(&st.kinds, &self.shared.config.metallb_config, true);
        snap.services = st.view.services.clone();
        snap.slices = st.view.slices.clone();
        snap
    }

    /// Everything as last seen, shared rather than copied: the agent's pass reads it, then
    /// drops it (changes that come meanwhile wait, and go into it in place afterwards; a view
    /// still held when changes are taken in costs one copy). `service_mtime_ms` is left
    /// empty.
    pub fn view(&self) -> Arc<Snapshot> {
        let mut st = self.shared.lock();
        st.refresh_view(&self.shared.config.metallb_config);
        Arc::clone(&st.view)
    }

    /// [`ApiSource::view`], and the services whose Service or EndpointSlices changed since
    /// the last call (all on the first): what the agent's pass needs to look at (see
    /// [`ferry_model::view::Resolver::update_some`]). Only the agent's pass should call this:
    /// it takes the changes.
    pub fn view_and_changes(&self) -> (Arc<Snapshot>, Changed) {
        let mut st = self.shared.lock();
        st.refresh_view(&self.shared.config.metallb_config);
        let changed = std::mem::replace(&mut st.changed, Changed::none());
        (Arc::clone(&st.view), changed)
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
    let State {
        kinds,
        view,
        pending,
        view_stale,
        changed: names,
        ..
    } = st;
    let Some(ks) = kinds.get_mut(w.kind) else {
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
                    let mut new = ks.relist.take().unwrap_or_default();
                    let first = !ks.ready;
                    ks.ready = true;
                    if !is_big(w.kind) {
                        let changed = first || !same_objects(&ks.objects, &new);
                        ks.objects = new;
                        *view_stale |= changed;
                        return changed;
                    }
                    // The objects go to the view; the entries keep the rest.
                    let objects: Vec<Object> = new
                        .values_mut()
                        .flat_map(|c| std::mem::take(&mut c.parsed.objects))
                        .collect();
                    let held = match w.kind {
                        "Service" => view.services.len(),
                        _ => view.slices.len(),
                    };
                    let same = !first
                        && pending.is_empty()
                        && held == objects.len()
                        && objects.iter().zip(0..held).all(|(o, i)| match o {
                            Object::Service(s) => view.services.get(i) == Some(s),
                            Object::EndpointSlice(s) => view.slices.get(i) == Some(s),
                            _ => false,
                        })
                        && same_objects(&ks.objects, &new);
                    let problems = has_problems(&ks.objects) || has_problems(&new);
                    ks.objects = new;
                    *view_stale |= problems;
                    if !same {
                        change(view, pending, names, Pending::Replace(w.kind, objects));
                    }
                    !same
                }
                watcher::Event::Apply(obj) => {
                    let (k, mut c) = convert(w, &obj);
                    let problems = !c.parsed.errors.is_empty() || !c.parsed.warnings.is_empty();
                    let old = if is_big(w.kind) {
                        let objects = std::mem::take(&mut c.parsed.objects);
                        let old = ks.objects.insert(k.clone(), c);
                        change(view, pending, names, Pending::Put(w.kind, k, objects));
                        old
                    } else {
                        ks.objects.insert(k, c)
                    };
                    *view_stale |= !is_big(w.kind)
                        || problems
                        || old.is_some_and(|o| {
                            !o.parsed.errors.is_empty() || !o.parsed.warnings.is_empty()
                        });
                    true
                }
                watcher::Event::Delete(obj) => {
                    let (k, _) = convert(w, &obj);
                    let Some(old) = ks.objects.remove(&k) else {
                        return false;
                    };
                    *view_stale |= !is_big(w.kind)
                        || !old.parsed.errors.is_empty()
                        || !old.parsed.warnings.is_empty();
                    if is_big(w.kind) {
                        change(view, pending, names, Pending::Put(w.kind, k, Vec::new()));
                    }
                    true
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
            // Only optional kinds get here: none is a big one.
            *view_stale |= changed;
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

/// Whether any entry has errors or warnings.
fn has_problems(m: &BTreeMap<(String, String), Converted>) -> bool {
    m.values()
        .any(|c| !c.parsed.errors.is_empty() || !c.parsed.warnings.is_empty())
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
    use proptest::prelude::*;

    fn dynamic(v: Value) -> DynamicObject {
        serde_json::from_value(v).expect("a DynamicObject")
    }

    fn service(ns: &str, name: &str, port: u16) -> DynamicObject {
        dynamic(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": ns, "name": name, "resourceVersion": format!("{port}")},
            "spec": {"clusterIP": "10.43.0.10", "ports": [{"port": port, "protocol": "TCP"}]},
        }))
    }

    fn bad_service(ns: &str, name: &str) -> DynamicObject {
        dynamic(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": ns, "name": name},
            "spec": {"clusterIP": "10.43.0.10", "ports": [{"port": 700000, "protocol": "TCP"}]},
        }))
    }

    fn slice(ns: &str, name: &str, last: u8) -> DynamicObject {
        dynamic(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": ns, "name": name, "resourceVersion": format!("{last}"),
                         "labels": {"kubernetes.io/service-name": format!("o{}", last % 3)}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [format!("10.42.0.{last}")], "conditions": {"ready": true}}],
            "ports": [{"port": 8080, "protocol": "TCP"}],
        }))
    }

    fn node(name: &str, last: u8) -> DynamicObject {
        dynamic(serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": format!("192.168.2.{last}")}]},
        }))
    }

    #[derive(Debug, Clone)]
    enum Ev {
        /// (kind 0..3, namespace, name, variant): an object added or changed.
        Apply(u8, u8, u8, u8),
        Delete(u8, u8, u8),
        /// A kind listed again, with one object changed or not.
        Relist(u8, Option<(u8, u8, u8)>),
        /// The agent takes the view and holds it (true) or lets it go.
        Hold(bool),
    }

    fn ev() -> impl Strategy<Value = Ev> {
        prop_oneof![
            6 => (0u8..3, 0u8..2, 0u8..5, 0u8..4).prop_map(|(k, n, m, v)| Ev::Apply(k, n, m, v)),
            2 => (0u8..3, 0u8..2, 0u8..5).prop_map(|(k, n, m)| Ev::Delete(k, n, m)),
            1 => (0u8..3, proptest::option::of((0u8..2, 0u8..5, 0u8..4))).prop_map(|(k, c)| Ev::Relist(k, c)),
            2 => any::<bool>().prop_map(Ev::Hold),
        ]
    }

    const KINDS: [&str; 3] = ["Service", "EndpointSlice", "Node"];

    fn object(kind: u8, ns: u8, name: u8, variant: u8) -> DynamicObject {
        let (ns, name) = (format!("ns{ns}"), format!("o{name}"));
        match kind {
            0 if variant == 3 => bad_service(&ns, &name),
            0 => service(&ns, &name, 80 + u16::from(variant)),
            1 => slice(&ns, &name, variant + 1),
            _ => node(&name, variant + 1),
        }
    }

    fn key(kind: u8, ns: u8, name: u8) -> (u8, String, String) {
        let ns = if kind == 2 {
            String::new()
        } else {
            format!("ns{ns}")
        };
        (kind, ns, format!("o{name}"))
    }

    /// The objects the tests' events make, by kind and key.
    type Model = BTreeMap<(u8, String, String), DynamicObject>;

    /// Gives `src` the watch events of `e` (an apply, a delete or a re-list; a hold is the
    /// caller's), changing `model` alike. For a delete: whether the source said anything
    /// changed, and whether the model had the object.
    fn feed(src: &ApiSource, model: &mut Model, e: &Ev) -> Option<(bool, bool)> {
        match *e {
            Ev::Apply(k, n, m, v) => {
                let o = object(k, n, m, v);
                model.insert(key(k, n, m), o.clone());
                src.inject(KINDS[usize::from(k)], watcher::Event::Apply(o));
                None
            }
            Ev::Delete(k, n, m) => {
                let was = model.remove(&key(k, n, m)).is_some();
                let o = object(k, n, m, 0);
                let changed = src.inject(KINDS[usize::from(k)], watcher::Event::Delete(o));
                Some((changed, was))
            }
            Ev::Relist(k, change) => {
                if let Some((n, m, v)) = change {
                    model.insert(key(k, n, m), object(k, n, m, v));
                }
                let kind = KINDS[usize::from(k)];
                src.inject(kind, watcher::Event::Init);
                for ((kk, _, _), o) in model.iter() {
                    if *kk == k {
                        src.inject(kind, watcher::Event::InitApply(o.clone()));
                    }
                }
                src.inject(kind, watcher::Event::InitDone);
                None
            }
            Ev::Hold(_) => None,
        }
    }

    /// What the source held before views: every object converted, in kind and key order.
    fn reference(model: &BTreeMap<(u8, String, String), DynamicObject>) -> Snapshot {
        let cfg = SourceConfig::default();
        let all = watched(&cfg);
        let mut by_kind: BTreeMap<&str, Vec<&DynamicObject>> = BTreeMap::new();
        for ((k, _, _), o) in model {
            by_kind.entry(KINDS[usize::from(*k)]).or_default().push(o);
        }
        let mut snap = Snapshot::default();
        for (kind, objects) in by_kind {
            let w = all.iter().find(|w| w.kind == kind).expect("watched");
            for o in objects {
                let (_, c) = convert(w, o);
                for obj in c.parsed.objects {
                    push_object(&mut snap, obj, None, kind);
                }
                snap.errors.extend(c.parsed.errors);
                snap.warnings.extend(c.parsed.warnings);
            }
        }
        snap
    }

    proptest! {
        /// Whatever the events and whenever the agent holds a view: the view, once taken,
        /// and the snapshot are what converting every object afresh gives.
        #[test]
        fn the_view_follows_the_events(evs in proptest::collection::vec(ev(), 1..40)) {
            let src = ApiSource::detached(SourceConfig::default());
            let mut model = Model::new();
            for kind in KINDS {
                src.inject(kind, watcher::Event::Init);
                src.inject(kind, watcher::Event::InitDone);
            }
            let mut held: Option<Arc<Snapshot>> = None;
            for e in &evs {
                match *e {
                    Ev::Apply(..) | Ev::Delete(..) | Ev::Relist(..) => {
                        if let Some((changed, was)) = feed(&src, &mut model, e) {
                            prop_assert_eq!(changed, was);
                        }
                    }
                    Ev::Hold(h) => held = h.then(|| src.view()),
                }
                let want = reference(&model);
                let view = src.view();
                prop_assert_eq!(&view.services, &want.services);
                prop_assert_eq!(&view.slices, &want.slices);
                prop_assert_eq!(&view.nodes, &want.nodes);
                prop_assert_eq!(&view.errors, &want.errors);
                drop(view);
                let copy = src.snapshot();
                prop_assert_eq!(&copy.services, &want.services);
                prop_assert_eq!(&copy.slices, &want.slices);
                prop_assert_eq!(&copy.errors, &want.errors);
            }
            drop(held);
        }
    }

    proptest! {
        /// Whatever the events, and whether or not the agent holds a view meanwhile, the
        /// changes the pass takes name every service whose Service or slices differ from the
        /// view the pass before took (what lets a pass look at those only).
        #[test]
        fn the_changes_name_every_service_that_changed(
            evs in proptest::collection::vec(ev(), 1..40)
        ) {
            let src = ApiSource::detached(SourceConfig::default());
            for kind in KINDS {
                src.inject(kind, watcher::Event::Init);
                src.inject(kind, watcher::Event::InitDone);
            }
            let (first, all) = src.view_and_changes();
            prop_assert_eq!(all, Changed::All);
            let mut before = (first.services.clone(), first.slices.clone());
            drop(first);
            let mut model = Model::new();
            let mut held: Option<Arc<Snapshot>> = None;
            for e in evs.iter().chain([&Ev::Hold(false)]) {
                match *e {
                    Ev::Apply(..) | Ev::Delete(..) | Ev::Relist(..) => {
                        if let Some((changed, was)) = feed(&src, &mut model, e) {
                            prop_assert_eq!(changed, was);
                        }
                    }
                    // A pass: it takes the view and the changes (and holds the view, or not).
                    Ev::Hold(h) => {
                        drop(held.take());
                        let (view, changed) = src.view_and_changes();
                        let least = Changed::between(
                            (&before.0, &before.1),
                            (&view.services, &view.slices),
                        );
                        if let Changed::Only(must) = &least {
                            for r in must {
                                prop_assert!(
                                    changed.names(&r.namespace, &r.name),
                                    "{} changed but is not named in {:?}", r, changed
                                );
                            }
                        }
                        before = (view.services.clone(), view.slices.clone());
                        held = h.then_some(view);
                    }
                }
            }
        }
    }

    /// A re-list that brings nothing new is no change; one that does is.
    #[test]
    fn a_relist_of_the_same_objects_is_no_change() {
        let src = ApiSource::detached(SourceConfig::default());
        let objs = [service("a", "x", 80), service("a", "y", 81)];
        src.inject("Service", watcher::Event::Init);
        for o in &objs {
            src.inject("Service", watcher::Event::InitApply(o.clone()));
        }
        assert!(
            src.inject("Service", watcher::Event::InitDone),
            "the first list"
        );
        src.inject("Service", watcher::Event::Init);
        for o in &objs {
            src.inject("Service", watcher::Event::InitApply(o.clone()));
        }
        assert!(!src.inject("Service", watcher::Event::InitDone));
        src.inject("Service", watcher::Event::Init);
        src.inject("Service", watcher::Event::InitApply(objs[0].clone()));
        assert!(src.inject("Service", watcher::Event::InitDone));
        assert_eq!(src.view().services.len(), 1);
        assert_eq!(src.kept("Service"), 1);
    }

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
            ..State::default()
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
