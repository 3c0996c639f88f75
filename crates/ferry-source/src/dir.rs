//! The manifest-directory source: every *.yaml, *.yml and *.json under a directory, read as one
//! snapshot of the cluster's objects.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::manifest::{parse_text, ManifestError};
use ferry_model::{
    BfdProfileCr, BgpAdvertisementCr, BgpPeerCr, CommunityCr, ConfigMap, EndpointSlice,
    IpAddressPool, L2Advertisement, Namespace, Node, Object, ObjectRef, Secret, Service,
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
    pub bgp_peers: Vec<BgpPeerCr>,
    pub bgp_advertisements: Vec<BgpAdvertisementCr>,
    pub communities: Vec<CommunityCr>,
    pub bfd_profiles: Vec<BfdProfileCr>,
    /// Secrets (for BGPPeers' passwordSecret).
    pub secrets: Vec<Secret>,
    /// Modification time (ms since the epoch) of the file each service came from (for AGE).
    pub service_mtime_ms: BTreeMap<ObjectRef, u64>,
    pub errors: Vec<ManifestError>,
    pub warnings: Vec<ManifestError>,
}

impl Snapshot {
    /// The BGP inputs of [`ferry_model::bgp::load`] (pass the pools from
    /// [`ferry_model::pools::load`] of the same snapshot).
    pub fn bgp_inputs(&self) -> ferry_model::bgp::BgpInputs<'_> {
        ferry_model::bgp::BgpInputs {
            config_maps: &self.config_maps,
            peers: &self.bgp_peers,
            advertisements: &self.bgp_advertisements,
            communities: &self.communities,
            bfd_profiles: &self.bfd_profiles,
            secrets: &self.secrets,
        }
    }
}

fn is_manifest(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// Paths that could not be walked or read, with why.
type Skipped = Vec<(PathBuf, String)>;

fn walk(dir: &Path, out: &mut Vec<PathBuf>, skipped: &mut Skipped) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let ft = entry.file_type()?;
        let path = entry.path();
        // Hidden entries are not read: editors' temporary files, and the `..data` /
        // `..2026_...` directories of a ConfigMap mounted as a volume, whose files are also
        // linked at the top (read there, once).
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if ft.is_dir() {
            match walk(&path, out, skipped) {
                Ok(()) => {}
                // A directory that vanished meanwhile is not an error.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => skipped.push((path, format!("cannot read this directory: {e}"))),
            }
        } else if is_manifest(&path) {
            if ft.is_symlink() && std::fs::metadata(&path).is_err() {
                let target = std::fs::read_link(&path)
                    .map(|t| t.display().to_string())
                    .unwrap_or_default();
                skipped.push((path, format!("a dangling symlink (to {target:?}): skipped")));
                continue;
            }
            out.push(path);
        }
    }
    Ok(())
}

pub fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    Ok(manifest_files_and_skipped(dir)?.0)
}

/// The manifest files under `dir` in path order, and the paths that were skipped, with why.
pub fn manifest_files_and_skipped(dir: &Path) -> std::io::Result<(Vec<PathBuf>, Skipped)> {
    let mut files = Vec::new();
    let mut skipped = Vec::new();
    walk(dir, &mut files, &mut skipped)?;
    files.sort();
    skipped.sort();
    Ok((files, skipped))
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
        let (files, skipped) = manifest_files_and_skipped(&dir)?;
        for (path, why) in skipped {
            let shown = path
                .strip_prefix(&dir)
                .unwrap_or(&path)
                .display()
                .to_string();
            snap.errors.push(file_problem(&shown, why));
        }
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
            // Only regular files (symlinks followed): a FIFO would block the read forever, a
            // device (a link to /dev/zero) would never end.
            if !meta.is_file() {
                snap.errors.push(file_problem(
                    &shown,
                    "not a regular file (a FIFO, device or socket): skipped".into(),
                ));
                continue;
            }
            if meta.len() > MAX_FILE_BYTES {
                snap.errors.push(file_problem(
                    &shown,
                    format!(
                        "{} bytes: larger than the {} MiB a manifest file may have: skipped",
                        meta.len(),
                        MAX_FILE_BYTES >> 20
                    ),
                ));
                continue;
            }
            let (mt, size) = (mtime(&meta), meta.len());
            let fresh = self
                .cache
                .get(&f)
                .is_some_and(|c| c.mtime_ns == mt && c.size == size);
            if !fresh {
                let text = match read_bounded(&f, size) {
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
                    Object::BgpPeer(p) => snap.bgp_peers.push((**p).clone()),
                    Object::BgpAdvertisement(a) => snap.bgp_advertisements.push(a.clone()),
                    Object::Community(c) => snap.communities.push(c.clone()),
                    Object::BfdProfile(b) => snap.bfd_profiles.push(b.clone()),
                    Object::Secret(s) => snap.secrets.push(s.clone()),
                }
            }
        }
        Ok(snap)
    }
}

/// The largest manifest file read (the API server takes objects of up to ~1.5 MB; a file may
/// hold many).
pub const MAX_FILE_BYTES: u64 = 16 << 20;

/// Reads a file of at most [`MAX_FILE_BYTES`] (one that grew past it meanwhile is an error).
fn read_bounded(path: &Path, size: u64) -> std::io::Result<String> {
    use std::io::Read;
    // Sized up front, as std::fs::read_to_string does (no regrowth, no fragmentation).
    let mut text = String::with_capacity(size.min(MAX_FILE_BYTES) as usize + 1);
    std::fs::File::open(path)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than the {} MiB a manifest file may have",
            MAX_FILE_BYTES >> 20
        )));
    }
    Ok(text)
}

fn file_error(shown: &str, e: std::io::Error) -> ManifestError {
    file_problem(shown, format!("cannot read: {e}"))
}

fn file_problem(shown: &str, message: String) -> ManifestError {
    ManifestError {
        at: crate::manifest::Location {
            file: shown.to_string(),
            doc_index: 0,
            object: None,
            field: String::new(),
        },
        message,
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
    fn fifos_devices_and_huge_files_are_skipped_with_an_error() {
        let dir = TempDir::new("special");
        std::fs::write(dir.0.join("a.yaml"), SVC).unwrap();
        let fifo =
            std::ffi::CString::new(dir.0.join("x.yaml").to_string_lossy().as_bytes()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        std::os::unix::fs::symlink("/dev/zero", dir.0.join("zero.yaml")).unwrap();
        let big = std::fs::File::create(dir.0.join("big.json")).unwrap();
        big.set_len(MAX_FILE_BYTES + 1).unwrap();
        let mut reader = Reader::new(&dir.0);
        // Returns (a FIFO would block here, /dev/zero would read until memory runs out).
        let snap = reader.read().unwrap();
        assert_eq!(snap.services.len(), 1, "the good file still counts");
        let errors: Vec<String> = snap.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(errors.len(), 3, "{errors:#?}");
        for (file, what) in [
            ("x.yaml", "not a regular file"),
            ("zero.yaml", "not a regular file"),
            ("big.json", "larger than the 16 MiB"),
        ] {
            assert!(
                errors
                    .iter()
                    .any(|e| e.starts_with(file) && e.contains(what)),
                "{file}: {errors:#?}"
            );
        }
    }

    #[test]
    fn a_configmap_mount_is_read_once_and_broken_paths_are_reported() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let dir = TempDir::new("cm");
        // The layout of a ConfigMap volume: x.yaml -> ..data/x.yaml, ..data -> ..2026_11_30.
        std::fs::create_dir_all(dir.0.join("..2026_11_30")).unwrap();
        std::fs::write(dir.0.join("..2026_11_30/x.yaml"), SVC).unwrap();
        symlink("..2026_11_30", dir.0.join("..data")).unwrap();
        symlink("..data/x.yaml", dir.0.join("x.yaml")).unwrap();
        symlink("gone.yaml", dir.0.join("dangling.yaml")).unwrap();
        std::fs::create_dir_all(dir.0.join("locked")).unwrap();
        std::fs::write(dir.0.join("locked/y.yaml"), SVC.replace("web", "other")).unwrap();
        std::fs::set_permissions(dir.0.join("locked"), std::fs::Permissions::from_mode(0o000))
            .unwrap();
        let snap = Reader::new(&dir.0).read().unwrap();
        std::fs::set_permissions(dir.0.join("locked"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        // root reads any directory: the locked one is only unreadable for other users.
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let web = snap
            .services
            .iter()
            .filter(|s| s.meta.name == "web")
            .count();
        assert_eq!(web, 1, "read once: {:#?}", snap.warnings);
        assert_eq!(snap.services.len(), 1 + usize::from(root));
        assert!(snap.warnings.is_empty(), "{:#?}", snap.warnings);
        let errors: Vec<String> = snap.errors.iter().map(|e| e.to_string()).collect();
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("dangling.yaml") && e.contains("dangling symlink")),
            "{errors:#?}"
        );
        assert_eq!(
            errors
                .iter()
                .any(|e| e.starts_with("locked") && e.contains("cannot read this directory")),
            !root,
            "{errors:#?}"
        );
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stall() {
        // 100,000 levels: refused by the parsers' depth limits.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        for file in ["deep.json", "deep.yaml"] {
            let p = parse_text(file, &deep);
            assert!(p.objects.is_empty());
            assert_eq!(p.errors.len(), 1, "{file}: {:#?}", p.errors);
        }
    }

    #[test]
    fn a_list_of_many_nulls_is_one_error_each_and_reading_stays_linear() {
        let dir = TempDir::new("nulls");
        let items = vec!["null"; 100_000].join(",");
        std::fs::write(
            dir.0.join("list.json"),
            format!(r#"{{"apiVersion": "v1", "kind": "List", "items": [{items}]}}"#),
        )
        .unwrap();
        std::fs::write(dir.0.join("a.yaml"), SVC).unwrap();
        let mut reader = Reader::new(&dir.0);
        let t = std::time::Instant::now();
        let snap = reader.read().unwrap();
        assert_eq!(snap.services.len(), 1);
        assert_eq!(snap.errors.len() + snap.warnings.len(), 100_000);
        // A change to another file re-reads only that file.
        std::fs::write(dir.0.join("a.yaml"), SVC.replace("80", "81")).unwrap();
        let snap = reader.read().unwrap();
        assert_eq!(snap.services[0].ports[0].port, 81);
        eprintln!("100,000 nulls: read twice in {:?}", t.elapsed());
    }

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
