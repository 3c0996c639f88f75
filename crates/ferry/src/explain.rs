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
use ferry_plan::trace::{trace_tables, Fate, Packet};

use crate::agent::{self, AgentArgs, SourceKind};
use crate::netwatch;
use crate::state::{AllocStore, StateDir};

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// Where the connection comes from (an address), e.g. the client 192.168.2.100; with
    /// --local, defaults to the node's own address.
    #[arg(long)]
    pub from: Option<IpAddr>,
    /// Where it goes: ADDRESS:PORT[/PROTO], e.g. 192.168.2.200:80, 10.43.0.10:53/udp or
    /// [fd00:43::10]:80/tcp.
    #[arg(long, value_parser = parse_to)]
    pub to: (SocketAddr, Option<Protocol>),
    /// tcp, udp or sctp (default tcp; or give it as /PROTO in --to).
    #[arg(long, value_parser = parse_proto)]
    pub proto: Option<Protocol>,
    /// text (default) or json (one object, for scripts).
    #[arg(short = 'o', long = "output", default_value = "text", value_parser = ["text", "json"])]
    pub output: String,
    /// Do not read the kernel's table back (only the plan is traced then).
    #[arg(long)]
    pub no_kernel: bool,
    /// Also list every rule that matched on the way (`CHAIN: RULE`, nft syntax).
    #[arg(long)]
    pub rules: bool,
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

/// ADDRESS:PORT[/PROTO].
fn parse_to(s: &str) -> Result<(SocketAddr, Option<Protocol>), String> {
    let (addr, proto) = match s.rsplit_once('/') {
        Some((a, p)) => (a, Some(parse_proto(p)?)),
        None => (s, None),
    };
    let addr = addr.parse::<SocketAddr>().map_err(|_| {
        format!("{s:?}: ADDRESS:PORT[/PROTO], e.g. 10.43.0.10:53/udp or [fd00:43::10]:80")
    })?;
    Ok((addr, proto))
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
    // The agent's layout: with automatic shards, the count its tables in this kernel show (the
    // rule's hysteresis keeps it), else the rule's count for these services.
    let in_kernel = match args.no_kernel {
        true => 1,
        false => ferry_nft::tables::ferry_tables(&mut ferry_nft::Nft::new())
            .map(|t| agent::shards_in_kernel(&t))
            .unwrap_or(1),
    };
    let mut planner = agent::TablePlanner::starting_at(in_kernel);
    let pass = agent::compute(
        &mut planner,
        a,
        &snap,
        pools,
        agent::Allocated::All(allocated.0, allocated.1),
        &host,
    );
    let tables: Vec<ferry_plan::Ruleset> = planner.tables().into_iter().cloned().collect();
    let saddr = match (args.from, args.local) {
        (Some(ip), _) => ip,
        (None, true) => *pass
            .node_ips
            .first()
            .context("--local: this node has no address; give --from")?,
        (None, false) => bail!("give --from ADDRESS (where the connection comes from)"),
    };
    let (to, to_proto) = args.to;
    let proto = match (to_proto, args.proto) {
        (Some(a), Some(b)) if a != b => bail!(
            "--to says /{} but --proto says {}: give one",
            a.as_nft(),
            b.as_nft()
        ),
        (Some(p), _) | (None, Some(p)) => p,
        (None, None) => Protocol::Tcp,
    };
    let pkt = Packet {
        saddr,
        daddr: to.ip(),
        proto,
        dport: to.port(),
        local_origin: args.local,
        iif: None,
    };
    let outcomes = trace_tables(&tables, &pkt);
    // A first pass: every service is a changed one, in the snapshot's order.
    let service = pass
        .changes
        .changed
        .iter()
        .find(|s| {
            s.cluster_ips().any(|ip| ip == pkt.daddr)
                || s.external_ips.contains(&pkt.daddr)
                || s.load_balancer_ips.contains(&pkt.daddr)
                || pass.node_ips.contains(&pkt.daddr)
                    && s.ports.iter().any(|p| p.node_port == Some(pkt.dport))
        })
        .map(|s| s.id.to_string());
    let announcement = announcement(a, &snap, &pass, pkt.daddr);
    let kernel = if args.no_kernel {
        KernelCheck {
            read: false,
            as_planned: None,
            summary: "not read (--no-kernel)".into(),
            differences: Vec::new(),
        }
    } else {
        kernel_check(&tables, &outcomes, &pkt)
    };
    let report = Report {
        node: a.node.clone(),
        from: saddr,
        to,
        proto: proto.as_nft(),
        local: args.local,
        service,
        outcomes: outcomes.iter().map(OutcomeOut::of).collect(),
        announcement,
        kernel,
        verbose: args.rules,
    };
    if args.output == "json" {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(0)
}

/// What `ferry explain` found, printed as text or JSON.
#[derive(Debug, serde::Serialize)]
struct Report {
    node: String,
    from: IpAddr,
    to: SocketAddr,
    proto: &'static str,
    /// Opened by the node itself (output hook).
    local: bool,
    /// namespace/name of the service the destination belongs to, if any.
    service: Option<String>,
    outcomes: Vec<OutcomeOut>,
    /// For a load-balancer address: who announces it and why.
    announcement: Option<Announcement>,
    /// The kernel's table against the plan.
    kernel: KernelCheck,
    /// Text output lists the matched rules too (JSON always has them).
    #[serde(skip)]
    verbose: bool,
}

#[derive(Debug, serde::Serialize)]
struct OutcomeOut {
    probability: f64,
    /// dnat, untouched, rejected or dropped.
    fate: &'static str,
    endpoint: Option<SocketAddr>,
    masquerade: bool,
    /// For rejected: "tcp reset" or "icmp port-unreachable".
    reject_with: Option<&'static str>,
    /// Chains entered, in order.
    chains: Vec<String>,
    /// The rules that matched on the way (`CHAIN: RULE`), in order.
    rules: Vec<String>,
    notes: Vec<String>,
    /// For rejected and dropped: why (the deciding rule's comment, or what its map means).
    why: Option<String>,
}

impl OutcomeOut {
    fn of(o: &ferry_plan::trace::Outcome) -> OutcomeOut {
        let (fate, endpoint, masquerade, reject_with) = match &o.fate {
            Fate::Dnat {
                addr,
                port,
                masquerade,
            } => (
                "dnat",
                Some(SocketAddr::new(*addr, *port)),
                *masquerade,
                None,
            ),
            Fate::Untouched { masquerade } => ("untouched", None, *masquerade, None),
            Fate::Rejected { tcp_reset } => (
                "rejected",
                None,
                false,
                Some(if *tcp_reset {
                    "tcp reset"
                } else {
                    "icmp port-unreachable"
                }),
            ),
            Fate::Dropped => ("dropped", None, false, None),
        };
        OutcomeOut {
            probability: o.probability,
            fate,
            endpoint,
            masquerade,
            reject_with,
            chains: o.path.clone(),
            rules: o.rules.clone(),
            notes: o.notes.clone(),
            why: matches!(o.fate, Fate::Rejected { .. } | Fate::Dropped)
                .then(|| why(o))
                .flatten(),
        }
    }

    fn text(&self) -> String {
        match self.fate {
            "dnat" => format!(
                "to endpoint {}, source {}",
                self.endpoint.map(|e| e.to_string()).unwrap_or_default(),
                if self.masquerade {
                    "masqueraded (the endpoint sees the node's address)"
                } else {
                    "kept"
                }
            ),
            "untouched" => format!(
                "not a service address: left alone{}",
                if self.masquerade {
                    ", source masqueraded"
                } else {
                    ""
                }
            ),
            "rejected" => format!(
                "rejected ({}): {}",
                self.reject_with.unwrap_or_default(),
                self.why.as_deref().unwrap_or("by ferry's rules")
            ),
            _ => format!(
                "dropped: {}",
                self.why.as_deref().unwrap_or("by ferry's rules")
            ),
        }
    }
}

/// Why a connection was rejected or dropped: the deciding rule (the last that matched) says
/// it in its comment, or by the map it looks up.
fn why(o: &ferry_plan::trace::Outcome) -> Option<String> {
    // The reject chain only carries out what the rule before it decided.
    let last = o
        .rules
        .iter()
        .rev()
        .find(|r| !r.starts_with(&format!("{}: ", ferry_plan::plan::names::REJECT)))?;
    let (chain, rule) = last.split_once(": ").unwrap_or(("", last));
    if let Some((_, c)) = rule.split_once("comment \"") {
        return Some(c.trim_end_matches('"').to_string());
    }
    let dropped = o.fate == Fate::Dropped;
    Some(if rule.contains("@no-endpoint-") && dropped {
        "no usable endpoint on this node, and the service's traffic policy is Local (other \
         nodes have endpoints)"
            .into()
    } else if rule.contains("@no-endpoint-") {
        "the service has no usable endpoint".into()
    } else if chain.starts_with("firewall-") {
        "the source is outside the service's loadBalancerSourceRanges".into()
    } else {
        format!("by {last}")
    })
}

/// Who announces a load-balancer address, and why that node.
#[derive(Debug, serde::Serialize)]
struct Announcement {
    /// layer2 or bgp.
    mode: &'static str,
    /// layer2: the elected node, first in the address's preference order among the eligible
    /// nodes (all assumed up); bgp: every eligible node.
    nodes: Vec<String>,
    /// layer2: the eligible nodes in the address's preference order (the next one takes over
    /// when the first fails).
    order: Vec<String>,
    why: String,
}

/// The kernel's table compared with the plan.
#[derive(Debug, serde::Serialize)]
struct KernelCheck {
    /// Whether the table could be read.
    read: bool,
    /// Whether the kernel holds exactly the plan (None: not read).
    as_planned: Option<bool>,
    summary: String,
    /// What differs on this connection's way: chains it enters and map elements for its
    /// destination.
    differences: Vec<String>,
}

impl Report {
    fn text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} {} -> {}/{} on node {}:",
            if self.local {
                "from the node itself,"
            } else {
                "arriving,"
            },
            self.from,
            self.to,
            self.proto,
            self.node
        );
        if let Some(svc) = &self.service {
            let _ = writeln!(out, "  service {svc}");
        }
        for o in &self.outcomes {
            let _ = writeln!(out, "  {:5.1}%  {}", o.probability * 100.0, o.text());
            let _ = writeln!(out, "          chains: {}", o.chains.join(" -> "));
            if self.verbose {
                for r in &o.rules {
                    let _ = writeln!(out, "          matched {r}");
                }
            }
            for note in &o.notes {
                let _ = writeln!(out, "          {note}");
            }
        }
        if let Some(a) = &self.announcement {
            let _ = writeln!(
                out,
                "  announced ({}) by {}: {}",
                a.mode,
                if a.nodes.is_empty() {
                    "no node".to_string()
                } else {
                    a.nodes.join(", ")
                },
                a.why
            );
        }
        let _ = writeln!(out, "  kernel: {}", self.kernel.summary);
        for d in &self.kernel.differences {
            let _ = writeln!(out, "          {d}");
        }
        out
    }
}

/// For a load-balancer address: the layer-2 election as every agent runs it (all nodes assumed
/// up), or the nodes that announce it over BGP.
fn announcement(
    a: &AgentArgs,
    snap: &ferry_source::Snapshot,
    pass: &agent::Pass,
    daddr: IpAddr,
) -> Option<Announcement> {
    let pool = pass.l2.pools.pool_of(daddr)?;
    let addr = pass.l2.addresses.iter().find(|x| x.ips.contains(&daddr))?;
    let names: Vec<String> = match pass.l2.nodes.is_empty() {
        true => vec![a.node.clone()],
        false => pass.l2.nodes.iter().map(|n| n.meta.name.clone()).collect(),
    };
    let labels_of = |name: &str| {
        pass.l2
            .nodes
            .iter()
            .find(|n| n.meta.name == name)
            .map(|n| n.meta.labels.clone())
            .unwrap_or_default()
    };
    let local_note = match &addr.local_nodes {
        Some(l) => format!(
            "externalTrafficPolicy Local: only nodes with a ready endpoint ({})",
            if l.is_empty() {
                "none".to_string()
            } else {
                l.iter().cloned().collect::<Vec<_>>().join(", ")
            }
        ),
        None => "externalTrafficPolicy Cluster: any selected node".to_string(),
    };
    if pool.protocol == Some(ferry_model::pools::PoolProtocol::Bgp)
        || pass
            .l2
            .pools
            .l2_announcers(&pool.name, &labels_of(&a.node))
            .is_none()
            && !pass.bgp.peers.is_empty()
    {
        // Every node whose BGPPeers take the address announces it (ECMP at the router).
        let mut nodes = Vec::new();
        for n in &snap.nodes {
            let mut ignored = Vec::new();
            let w = crate::bgp::wanted(
                snap,
                &n.meta.name,
                &n.meta.labels,
                &n.internal_ips(),
                &pass.bgp_services,
                &mut ignored,
            );
            if w.routes
                .iter()
                .any(|(_, rs)| rs.iter().any(|r| r.prefix.contains(&daddr)))
            {
                nodes.push(n.meta.name.clone());
            }
        }
        return Some(Announcement {
            mode: "bgp",
            why: format!(
                "every node selected by a BGPPeer and a BGPAdvertisement of pool {} announces it; \
                 the router spreads connections over them ({local_note})",
                pool.name
            ),
            nodes,
            order: Vec::new(),
        });
    }
    let eligible: Vec<&str> = names
        .iter()
        .filter(|n| {
            pass.l2
                .pools
                .l2_announcers(&pool.name, &labels_of(n))
                .is_some()
        })
        .filter(|n| addr.local_nodes.as_ref().is_none_or(|l| l.contains(*n)))
        .map(String::as_str)
        .collect();
    let order: Vec<String> =
        ferry_member::election::preference_order(&daddr.to_string(), &eligible)
            .into_iter()
            .map(str::to_string)
            .collect();
    let refused = pass.l2.never_announce.get(&daddr);
    let why = match (order.first(), refused) {
        (_, Some(what)) => format!("never: it is {what}; remove it from pool {}", pool.name),
        (None, None) => format!(
            "no node is eligible (selected by an L2Advertisement of pool {}; {local_note})",
            pool.name
        ),
        (Some(first), None) => format!(
            "{first} is first in this address's order of the eligible nodes ({}), assuming all \
             are up; if it fails, the next takes over ({local_note})",
            order.join(", ")
        ),
    };
    Some(Announcement {
        mode: "layer2",
        nodes: match refused {
            Some(_) => Vec::new(),
            None => order.first().cloned().into_iter().collect(),
        },
        order,
        why,
    })
}

/// Reads ferry's tables back from this kernel (this network namespace) and compares them with
/// the plan: what differs, and what of it lies on this connection's way.
fn kernel_check(
    tables: &[ferry_plan::Ruleset],
    outcomes: &[ferry_plan::trace::Outcome],
    pkt: &Packet,
) -> KernelCheck {
    use ferry_plan::diff::Op;
    let not_read = |e: &dyn std::fmt::Display| KernelCheck {
        read: false,
        as_planned: None,
        summary: format!(
            "not read ({e}): run as root on the node (in its network namespace) to compare the \
             kernel's table with the plan"
        ),
        differences: Vec::new(),
    };
    // Every table of ferry's the kernel has: a shard table not planned is a difference too.
    let present = match ferry_nft::netlink::table_names() {
        Ok(names) => names,
        Err(e) => return not_read(&e),
    };
    let mut lives = Vec::new();
    for rs in tables {
        match ferry_nft::netlink::read_live_table(rs.table_name()) {
            Ok(l) => lives.push(l),
            Err(e) => return not_read(&e),
        }
    }
    let sharded = tables.len() > 1;
    let name_of = |rs: &ferry_plan::Ruleset, chain: &str| match sharded {
        true => format!("{}:{chain}", rs.table_name()),
        false => chain.to_string(),
    };
    if lives.iter().all(|l| !l.table) {
        return KernelCheck {
            read: true,
            as_planned: Some(false),
            summary: "ferry's table is not in this kernel: no agent runs in this network \
                      namespace, or `ferry cleanup` removed it; packets are not handled as above"
                .into(),
            differences: Vec::new(),
        };
    }
    let on_path: std::collections::BTreeSet<&str> = outcomes
        .iter()
        .flat_map(|o| o.path.iter().map(String::as_str))
        .collect();
    let dst = pkt.daddr.to_string();
    let port_key = format!("{} . {}", pkt.proto.as_nft(), pkt.dport);
    // This destination's entries: keyed by its address, or (node ports) by proto . port alone.
    let mine = |k: &str| k.split(" . ").next() == Some(dst.as_str()) || k == port_key;
    let mut differences = Vec::new();
    let mut summaries = Vec::new();
    for t in present
        .iter()
        .filter(|t| ferry_nft::tables::is_shard_table(t))
    {
        if !tables.iter().any(|rs| rs.table_name() == t) {
            // Its base chains see every packet: on every connection's way.
            differences.push(format!("table {t}: in the kernel, not in the plan"));
            summaries.push(format!("table {t} not planned"));
        }
    }
    for (rs, live) in tables.iter().zip(&lives) {
        if !live.table {
            differences.push(format!(
                "table {}: missing from the kernel",
                rs.table_name()
            ));
            summaries.push(format!("table {} missing", rs.table_name()));
            continue;
        }
        let ch = ferry_plan::diff::diff(live, rs);
        if ch.ops.is_empty() {
            continue;
        }
        summaries.push(match sharded {
            true => format!("{}: {ch}", rs.table_name()),
            false => ch.to_string(),
        });
        let prefix = match sharded {
            true => format!("{}: ", rs.table_name()),
            false => String::new(),
        };
        for op in &ch.ops {
            match op {
                Op::AddChain(c) if on_path.contains(name_of(rs, c).as_str()) => {
                    differences.push(format!("{prefix}chain {c}: missing from the kernel"))
                }
                Op::FlushChain(c) if on_path.contains(name_of(rs, c).as_str()) => {
                    differences.push(format!("{prefix}chain {c}: its rules differ from the plan"))
                }
                Op::DeleteChain(c) if on_path.contains(name_of(rs, c).as_str()) => {
                    differences.push(format!("{prefix}chain {c}: in the kernel, not in the plan"))
                }
                Op::AddElements(set, keys) => {
                    for k in keys.iter().filter(|k| mine(k)) {
                        differences.push(format!(
                            "{prefix}{set}: element {k} missing or different in the kernel"
                        ));
                    }
                }
                Op::DeleteElements(set, keys) => {
                    for k in keys.iter().filter(|k| mine(k)) {
                        differences.push(format!(
                            "{prefix}{set}: element {k} in the kernel, not in the plan"
                        ));
                    }
                }
                Op::Full { .. } => differences.push(format!("{prefix}the whole table differs")),
                _ => {}
            }
        }
    }
    if summaries.is_empty() {
        return KernelCheck {
            read: true,
            as_planned: Some(true),
            summary: "as planned (every chain and map element read back matches)".into(),
            differences: Vec::new(),
        };
    }
    differences.dedup();
    KernelCheck {
        read: true,
        as_planned: Some(false),
        summary: format!(
            "differs from the plan ({}){}; the agent repairs its table within a second when it \
             runs with these settings (if its flags differ from this command's, give them here too)",
            summaries.join("; "),
            if differences.is_empty() {
                ", though not on this connection's way"
            } else {
                ", on this connection's way:"
            }
        ),
        differences,
    }
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
