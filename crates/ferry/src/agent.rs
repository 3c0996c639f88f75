//! `ferry agent`: the node agent, a thin async shell around pure parts.
//!
//! Data flows one way: source (manifest directory) -> allocation store -> model ([`compute`]:
//! endpoints, plan) -> dataplane (one nftables transaction), and model -> the layer-2 thread
//! (`announce.rs`) and the BGP speaker (`bgp.rs`: routes per peer, computed in [`compute`]). The shell wakes on events and deadlines only: inotify on the manifest
//! directory, rtnetlink on interface and address changes, the core's timers
//! (`agent_core.rs`: min-sync-period coalescing, retries, periodic resync), signals. A sync
//! runs on a blocking thread of its own (it reads files, takes the allocation lock with a
//! timeout, plans, commits to the kernel, runs `conntrack`); the layer-2 thread never waits for
//! it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use ferry_announce::LbAddress;
use ferry_model::alloc::{AllocConfig, AllocResults};
use ferry_model::cidr::Cidr;
use ferry_model::lbipam::LbResults;
use ferry_model::pools::PoolConfig;
use ferry_nft::{Nft, Tables};
use ferry_plan::plan::DEFAULT_MASQUERADE_MARK;
use ferry_plan::PlanConfig;

use crate::agent_core::{Core, Diagnostic, Reported, Severity, SyncConfig, SyncJob};
use crate::announce::{Announcer, L2Config};
use crate::metrics::Metrics;
use crate::netwatch::{self, Wake};
use crate::source::{self, Snapshot};
use crate::state::{AllocStore, StateDir};

/// What an agent does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Role {
    /// kube-proxy and MetalLB in one: Service rules, load-balancer addresses, announcement.
    #[default]
    All,
    /// MetalLB's part only, beside an existing kube-proxy: addresses and their announcement,
    /// no Service rules.
    LoadBalancer,
    /// kube-proxy's part only: Service rules (load-balancer addresses others wrote included),
    /// no address allocation, no announcement.
    Proxy,
}

impl Role {
    pub fn proxies(self) -> bool {
        self != Role::LoadBalancer
    }
    pub fn balances(self) -> bool {
        self != Role::Proxy
    }
}

/// Where the objects come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    Manifests(PathBuf),
    /// The Kubernetes API: a kubeconfig file, or the in-cluster configuration (None).
    Api(Option<PathBuf>),
}

#[derive(Debug, Args, Clone)]
pub struct AgentArgs {
    /// Directory of Kubernetes-format manifests (*.yaml, *.yml, *.json, read recursively):
    /// the source on a machine without Kubernetes.
    #[arg(long, conflicts_with = "kubeconfig")]
    pub manifests: Option<PathBuf>,
    /// Watch a Kubernetes API server given by this kubeconfig file. Without --kubeconfig and
    /// --manifests, inside a pod: the in-cluster configuration (service account).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// all: replaces kube-proxy and MetalLB; load-balancer: MetalLB's part only, beside
    /// kube-proxy; proxy: kube-proxy's part only.
    #[arg(long, value_enum, default_value_t = Role::All)]
    pub role: Role,
    /// MetalLB's legacy ConfigMap (NAMESPACE/NAME); the metallb.io objects are read from the
    /// same namespace.
    #[arg(long, default_value = "metallb-system/config", value_parser = parse_object_ref)]
    pub metallb_config: ferry_model::ObjectRef,
    /// Namespace of the load-balancer controller's Lease (API mode): default $POD_NAMESPACE,
    /// else ferry-system. The agent never creates it.
    #[arg(long)]
    pub lease_namespace: Option<String>,
    /// This node's name: its Node object gives the addresses node ports are served on.
    #[arg(long)]
    pub node: String,
    /// Where allocations are kept; agents sharing it agree on cluster IPs and node ports.
    #[arg(long, default_value = "/var/lib/ferry")]
    pub state_dir: PathBuf,
    /// Pod CIDR(s), comma-separated: traffic to cluster IPs from outside is masqueraded.
    #[arg(long, default_value = "10.42.0.0/16", value_delimiter = ',')]
    pub cluster_cidr: Vec<Cidr>,
    /// How traffic from this cluster's pods is told apart (kube-proxy's flag): ClusterCIDR
    /// (`--cluster-cidr`), NodeCIDR (this Node's spec.podCIDRs), BridgeInterface
    /// (`--pod-bridge-interface`) or InterfaceNamePrefix (`--pod-interface-name-prefix`).
    /// Pods' traffic keeps its source on its way to a cluster IP, and reaches
    /// externalTrafficPolicy: Local addresses on any endpoint.
    #[arg(long, default_value = "ClusterCIDR", value_parser = parse_detect_local_mode)]
    pub detect_local_mode: DetectLocalMode,
    /// The bridge pods' traffic arrives on (with --detect-local-mode BridgeInterface).
    #[arg(long)]
    pub pod_bridge_interface: Option<String>,
    /// The start of the names of pods' interfaces (with --detect-local-mode
    /// InterfaceNamePrefix), e.g. `veth`.
    #[arg(long)]
    pub pod_interface_name_prefix: Option<String>,
    /// Masquerade all traffic to cluster IPs, from pods too (kube-proxy's flag).
    #[arg(long)]
    pub masquerade_all: bool,
    /// Service CIDR(s), comma-separated: cluster IPs come from the first.
    #[arg(long, default_value = "10.43.0.0/16", value_delimiter = ',', value_parser = parse_service_cidr)]
    pub service_cidr: Vec<Cidr>,
    /// Node port range.
    #[arg(long, default_value = "30000-32767", value_parser = parse_port_range)]
    pub node_port_range: (u16, u16),
    /// Which of this node's addresses serve node ports (kube-proxy's flag): `primary` (the
    /// Node's InternalIPs; kube-proxy's nftables default), or CIDRs, comma-separated: every
    /// address of this node's interfaces inside one of them (`0.0.0.0/0,::/0`: all of them).
    #[arg(long, default_value = "primary", value_parser = NodePortAddresses::parse)]
    pub nodeport_addresses: NodePortAddresses,
    /// Least time between the starts of two syncs, in milliseconds (kube-proxy's
    /// min-sync-period): changes that arrive meanwhile are applied together.
    #[arg(long, default_value_t = 100)]
    pub min_sync_ms: u64,
    /// UDP port of the agents' SWIM membership gossip (on the node's address).
    #[arg(long, default_value_t = 7946)]
    pub member_port: u16,
    /// Do not announce load-balancer addresses in layer 2 (no ARP/NDP, no membership).
    #[arg(long)]
    pub no_l2: bool,
    /// Serve /healthz, /readyz and /metrics (Prometheus) here: IP:PORT, localhost:PORT or PORT
    /// (127.0.0.1). Off unless given; kube-proxy uses 127.0.0.1:10249.
    #[arg(long, value_parser = crate::http::parse_addr)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// When another agent already runs in this network namespace, wait this long for it to stop
    /// (a rolling update) before refusing to start.
    #[arg(long, default_value_t = 60)]
    pub wait_for_previous_s: u64,
    /// Manifest mode: what a Service held (cluster IP, node ports, load-balancer address) is
    /// released only after it has been missing for this long, in seconds, so that a file
    /// rewritten non-atomically or moved aside for a moment moves no address (0: at once). In
    /// API mode a deleted Service is deleted: this does not apply.
    #[arg(long, default_value_t = 30)]
    pub release_grace_s: u64,
    /// On SIGTERM/SIGINT, remove ferry's nftables table too (addresses are always withdrawn).
    /// For uninstalling only: without it the rules stay, so an upgrade never drops traffic.
    #[arg(long)]
    pub cleanup_on_exit: bool,
    /// Re-read the kernel's table and repair it this often, in seconds (0: never).
    #[arg(long, default_value_t = 300)]
    pub resync_s: u64,
    /// nftables tables the Services are spread over (a stable hash of namespace/name), each
    /// with its own base chains, beside the common table `ferry`: a change then makes the
    /// kernel re-check one table, not all. 1: everything in the one table `ferry`. 0
    /// (default): automatic, one table up to 1,000 Services, then a power of two with at most
    /// 1,000 Services each (16 at 10,000), up to 64; it shrinks only once 4 times fewer
    /// tables would do. Tables `ferry-K` no longer used are deleted.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=256))]
    pub nft_shards: u16,
}

/// Services per table the automatic `--nft-shards` aims at.
pub const SERVICES_PER_TABLE: usize = 1000;
/// The most tables the automatic `--nft-shards` uses.
pub const MAX_AUTO_SHARDS: u16 = 64;

/// The automatic shard count for `services` Services when `current` tables are in use (0 or 1:
/// one table): one table up to [`SERVICES_PER_TABLE`], else the power of two that keeps each
/// table within it (at most [`MAX_AUTO_SHARDS`]); grows at once, shrinks only when a quarter
/// of `current` would do, so that a count around a threshold does not move every service back
/// and forth.
pub fn auto_shards(services: usize, current: u16) -> u16 {
    let want = if services <= SERVICES_PER_TABLE {
        1
    } else {
        let n = services.div_ceil(SERVICES_PER_TABLE).next_power_of_two();
        u16::try_from(n).unwrap_or(u16::MAX).min(MAX_AUTO_SHARDS)
    };
    let current = current.max(1);
    if want >= current || services <= SERVICES_PER_TABLE * usize::from(current) / 4 {
        want
    } else {
        current
    }
}

/// The shard count a kernel's tables show: the number of `ferry-K` tables (K + 1 of the
/// highest), 1 with none. What an agent restarting in automatic mode starts from, and what
/// `ferry explain` plans with.
pub fn shards_in_kernel(tables: &[String]) -> u16 {
    tables
        .iter()
        .filter_map(|t| t.strip_prefix(ferry_plan::ir::TABLE)?.strip_prefix('-'))
        .filter_map(|k| k.parse::<u16>().ok())
        .map(|k| k.saturating_add(1))
        .max()
        .unwrap_or(1)
}

/// The planner of the agent's tables: the one table `ferry`, or the common table and the
/// shards, as the shard count of each pass says; with the services as last resolved, so that a
/// pass resolves and plans only what changed (issue 11: O(what changed)).
///
/// A pass is *full* (every service resolved and planned again, then compared with what was
/// planned: the result is the same, only slower) the first time, when the layout (shard count)
/// or the plan's configuration changes, and when asked ([`TablePlanner::distrust`]: the
/// periodic safety resync); otherwise only the services whose inputs moved are resolved, and
/// only those that resolve differently are planned.
#[derive(Debug, Default)]
pub struct TablePlanner {
    one: ferry_plan::plan::Planner,
    sharded: ferry_plan::plan::ShardedPlanner,
    /// Tables in use (0: nothing planned yet).
    shards: u16,
    /// The services as last resolved (the one copy: what the planners and the worker read).
    resolver: ferry_model::view::Resolver,
    /// The next pass is a full one.
    full_next: bool,
    /// A pass has resolved every service once (until then, what a source says changed is
    /// not enough: everything is new to this planner).
    resolved_all: bool,
    /// The configuration the tables were last planned with.
    planned_with: Option<PlanConfig>,
}

/// What a pass changed among the resolved services.
#[derive(Debug, Default)]
pub struct ServiceChanges {
    /// The services that resolve differently now (new ones included), as they are now.
    pub changed: Vec<ferry_model::view::ResolvedService>,
    /// What the changed and removed services resolved to before (those that resolved).
    pub previous: Vec<ferry_model::view::ResolvedService>,
}

impl TablePlanner {
    /// A planner that starts from `shards` tables (what the kernel holds: see
    /// [`shards_in_kernel`]), for the automatic count's hysteresis.
    pub fn starting_at(shards: u16) -> TablePlanner {
        TablePlanner {
            shards,
            ..TablePlanner::default()
        }
    }

    /// The shard tables in use (1: the one table).
    pub fn shards(&self) -> u16 {
        self.shards.max(1)
    }

    /// The next pass resolves and plans every service again (the periodic safety resync):
    /// what fingerprints and hashes would miss is found then.
    pub fn distrust(&mut self) {
        self.full_next = true;
    }

    /// Every service that resolves to rules as of the last pass, in no particular order.
    pub fn services(&self) -> impl Iterator<Item = &ferry_model::view::ResolvedService> {
        self.resolver.services()
    }

    /// One service as of the last pass.
    pub fn service(
        &self,
        id: &ferry_model::ObjectRef,
    ) -> Option<&ferry_model::view::ResolvedService> {
        self.resolver.get(id)
    }

    /// Resolves `services` again where their inputs moved: of those `changed` names (the
    /// source's word), or of every one on a full pass.
    fn resolve(
        &mut self,
        services: &[&ferry_model::Service],
        allocations: ferry_model::view::Allocations<'_>,
        slices: &[ferry_model::EndpointSlice],
        changed: &ferry_model::view::Changed,
    ) -> ferry_model::view::ResolvedChanges {
        if self.full_next || !self.resolved_all {
            self.resolver.invalidate();
            self.resolved_all = true;
            return self.resolver.update_refs(services, allocations, slices);
        }
        self.resolver
            .update_some(services, allocations, slices, changed)
    }

    /// Plans the services resolved by the last [`TablePlanner::resolve`] over `cfg.shards`
    /// tables; what changed in each table, in the order of [`TablePlanner::tables`].
    fn plan(
        &mut self,
        cfg: &PlanConfig,
        changes: &ferry_model::view::ResolvedChanges,
    ) -> Vec<ferry_plan::plan::Touched> {
        let n = cfg.shards.max(1);
        if n != self.shards {
            // A new layout: the other planner's tables are dropped, this one starts afresh.
            self.one = Default::default();
            self.sharded = Default::default();
            self.shards = n;
            self.planned_with = None;
        }
        let full = self.full_next || self.planned_with.as_ref() != Some(cfg);
        self.full_next = false;
        if !full {
            let changed = self.resolver.changed(changes);
            let step = if n == 1 {
                self.one
                    .update_changed(cfg, changed, &changes.removed)
                    .map(|t| vec![t])
            } else {
                self.sharded.update_changed(cfg, changed, &changes.removed)
            };
            if let Ok(t) = step {
                return t;
            }
        }
        self.planned_with = Some(cfg.clone());
        let all = self.resolver.services();
        if n == 1 {
            vec![self.one.update_refs(cfg, all).1]
        } else {
            self.sharded.update_refs(cfg, all)
        }
    }

    /// The tables as last planned: the one table, or the common table then the shards.
    pub fn tables(&self) -> Vec<&ferry_plan::Ruleset> {
        if self.shards <= 1 {
            vec![self.one.ruleset()]
        } else {
            self.sharded.tables()
        }
    }
}

/// `--detect-local-mode`: kube-proxy's ways to tell pods' traffic apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetectLocalMode {
    ClusterCidr,
    NodeCidr,
    BridgeInterface,
    InterfaceNamePrefix,
}

/// kube-proxy's spellings.
pub fn parse_detect_local_mode(s: &str) -> Result<DetectLocalMode, String> {
    match s {
        "ClusterCIDR" => Ok(DetectLocalMode::ClusterCidr),
        "NodeCIDR" => Ok(DetectLocalMode::NodeCidr),
        "BridgeInterface" => Ok(DetectLocalMode::BridgeInterface),
        "InterfaceNamePrefix" => Ok(DetectLocalMode::InterfaceNamePrefix),
        other => Err(format!(
            "{other:?}: one of ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix"
        )),
    }
}

/// A network interface name as the kernel takes one (1 to 15 bytes, no '/', no spaces).
fn check_interface_name(flag: &str, name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 15
        || name.contains(['/', ' ', '"', '*'])
        || name.chars().any(|c| c.is_control())
    {
        return Err(format!(
            "--{flag} {name:?}: an interface name is 1 to 15 characters, without '/', spaces, quotes or '*'"
        ));
    }
    Ok(())
}

impl AgentArgs {
    /// How pods' traffic is detected, checked against the flags it needs: the pod CIDRs (by
    /// family) and/or the interface.
    pub fn local_traffic(
        &self,
        node: Option<&ferry_model::objects::Node>,
    ) -> Result<(Vec<Cidr>, Option<ferry_plan::plan::LocalInterface>), String> {
        use ferry_plan::plan::LocalInterface;
        match self.detect_local_mode {
            DetectLocalMode::ClusterCidr => Ok((self.cluster_cidr.clone(), None)),
            DetectLocalMode::NodeCidr => {
                let cidrs: Vec<Cidr> = node
                    .map(|n| n.pod_cidrs.iter().filter_map(|c| c.parse().ok()).collect())
                    .unwrap_or_default();
                if cidrs.is_empty() {
                    return Err(format!(
                        "--detect-local-mode NodeCIDR: Node {} has no spec.podCIDRs",
                        self.node
                    ));
                }
                Ok((cidrs, None))
            }
            DetectLocalMode::BridgeInterface => {
                let name = self
                    .pod_bridge_interface
                    .clone()
                    .ok_or("--detect-local-mode BridgeInterface needs --pod-bridge-interface")?;
                check_interface_name("pod-bridge-interface", &name)?;
                Ok((
                    Vec::new(),
                    Some(LocalInterface {
                        name,
                        prefix: false,
                    }),
                ))
            }
            DetectLocalMode::InterfaceNamePrefix => {
                let name = self.pod_interface_name_prefix.clone().ok_or(
                    "--detect-local-mode InterfaceNamePrefix needs --pod-interface-name-prefix",
                )?;
                check_interface_name("pod-interface-name-prefix", &name)?;
                Ok((Vec::new(), Some(LocalInterface { name, prefix: true })))
            }
        }
    }
}

/// `--nodeport-addresses`: which of this node's addresses serve node ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// The Node's InternalIPs (the host's addresses when there is no Node object).
    Primary,
    /// Every interface address inside one of these CIDRs.
    Cidrs(Vec<Cidr>),
}

impl NodePortAddresses {
    /// `primary`, or CIDRs separated by commas (as kube-proxy takes them; `primary` stands
    /// alone).
    pub fn parse(s: &str) -> Result<NodePortAddresses, String> {
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        if parts.iter().any(|p| p.eq_ignore_ascii_case("primary")) {
            return if parts.len() == 1 {
                Ok(NodePortAddresses::Primary)
            } else {
                Err("`primary` cannot be combined with CIDRs".into())
            };
        }
        let mut cidrs = Vec::new();
        for p in parts {
            if p.is_empty() {
                return Err(
                    "an empty entry (use `primary`, or CIDRs such as 192.168.1.0/24)".into(),
                );
            }
            let c: Cidr = p
                .parse()
                .map_err(|e| format!("{p:?} is neither `primary` nor a CIDR: {e}"))?;
            cidrs.push(c);
        }
        Ok(NodePortAddresses::Cidrs(cidrs))
    }

    /// The addresses node ports are served on, from the node's primary addresses and the
    /// addresses of its interfaces (loopback ones never: nftables cannot DNAT a packet that
    /// stays on the host's loopback to a pod without route_localnet, which kube-proxy's
    /// nftables mode does not set either).
    pub fn select(&self, primary: &[IpAddr], interfaces: &[(String, IpAddr)]) -> Vec<IpAddr> {
        match self {
            NodePortAddresses::Primary => primary.to_vec(),
            NodePortAddresses::Cidrs(cidrs) => {
                let mut out: Vec<IpAddr> = interfaces
                    .iter()
                    .map(|(_, ip)| *ip)
                    .filter(|ip| !ip.is_loopback())
                    .filter(|ip| cidrs.iter().any(|c| c.contains(*ip)))
                    .collect();
                out.sort();
                out.dedup();
                out
            }
        }
    }
}

impl std::fmt::Display for NodePortAddresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodePortAddresses::Primary => f.write_str("primary"),
            NodePortAddresses::Cidrs(c) => {
                let parts: Vec<String> = c.iter().map(|c| c.to_string()).collect();
                f.write_str(&parts.join(","))
            }
        }
    }
}

/// A service CIDR as kube-apiserver accepts one: at most 20 host bits (IPv4 /12 or longer,
/// IPv6 /108 or longer), so that a typo such as 0.0.0.0/0 cannot hand out every address.
pub fn parse_service_cidr(s: &str) -> Result<Cidr, String> {
    let c: Cidr = s.trim().parse().map_err(|e| format!("{e}"))?;
    let min = if c.is_ipv4() { 12 } else { 108 };
    if c.prefix_len() < min {
        return Err(format!(
            "{s:?} is too large: a service CIDR has at most 20 host bits (/{min} or longer)"
        ));
    }
    Ok(c)
}

/// "namespace/name".
pub fn parse_object_ref(s: &str) -> Result<ferry_model::ObjectRef, String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(ferry_model::ObjectRef::new(ns, name))
        }
        _ => Err(format!("{s:?}: expected NAMESPACE/NAME")),
    }
}

pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected FROM-TO"))?;
    let a: u16 = a
        .trim()
        .parse()
        .map_err(|_| format!("{a:?} is not a port"))?;
    let b: u16 = b
        .trim()
        .parse()
        .map_err(|_| format!("{b:?} is not a port"))?;
    if a == 0 || a > b {
        return Err(format!("{s:?}: empty range"));
    }
    Ok((a, b))
}

impl AgentArgs {
    /// Where objects come from: --manifests, --kubeconfig, or in a pod the cluster itself.
    pub fn source(&self) -> Result<SourceKind> {
        if let Some(m) = &self.manifests {
            return Ok(SourceKind::Manifests(m.clone()));
        }
        if let Some(k) = &self.kubeconfig {
            return Ok(SourceKind::Api(Some(k.clone())));
        }
        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
            return Ok(SourceKind::Api(None));
        }
        anyhow::bail!(
            "no source: give --manifests DIR (a directory of manifests) or --kubeconfig PATH (a cluster); inside a pod the in-cluster configuration is used"
        )
    }

    /// The manifest directory, for commands that only read one (`ferry plan`).
    pub fn manifest_dir(&self) -> Result<&std::path::Path> {
        self.manifests
            .as_deref()
            .context("this command reads a manifest directory: give --manifests DIR")
    }

    pub fn lease_namespace(&self) -> String {
        self.lease_namespace
            .clone()
            .or_else(|| {
                std::env::var("POD_NAMESPACE")
                    .ok()
                    .filter(|s| !s.is_empty())
            })
            .unwrap_or_else(|| "ferry-system".to_string())
    }

    pub fn source_config(&self) -> ferry_kube::SourceConfig {
        ferry_kube::SourceConfig {
            metallb_namespace: self.metallb_config.namespace.clone(),
            metallb_config: self.metallb_config.clone(),
        }
    }

    pub fn alloc_config(&self) -> AllocConfig {
        AllocConfig {
            service_cidrs: self.service_cidr.clone(),
            node_port_range: self.node_port_range.0..=self.node_port_range.1,
            release_grace_ms: self.release_grace_s.saturating_mul(1000),
        }
    }
}

pub fn timestamp() -> String {
    let ms = source::now_ms();
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60,
        ms % 1000
    )
}

/// Whether the API source's allocations of `s` are read at every pass: a Service the API
/// server has given no cluster IP yet (refused), or a LoadBalancer (its addresses).
fn may_be_refused_or_balanced(s: &ferry_model::Service) -> bool {
    s.type_ == ferry_model::ServiceType::LoadBalancer
        || s.cluster_ip == ferry_model::ClusterIpSpec::Auto
}

/// A pass's allocations: cluster IPs, node ports, load-balancer addresses.
pub enum Allocated {
    /// Every service's, as an allocator gave them (the state directory of a manifest
    /// directory; the API's, taken at once).
    All(AllocResults, LbResults),
    /// The API server's and the load-balancer controller's, in each Service: read only where
    /// a Service changed (and from every LoadBalancer Service, for its addresses). With the
    /// services whose Service or slices changed since the last pass, as the API source tells
    /// (the pass looks at those only: [`ferry_model::view::Resolver::update_some`]).
    FromApi(ferry_model::view::Changed),
}

/// Everything one pass computes from a snapshot and its allocations.
pub struct Pass {
    /// What the plan changed in each table (the tables themselves are the planner's).
    pub touched: Vec<ferry_plan::plan::Touched>,
    /// The services that changed (every service: [`TablePlanner::services`]).
    pub changes: ServiceChanges,
    pub node_ips: Vec<IpAddr>,
    /// Problems to report: bad manifests, rejected services, pending load balancers, pools.
    pub diagnostics: Vec<Diagnostic>,
    /// What the layer-2 election reads.
    pub l2: L2Config,
    /// Load-balancer address -> the services on it ("namespace/name").
    pub lb_services: Vec<(IpAddr, String)>,
    /// Per pool: (name, addresses in use, addresses in all).
    pub pool_usage: Vec<(String, u64, u64)>,
    /// What this node announces by BGP (bgp.rs).
    pub bgp: crate::bgp::Wanted,
    /// The services holding load-balancer addresses, as allocated (what BGP announces from;
    /// `ferry explain` asks it for every node).
    pub bgp_services: Vec<ferry_model::Service>,
}

/// The model and the plan from a snapshot, its pools and the store's allocations (pure: the
/// I/O is the caller's). `host` is this namespace's (interface, address) list, the fallback
/// for node addresses and where the announcing interface is found.
pub fn compute(
    planner: &mut TablePlanner,
    args: &AgentArgs,
    snap: &Snapshot,
    pools: (PoolConfig, Vec<ferry_model::pools::PoolError>),
    allocated: Allocated,
    host: &netwatch::HostNet,
) -> Pass {
    let (pools, pool_errors) = pools;
    let from_api = matches!(allocated, Allocated::FromApi(_));
    let (results, lb, changed) = match allocated {
        Allocated::All(results, lb) => (results, lb, ferry_model::view::Changed::All),
        // Only the Services that can be refused (no cluster IP yet) or have addresses: the
        // others' allocations are read from them as the resolver needs them.
        Allocated::FromApi(changed) => {
            let few: Vec<ferry_model::Service> = snap
                .services
                .iter()
                .filter(|s| may_be_refused_or_balanced(s))
                .cloned()
                .collect();
            let (results, lb) = ferry_kube::status::from_api(&few, &pools);
            (results, lb, changed)
        }
    };
    let mut diagnostics: Vec<Diagnostic> = Vec::new();
    for e in &snap.errors {
        diagnostics.push(Diagnostic {
            severity: Severity::Error,
            object: e.at.object.clone(),
            reason: "InvalidManifest",
            message: e.to_string(),
        });
    }
    for w in &snap.warnings {
        diagnostics.push(Diagnostic {
            severity: Severity::Warning,
            object: w.at.object.clone(),
            reason: "Ignored",
            message: w.to_string(),
        });
    }
    for e in &pool_errors {
        diagnostics.push(Diagnostic {
            severity: Severity::Error,
            object: None,
            reason: "InvalidPool",
            message: e.to_string(),
        });
    }
    for (r, res) in &results {
        if let Err(e) = res {
            diagnostics.push(Diagnostic {
                severity: Severity::Error,
                object: Some(format!("Service {r}")),
                reason: "Rejected",
                message: e.to_string(),
            });
        }
    }
    // Load-balancer addresses become the services' ingress addresses: those services are
    // copied and changed, the others read where they are.
    let mut lb_copies: Vec<(usize, ferry_model::Service)> = Vec::new();
    let mut lb_services = Vec::new();
    let mut in_use: BTreeMap<&str, std::collections::BTreeSet<IpAddr>> = BTreeMap::new();
    for (i, orig) in snap.services.iter().enumerate() {
        if lb.is_empty() {
            break;
        }
        // Only those can have an entry (what `lb` is keyed by costs a copy of the names).
        if from_api && !may_be_refused_or_balanced(orig) {
            continue;
        }
        let Some(got) = lb.get(&orig.meta.object_ref()) else {
            continue;
        };
        let mut svc = orig.clone();
        // Addresses in status that no pool of ours holds were written by another
        // load-balancer controller: forwarded as they are, as kube-proxy does.
        let foreign: Vec<IpAddr> = svc
            .extra
            .load_balancer_ingress
            .iter()
            .filter(|ip| pools.pool_of(**ip).is_none())
            .copied()
            .collect();
        match got {
            Ok(a) => {
                svc.extra.load_balancer_ingress = a.ips.clone();
                for ip in foreign {
                    if !svc.extra.load_balancer_ingress.contains(&ip) {
                        svc.extra.load_balancer_ingress.push(ip);
                    }
                }
                in_use.entry(&a.pool).or_default().extend(&a.ips);
                for ip in &a.ips {
                    lb_services.push((*ip, svc.meta.object_ref().to_string()));
                }
            }
            Err(p) => {
                svc.extra.load_balancer_ingress = foreign;
                diagnostics.push(Diagnostic {
                    severity: Severity::Warning,
                    object: Some(format!("Service {}", svc.meta.object_ref())),
                    reason: "AllocationFailed",
                    message: format!("Service {} pending: {}", svc.meta.object_ref(), p.reason),
                });
            }
        }
        lb_copies.push((i, svc));
    }
    let mut services: Vec<&ferry_model::Service> = snap.services.iter().collect();
    for (i, svc) in &lb_copies {
        services[*i] = svc;
    }
    let node_ips = match snap.nodes.iter().find(|n| n.meta.name == args.node) {
        Some(n) if !n.internal_ips().is_empty() => n.internal_ips(),
        _ => netwatch::host_addresses(&host.addrs),
    };
    let nodeport_ips = args.nodeport_addresses.select(&node_ips, &host.addrs);
    if nodeport_ips.is_empty() {
        diagnostics.push(Diagnostic {
            severity: Severity::Warning,
            object: None,
            reason: "NoNodePortAddresses",
            message: format!(
                "no address of this node matches --nodeport-addresses {}: node ports are not served",
                args.nodeport_addresses
            ),
        });
    }
    let pool_usage = pools
        .pools
        .iter()
        .map(|p| {
            let total = p.ranges.iter().fold(0u64, |n, r| {
                n.saturating_add(range_size(r.first(), r.last()))
            });
            let used = in_use.get(p.name.as_str()).map_or(0, |s| s.len() as u64);
            (p.name.clone(), used, total)
        })
        .collect();
    let mut never_announce = BTreeMap::new();
    for n in &snap.nodes {
        for ip in n.internal_ips() {
            never_announce.insert(ip, format!("the address of node {}", n.meta.name));
        }
    }
    for gw in &host.gateways {
        never_announce.insert(*gw, "a gateway of this node".to_string());
    }
    for (iface, ip) in &host.addrs {
        never_announce.insert(*ip, format!("this node's own address (on {iface})"));
    }
    let of_spec = |svc: &ferry_model::Service| {
        ferry_kube::status::from_api(std::slice::from_ref(svc), &pools)
            .0
            .into_values()
            .next()
            .and_then(Result::ok)
    };
    let allocations = match from_api {
        true => ferry_model::view::Allocations::FromSpec(&of_spec),
        false => ferry_model::view::Allocations::Results(&results),
    };
    let changes = planner.resolve(&services, allocations, &snap.slices, &changed);
    let resolved_count = planner.resolver.len();
    let this_node = snap.nodes.iter().find(|n| n.meta.name == args.node);
    let (cluster_cidrs, local_interface) = match args.local_traffic(this_node) {
        Ok(l) => l,
        Err(e) => {
            // Without a detector nothing counts as a pod's: what kube-proxy does too.
            diagnostics.push(Diagnostic {
                severity: Severity::Error,
                object: None,
                reason: "NoLocalTrafficDetection",
                message: format!("{e}: traffic from pods cannot be told apart"),
            });
            (Vec::new(), None)
        }
    };
    let cfg = PlanConfig {
        node_name: args.node.clone(),
        node_ips: nodeport_ips.clone(),
        cluster_cidrs,
        local_interface,
        masquerade_all: args.masquerade_all,
        service_cidrs: args.service_cidr.clone(),
        node_zone: this_node
            .and_then(|n| n.meta.labels.get("topology.kubernetes.io/zone"))
            .filter(|z| !z.is_empty())
            .cloned(),
        masquerade_mark: DEFAULT_MASQUERADE_MARK,
        // Traffic to unused pool addresses is refused, except to this node's own addresses,
        // its gateways and the nodes: a pool over the LAN must not cut the node off.
        lb_pools: punch_holes(
            pools
                .pools
                .iter()
                .flat_map(|p| p.ranges.iter().map(|r| (r.first(), r.last()))),
            never_announce.keys(),
        ),
        shards: match args.nft_shards {
            0 => auto_shards(resolved_count, planner.shards()),
            n => n,
        },
    };
    // The services with load-balancer addresses (what layer 2 and BGP announce).
    let with_ingress: Vec<ferry_model::Service> = services
        .iter()
        .filter(|s| !s.extra.load_balancer_ingress.is_empty())
        .map(|s| (*s).clone())
        .collect();
    let addresses = with_ingress
        .iter()
        .map(|s| {
            let r = planner.service(&s.meta.object_ref());
            LbAddress::of(
                s.extra.load_balancer_ingress.clone(),
                s.external_traffic_policy,
                r,
            )
        })
        .collect();
    let bgp = match args.role.balances() {
        true => crate::bgp::wanted(
            snap,
            &args.node,
            &this_node.map(|n| n.meta.labels.clone()).unwrap_or_default(),
            &node_ips,
            &with_ingress,
            &mut diagnostics,
        ),
        false => Default::default(),
    };
    let my_ip = node_ips
        .iter()
        .find(|i| i.is_ipv4())
        .or(node_ips.first())
        .copied();
    let l2 = L2Config {
        never_announce,
        nodes: snap.nodes.clone(),
        pools,
        addresses,
        my_ip,
        default_iface: node_ips
            .iter()
            .find_map(|ip| netwatch::interface_of(&host.addrs, *ip)),
    };
    let touched = planner.plan(&cfg, &changes);
    let changed = planner.resolver.changed(&changes).cloned().collect();
    Pass {
        touched,
        changes: ServiceChanges {
            changed,
            previous: changes.previous,
        },
        node_ips: nodeport_ips,
        diagnostics,
        l2,
        lb_services,
        pool_usage,
        bgp,
        bgp_services: with_ingress,
    }
}

/// What this node announces now, for its announcement file: the layer-2 addresses it owns and
/// the load-balancer addresses it announces by BGP to an Established peer.
fn announced(
    mut owned: BTreeSet<IpAddr>,
    bgp: Option<&crate::bgp::BgpSide>,
    lb_services: &[(IpAddr, String)],
) -> BTreeSet<IpAddr> {
    if let Some(b) = bgp {
        owned.extend(b.announced(lb_services.iter().map(|(ip, _)| *ip)));
    }
    owned
}

/// `ranges` without the addresses in `holes` (split around them; see
/// [`ferry_model::pools::split_around`]).
fn punch_holes<'a>(
    ranges: impl IntoIterator<Item = (IpAddr, IpAddr)>,
    holes: impl IntoIterator<Item = &'a IpAddr>,
) -> Vec<(IpAddr, IpAddr)> {
    let holes: Vec<IpAddr> = holes.into_iter().copied().collect();
    let ranges = ranges
        .into_iter()
        .filter_map(|(a, b)| ferry_model::pools::IpRange::new(a, b));
    ferry_model::pools::split_around(ranges, &holes)
        .into_iter()
        .map(|r| (r.first(), r.last()))
        .collect()
}

/// The pools of a snapshot, without those overlapping a service CIDR (each an error), and
/// without the nodes' addresses: the Nodes' InternalIPs, or this host's own addresses when the
/// snapshot has no Node objects (the same for every agent sharing a state directory, which
/// must agree on what is allocatable).
pub fn load_pools(
    snap: &Snapshot,
    service_cidrs: &[Cidr],
    host: &netwatch::HostNet,
) -> (PoolConfig, Vec<ferry_model::pools::PoolError>) {
    let (pools, mut errors) =
        ferry_model::pools::load(&snap.config_maps, &snap.ip_pools, &snap.l2_advertisements);
    let (pools, more) = ferry_model::pools::without_service_cidrs(pools, service_cidrs);
    errors.extend(more);
    let mut nodes: Vec<IpAddr> = snap.nodes.iter().flat_map(|n| n.internal_ips()).collect();
    if snap.nodes.is_empty() {
        nodes = netwatch::host_addresses(&host.addrs);
    }
    let (pools, more) = ferry_model::pools::without_addresses(pools, &nodes);
    errors.extend(more);
    (pools, errors)
}

/// Addresses from `first` to `last` (saturating: IPv6 pools can be huge).
fn range_size(first: IpAddr, last: IpAddr) -> u64 {
    let n = match (first, last) {
        (IpAddr::V4(a), IpAddr::V4(b)) => u128::from(u32::from(b).saturating_sub(u32::from(a))),
        (IpAddr::V6(a), IpAddr::V6(b)) => u128::from(b).saturating_sub(u128::from(a)),
        _ => return 0,
    };
    u64::try_from(n.saturating_add(1)).unwrap_or(u64::MAX)
}

/// Forwarding must be on for pods and node ports; say so once if it is not.
fn warn_about_sysctls() {
    if let Ok(v) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward") {
        if v.trim() == "0" {
            log!("warning: net.ipv4.ip_forward is 0: traffic to pods on other nodes and node ports will not be forwarded");
        }
    }
}

/// Deletes UDP conntrack entries whose replies come from a removed endpoint (`conntrack -D`).
fn flush_udp_conntrack(addr: IpAddr, port: u16) {
    let out = std::process::Command::new("conntrack")
        .args([
            "-D",
            "-p",
            "udp",
            "--reply-src",
            &addr.to_string(),
            "--reply-port-src",
            &port.to_string(),
        ])
        .output();
    match out {
        // conntrack exits 1 when there was nothing to delete.
        Ok(o) if o.status.success() => {
            log!("cleared UDP conntrack entries of removed endpoint {addr}:{port}")
        }
        Ok(_) => {}
        Err(e) => {
            log!("warning: cannot clear UDP conntrack entries of {addr}:{port}: conntrack: {e}")
        }
    }
}

/// What a sync derives from a pass's changes besides the tables.
struct AfterPass {
    /// UDP endpoints gone (their conntrack entries are flushed).
    stale_udp: Vec<(IpAddr, u16)>,
    /// Endpoints programmed in all.
    endpoints: usize,
    service_changes: u64,
    endpoint_changes: u64,
    /// healthCheckNodePort servers (when proxying: `node` given).
    health_checks: Vec<crate::healthcheck::Check>,
}

/// From what the changed services resolved to `previous`ly and resolve to now (`changed`):
/// UDP endpoints gone and counts of changes; from every service: endpoints, and the health
/// checks of `node` (None: not proxying, none).
fn after_pass(
    planner: &TablePlanner,
    previous: &[ferry_model::view::ResolvedService],
    changed: &[ferry_model::view::ResolvedService],
    node: Option<&str>,
) -> AfterPass {
    let (service_changes, endpoint_changes) = changes_between(previous, changed);
    AfterPass {
        stale_udp: ferry_plan::plan::stale_udp_endpoints(previous, changed),
        endpoints: planner
            .services()
            .flat_map(|s| s.ports.iter())
            .map(|port| port.endpoints.len())
            .sum(),
        service_changes,
        endpoint_changes,
        // healthCheckNodePort (healthcheck.rs): kube-proxy's part, so only when proxying.
        health_checks: match node {
            Some(node) => crate::healthcheck::wanted(
                &planner
                    .services()
                    .filter(|s| s.health_check_node_port.is_some())
                    .cloned()
                    .collect::<Vec<_>>(),
                node,
            ),
            None => Vec::new(),
        },
    }
}

/// Services added, removed or changed, and endpoints added or removed, from `old` to `new`.
fn changes_between(
    old: &[ferry_model::view::ResolvedService],
    new: &[ferry_model::view::ResolvedService],
) -> (u64, u64) {
    use std::collections::BTreeSet;
    let endpoints = |s: &ferry_model::view::ResolvedService| -> BTreeSet<(IpAddr, u16)> {
        s.ports
            .iter()
            .flat_map(|p| p.endpoints.iter().map(|e| (e.addr, e.port)))
            .collect()
    };
    let before: BTreeMap<_, _> = old.iter().map(|s| (&s.id, s)).collect();
    let after: BTreeMap<_, _> = new.iter().map(|s| (&s.id, s)).collect();
    let (mut services, mut eps) = (0u64, 0u64);
    for id in before.keys().chain(after.keys()).collect::<BTreeSet<_>>() {
        let (a, b) = (before.get(id), after.get(id));
        if a != b {
            services += 1;
            let ea = a.map(|s| endpoints(s)).unwrap_or_default();
            let eb = b.map(|s| endpoints(s)).unwrap_or_default();
            eps += ea.symmetric_difference(&eb).count() as u64;
        }
    }
    (services, eps)
}

/// Returns the heap a sync freed to the system at once (jemalloc would after its decay time:
/// after a large sync an idle agent would otherwise hold its peak for a while, and a Raspberry
/// Pi has little memory).
fn give_back_memory() {
    // "arena.<MALLCTL_ARENAS_ALL>.purge": every arena's unused dirty pages.
    let name = b"arena.4096.purge\0";
    // SAFETY: a purge takes no arguments and returns nothing; the name is NUL-terminated.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr().cast(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
}

/// What a sync did.
struct SyncOutcome {
    services: usize,
    endpoints: usize,
    /// Services added, removed or changed by this sync, and endpoints added or removed.
    service_changes: u64,
    endpoint_changes: u64,
    lb_services: Vec<(IpAddr, String)>,
    pool_usage: Vec<(String, u64, u64)>,
    diagnostics: Vec<Diagnostic>,
    l2: L2Config,
    node_ips: Vec<IpAddr>,
    /// healthCheckNodePort: the health checks this node serves (healthcheck.rs).
    health_checks: Vec<crate::healthcheck::Check>,
    /// What changed in the kernel ("" when nothing did).
    changes: String,
    /// What this node announces by BGP.
    bgp: crate::bgp::Wanted,
    t_plan: Duration,
    t_apply: Duration,
}

/// The I/O side of a sync: source, store, dataplane. Runs on a blocking thread; owned by the
/// shell between syncs.
struct Worker {
    args: AgentArgs,
    source: WorkerSource,
    planner: TablePlanner,
    store: StateDir,
    dp: Tables,
    /// What the services of passes whose kernel write failed resolved to before (their UDP
    /// endpoints gone are flushed after the next pass that reaches the kernel).
    unflushed: Vec<ferry_model::view::ResolvedService>,
    /// Large writes out of nftables' change notifications (None: no watcher), and where a
    /// foreign change that may have gone unnotified meanwhile is reported.
    quiet: Option<netwatch::QuietWrites>,
    wake: tokio::sync::mpsc::UnboundedSender<Wake>,
}

/// A pass's snapshot: lent by the manifest reader, or the API source's shared view.
enum Held {
    Lent(Box<Snapshot>),
    Shared(Arc<Snapshot>),
}

/// A sync's source: a manifest directory (allocations in the state directory) or the API
/// (allocations as the API server and the load-balancer controller wrote them).
enum WorkerSource {
    Dir(source::Reader, PathBuf),
    Api(ferry_kube::ApiSource),
}

impl Worker {
    fn sync(&mut self, job: SyncJob, host: &netwatch::HostNet) -> Result<SyncOutcome> {
        let args = &self.args;
        let t0 = Instant::now();
        let proxies = args.role.proxies();
        if job.reread_kernel && proxies {
            // Re-read the kernel's table: repairs anything changed behind our back.
            self.dp.resync();
        }
        if job.reread_kernel {
            // The safety resync (and after a failure): every service resolved and planned
            // again, not only those whose fingerprints moved.
            self.planner.distrust();
        }
        // The manifest reader lends its objects (given back below); the API source shares
        // its view (dropped below): neither is a copy. The API source also says which
        // services changed since the pass before (the manifest reader: all may have).
        let mut named = ferry_model::view::Changed::All;
        let held = match &mut self.source {
            WorkerSource::Dir(reader, dir) => Held::Lent(Box::new(
                reader
                    .read()
                    .with_context(|| format!("reading {}", dir.display()))?,
            )),
            WorkerSource::Api(api) => {
                let (view, changed) = api.view_and_changes();
                named = changed;
                Held::Shared(view)
            }
        };
        let (snap, from_api): (&Snapshot, bool) = match &held {
            Held::Lent(s) => (s, false),
            Held::Shared(s) => (s, true),
        };
        let pools = load_pools(snap, &args.service_cidr, host);
        let allocated = if from_api {
            Allocated::FromApi(named)
        } else {
            let (results, lb) = self.store.sync(
                &snap.services,
                &snap.namespaces,
                &pools.0,
                &args.alloc_config(),
                source::now_ms(),
                source::now_ms(),
            )?;
            Allocated::All(results, lb)
        };
        let mut p = compute(&mut self.planner, args, snap, pools, allocated, host);
        let t_plan = t0.elapsed();
        let ServiceChanges {
            mut changed,
            mut previous,
        } = std::mem::take(&mut p.changes);
        if !self.unflushed.is_empty() {
            // Passes that never reached the kernel: what was applied before them is compared
            // with now too (the older state last, so that it counts).
            let stashed = std::mem::take(&mut self.unflushed);
            let mentioned: BTreeSet<ferry_model::ObjectRef> =
                changed.iter().map(|s| s.id.clone()).collect();
            for s in &stashed {
                if !mentioned.contains(&s.id) {
                    changed.extend(self.planner.service(&s.id).cloned());
                }
            }
            changed.sort_by(|a, b| a.id.cmp(&b.id));
            changed.dedup_by(|a, b| a.id == b.id);
            previous.extend(stashed);
        }
        let changes = if proxies {
            let tables = self.planner.tables();
            let applied = self.dp.apply(&tables, Some(&p.touched));
            // Back in the notification group if a large write left it; a foreign commit
            // meanwhile, or any doubt, is handled as a notification of one.
            if let Some(why) = self.quiet.as_ref().and_then(|q| q.close()) {
                log!(
                    "nftables: {why}: re-reading ferry's tables, as after another process's change"
                );
                let _ = self.wake.send(Wake::Kernel);
            }
            let applied = match applied {
                Ok(a) => a,
                Err(e) => {
                    self.unflushed = previous;
                    return Err(e.into());
                }
            };
            if !applied.tables_deleted.is_empty() {
                log!(
                    "{} tables now; deleted the tables no longer used: {}",
                    tables.len(),
                    applied.tables_deleted.join(" ")
                );
            }
            applied
        } else {
            Default::default()
        };
        let mut diagnostics = p.diagnostics;
        if let Some(why) = self.dp.netlink_refused() {
            diagnostics.push(Diagnostic {
                severity: Severity::Warning,
                object: None,
                reason: "NetlinkRefused",
                message: format!(
                    "the kernel refused ferry's netlink batch ({why}); the change went through libnftables instead"
                ),
            });
        }
        let after = after_pass(
            &self.planner,
            &previous,
            &changed,
            proxies.then_some(&*args.node),
        );
        for (addr, port) in after.stale_udp {
            flush_udp_conntrack(addr, port);
        }
        let AfterPass {
            endpoints,
            service_changes,
            endpoint_changes,
            health_checks,
            ..
        } = after;
        let services = snap.services.len();
        // The reader takes the objects back for its next read (kept once, not copied); the
        // API source's view is let go, so that changes go into it in place.
        match (&mut self.source, held) {
            (WorkerSource::Dir(reader, _), Held::Lent(snap)) => reader.give_back(*snap),
            (_, held) => drop(held),
        }
        Ok(SyncOutcome {
            service_changes,
            endpoint_changes,
            services,
            endpoints,
            lb_services: p.lb_services,
            pool_usage: p.pool_usage,
            diagnostics,
            l2: p.l2,
            node_ips: p.node_ips,
            health_checks,
            bgp: p.bgp,
            changes: if changes.is_empty() {
                String::new()
            } else {
                changes.to_string()
            },
            t_plan,
            t_apply: t0.elapsed() - t_plan,
        })
    }
}

pub fn run(args: AgentArgs) -> Result<i32> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the agent's event loop")?;
    rt.block_on(run_async(args))
}

/// The shell's state between events.
struct Shell {
    core: Core,
    metrics: Arc<Metrics>,
    /// Load-balancer address -> services, from the last sync (for the announced metric).
    lb_services: Vec<(IpAddr, String)>,
    takeovers_seen: u64,
    responders_seen: Vec<String>,
    /// The first change not yet handed to a sync, and the one the running sync carries
    /// (for the network-programming latency).
    changed_since: Option<Instant>,
    syncing_since: Option<Instant>,
    reported: Reported,
    node_ips: Vec<IpAddr>,
    syncs: u64,
    l2_sent: Option<L2Config>,
    /// healthCheckNodePort servers (healthcheck.rs), updated after each sync.
    health: crate::healthcheck::HealthChecks,
}

async fn run_async(args: AgentArgs) -> Result<i32> {
    use tokio::signal::unix::{signal, SignalKind};
    let _one_agent = crate::singleton::claim(Duration::from_secs(args.wait_for_previous_s))?;
    let state = StateDir::new(&args.state_dir)?;
    let source_kind = args.source()?;
    if args.detect_local_mode != DetectLocalMode::NodeCidr {
        // The Node's podCIDRs come with the source; everything else is known now.
        args.local_traffic(None).map_err(anyhow::Error::msg)?;
    }
    if let SourceKind::Manifests(dir) = &source_kind {
        std::fs::metadata(dir).with_context(|| format!("manifest directory {}", dir.display()))?;
    }
    let nft = Nft::new();
    log!(
        "ferry agent on node {} (pid {}, role {:?}): {}, state {}, nftables via {}",
        args.node,
        std::process::id(),
        args.role,
        match &source_kind {
            SourceKind::Manifests(d) => format!("manifests {}", d.display()),
            SourceKind::Api(Some(k)) => format!("Kubernetes API from {}", k.display()),
            SourceKind::Api(None) => "Kubernetes API (in-cluster)".to_string(),
        },
        args.state_dir.display(),
        nft.backend_name()
    );
    if args.role.proxies() {
        warn_about_sysctls();
    }
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;

    let (wake_tx, mut wake_rx) = tokio::sync::mpsc::unbounded_channel::<Wake>();
    let mut _dir_watcher = None;
    let mut api: Option<ApiSide> = None;
    let worker_source = match &source_kind {
        SourceKind::Manifests(dir) => {
            _dir_watcher = Some(
                netwatch::watch_manifests(dir, wake_tx.clone())
                    .with_context(|| format!("watching {}", dir.display()))?,
            );
            WorkerSource::Dir(source::Reader::new(dir), dir.clone())
        }
        SourceKind::Api(kubeconfig) => {
            let side = ApiSide::start(&args, kubeconfig.as_deref(), wake_tx.clone()).await?;
            let src = side.source.clone();
            api = Some(side);
            WorkerSource::Api(src)
        }
    };
    if let Err(e) = netwatch::watch_addresses(wake_tx.clone()) {
        log!("warning: cannot watch interface changes ({e}): addresses are read at every sync");
    }
    let quiet = match netwatch::watch_nftables(wake_tx.clone()) {
        Ok(q) => Some(q),
        Err(e) => {
            log!(
                "warning: cannot watch nftables changes ({e}): the table is checked every {} s",
                args.resync_s
            );
            None
        }
    };
    let mut host = netwatch::host_net();

    let status_changed = Arc::new(tokio::sync::Notify::new());
    let announcer = if args.no_l2 || !args.role.balances() {
        None
    } else {
        let n = Arc::clone(&status_changed);
        Some(
            Announcer::start(&args.node, args.member_port, move || n.notify_one())
                .context("starting the layer-2 thread")?,
        )
    };
    let announcements = state.announcements_dir();
    let status_file = announcements.join(format!("{}.json", args.node));
    if announcer.is_some() || args.role.balances() {
        let _ = std::fs::create_dir_all(&announcements);
    }

    let metrics = Arc::new(Metrics::new(&args.node));
    // BGP (bgp.rs): one speaker for the agent's life; peers and routes come with each sync.
    let mut bgp = match args.role.balances() {
        true => Some(
            crate::bgp::BgpSide::start(Arc::clone(&metrics)).context("starting the BGP speaker")?,
        ),
        false => None,
    };
    if let Some(addr) = args.metrics_addr {
        let listener = crate::http::bind(addr).await?;
        log!("metrics and health on http://{addr}/metrics, /healthz, /readyz");
        tokio::spawn(crate::http::serve(listener, Arc::clone(&metrics)));
    }
    let mut shell = Shell {
        core: Core::new(
            SyncConfig {
                min_interval: Duration::from_millis(args.min_sync_ms),
                resync: (args.resync_s > 0).then(|| Duration::from_secs(args.resync_s)),
                ..SyncConfig::default()
            },
            Instant::now(),
        ),
        reported: Reported::default(),
        metrics: Arc::clone(&metrics),
        lb_services: Vec::new(),
        takeovers_seen: 0,
        responders_seen: Vec::new(),
        changed_since: None,
        syncing_since: None,
        node_ips: Vec::new(),
        syncs: 0,
        l2_sent: None,
        health: crate::healthcheck::HealthChecks::new(Arc::clone(&metrics)),
    };
    // The worker lives on a thread of its own (libnftables' context stays on one thread):
    // jobs go in, outcomes come back; the shell never waits on it.
    let (job_tx, job_rx) = std::sync::mpsc::channel::<(SyncJob, netwatch::HostNet)>();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<Result<SyncOutcome>>();
    let worker_args = args.clone();
    let worker_wake = wake_tx.clone();
    let worker_thread = std::thread::Builder::new()
        .name(netwatch::SYNC_THREAD.into())
        .spawn(move || {
            let mut nft = Nft::new();
            // A restart keeps the shard count its tables show while the automatic rule allows
            // it (no reshuffle of every service on each restart).
            let start = match ferry_nft::tables::ferry_tables(&mut nft) {
                Ok(t) => shards_in_kernel(&t),
                Err(_) => 1,
            };
            let dp = match &quiet {
                Some(q) => Tables::with_backend(Box::new(
                    q.backend(ferry_nft::backend::Fallback::kernel(nft)),
                )),
                None => Tables::new(nft),
            };
            let mut w = Worker {
                source: worker_source,
                planner: TablePlanner::starting_at(start),
                store: state,
                dp,
                unflushed: Vec::new(),
                args: worker_args,
                quiet,
                wake: worker_wake,
            };
            for (job, host) in job_rx {
                let outcome = w.sync(job, &host);
                w.dp.release_cache();
                give_back_memory();
                if done_tx.send(outcome).is_err() {
                    break;
                }
            }
        })
        .context("starting the sync thread")?;
    let mut in_flight = false;
    let mut status_tick = tokio::time::interval(Duration::from_secs(1));
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut waiting_logged = false;
    loop {
        // From the API, nothing is done until every watch has its first list.
        let source_ready = api.as_ref().is_none_or(|a| a.source.ready());
        if !source_ready && !waiting_logged {
            if let Some(a) = &api {
                log!(
                    "waiting for the first lists of: {} (rules and announcements stay as they are)",
                    a.source.waiting_for().join(", ")
                );
            }
            waiting_logged = true;
        }
        if !in_flight && source_ready {
            if let Some(job) = shell.core.poll_sync(Instant::now()) {
                if job_tx.send((job, host.clone())).is_err() {
                    anyhow::bail!("the sync thread is gone");
                }
                shell.syncing_since = shell.changed_since.take();
                in_flight = true;
            }
        }
        let deadline = shell
            .core
            .poll_timeout()
            .map(tokio::time::Instant::from_std);
        let timer = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(w) = wake_rx.recv() => {
                let mut wakes = vec![w];
                while let Ok(w) = wake_rx.try_recv() {
                    wakes.push(w);
                }
                if wakes.contains(&Wake::Kernel) {
                    shell.core.handle_kernel_changed();
                }
                let mut changed = wakes.contains(&Wake::Manifests);
                if wakes.contains(&Wake::Addresses) {
                    let now = netwatch::host_net();
                    if now != host {
                        host = now;
                        changed = true;
                    }
                }
                if changed {
                    shell.core.handle_change();
                    shell.changed_since.get_or_insert_with(Instant::now);
                }
            }
            done = done_rx.recv() => {
                let Some(r) = done else {
                    anyhow::bail!("the sync thread stopped (it panicked: see above)");
                };
                in_flight = false;
                let wanted = shell.finish_sync(r, announcer.as_ref());
                if let (Some(b), Some(w)) = (bgp.as_mut(), wanted) {
                    b.apply(w).await;
                }
                shell.metrics.heartbeat("sync");
            }
            _ = timer => {}
            _ = status_changed.notified() => {
                if let Some(a) = &announcer {
                    let owned = announced(a.status().owned, bgp.as_ref(), &shell.lb_services);
                    crate::announce::write_status(&status_file, &args.node, &owned);
                }
            }
            _ = status_tick.tick() => {
                shell.metrics.heartbeat("agent");
                if let Some(side) = &api {
                    shell.metrics.set_leader(side.leads());
                }
                // A sync that has been running for over a minute makes /healthz fail.
                if !in_flight {
                    shell.metrics.heartbeat("sync");
                }
                if announcer.is_none() && bgp.is_some() {
                    let owned = announced(Default::default(), bgp.as_ref(), &shell.lb_services);
                    crate::announce::write_status(&status_file, &args.node, &owned);
                }
                if let Some(a) = &announcer {
                    let st = a.status();
                    let owned = announced(st.owned.clone(), bgp.as_ref(), &shell.lb_services);
                    crate::announce::write_status(&status_file, &args.node, &owned);
                    shell.export_l2(&st);
                    if let Some(side) = &api {
                        side.announced(&st.owned, &shell.lb_services);
                    }
                }
            }
            Some(ev) = async { bgp.as_mut()?.next_event().await } => {
                if let Some(b) = bgp.as_mut() {
                    b.handle_event(ev);
                }
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    if let Some(a) = announcer {
        a.shutdown();
        let _ = std::fs::remove_file(&status_file);
    }
    if let Some(b) = bgp {
        b.shutdown().await;
    }
    if let Some(side) = api {
        side.stop().await;
    }
    if in_flight {
        // A sync that is under way finishes (its kernel transaction is atomic either way).
        let _ = tokio::time::timeout(Duration::from_secs(10), done_rx.recv()).await;
    }
    drop(job_tx);
    if !in_flight {
        let _ = worker_thread.join();
    }
    if args.cleanup_on_exit && args.role.proxies() {
        // Uninstalling: the table goes with the agent (the announcer has withdrawn above).
        match ferry_nft::tables::cleanup_all(&mut Nft::new()) {
            Ok(t) if t.is_empty() => {
                log!("stopping; --cleanup-on-exit: no table of ferry's to remove")
            }
            Ok(t) => log!(
                "stopping; --cleanup-on-exit: removed table(s) inet {}",
                t.join(", ")
            ),
            Err(e) => log!("stopping; --cleanup-on-exit: removing ferry's tables: {e}"),
        }
    } else {
        log!("stopping; ferry's rules stay in place (`ferry cleanup` removes them)");
    }
    Ok(0)
}

/// The API side of an agent: the source's watchers, and (unless a proxy only) the Lease
/// election and the load-balancer controller, all on the agent's event loop.
struct ApiSide {
    source: ferry_kube::ApiSource,
    client: kube::Client,
    node: String,
    stop: tokio::sync::watch::Sender<bool>,
    lease_task: Option<tokio::task::JoinHandle<()>>,
    controller_task: Option<tokio::task::JoinHandle<()>>,
    recorder: kube::runtime::events::Recorder,
    /// Until when this agent leads the load-balancer controller (None: it does not).
    leadership: Option<ferry_kube::lease::Leadership>,
    /// Addresses this node announced at the last look (for `nodeAssigned` Events).
    announced: std::sync::Mutex<std::collections::BTreeSet<IpAddr>>,
}

impl ApiSide {
    async fn start(
        args: &AgentArgs,
        kubeconfig: Option<&std::path::Path>,
        wake: tokio::sync::mpsc::UnboundedSender<Wake>,
    ) -> Result<ApiSide> {
        use ferry_kube::{controller, lease};
        let client = ferry_kube::client(kubeconfig).await?;
        let (changed_tx, changed_rx) = tokio::sync::watch::channel(());
        let source = ferry_kube::ApiSource::start(
            client.clone(),
            args.source_config(),
            move || {
                let _ = wake.send(Wake::Manifests);
                changed_tx.send_replace(());
            },
            |line| log!("{line}"),
        );
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let (mut lease_task, mut controller_task, mut leadership) = (None, None, None);
        if args.role.balances() {
            let ns = args.lease_namespace();
            let (leader_tx, leader_rx) = tokio::sync::watch::channel(None);
            leadership = Some(leader_rx.clone());
            log!(
                "load-balancer controller: elected with Lease {ns}/{LEASE_NAME} (held by the leading node)"
            );
            lease_task = Some(tokio::spawn(lease::run(
                kube::Api::namespaced(client.clone(), &ns),
                LEASE_NAME.to_string(),
                lease::Elector::new(&args.node, lease::Timings::default()),
                leader_tx,
                stop_rx,
                |line| log!("{line}"),
            )));
            controller_task = Some(tokio::spawn(controller::run(
                client.clone(),
                source.clone(),
                leader_rx,
                changed_rx,
                controller::ControllerConfig {
                    our_class: Some(crate::state::LOAD_BALANCER_CLASS.to_string()),
                    reporter: kube::runtime::events::Reporter {
                        controller: "ferry-controller".into(),
                        instance: Some(args.node.clone()),
                    },
                    resync: Duration::from_secs(30),
                    service_cidrs: args.service_cidr.clone(),
                    previous: StateDir::at(&args.state_dir)
                        .manifest_lb_allocations()
                        .unwrap_or_default(),
                },
                |line| log!("{line}"),
            )));
        }
        let recorder = kube::runtime::events::Recorder::new(
            client.clone(),
            kube::runtime::events::Reporter {
                controller: "ferry-agent".into(),
                instance: Some(args.node.clone()),
            },
        );
        Ok(ApiSide {
            source,
            client,
            node: args.node.clone(),
            stop,
            lease_task,
            controller_task,
            recorder,
            leadership,
            announced: Default::default(),
        })
    }

    fn leads(&self) -> bool {
        self.leadership
            .as_ref()
            .is_some_and(|l| l.borrow().is_some_and(|until| until > Instant::now()))
    }

    /// Records `nodeAssigned` on the Services whose addresses this node started announcing.
    fn announced(
        &self,
        owned: &std::collections::BTreeSet<IpAddr>,
        lb_services: &[(IpAddr, String)],
    ) {
        let mut seen = self.announced.lock().unwrap_or_else(|e| e.into_inner());
        let new: Vec<IpAddr> = owned.difference(&seen).copied().collect();
        *seen = owned.clone();
        for ip in new {
            for (_, svc) in lb_services.iter().filter(|(i, _)| *i == ip) {
                let Some((ns, name)) = svc.split_once('/') else {
                    continue;
                };
                let reference = k8s_openapi::api::core::v1::ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Service".into()),
                    namespace: Some(ns.to_string()),
                    name: Some(name.to_string()),
                    ..Default::default()
                };
                let ev = kube::runtime::events::Event {
                    type_: kube::runtime::events::EventType::Normal,
                    reason: "nodeAssigned".into(),
                    note: Some(format!(
                        "announcing from node \"{}\" with protocol \"layer2\"",
                        self.node
                    )),
                    action: "Announce".into(),
                    secondary: None,
                };
                let recorder = self.recorder.clone();
                tokio::spawn(async move {
                    if let Err(e) = recorder.publish(&ev, &reference).await {
                        log!("recording event nodeAssigned: {e}");
                    }
                });
            }
        }
    }

    /// Stops the controller and gives the Lease up (so another node takes over at once).
    async fn stop(self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.controller_task {
            t.abort();
        }
        if let Some(t) = self.lease_task {
            let _ = tokio::time::timeout(Duration::from_secs(3), t).await;
        }
        drop(self.client);
    }
}

/// The load-balancer controller's Lease.
pub const LEASE_NAME: &str = "ferry-lb-controller";

impl Shell {
    /// The layer-2 thread's state into the metrics; its liveness into the health check.
    fn export_l2(&mut self, st: &crate::announce::L2Status) {
        if st
            .last_step
            .is_some_and(|t| t.elapsed() < Duration::from_secs(3))
        {
            self.metrics.heartbeat("layer2");
        }
        let announced = self
            .lb_services
            .iter()
            .filter(|(ip, _)| st.owned.contains(ip))
            .cloned();
        self.metrics.set_announced(announced);
        self.metrics
            .set_membership(st.alive.len(), st.cluster_size, st.quorum);
        for _ in self.takeovers_seen..st.takeovers {
            self.metrics.inc_takeover();
        }
        self.takeovers_seen = st.takeovers;
        for (iface, c) in &st.responders {
            self.metrics.set_responder_counters(iface, *c);
        }
        for gone in self
            .responders_seen
            .iter()
            .filter(|i| !st.responders.contains_key(*i))
        {
            self.metrics.remove_responder(gone);
        }
        self.responders_seen = st.responders.keys().cloned().collect();
        if let Some(s) = st.member_stats {
            self.metrics.set_member_stats(s);
        }
    }

    /// Takes a sync's outcome in; hands back what BGP is to announce (None after a failed sync).
    fn finish_sync(
        &mut self,
        r: Result<SyncOutcome>,
        announcer: Option<&Announcer>,
    ) -> Option<crate::bgp::Wanted> {
        let now = Instant::now();
        match r {
            Ok(out) => {
                self.core.handle_sync_done(now, true);
                self.metrics.observe_sync(out.t_plan + out.t_apply, true);
                self.metrics
                    .set_programmed(out.services as u64, out.endpoints as u64);
                self.metrics.set_pools(out.pool_usage.clone());
                self.metrics
                    .add_changes(out.service_changes, out.endpoint_changes);
                if let Some(t) = self.syncing_since.take() {
                    self.metrics.observe_network_programming(t.elapsed());
                }
                self.lb_services = out.lb_services.clone();
                self.health.update(out.health_checks.clone()); // healthCheckNodePort
                if self.core.ready() {
                    self.metrics.set_ready();
                }
                let (new, _) = self.reported.update(out.diagnostics);
                for d in new {
                    log!("{d}");
                }
                if out.node_ips != self.node_ips {
                    let shown: Vec<String> = out.node_ips.iter().map(|i| i.to_string()).collect();
                    log!("node ports served on {}", shown.join(", "));
                    self.node_ips = out.node_ips;
                }
                if !out.changes.is_empty() || self.syncs == 0 {
                    let what = if out.changes.is_empty() {
                        "table already as planned, nothing to change".to_string()
                    } else {
                        out.changes
                    };
                    log!(
                        "{} services: {what} (read+plan {:.1} ms, apply {:.1} ms)",
                        out.services,
                        out.t_plan.as_secs_f64() * 1e3,
                        out.t_apply.as_secs_f64() * 1e3
                    );
                }
                self.syncs += 1;
                if let Some(a) = announcer {
                    if self.l2_sent.as_ref() != Some(&out.l2) {
                        a.update(out.l2.clone());
                        self.l2_sent = Some(out.l2);
                    }
                }
                Some(out.bgp)
            }
            Err(e) => {
                self.core.handle_sync_done(now, false);
                self.metrics.observe_sync(now.elapsed(), false);
                log!("error: {e:#} (retrying)");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentArgs,
    }

    fn parse(args: &[&str]) -> Result<AgentArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("agent").chain(args.iter().copied())).map(|c| c.agent)
    }

    #[test]
    fn detect_local_mode_as_kube_proxy_takes_it() {
        let a = parse(&["--node", "n1"]).unwrap();
        assert_eq!(a.detect_local_mode, DetectLocalMode::ClusterCidr);
        let (cidrs, iface) = a.local_traffic(None).unwrap();
        assert_eq!(cidrs, a.cluster_cidr);
        assert!(iface.is_none());
        // Each mode needs its flag; the error says which.
        let bridge = parse(&["--node", "n1", "--detect-local-mode", "BridgeInterface"]).unwrap();
        let e = bridge.local_traffic(None).unwrap_err();
        assert!(e.contains("--pod-bridge-interface"), "{e}");
        let ok = parse(&[
            "--node",
            "n1",
            "--detect-local-mode",
            "InterfaceNamePrefix",
            "--pod-interface-name-prefix",
            "veth",
        ])
        .unwrap();
        let (cidrs, iface) = ok.local_traffic(None).unwrap();
        assert!(cidrs.is_empty());
        assert_eq!(
            iface,
            Some(ferry_plan::plan::LocalInterface {
                name: "veth".into(),
                prefix: true
            })
        );
        let bad_name = parse(&[
            "--node",
            "n1",
            "--detect-local-mode",
            "BridgeInterface",
            "--pod-bridge-interface",
            "a name/with slash",
        ])
        .unwrap();
        assert!(bad_name.local_traffic(None).is_err());
        // NodeCIDR: the Node's podCIDRs; none is an error naming the node.
        let nodecidr = parse(&["--node", "n1", "--detect-local-mode", "NodeCIDR"]).unwrap();
        let e = nodecidr.local_traffic(None).unwrap_err();
        assert!(e.contains("Node n1"), "{e}");
        let node = ferry_model::objects::Node {
            meta: ferry_model::objects::Meta {
                name: "n1".into(),
                ..Default::default()
            },
            addresses: vec![],
            pod_cidrs: vec!["10.42.3.0/24".into()],
        };
        let (cidrs, _) = nodecidr.local_traffic(Some(&node)).unwrap();
        assert_eq!(cidrs, vec!["10.42.3.0/24".parse::<Cidr>().unwrap()]);
        assert!(parse(&["--node", "n1", "--detect-local-mode", "clustercidr"]).is_err());
    }

    #[test]
    fn nodeport_addresses_as_kube_proxy_takes_them() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a = parse(&["--node", "n1"]).unwrap();
        assert_eq!(a.nodeport_addresses, NodePortAddresses::Primary);
        let ifaces = vec![
            ("lo".to_string(), ip("127.0.0.1")),
            ("eth0".to_string(), ip("192.168.2.11")),
            ("eth0".to_string(), ip("192.168.2.99")),
            ("eth1".to_string(), ip("10.0.5.1")),
            ("eth0".to_string(), ip("fd00:2::11")),
        ];
        let primary = [ip("192.168.2.11")];
        assert_eq!(a.nodeport_addresses.select(&primary, &ifaces), primary);
        let sel = |flag: &str| {
            parse(&["--node", "n1", "--nodeport-addresses", flag])
                .unwrap()
                .nodeport_addresses
                .select(&primary, &ifaces)
        };
        assert_eq!(
            sel("192.168.2.0/24"),
            [ip("192.168.2.11"), ip("192.168.2.99")]
        );
        assert_eq!(
            sel("192.168.2.99/32,fd00:2::/64"),
            [ip("192.168.2.99"), ip("fd00:2::11")]
        );
        // All addresses of a family; never loopback.
        assert_eq!(
            sel("0.0.0.0/0"),
            [ip("10.0.5.1"), ip("192.168.2.11"), ip("192.168.2.99")]
        );
        assert!(sel("172.16.0.0/12").is_empty());
        assert_eq!(
            parse(&["--node", "n1", "--nodeport-addresses", "PRIMARY"])
                .unwrap()
                .nodeport_addresses,
            NodePortAddresses::Primary
        );
        for bad in [
            "primary,10.0.0.0/8",
            "10.0.0.0/33",
            "nonsense",
            "10.0.0.0/8,",
        ] {
            let e = parse(&["--node", "n1", "--nodeport-addresses", bad]).err();
            assert!(e.is_some(), "{bad} accepted");
        }
        let shown = NodePortAddresses::parse("10.0.0.0/8, fd00::/8")
            .unwrap()
            .to_string();
        assert_eq!(shown, "10.0.0.0/8,fd00::/8");
    }

    #[test]
    fn the_source_is_the_flag_given_or_the_cluster_around_the_pod() {
        let a = parse(&["--node", "n1", "--manifests", "/m"]).unwrap();
        assert_eq!(a.source().unwrap(), SourceKind::Manifests("/m".into()));
        let a = parse(&["--node", "n1", "--kubeconfig", "/k"]).unwrap();
        assert_eq!(a.source().unwrap(), SourceKind::Api(Some("/k".into())));
        assert!(
            parse(&["--node", "n1", "--kubeconfig", "/k", "--manifests", "/m"]).is_err(),
            "one source at a time"
        );
        let a = parse(&["--node", "n1"]).unwrap();
        // Outside a pod (no KUBERNETES_SERVICE_HOST in the test's environment): a clear error.
        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
            let e = a.source().unwrap_err().to_string();
            assert!(
                e.contains("--manifests DIR") && e.contains("--kubeconfig PATH"),
                "{e}"
            );
        }
        assert_eq!(a.role, Role::All);
        let a = parse(&[
            "--node",
            "n1",
            "--kubeconfig",
            "/k",
            "--role",
            "load-balancer",
        ])
        .unwrap();
        assert!(a.role.balances() && !a.role.proxies());
        let a = parse(&["--node", "n1", "--kubeconfig", "/k", "--role", "proxy"]).unwrap();
        assert!(a.role.proxies() && !a.role.balances());
        assert!(parse(&["--node", "n1", "--role", "both"]).is_err());
        let a = parse(&[
            "--node",
            "n1",
            "--metallb-config",
            "lb/cfg",
            "--lease-namespace",
            "x",
        ])
        .unwrap();
        assert_eq!(a.metallb_config, ferry_model::ObjectRef::new("lb", "cfg"));
        assert_eq!(a.lease_namespace(), "x");
        assert!(parse(&["--node", "n1", "--metallb-config", "cfg"]).is_err());
    }

    #[test]
    fn holes_are_punched_into_pool_ranges() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let r = |a: &str, b: &str| (ip(a), ip(b));
        let holes = [
            ip("192.168.60.1"),
            ip("192.168.60.7"),
            ip("10.0.0.1"),
            ip("fd00::5"),
        ];
        assert_eq!(
            punch_holes(
                [
                    r("192.168.60.0", "192.168.60.7"),
                    r("fd00::", "fd00::5"),
                    r("10.0.0.1", "10.0.0.1")
                ],
                holes.iter()
            ),
            vec![
                r("192.168.60.0", "192.168.60.0"),
                r("192.168.60.2", "192.168.60.6"),
                r("fd00::", "fd00::4"),
            ]
        );
        assert_eq!(
            punch_holes([r("192.168.2.200", "192.168.2.225")], holes.iter()),
            vec![r("192.168.2.200", "192.168.2.225")]
        );
    }

    #[test]
    fn service_cidrs_are_bounded_as_the_api_server_bounds_them() {
        assert!(parse_service_cidr("10.43.0.0/16").is_ok());
        assert!(parse_service_cidr("10.0.0.0/12").is_ok());
        assert!(parse_service_cidr("fd00:43::/108").is_ok());
        for bad in ["0.0.0.0/0", "10.0.0.0/8", "fd00::/64", "bogus"] {
            assert!(parse_service_cidr(bad).is_err(), "{bad}");
        }
        let e = parse_service_cidr("0.0.0.0/0").unwrap_err();
        assert!(e.contains("too large"), "{e}");
    }

    #[test]
    fn the_automatic_shard_count_grows_with_the_services_and_shrinks_late() {
        // From nothing: one table up to 1,000 services, then powers of two of <= 1,000 each.
        for (services, want) in [
            (0, 1),
            (999, 1),
            (1000, 1),
            (1001, 2),
            (2000, 2),
            (2001, 4),
            (10_000, 16),
            (30_000, 32),
            (100_000, 64),
            (1_000_000, 64),
        ] {
            assert_eq!(auto_shards(services, 1), want, "{services} services");
            assert_eq!(auto_shards(services, 0), want, "{services} services");
        }
        // Growing is at once; shrinking waits until a quarter of the tables would do.
        assert_eq!(auto_shards(10_001, 16), 16);
        assert_eq!(auto_shards(16_001, 16), 32);
        assert_eq!(
            auto_shards(9_000, 16),
            16,
            "no reshuffle just below a threshold"
        );
        assert_eq!(auto_shards(4_001, 16), 16);
        assert_eq!(auto_shards(4_000, 16), 4);
        assert_eq!(auto_shards(600, 2), 2);
        assert_eq!(auto_shards(500, 2), 1);
        // A restart with --nft-shards 3 then automatic: kept while it suffices.
        assert_eq!(auto_shards(2_500, 3), 4);
        assert_eq!(auto_shards(1_500, 3), 3);
        // Every count is stable: planning twice with the count found keeps it.
        for services in (0..40_000).step_by(997) {
            let n = auto_shards(services, 1);
            assert_eq!(auto_shards(services, n), n, "{services}");
            assert!(services <= SERVICES_PER_TABLE * usize::from(n) || n == MAX_AUTO_SHARDS);
        }
    }

    #[test]
    fn the_shard_count_is_read_from_the_tables_present() {
        let t = |names: &[&str]| -> Vec<String> { names.iter().map(|s| s.to_string()).collect() };
        assert_eq!(shards_in_kernel(&t(&[])), 1);
        assert_eq!(shards_in_kernel(&t(&["ferry"])), 1);
        assert_eq!(
            shards_in_kernel(&t(&["ferry", "ferry-0", "ferry-1", "ferry-3", "ferry-2"])),
            4
        );
        assert_eq!(shards_in_kernel(&t(&["ferry", "ferry-7"])), 8);
        assert_eq!(shards_in_kernel(&t(&["ferry-x", "other", "ferry-"])), 1);
    }

    mod incremental {
        //! The agent-level analogue of ferry-plan's delta tests: after any sequence of
        //! changes, a pass of the agent's planner (which resolves and plans only what changed)
        //! gives exactly the tables, UDP flushes, counts and health checks of a full pass.
        use super::*;
        use ferry_model::objects::*;
        use proptest::prelude::*;

        const SERVICES: usize = 6;

        fn ip(s: &str) -> IpAddr {
            s.parse().expect("an address")
        }

        fn service(k: usize, variant: u8) -> Service {
            let type_ = match (k + usize::from(variant)) % 3 {
                0 => ServiceType::ClusterIP,
                1 => ServiceType::NodePort,
                _ => ServiceType::LoadBalancer,
            };
            let udp = k % 2 == 1;
            Service {
                meta: Meta {
                    name: format!("s{k}"),
                    namespace: "default".into(),
                    extra: ferry_model::MetaExtra {
                        resource_version: Some(format!("{variant}")),
                        ..Default::default()
                    }
                    .into(),
                    ..Meta::default()
                },
                type_,
                // Variant 5: no cluster IP yet (refused until the API server allocates one).
                cluster_ip: match variant {
                    5 => ClusterIpSpec::Auto,
                    _ => ClusterIpSpec::Ip(ip(&format!("10.43.0.{}", 10 + k))),
                },
                ports: vec![ServicePort {
                    name: String::new(),
                    protocol: if udp { Protocol::Udp } else { Protocol::Tcp },
                    port: 80 + u16::from(variant % 2),
                    target_port: TargetPort::Number(8080),
                    node_port: type_.has_node_ports().then_some(30_000 + k as u16),
                }],
                external_traffic_policy: if variant % 3 == 2 {
                    TrafficPolicy::Local
                } else {
                    TrafficPolicy::Cluster
                },
                extra: ferry_model::ServiceExtra {
                    load_balancer_ingress: match type_ {
                        ServiceType::LoadBalancer => vec![ip(&format!("192.168.2.{}", 200 + k))],
                        _ => vec![],
                    },
                    health_check_node_port: (type_ == ServiceType::LoadBalancer
                        && variant % 3 == 2)
                        .then_some(31_000 + k as u16),
                    ..Default::default()
                }
                .into(),
                ..Service::default()
            }
        }

        fn slice(k: usize, j: usize, version: Option<u64>, eps: &[(u8, bool)]) -> EndpointSlice {
            EndpointSlice {
                meta: Meta {
                    name: format!("s{k}-{j}"),
                    namespace: "default".into(),
                    extra: ferry_model::MetaExtra {
                        resource_version: version.map(|v| v.to_string()),
                        ..Default::default()
                    }
                    .into(),
                    ..Meta::default()
                },
                service_name: format!("s{k}"),
                address_type: AddressType::IPv4,
                endpoints: eps
                    .iter()
                    .map(|(a, ready)| Endpoint {
                        addresses: [ip(&format!("10.42.{k}.{a}"))].into(),
                        conditions: EndpointConditions {
                            ready: *ready,
                            serving: *ready,
                            terminating: false,
                        },
                        node_name: Some(if a % 2 == 0 { "n1" } else { "n2" }.into()),
                        zone_hints: None,
                    })
                    .collect(),
                ports: vec![EndpointPort {
                    name: String::new(),
                    protocol: if k % 2 == 1 {
                        Protocol::Udp
                    } else {
                        Protocol::Tcp
                    },
                    port: 8080,
                }],
            }
        }

        #[derive(Debug, Clone)]
        enum Op {
            /// Slice j: endpoint address and readiness set; versioned (API) or not (manifests).
            Endpoint(usize, u8, bool, bool),
            AddSlice(usize, bool),
            DropSlice(usize),
            ToggleService(usize),
            /// Service k's variant (type, port, traffic policy, health check port).
            Variant(usize, u8),
            /// The node's zone (a change of the plan's configuration).
            Zone(bool),
            /// The layout: one table or shards.
            Shards(u16),
            /// The periodic safety resync.
            Resync,
            Nothing,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                6 => (0usize..12, 1u8..6, any::<bool>(), any::<bool>())
                    .prop_map(|(j, a, r, v)| Op::Endpoint(j, a, r, v)),
                2 => (0usize..SERVICES, any::<bool>()).prop_map(|(k, v)| Op::AddSlice(k, v)),
                1 => (0usize..12).prop_map(Op::DropSlice),
                2 => (0usize..SERVICES).prop_map(Op::ToggleService),
                2 => (0usize..SERVICES, 0u8..6).prop_map(|(k, v)| Op::Variant(k, v)),
                1 => any::<bool>().prop_map(Op::Zone),
                1 => prop_oneof![Just(1u16), Just(2), Just(3)].prop_map(Op::Shards),
                1 => Just(Op::Resync),
                1 => Just(Op::Nothing),
            ]
        }

        struct World {
            snap: Snapshot,
            variants: [u8; SERVICES],
            present: [bool; SERVICES],
            version: u64,
            shards: u16,
        }

        impl World {
            fn new() -> World {
                let mut w = World {
                    snap: Snapshot::default(),
                    variants: [0; SERVICES],
                    present: [true; SERVICES],
                    version: 1,
                    shards: 1,
                };
                w.snap.nodes.push(Node {
                    meta: Meta {
                        name: "n1".into(),
                        ..Meta::default()
                    },
                    addresses: vec![NodeAddress {
                        type_: "InternalIP".into(),
                        address: "192.168.2.11".into(),
                    }],
                    pod_cidrs: vec![],
                });
                for k in 0..SERVICES {
                    w.snap
                        .slices
                        .push(slice(k, 0, Some(1), &[(1, true), (2, true)]));
                }
                w.services();
                w
            }

            fn services(&mut self) {
                self.snap.services = (0..SERVICES)
                    .filter(|k| self.present[*k])
                    .map(|k| service(k, self.variants[k]))
                    .collect();
            }

            fn apply(&mut self, op: &Op) {
                self.version += 1;
                let v = self.version;
                match *op {
                    Op::Endpoint(j, a, ready, versioned) => {
                        let n = self.snap.slices.len();
                        if n == 0 {
                            return;
                        }
                        let sl = &mut self.snap.slices[j % n];
                        let k: usize = sl.service_name[1..].parse().unwrap_or(0);
                        let old = sl.clone();
                        let mut eps: Vec<(u8, bool)> = sl
                            .endpoints
                            .iter()
                            .map(|e| match e.addresses[0] {
                                IpAddr::V4(x) => (x.octets()[3], e.conditions.ready),
                                IpAddr::V6(_) => (0, false),
                            })
                            .collect();
                        match eps.iter_mut().find(|e| e.0 == a) {
                            Some(e) => e.1 = ready,
                            None => eps.push((a, ready)),
                        }
                        let j: usize = old
                            .meta
                            .name
                            .rsplit('-')
                            .next()
                            .and_then(|x| x.parse().ok())
                            .unwrap_or(0);
                        // An unversioned slice keeps having none (a manifest's).
                        let version =
                            (versioned && old.meta.extra.resource_version.is_some()).then_some(v);
                        *sl = slice(k, j, version, &eps);
                    }
                    Op::AddSlice(k, versioned) => {
                        let j = v as usize;
                        self.snap.slices.push(slice(
                            k,
                            j,
                            versioned.then_some(v),
                            &[((v % 250) as u8 + 3, true)],
                        ));
                    }
                    Op::DropSlice(j) => {
                        let n = self.snap.slices.len();
                        if n > 0 {
                            self.snap.slices.remove(j % n);
                        }
                    }
                    Op::ToggleService(k) => {
                        self.present[k] = !self.present[k];
                        self.services();
                    }
                    Op::Variant(k, var) => {
                        self.variants[k] = var;
                        self.services();
                    }
                    Op::Zone(on) => {
                        let labels = &mut self.snap.nodes[0].meta.labels;
                        if on {
                            labels.insert("topology.kubernetes.io/zone".into(), "z1".into());
                        } else {
                            labels.clear();
                        }
                    }
                    Op::Shards(n) => self.shards = n,
                    Op::Resync | Op::Nothing => {}
                }
            }
        }

        struct Out {
            diagnostics: Vec<String>,
            tables: Vec<ferry_plan::Ruleset>,
            stale: Vec<(IpAddr, u16)>,
            counts: (u64, u64),
            endpoints: usize,
            checks: Vec<crate::healthcheck::Check>,
        }

        /// What the API source names as changed from `old` to `new` at the least (its
        /// property test, in ferry-kube, holds it to that): the services whose Service or
        /// slices differ; everything when another kind changed.
        fn named_between(old: &Snapshot, new: &Snapshot) -> ferry_model::view::Changed {
            use ferry_model::view::Changed;
            if old.nodes != new.nodes
                || old.config_maps != new.config_maps
                || old.ip_pools != new.ip_pools
                || old.namespaces != new.namespaces
            {
                return Changed::All;
            }
            Changed::between((&old.services, &old.slices), (&new.services, &new.slices))
        }

        fn pass(
            planner: &mut TablePlanner,
            w: &World,
            previous_full: Option<&[ferry_model::view::ResolvedService]>,
            named: ferry_model::view::Changed,
        ) -> (Out, Vec<ferry_model::view::ResolvedService>) {
            let shards = w.shards.to_string();
            let args = parse(&["--node", "n1", "--nft-shards", &shards]).unwrap();
            let host = netwatch::HostNet {
                addrs: vec![("eth0".into(), ip("192.168.2.11"))],
                gateways: vec![],
            };
            let pools = load_pools(&w.snap, &args.service_cidr, &host);
            // The incremental pass reads allocations from the Services as it needs them; the
            // full one takes every one at once.
            let allocated = match previous_full {
                None => Allocated::FromApi(named),
                Some(_) => {
                    let (a, lb) = ferry_kube::status::from_api(&w.snap.services, &pools.0);
                    Allocated::All(a, lb)
                }
            };
            let p = compute(planner, &args, &w.snap, pools, allocated, &host);
            let mut diagnostics: Vec<String> =
                p.diagnostics.iter().map(|d| d.to_string()).collect();
            diagnostics.sort();
            let mut all: Vec<_> = planner.services().cloned().collect();
            all.sort_by(|a, b| a.id.cmp(&b.id));
            // A full pass compares everything before with everything now.
            let (previous, changed) = match previous_full {
                Some(before) => (before.to_vec(), all.clone()),
                None => (p.changes.previous.clone(), p.changes.changed.clone()),
            };
            let after = after_pass(planner, &previous, &changed, Some("n1"));
            let out = Out {
                diagnostics,
                tables: planner.tables().into_iter().cloned().collect(),
                stale: after.stale_udp,
                counts: (after.service_changes, after.endpoint_changes),
                endpoints: after.endpoints,
                checks: after.health_checks,
            };
            (out, all)
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
            #[test]
            fn an_incremental_pass_plans_what_a_full_pass_plans(
                ops in proptest::collection::vec(op(), 1..20)
            ) {
                let mut w = World::new();
                let mut planner = TablePlanner::default();
                let all = ferry_model::view::Changed::All;
                // A new planner resolves everything at first, whatever it is told.
                let (_, mut before) =
                    pass(&mut planner, &w, None, ferry_model::view::Changed::none());
                for op in &ops {
                    let old = w.snap.clone();
                    w.apply(op);
                    if matches!(op, Op::Resync) {
                        planner.distrust();
                    }
                    // Told only what changed, as the API source tells it.
                    let named = named_between(&old, &w.snap);
                    let (inc, now) = pass(&mut planner, &w, None, named);
                    let (full, _) =
                        pass(&mut TablePlanner::default(), &w, Some(&before), all.clone());
                    prop_assert!(inc.tables == full.tables, "tables differ after {:?}", op);
                    prop_assert_eq!(inc.stale, full.stale, "UDP flushes after {:?}", op);
                    prop_assert_eq!(inc.counts, full.counts, "counts after {:?}", op);
                    prop_assert_eq!(inc.endpoints, full.endpoints);
                    prop_assert_eq!(inc.checks, full.checks);
                    prop_assert_eq!(inc.diagnostics, full.diagnostics);
                    before = now;
                }
            }
        }
    }

    #[test]
    fn nft_shards_flag() {
        let base = ["--node", "n1", "--manifests", "/tmp"];
        let with = |extra: &[&str]| {
            let mut v: Vec<&str> = base.to_vec();
            v.extend_from_slice(extra);
            parse(&v)
        };
        assert_eq!(with(&[]).unwrap().nft_shards, 0, "automatic by default");
        assert_eq!(with(&["--nft-shards", "4"]).unwrap().nft_shards, 4);
        assert!(with(&["--nft-shards", "257"]).is_err());
        assert!(with(&["--nft-shards", "-1"]).is_err());
    }
}

#[cfg(test)]
#[path = "agent_pass_bench.rs"]
mod pass_bench;
