//! `ferry explain`: where a new connection goes on a node, and why, without touching anything.
//!
//! It builds the ruleset the node's agent programs — from the manifest directory and the
//! allocations kept in the state directory (read only), or from the Kubernetes API (one list of
//! everything, then the same computation) — and traces the connection's first packet through
//! it ([`ferry_plan::trace`]): every chain it enters, and each outcome with its probability
//! (DNAT to an endpoint with or without masquerade, left alone, rejected, dropped).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use ferry_model::Protocol;
use ferry_plan::trace::{trace, Fate, Packet};

use crate::agent::{self, AgentArgs, SourceKind};
use crate::netwatch;
use crate::state::{AllocStore, StateDir};

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// Where the connection comes from (an address), e.g. the client 192.168.2.100; with
    /// --local, defaults to the node's own address.
    #[arg(long)]
    pub from: Option<IpAddr>,
    /// Where it goes: ADDRESS:PORT, e.g. 192.168.2.200:80 or 10.43.0.10:53.
    #[arg(long)]
    pub to: SocketAddr,
    /// tcp, udp or sctp.
    #[arg(long, default_value = "tcp", value_parser = parse_proto)]
    pub proto: Protocol,
    /// The node itself opens the connection (output hook) instead of receiving it.
    #[arg(long)]
    pub local: bool,
    /// The node's agent settings: --node and --manifests/--kubeconfig (and --state-dir,
    /// --cluster-cidr, --service-cidr as the agent has them).
    #[command(flatten)]
    pub agent: AgentArgs,
}

fn parse_proto(s: &str) -> Result<Protocol, String> {
    Protocol::parse_k8s(&s.to_ascii_uppercase()).ok_or_else(|| format!("{s:?}: tcp, udp or sctp"))
}

pub fn run(args: ExplainArgs) -> Result<i32> {
    let a = &args.agent;
    let snap = match a.source()? {
        SourceKind::Manifests(dir) => {
            crate::source::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        }
        SourceKind::Api(kubeconfig) => list_from_api(a, kubeconfig.as_deref())?,
    };
    let from_api = a.manifests.is_none();
    let host = netwatch::host_net();
    let pools = agent::load_pools(&snap, &a.service_cidr, &host);
    let allocated = if from_api {
        ferry_kube::status::from_api(&snap.services, &pools.0)
    } else {
        // What the agents allocated; nothing is written.
        StateDir::at(&a.state_dir).view(
            &snap.services,
            &snap.namespaces,
            &pools.0,
            crate::source::now_ms(),
        )?
    };
    let mut planner = ferry_plan::plan::Planner::default();
    let pass = agent::compute(&mut planner, a, &snap, pools, allocated, &host);
    let saddr = match (args.from, args.local) {
        (Some(ip), _) => ip,
        (None, true) => *pass
            .node_ips
            .first()
            .context("--local: this node has no address; give --from")?,
        (None, false) => bail!("give --from ADDRESS (where the connection comes from)"),
    };
    let pkt = Packet {
        saddr,
        daddr: args.to.ip(),
        proto: args.proto,
        dport: args.to.port(),
        local_origin: args.local,
        iif: None,
    };
    let outcomes = trace(planner.ruleset(), &pkt);
    println!(
        "{} {saddr} -> {}/{} on node {}:",
        if args.local {
            "from the node itself,"
        } else {
            "arriving,"
        },
        args.to,
        args.proto.as_k8s().to_ascii_lowercase(),
        a.node
    );
    if let Some(svc) = pass.services.iter().find(|s| {
        s.cluster_ips().any(|ip| ip == pkt.daddr)
            || s.external_ips.contains(&pkt.daddr)
            || s.load_balancer_ips.contains(&pkt.daddr)
            || pass.node_ips.contains(&pkt.daddr)
                && s.ports.iter().any(|p| p.node_port == Some(pkt.dport))
    }) {
        println!("  service {}", svc.id);
    }
    for o in &outcomes {
        let what = match &o.fate {
            Fate::Dnat {
                addr,
                port,
                masquerade,
            } => format!(
                "to endpoint {}, source {}",
                SocketAddr::new(*addr, *port),
                if *masquerade {
                    "masqueraded (the endpoint sees the node's address)"
                } else {
                    "kept"
                }
            ),
            Fate::Untouched { masquerade } => format!(
                "not a service address: left alone{}",
                if *masquerade {
                    ", source masqueraded"
                } else {
                    ""
                }
            ),
            Fate::Rejected { tcp_reset } => format!(
                "rejected ({}): the service has no usable endpoint here",
                if *tcp_reset {
                    "TCP reset"
                } else {
                    "ICMP unreachable"
                }
            ),
            Fate::Dropped => "dropped".to_string(),
        };
        println!("  {:5.1}%  {what}", o.probability * 100.0);
        println!("          chains: {}", o.path.join(" -> "));
        for note in &o.notes {
            println!("          {note}");
        }
    }
    Ok(0)
}

/// One complete list of everything the agent watches, from the API server.
fn list_from_api(
    a: &AgentArgs,
    kubeconfig: Option<&std::path::Path>,
) -> Result<ferry_source::Snapshot> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = ferry_kube::client(kubeconfig).await?;
        let src = ferry_kube::ApiSource::start(
            client,
            a.source_config(),
            || {},
            |line| eprintln!("{line}"),
        );
        let t0 = Instant::now();
        while !src.ready() {
            if t0.elapsed() > Duration::from_secs(20) {
                bail!(
                    "the API server did not list {} within 20 s",
                    src.waiting_for().join(", ")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(src.snapshot())
    })
}
