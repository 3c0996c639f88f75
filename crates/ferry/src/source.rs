//! The manifest-directory source: every *.yaml, *.yml and *.json under a directory, read as one
//! snapshot of the cluster's objects.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_model::manifest::{parse_text, ManifestError};
use ferry_model::{ConfigMap, EndpointSlice, Node, Object, ObjectRef, Service};

/// What a directory held at one moment.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub nodes: Vec<Node>,
    pub config_maps: Vec<ConfigMap>,
    /// Modification time (ms since the epoch) of the file each service came from (for AGE).
    pub service_mtime_ms: BTreeMap<ObjectRef, u64>,
    pub errors: Vec<ManifestError>,
    pub warnings: Vec<ManifestError>,
}

/// (path, mtime ns, size) of every manifest file: a cheap "did anything change" check.
pub type DirStamp = Vec<(PathBuf, u128, u64)>;

fn is_manifest(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let ft = entry.file_type()?;
        let path = entry.path();
        if ft.is_dir() {
            // A directory that vanished meanwhile is not an error.
            let _ = walk(&path, out);
        } else if is_manifest(&path) && !entry.file_name().to_string_lossy().starts_with('.') {
            out.push(path);
        }
    }
    Ok(())
}

pub fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    walk(dir, &mut files)?;
    files.sort();
    Ok(files)
}

fn mtime(meta: &std::fs::Metadata) -> u128 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

pub fn stamp(dir: &Path) -> std::io::Result<DirStamp> {
    let mut v = Vec::new();
    for f in manifest_files(dir)? {
        if let Ok(m) = std::fs::metadata(&f) {
            v.push((f, mtime(&m), m.len()));
        }
    }
    Ok(v)
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Reads and parses every manifest under `dir`. A file that cannot be read is reported like a
/// bad document; duplicates (same kind, namespace and name in two places) keep the first one
/// in path order and report the others.
pub fn read_dir(dir: &Path) -> std::io::Result<Snapshot> {
    let mut snap = Snapshot::default();
    let mut seen: BTreeMap<(String, ObjectRef), String> = BTreeMap::new();
    for f in manifest_files(dir)? {
        let shown = f.strip_prefix(dir).unwrap_or(&f).display().to_string();
        let (text, mt) = match std::fs::read_to_string(&f).and_then(|t| {
            let m = std::fs::metadata(&f)?;
            Ok((t, m))
        }) {
            Ok((t, m)) => (t, (mtime(&m) / 1_000_000) as u64),
            // Deleted between listing and reading: it is simply gone.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                snap.errors.push(ManifestError {
                    at: ferry_model::manifest::Location {
                        file: shown.clone(),
                        doc_index: 0,
                        object: None,
                        field: String::new(),
                    },
                    message: format!("cannot read: {e}"),
                });
                continue;
            }
        };
        let parsed = parse_text(&shown, &text);
        snap.errors.extend(parsed.errors);
        snap.warnings.extend(parsed.warnings);
        for obj in parsed.objects {
            let key = (obj.kind().to_string(), obj.meta().object_ref());
            if let Some(first) = seen.get(&key) {
                snap.warnings.push(ManifestError {
                    at: ferry_model::manifest::Location {
                        file: shown.clone(),
                        doc_index: 0,
                        object: Some(format!("{} {}", key.0, key.1)),
                        field: String::new(),
                    },
                    message: format!("duplicate of the one in {first}: ignored"),
                });
                continue;
            }
            seen.insert(key, shown.clone());
            match obj {
                Object::Service(s) => {
                    snap.service_mtime_ms.insert(s.meta.object_ref(), mt);
                    snap.services.push(s);
                }
                Object::EndpointSlice(s) => snap.slices.push(s),
                Object::Node(n) => snap.nodes.push(n),
                Object::ConfigMap(c) => snap.config_maps.push(c),
                // Workloads are the lab's business; the agent only needs their endpoints.
                Object::Deployment(_) | Object::Pod(_) => {}
            }
        }
    }
    Ok(snap)
}
