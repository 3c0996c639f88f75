//! `ferry-apiserver`: the lab's test double of kube-apiserver (plain HTTP; RBAC for token
//! holders with --authorize).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

/// A test double of kube-apiserver for ferry's lab (not a product: no TLS, no auth, no
/// admission, no defaulting beyond Services). See the crate docs for what it serves.
#[derive(Parser, Debug)]
#[command(name = "ferry-apiserver", version)]
struct Args {
    /// Address to listen on (plain HTTP; keep it on loopback), e.g. 127.0.0.1:6443.
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Write a kubeconfig pointing at the server here.
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
    /// Events kept for watches resuming from a resourceVersion (older ones get 410 Expired).
    #[arg(long, default_value_t = 1000)]
    history: usize,
    /// Service CIDR (IPv4) that cluster IPs come from.
    #[arg(long, default_value = "10.43.0.0/16")]
    service_cidr: String,
    /// Node-port range, FIRST-LAST.
    #[arg(long, default_value = "30000-32767")]
    service_node_port_range: String,
    /// Keep the objects in this file, so that a restarted server still has them (as a real
    /// one keeps them in etcd). Without it, everything is lost when the process ends.
    #[arg(long)]
    state: Option<PathBuf>,
    /// Authorize clients that present a bearer token with the RBAC objects (Role, ClusterRole,
    /// RoleBinding, ClusterRoleBinding) in this file, e.g. deploy/ferry.yaml; other kinds in
    /// it are ignored. Every access is recorded at /debug/ferry/authz.
    #[arg(long)]
    authorize: Option<PathBuf>,
    /// A bearer token and the user it names, TOKEN=USER (repeatable), e.g.
    /// `agent=system:serviceaccount:ferry-system:ferry`. Requests without a token are not
    /// checked (the administrator).
    #[arg(long = "token")]
    tokens: Vec<String>,
    /// Seconds between BOOKMARK events on watches that allow them.
    #[arg(long, default_value_t = 10.0)]
    bookmark_seconds: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !(args.bookmark_seconds.is_finite() && args.bookmark_seconds > 0.0) {
        anyhow::bail!(
            "--bookmark-seconds must be a positive number, got {}",
            args.bookmark_seconds
        );
    }
    let (first, last) = args
        .service_node_port_range
        .split_once('-')
        .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)))
        .filter(|(a, b)| a <= b)
        .with_context(|| {
            format!(
                "--service-node-port-range {:?}: expected FIRST-LAST, e.g. 30000-32767",
                args.service_node_port_range
            )
        })?;
    let services = ferry_apiserver::service::ServiceConfig {
        node_ports: first..=last,
        ..Default::default()
    }
    .with_cidr(&args.service_cidr)
    .map_err(|e| anyhow::anyhow!("--service-cidr: {e}"))?;
    let authz = match &args.authorize {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --authorize {}", path.display()))?;
            Some(std::sync::Arc::new(
                ferry_apiserver::authz::Authorizer::from_documents(&text, &args.tokens)
                    .map_err(|e| anyhow::anyhow!("--authorize {}: {e}", path.display()))?,
            ))
        }
        None if !args.tokens.is_empty() => {
            anyhow::bail!("--token needs --authorize FILE (the roles to check tokens against)")
        }
        None => None,
    };
    let config = ferry_apiserver::Config {
        services,
        authz,
        state: args.state.clone(),
        history: args.history,
        bookmark_interval: Duration::from_secs_f64(args.bookmark_seconds),
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let server =
        ferry_apiserver::ApiServer::new(config).map_err(|e| anyhow::anyhow!("--state: {e}"))?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding --listen {}", args.listen))?;
        let addr = listener.local_addr()?;
        let url = format!("http://{addr}");
        if let Some(path) = &args.kubeconfig_out {
            std::fs::write(path, ferry_apiserver::kubeconfig(&url))
                .with_context(|| format!("writing --kubeconfig-out {}", path.display()))?;
        }
        println!("ferry-apiserver (a test double of kube-apiserver) listening on {url}");
        ferry_apiserver::serve(listener, server).await;
        Ok(())
    })
}
