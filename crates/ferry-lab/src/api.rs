//! The library face of the lab, for end-to-end tests: `Lab` brings a lab up and downs it when
//! dropped (also when a test panics).

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::get::{self, NsFilter};
use crate::manifests::{self, Report};
use crate::ops;
use crate::state::{Ctx, LabState, PodInfo};
use crate::sys;
use crate::topology::{self, AgentAction};

/// How to bring a lab up.
#[derive(Debug, Clone)]
pub struct LabConfig {
    pub prefix: String,
    pub nodes: usize,
    /// Start one `ferry agent` per node.
    pub agents: bool,
    /// The `ferry` executable (agents, pods' `lab serve-pod`, `get svc`); default $FERRY_EXE or
    /// the running executable (which is wrong inside a test binary: set it).
    pub exe: Option<PathBuf>,
    /// Parent of the state dir; default $FERRY_LAB_DIR_ROOT or /run/ferry-lab.
    pub dir_root: Option<PathBuf>,
    /// Down any leftover lab with this prefix first.
    pub fresh: bool,
    /// Run the lab API server and runtime; agents watch the API (`ferry lab up --api`).
    /// Default: $FERRY_LAB_API (`1`/`true` or `0`/`false`), else off.
    pub api: bool,
    /// Run a BGP router (BIRD 2) peering with every node (`ferry lab up --bgp`).
    pub bgp: bool,
}

/// Whether labs run an API server unless told otherwise: $FERRY_LAB_API, else no.
pub fn api_default() -> bool {
    match std::env::var("FERRY_LAB_API") {
        Ok(v) => !matches!(
            v.trim().to_lowercase().as_str(),
            "0" | "false" | "no" | "off"
        ),
        Err(_) => true,
    }
}

impl LabConfig {
    pub fn new(prefix: impl Into<String>) -> LabConfig {
        LabConfig {
            prefix: prefix.into(),
            nodes: 2,
            agents: true,
            exe: None,
            dir_root: None,
            fresh: false,
            api: api_default(),
            bgp: false,
        }
    }
    pub fn api(mut self, on: bool) -> Self {
        self.api = on;
        self
    }
    pub fn bgp(mut self, on: bool) -> Self {
        self.bgp = on;
        self
    }
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }
    pub fn agents(mut self, on: bool) -> Self {
        self.agents = on;
        self
    }
    pub fn exe(mut self, exe: impl Into<PathBuf>) -> Self {
        self.exe = Some(exe.into());
        self
    }
    pub fn dir_root(mut self, root: impl Into<PathBuf>) -> Self {
        self.dir_root = Some(root.into());
        self
    }
    pub fn fresh(mut self, fresh: bool) -> Self {
        self.fresh = fresh;
        self
    }
    pub fn up(self) -> Result<Lab> {
        Lab::up_with(self)
    }
}

/// A running lab. Dropping it runs `down` unless [`Lab::keep`] was called.
#[derive(Debug)]
pub struct Lab {
    ctx: Ctx,
    keep: bool,
    downed: bool,
    /// Warnings from `up` (e.g. an agent that exited at once).
    pub warnings: Vec<String>,
}

static PREFIX_COUNTER: AtomicUsize = AtomicUsize::new(0);

impl Lab {
    /// A prefix unique to this process and call: `t<pid>-<n>` (short, so names stay short).
    pub fn unique_prefix() -> String {
        let n = PREFIX_COUNTER.fetch_add(1, Ordering::SeqCst);
        format!("t{}-{n}", std::process::id())
    }

    /// Brings up `nodes` nodes with agents (exe from $FERRY_EXE or the running executable).
    pub fn up(prefix: &str, nodes: usize) -> Result<Lab> {
        LabConfig::new(prefix).nodes(nodes).up()
    }

    pub fn up_with(cfg: LabConfig) -> Result<Lab> {
        let ctx = Ctx::new(&cfg.prefix, cfg.dir_root, cfg.exe)?;
        if cfg.fresh {
            topology::down(&ctx)?;
        }
        let report = topology::up_full(&ctx, cfg.nodes, cfg.agents, cfg.api, cfg.bgp)?;
        Ok(Lab {
            ctx,
            keep: false,
            downed: false,
            warnings: report.warnings,
        })
    }

    /// A handle on a lab that is already up (not downed on drop unless `down` is called).
    pub fn attach(prefix: &str, dir_root: Option<PathBuf>, exe: Option<PathBuf>) -> Result<Lab> {
        let ctx = Ctx::new(prefix, dir_root, exe)?;
        ops::state(&ctx)?;
        Ok(Lab {
            ctx,
            keep: true,
            downed: false,
            warnings: Vec::new(),
        })
    }

    /// Leave the lab up when this handle is dropped (for debugging a test).
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// Down the lab when this handle is dropped (the default, except for [`Lab::attach`]).
    pub fn down_on_drop(mut self) -> Lab {
        self.keep = false;
        self
    }

    pub fn ctx(&self) -> &Ctx {
        &self.ctx
    }
    pub fn prefix(&self) -> &str {
        &self.ctx.prefix
    }
    /// The state dir: <root>/<prefix>.
    pub fn dir(&self) -> PathBuf {
        self.ctx.dir()
    }
    pub fn manifests_dir(&self) -> PathBuf {
        self.ctx.manifests()
    }
    pub fn state_dir(&self) -> PathBuf {
        self.ctx.state_dir()
    }

    /// The host kubeconfig (kubectl) of a lab with an API server.
    pub fn kubeconfig(&self) -> Result<PathBuf> {
        let st = self.state()?;
        crate::cluster::kubeconfig_path(&self.ctx, &st)
    }

    /// Whether this lab runs an API server.
    pub fn api(&self) -> bool {
        self.state().is_ok_and(|s| s.api.is_some())
    }

    /// The lab API server's log so far.
    pub fn api_log(&self) -> String {
        std::fs::read_to_string(self.ctx.proc_log(crate::cluster::API_PROC)).unwrap_or_default()
    }

    /// The lab runtime's log so far.
    pub fn runtime_log(&self) -> String {
        std::fs::read_to_string(self.ctx.proc_log(crate::cluster::RUNTIME_PROC)).unwrap_or_default()
    }

    /// lab.json.
    pub fn state(&self) -> Result<LabState> {
        ops::state(&self.ctx)
    }

    fn report(r: Report) -> Result<String> {
        if r.errors.is_empty() {
            Ok(r.lines.join("\n"))
        } else {
            bail!(
                "{}{}",
                r.lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
                r.errors.join("\n")
            )
        }
    }

    /// `apply` YAML text; returns the kubectl-like output lines.
    pub fn apply_yaml(&self, yaml: &str) -> Result<String> {
        let (docs, errors) = manifests::split_docs("<yaml>", yaml);
        if !errors.is_empty() {
            bail!("{}", errors.join("\n"));
        }
        Self::report(ops::apply(&self.ctx, &docs)?)
    }

    /// `apply -f PATH` (file or directory).
    pub fn apply_file(&self, path: &Path) -> Result<String> {
        let (docs, errors) = manifests::docs_from_files(&[path.to_path_buf()])?;
        if !errors.is_empty() {
            bail!("{}", errors.join("\n"));
        }
        Self::report(ops::apply(&self.ctx, &docs)?)
    }

    /// `delete -f` of YAML text.
    pub fn delete_yaml(&self, yaml: &str) -> Result<String> {
        let (docs, errors) = manifests::split_docs("<yaml>", yaml);
        if !errors.is_empty() {
            bail!("{}", errors.join("\n"));
        }
        Self::report(ops::delete(&self.ctx, &docs)?)
    }

    /// `delete RESOURCE NAME` in namespace default (`svc`, `deployment`, `pod`, ...).
    pub fn delete(&self, resource: &str, name: &str) -> Result<String> {
        Self::report(ops::delete_named(
            &self.ctx,
            resource,
            "default",
            &[name.to_string()],
        )?)
    }

    /// Lab-only readiness switch; regenerates EndpointSlices.
    pub fn set_ready(&self, pod: &str, ready: bool) -> Result<()> {
        ops::set_ready(&self.ctx, pod, ready).map(|_| ())
    }

    /// Runs a command in a node (by name), a pod (by name), `client` or `lan`.
    pub fn exec(&self, target: &str, cmd: &[&str]) -> Result<Output> {
        ops::exec_output(&self.ctx, target, cmd)
    }

    /// `ferry explain ARGS` on a node, with its agent's settings (see `ferry lab explain`).
    pub fn explain(&self, node: &str, args: &[&str]) -> Result<Output> {
        ops::explain(&self.ctx, node, args)
    }

    /// Starts a command in a target without waiting for it.
    pub fn spawn(&self, target: &str, cmd: &[&str]) -> Result<std::process::Child> {
        ops::spawn(&self.ctx, target, cmd)
    }

    /// `curl -sS --max-time 2 URL` from a target; the body on success.
    pub fn curl(&self, from: &str, url: &str) -> Result<String> {
        ops::curl(&self.ctx, from, url)
    }

    /// Retries `curl` until it succeeds or `timeout` passes; the last error otherwise.
    pub fn curl_until_ok(&self, from: &str, url: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.curl(from, url) {
                Ok(body) => return Ok(body),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Sends one UDP datagram from a target and returns the first answer.
    pub fn udp(
        &self,
        from: &str,
        to: SocketAddr,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<String> {
        let ns = ops::target_ns(&self.ctx, from)?;
        sys::in_netns(&ns, || -> Result<String> {
            let sock = UdpSocket::bind(("0.0.0.0", 0))?;
            sock.set_read_timeout(Some(timeout))?;
            sock.send_to(payload, to)
                .with_context(|| format!("sending to {to}"))?;
            let mut buf = [0u8; 2048];
            let (n, _) = sock
                .recv_from(&mut buf)
                .with_context(|| format!("no UDP answer from {to} within {timeout:?}"))?;
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        })?
    }

    /// One ICMP echo from a target; the round-trip time.
    pub fn ping(&self, from: &str, to: Ipv4Addr) -> Result<Duration> {
        let ns = ops::target_ns(&self.ctx, from)?;
        sys::ping(&ns, to, Duration::from_secs(2))
    }

    pub fn agent_start(&self, node: &str) -> Result<()> {
        topology::agent(&self.ctx, node, AgentAction::Start).map(|_| ())
    }
    pub fn agent_stop(&self, node: &str) -> Result<()> {
        topology::agent(&self.ctx, node, AgentAction::Stop).map(|_| ())
    }
    pub fn agent_restart(&self, node: &str) -> Result<()> {
        topology::agent(&self.ctx, node, AgentAction::Restart).map(|_| ())
    }
    /// Restarts `node`'s agent with `args` added to its own (kept for later starts; an empty
    /// list goes back to the lab's arguments alone).
    pub fn agent_restart_with(&self, node: &str, args: &[&str]) -> Result<()> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        topology::set_extra_agent_args(&self.ctx, node, true, &args)?;
        self.agent_restart(node)
    }
    pub fn agent_kill(&self, node: &str) -> Result<()> {
        topology::agent(&self.ctx, node, AgentAction::Kill).map(|_| ())
    }
    /// Stops the lab API server (SIGTERM); the agents and the runtime keep what they have.
    pub fn api_stop(&self) -> Result<()> {
        crate::cluster::api_action(&self.ctx, crate::cluster::ApiAction::Stop).map(|_| ())
    }
    /// Starts the lab API server again (same address, same objects).
    pub fn api_start(&self) -> Result<()> {
        crate::cluster::api_action(&self.ctx, crate::cluster::ApiAction::Start).map(|_| ())
    }
    /// Kills the lab API server (SIGKILL).
    pub fn api_kill(&self) -> Result<()> {
        crate::cluster::api_action(&self.ctx, crate::cluster::ApiAction::Kill).map(|_| ())
    }
    /// PID of the running lab API server.
    pub fn api_pid(&self) -> Option<u32> {
        crate::cluster::proc_pid(&self.ctx, crate::cluster::API_PROC)
    }

    /// PID of the running agent on `node`.
    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        let st = self.state().ok()?;
        topology::agent_pid(&self.ctx, &st, node)
    }
    /// The agent's log so far.
    pub fn agent_log(&self, node: &str) -> String {
        std::fs::read_to_string(self.ctx.agent_log(node)).unwrap_or_default()
    }

    /// Node names in index order (node 0 is k3s-master-rpi001).
    pub fn node_names(&self) -> Vec<String> {
        self.state().map(|s| s.node_names()).unwrap_or_default()
    }
    pub fn node_name(&self, i: usize) -> String {
        topology::node_name(i)
    }
    /// LAN address of node `i`: 192.168.2.(11+i).
    pub fn node_ip(&self, i: usize) -> Ipv4Addr {
        topology::node_ip(i)
    }
    pub fn client_ip(&self) -> Ipv4Addr {
        topology::CLIENT_IP
    }
    pub fn pods(&self) -> Vec<PodInfo> {
        self.state().map(|s| s.pods).unwrap_or_default()
    }
    pub fn pod_names(&self) -> Vec<String> {
        self.pods().into_iter().map(|p| p.name).collect()
    }
    pub fn pod(&self, name: &str) -> Option<PodInfo> {
        self.pods().into_iter().find(|p| p.name == name)
    }
    pub fn pod_ip(&self, name: &str) -> Option<Ipv4Addr> {
        self.pod(name).map(|p| p.ip)
    }

    /// `get KINDS [-o wide]` output (services via `ferry get svc`).
    pub fn get(&self, what: &str, wide: bool) -> Result<String> {
        let st = self.state()?;
        let out = get::get(&self.ctx, &st, what, wide, &NsFilter::One("default".into()))?;
        if !out.ok {
            bail!("{}{}", out.stdout, out.stderr);
        }
        Ok(out.stdout)
    }

    /// Runs `<ferry> get ARGS --manifests .. --state-dir ..` and returns stdout.
    pub fn ferry_get(&self, args: &[&str]) -> Result<String> {
        get::ferry_get(&self.ctx, args)
    }

    /// Stops everything and deletes the lab (safe to call twice).
    pub fn down(&mut self) -> Result<()> {
        topology::down(&self.ctx)?;
        self.downed = true;
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.keep || self.downed {
            return;
        }
        if let Err(e) = topology::down(&self.ctx) {
            eprintln!("ferry lab {}: down failed: {e:#}", self.ctx.prefix);
        }
    }
}

pub use ferry_testkit::{ci, require_root, skip};
