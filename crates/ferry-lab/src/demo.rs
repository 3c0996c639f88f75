//! `ferry demo`: a 2-node lab replaying the first half of the seed blog post (Deployment,
//! ClusterIP Service, curl from a pod, NodePort Service, curl from outside), then `down`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::get::{self, NsFilter};
use crate::manifests;
use crate::ops;
use crate::state::Ctx;
use crate::topology;

pub const NEXTCLOUD_DEV: &str = include_str!("../manifests/seed/nextcloud-dev.yaml");
pub const NEXTCLOUD_DEV_CLUSTERIP: &str =
    include_str!("../manifests/seed/nextcloud-dev-clusterip.yaml");
pub const NEXTCLOUD_DEV_NODEPORT: &str =
    include_str!("../manifests/seed/nextcloud-dev-nodeport.yaml");
pub const NEXTCLOUD_DEV_LOADBALANCER: &str =
    include_str!("../manifests/seed/nextcloud-dev-loadbalancer.yaml");
pub const METALLB_CONFIG: &str = include_str!("../manifests/seed/metallb-config.yaml");

/// The seed's `kubectl run debian-bash --image debian bash`, as a Pod.
pub const DEBIAN_BASH: &str = include_str!("../manifests/seed/debian-bash.yaml");

#[derive(Debug, Args)]
pub struct DemoArgs {
    #[arg(long, default_value = "demo")]
    pub prefix: String,
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
    println!(
        "# ferry demo: a 2-node lab (prefix {:?}) replaying the seed's Services walk-through",
        ctx.prefix
    );
    cmd("ferry lab up --nodes 2");
    let result = match topology::up(&ctx, 2, true) {
        Ok(report) => {
            crate::cli::print_up(&ctx, &report);
            steps(&ctx)
        }
        Err(e) => Err(e),
    };
    println!();
    cmd("ferry lab down");
    match topology::down(&ctx) {
        Ok(r) => println!(
            "lab {:?} down: {} processes stopped, {} namespaces deleted",
            ctx.prefix,
            r.processes,
            r.namespaces.len()
        ),
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
    curl_until_all_answered(ctx, "debian-bash", &url, &pods)?;

    // 5-6: replace the ClusterIP Service with a NodePort one.
    check_interrupted()?;
    println!();
    cmd("ferry lab delete service nextcloud-dev-clusterip");
    let report = ops::delete_named(
        ctx,
        "service",
        "default",
        &["nextcloud-dev-clusterip".to_string()],
    )?;
    for l in &report.lines {
        println!("{l}");
    }
    if !report.errors.is_empty() {
        bail!("{}", report.errors.join("\n"));
    }
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

/// Step 4: at most 40 tries, ~100 ms apart (and at most 40 s), until every pod answered.
fn curl_until_all_answered(ctx: &Ctx, target: &str, url: &str, pods: &[String]) -> Result<()> {
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
            println!("# all nextcloud pods answered through the cluster IP ({attempt} tries)");
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
        ] {
            let (docs, errors) = manifests::split_docs(f, t);
            assert!(errors.is_empty(), "{f}: {errors:?}");
            assert_eq!(docs.len(), 1, "{f}");
        }
    }
}
