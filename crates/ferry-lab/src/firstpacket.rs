//! `ferry lab bench-first-packet` (`bench/first-packet.sh`): the latency of a new connection's
//! first packet to the 1st, ..., 10,000th service, with every service loaded, for ferry's
//! layouts and for kube-proxy's iptables layout through iptables-nft, in one run.
//!
//! This is a benchmark, not a timed test: it prints numbers and asserts nothing about them,
//! except that every path it times really reaches the service's endpoints.
//!
//! # Method
//!
//! * Three network namespaces joined by veth pairs: `P-fp-client` (10.99.0.2) — `P-fp-node`
//!   (10.99.0.1, 10.99.1.1; forwarding on; the only one with rules) — `P-fp-ep` (10.99.1.2),
//!   which answers on every endpoint address: a `local 10.42.0.0/16` route on `lo` and one
//!   listener on 0.0.0.0:8080 (accepting and dropping), so every DNAT'd SYN gets a real SYN-ACK
//!   from the kernel. The node routes 10.42.0.0/16 to the endpoint namespace; the client
//!   routes everything through the node.
//! * The services are `ferry bench`'s: N services, 10.43.0.0/16 cluster IPs (service #k has
//!   10.43.0.0 + k), port 80/TCP, every odd one a NodePort, M endpoints each in 10.42.0.0/16
//!   port 8080 (cluster CIDR 10.42.0.0/16: the client's traffic is masqueraded, as kube-proxy
//!   and ferry both do for traffic from outside the cluster).
//! * Layouts, one at a time in the node namespace, with `nft flush ruleset` and `conntrack -F`
//!   before each (so only the ruleset differs): `direct` (no rules: the client connects
//!   straight to service #k's first endpoint; the floor), `ferry` (ferry_plan::plan loaded by
//!   ferry-nft, as `ferry bench`), `ferry-sharded` (ferry_plan::plan::plan_sharded over
//!   `--shards` tables, one netlink transaction, as `ferry bench --shards`),
//!   `kube-proxy-iptables` ([`kube_proxy_iptables`]: kube-proxy's iptables mode restore data,
//!   loaded with `iptables-nft-restore`) and `kube-proxy-nftables` ([`kube_proxy_nftables`]:
//!   its nftables mode, loaded with `nft -f`).
//! * Before timing a layout, [`verify`] connects to every target a few times and checks with
//!   the endpoint namespace's listener that each connection arrived at one of that service's
//!   own endpoints (and that they are spread over more than one), so a layout whose rules
//!   miss fails the run instead of timing something else.
//! * Timing: from the client namespace, a fresh TCP connection (new socket, new ephemeral
//!   source port, so a new conntrack entry and the whole ruleset walked), `Instant` around a
//!   non-blocking connect until writable (SYN out, SYN-ACK in), then closed with a reset (no
//!   TIME_WAIT). The targets are interleaved round by round (the order rotated every round)
//!   so drift hits every target alike; the first `--warmup` rounds are dropped.
//! * Report per layout and target: median and p90 in microseconds, and the ratio of the last
//!   target's median (and p90) to the first's.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use ferry_model::view::ResolvedService;
use ferry_model::Protocol;
use ferry_nft::{Dataplane, Nft};
use ferry_plan::plan::DEFAULT_MASQUERADE_MARK;
use ferry_plan::PlanConfig;

use crate::sys;

/// Endpoint port of every service.
pub const ENDPOINT_PORT: u16 = 8080;
/// Service port of every service.
pub const SERVICE_PORT: u16 = 80;
const CLUSTER_CIDR: &str = "10.42.0.0/16";
const SERVICE_CIDR: &str = "10.43.0.0/16";
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const NODE_EP_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 1, 1);
const EP_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 1, 2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const FIRST_PORT: u16 = 10_000;
const LAST_PORT: u16 = 64_999;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Layout {
    /// No rules: straight to service #k's first endpoint (the floor).
    Direct,
    /// ferry's layout in one table.
    Ferry,
    /// ferry's layout sharded over `--shards` tables.
    FerrySharded,
    /// kube-proxy's iptables mode, through iptables-nft-restore.
    KubeProxyIptables,
    /// kube-proxy's nftables mode (`nft -f`).
    KubeProxyNftables,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Direct => "no rules (direct to endpoint)",
            Layout::Ferry => "ferry, one table",
            Layout::FerrySharded => "ferry, sharded",
            Layout::KubeProxyIptables => "kube-proxy iptables (iptables-nft)",
            Layout::KubeProxyNftables => "kube-proxy nftables",
        }
    }
}

#[derive(Debug, Args)]
pub struct FirstPacketArgs {
    #[arg(long, default_value_t = 10_000)]
    pub services: usize,
    #[arg(long, default_value_t = 10)]
    pub endpoints_per_service: usize,
    /// Timed connections per target and layout.
    #[arg(long, default_value_t = 2000)]
    pub samples: usize,
    /// Untimed rounds (one connection per target) before the timed ones.
    #[arg(long, default_value_t = 100)]
    pub warmup: usize,
    /// Services to connect to (1-based numbers, comma-separated; the first and the last are
    /// the ratio's).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 100, 1000, 5000, 10_000])]
    pub targets: Vec<usize>,
    /// Layouts to time, in this order (comma-separated). kube-proxy-nftables is not among the
    /// defaults: its 10,000 anonymous verdict maps take minutes to load.
    #[arg(long, value_enum, value_delimiter = ',',
          default_values_t = [Layout::Direct, Layout::Ferry, Layout::FerrySharded, Layout::KubeProxyIptables])]
    pub layouts: Vec<Layout>,
    /// Tables of the ferry-sharded layout.
    #[arg(long, default_value_t = 16)]
    pub shards: u16,
}

/// `ferry bench`'s services (crates/ferry-lab/src/bench.rs):
/// service #k (1-based) is `bench/svc-{k-1}` on 10.43.0.0 + k, port 80/TCP.
pub fn services(n: usize, eps: usize) -> Vec<ResolvedService> {
    crate::bench::services(n, eps, 0)
}

/// The node's plan configuration (as `ferry bench`'s, with this topology's node address).
pub fn plan_config(shards: u16) -> Result<PlanConfig> {
    Ok(PlanConfig {
        node_name: "node-0".into(),
        node_ips: vec![IpAddr::V4(NODE_IP)],
        cluster_cidrs: vec![CLUSTER_CIDR.parse()?],
        masquerade_mark: DEFAULT_MASQUERADE_MARK,
        lb_pools: vec![],
        service_cidrs: vec![SERVICE_CIDR.parse()?],
        shards,
        ..PlanConfig::default()
    })
}

/// A chain name as kube-proxy makes them (`KUBE-SVC-` + 16 characters of a hash of what it
/// stands for): here 16 hex digits of FNV-1a.
fn chain_name(prefix: &str, what: &str) -> String {
    format!("{prefix}-{:016X}", crate::state::fnv64(what.as_bytes()))
}

/// kube-proxy's iptables-mode restore data for `svcs` (what its proxier writes with
/// `iptables-restore`, for ClusterIP and NodePort services with externalTrafficPolicy
/// Cluster, cluster CIDR `cluster_cidr`, masquerade bit 0x4000), both tables:
///
/// * nat: PREROUTING and OUTPUT jump to KUBE-SERVICES, which holds one rule per service port
///   `-d CLUSTER-IP -p tcp --dport P -j KUBE-SVC-X` in order, then the node-port rule
///   (`-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS`) last. KUBE-SVC-X: a masquerade mark for
///   traffic from outside the cluster CIDR, then one rule per endpoint, `-m statistic --mode
///   random --probability 1/(n-j)` (the last one without), jumping to KUBE-SEP-Y, which marks
///   hairpin traffic and DNATs to the endpoint. KUBE-NODEPORTS: `--dport NODEPORT -j
///   KUBE-EXT-X` (mark for masquerade, jump to KUBE-SVC-X). POSTROUTING -> KUBE-POSTROUTING
///   masquerades marked packets.
/// * filter: the jumps to KUBE-PROXY-FIREWALL, KUBE-NODEPORTS, KUBE-EXTERNAL-SERVICES,
///   KUBE-SERVICES (all empty here: every service has endpoints) and KUBE-FORWARD.
pub fn kube_proxy_iptables(svcs: &[ResolvedService], cluster_cidr: &str) -> Result<String> {
    let mut chains = String::new();
    let mut services = String::new();
    let mut nodeports = String::new();
    let mut rest = String::new();
    let mut seen = HashSet::new();
    let mut declare = |chains: &mut String, name: &str| -> Result<()> {
        if !seen.insert(name.to_string()) {
            bail!("chain name {name} made twice");
        }
        let _ = writeln!(chains, ":{name} - [0:0]");
        Ok(())
    };
    for svc in svcs {
        let Some(cip) = svc.cluster_ip else {
            continue;
        };
        for p in &svc.ports {
            let proto = match p.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
                Protocol::Sctp => "sctp",
            };
            let spn = if p.name.is_empty() {
                format!("{}/{}", svc.id.namespace, svc.id.name)
            } else {
                format!("{}/{}:{}", svc.id.namespace, svc.id.name, p.name)
            };
            let svc_chain = chain_name("KUBE-SVC", &format!("{spn}{proto}"));
            declare(&mut chains, &svc_chain)?;
            let _ = writeln!(
                services,
                "-A KUBE-SERVICES -m comment --comment \"{spn} cluster IP\" -m {proto} -p {proto} -d {cip} --dport {} -j {svc_chain}",
                p.port
            );
            let _ = writeln!(
                rest,
                "-A {svc_chain} -m comment --comment \"{spn} cluster IP\" -m {proto} -p {proto} -d {cip} --dport {} ! -s {cluster_cidr} -j KUBE-MARK-MASQ",
                p.port
            );
            let n = p.endpoints.len();
            let mut seps = String::new();
            for (j, e) in p.endpoints.iter().enumerate() {
                let ep = SocketAddr::new(e.addr, e.port);
                let sep = chain_name("KUBE-SEP", &format!("{spn}{proto}{ep}"));
                declare(&mut chains, &sep)?;
                let stat = if j + 1 < n {
                    format!(
                        " -m statistic --mode random --probability {:.10}",
                        1.0 / (n - j) as f64
                    )
                } else {
                    String::new()
                };
                let _ = writeln!(
                    rest,
                    "-A {svc_chain} -m comment --comment \"{spn} -> {ep}\"{stat} -j {sep}"
                );
                let _ = writeln!(
                    seps,
                    "-A {sep} -m comment --comment {spn} -s {} -j KUBE-MARK-MASQ",
                    e.addr
                );
                let _ = writeln!(
                    seps,
                    "-A {sep} -m comment --comment {spn} -m {proto} -p {proto} -j DNAT --to-destination {ep}"
                );
            }
            rest.push_str(&seps);
            if let Some(np) = p.node_port {
                let ext = chain_name("KUBE-EXT", &format!("{spn}{proto}"));
                declare(&mut chains, &ext)?;
                let _ = writeln!(
                    nodeports,
                    "-A KUBE-NODEPORTS -m comment --comment {spn} -m {proto} -p {proto} --dport {np} -j {ext}"
                );
                let _ = writeln!(
                    rest,
                    "-A {ext} -m comment --comment \"masquerade traffic for {spn} external destinations\" -j KUBE-MARK-MASQ"
                );
                let _ = writeln!(rest, "-A {ext} -j {svc_chain}");
            }
        }
    }
    let mut s = String::new();
    s.push_str(
        "*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
",
    );
    s.push_str(&chains);
    s.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
",
    );
    s.push_str(&services);
    s.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    s.push_str(&nodeports);
    s.push_str(&rest);
    s.push_str("COMMIT\n");
    Ok(s)
}

/// Runs `cmd` in namespace `ns` with `data` on its standard input.
fn pipe_into(ns: &str, cmd: &[&str], data: &str) -> Result<()> {
    let what = cmd.join(" ");
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {what}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(data.as_bytes())
            .with_context(|| format!("writing to {what}"))?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{what} in {ns} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// kube-proxy's nftables-mode ruleset for `svcs` (table `ip kube-proxy`, as its nftables
/// proxier writes it for ClusterIP and NodePort services with externalTrafficPolicy Cluster
/// and no session affinity): base chains at the nat and filter hooks; `services` dispatches
/// with one lookup, `ip daddr . meta l4proto . th dport vmap @service-ips` (and node ports on
/// `@nodeport-ips` through `@service-nodeports`) to a chain per service port that marks
/// traffic from outside the cluster CIDR for masquerade and picks an endpoint chain with
/// `numgen random mod N vmap { ... }`; the endpoint chain marks hairpin traffic and DNATs.
pub fn kube_proxy_nftables(
    svcs: &[ResolvedService],
    cluster_cidr: &str,
    service_cidr: &str,
    node_ip: Ipv4Addr,
) -> Result<String> {
    let t = "ip kube-proxy";
    let mut s = format!(
        "add table {t} {{ comment \"rules for kube-proxy\" ; }}
add chain {t} mark-for-masquerade
add rule {t} mark-for-masquerade mark set mark or 0x4000
add chain {t} masquerading
add rule {t} masquerading mark and 0x4000 == 0 return
add rule {t} masquerading mark set mark xor 0x4000
add rule {t} masquerading masquerade fully-random
add chain {t} services
add chain {t} service-endpoints-check
add chain {t} nodeport-endpoints-check
add chain {t} firewall-check
add chain {t} cluster-ips-check
add chain {t} filter-prerouting {{ type filter hook prerouting priority -110 ; }}
add chain {t} filter-input {{ type filter hook input priority -110 ; }}
add chain {t} filter-forward {{ type filter hook forward priority -110 ; }}
add chain {t} filter-output {{ type filter hook output priority -110 ; }}
add chain {t} filter-output-post-dnat {{ type filter hook output priority -90 ; }}
add chain {t} nat-prerouting {{ type nat hook prerouting priority -100 ; }}
add chain {t} nat-output {{ type nat hook output priority -100 ; }}
add chain {t} nat-postrouting {{ type nat hook postrouting priority 100 ; }}
add set {t} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}
add set {t} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}
add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}
add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}
add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}
add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}
add map {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}
add rule {t} filter-prerouting ct state new jump firewall-check
add rule {t} filter-input ct state new jump nodeport-endpoints-check
add rule {t} filter-input ct state new jump service-endpoints-check
add rule {t} filter-forward ct state new jump service-endpoints-check
add rule {t} filter-forward ct state new jump cluster-ips-check
add rule {t} filter-output ct state new jump service-endpoints-check
add rule {t} filter-output ct state new jump firewall-check
add rule {t} filter-output-post-dnat ct state new jump cluster-ips-check
add rule {t} nat-prerouting jump services
add rule {t} nat-output jump services
add rule {t} nat-postrouting jump masquerading
add rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips
add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
add rule {t} nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports
add rule {t} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"
add rule {t} cluster-ips-check ip daddr {{ {service_cidr} }} drop comment \"Drop traffic to unallocated ClusterIPs\"
add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips
add rule {t} services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports
add element {t} nodeport-ips {{ {node_ip} }}
"
    );
    let mut nodeports = HashSet::new();
    for svc in svcs {
        let Some(cip) = svc.cluster_ip else {
            continue;
        };
        for p in &svc.ports {
            let proto = match p.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
                Protocol::Sctp => "sctp",
            };
            let spn = format!("{}/{}/{proto}/{}", svc.id.namespace, svc.id.name, p.name);
            let hash = |what: &str| format!("{:08X}", crate::state::fnv64(what.as_bytes()) as u32);
            let chain = format!("service-{}-{spn}", hash(&spn));
            let _ = writeln!(s, "add chain {t} {chain}");
            let _ = writeln!(
                s,
                "add rule {t} {chain} ip daddr {cip} {proto} dport {} ip saddr != {cluster_cidr} jump mark-for-masquerade",
                p.port
            );
            let mut arms = Vec::new();
            for (j, e) in p.endpoints.iter().enumerate() {
                let ep = format!("{spn}__{}/{}", e.addr, e.port);
                let echain = format!("endpoint-{}-{ep}", hash(&ep));
                let _ = writeln!(s, "add chain {t} {echain}");
                let _ = writeln!(
                    s,
                    "add rule {t} {echain} ip saddr {} jump mark-for-masquerade",
                    e.addr
                );
                let _ = writeln!(
                    s,
                    "add rule {t} {echain} meta l4proto {proto} dnat to {}",
                    SocketAddr::new(e.addr, e.port)
                );
                arms.push(format!("{j} : goto {echain}"));
            }
            if !arms.is_empty() {
                let _ = writeln!(
                    s,
                    "add rule {t} {chain} numgen random mod {} vmap {{ {} }}",
                    arms.len(),
                    arms.join(" , ")
                );
            }
            let _ = writeln!(s, "add element {t} cluster-ips {{ {cip} }}");
            let _ = writeln!(
                s,
                "add element {t} service-ips {{ {cip} . {proto} . {} : goto {chain} }}",
                p.port
            );
            // A node port two services ask for (the generator's wrap-around): the first wins.
            if let Some(np) = p.node_port.filter(|np| nodeports.insert((proto, *np))) {
                let ext = format!("external-{}-{spn}", hash(&spn));
                let _ = writeln!(s, "add chain {t} {ext}");
                let _ = writeln!(s, "add rule {t} {ext} jump mark-for-masquerade");
                let _ = writeln!(s, "add rule {t} {ext} goto {chain}");
                let _ = writeln!(
                    s,
                    "add element {t} service-nodeports {{ {proto} . {np} : goto {ext} }}"
                );
            }
        }
    }
    Ok(s)
}

/// The three namespaces; deleted on drop.
pub struct Topology {
    pub client: String,
    pub node: String,
    pub ep: String,
    /// The next client source port per destination: a run never connects twice from the same
    /// address and port to the same destination (up to 55,000 connections per destination),
    /// so no connection meets a leftover of an earlier one (conntrack entry, TIME_WAIT).
    ports: Mutex<HashMap<SocketAddr, u16>>,
}

impl Topology {
    /// The namespace names for `prefix`.
    pub fn names(prefix: &str) -> [String; 3] {
        [
            format!("{prefix}-fp-client"),
            format!("{prefix}-fp-node"),
            format!("{prefix}-fp-ep"),
        ]
    }

    /// Creates the namespaces, links, addresses and routes (fails if one exists already).
    pub fn create(prefix: &str) -> Result<Topology> {
        let [client, node, ep] = Self::names(prefix);
        for n in [&client, &node, &ep] {
            if sys::netns_exists(n) {
                bail!("network namespace {n} exists already (another run, or left over: `ip netns del {n}`)");
            }
        }
        sys::add_netns(&[client.clone(), node.clone(), ep.clone()])?;
        // From here on, drop removes what was made.
        let t = Topology {
            client,
            node,
            ep,
            ports: Mutex::new(HashMap::new()),
        };
        let (c, n, e) = (t.client.as_str(), t.node.as_str(), t.ep.as_str());
        let lines = [
            format!("-n {c} link add eth0 type veth peer name to-client netns {n}"),
            format!("-n {e} link add eth0 type veth peer name to-ep netns {n}"),
            format!("-n {c} addr add {CLIENT_IP}/24 dev eth0"),
            format!("-n {n} addr add {NODE_IP}/24 dev to-client"),
            format!("-n {n} addr add {NODE_EP_IP}/24 dev to-ep"),
            format!("-n {e} addr add {EP_IP}/24 dev eth0"),
            format!("-n {c} link set lo up"),
            format!("-n {n} link set lo up"),
            format!("-n {e} link set lo up"),
            format!("-n {c} link set eth0 up"),
            format!("-n {n} link set to-client up"),
            format!("-n {n} link set to-ep up"),
            format!("-n {e} link set eth0 up"),
            format!("-n {c} route add default via {NODE_IP}"),
            format!("-n {n} route add {CLUSTER_CIDR} via {EP_IP}"),
            format!("-n {e} route add default via {NODE_EP_IP}"),
            // Every endpoint address is this namespace's own.
            format!("-n {e} route add local {CLUSTER_CIDR} dev lo table local"),
        ];
        for l in &lines {
            sys::ip(&l.split_whitespace().collect::<Vec<_>>())?;
        }
        sys::set_sysctls(n, &[("net.ipv4.ip_forward", "1")])?;
        Ok(t)
    }

    /// `n` fresh source ports for connections to `to`.
    fn source_ports(&self, to: SocketAddr, n: usize) -> Vec<u16> {
        let mut ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        let next = ports.entry(to).or_insert(FIRST_PORT);
        (0..n)
            .map(|_| {
                let p = *next;
                *next = if p >= LAST_PORT { FIRST_PORT } else { p + 1 };
                p
            })
            .collect()
    }

    /// Empties the node's ruleset (every table, ferry's and iptables-nft's) and its conntrack
    /// table.
    pub fn flush(&self) -> Result<()> {
        let out = sys::exec_output(&self.node, &["nft", "flush", "ruleset"])?;
        if !out.status.success() {
            bail!(
                "nft flush ruleset in {}: {}",
                self.node,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        // Without rules conntrack may not even be loaded in the namespace: failure is fine.
        let _ = sys::exec_output(&self.node, &["conntrack", "-F"]);
        Ok(())
    }

    /// Loads `layout` for `svcs` into the node (after a [`Topology::flush`]); returns how long
    /// the load took.
    pub fn load(&self, layout: Layout, svcs: &[ResolvedService], shards: u16) -> Result<Duration> {
        self.flush()?;
        let t0 = Instant::now();
        match layout {
            Layout::Direct => {}
            Layout::Ferry => {
                let cfg = plan_config(0)?;
                sys::in_netns(&self.node, || -> Result<()> {
                    let rs = ferry_plan::plan(&cfg, svcs);
                    Dataplane::new(Nft::new()).apply(&rs)?;
                    Ok(())
                })??;
            }
            Layout::FerrySharded => {
                use ferry_plan::diff::Op;
                if shards < 2 {
                    bail!("--shards must be at least 2 for the ferry-sharded layout");
                }
                let cfg = plan_config(shards)?;
                sys::in_netns(&self.node, || -> Result<()> {
                    let tables = ferry_plan::plan::plan_sharded(&cfg, svcs);
                    let full = [Op::Full { replace: false }];
                    let parts: Vec<(&ferry_plan::Ruleset, &[Op])> =
                        tables.iter().map(|t| (t, &full[..])).collect();
                    let batch = ferry_nft::encode::batch(&parts)
                        .map_err(|e| anyhow!("sharded layout not encodable: {e}"))?;
                    ferry_nft::netlink::send_batch(&batch)?;
                    Ok(())
                })??;
            }
            Layout::KubeProxyIptables => {
                let data = kube_proxy_iptables(svcs, CLUSTER_CIDR)?;
                pipe_into(&self.node, &["iptables-nft-restore"], &data)?;
            }
            Layout::KubeProxyNftables => {
                let data = kube_proxy_nftables(svcs, CLUSTER_CIDR, SERVICE_CIDR, NODE_IP)?;
                pipe_into(&self.node, &["nft", "-f", "-"], &data)?;
            }
        }
        Ok(t0.elapsed())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Err(e) = sys::del_netns(&[self.client.clone(), self.node.clone(), self.ep.clone()]) {
            eprintln!("warning: {e:#}");
        }
    }
}

/// The endpoint namespace's listener on 0.0.0.0:8080: accepts every connection, reports the
/// address it arrived at, and closes it.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    arrived: mpsc::Receiver<SocketAddr>,
}

impl Server {
    pub fn start(ns: &str) -> Result<Server> {
        let listener = sys::in_netns(ns, || TcpListener::bind(("0.0.0.0", ENDPOINT_PORT)))?
            .with_context(|| format!("listening on 0.0.0.0:{ENDPOINT_PORT} in {ns}"))?;
        // A longer accept queue than std's: the accepting thread may wait for a CPU while the
        // client goes on (a full queue drops SYNs, and a dropped SYN costs 1 s).
        // SAFETY: listen() again on the listener's own descriptor only resizes its queue.
        if unsafe { libc::listen(listener.as_raw_fd(), 4096) } != 0 {
            return Err(std::io::Error::last_os_error()).context("listen");
        }
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, arrived) = mpsc::channel();
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut pfd = libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            while !stop2.load(Ordering::Relaxed) {
                // SAFETY: one valid pollfd for the listener this thread owns.
                unsafe { libc::poll(&mut pfd, 1, 100) };
                while let Ok((s, _)) = listener.accept() {
                    if let Ok(local) = s.local_addr() {
                        let _ = tx.send(local);
                    }
                }
            }
        });
        Ok(Server {
            stop,
            thread: Some(thread),
            arrived,
        })
    }

    /// Forgets what arrived so far.
    fn drain(&self) {
        while self.arrived.try_recv().is_ok() {}
    }

    /// The next `n` arrivals (waiting up to 2 s for each).
    fn take(&self, n: usize) -> Result<Vec<SocketAddr>> {
        (0..n)
            .map(|i| {
                self.arrived
                    .recv_timeout(Duration::from_secs(2))
                    .map_err(|_| {
                        anyhow!("only {i} of {n} connections reached the endpoint namespace")
                    })
            })
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Where the client connects for service #k (1-based) under `layout`, and the endpoints the
/// connection may arrive at.
pub fn target(
    layout: Layout,
    svcs: &[ResolvedService],
    k: usize,
) -> Result<(SocketAddr, BTreeSet<SocketAddr>)> {
    let svc = k.checked_sub(1).and_then(|i| svcs.get(i)).ok_or_else(|| {
        anyhow!(
            "target service #{k} is not among the {} services",
            svcs.len()
        )
    })?;
    let port = &svc.ports[0];
    let eps: BTreeSet<SocketAddr> = port
        .endpoints
        .iter()
        .map(|e| SocketAddr::new(e.addr, e.port))
        .collect();
    let first = *eps
        .iter()
        .next()
        .ok_or_else(|| anyhow!("service #{k} has no endpoints"))?;
    match layout {
        Layout::Direct => Ok((first, [first].into())),
        _ => {
            let cip = svc
                .cluster_ip
                .ok_or_else(|| anyhow!("service #{k} has no cluster IP"))?;
            Ok((SocketAddr::new(cip, port.port), eps))
        }
    }
}

/// One fresh connection from `CLIENT_IP:port`: the time from connect() until it is
/// established (SYN out, SYN-ACK in); closed with a reset (SO_LINGER 0: no TIME_WAIT).
fn connect_once(port: u16, to: SocketAddr) -> std::io::Result<Duration> {
    use std::io::{Error, ErrorKind};
    use std::os::fd::{FromRawFd, OwnedFd};
    let SocketAddr::V4(to) = to else {
        return Err(Error::new(ErrorKind::InvalidInput, "IPv4 only"));
    };
    let sin = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor owned by `fd` (closed on every return), with
    // correctly sized arguments.
    unsafe {
        let raw = libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        if raw < 0 {
            return Err(Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(raw);
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        if libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        ) != 0
        {
            return Err(Error::last_os_error());
        }
        let local = sin(CLIENT_IP, port);
        if libc::bind(raw, (&local as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(Error::last_os_error());
        }
        let remote = sin(*to.ip(), to.port());
        let t0 = Instant::now();
        if libc::connect(raw, (&remote as *const libc::sockaddr_in).cast(), len) != 0 {
            let e = Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(e);
            }
        }
        let mut pfd = libc::pollfd {
            fd: raw,
            events: libc::POLLOUT,
            revents: 0,
        };
        let deadline = t0 + CONNECT_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let n = libc::poll(&mut pfd, 1, left.as_millis() as libc::c_int);
            if n > 0 {
                break;
            }
            if n == 0 {
                return Err(Error::new(ErrorKind::TimedOut, "no SYN-ACK within 1 s"));
            }
            let e = Error::last_os_error();
            if e.kind() != ErrorKind::Interrupted {
                return Err(e);
            }
        }
        let took = t0.elapsed();
        let mut err: libc::c_int = 0;
        let mut elen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        if libc::getsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut elen,
        ) != 0
        {
            return Err(Error::last_os_error());
        }
        drop(fd);
        if err != 0 {
            return Err(Error::from_raw_os_error(err));
        }
        Ok(took)
    }
}

/// Connects `per_target` times to every target from the client namespace and checks that
/// each connection arrived at one of that service's own endpoints, and (with more than one
/// endpoint and at least 8 tries) at more than one of them.
pub fn verify(
    topo: &Topology,
    server: &Server,
    layout: Layout,
    svcs: &[ResolvedService],
    targets: &[usize],
    per_target: usize,
) -> Result<()> {
    for &k in targets {
        let (to, eps) = target(layout, svcs, k)?;
        server.drain();
        let ports = topo.source_ports(to, per_target);
        sys::in_netns(&topo.client, || -> Result<()> {
            for port in ports {
                connect_once(port, to).with_context(|| {
                    format!(
                        "{}: connecting to service #{k} at {to} from port {port}",
                        layout.name()
                    )
                })?;
            }
            Ok(())
        })??;
        let got = server
            .take(per_target)
            .with_context(|| format!("{}: service #{k} at {to}", layout.name()))?;
        let wrong: Vec<&SocketAddr> = got.iter().filter(|a| !eps.contains(a)).collect();
        if !wrong.is_empty() {
            bail!(
                "{}: connections to service #{k} at {to} arrived at {wrong:?}, not at its endpoints",
                layout.name()
            );
        }
        let distinct: BTreeSet<&SocketAddr> = got.iter().collect();
        if eps.len() > 1 && per_target >= 8 && distinct.len() < 2 {
            bail!(
                "{}: {per_target} connections to service #{k} all went to {distinct:?}",
                layout.name()
            );
        }
    }
    Ok(())
}

/// What [`measure`] saw, per target.
pub struct Samples {
    /// Microseconds, one per established connection.
    pub micros: Vec<Vec<f64>>,
    /// Connections that saw no SYN-ACK within 1 s (left out of `micros`).
    pub timeouts: Vec<usize>,
}

/// Times `samples` fresh connections to every target, interleaved (the first `warmup`
/// rounds untimed). A connection without a SYN-ACK within 1 s is counted, not timed; more
/// than 1% of them for a target fails.
pub fn measure(
    topo: &Topology,
    layout: Layout,
    svcs: &[ResolvedService],
    targets: &[usize],
    samples: usize,
    warmup: usize,
) -> Result<Samples> {
    let rounds = warmup + samples;
    let plan: Vec<(SocketAddr, Vec<u16>)> = targets
        .iter()
        .map(|&k| {
            let to = target(layout, svcs, k)?.0;
            Ok((to, topo.source_ports(to, rounds)))
        })
        .collect::<Result<_>>()?;
    let out = sys::in_netns(&topo.client, || -> Result<Samples> {
        let mut out = Samples {
            micros: vec![Vec::with_capacity(samples); plan.len()],
            timeouts: vec![0; plan.len()],
        };
        for round in 0..rounds {
            for j in 0..plan.len() {
                let t = (j + round) % plan.len();
                let (to, ports) = &plan[t];
                match connect_once(ports[round], *to) {
                    Ok(took) if round >= warmup => out.micros[t].push(took.as_secs_f64() * 1e6),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => out.timeouts[t] += 1,
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!(
                                "{}: connecting to service #{} at {to} from port {}",
                                layout.name(),
                                targets[t],
                                ports[round]
                            )
                        })
                    }
                }
            }
        }
        Ok(out)
    })??;
    for (t, &n) in out.timeouts.iter().enumerate() {
        if n * 100 > rounds {
            bail!(
                "{}: {n} of {rounds} connections to service #{} saw no SYN-ACK within 1 s",
                layout.name(),
                targets[t]
            );
        }
    }
    Ok(out)
}

/// Nearest-rank quantile of sorted `v`.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// One layout's figures.
pub struct LayoutResult {
    pub layout: Layout,
    pub load: Duration,
    /// (median, p90) in microseconds per target.
    pub per_target: Vec<(f64, f64)>,
    /// Connections without a SYN-ACK within 1 s (not in the figures).
    pub timeouts: usize,
}

impl LayoutResult {
    /// Last target's median (p90) over the first's.
    pub fn ratios(&self) -> (f64, f64) {
        match (self.per_target.first(), self.per_target.last()) {
            (Some(a), Some(b)) => (b.0 / a.0, b.1 / a.1),
            _ => (f64::NAN, f64::NAN),
        }
    }
}

pub fn render(args: &FirstPacketArgs, results: &[LayoutResult]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "first-packet latency: TCP connect (SYN out -> SYN-ACK in) from a client namespace through a node namespace, {} services x {} endpoints, {} fresh connections per target, targets interleaved; microseconds, median / p90",
        args.services, args.endpoints_per_service, args.samples
    );
    let mut head = format!("{:<36} {:>8}", "layout", "load");
    for k in &args.targets {
        let _ = write!(head, " {:>15}", format!("#{k}"));
    }
    let (first, last) = (
        args.targets.first().copied().unwrap_or(0),
        args.targets.last().copied().unwrap_or(0),
    );
    let _ = write!(head, "  #{last}/#{first} (median, p90)");
    let _ = writeln!(s, "{head}");
    for r in results {
        let mut line = format!("{:<36} {:>6.1} s", r.layout.name(), r.load.as_secs_f64());
        for (m, p) in &r.per_target {
            let _ = write!(line, " {:>15}", format!("{m:.0} / {p:.0}"));
        }
        let (rm, rp) = r.ratios();
        let _ = write!(line, "  {rm:.2}x, {rp:.2}x");
        if r.timeouts > 0 {
            let _ = write!(
                line,
                "  ({} connections without a SYN-ACK in 1 s, left out)",
                r.timeouts
            );
        }
        let _ = writeln!(s, "{line}");
    }
    s
}

/// Checks the tools a layout needs.
fn check_tools(layouts: &[Layout]) -> Result<()> {
    let mut need = vec!["ip", "nft"];
    if layouts.contains(&Layout::KubeProxyIptables) {
        need.push("iptables-nft-restore");
    }
    for t in need {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(t).is_file()))
            .unwrap_or(false)
            || Path::new("/usr/sbin").join(t).is_file();
        if !found {
            bail!("{t} is needed and is not installed");
        }
    }
    Ok(())
}

/// The whole benchmark in namespaces `PREFIX-fp-{client,node,ep}`.
pub fn run(prefix: &str, args: &FirstPacketArgs) -> Result<i32> {
    if args.services == 0 || args.endpoints_per_service == 0 || args.samples == 0 {
        bail!("--services, --endpoints-per-service and --samples must be positive");
    }
    if args.targets.is_empty() || args.layouts.is_empty() {
        bail!("give at least one target and one layout");
    }
    if let Some(k) = args.targets.iter().find(|&&k| k == 0 || k > args.services) {
        bail!("--targets: service #{k} is not among 1..={}", args.services);
    }
    check_tools(&args.layouts)?;
    let svcs = services(args.services, args.endpoints_per_service);
    let topo = Topology::create(prefix)?;
    let server = Server::start(&topo.ep)?;
    let mut results = Vec::new();
    for &layout in &args.layouts {
        eprintln!("{}: loading", layout.name());
        let load = topo.load(layout, &svcs, args.shards)?;
        eprintln!(
            "{}: loaded in {:.1} s; checking every target reaches its endpoints",
            layout.name(),
            load.as_secs_f64()
        );
        verify(&topo, &server, layout, &svcs, &args.targets, 20)?;
        eprintln!("{}: timing", layout.name());
        let mut per = measure(
            &topo,
            layout,
            &svcs,
            &args.targets,
            args.samples,
            args.warmup,
        )?;
        server.drain();
        let timeouts = per.timeouts.iter().sum();
        let per_target = per
            .micros
            .iter_mut()
            .map(|v| {
                v.sort_by(|a, b| a.total_cmp(b));
                (quantile(v, 0.5), quantile(v, 0.9))
            })
            .collect();
        results.push(LayoutResult {
            layout,
            load,
            per_target,
            timeouts,
        });
    }
    topo.flush()?;
    drop(server);
    drop(topo);
    print!("{}", render(args, &results));
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_proxy_layout_shape() {
        let svcs = services(3, 3);
        let s = kube_proxy_iptables(&svcs, CLUSTER_CIDR).expect("generates");
        let services: Vec<&str> = s
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES"))
            .collect();
        // One rule per service port in order, then the node-port jump last.
        assert_eq!(services.len(), 4);
        assert!(services[0].contains("-d 10.43.0.1 --dport 80 -j KUBE-SVC-"));
        assert!(services[2].contains("-d 10.43.0.3 --dport 80 -j KUBE-SVC-"));
        assert!(services[3].contains("--dst-type LOCAL -j KUBE-NODEPORTS"));
        // Service 0's chain: mark, then 1/3, 1/2, and the last endpoint unconditionally.
        let svc0 = services[0].rsplit(' ').next().unwrap();
        let rules: Vec<&str> = s
            .lines()
            .filter(|l| l.starts_with(&format!("-A {svc0} ")))
            .collect();
        assert_eq!(rules.len(), 4);
        assert!(rules[0].ends_with("! -s 10.42.0.0/16 -j KUBE-MARK-MASQ"));
        assert!(rules[1].contains("--probability 0.3333333333 -j KUBE-SEP-"));
        assert!(rules[2].contains("--probability 0.5000000000 -j KUBE-SEP-"));
        assert!(!rules[3].contains("statistic"));
        // Every endpoint chain DNATs to its endpoint; every jump target is declared.
        let sep = rules[3].rsplit(' ').next().unwrap();
        assert!(s.contains(&format!(
            "-A {sep} -m comment --comment bench/svc-0 -m tcp -p tcp -j DNAT --to-destination 10.42.0.3:8080"
        )));
        for l in s.lines().filter(|l| l.starts_with("-A ")) {
            let chain = l.split(' ').nth(1).unwrap();
            let builtin = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];
            assert!(
                builtin.contains(&chain) || s.contains(&format!("\n:{chain} - [0:0]")),
                "{chain} undeclared"
            );
        }
        // Service 1 is a NodePort: KUBE-NODEPORTS -> KUBE-EXT -> its KUBE-SVC.
        assert!(s.contains("--dport 30000 -j KUBE-EXT-"));
    }

    #[test]
    fn kube_proxy_nftables_shape() {
        let svcs = services(3, 2);
        let s = kube_proxy_nftables(&svcs, CLUSTER_CIDR, SERVICE_CIDR, NODE_IP).expect("generates");
        assert!(s.contains(
            "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n"
        ));
        let dispatch: Vec<&str> = s
            .lines()
            .filter(|l| l.starts_with("add element ip kube-proxy service-ips "))
            .collect();
        assert_eq!(dispatch.len(), 3);
        assert!(dispatch[2].starts_with(
            "add element ip kube-proxy service-ips { 10.43.0.3 . tcp . 80 : goto service-"
        ));
        let chain = dispatch[0]
            .rsplit("goto ")
            .next()
            .unwrap()
            .trim_end_matches(" }");
        let rules: Vec<&str> = s
            .lines()
            .filter(|l| l.starts_with(&format!("add rule ip kube-proxy {chain} ")))
            .collect();
        assert_eq!(rules.len(), 2);
        assert!(rules[0].ends_with("ip saddr != 10.42.0.0/16 jump mark-for-masquerade"));
        assert!(rules[1].contains("numgen random mod 2 vmap { 0 : goto endpoint-"));
        assert!(s.contains("meta l4proto tcp dnat to 10.42.0.2:8080\n"));
        assert!(s.contains("service-nodeports { tcp . 30000 : goto external-"));
    }

    #[test]
    fn targets_and_quantiles() {
        let svcs = services(10, 2);
        let (to, eps) = target(Layout::Ferry, &svcs, 10).unwrap();
        assert_eq!(to, "10.43.0.10:80".parse().unwrap());
        assert_eq!(eps.len(), 2);
        let (to, eps) = target(Layout::Direct, &svcs, 1).unwrap();
        assert_eq!(to, "10.42.0.1:8080".parse().unwrap());
        assert_eq!(eps.len(), 1);
        assert!(target(Layout::Ferry, &svcs, 0).is_err());
        assert!(target(Layout::Ferry, &svcs, 11).is_err());
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 5.0);
        assert_eq!(quantile(&v, 0.9), 9.0);
    }
}
