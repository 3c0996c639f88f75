//! The manifest-directory source: every *.yaml, *.yml and *.json under a directory, read as one
//! snapshot of the cluster's objects.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::manifest::{parse_text, ManifestError};
use ferry_model::{
    ConfigMap, EndpointSlice, IpAddressPool, L2Advertisement, Namespace, Node, Object, ObjectRef,
    Service,
};

/// What a directory held at one moment.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub nodes: Vec<Node>,
    pub config_maps: Vec<ConfigMap>,
    pub namespaces: Vec<Namespace>,
    pub ip_pools: Vec<IpAddressPool>,
    pub l2_advertisements: Vec<L2Advertisement>,
    /// Modification time (ms since the epoch) of the file each service came from (for AGE).
    pub service_mtime_ms: BTreeMap<ObjectRef, u64>,
    pub errors: Vec<ManifestError>,
    pub warnings: Vec<ManifestError>,
}

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

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Reads and parses every manifest under `dir` (one-shot; the agent keeps a [`Reader`]).
pub fn read_dir(dir: &Path) -> std::io::Result<Snapshot> {
    Reader::new(dir).read()
}

struct CachedFile {
    mtime_ns: u128,
    size: u64,
    parsed: crate::manifest::Parsed,
}

/// Reads a manifest directory again and again, parsing only the files that changed since the
/// last read (by modification time and size): with 10,000 objects, a change to one file costs
/// one file's parse.
pub struct Reader {
    dir: PathBuf,
    cache: BTreeMap<PathBuf, CachedFile>,
}

impl Reader {
    pub fn new(dir: &Path) -> Reader {
        Reader {
            dir: dir.to_path_buf(),
            cache: BTreeMap::new(),
        }
    }

    /// A snapshot of the directory. A file that cannot be read is reported like a bad document;
    /// duplicates (same kind, namespace and name in two places) keep the first one in path
    /// order and report the others.
    pub fn read(&mut self) -> std::io::Result<Snapshot> {
        let dir = self.dir.clone();
        let mut snap = Snapshot::default();
        let mut seen: BTreeMap<(String, ObjectRef), String> = BTreeMap::new();
        let files = manifest_files(&dir)?;
        self.cache.retain(|p, _| files.binary_search(p).is_ok());
        for f in files {
            let shown = f.strip_prefix(&dir).unwrap_or(&f).display().to_string();
            let meta = match std::fs::metadata(&f) {
                Ok(m) => m,
                // Deleted between listing and reading: it is simply gone.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    snap.errors.push(file_error(&shown, e));
                    continue;
                }
            };
            let (mt, size) = (mtime(&meta), meta.len());
            let fresh = self
                .cache
                .get(&f)
                .is_some_and(|c| c.mtime_ns == mt && c.size == size);
            if !fresh {
                let text = match std::fs::read_to_string(&f) {
                    Ok(t) => t,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        snap.errors.push(file_error(&shown, e));
                        continue;
                    }
                };
                let mut parsed = parse_text(&shown, &text);
                // Kept until the file changes: no spare capacity (most files hold one object).
                parsed.objects.shrink_to_fit();
                self.cache.insert(
                    f.clone(),
                    CachedFile {
                        mtime_ns: mt,
                        size,
                        parsed,
                    },
                );
            }
            let Some(cached) = self.cache.get(&f) else {
                continue;
            };
            let mt_ms = (cached.mtime_ns / 1_000_000) as u64;
            let parsed = &cached.parsed;
            snap.errors.extend(parsed.errors.iter().cloned());
            snap.warnings.extend(parsed.warnings.iter().cloned());
            for obj in &parsed.objects {
                let key = (obj.kind().to_string(), obj.meta().object_ref());
                if let Some(first) = seen.get(&key) {
                    snap.warnings.push(ManifestError {
                        at: crate::manifest::Location {
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
                        snap.service_mtime_ms.insert(s.meta.object_ref(), mt_ms);
                        snap.services.push(s.clone());
                    }
                    Object::EndpointSlice(s) => snap.slices.push(s.clone()),
                    Object::Node(n) => snap.nodes.push(n.clone()),
                    Object::ConfigMap(c) => snap.config_maps.push(c.clone()),
                    Object::Namespace(n) => snap.namespaces.push(n.clone()),
                    Object::IpAddressPool(p) => snap.ip_pools.push(p.clone()),
                    Object::L2Advertisement(l) => snap.l2_advertisements.push(l.clone()),
                }
            }
        }
        Ok(snap)
    }
}

fn file_error(shown: &str, e: std::io::Error) -> ManifestError {
    ManifestError {
        at: crate::manifest::Location {
            file: shown.to_string(),
            doc_index: 0,
            object: None,
            field: String::new(),
        },
        message: format!("cannot read: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system's temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!(
                "ferry-source-{tag}-{}-{}",
                std::process::id(),
                now_ms()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const SVC: &str =
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n";

    #[test]
    fn reads_a_directory_and_rereads_changed_files() {
        let dir = TempDir::new("read");
        std::fs::create_dir_all(dir.0.join("sub")).unwrap();
        std::fs::write(dir.0.join("a.yaml"), SVC).unwrap();
        std::fs::write(dir.0.join("sub/b.yml"), SVC.replace("web", "api")).unwrap();
        std::fs::write(dir.0.join("notes.txt"), "not a manifest").unwrap();
        std::fs::write(dir.0.join(".hidden.yaml"), "{{{").unwrap();
        std::fs::write(
            dir.0.join("c.json"),
            r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": {"ports": [{"port": 81}]}}"#,
        )
        .unwrap();
        let mut reader = Reader::new(&dir.0);
        let snap = reader.read().unwrap();
        let names: Vec<_> = snap.services.iter().map(|s| s.meta.name.as_str()).collect();
        assert_eq!(names, ["web", "api"]);
        assert!(snap.errors.is_empty(), "{:#?}", snap.errors);
        // The second default/web (c.json, after a.yaml in path order) is a duplicate.
        assert_eq!(snap.warnings.len(), 1, "{:#?}", snap.warnings);
        assert_eq!(snap.warnings[0].at.file, "c.json");
        assert!(snap.warnings[0]
            .message
            .contains("duplicate of the one in a.yaml"));
        assert_eq!(snap.service_mtime_ms.len(), 2);

        // A broken file is an error naming it; the others still count.
        std::fs::write(dir.0.join("sub/b.yml"), "kind: [\n").unwrap();
        let snap = reader.read().unwrap();
        assert_eq!(snap.services.len(), 1);
        assert_eq!(snap.errors.len(), 1, "{:#?}", snap.errors);
        assert!(snap.errors[0]
            .to_string()
            .starts_with("sub/b.yml document 0"));
    }
}
