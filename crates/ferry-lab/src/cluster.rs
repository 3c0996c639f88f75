//! The lab API server of a lab brought up with `--api`: the `serve-api` process (the
//! in-repo test double of kube-apiserver, [`ferry_apiserver`]), its kubeconfigs, the Nodes and
//! namespaces a cluster would have, and the lab's processes in the root network namespace
//! (the API server and the runtime), which `down` finds by PID file and command line.
//!
//! The API server listens on `127.0.0.1:<free port>` in the root network namespace (kubectl,
//! the lab runtime) and on 192.168.2.5:6443 on the LAN bridge inside the lan namespace (the
//! agents; K3s's port). The second socket is made by a thread that entered the lan namespace:
//! a socket stays in the namespace it was made in. Nothing is added to the root namespace.

use std::fs::{self, OpenOptions};
use std::future::Future;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;
use serde_json::json;

use crate::state::{now_secs, write_atomic, ApiInfo, Ctx, LabState};
use crate::sys;
use crate::topology::{rfc3339, tail, SERVICE_CIDR};

/// The API server's address on the LAN bridge (inside the lan namespace).
pub const API_LAN_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 2, 5);
/// K3s's API port.
pub const API_PORT: u16 = 6443;
/// The namespaces ferry expects and never creates itself (its Lease; MetalLB's ConfigMap).
pub const NAMESPACES: [&str; 2] = ["ferry-system", "metallb-system"];

/// The two lab processes that live in the root network namespace.
pub const API_PROC: &str = "apiserver";
pub const RUNTIME_PROC: &str = "runtime";

/// Runs a future to completion on a fresh single-threaded tokio runtime (the lab's commands
/// are synchronous; only their API calls are not).
pub fn block_on<F: Future>(f: F) -> Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a tokio runtime")?;
    Ok(rt.block_on(f))
}

/// A client of the lab's API server, from the host kubeconfig.
pub async fn client(ctx: &Ctx) -> Result<Client> {
    let path = ctx.kubeconfig();
    let kc = Kubeconfig::read_from(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("loading {}", path.display()))?;
    config.read_timeout = Some(Duration::from_secs(60));
    Client::try_from(config).context("making a client of the lab API server")
}

/// `ferry lab serve-api` (hidden): the lab's API server, until killed.
pub fn serve_api(ctx: &Ctx, port: u16) -> Result<()> {
    let lan_addr = SocketAddr::from((API_LAN_IP, API_PORT));
    let lan_ns = ctx.lan_ns();
    let lan = sys::in_netns(&lan_ns, || TcpListener::bind(lan_addr))?
        .with_context(|| format!("binding {lan_addr} in namespace {lan_ns}"))?;
    let host = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .with_context(|| format!("binding 127.0.0.1:{port}"))?;
    lan.set_nonblocking(true)?;
    host.set_nonblocking(true)?;
    let host_addr = host.local_addr()?;
    let services = ferry_apiserver::service::ServiceConfig::default()
        .with_cidr(SERVICE_CIDR)
        .map_err(|e| anyhow::anyhow!("service CIDR {SERVICE_CIDR}: {e}"))?;
    let config = ferry_apiserver::Config {
        services,
        state: Some(ctx.api_state_file()),
        ..Default::default()
    };
    let server = ferry_apiserver::ApiServer::new(config)
        .map_err(|e| anyhow::anyhow!("{}: {e}", ctx.api_state_file().display()))?;
    let host_url = format!("http://{host_addr}");
    let lan_url = format!("http://{lan_addr}");
    write_atomic(
        &ctx.kubeconfig(),
        ferry_apiserver::kubeconfig(&host_url).as_bytes(),
    )?;
    write_atomic(
        &ctx.kubeconfig_nodes(),
        ferry_apiserver::kubeconfig(&lan_url).as_bytes(),
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let host = tokio::net::TcpListener::from_std(host)?;
        let lan = tokio::net::TcpListener::from_std(lan)?;
        // Written last: `up` waits for it, and then both sockets accept.
        write_atomic(&ctx.api_addr_file(), format!("{host_addr}\n").as_bytes())?;
        println!(
            "ferry lab {}: API server (ferry-apiserver, a test double of kube-apiserver) on \
             {host_url} and {lan_url} (namespace {lan_ns})",
            ctx.prefix
        );
        tokio::join!(
            ferry_apiserver::serve(host, server.clone()),
            ferry_apiserver::serve(lan, server)
        );
        Ok(())
    })
}

/// Whether `pid` runs `ferry lab --prefix P serve-api|serve-runtime --dir-root R` of this lab
/// (so a recycled PID is never signalled).
fn is_lab_proc(ctx: &Ctx, pid: u32, which: &str) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let sub = format!(
        "serve-{}",
        if which == API_PROC { "api" } else { "runtime" }
    );
    let root = ctx.root.display().to_string();
    let has = |s: &str| args.contains(&s.as_bytes());
    let pair = |k: &str, v: &str| {
        args.windows(2)
            .any(|w| w[0] == k.as_bytes() && w[1] == v.as_bytes())
    };
    has(&sub) && pair("--prefix", &ctx.prefix) && pair("--dir-root", &root)
}

/// The running lab process `which` (API_PROC or RUNTIME_PROC), checked.
pub fn proc_pid(ctx: &Ctx, which: &str) -> Option<u32> {
    let pid: u32 = fs::read_to_string(ctx.proc_pid_file(which))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (sys::pid_alive(pid) && is_lab_proc(ctx, pid, which)).then_some(pid)
}

/// Stops lab process `which` (SIGTERM, or SIGKILL when `hard`); whether one ran.
pub fn stop_proc(ctx: &Ctx, which: &str, hard: bool) -> bool {
    let Some(pid) = proc_pid(ctx, which) else {
        let _ = fs::remove_file(ctx.proc_pid_file(which));
        return false;
    };
    sys::stop_pids(&[pid], hard, Duration::from_secs(5), |p| {
        is_lab_proc(ctx, p, which)
    });
    let _ = fs::remove_file(ctx.proc_pid_file(which));
    true
}

/// Starts `ferry-lab lab --prefix P serve-api|serve-runtime --dir-root R ARGS` in the root
/// network namespace, in its own process group, output appended to logs/<which>.log.
fn spawn_proc(ctx: &Ctx, which: &str, extra: &[String]) -> Result<u32> {
    if let Some(pid) = proc_pid(ctx, which) {
        bail!("the lab {which} is running already (pid {pid})");
    }
    let exe = ctx.require_exe(crate::state::LAB_EXE_NAME)?;
    let sub = if which == API_PROC {
        "serve-api"
    } else {
        "serve-runtime"
    };
    let mut args = vec![
        "lab".to_string(),
        "--prefix".to_string(),
        ctx.prefix.clone(),
        sub.to_string(),
        "--dir-root".to_string(),
        ctx.root.display().to_string(),
    ];
    args.extend_from_slice(extra);
    let log = ctx.proc_log(which);
    let mut out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("opening {}", log.display()))?;
    writeln!(
        out,
        "--- ferry lab {}: {} {}",
        rfc3339(now_secs()),
        exe.display(),
        args.join(" ")
    )?;
    let err = out.try_clone()?;
    let child = Command::new(exe)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {} {sub}", exe.display()))?;
    let pid = child.id();
    write_atomic(&ctx.proc_pid_file(which), format!("{pid}\n").as_bytes())?;
    Ok(pid)
}

fn died(ctx: &Ctx, which: &str, pid: u32) -> anyhow::Error {
    let log = ctx.proc_log(which);
    anyhow::anyhow!(
        "the lab {which} (pid {pid}) exited; last lines of {}:\n{}",
        log.display(),
        tail(&log, 8)
    )
}

/// Starts the API server (on `port`, 0 for a free one) and waits until both its sockets
/// accept; the host port.
pub fn start_api(ctx: &Ctx, port: u16) -> Result<u16> {
    let _ = fs::remove_file(ctx.api_addr_file());
    let pid = spawn_proc(ctx, API_PROC, &["--port".to_string(), port.to_string()])?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let addr: SocketAddr = loop {
        if let Some(a) = fs::read_to_string(ctx.api_addr_file())
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            break a;
        }
        if !sys::pid_alive(pid) {
            return Err(died(ctx, API_PROC, pid));
        }
        if Instant::now() > deadline {
            bail!(
                "the lab API server (pid {pid}) did not start listening within 20 s (see {})",
                ctx.proc_log(API_PROC).display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // From the host, and from the LAN as the agents will.
    TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to the lab API server at {addr}"))?;
    let lan = SocketAddr::from((API_LAN_IP, API_PORT));
    sys::in_netns(&ctx.lan_ns(), || {
        TcpStream::connect_timeout(&lan, Duration::from_secs(2))
    })?
    .with_context(|| format!("connecting to the lab API server at {lan} in the lan namespace"))?;
    Ok(addr.port())
}

/// Starts the lab runtime and waits for its first pass.
pub fn start_runtime(ctx: &Ctx) -> Result<()> {
    let _ = fs::remove_file(ctx.runtime_synced_file());
    let pid = spawn_proc(ctx, RUNTIME_PROC, &[])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ctx.runtime_synced_file().exists() {
        if !sys::pid_alive(pid) {
            return Err(died(ctx, RUNTIME_PROC, pid));
        }
        if Instant::now() > deadline {
            bail!(
                "the lab runtime (pid {pid}) did not finish its first pass within 30 s (see {})",
                ctx.proc_log(RUNTIME_PROC).display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// The v1 Node of a lab node, as its kubelet would register it.
pub fn node_object(st: &LabState, n: &crate::state::NodeInfo) -> serde_json::Value {
    let mut labels = json!({
        "kubernetes.io/hostname": n.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": std::env::consts::ARCH,
        "topology.kubernetes.io/zone": n.zone(),
    });
    if n.index == 0 {
        labels["node-role.kubernetes.io/control-plane"] = json!("true");
        labels["node-role.kubernetes.io/master"] = json!("true");
    }
    let now = rfc3339(now_secs());
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": n.name, "labels": labels},
        "spec": {"podCIDR": n.pod_cidr, "podCIDRs": [n.pod_cidr]},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": n.ip.to_string()},
                {"type": "Hostname", "address": n.name},
            ],
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "ferry lab node", "lastHeartbeatTime": now,
                "lastTransitionTime": rfc3339(st.created),
            }],
            "nodeInfo": {"kubeletVersion": "ferry-lab", "operatingSystem": "linux",
                         "architecture": std::env::consts::ARCH},
        },
    })
}

/// Registers the Nodes (as kubelets would) and creates the namespaces ferry needs; existing
/// ones are left as they are (a restarted lab API server keeps its objects).
pub async fn register(client: &Client, st: &LabState) -> Result<()> {
    use k8s_openapi::api::core::v1::{Namespace, Node};
    let nodes: Api<Node> = Api::all(client.clone());
    for n in &st.nodes {
        let node: Node = serde_json::from_value(node_object(st, n))?;
        match nodes.create(&PostParams::default(), &node).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e).with_context(|| format!("registering node {}", n.name)),
        }
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for name in NAMESPACES {
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
        match namespaces.create(&PostParams::default(), &ns).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e).with_context(|| format!("creating namespace {name}")),
        }
    }
    Ok(())
}

/// `up --api`, after the topology: the API server's address on the LAN bridge, the API
/// server, Nodes and namespaces, the runtime. Returns what lab.json records.
pub fn bring_up(ctx: &Ctx, st: &LabState) -> Result<ApiInfo> {
    sys::ip_batch(
        Some(&st.lan_ns),
        &[format!("addr add {API_LAN_IP}/24 dev br0")],
    )?;
    let host_port = start_api(ctx, 0)?;
    block_on(async {
        let c = client(ctx).await?;
        register(&c, st).await
    })??;
    start_runtime(ctx)?;
    Ok(ApiInfo {
        host_port,
        lan_addr: SocketAddr::from((API_LAN_IP, API_PORT)),
    })
}

/// The agent's source arguments in an API-mode lab.
pub fn agent_source_args(ctx: &Ctx) -> Vec<String> {
    vec![
        "--kubeconfig".into(),
        ctx.kubeconfig_nodes().display().to_string(),
    ]
}

/// `ferry lab kubeconfig`: the host kubeconfig's path, or why there is none.
pub fn kubeconfig_path(ctx: &Ctx, st: &LabState) -> Result<std::path::PathBuf> {
    if st.api.is_none() {
        bail!(
            "lab {:?} runs without an API server (agents read {}); bring one up with \
             `ferry lab{} up --api`",
            ctx.prefix,
            ctx.manifests().display(),
            crate::state::prefix_flag(&ctx.prefix)
        );
    }
    let path = ctx.kubeconfig();
    if !Path::new(&path).is_file() {
        bail!(
            "no kubeconfig at {} (is the lab API server running?)",
            path.display()
        );
    }
    Ok(path)
}

/// What `ferry lab api start|stop|restart|kill` does to the lab API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiAction {
    Start,
    Stop,
    Restart,
    Kill,
}

/// Starts, stops (SIGTERM), restarts or kills (SIGKILL) the lab API server. It comes back on
/// the same host port with the objects it had (its `--state` file), so kubeconfigs stay valid;
/// clients' watches end and they list again, as after a real control-plane restart.
pub fn api_action(ctx: &Ctx, action: ApiAction) -> Result<Vec<String>> {
    let _lock = crate::state::LabLock::acquire(ctx)?;
    let st = crate::state::require_state(ctx)?;
    let Some(info) = &st.api else {
        bail!(
            "lab {:?} runs without an API server (bring one up with `ferry lab{} up --api`)",
            ctx.prefix,
            crate::state::prefix_flag(&ctx.prefix)
        );
    };
    let mut lines = Vec::new();
    if action != ApiAction::Start {
        let pid = proc_pid(ctx, API_PROC);
        let hard = action == ApiAction::Kill;
        match pid {
            Some(pid) => {
                stop_proc(ctx, API_PROC, hard);
                lines.push(format!(
                    "API server (pid {pid}) {}",
                    if hard { "killed" } else { "stopped" }
                ));
            }
            None if action == ApiAction::Restart => lines.push("API server was not running".into()),
            None => bail!("the lab API server is not running"),
        }
    }
    if matches!(action, ApiAction::Start | ApiAction::Restart) {
        start_api(ctx, info.host_port)?;
        let pid = proc_pid(ctx, API_PROC).unwrap_or(0);
        lines.push(format!(
            "API server started (pid {pid}) on {} and {}",
            info.host_url(),
            info.lan_url()
        ));
    }
    Ok(lines)
}
