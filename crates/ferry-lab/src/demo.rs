//! `ferry demo`: a 3-node lab replaying the seed blog post, then `down`. First half: the
//! Deployment, a ClusterIP Service, curl from a pod, a NodePort Service, curl from outside.
//! Second half: the LoadBalancer Service (pending until MetalLB's address pool exists), curl
//! from outside on 192.168.2.200, and a failover: the announcing node's link goes down while
//! the client keeps curling, and the time until the client is served again is measured.
//! Then the seed's "next step", BGP (when BIRD 2 is installed: the lab gets its `router`): the
//! same Service from a bgp pool, announced by every node, one ECMP route in the router, and a
//! node failure that the router notices through BFD.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::get::{self, NsFilter};
use crate::manifests;
use crate::ops;
use crate::probe;
use crate::show;
use crate::state::{Ctx, LabState};
use crate::sys;
use crate::topology;

pub use crate::seed::{
    DEBIAN_BASH, METALLB_BGP, METALLB_CONFIG, NEXTCLOUD_DEV, NEXTCLOUD_DEV_CLUSTERIP,
    NEXTCLOUD_DEV_LOADBALANCER, NEXTCLOUD_DEV_LOADBALANCER_BGP, NEXTCLOUD_DEV_NODEPORT,
};

#[derive(Debug, Args)]
pub struct DemoArgs {
    #[arg(long, default_value = "demo")]
    pub prefix: String,
    /// Nodes of the demo's lab. The failover step needs 3: with 2, the node left after a
    /// link-down hears no majority (1 of 2) and announces nothing, so it is skipped.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=10))]
    pub nodes: u16,
    /// Run the lab with its API server (`ferry lab up --api`); the steps are then the seed's
    /// own kubectl commands when kubectl is installed. Default: $FERRY_LAB_API, else off.
    #[arg(long, default_missing_value = "true", num_args = 0..=1,
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub api: Option<bool>,
    /// Add the BGP part (`ferry lab up --bgp`: a router namespace running BIRD 2). Default: on
    /// when BIRD 2 is installed (`scripts/demo.sh` installs it).
    #[arg(long, default_missing_value = "true", num_args = 0..=1,
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub bgp: Option<bool>,
}

/// kubectl, when the lab runs an API server and kubectl is installed: the demo then shows
/// (and runs) the seed's own kubectl commands, with KUBECONFIG set to the lab's.
static KUBECTL: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();

fn kubectl(ctx: &Ctx) -> Option<std::path::PathBuf> {
    KUBECTL
        .get_or_init(|| {
            let st = ops::state(ctx).ok()?;
            let kc = crate::cluster::kubeconfig_path(ctx, &st).ok()?;
            let ok = std::process::Command::new("kubectl")
                .args(["version", "--client"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            ok.then_some(kc)
        })
        .clone()
}

/// Runs `kubectl ARGS` (shown as such) against the lab; its output, or an error with it.
fn run_kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("kubectl")
        .env("KUBECONFIG", kubeconfig)
        .args(args)
        .output()
        .context("running kubectl")?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        bail!(
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// `ferry demo`: brings a lab up, replays the seed, tears it down. Exit 1 if a step failed.
pub fn run_demo(args: DemoArgs) -> Result<i32> {
    let ctx = Ctx::new(&args.prefix, None, None)?;
    // Ctrl-C: finish the current step, then tear down (agents and pods have their own process
    // group, so they do not see it).
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    let leftover = topology::down(&ctx)?;
    if leftover.existed {
        println!(
            "(removed a leftover lab {:?}: {} namespaces)",
            ctx.prefix,
            leftover.namespaces.len()
        );
    }
    let nodes = usize::from(args.nodes);
    println!(
        "# ferry demo: a {nodes}-node lab (prefix {:?}) replaying the seed's Services walk-through",
        ctx.prefix
    );
    let api = args.api.unwrap_or_else(crate::api::api_default);
    let bgp = args.bgp.unwrap_or_else(crate::router::bird_available);
    if args.bgp == Some(true) && !crate::router::bird_available() {
        bail!("ferry demo --bgp needs BIRD 2 (`bird` and `birdc`): apt-get install bird2");
    }
    cmd(&format!(
        "ferry lab up --nodes {nodes}{}{}",
        if api { " --api" } else { "" },
        if bgp { " --bgp" } else { "" }
    ));
    let result = match topology::up_full(&ctx, nodes, true, api, bgp) {
        Ok(report) => {
            show::print_up(&ctx, &report);
            if let Some(kc) = kubectl(&ctx) {
                println!();
                cmd("export KUBECONFIG=\"$(ferry lab kubeconfig)\"");
                println!("# (= {})", kc.display());
            }
            steps(&ctx)
                .and_then(|()| load_balancer_steps(&ctx))
                .and_then(|()| bgp_steps(&ctx))
        }
        Err(e) => Err(e),
    };
    println!();
    cmd("ferry lab down");
    match topology::down(&ctx) {
        Ok(r) => println!("{}", show::down_line(&ctx, &r)),
        Err(e) => eprintln!("ferry demo: down failed: {e:#}"),
    }
    match result {
        Ok(()) => {
            println!("# demo finished");
            Ok(0)
        }
        Err(e) => {
            eprintln!("ferry demo failed: {e:#}");
            Ok(1)
        }
    }
}

fn cmd(line: &str) {
    println!("$ {line}");
}

fn apply(ctx: &Ctx, file: &str, text: &str) -> Result<()> {
    check_interrupted()?;
    println!();
    if let Some(kc) = kubectl(ctx) {
        let dir = ctx.dir().join("demo");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(file);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        cmd(&format!("kubectl apply -f {file}"));
        run_kubectl(&kc, &["apply", "-f", &path.display().to_string()])?;
        // As `ferry lab apply` does: wait until the lab's pods and EndpointSlices follow.
        let (docs, _) = manifests::split_docs(file, text);
        if docs
            .iter()
            .any(|d| matches!(d.kind.as_str(), "Deployment" | "Pod" | "Service"))
        {
            crate::client::wait_caught_up(ctx)?;
        }
        return Ok(());
    }
    cmd(&format!("ferry lab apply -f {file}"));
    let (docs, errors) = manifests::split_docs(file, text);
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    let report = ops::apply(ctx, &docs)?;
    for l in &report.lines {
        println!("{l}");
    }
    if !report.errors.is_empty() {
        bail!("{}", report.errors.join("\n"));
    }
    Ok(())
}

/// `get pods,svc -o wide`; a failing `ferry get svc` is shown, not fatal.
fn get_pods_svc(ctx: &Ctx) -> Result<()> {
    check_interrupted()?;
    println!();
    if let Some(kc) = kubectl(ctx) {
        cmd("kubectl get pods,svc -o wide");
        return run_kubectl(&kc, &["get", "pods,svc", "-o", "wide"]);
    }
    cmd("ferry lab get pods,svc -o wide");
    let st = ops::state(ctx)?;
    let out = get::get(ctx, &st, "pods,svc", true, &NsFilter::One("default".into()))?;
    print!("{}", out.stdout);
    eprint!("{}", out.stderr);
    Ok(())
}

fn nextcloud_pods(ctx: &Ctx) -> Result<Vec<String>> {
    Ok(ops::state(ctx)?
        .pods
        .into_iter()
        .filter(|p| p.owner.as_deref() == Some("default/nextcloud-dev"))
        .map(|p| p.name)
        .collect())
}

fn steps(ctx: &Ctx) -> Result<()> {
    // 1-3: the Deployment, the ClusterIP Service, the listing.
    apply(ctx, "nextcloud-dev.yaml", NEXTCLOUD_DEV)?;
    apply(ctx, "nextcloud-dev-clusterip.yaml", NEXTCLOUD_DEV_CLUSTERIP)?;
    get_pods_svc(ctx)?;

    // 4: a third pod curls the cluster IP until both nextcloud pods have answered.
    apply(ctx, "debian-bash.yaml", DEBIAN_BASH)?;
    let pods = nextcloud_pods(ctx)?;
    let (cluster_ip, _) = service_addr(ctx, "nextcloud-dev-clusterip", false)?;
    let url = format!("http://{cluster_ip}:8080");
    println!();
    curl_until_all_answered(ctx, "debian-bash", &url, &pods, "the cluster IP")?;

    // 5-6: replace the ClusterIP Service with a NodePort one.
    delete_service(ctx, "nextcloud-dev-clusterip")?;
    apply(ctx, "nextcloud-dev-nodeport.yaml", NEXTCLOUD_DEV_NODEPORT)?;
    get_pods_svc(ctx)?;

    // 7: from outside the cluster, every node's IP on the node port.
    let (_, node_port) = service_addr(ctx, "nextcloud-dev-nodeport", true)?;
    let node_port = node_port.context("no node port allocated for nextcloud-dev-nodeport")?;
    let st = ops::state(ctx)?;
    for n in &st.nodes {
        check_interrupted()?;
        println!();
        let url = format!("http://{}:{node_port}", n.ip);
        curl_until_ok(ctx, "client", &url, &n.name)?;
    }
    Ok(())
}

const LB_SERVICE: &str = "nextcloud-dev-loadbalancer";

/// Steps 8-14, the seed's second half: the LoadBalancer Service, pending until the MetalLB
/// ConfigMap gives it 192.168.2.200; curl from outside; then a failover.
fn load_balancer_steps(ctx: &Ctx) -> Result<()> {
    // 8-10: replace the NodePort Service with the LoadBalancer one: pending, no pool yet.
    delete_service(ctx, "nextcloud-dev-nodeport")?;
    let since = ops::state(ctx)?
        .nodes
        .iter()
        .map(|n| (n.name.clone(), agent_log(ctx, &n.name).len()))
        .collect::<Vec<_>>();
    apply(
        ctx,
        "nextcloud-dev-loadbalancer.yaml",
        NEXTCLOUD_DEV_LOADBALANCER,
    )?;
    get_svc_wide(ctx)?;
    // Why, in the allocator's words: every agent in manifest mode, the node running the
    // load-balancer controller with the API.
    let deadline = Instant::now() + Duration::from_secs(3);
    let needle = format!("Service default/{LB_SERVICE} pending:");
    'wait: while Instant::now() < deadline {
        check_interrupted()?;
        for (node, offset) in &since {
            let log = agent_log(ctx, node);
            if let Some(line) = log
                .get(*offset..)
                .and_then(|t| t.lines().find(|l| l.contains(&needle)))
            {
                println!();
                cmd(&format!("ferry lab logs {node} | grep pending"));
                println!("{line}");
                break 'wait;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // 11: MetalLB's configuration: the Service gets the pool's first address, one node
    // announces it.
    apply(ctx, "metallb-config.yaml", METALLB_CONFIG)?;
    let (ip, _) = wait_for_lb(ctx, LB_SERVICE)?;
    get_svc_wide(ctx)?;

    // 12: from outside the cluster, on the load-balancer address.
    let url = client_reaches_every_pod(ctx, &ip, "")?;

    // 13-14: failover.
    let st = ops::state(ctx)?;
    if st.nodes.len() < 3 {
        println!();
        println!(
            "# (failover skipped: with {} node(s), the nodes left after a link-down do not hear \
             a majority of the cluster, so none would announce {ip}; use --nodes 3)",
            st.nodes.len()
        );
        return Ok(());
    }
    agent_killed(ctx, &ip, &url)?;
    failover(ctx, &ip, &url)
}

/// The announcing node's agent dies: its node keeps forwarding (the rules stay in the kernel),
/// the others see it gone and one of them takes the address over with a gratuitous ARP. The
/// client does not notice. The agent then comes back.
fn agent_killed(ctx: &Ctx, ip: &str, url: &str) -> Result<()> {
    check_interrupted()?;
    let st = ops::state(ctx)?;
    let owner = one_announcer(ctx, &st, ip, Duration::from_secs(10))?;
    println!();
    println!("# {owner} announces {ip}; kill its agent (SIGKILL) while the client keeps curling");
    cmd(&format!("ferry lab agent kill {owner}"));
    let logs: Vec<(String, usize)> = st
        .nodes
        .iter()
        .filter(|n| n.name != owner)
        .map(|n| (n.name.clone(), agent_log(ctx, &n.name).len()))
        .collect();
    let killed = Instant::now();
    crate::topology::agent(ctx, &owner, crate::topology::AgentAction::Kill)?;
    let needle = format!("announcing {ip} on ");
    let client_ns = st.client.ns.clone();
    let stop = AtomicBool::new(false);
    let answered = AtomicUsize::new(0);
    let (attempts, took_over) = std::thread::scope(|s| {
        let probe = s.spawn(|| {
            probe::probe_loop_with(&client_ns, url, killed, &stop, |a| {
                if a.result.is_ok() {
                    answered.fetch_add(1, Ordering::SeqCst);
                }
            })
        });
        // Until another node announces the address and the client had 10 answers (at most 3 s).
        let mut took_over = None;
        while killed.elapsed() < Duration::from_secs(3) && !INTERRUPTED.load(Ordering::SeqCst) {
            if took_over.is_none() {
                took_over = logs.iter().find_map(|(n, off)| {
                    agent_log(ctx, n)
                        .get(*off..)
                        .is_some_and(|t| t.contains(&needle))
                        .then(|| (n.clone(), killed.elapsed()))
                });
            }
            if took_over.is_some() && answered.load(Ordering::SeqCst) >= 10 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::SeqCst);
        (probe.join(), took_over)
    });
    let attempts = attempts.map_err(|_| anyhow::anyhow!("the probe loop panicked"))?;
    check_interrupted()?;
    let ok = attempts.iter().filter(|a| a.result.is_ok()).count();
    let failed = attempts.len() - ok;
    match &took_over {
        Some((n, t)) => println!(
            "# {n} took over {ip} {} ms after the agent died (gratuitous ARP); the client: {ok} requests answered, {failed} failed ({owner} itself kept forwarding)",
            t.as_millis()
        ),
        None => bail!("no node took over {ip} within 3 s of {owner}'s agent dying"),
    }
    cmd(&format!("ferry lab agent start {owner}"));
    crate::topology::agent(ctx, &owner, crate::topology::AgentAction::Start)?;
    // Back in the cluster, it wins the same election again after its hold-down.
    std::thread::sleep(Duration::from_millis(1500));
    let now = one_announcer(ctx, &st, ip, Duration::from_secs(10))?;
    println!("# {owner}'s agent is back; {now} announces {ip}");
    Ok(())
}

/// `ferry lab get svc -o wide`.
fn get_svc_wide(ctx: &Ctx) -> Result<()> {
    check_interrupted()?;
    println!();
    cmd("ferry lab get svc -o wide");
    let st = ops::state(ctx)?;
    let out = get::get(ctx, &st, "svc", true, &NsFilter::One("default".into()))?;
    print!("{}", out.stdout);
    eprint!("{}", out.stderr);
    Ok(())
}

fn agent_log(ctx: &Ctx, node: &str) -> String {
    std::fs::read_to_string(ctx.agent_log(node)).unwrap_or_default()
}

/// Waits (quietly, at most 10 s) until the Service has a load-balancer address and
/// `ferry get svc -o wide` names the node announcing it; (address, announcer).
fn wait_for_lb(ctx: &Ctx, name: &str) -> Result<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = String::new();
    loop {
        check_interrupted()?;
        if let Ok(t) = get::ferry_get(ctx, &["svc", "-o", "wide"]) {
            let ip = column_of(&t, name, "EXTERNAL-IP").unwrap_or_default();
            let by = column_of(&t, name, "ANNOUNCED-BY").unwrap_or_default();
            if !ip.is_empty() && !ip.starts_with('<') && !by.is_empty() && !by.starts_with('<') {
                return Ok((ip, by));
            }
            last = format!("EXTERNAL-IP {ip:?}, ANNOUNCED-BY {by:?}");
        }
        if Instant::now() > deadline {
            bail!("service {name} got no announced load-balancer address: {last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A column of a Service's row in a kubectl-style table, found by the header.
pub fn column_of(text: &str, name: &str, column: &str) -> Option<String> {
    let mut lines = text.lines();
    let header = lines.next()?;
    let at = header.find(column)?;
    let row = lines.find(|l| {
        let first = l.split_whitespace().next().unwrap_or("");
        first == name || first.strip_prefix("service/") == Some(name)
    })?;
    row.get(at..)?.split_whitespace().next().map(str::to_string)
}

/// Nodes whose agent log says it announces `ip` now (its last `announcing IP on` /
/// `withdrawing IP from` line is an announcement).
fn announcers(ctx: &Ctx, st: &LabState, ip: &str) -> Vec<String> {
    let on = format!("announcing {ip} on ");
    let off = format!("withdrawing {ip} from ");
    st.nodes
        .iter()
        .filter(|n| topology::agent_pid(ctx, st, &n.name).is_some())
        .filter(|n| {
            agent_log(ctx, &n.name)
                .lines()
                .rev()
                .find(|l| l.contains(&on) || l.contains(&off))
                .is_some_and(|l| l.contains(&on))
        })
        .map(|n| n.name.clone())
        .collect()
}

/// Waits (at most `timeout`) until exactly one agent announces `ip` and still does 300 ms
/// later.
fn one_announcer(ctx: &Ctx, st: &LabState, ip: &str, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupted()?;
        let now = announcers(ctx, st, ip);
        if now.len() == 1 {
            std::thread::sleep(Duration::from_millis(300));
            if announcers(ctx, st, ip) == now {
                return Ok(now[0].clone());
            }
        }
        if Instant::now() > deadline {
            bail!("{ip}: wanted exactly one announcing node, the agents' logs say {now:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Steps 13-14: the announcing node's link goes down while the client curls the address in a
/// loop; the client is served again once another node announces it. Then the link comes back.
fn failover(ctx: &Ctx, ip: &str, url: &str) -> Result<()> {
    check_interrupted()?;
    let st = ops::state(ctx)?;
    let owner = one_announcer(ctx, &st, ip, Duration::from_secs(10))?;
    let node = st
        .node(&owner)
        .with_context(|| format!("no node {owner}"))?
        .clone();
    println!();
    println!(
        "# failover: {owner} announces {ip}; take its link to the LAN down while the client \
         keeps curling {url}"
    );
    // Nothing in the lab marks a lost node NotReady; do what the control plane would, so that
    // the other nodes stop sending connections to a pod they cannot reach.
    for p in st
        .pods
        .iter()
        .filter(|p| p.node == owner && p.owner.as_deref() == Some("default/nextcloud-dev"))
    {
        cmd(&format!("ferry lab set-ready {} false", p.name));
        ops::set_ready(ctx, &p.name, false)?;
        println!("# (what the control plane does once {owner} is gone)");
    }
    let client_ns = st.client.ns.clone();
    let lan_ns = st.lan_ns.clone();
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let cut_at: OnceLock<Duration> = OnceLock::new();
    let served_after_cut = AtomicBool::new(false);
    let (attempts, cut) = std::thread::scope(|s| -> Result<(Vec<probe::Attempt>, Duration)> {
        let probe = s.spawn(|| {
            probe::probe_loop_with(&client_ns, url, start, &stop, |a| {
                if a.result.is_ok() && cut_at.get().is_some_and(|c| a.began >= *c) {
                    served_after_cut.store(true, Ordering::SeqCst);
                }
            })
        });
        std::thread::sleep(Duration::from_millis(500));
        cmd(&format!(
            "ferry lab exec lan -- ip link set {} down",
            node.lan_if
        ));
        let cut = *cut_at.get_or_init(|| start.elapsed());
        let down = set_link(&lan_ns, &node.lan_if, "down");
        // Until a request that began after the cut succeeds (at most 5 s), then a little more.
        let deadline = start + cut + Duration::from_secs(5);
        while Instant::now() < deadline
            && !served_after_cut.load(Ordering::SeqCst)
            && !INTERRUPTED.load(Ordering::SeqCst)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::SeqCst);
        let attempts = probe
            .join()
            .map_err(|_| anyhow::anyhow!("the probe loop panicked"))?;
        down?;
        Ok((attempts, cut))
    })?;
    check_interrupted()?;
    let failed = probe::failed_since(&attempts, cut);
    let slowest = probe::slowest_since(&attempts, cut);
    let recovered = probe::recovered_after(&attempts, cut);
    let took_over: Vec<String> = announcers(ctx, &st, ip)
        .into_iter()
        .filter(|n| *n != owner)
        .collect();
    let Some(recovered) = recovered else {
        bail!(
            "the client was not served on {url} within 5 s of {owner}'s link going down \
             ({failed} requests failed; announcing now: {took_over:?})"
        );
    };
    let by = if took_over.is_empty() {
        "no other node announces it yet".to_string()
    } else {
        format!("{} took over {ip}", took_over.join(","))
    };
    println!(
        "# client recovered after {} ms ({by})",
        recovered.as_millis()
    );
    println!(
        "# (requests after the cut: {failed} failed, the slowest took {} ms)",
        slowest.as_millis()
    );
    // ANNOUNCED-BY follows within about a second (the agents refresh their status files).
    if let Some(new) = took_over.first() {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            check_interrupted()?;
            let by = get::ferry_get(ctx, &["svc", "-o", "wide"])
                .ok()
                .and_then(|t| column_of(&t, LB_SERVICE, "ANNOUNCED-BY"));
            if by.as_deref() == Some(new.as_str()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    get_svc_wide(ctx)?;

    // The link comes back: the returning node waits out its hold-down before it takes
    // anything back, so that two nodes never answer at once.
    check_interrupted()?;
    println!();
    cmd(&format!(
        "ferry lab exec lan -- ip link set {} up",
        node.lan_if
    ));
    set_link(&lan_ns, &node.lan_if, "up")?;
    let back = Instant::now();
    // The returning node announces again (it wins the same election) after its hold-down.
    let offset = agent_log(ctx, &owner).len();
    let needle = format!("announcing {ip} on ");
    let mut reannounced = None;
    while back.elapsed() < Duration::from_secs(5) {
        check_interrupted()?;
        if agent_log(ctx, &owner)
            .get(offset..)
            .is_some_and(|t| t.contains(&needle))
        {
            reannounced = Some(back.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let now = one_announcer(ctx, &st, ip, Duration::from_secs(10))?;
    let restored: Vec<String> = st
        .pods
        .iter()
        .filter(|p| p.node == owner && p.owner.as_deref() == Some("default/nextcloud-dev"))
        .map(|p| p.name.clone())
        .collect();
    for p in &restored {
        cmd(&format!("ferry lab set-ready {p} true"));
        ops::set_ready(ctx, p, true)?;
    }
    match reannounced {
        Some(t) if now == owner => println!(
            "# {owner} is back: it announces {ip} again {} ms after its link came up (it waits \
             a 1 s hold-down first); exactly one node announces it",
            t.as_millis()
        ),
        _ => println!("# {owner} is back; {now} announces {ip}; exactly one node announces it"),
    }
    let url_ok = curl_once(ctx, "client", url)?;
    match url_ok {
        Ok(body) => {
            cmd(&format!("ferry lab exec client -- curl -sS {url}"));
            println!("{body}");
        }
        Err(e) => bail!("{url} does not answer after the link came back: {e}"),
    }
    Ok(())
}

const LB_BGP_SERVICE: &str = "nextcloud-dev-loadbalancer-bgp";

/// Steps 15-19, the seed's "next step": BGP. MetalLB's BGP configuration (a bgp pool, a
/// BGPPeer with a BFDProfile pointing at the lab's router, a BGPAdvertisement) and the
/// LoadBalancer Service on that pool: every node announces its address, the router installs one
/// ECMP route over them, the client reaches the pods through it; then one node fails and the
/// router drops it from the route (BFD), and it comes back.
fn bgp_steps(ctx: &Ctx) -> Result<()> {
    check_interrupted()?;
    let st = ops::state(ctx)?;
    let Some(router) = st.router.clone() else {
        println!();
        println!(
            "# (BGP part skipped: the lab has no router, as BIRD 2 is not installed: \
             apt-get install bird2, or scripts/install-deps.sh)"
        );
        return Ok(());
    };
    println!();
    println!(
        "# the seed's next step: BGP. The lab's router {} (BIRD 2, AS {}) peers with every \
         node (AS {}); each node announces the Service's address, and the router spreads the \
         client's connections over them (ECMP)",
        router.ip, router.asn, router.node_asn
    );
    apply(ctx, "metallb-bgp.yaml", METALLB_BGP)?;
    apply(
        ctx,
        "nextcloud-dev-loadbalancer-bgp.yaml",
        NEXTCLOUD_DEV_LOADBALANCER_BGP,
    )?;
    let ip = wait_for_external_ip(ctx, LB_BGP_SERVICE)?;
    // ANNOUNCED-BY: every node, once its session to the router is up (quietly, at most 10 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        check_interrupted()?;
        let by = get::ferry_get(ctx, &["svc", "-o", "wide"])
            .ok()
            .and_then(|t| column_of(&t, LB_BGP_SERVICE, "ANNOUNCED-BY"))
            .unwrap_or_default();
        if st.nodes.iter().all(|n| by.split(',').any(|b| b == n.name)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    get_svc_wide(ctx)?;

    // One route over every node in the router's kernel.
    let all: Vec<String> = st.nodes.iter().map(|n| n.ip.to_string()).collect();
    wait_nexthops(&router, &ip, &all, Duration::from_secs(20))?;
    println!();
    cmd(&format!("ferry lab exec router -- ip route show {ip}"));
    print!("{}", route_text(&router, &ip));
    println!(
        "# one route to {ip} over all {} nodes: each announces it, BIRD merges the paths",
        all.len()
    );

    let url = client_reaches_every_pod(ctx, &ip, " (BGP, through the router)")?;
    bgp_node_failure(ctx, &st, &router, &ip, &url)
}

/// Waits (quietly) until the Service has a load-balancer address; the address.
fn wait_for_external_ip(ctx: &Ctx, name: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = String::new();
    loop {
        check_interrupted()?;
        if let Ok(t) = get::ferry_get(ctx, &["svc", "-o", "wide"]) {
            let ip = column_of(&t, name, "EXTERNAL-IP").unwrap_or_default();
            if !ip.is_empty() && !ip.starts_with('<') {
                return Ok(ip);
            }
            last = ip;
        }
        if Instant::now() > deadline {
            bail!("service {name} got no load-balancer address: EXTERNAL-IP {last:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `ip route show IP` in the router, or why not.
fn route_text(router: &crate::router::RouterInfo, ip: &str) -> String {
    sys::ip(&["-n", &router.ns, "route", "show", ip]).unwrap_or_else(|e| format!("{e:#}\n"))
}

/// Whether the router's route to `ip` has exactly the next hops `want`, in any order.
fn nexthops_are(router: &crate::router::RouterInfo, ip: &str, want: &[String]) -> Result<bool> {
    let mut now = crate::router::nexthops(router, ip)?;
    now.sort();
    let mut want = want.to_vec();
    want.sort();
    Ok(now == want)
}

/// Waits until the router's route to `ip` has exactly the next hops `want` (any order); how
/// long it took.
fn wait_nexthops(
    router: &crate::router::RouterInfo,
    ip: &str,
    want: &[String],
    timeout: Duration,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        check_interrupted()?;
        if nexthops_are(router, ip, want)? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!(
                "the router's route to {ip} is not over {want:?} after {} s:\n{}",
                timeout.as_secs(),
                route_text(router, ip)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Step 18-19: one node's link goes down while the client curls the address through the
/// router. The connections the router still sends to it fail until BFD tells the router (in
/// about 300 ms); then the link comes back and the node is in the route again.
fn bgp_node_failure(
    ctx: &Ctx,
    st: &LabState,
    router: &crate::router::RouterInfo,
    ip: &str,
    url: &str,
) -> Result<()> {
    check_interrupted()?;
    let node = st.nodes.last().context("the lab has no nodes")?.clone();
    let others: Vec<String> = st
        .nodes
        .iter()
        .filter(|n| n.name != node.name)
        .map(|n| n.ip.to_string())
        .collect();
    let all: Vec<String> = st.nodes.iter().map(|n| n.ip.to_string()).collect();
    println!();
    println!(
        "# node failure: {}'s link to the LAN goes down while the client keeps curling {url}",
        node.name
    );
    let local_pods: Vec<String> = st
        .pods
        .iter()
        .filter(|p| p.node == node.name && p.owner.as_deref() == Some("default/nextcloud-dev"))
        .map(|p| p.name.clone())
        .collect();
    for p in &local_pods {
        cmd(&format!("ferry lab set-ready {p} false"));
        ops::set_ready(ctx, p, false)?;
        println!("# (what the control plane does once {} is gone)", node.name);
    }
    let client_ns = st.client.ns.clone();
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let (attempts, cut, dropped) = std::thread::scope(
        |s| -> Result<(Vec<probe::Attempt>, Duration, Option<Duration>)> {
            let probe = s.spawn(|| probe::probe_loop(&client_ns, url, start, &stop));
            std::thread::sleep(Duration::from_millis(500));
            cmd(&format!(
                "ferry lab exec lan -- ip link set {} down",
                node.lan_if
            ));
            let cut = start.elapsed();
            let down = set_link(&st.lan_ns, &node.lan_if, "down");
            // Until the router's route is over the other nodes only (at most 12 s: longer than
            // the 9 s hold time), then 1 s more of requests.
            let mut dropped = None;
            while start.elapsed() < cut + Duration::from_secs(12)
                && !INTERRUPTED.load(Ordering::SeqCst)
            {
                if nexthops_are(router, ip, &others).unwrap_or(false) {
                    dropped = Some(start.elapsed().saturating_sub(cut));
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(1000));
            stop.store(true, Ordering::SeqCst);
            let attempts = probe
                .join()
                .map_err(|_| anyhow::anyhow!("the probe loop panicked"))?;
            down?;
            Ok((attempts, cut, dropped))
        },
    )?;
    check_interrupted()?;
    let Some(dropped) = dropped else {
        bail!(
            "the router still routes {ip} over {} 12 s after its link went down:\n{}",
            node.name,
            route_text(router, ip)
        );
    };
    let after: Vec<&probe::Attempt> = attempts.iter().filter(|a| a.began >= cut).collect();
    let failed = after.iter().filter(|a| a.result.is_err()).count();
    let last_failure = after
        .iter()
        .filter(|a| a.result.is_err())
        .map(|a| a.began.saturating_sub(cut))
        .max();
    println!(
        "# the router dropped {} from the route {} ms after its link went down (BFD, 100 ms x 3; \
         the hold timer alone would take 9 s)",
        node.name,
        dropped.as_millis()
    );
    match last_failure {
        Some(t) => println!(
            "# the client: {} requests after the cut, {failed} failed (the connections the \
             router still sent to {}), the last one starting {} ms after the cut",
            after.len(),
            node.name,
            t.as_millis()
        ),
        None => println!(
            "# the client: {} requests after the cut, none failed",
            after.len()
        ),
    }
    println!();
    cmd(&format!("ferry lab exec router -- ip route show {ip}"));
    print!("{}", route_text(router, ip));

    // The link comes back: the node's session comes up again and it is back in the route.
    check_interrupted()?;
    println!();
    cmd(&format!(
        "ferry lab exec lan -- ip link set {} up",
        node.lan_if
    ));
    set_link(&st.lan_ns, &node.lan_if, "up")?;
    let back = wait_nexthops(router, ip, &all, Duration::from_secs(20))?;
    for p in &local_pods {
        cmd(&format!("ferry lab set-ready {p} true"));
        ops::set_ready(ctx, p, true)?;
    }
    println!(
        "# {} is back: the router's route to {ip} is over all {} nodes again {} ms after its \
         link came up (a new BGP session)",
        node.name,
        all.len(),
        back.as_millis()
    );
    cmd(&format!("ferry lab exec router -- ip route show {ip}"));
    print!("{}", route_text(router, ip));
    match curl_once(ctx, "client", url)? {
        Ok(body) => {
            cmd(&format!("ferry lab exec client -- curl -sS {url}"));
            println!("{body}");
        }
        Err(e) => bail!("{url} does not answer after the link came back: {e}"),
    }
    Ok(())
}

/// `ip link set IF STATE` in the LAN's namespace (a node's port on the bridge); an error with
/// ip's complaint.
fn set_link(lan_ns: &str, lan_if: &str, state: &str) -> Result<()> {
    let out = sys::exec_output(lan_ns, &["ip", "link", "set", lan_if, state])?;
    if !out.status.success() {
        bail!(
            "ip link set {lan_if} {state}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// One curl from `target`: Ok(Ok(body)) or Ok(Err(curl's complaint)).
fn curl_once(ctx: &Ctx, target: &str, url: &str) -> Result<std::result::Result<String, String>> {
    curl_with_timeout(ctx, target, url, "1")
}

fn curl_with_timeout(
    ctx: &Ctx,
    target: &str,
    url: &str,
    connect_timeout: &str,
) -> Result<std::result::Result<String, String>> {
    let argv = [
        "curl",
        "-sS",
        "--connect-timeout",
        connect_timeout,
        "--max-time",
        "2",
        url,
    ];
    let out = ops::exec_output(ctx, target, &argv)?;
    if out.status.success() {
        Ok(Ok(String::from_utf8_lossy(&out.stdout).trim().to_string()))
    } else {
        Ok(Err(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

/// `ferry lab delete service NAME`.
fn delete_service(ctx: &Ctx, name: &str) -> Result<()> {
    check_interrupted()?;
    println!();
    if let Some(kc) = kubectl(ctx) {
        cmd(&format!("kubectl delete service {name}"));
        run_kubectl(&kc, &["delete", "service", name])?;
        return crate::client::wait_caught_up(ctx);
    }
    cmd(&format!("ferry lab delete service {name}"));
    let report = ops::delete_named(ctx, "service", "default", &[name.to_string()])?;
    for l in &report.lines {
        println!("{l}");
    }
    if !report.errors.is_empty() {
        bail!("{}", report.errors.join("\n"));
    }
    Ok(())
}

/// Step 4 (and 12): at most 40 tries, ~100 ms apart (and at most 40 s), until every pod
/// answered.
fn curl_until_all_answered(
    ctx: &Ctx,
    target: &str,
    url: &str,
    pods: &[String],
    through: &str,
) -> Result<()> {
    if pods.is_empty() {
        // Waiting for nobody would pass at once.
        bail!("no nextcloud pods to wait for on {url}");
    }
    wait_for_agents(ctx, target, url)?;
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    for attempt in 1..=40 {
        check_interrupted()?;
        cmd(&format!("ferry lab exec {target} -- curl -sS {url}"));
        match curl_once(ctx, target, url)? {
            Ok(body) => {
                println!("{body}");
                if pods.contains(&body) {
                    seen.insert(body);
                }
            }
            Err(err) => println!("{err}"),
        }
        if seen.len() == pods.len() {
            println!("# all nextcloud pods answered through {through} ({attempt} tries)");
            return Ok(());
        }
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "only {} of {} nextcloud pods answered on {url} from {target}",
        seen.len(),
        pods.len()
    )
}

/// The client curls the load-balancer address `ip` until every nextcloud pod answered; the URL.
fn client_reaches_every_pod(ctx: &Ctx, ip: &str, how: &str) -> Result<String> {
    let pods = nextcloud_pods(ctx)?;
    let url = format!("http://{ip}/");
    println!();
    let through = format!("the load-balancer address {ip}{how}");
    curl_until_all_answered(ctx, "client", &url, &pods, &through)?;
    Ok(url)
}

/// Agents pick up a new Service within moments: wait (quietly, at most 10 s) until `url`
/// answers once, so the transcript shows the Service working rather than the agents' latency.
fn wait_for_agents(ctx: &Ctx, target: &str, url: &str) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        check_interrupted()?;
        if curl_with_timeout(ctx, target, url, "0.3")?.is_ok() {
            if start.elapsed() > Duration::from_millis(50) {
                println!(
                    "# (the agents programmed {url} within {:.1} s)",
                    start.elapsed().as_secs_f64()
                );
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Step 7: a few tries until the node port answers on one node.
fn curl_until_ok(ctx: &Ctx, target: &str, url: &str, node: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    cmd(&format!("ferry lab exec {target} -- curl -sS {url}"));
    let mut last = String::new();
    for _ in 0..20 {
        check_interrupted()?;
        match curl_once(ctx, target, url)? {
            Ok(body) => {
                println!("{body}");
                println!("# {node} forwarded the node port to pod {body}");
                return Ok(());
            }
            Err(err) => last = err,
        }
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("{last}");
    bail!("no answer on {url} (node {node}) from {target}")
}

/// The cluster IP and first node port of a Service, from `ferry get svc -o json` (falling back
/// to the `-o wide` table); polled for a few seconds while the agents allocate them.
fn service_addr(ctx: &Ctx, name: &str, want_node_port: bool) -> Result<(String, Option<u16>)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last_err = String::from("not found");
    loop {
        check_interrupted()?;
        let found = match get::ferry_get(ctx, &["svc", "-o", "json"]) {
            Ok(json) => from_json(&json, name),
            Err(e) => {
                last_err = format!("{e:#}");
                None
            }
        }
        .or_else(|| {
            get::ferry_get(ctx, &["svc", "-o", "wide"])
                .ok()
                .and_then(|t| from_table(&t, name))
        });
        if let Some((ip, port)) = found {
            if !ip.is_empty() && ip != "None" && (!want_node_port || port.is_some()) {
                return Ok((ip, port));
            }
            last_err = format!("cluster IP {ip:?}, node port {port:?}");
        }
        if Instant::now() > deadline {
            bail!(
                "no cluster IP{} for service {name}: {last_err}",
                if want_node_port { "/node port" } else { "" }
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Finds the Service in kubectl-style JSON (a List, an array or one object).
pub fn from_json(text: &str, name: &str) -> Option<(String, Option<u16>)> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let items: Vec<&serde_json::Value> = match &v {
        serde_json::Value::Array(a) => a.iter().collect(),
        serde_json::Value::Object(o) => match o.get("items").and_then(|i| i.as_array()) {
            Some(a) => a.iter().collect(),
            None => vec![&v],
        },
        _ => return None,
    };
    let svc = items
        .into_iter()
        .find(|s| s.pointer("/metadata/name").and_then(|n| n.as_str()) == Some(name))?;
    let ip = svc
        .pointer("/spec/clusterIP")
        .and_then(|i| i.as_str())
        .unwrap_or("")
        .to_string();
    let port = svc
        .pointer("/spec/ports/0/nodePort")
        .and_then(|p| p.as_u64())
        .and_then(|p| u16::try_from(p).ok());
    Some((ip, port))
}

/// Finds the Service in a kubectl-style table: CLUSTER-IP and PORT(S) (`80:32540/TCP`).
pub fn from_table(text: &str, name: &str) -> Option<(String, Option<u16>)> {
    let mut lines = text.lines();
    let header = lines.next()?;
    let ip_col = header.find("CLUSTER-IP")?;
    let ports_col = header.find("PORT(S)")?;
    let row = lines.find(|l| {
        let first = l.split_whitespace().next().unwrap_or("");
        first == name || first.strip_prefix("service/") == Some(name)
    })?;
    let at = |col: usize| -> String {
        row.get(col..)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or("")
            .to_string()
    };
    let ip = at(ip_col);
    let ports = at(ports_col);
    let node_port = ports
        .split(',')
        .next()
        .and_then(|p| p.split_once(':'))
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|p| p.parse().ok());
    Some((ip, node_port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_from_table() {
        let t = "NAME                     TYPE        CLUSTER-IP    EXTERNAL-IP   PORT(S)        AGE   SELECTOR\nkubernetes               ClusterIP   10.43.0.1     <none>        443/TCP        9d    <none>\nnextcloud-dev-nodeport   NodePort    10.43.3.110   <none>        80:32540/TCP   54s   app=nextcloud,environment=dev\n";
        assert_eq!(
            from_table(t, "nextcloud-dev-nodeport"),
            Some(("10.43.3.110".to_string(), Some(32540)))
        );
        assert_eq!(
            from_table(t, "kubernetes"),
            Some(("10.43.0.1".to_string(), None))
        );
        assert_eq!(from_table(t, "nope"), None);
    }

    #[test]
    fn service_from_json() {
        let j = r#"{"apiVersion":"v1","kind":"List","items":[{"metadata":{"name":"web"},"spec":{"clusterIP":"10.43.0.7","ports":[{"port":80,"nodePort":30080}]}}]}"#;
        assert_eq!(
            from_json(j, "web"),
            Some(("10.43.0.7".to_string(), Some(30080)))
        );
        assert_eq!(from_json(j, "other"), None);
    }

    #[test]
    fn seeds_parse() {
        for (f, t) in [
            ("a", NEXTCLOUD_DEV),
            ("b", NEXTCLOUD_DEV_CLUSTERIP),
            ("c", NEXTCLOUD_DEV_NODEPORT),
            ("d", NEXTCLOUD_DEV_LOADBALANCER),
            ("e", METALLB_CONFIG),
            ("f", DEBIAN_BASH),
            ("g", NEXTCLOUD_DEV_LOADBALANCER_BGP),
        ] {
            let (docs, errors) = manifests::split_docs(f, t);
            assert!(errors.is_empty(), "{f}: {errors:?}");
            assert_eq!(docs.len(), 1, "{f}");
        }
        let (docs, errors) = manifests::split_docs("metallb-bgp.yaml", METALLB_BGP);
        assert!(errors.is_empty(), "{errors:?}");
        let kinds: Vec<&str> = docs.iter().map(|d| d.kind.as_str()).collect();
        assert_eq!(
            kinds,
            ["IPAddressPool", "BGPAdvertisement", "BGPPeer", "BFDProfile"]
        );
    }
}
