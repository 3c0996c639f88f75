//! Where a lab keeps its files, the lab.json record, and the per-lab lock.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Default parent of every lab's state dir.
pub const DEFAULT_DIR_ROOT: &str = "/run/ferry-lab";

/// Everything a lab command needs to know before reading lab.json: which lab, where its files
/// are, which `ferry` executable runs the agents (and `ferry get`), and which `ferry-lab`
/// executable runs the pods' server.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub prefix: String,
    pub root: PathBuf,
    pub exe: PathBuf,
    pub lab_exe: PathBuf,
}

/// The file name of the lab's executable (`ferry lab` and `ferry demo` run it).
pub const LAB_EXE_NAME: &str = "ferry-lab";
/// The file name of the agent's executable.
pub const FERRY_EXE_NAME: &str = "ferry";

impl Ctx {
    /// `dir_root` defaults to $FERRY_LAB_DIR_ROOT, then /run/ferry-lab; `exe` to $FERRY_EXE, then
    /// `ferry` next to the running executable. The pods' server is $FERRY_LAB_EXE, else the
    /// running executable when it is `ferry-lab`, else `ferry-lab` next to `exe`.
    pub fn new(prefix: &str, dir_root: Option<PathBuf>, exe: Option<PathBuf>) -> Result<Ctx> {
        validate_prefix(prefix)?;
        let root = match dir_root {
            Some(r) => r,
            None => {
                env_path("FERRY_LAB_DIR_ROOT").unwrap_or_else(|| PathBuf::from(DEFAULT_DIR_ROOT))
            }
        };
        let me = std::env::current_exe().context("finding the running executable")?;
        let exe = match exe.or_else(|| env_path("FERRY_EXE")) {
            Some(e) => e,
            None => me.with_file_name(FERRY_EXE_NAME),
        };
        let lab_exe = match env_path("FERRY_LAB_EXE") {
            Some(e) => e,
            None if me.file_name().is_some_and(|n| n == LAB_EXE_NAME) => me,
            None => exe.with_file_name(LAB_EXE_NAME),
        };
        Ok(Ctx {
            prefix: prefix.to_string(),
            root,
            exe,
            lab_exe,
        })
    }

    /// `exe` (which = "ferry") or `lab_exe` (which = "ferry-lab"), or a clear error when the
    /// file is missing, saying how to build it.
    pub fn require_exe(&self, which: &str) -> Result<&Path> {
        let (path, package) = if which == LAB_EXE_NAME {
            (&self.lab_exe, "ferry-lab")
        } else {
            (&self.exe, "ferry")
        };
        if !path.is_file() {
            bail!(
                "no {which} executable at {} (build it with `cargo build --release`, which builds \
                 both ferry and ferry-lab, or `cargo build -p {package}`; or set {})",
                path.display(),
                if which == LAB_EXE_NAME {
                    "FERRY_LAB_EXE"
                } else {
                    "FERRY_EXE"
                }
            );
        }
        Ok(path)
    }

    pub fn dir(&self) -> PathBuf {
        self.root.join(&self.prefix)
    }
    pub fn manifests(&self) -> PathBuf {
        self.dir().join("manifests")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.dir().join("state")
    }
    pub fn logs(&self) -> PathBuf {
        self.dir().join("logs")
    }
    pub fn pids(&self) -> PathBuf {
        self.dir().join("pids")
    }
    pub fn lab_json(&self) -> PathBuf {
        self.dir().join("lab.json")
    }
    pub fn lock_path(&self) -> PathBuf {
        self.root.join(format!("{}.lock", self.prefix))
    }
    pub fn agent_log(&self, node: &str) -> PathBuf {
        self.logs().join(format!("agent-{node}.log"))
    }
    /// Extra arguments for the node's agent, one per line (`ferry lab agent start NODE -- ...`).
    pub fn agent_args_file(&self, node: &str) -> PathBuf {
        self.dir().join(format!("agent-{node}.args"))
    }
    pub fn agent_pid_file(&self, node: &str) -> PathBuf {
        self.pids().join(format!("agent-{node}.pid"))
    }
    pub fn pod_log(&self, pod: &str) -> PathBuf {
        self.logs().join(format!("pod-{pod}.log"))
    }
    pub fn pod_pid_file(&self, pod: &str) -> PathBuf {
        self.pids().join(format!("pod-{pod}.pid"))
    }
    /// The kubeconfig for the host (kubectl): the API server on 127.0.0.1.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir().join("kubeconfig")
    }
    /// The kubeconfig for the nodes' agents: the API server on the LAN (192.168.2.5:6443).
    pub fn kubeconfig_nodes(&self) -> PathBuf {
        self.dir().join("kubeconfig-nodes")
    }
    /// The lab API server's objects (its `--state` file), kept across its restarts.
    pub fn api_state_file(&self) -> PathBuf {
        self.dir().join("apiserver-state.json")
    }
    /// Where the lab API server writes the host address it listens on, once it does.
    pub fn api_addr_file(&self) -> PathBuf {
        self.dir().join("apiserver.addr")
    }
    /// What the lab runtime has reconciled (see [`crate::runtime::Synced`]).
    pub fn runtime_synced_file(&self) -> PathBuf {
        self.dir().join("runtime.json")
    }
    /// `apiserver` or `runtime`: the lab's processes in the root network namespace.
    pub fn proc_log(&self, which: &str) -> PathBuf {
        self.logs().join(format!("{which}.log"))
    }
    pub fn proc_pid_file(&self, which: &str) -> PathBuf {
        self.pids().join(format!("{which}.pid"))
    }

    /// Name of the namespace holding the LAN bridge.
    pub fn lan_ns(&self) -> String {
        format!("{}-lan", self.prefix)
    }
    pub fn client_ns(&self) -> String {
        format!("{}-client", self.prefix)
    }
    pub fn node_ns(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }
    /// P-pod-<name>; names longer than 50 characters are truncated and get a hash suffix.
    pub fn pod_ns(&self, pod: &str) -> String {
        let short = if pod.len() > 50 {
            let cut: String = pod.chars().take(40).collect();
            format!("{cut}-{:08x}", fnv64(pod.as_bytes()) as u32)
        } else {
            pod.to_string()
        };
        format!("{}-pod-{short}", self.prefix)
    }

    /// Whether `ns` is named like a namespace of this lab (used when lab.json is missing).
    pub fn owns_ns_name(&self, ns: &str) -> bool {
        let Some(rest) = ns
            .strip_prefix(&self.prefix)
            .and_then(|r| r.strip_prefix('-'))
        else {
            return false;
        };
        if rest == "lan" || rest == "client" || rest == "router" {
            return true;
        }
        if let Some(p) = rest.strip_prefix("pod-") {
            return !p.is_empty();
        }
        for node_prefix in ["k3s-master-rpi", "k3s-worker-rpi"] {
            if let Some(num) = rest.strip_prefix(node_prefix) {
                return !num.is_empty() && num.bytes().all(|b| b.is_ascii_digit());
            }
        }
        false
    }
}

/// Prefixes: lowercase letters, digits and '-', at most 24 characters, and no '-'-separated
/// segment that could make one lab's namespace names look like another lab's.
pub fn validate_prefix(prefix: &str) -> Result<()> {
    if prefix.is_empty() || prefix.len() > 24 {
        bail!("lab prefix {prefix:?} must be 1 to 24 characters long");
    }
    if !prefix
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        || prefix.starts_with('-')
        || prefix.ends_with('-')
    {
        bail!("lab prefix {prefix:?} may only hold lowercase letters, digits and inner '-'");
    }
    for seg in prefix.split('-') {
        if matches!(seg, "lan" | "client" | "router" | "pod" | "k3s" | "") {
            bail!("lab prefix {prefix:?} must not contain the segment {seg:?}");
        }
    }
    Ok(())
}

/// FNV-1a, 64 bit: a stable hash for names (template hashes, long namespace names).
pub use ferry_model::alloc::fnv1a as fnv64;

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeInfo {
    pub name: String,
    pub index: usize,
    pub ns: String,
    pub ip: Ipv4Addr,
    pub ip6: String,
    pub pod_cidr: String,
    /// The veth end in the LAN namespace, attached to br0.
    pub lan_if: String,
}

impl NodeInfo {
    /// Its `topology.kubernetes.io/zone` label: the lab's nodes alternate between two zones
    /// (`lab-zone-a` for the first, `lab-zone-b` for the second, ...).
    pub fn zone(&self) -> String {
        format!(
            "lab-zone-{}",
            if self.index.is_multiple_of(2) {
                'a'
            } else {
                'b'
            }
        )
    }
    /// The node's address on every pod veth: 10.42.<index>.1.
    pub fn pod_gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 42, self.index as u8, 1)
    }
    /// Its IPv6 address on every pod veth: fd00:42:<index>::1.
    pub fn pod_gateway6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x42, self.index as u16, 0, 0, 0, 0, 1)
    }
    /// Its pods' IPv6 range: fd00:42:<index>::/64 (beside pod_cidr, 10.42.<index>.0/24).
    pub fn pod_cidr6(&self) -> String {
        format!(
            "{}/64",
            Ipv6Addr::new(0xfd00, 0x42, self.index as u16, 0, 0, 0, 0, 0)
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClientInfo {
    pub ns: String,
    pub ip: Ipv4Addr,
    pub ip6: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortInfo {
    pub name: String,
    pub port: u16,
    /// TCP, UDP or SCTP.
    pub protocol: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PodInfo {
    pub name: String,
    pub namespace: String,
    /// Network namespace.
    pub ns: String,
    pub node: String,
    pub ip: Ipv4Addr,
    /// Node-side veth.
    pub veth: String,
    pub pid: Option<u32>,
    /// Container ports (for named target ports).
    pub ports: Vec<PortInfo>,
    /// Ports the pod's server listens on.
    pub tcp: Vec<u16>,
    pub udp: Vec<u16>,
    pub labels: BTreeMap<String, String>,
    /// "namespace/name" of the Deployment that made it.
    pub owner: Option<String>,
    pub ready: bool,
    pub created: u64,
    /// Hash of what the pod was made from (template or Pod manifest).
    pub spec_hash: String,
}

impl PodInfo {
    /// The pod's IPv6 address beside `ip`: 10.42.N.K -> fd00:42:N::K (so nothing more is kept
    /// in the lab's state).
    pub fn ip6(&self) -> Ipv6Addr {
        pod_ip6(self.ip)
    }
}

/// A pod's IPv6 address from its IPv4 one: 10.42.N.K -> fd00:42:N::K.
pub fn pod_ip6(ip: Ipv4Addr) -> Ipv6Addr {
    let [_, _, n, k] = ip.octets();
    Ipv6Addr::new(0xfd00, 0x42, u16::from(n), 0, 0, 0, 0, u16::from(k))
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeploymentInfo {
    pub namespace: String,
    pub name: String,
    pub replicas: u32,
    pub template_hash: String,
    pub labels: BTreeMap<String, String>,
    pub pod_labels: BTreeMap<String, String>,
    pub ports: Vec<PortInfo>,
    /// The normalized manifest, to tell "configured" from "unchanged".
    pub manifest: String,
    pub created: u64,
}

impl DeploymentInfo {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The lab API server of a lab brought up with `--api`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ApiInfo {
    /// Port on 127.0.0.1 in the root network namespace (kubectl, the lab runtime).
    pub host_port: u16,
    /// Address on the LAN bridge inside the lan namespace (the agents).
    pub lan_addr: std::net::SocketAddr,
}

impl ApiInfo {
    pub fn host_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.host_port)
    }
    pub fn lan_url(&self) -> String {
        format!("http://{}", self.lan_addr)
    }
}

/// lab.json
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LabState {
    pub prefix: String,
    pub created: u64,
    pub exe: PathBuf,
    /// Whether `up` started agents.
    pub agents: bool,
    pub lan_ns: String,
    pub client: ClientInfo,
    pub nodes: Vec<NodeInfo>,
    #[serde(default)]
    pub pods: Vec<PodInfo>,
    #[serde(default)]
    pub deployments: Vec<DeploymentInfo>,
    /// Every network namespace this lab made (and has not deleted yet).
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub next_veth: u32,
    /// EndpointSlice files the lab generated (names inside manifests/).
    #[serde(default)]
    pub slice_files: Vec<String>,
    /// Set when the lab runs an API server (`up --api`): objects live there, the agents run
    /// with `--kubeconfig`, and the lab runtime makes pods and EndpointSlices.
    #[serde(default)]
    pub api: Option<ApiInfo>,
    /// Set when the lab runs a BGP router (`up --bgp`, see [`crate::router`]).
    #[serde(default)]
    pub router: Option<crate::router::RouterInfo>,
}

impl LabState {
    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.name == name)
    }
    pub fn pod(&self, name: &str) -> Option<&PodInfo> {
        self.pods.iter().find(|p| p.name == name)
    }
    pub fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }
    /// The namespace of a node, pod, `client` or `lan`.
    pub fn target_ns(&self, target: &str) -> Option<String> {
        if target == "client" {
            return Some(self.client.ns.clone());
        }
        if target == "lan" {
            return Some(self.lan_ns.clone());
        }
        if target == "router" {
            if let Some(r) = &self.router {
                return Some(r.ns.clone());
            }
        }
        if let Some(n) = self.node(target) {
            return Some(n.ns.clone());
        }
        self.pod(target).map(|p| p.ns.clone())
    }
}

pub fn load_state(ctx: &Ctx) -> Result<Option<LabState>> {
    let path = ctx.lab_json();
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let state = serde_json::from_str(&text)
        .with_context(|| format!("parsing {} (run `ferry lab down`?)", path.display()))?;
    Ok(Some(state))
}

/// lab.json, or an error saying there is no lab with this prefix.
pub fn require_state(ctx: &Ctx) -> Result<LabState> {
    load_state(ctx)?.with_context(|| {
        format!(
            "no lab with prefix {:?} (no {}); start one with `ferry lab{} up`",
            ctx.prefix,
            ctx.lab_json().display(),
            prefix_flag(&ctx.prefix)
        )
    })
}

pub fn save_state(ctx: &Ctx, state: &LabState) -> Result<()> {
    let text = serde_json::to_string_pretty(state)?;
    write_atomic(&ctx.lab_json(), text.as_bytes())
}

/// " --prefix P" unless P is the default.
pub fn prefix_flag(prefix: &str) -> String {
    if prefix == "ferry" {
        String::new()
    } else {
        format!(" --prefix {prefix}")
    }
}

/// Writes `path` through a hidden temp file (`.<name>.tmp`, which no manifest reader picks up)
/// and a rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().context("path without a parent")?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("path without a file name")?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all().ok();
    drop(f);
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// An exclusive flock on <root>/<prefix>.lock, released when dropped.
#[derive(Debug)]
pub struct LabLock {
    _file: File,
}

impl LabLock {
    pub fn acquire(ctx: &Ctx) -> Result<LabLock> {
        fs::create_dir_all(&ctx.root)
            .with_context(|| format!("creating {}", ctx.root.display()))?;
        let path = ctx.lock_path();
        loop {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            // SAFETY: plain syscall on a file descriptor we own.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc != 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err).with_context(|| format!("locking {}", path.display()));
            }
            // `down` removes the lock file while holding it: make sure we locked the file that
            // is still at `path`, else start over.
            let held = file.metadata()?;
            match fs::metadata(&path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {
                    return Ok(LabLock { _file: file })
                }
                _ => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(prefix: &str) -> Ctx {
        Ctx::new(
            prefix,
            Some("/nonexistent".into()),
            Some("/bin/true".into()),
        )
        .unwrap()
    }

    #[test]
    fn prefixes() {
        assert!(validate_prefix("ferry").is_ok());
        assert!(validate_prefix("t123-4").is_ok());
        assert!(validate_prefix("Ferry").is_err());
        assert!(validate_prefix("a-pod").is_err());
        assert!(validate_prefix("a--b").is_err());
        assert!(validate_prefix("-a").is_err());
        assert!(validate_prefix("a/b").is_err());
    }

    #[test]
    fn namespace_names() {
        let c = ctx("t1");
        assert!(c.owns_ns_name("t1-lan"));
        assert!(c.owns_ns_name("t1-client"));
        assert!(c.owns_ns_name("t1-pod-web-abc"));
        assert!(c.owns_ns_name("t1-k3s-master-rpi001"));
        assert!(c.owns_ns_name("t1-k3s-worker-rpi012"));
        assert!(!c.owns_ns_name("t1-0-lan"));
        assert!(!c.owns_ns_name("t1-k3s-worker-rpi"));
        assert!(!c.owns_ns_name("t10-lan"));
        assert!(!c.owns_ns_name("t1-other"));
        let long = "x".repeat(80);
        let ns = c.pod_ns(&long);
        assert!(ns.len() < 70, "{ns}");
        assert!(c.owns_ns_name(&ns));
        assert_ne!(c.pod_ns(&format!("{long}a")), c.pod_ns(&format!("{long}b")));
    }

    /// Pinned: template hashes (pod names) and long pod namespace names are persisted in
    /// lab.json and compared with fresh ones after an upgrade.
    #[test]
    fn hashes_are_pinned() {
        assert_eq!(fnv64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv64(b"foobar"), 0x85944171f73967e8);
        assert_eq!(
            ctx("t1").pod_ns(&"x".repeat(80)),
            format!(
                "t1-pod-{}-{:08x}",
                "x".repeat(40),
                0x6adea745_72a74465_u64 as u32
            )
        );
        assert_eq!(
            ctx("t1").pod_ns(&"x".repeat(80)),
            "t1-pod-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx-72a74465"
        );
    }
}
