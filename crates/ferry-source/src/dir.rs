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

/// Which of a [`Snapshot`]'s lists an object is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Service,
    EndpointSlice,
    Node,
    ConfigMap,
    Namespace,
    IpAddressPool,
    L2Advertisement,
    BgpPeer,
    BgpAdvertisement,
    Community,
    BfdProfile,
    Secret,
}

const KINDS: usize = 12;

/// Where one object of a cached file is between reads.
#[derive(Debug)]
enum Held {
    /// In the snapshot last handed out, in its kind's list (in path order): the snapshot holds
    /// the only copy, and [`Reader::give_back`] returns it.
    Lent(Kind),
    /// A duplicate of an object read earlier in path order: not in the snapshot, so kept here
    /// (it is the one read once the first goes away).
    Aside(Box<Object>),
}

/// Inline for the usual one object a file holds.
type Objects = smallvec::SmallVec<[Held; 1]>;

struct CachedFile {
    mtime_ns: u128,
    size: u64,
    /// The file's objects, in order.
    objects: Objects,
    /// The file's errors and warnings (as [`crate::manifest::Parsed`]); None when it has none.
    problems: Option<Box<(Vec<ManifestError>, Vec<ManifestError>)>>,
}

/// The objects of the snapshot given back, taken out kind by kind in path order.
#[derive(Default)]
struct Returned {
    services: std::vec::IntoIter<Service>,
    slices: std::vec::IntoIter<EndpointSlice>,
    nodes: std::vec::IntoIter<Node>,
    config_maps: std::vec::IntoIter<ConfigMap>,
    namespaces: std::vec::IntoIter<Namespace>,
    ip_pools: std::vec::IntoIter<IpAddressPool>,
    l2_advertisements: std::vec::IntoIter<L2Advertisement>,
    bgp_peers: std::vec::IntoIter<BgpPeerCr>,
    bgp_advertisements: std::vec::IntoIter<BgpAdvertisementCr>,
    communities: std::vec::IntoIter<CommunityCr>,
    bfd_profiles: std::vec::IntoIter<BfdProfileCr>,
    secrets: std::vec::IntoIter<Secret>,
}

impl Returned {
    fn of(s: Snapshot) -> Returned {
        Returned {
            services: s.services.into_iter(),
            slices: s.slices.into_iter(),
            nodes: s.nodes.into_iter(),
            config_maps: s.config_maps.into_iter(),
            namespaces: s.namespaces.into_iter(),
            ip_pools: s.ip_pools.into_iter(),
            l2_advertisements: s.l2_advertisements.into_iter(),
            bgp_peers: s.bgp_peers.into_iter(),
            bgp_advertisements: s.bgp_advertisements.into_iter(),
            communities: s.communities.into_iter(),
            bfd_profiles: s.bfd_profiles.into_iter(),
            secrets: s.secrets.into_iter(),
        }
    }

    /// The next object of `kind` (None only if the snapshot given back was not the one lent).
    fn next(&mut self, kind: Kind) -> Option<Object> {
        Some(match kind {
            Kind::Service => Object::Service(self.services.next()?),
            Kind::EndpointSlice => Object::EndpointSlice(self.slices.next()?),
            Kind::Node => Object::Node(self.nodes.next()?),
            Kind::ConfigMap => Object::ConfigMap(self.config_maps.next()?),
            Kind::Namespace => Object::Namespace(self.namespaces.next()?),
            Kind::IpAddressPool => Object::IpAddressPool(self.ip_pools.next()?),
            Kind::L2Advertisement => Object::L2Advertisement(self.l2_advertisements.next()?),
            Kind::BgpPeer => Object::BgpPeer(Box::new(self.bgp_peers.next()?)),
            Kind::BgpAdvertisement => Object::BgpAdvertisement(self.bgp_advertisements.next()?),
            Kind::Community => Object::Community(self.communities.next()?),
            Kind::BfdProfile => Object::BfdProfile(self.bfd_profiles.next()?),
            Kind::Secret => Object::Secret(self.secrets.next()?),
        })
    }

    /// A file's objects, in order (its lent ones taken back).
    fn take(&mut self, objects: Objects) -> Vec<Object> {
        objects
            .into_iter()
            .filter_map(|h| match h {
                Held::Lent(k) => self.next(k),
                Held::Aside(o) => Some(*o),
            })
            .collect()
    }
}

/// How many objects of each kind a snapshot holds.
fn counts(s: &Snapshot) -> [usize; KINDS] {
    [
        s.services.len(),
        s.slices.len(),
        s.nodes.len(),
        s.config_maps.len(),
        s.namespaces.len(),
        s.ip_pools.len(),
        s.l2_advertisements.len(),
        s.bgp_peers.len(),
        s.bgp_advertisements.len(),
        s.communities.len(),
        s.bfd_profiles.len(),
        s.secrets.len(),
    ]
}

/// Puts `obj` into the snapshot (its kind's list), or aside when an object of the same kind
/// and name came earlier in path order (with a warning naming that file).
fn place(
    obj: Object,
    shown: &str,
    mt_ms: u64,
    seen: &mut std::collections::HashMap<(&'static str, ObjectRef), std::rc::Rc<str>>,
    here: &std::rc::Rc<str>,
    snap: &mut Snapshot,
) -> Held {
    let key = (obj.kind(), obj.meta().object_ref());
    if let Some(first) = seen.get(&key) {
        snap.warnings.push(ManifestError {
            at: crate::manifest::Location {
                file: shown.to_string(),
                doc_index: 0,
                object: Some(format!("{} {}", key.0, key.1)),
                field: String::new(),
            },
            message: format!("duplicate of the one in {first}: ignored"),
        });
        return Held::Aside(Box::new(obj));
    }
    let kind = match obj {
        Object::Service(s) => {
            snap.service_mtime_ms.insert(key.1.clone(), mt_ms);
            snap.services.push(s);
            Kind::Service
        }
        Object::EndpointSlice(s) => {
            snap.slices.push(s);
            Kind::EndpointSlice
        }
        Object::Node(n) => {
            snap.nodes.push(n);
            Kind::Node
        }
        Object::ConfigMap(c) => {
            snap.config_maps.push(c);
            Kind::ConfigMap
        }
        Object::Namespace(n) => {
            snap.namespaces.push(n);
            Kind::Namespace
        }
        Object::IpAddressPool(p) => {
            snap.ip_pools.push(p);
            Kind::IpAddressPool
        }
        Object::L2Advertisement(l) => {
            snap.l2_advertisements.push(l);
            Kind::L2Advertisement
        }
        Object::BgpPeer(p) => {
            snap.bgp_peers.push(*p);
            Kind::BgpPeer
        }
        Object::BgpAdvertisement(a) => {
            snap.bgp_advertisements.push(a);
            Kind::BgpAdvertisement
        }
        Object::Community(c) => {
            snap.communities.push(c);
            Kind::Community
        }
        Object::BfdProfile(b) => {
            snap.bfd_profiles.push(b);
            Kind::BfdProfile
        }
        Object::Secret(s) => {
            snap.secrets.push(s);
            Kind::Secret
        }
    };
    seen.insert(key, here.clone());
    Held::Lent(kind)
}

/// Reads a manifest directory again and again, parsing only the files that changed since the
/// last read (by modification time and size): with 10,000 objects, a change to one file costs
/// one file's parse.
///
/// The objects are kept once: a read hands them out in the [`Snapshot`], and the caller gives
/// that back ([`Reader::give_back`]) when done with it, for the next read to reuse. A snapshot
/// not given back costs the next read a parse of every file.
pub struct Reader {
    dir: PathBuf,
    /// By path, in path order (as listed: no spare room, unlike a map's nodes).
    cache: Vec<(Box<Path>, CachedFile)>,
    /// The last snapshot, given back (its objects are the cache's [`Held::Lent`] ones).
    returned: Option<Box<Snapshot>>,
    /// How many objects of each kind the last snapshot lent.
    lent: [usize; KINDS],
}

impl Reader {
    pub fn new(dir: &Path) -> Reader {
        Reader {
            dir: dir.to_path_buf(),
            cache: Vec::new(),
            returned: None,
            lent: [0; KINDS],
        }
    }

    /// Returns the snapshot the last [`Reader::read`] handed out (unchanged), for the next read
    /// to take its objects from instead of parsing their files again.
    pub fn give_back(&mut self, mut snap: Snapshot) {
        if counts(&snap) == self.lent {
            // Made again by every read: not kept meanwhile.
            snap.service_mtime_ms = BTreeMap::new();
            snap.errors = Vec::new();
            snap.warnings = Vec::new();
            self.returned = Some(Box::new(snap));
        }
    }

    /// A snapshot of the directory. A file that cannot be read is reported like a bad document;
    /// duplicates (same kind, namespace and name in two places) keep the first one in path
    /// order and report the others.
    pub fn read(&mut self) -> std::io::Result<Snapshot> {
        let dir = self.dir.clone();
        let (files, skipped) = manifest_files_and_skipped(&dir)?;
        // The objects lent last time: back, or else gone with the snapshot (parse again).
        let mut back = match self.returned.take() {
            Some(s) => Returned::of(*s),
            None => {
                self.cache.clear();
                Returned::default()
            }
        };
        let mut snap = Snapshot::default();
        // Sized as last time: the lists are kept until the next read, without spare room.
        snap.services.reserve_exact(self.lent[0]);
        snap.slices.reserve_exact(self.lent[1]);
        for (path, why) in skipped {
            let shown = path
                .strip_prefix(&dir)
                .unwrap_or(&path)
                .display()
                .to_string();
            snap.errors.push(file_problem(&shown, why));
        }
        let mut seen = std::collections::HashMap::new();
        let mut old = std::mem::take(&mut self.cache).into_iter().peekable();
        self.cache.reserve_exact(files.len());
        for f in files {
            // Files gone since the last read: their objects are dropped.
            while old.peek().is_some_and(|(p, _)| **p < *f) {
                if let Some((_, gone)) = old.next() {
                    back.take(gone.objects);
                }
            }
            let prev = match old.peek() {
                Some((p, _)) if **p == *f => old.next().map(|(_, c)| c),
                _ => None,
            };
            let shown = f.strip_prefix(&dir).unwrap_or(&f).display().to_string();
            let Some((mt, size, objects, problems)) =
                self.load(&f, &shown, prev, &mut back, &mut snap)
            else {
                continue;
            };
            let mt_ms = (mt / 1_000_000) as u64;
            if let Some(p) = &problems {
                snap.errors.extend(p.0.iter().cloned());
                snap.warnings.extend(p.1.iter().cloned());
            }
            let here: std::rc::Rc<str> = shown.as_str().into();
            let objects = objects
                .into_iter()
                .map(|o| place(o, &shown, mt_ms, &mut seen, &here, &mut snap))
                .collect();
            self.cache.push((
                f.into_boxed_path(),
                CachedFile {
                    mtime_ns: mt,
                    size,
                    objects,
                    problems,
                },
            ));
        }
        drop(old);
        snap.services.shrink_to_fit();
        snap.slices.shrink_to_fit();
        self.lent = counts(&snap);
        Ok(snap)
    }

    /// A file's modification time, size, objects and problems: those of `prev` when the file
    /// is unchanged, else parsed again. None when it is skipped (an error in `snap`) or gone.
    #[allow(clippy::type_complexity)]
    fn load(
        &self,
        f: &Path,
        shown: &str,
        prev: Option<CachedFile>,
        back: &mut Returned,
        snap: &mut Snapshot,
    ) -> Option<(
        u128,
        u64,
        Vec<Object>,
        Option<Box<(Vec<ManifestError>, Vec<ManifestError>)>>,
    )> {
        // Whatever happens, the previous objects come back out of the snapshot (in order).
        let prev = prev.map(|c| (c.mtime_ns, c.size, c.problems, back.take(c.objects)));
        let meta = match std::fs::metadata(f) {
            Ok(m) => m,
            // Deleted between listing and reading: it is simply gone.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                snap.errors.push(file_error(shown, e));
                return None;
            }
        };
        // Only regular files (symlinks followed): a FIFO would block the read forever, a
        // device (a link to /dev/zero) would never end.
        if !meta.is_file() {
            snap.errors.push(file_problem(
                shown,
                "not a regular file (a FIFO, device or socket): skipped".into(),
            ));
            return None;
        }
        if meta.len() > MAX_FILE_BYTES {
            snap.errors.push(file_problem(
                shown,
                format!(
                    "{} bytes: larger than the {} MiB a manifest file may have: skipped",
                    meta.len(),
                    MAX_FILE_BYTES >> 20
                ),
            ));
            return None;
        }
        let (mt, size) = (mtime(&meta), meta.len());
        if let Some((pmt, psize, problems, objects)) = prev {
            if pmt == mt && psize == size {
                return Some((mt, size, objects, problems));
            }
        }
        let text = match read_bounded(f, size) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                snap.errors.push(file_error(shown, e));
                return None;
            }
        };
        let parsed = parse_text(shown, &text);
        let problems = (!parsed.errors.is_empty() || !parsed.warnings.is_empty())
            .then(|| Box::new((parsed.errors, parsed.warnings)));
        Some((mt, size, parsed.objects, problems))
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
        reader.give_back(snap);
        // A change to another file re-reads only that file.
        std::fs::write(dir.0.join("a.yaml"), SVC.replace("80", "81")).unwrap();
        let snap = reader.read().unwrap();
        assert_eq!(snap.services[0].ports[0].port, 81);
        eprintln!("100,000 nulls: read twice in {:?}", t.elapsed());
    }

    #[test]
    fn a_snapshot_given_back_is_reused_and_stays_right() {
        let dir = TempDir::new("back");
        let svc = |name: &str, port: u16| SVC.replace("web", name).replace("80", &port.to_string());
        std::fs::write(dir.0.join("a.yaml"), svc("a", 80)).unwrap();
        std::fs::write(dir.0.join("b.yaml"), svc("b", 80)).unwrap();
        // c.yaml: a duplicate of a (kept aside), then its own object.
        std::fs::write(
            dir.0.join("c.yaml"),
            format!("{}---\n{}", svc("a", 81), svc("c", 80)),
        )
        .unwrap();
        std::fs::write(dir.0.join("d.yaml"), "kind: [\n").unwrap();
        let ports = |s: &Snapshot| -> Vec<(String, u16)> {
            s.services
                .iter()
                .map(|s| (s.meta.name.clone(), s.ports[0].port))
                .collect()
        };
        let mut reader = Reader::new(&dir.0);
        let fresh = || read_dir(&dir.0).unwrap();
        let snap = reader.read().unwrap();
        assert_eq!(
            ports(&snap),
            [("a".into(), 80), ("b".into(), 80), ("c".into(), 80)]
        );
        assert_eq!((snap.errors.len(), snap.warnings.len()), (1, 1));
        // Given back and read again (nothing changed): the same snapshot.
        reader.give_back(snap);
        let snap = reader.read().unwrap();
        let again = fresh();
        assert_eq!(ports(&snap), ports(&again));
        assert_eq!(snap.errors, again.errors);
        assert_eq!(snap.warnings, again.warnings);
        assert_eq!(snap.service_mtime_ms, again.service_mtime_ms);
        reader.give_back(snap);
        // a.yaml removed: the duplicate in c.yaml is the one now; b.yaml changed.
        std::fs::remove_file(dir.0.join("a.yaml")).unwrap();
        std::fs::write(dir.0.join("b.yaml"), svc("b", 8080)).unwrap();
        let snap = reader.read().unwrap();
        assert_eq!(
            ports(&snap),
            [("b".into(), 8080), ("a".into(), 81), ("c".into(), 80)]
        );
        assert_eq!(ports(&snap), ports(&fresh()));
        assert!(snap.warnings.is_empty(), "{:#?}", snap.warnings);
        reader.give_back(snap);
        // A new first file, and one at the end.
        std::fs::write(dir.0.join("0.yaml"), svc("zero", 80)).unwrap();
        std::fs::write(dir.0.join("e.yaml"), svc("e", 80)).unwrap();
        let snap = reader.read().unwrap();
        assert_eq!(ports(&snap), ports(&fresh()));
        assert_eq!(snap.services.len(), 5);
        // A snapshot that is not the one lent is not taken: the next read parses again.
        let mut other = snap.clone();
        other.services.pop();
        reader.give_back(other);
        let snap = reader.read().unwrap();
        assert_eq!(ports(&snap), ports(&fresh()));
        // Nor is one never given back.
        let snap = reader.read().unwrap();
        assert_eq!(ports(&snap), ports(&fresh()));
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
        reader.give_back(snap);

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
