//! The object store: JSON objects keyed by (group, version, resource, namespace, name), one
//! global monotonically increasing resourceVersion, and a bounded event history for watches.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Map, Value};
use tokio::sync::broadcast;

use crate::error::ApiError;
use crate::resources::Resource;
use crate::service::{self, ServiceConfig};

/// Where an object lives.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjKey {
    pub group: String,
    pub version: String,
    pub resource: String,
    /// `""` for cluster-scoped objects.
    pub namespace: String,
    pub name: String,
}

impl ObjKey {
    pub fn new(res: &Resource, namespace: &str, name: &str) -> Self {
        ObjKey {
            group: res.group.into(),
            version: res.version.into(),
            resource: res.resource.into(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    fn is(&self, res: &Resource) -> bool {
        self.group == res.group && self.version == res.version && self.resource == res.resource
    }
}

/// ADDED, MODIFIED or DELETED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as kept in the history and sent to watchers.
#[derive(Debug, Clone)]
pub struct Event {
    pub rv: u64,
    pub key: ObjKey,
    pub kind: EventType,
    /// The object after the change (for DELETED: the last state, stamped with the delete's rv).
    pub object: Value,
    /// The object before a MODIFIED (to turn selector transitions into ADDED/DELETED).
    pub prev: Option<Value>,
}

/// Which part of an object a write may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Everything but `status` (when the resource has a status subresource).
    Main,
    /// Only `status`.
    Status,
}

/// What a watch starts with.
#[derive(Debug)]
pub enum WatchStart {
    /// The current objects (to send as synthetic ADDED events), then live events after `rv`.
    Snapshot { objects: Vec<Value>, rv: u64 },
    /// Events from the history after the requested resourceVersion, then live events after
    /// `rv` (the store's resourceVersion when the watch started).
    Replay { events: Vec<Arc<Event>>, rv: u64 },
}

struct Inner {
    rv: u64,
    objects: BTreeMap<ObjKey, Value>,
    history: VecDeque<Arc<Event>>,
    /// The resourceVersion of the newest event dropped from the history (0 if none).
    compacted: u64,
}

/// The store. Cheap to share behind an `Arc`.
pub struct Store {
    inner: Mutex<Inner>,
    history_cap: usize,
    services: ServiceConfig,
    tx: broadcast::Sender<Arc<Event>>,
    /// A file the objects are saved to after every write (see [`Store::open`]).
    state: Option<PathBuf>,
}

impl Store {
    /// A store that keeps the last `history_cap` events for watches.
    pub fn new(history_cap: usize) -> Self {
        Self::with_services(history_cap, ServiceConfig::default())
    }

    /// A store whose Services get cluster IPs and node ports from `services`.
    pub fn with_services(history_cap: usize, services: ServiceConfig) -> Self {
        let (tx, _) = broadcast::channel(4096);
        Store {
            inner: Mutex::new(Inner {
                rv: 1,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                compacted: 0,
            }),
            history_cap: history_cap.max(1),
            services,
            tx,
            state: None,
        }
    }

    /// A store kept in the file `state`: loaded from it when it exists, and saved to it (write
    /// to a temporary file, then rename) after every write, so that the server can be stopped
    /// and started again as a real one (whose objects live in etcd). The watch history is not
    /// kept: after a restart, a watch from an older resourceVersion gets 410 Expired and its
    /// client lists again, finding the same objects with the same resourceVersions.
    pub fn open(history_cap: usize, services: ServiceConfig, state: &Path) -> Result<Self, String> {
        let mut store = Self::with_services(history_cap, services);
        match std::fs::read(state) {
            Ok(bytes) => {
                let what = || format!("state file {}", state.display());
                let doc: Value =
                    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", what()))?;
                let rv = doc["resourceVersion"]
                    .as_str()
                    .and_then(|r| r.parse::<u64>().ok())
                    .ok_or_else(|| {
                        format!("{}: resourceVersion: expected a number in a string", what())
                    })?;
                let mut inner = store.lock();
                inner.rv = rv;
                inner.compacted = rv;
                for (i, entry) in doc["objects"].as_array().into_iter().flatten().enumerate() {
                    let field = |f: &str| {
                        entry[f].as_str().map(str::to_string).ok_or_else(|| {
                            format!("{}: objects[{i}].{f}: expected a string", what())
                        })
                    };
                    let key = ObjKey {
                        group: field("group")?,
                        version: field("version")?,
                        resource: field("resource")?,
                        namespace: field("namespace")?,
                        name: field("name")?,
                    };
                    if !entry["object"].is_object() {
                        return Err(format!(
                            "{}: objects[{i}].object: expected an object",
                            what()
                        ));
                    }
                    inner.objects.insert(key, entry["object"].clone());
                }
                drop(inner);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("reading state file {}: {e}", state.display())),
        }
        store.state = Some(state.to_path_buf());
        Ok(store)
    }

    fn save(&self, inner: &Inner) {
        let Some(path) = &self.state else { return };
        let objects: Vec<Value> = inner
            .objects
            .iter()
            .map(|(k, v)| {
                json!({
                    "group": k.group, "version": k.version, "resource": k.resource,
                    "namespace": k.namespace, "name": k.name, "object": v,
                })
            })
            .collect();
        let doc = json!({"resourceVersion": inner.rv.to_string(), "objects": objects});
        let tmp = path.with_extension("tmp");
        let result = serde_json::to_vec(&doc)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = result {
            // The write itself succeeded in memory; a lab that cannot save is told loudly.
            eprintln!("ferry-apiserver: saving state to {}: {e}", path.display());
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every write is one insert).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// One object.
    pub fn get(&self, res: &Resource, namespace: &str, name: &str) -> Result<Value, ApiError> {
        self.lock()
            .objects
            .get(&ObjKey::new(res, namespace, name))
            .cloned()
            .ok_or_else(|| ApiError::not_found(res.group, res.resource, name))
    }

    /// The objects of a resource (in one namespace, or all when `namespace` is `None`) that
    /// pass `filter`, and the resourceVersion the list is consistent with.
    pub fn list(
        &self,
        res: &Resource,
        namespace: Option<&str>,
        filter: &dyn Fn(&Value) -> bool,
    ) -> (Vec<Value>, u64) {
        let inner = self.lock();
        let items = inner
            .objects
            .iter()
            .filter(|(k, _)| k.is(res) && namespace.is_none_or(|ns| k.namespace == ns))
            .filter(|(_, v)| filter(v))
            .map(|(_, v)| v.clone())
            .collect();
        (items, inner.rv)
    }

    /// Creates an object: name or generateName, uid, creationTimestamp, generation 1,
    /// resourceVersion; `status` is dropped for resources with a status subresource
    /// (except Nodes), as kube-apiserver's strategies do.
    pub fn create(
        &self,
        res: &Resource,
        namespace: &str,
        mut obj: Value,
    ) -> Result<Value, ApiError> {
        let Some(map) = obj.as_object_mut() else {
            return Err(ApiError::bad_request(format!(
                "the body of a {} must be a JSON object",
                res.kind
            )));
        };
        check_type(res, map)?;
        map.insert("apiVersion".into(), json!(res.api_version()));
        map.insert("kind".into(), json!(res.kind));
        if res.status && res.resource != "nodes" {
            map.remove("status");
        }
        if res.resource == "namespaces" {
            map.insert("status".into(), json!({"phase": "Active"}));
        }
        let meta = map
            .entry("metadata")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .ok_or_else(|| ApiError::bad_request("metadata must be an object"))?;
        check_namespace(res, namespace, meta)?;
        let mut inner = self.lock();
        let name = match meta.get("name").and_then(Value::as_str) {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => match meta.get("generateName").and_then(Value::as_str) {
                Some(prefix) if !prefix.is_empty() => loop {
                    let candidate = format!("{prefix}{}", random_suffix());
                    if !inner
                        .objects
                        .contains_key(&ObjKey::new(res, namespace, &candidate))
                    {
                        break candidate;
                    }
                },
                _ => {
                    return Err(ApiError::invalid(
                        res.group,
                        res.resource,
                        "",
                        "metadata.name: Required value: name or generateName is required",
                    ))
                }
            },
        };
        validate_name(res, &name)?;
        let ns_key = ObjKey {
            group: String::new(),
            version: "v1".into(),
            resource: "namespaces".into(),
            namespace: String::new(),
            name: namespace.into(),
        };
        if res.namespaced && !inner.objects.contains_key(&ns_key) {
            // As the NamespaceLifecycle admission plugin.
            return Err(ApiError::not_found("", "namespaces", namespace));
        }
        let key = ObjKey::new(res, namespace, &name);
        if inner.objects.contains_key(&key) {
            return Err(ApiError::already_exists(res.group, res.resource, &name));
        }
        meta.insert("name".into(), json!(name));
        if res.namespaced {
            meta.insert("namespace".into(), json!(namespace));
        }
        meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        meta.insert("creationTimestamp".into(), json!(now()));
        meta.insert("generation".into(), json!(1));
        meta.remove("deletionTimestamp");
        if is_service(res) {
            let others = inner
                .objects
                .iter()
                .filter(|(k, _)| k.is(res))
                .map(|(_, v)| v);
            service::prepare(&mut obj, None, others, &self.services)
                .map_err(|e| ApiError::invalid(res.group, res.resource, &name, e))?;
        }
        inner.rv += 1;
        let rv = inner.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        inner.objects.insert(key.clone(), obj.clone());
        self.record(&mut inner, key, EventType::Added, obj.clone(), None);
        Ok(obj)
    }

    /// Replaces an object (PUT). A `metadata.resourceVersion` in `obj` must match the stored
    /// one (409 Conflict otherwise); an empty one means an unconditional update. `Part::Main`
    /// keeps the stored `status` (for resources with a status subresource); `Part::Status`
    /// keeps everything but `status`. uid, creationTimestamp and name never change; generation
    /// grows when anything outside metadata and status changes. A no-op write changes nothing.
    pub fn update(
        &self,
        res: &Resource,
        namespace: &str,
        name: &str,
        obj: Value,
        part: Part,
    ) -> Result<Value, ApiError> {
        self.update_with(res, namespace, name, part, |_| Ok(obj))
    }

    /// Reads the stored object, lets `f` compute the new one (a patch), and writes it with the
    /// rules of [`Store::update`], all under one lock (so a patch never races another write).
    pub fn update_with(
        &self,
        res: &Resource,
        namespace: &str,
        name: &str,
        part: Part,
        f: impl FnOnce(&Value) -> Result<Value, ApiError>,
    ) -> Result<Value, ApiError> {
        let key = ObjKey::new(res, namespace, name);
        let mut inner = self.lock();
        let old = inner
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(res.group, res.resource, name))?;
        let new = f(&old)?;
        let mut new = match new {
            Value::Object(m) => m,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "the body of a {} must be a JSON object",
                    res.kind
                )))
            }
        };
        check_type(res, &new)?;
        let new_meta = match new.get("metadata") {
            Some(Value::Object(m)) => m.clone(),
            None => Map::new(),
            Some(_) => return Err(ApiError::bad_request("metadata must be an object")),
        };
        if let Some(n) = new_meta.get("name").and_then(Value::as_str) {
            if n != name {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )));
            }
        }
        check_namespace(res, namespace, &new_meta)?;
        let old_meta = old
            .get("metadata")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let old_rv = old_meta
            .get("resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        match new_meta.get("resourceVersion").and_then(Value::as_str) {
            Some(rv) if !rv.is_empty() && rv != old_rv => {
                return Err(ApiError::conflict(res.group, res.resource, name))
            }
            _ => {}
        }
        let mut merged = match part {
            Part::Main => {
                let mut m = new.clone();
                if res.status {
                    match old.get("status") {
                        Some(s) => m.insert("status".into(), s.clone()),
                        None => m.remove("status"),
                    };
                }
                m
            }
            Part::Status => {
                let mut m = old.as_object().cloned().unwrap_or_default();
                match new.remove("status") {
                    Some(s) => m.insert("status".into(), s),
                    None => m.remove("status"),
                };
                m
            }
        };
        merged.insert("apiVersion".into(), json!(res.api_version()));
        merged.insert("kind".into(), json!(res.kind));
        // Metadata: the client's, with the server-owned fields from the stored object.
        let mut meta = match part {
            Part::Main => new_meta,
            Part::Status => old_meta.clone(),
        };
        for f in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "generation",
            "resourceVersion",
        ] {
            match old_meta.get(f) {
                Some(v) => meta.insert(f.into(), v.clone()),
                None => meta.remove(f),
            };
        }
        merged.insert("metadata".into(), Value::Object(meta));
        let mut merged = Value::Object(merged);
        if part == Part::Main && is_service(res) {
            let others = inner
                .objects
                .iter()
                .filter(|(k, _)| k.is(res) && **k != key)
                .map(|(_, v)| v);
            service::prepare(&mut merged, Some(&old), others, &self.services)
                .map_err(|e| ApiError::invalid(res.group, res.resource, name, e))?;
        }
        if merged == old {
            return Ok(old);
        }
        if spec_changed(&old, &merged) {
            let gen = old_meta
                .get("generation")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            merged["metadata"]["generation"] = json!(gen + 1);
        }
        inner.rv += 1;
        merged["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        inner.objects.insert(key.clone(), merged.clone());
        self.record(
            &mut inner,
            key,
            EventType::Modified,
            merged.clone(),
            Some(old),
        );
        Ok(merged)
    }

    /// Deletes an object and returns it (with the resourceVersion of the deletion). A
    /// `precondition_rv` that does not match gives 409 Conflict.
    pub fn delete(
        &self,
        res: &Resource,
        namespace: &str,
        name: &str,
        precondition_rv: Option<&str>,
    ) -> Result<Value, ApiError> {
        let key = ObjKey::new(res, namespace, name);
        let mut inner = self.lock();
        let Some(old) = inner.objects.get(&key) else {
            return Err(ApiError::not_found(res.group, res.resource, name));
        };
        if let Some(want) = precondition_rv {
            if old["metadata"]["resourceVersion"].as_str() != Some(want) {
                return Err(ApiError::conflict(res.group, res.resource, name));
            }
        }
        let Some(mut old) = inner.objects.remove(&key) else {
            return Err(ApiError::not_found(res.group, res.resource, name));
        };
        inner.rv += 1;
        old["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        self.record(&mut inner, key, EventType::Deleted, old.clone(), None);
        if is_namespace(res) {
            // What the namespace controller does (at once here, with no Terminating phase).
            let inside: Vec<ObjKey> = inner
                .objects
                .keys()
                .filter(|k| k.namespace == name)
                .cloned()
                .collect();
            for k in inside {
                if let Some(mut o) = inner.objects.remove(&k) {
                    inner.rv += 1;
                    o["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
                    self.record(&mut inner, k, EventType::Deleted, o, None);
                }
            }
        }
        Ok(old)
    }

    /// Starts a watch of a resource. `since`: `None` (or resourceVersion 0 / absent) starts
    /// from a snapshot of what exists; `Some(rv)` replays the history after `rv`, or fails
    /// with 410 Expired when events after `rv` were already dropped. The receiver gets every
    /// later event (of every resource: the caller filters).
    pub fn watch(
        &self,
        res: &Resource,
        namespace: Option<&str>,
        since: Option<u64>,
    ) -> Result<(WatchStart, broadcast::Receiver<Arc<Event>>), ApiError> {
        let inner = self.lock();
        let rx = self.tx.subscribe();
        let in_scope = |k: &ObjKey| k.is(res) && namespace.is_none_or(|ns| k.namespace == ns);
        let start = match since {
            None => WatchStart::Snapshot {
                objects: inner
                    .objects
                    .iter()
                    .filter(|(k, _)| in_scope(k))
                    .map(|(_, v)| v.clone())
                    .collect(),
                rv: inner.rv,
            },
            Some(rv) => {
                if rv < inner.compacted {
                    return Err(ApiError::expired(rv, inner.compacted));
                }
                WatchStart::Replay {
                    events: inner
                        .history
                        .iter()
                        .filter(|e| e.rv > rv && in_scope(&e.key))
                        .cloned()
                        .collect(),
                    rv: inner.rv,
                }
            }
        };
        Ok((start, rx))
    }

    /// The oldest resourceVersion a watch may still start from.
    pub fn oldest_watchable(&self) -> u64 {
        self.lock().compacted
    }

    fn record(
        &self,
        inner: &mut Inner,
        key: ObjKey,
        kind: EventType,
        object: Value,
        prev: Option<Value>,
    ) {
        let ev = Arc::new(Event {
            rv: inner.rv,
            key,
            kind,
            object,
            prev,
        });
        inner.history.push_back(ev.clone());
        while inner.history.len() > self.history_cap {
            if let Some(dropped) = inner.history.pop_front() {
                inner.compacted = dropped.rv;
            }
        }
        self.save(inner);
        // No receivers is fine.
        let _ = self.tx.send(ev);
    }
}

fn is_namespace(res: &Resource) -> bool {
    res.group.is_empty() && res.resource == "namespaces"
}

fn is_service(res: &Resource) -> bool {
    res.group.is_empty() && res.resource == "services"
}

fn check_type(res: &Resource, map: &Map<String, Value>) -> Result<(), ApiError> {
    if let Some(kind) = map.get("kind").and_then(Value::as_str) {
        if kind != res.kind {
            return Err(ApiError::bad_request(format!(
                "the kind of the object ({kind}) does not match the resource ({}, kind {})",
                res.resource, res.kind
            )));
        }
    }
    if let Some(av) = map.get("apiVersion").and_then(Value::as_str) {
        if av != res.api_version() {
            return Err(ApiError::bad_request(format!(
                "the apiVersion of the object ({av}) does not match the resource ({})",
                res.api_version()
            )));
        }
    }
    Ok(())
}

fn check_namespace(
    res: &Resource,
    namespace: &str,
    meta: &Map<String, Value>,
) -> Result<(), ApiError> {
    if let Some(ns) = meta.get("namespace").and_then(Value::as_str) {
        if res.namespaced && !ns.is_empty() && ns != namespace {
            return Err(ApiError::bad_request(format!(
                "the namespace of the provided object ({ns}) does not match the namespace sent on the request ({namespace})"
            )));
        }
    }
    Ok(())
}

/// RFC 1123 subdomain rules (lower-case alphanumerics, `-` and `.`, at most 253 characters).
fn validate_name(res: &Resource, name: &str) -> Result<(), ApiError> {
    let ok = name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            res.group,
            res.resource,
            name,
            format!("metadata.name: Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"),
        ))
    }
}

fn spec_changed(old: &Value, new: &Value) -> bool {
    let strip = |v: &Value| {
        let mut m = v.as_object().cloned().unwrap_or_default();
        m.remove("metadata");
        m.remove("status");
        m
    };
    strip(old) != strip(new)
}

/// Five characters as kube-apiserver appends to generateName.
fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let bytes = uuid::Uuid::new_v4().into_bytes();
    bytes[..5]
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

/// Now, as RFC 3339 with seconds (`2026-11-30T04:21:13Z`).
pub fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::find;

    /// A store with the namespaces the tests use.
    fn store(cap: usize) -> Store {
        let s = Store::new(cap);
        let ns = find("", "v1", "namespaces").unwrap();
        for n in ["default", "other"] {
            s.create(ns, "", json!({"metadata": {"name": n}})).unwrap();
        }
        s
    }

    #[test]
    fn state_file_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let s = Store::open(10, ServiceConfig::default(), &path).unwrap();
        let ns = find("", "v1", "namespaces").unwrap();
        s.create(ns, "", json!({"metadata": {"name": "default"}}))
            .unwrap();
        let a = s
            .create(
                svc(),
                "default",
                json!({"metadata": {"name": "a"}, "spec": {"ports": [{"port": 80}]}}),
            )
            .unwrap();
        let rv = s.resource_version();
        drop(s);
        let s = Store::open(10, ServiceConfig::default(), &path).unwrap();
        assert_eq!(s.resource_version(), rv);
        assert_eq!(s.get(svc(), "default", "a").unwrap(), a);
        // The history is gone: older resourceVersions are expired, the current one is not.
        assert_eq!(s.watch(svc(), None, Some(rv - 1)).unwrap_err().code, 410);
        assert!(s.watch(svc(), None, Some(rv)).is_ok());
        // The allocator sees what was loaded.
        let b = s
            .create(
                svc(),
                "default",
                json!({"metadata": {"name": "b"}, "spec": {"ports": [{"port": 80}]}}),
            )
            .unwrap();
        assert_ne!(b["spec"]["clusterIP"], a["spec"]["clusterIP"]);
        assert!(s.resource_version() > rv);
        std::fs::write(&path, "{").unwrap();
        match Store::open(10, ServiceConfig::default(), &path) {
            Err(e) => assert!(e.contains("state.json"), "{e}"),
            Ok(_) => panic!("a broken state file must not load"),
        }
    }

    #[test]
    fn namespaces_must_exist_and_take_their_objects_along() {
        let s = store(100);
        let e = s
            .create(
                svc(),
                "nope",
                json!({"metadata": {"name": "a"}, "spec": {"ports": [{"port": 80}]}}),
            )
            .unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (404, "namespaces \"nope\" not found")
        );
        s.create(
            svc(),
            "other",
            json!({"metadata": {"name": "a"}, "spec": {"ports": [{"port": 80}]}}),
        )
        .unwrap();
        s.create(
            svc(),
            "default",
            json!({"metadata": {"name": "a"}, "spec": {"ports": [{"port": 80}]}}),
        )
        .unwrap();
        let ns = find("", "v1", "namespaces").unwrap();
        let (_, mut rx) = s.watch(svc(), None, None).unwrap();
        s.delete(ns, "", "other", None).unwrap();
        assert_eq!(s.get(svc(), "other", "a").unwrap_err().code, 404);
        assert!(s.get(svc(), "default", "a").is_ok());
        let mut deleted = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            deleted.push((ev.key.resource.clone(), ev.key.name.clone(), ev.kind));
        }
        assert_eq!(
            deleted,
            vec![
                (
                    "namespaces".to_string(),
                    "other".to_string(),
                    EventType::Deleted
                ),
                ("services".to_string(), "a".to_string(), EventType::Deleted),
            ]
        );
    }

    fn svc() -> &'static Resource {
        find("", "v1", "services").unwrap()
    }

    fn rv(v: &Value) -> u64 {
        v["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    #[test]
    fn create_stamps_metadata_and_rejects_duplicates() {
        let s = store(10);
        let a = s
            .create(
                svc(),
                "default",
                json!({"metadata": {"name": "a"}, "spec": {"ports": [{"port": 80}]}, "status": {"x": 1}}),
            )
            .unwrap();
        assert_eq!(a["kind"], "Service");
        assert_eq!(a["metadata"]["namespace"], "default");
        assert_eq!(a["metadata"]["generation"], 1);
        assert!(a["metadata"]["uid"].as_str().unwrap().len() == 36);
        assert!(a.get("status").is_none(), "status is dropped on create");
        assert_eq!(rv(&a), s.resource_version());
        let e = s
            .create(
                svc(),
                "default",
                json!({"metadata": {"name": "a"}, "spec": {"ports": [{"port": 80}]}}),
            )
            .unwrap_err();
        assert_eq!((e.code, e.reason), (409, "AlreadyExists"));
        // Same name in another namespace is another object.
        s.create(
            svc(),
            "other",
            json!({"metadata": {"name": "a"}, "spec": {"ports": [{"port": 80}]}}),
        )
        .unwrap();
        let g = s
            .create(
                svc(),
                "default",
                json!({"metadata": {"generateName": "web-"}, "spec": {"ports": [{"port": 80}]}}),
            )
            .unwrap();
        let name = g["metadata"]["name"].as_str().unwrap();
        assert!(name.starts_with("web-") && name.len() == 9, "{name}");
        let bad = s
            .create(
                svc(),
                "default",
                json!({"metadata": {"name": "Bad_Name"}, "spec": {"ports": [{"port": 80}]}}),
            )
            .unwrap_err();
        assert_eq!(bad.code, 422);
        let ns_mismatch = s
            .create(
                svc(),
                "default",
                json!({"metadata": {"name": "b", "namespace": "x"}, "spec": {"ports": [{"port": 80}]}}),
            )
            .unwrap_err();
        assert_eq!(ns_mismatch.code, 400);
    }

    #[test]
    fn resource_versions_grow_and_stale_updates_conflict() {
        let s = store(10);
        let a = s
            .create(
                svc(),
                "default",
                json!({"metadata": {"name": "a"}, "spec": {"type": "ClusterIP", "ports": [{"port": 80}]}}),
            )
            .unwrap();
        let mut b = a.clone();
        b["spec"]["type"] = json!("NodePort");
        let b = s.update(svc(), "default", "a", b, Part::Main).unwrap();
        assert!(rv(&b) > rv(&a));
        assert_eq!(b["metadata"]["generation"], 2);
        assert_eq!(b["metadata"]["uid"], a["metadata"]["uid"]);
        // The first version is stale now.
        let e = s
            .update(svc(), "default", "a", a.clone(), Part::Main)
            .unwrap_err();
        assert_eq!((e.code, e.reason), (409, "Conflict"));
        // No resourceVersion: unconditional.
        let mut c = a.clone();
        c["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("resourceVersion");
        let c = s.update(svc(), "default", "a", c, Part::Main).unwrap();
        assert_eq!(c["spec"]["type"], "ClusterIP");
        // No-op update: same resourceVersion.
        let d = s
            .update(svc(), "default", "a", c.clone(), Part::Main)
            .unwrap();
        assert_eq!(rv(&d), rv(&c));
        let e = s.update(svc(), "default", "zz", c, Part::Main).unwrap_err();
        assert_eq!(e.code, 404);
    }

    #[test]
    fn status_and_main_writes_touch_only_their_part() {
        let s = store(10);
        let a = s
            .create(
                svc(),
                "default",
                json!({"metadata": {"name": "a"}, "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}}),
            )
            .unwrap();
        let mut st = a.clone();
        st["status"] = json!({"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}});
        st["spec"]["type"] = json!("ClusterIP");
        let b = s.update(svc(), "default", "a", st, Part::Status).unwrap();
        assert_eq!(
            b["spec"]["type"], "LoadBalancer",
            "status write ignores spec"
        );
        assert_eq!(b["status"]["loadBalancer"]["ingress"][0]["ip"], "192.0.2.1");
        assert_eq!(b["metadata"]["generation"], 1);
        let mut m = b.clone();
        m["status"] = json!({});
        m["metadata"]["labels"] = json!({"x": "y"});
        let c = s.update(svc(), "default", "a", m, Part::Main).unwrap();
        assert_eq!(c["status"]["loadBalancer"]["ingress"][0]["ip"], "192.0.2.1");
        assert_eq!(c["metadata"]["labels"]["x"], "y");
    }

    #[test]
    fn delete_returns_object_and_checks_precondition() {
        let s = store(10);
        let a = s
            .create(
                svc(),
                "default",
                json!({"metadata": {"name": "a"}, "spec": {"ports": [{"port": 80}]}}),
            )
            .unwrap();
        let e = s.delete(svc(), "default", "a", Some("1")).unwrap_err();
        assert_eq!(e.code, 409);
        let d = s.delete(svc(), "default", "a", None).unwrap();
        assert_eq!(d["metadata"]["name"], "a");
        assert!(rv(&d) > rv(&a));
        assert_eq!(s.delete(svc(), "default", "a", None).unwrap_err().code, 404);
    }

    #[test]
    fn watch_replays_history_and_expires_old_versions() {
        let s = store(3);
        let start = s.resource_version();
        for i in 0..2 {
            s.create(
                svc(),
                "default",
                json!({"metadata": {"name": format!("s{i}")}, "spec": {"ports": [{"port": 80}]}}),
            )
            .unwrap();
        }
        let (ws, _rx) = s.watch(svc(), Some("default"), Some(start)).unwrap();
        match ws {
            WatchStart::Replay { events, .. } => assert_eq!(events.len(), 2),
            WatchStart::Snapshot { .. } => panic!("expected a replay"),
        }
        for i in 2..6 {
            s.create(
                svc(),
                "default",
                json!({"metadata": {"name": format!("s{i}")}, "spec": {"ports": [{"port": 80}]}}),
            )
            .unwrap();
        }
        let e = s.watch(svc(), None, Some(start)).unwrap_err();
        assert_eq!((e.code, e.reason), (410, "Expired"));
        let oldest = s.oldest_watchable();
        let (ws, _rx) = s.watch(svc(), None, Some(oldest)).unwrap();
        match ws {
            WatchStart::Replay { events, .. } => assert_eq!(events.len(), 3),
            WatchStart::Snapshot { .. } => panic!("expected a replay"),
        }
        let (ws, _rx) = s.watch(svc(), Some("other"), None).unwrap();
        match ws {
            WatchStart::Snapshot { objects, rv } => {
                assert!(objects.is_empty());
                assert_eq!(rv, s.resource_version());
            }
            WatchStart::Replay { .. } => panic!("expected a snapshot"),
        }
    }
}
