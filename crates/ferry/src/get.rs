//! `ferry get services`: kubectl's view of services, from a manifest directory and the shared
//! allocation state. It only reads: values nobody has allocated yet show as `<none>` /
//! `<pending>` until an agent allocates them.
//!
//! `ferry get bgppeers [--node N]`: MetalLB's BGP peers as ferry reads them (those a node
//! peers with); `ferry get bgproutes --node N`: the routes that node would announce to each
//! peer, from the same allocation state ([`ferry_model::bgp::BgpConfig::announcements`]).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use ferry_model::alloc::Allocation;
use ferry_model::{ObjectRef, Service, ServiceType};
use serde_json::{json, Value};

use crate::source;
use crate::state::{AllocStore, StateDir};

#[derive(Debug, Args)]
pub struct GetArgs {
    /// What to list: services (svc), bgppeers, bgproutes.
    pub what: String,
    /// For bgppeers and bgproutes: the node (its labels select peers and advertisements).
    #[arg(long)]
    pub node: Option<String>,
    /// Output: wide, yaml or json.
    #[arg(short = 'o', long)]
    pub output: Option<String>,
    #[arg(long)]
    pub manifests: PathBuf,
    #[arg(long, default_value = "/var/lib/ferry")]
    pub state_dir: PathBuf,
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
}

fn ports_text(svc: &Service, a: Option<&Allocation>) -> String {
    if svc.ports.is_empty() {
        return "<none>".into();
    }
    svc.ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let np = a.and_then(|a| a.node_ports.get(i).copied().flatten());
            match np {
                Some(np) => format!("{}:{np}/{}", p.port, p.protocol.as_k8s()),
                None => format!("{}/{}", p.port, p.protocol.as_k8s()),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn external_text(svc: &Service) -> String {
    let mut ips: Vec<String> = Vec::new();
    if svc.type_ == ServiceType::LoadBalancer {
        ips.extend(
            svc.extra
                .load_balancer_ingress
                .iter()
                .map(|i| i.to_string()),
        );
    }
    ips.extend(svc.extra.external_ips.iter().map(|i| i.to_string()));
    match svc.type_ {
        ServiceType::ExternalName => svc
            .extra
            .external_name
            .clone()
            .unwrap_or_else(|| "<none>".into()),
        ServiceType::LoadBalancer if ips.is_empty() => "<pending>".into(),
        _ if ips.is_empty() => "<none>".into(),
        _ => ips.join(","),
    }
}

fn cluster_ip_text(svc: &Service, a: Option<&Allocation>) -> String {
    if svc.type_ == ServiceType::ExternalName {
        return "<none>".into();
    }
    if svc.is_headless() {
        return "None".into();
    }
    match a.and_then(|a| a.cluster_ip) {
        Some(ip) => ip.to_string(),
        None => "<none>".into(),
    }
}

fn selector_text(svc: &Service) -> String {
    if svc.selector.is_empty() {
        return "<none>".into();
    }
    svc.selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

use ferry_model::display::{human_age, table};

fn service_json(svc: &Service, a: Option<&Allocation>) -> Value {
    let ports: Vec<Value> = svc
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut v = json!({
                "protocol": p.protocol.as_k8s(),
                "port": p.port,
                "targetPort": match &p.target_port {
                    ferry_model::TargetPort::Number(n) => json!(n),
                    ferry_model::TargetPort::Name(s) => json!(s),
                },
            });
            if !p.name.is_empty() {
                v["name"] = json!(p.name);
            }
            if let Some(np) = a.and_then(|a| a.node_ports.get(i).copied().flatten()) {
                v["nodePort"] = json!(np);
            }
            v
        })
        .collect();
    let mut spec = json!({ "type": svc.type_.as_k8s(), "ports": ports });
    if !svc.selector.is_empty() {
        spec["selector"] = json!(svc.selector);
    }
    if let Some(hc) = a.and_then(|a| a.health_check_node_port) {
        spec["healthCheckNodePort"] = json!(hc);
    }
    match (svc.is_headless(), a.and_then(|a| a.cluster_ip)) {
        (true, _) => spec["clusterIP"] = json!("None"),
        (false, Some(ip)) => {
            spec["clusterIP"] = json!(ip.to_string());
            let ips: Vec<String> = std::iter::once(ip)
                .chain(a.and_then(|a| a.secondary_cluster_ip))
                .map(|ip| ip.to_string())
                .collect();
            let families: Vec<&str> = ips
                .iter()
                .map(|ip| if ip.contains(':') { "IPv6" } else { "IPv4" })
                .collect();
            spec["clusterIPs"] = json!(ips);
            spec["ipFamilies"] = json!(families);
        }
        _ => {}
    }
    if !svc.extra.external_ips.is_empty() {
        spec["externalIPs"] = json!(svc
            .extra
            .external_ips
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>());
    }
    let ingress: Vec<Value> = svc
        .extra
        .load_balancer_ingress
        .iter()
        .map(|i| json!({ "ip": i.to_string() }))
        .collect();
    let mut meta = json!({ "name": svc.meta.name, "namespace": svc.meta.namespace });
    if !svc.meta.labels.is_empty() {
        meta["labels"] = json!(svc.meta.labels);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": spec,
        "status": { "loadBalancer": if ingress.is_empty() { json!({}) } else { json!({ "ingress": ingress }) } },
    })
}

pub fn run(args: GetArgs) -> Result<i32> {
    let bgp = match args.what.as_str() {
        "services" | "service" | "svc" => None,
        "bgppeers" | "bgppeer" => Some(false),
        "bgproutes" | "bgproute" => Some(true),
        _ => bail!(
            "ferry get: unknown resource type {:?} (known: services, svc, bgppeers, bgproutes)",
            args.what
        ),
    };
    if bgp == Some(true) && args.node.is_none() {
        bail!("ferry get bgproutes: which node? (--node NAME)");
    }
    let snap = source::read_dir(&args.manifests)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", args.manifests.display()))?;
    for e in &snap.errors {
        eprintln!("error: {e}");
    }
    let state = StateDir::at(&args.state_dir);
    let now = source::now_ms();
    let (pools, pool_errors) =
        ferry_model::pools::load(&snap.config_maps, &snap.ip_pools, &snap.l2_advertisements);
    for e in &pool_errors {
        eprintln!("warning: pools: {e}");
    }
    // Read-only: what the agents allocated (services they have not seen yet show no values).
    let (results, lb) = state.view(&snap.services, &snap.namespaces, &pools, now)?;
    let announcers = crate::announce::read_announcers(&state.announcements_dir());
    // Load-balancer addresses as the services' ingress (what the API server's status holds).
    let mut snap = snap;
    for svc in &mut snap.services {
        if let Some(Ok(a)) = lb.get(&svc.meta.object_ref()) {
            svc.extra.load_balancer_ingress = a.ips.clone();
        }
    }
    if let Some(routes) = bgp {
        return bgp_view(&args, &snap, &pools, routes);
    }
    let mut allocs: BTreeMap<ObjectRef, Allocation> = BTreeMap::new();
    for (r, res) in results {
        match res {
            Ok(a) => {
                allocs.insert(r, a);
            }
            Err(e) => eprintln!("warning: {e}"),
        }
    }
    let mut services: Vec<&Service> = snap
        .services
        .iter()
        .filter(|s| args.all_namespaces || s.meta.namespace == args.namespace)
        .collect();
    services.sort_by_key(|s| s.meta.object_ref());

    match args.output.as_deref() {
        Some("json") | Some("yaml") => {
            let items: Vec<Value> = services
                .iter()
                .map(|s| service_json(s, allocs.get(&s.meta.object_ref())))
                .collect();
            let list = json!({ "apiVersion": "v1", "kind": "List", "items": items });
            if args.output.as_deref() == Some("json") {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", serde_saphyr::to_string(&list)?);
            }
            return Ok(0);
        }
        None | Some("wide") => {}
        Some(other) => bail!("ferry get: unknown output format {other:?} (wide, yaml, json)"),
    }
    let wide = args.output.as_deref() == Some("wide");
    if services.is_empty() {
        eprintln!("No resources found in {} namespace.", args.namespace);
        return Ok(0);
    }
    let mut rows = Vec::new();
    let mut head: Vec<String> = Vec::new();
    if args.all_namespaces {
        head.push("NAMESPACE".into());
    }
    head.extend(
        [
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE",
        ]
        .map(String::from),
    );
    if wide {
        head.push("SELECTOR".into());
        head.push("ANNOUNCED-BY".into());
    }
    rows.push(head);
    for s in services {
        let a = allocs.get(&s.meta.object_ref());
        let born = snap
            .service_mtime_ms
            .get(&s.meta.object_ref())
            .copied()
            .unwrap_or(now);
        let mut row = Vec::new();
        if args.all_namespaces {
            row.push(s.meta.namespace.clone());
        }
        row.extend([
            s.meta.name.clone(),
            s.type_.as_k8s().to_string(),
            cluster_ip_text(s, a),
            external_text(s),
            ports_text(s, a),
            human_age(std::time::Duration::from_millis(now.saturating_sub(born))),
        ]);
        if wide {
            row.push(selector_text(s));
            let by: Vec<String> = s
                .extra
                .load_balancer_ingress
                .iter()
                .flat_map(|ip| announcers.get(ip).cloned().unwrap_or_default())
                .collect();
            row.push(if by.is_empty() {
                "<none>".into()
            } else {
                by.join(",")
            });
        }
        rows.push(row);
    }
    print!("{}", table(&rows));
    Ok(0)
}

/// The peers (selecting `--node`, if given) or, with `routes`, the routes `--node` would
/// announce: load-balancer addresses as the services' ingress in `snap`.
fn bgp_view(
    args: &GetArgs,
    snap: &ferry_source::Snapshot,
    pools: &ferry_model::pools::PoolConfig,
    routes: bool,
) -> Result<i32> {
    use ferry_model::bgp;
    let (cfg, errors) = bgp::load(pools, &snap.bgp_inputs());
    for e in &errors {
        eprintln!("warning: bgp: {e}");
    }
    let node_labels = match &args.node {
        None => None,
        Some(n) => match snap.nodes.iter().find(|x| &x.meta.name == n) {
            Some(x) => Some(x.meta.labels.clone()),
            None => {
                eprintln!("warning: no Node {n:?} in the manifests: read as a node without labels");
                Some(BTreeMap::new())
            }
        },
    };
    let json_out = matches!(args.output.as_deref(), Some("json" | "yaml"));
    if !routes {
        let peers: Vec<&bgp::BgpPeer> = cfg
            .peers
            .iter()
            .filter(|p| node_labels.as_ref().is_none_or(|l| p.selects_node(l)))
            .collect();
        if json_out {
            let items: Vec<Value> = peers
                .iter()
                .map(|p| {
                    json!({
                        "name": p.name,
                        "source": p.source,
                        "myASN": p.my_asn,
                        "peerASN": p.peer_asn,
                        "peerAddress": p.peer_address.to_string(),
                        "peerPort": p.peer_port,
                        "holdTime": format!("{}s", p.hold_time.as_secs()),
                        "keepaliveTime": format!("{}s", p.keepalive_time.as_secs()),
                        "routerID": p.router_id.map(|r| r.to_string()),
                        "sourceAddress": p.source_address.map(|a| a.to_string()),
                        "nodeSelectors": p.node_selectors.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                        "password": p.password.is_some(),
                        "ebgpMultiHop": p.ebgp_multihop,
                        "bfdProfile": p.bfd_profile,
                    })
                })
                .collect();
            return print_structured(args, json!({ "peers": items }));
        }
        let mut rows = vec![[
            "NAME", "ADDRESS", "MY-ASN", "PEER-ASN", "HOLD", "BFD", "NODES", "SOURCE",
        ]
        .map(String::from)
        .to_vec()];
        for p in peers {
            let nodes = if p.node_selectors.is_empty() {
                "<all>".to_string()
            } else {
                p.node_selectors
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(" | ")
            };
            rows.push(vec![
                p.name.clone(),
                format!("{}:{}", bracket(p.peer_address), p.peer_port),
                p.my_asn.to_string(),
                p.peer_asn.to_string(),
                format!("{}s", p.hold_time.as_secs()),
                p.bfd_profile.clone().unwrap_or_else(|| "<none>".into()),
                nodes,
                p.source.clone(),
            ]);
        }
        if rows.len() == 1 {
            eprintln!("No BGP peers found.");
            return Ok(0);
        }
        print!("{}", table(&rows));
        return Ok(0);
    }
    let node = args.node.clone().unwrap_or_default();
    let labels = node_labels.unwrap_or_default();
    let services: Vec<(&Service, &[std::net::IpAddr])> = snap
        .services
        .iter()
        .map(|s| (s, s.extra.load_balancer_ingress.as_slice()))
        .collect();
    let addresses = bgp::eligible_addresses(&node, &services, &snap.slices, pools);
    let out = cfg.announcements(&labels, &addresses);
    if json_out {
        let items: Vec<Value> = out
            .iter()
            .map(|p| {
                json!({
                    "peer": p.peer,
                    "routes": p.routes.iter().map(|r| json!({
                        "prefix": r.prefix.to_string(),
                        "localPref": r.local_pref,
                        "communities": r.communities.iter().map(|c| bgp::Community::Standard(*c).to_string()).collect::<Vec<_>>(),
                        "largeCommunities": r.large_communities.iter().map(|c| bgp::Community::Large(*c).to_string()).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        return print_structured(args, json!({ "node": node, "peers": items }));
    }
    let mut rows = vec![["PEER", "PREFIX", "LOCAL-PREF", "COMMUNITIES"]
        .map(String::from)
        .to_vec()];
    for p in &out {
        for r in &p.routes {
            let comms: Vec<String> = r
                .communities
                .iter()
                .map(|c| bgp::Community::Standard(*c).to_string())
                .chain(
                    r.large_communities
                        .iter()
                        .map(|c| bgp::Community::Large(*c).to_string()),
                )
                .collect();
            rows.push(vec![
                p.peer.clone(),
                r.prefix.to_string(),
                r.local_pref
                    .map_or_else(|| "<none>".to_string(), |l| l.to_string()),
                if comms.is_empty() {
                    "<none>".into()
                } else {
                    comms.join(",")
                },
            ]);
        }
    }
    if out.is_empty() {
        eprintln!("No BGP peer selects node {node:?}.");
        return Ok(0);
    }
    if rows.len() == 1 {
        eprintln!(
            "Node {node:?} announces nothing (peers: {}).",
            out.iter()
                .map(|p| p.peer.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(0);
    }
    print!("{}", table(&rows));
    Ok(0)
}

fn bracket(ip: std::net::IpAddr) -> String {
    if ip.is_ipv6() {
        format!("[{ip}]")
    } else {
        ip.to_string()
    }
}

fn print_structured(args: &GetArgs, v: Value) -> Result<i32> {
    if args.output.as_deref() == Some("json") {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", serde_saphyr::to_string(&v)?);
    }
    Ok(0)
}
