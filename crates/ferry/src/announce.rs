//! Layer-2 announcement of LoadBalancer addresses: which node answers ARP/NDP for which
//! address ([`decide`], pure), and the I/O that makes it so ([`Announcer`]: SWIM membership,
//! raw-socket responders, a status file for `ferry get svc -o wide`).
//!
//! Every agent runs the same deterministic election over the same inputs (the cluster's Node
//! objects, the allocations in the shared state, and its SWIM view of who is alive), so they
//! agree without exchanging messages about addresses. A node announces only while it hears from
//! a majority of the cluster's nodes (a short lease, shorter than the time the others take to
//! declare it dead), so in a partition at most one side announces an address.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_member::{election, quorum, MemberConfig, Membership};
use ferry_model::pools::PoolConfig;
use ferry_model::view::ResolvedService;
use ferry_model::{Node, TrafficPolicy};

/// Everything the election reads.
pub struct L2Input<'a> {
    pub me: &'a str,
    pub nodes: &'a [Node],
    /// Nodes the membership layer considers alive (including this one).
    pub alive: &'a BTreeSet<String>,
    /// Nodes heard from within the quorum lease (including this one).
    pub lease: &'a BTreeSet<String>,
    pub pools: &'a PoolConfig,
    /// The load-balancer addresses in use.
    pub addresses: &'a [LbAddress],
}

/// A service's load-balancer addresses, as the election needs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbAddress {
    pub ips: Vec<IpAddr>,
    /// With externalTrafficPolicy Local: the nodes that hold a ready endpoint (only they may
    /// announce). None: any node.
    pub local_nodes: Option<BTreeSet<String>>,
}

impl LbAddress {
    /// From an allocation and, when resolved, the service's endpoints.
    pub fn of(ips: Vec<IpAddr>, policy: TrafficPolicy, svc: Option<&ResolvedService>) -> LbAddress {
        let local_nodes = (policy == TrafficPolicy::Local).then(|| {
            svc.into_iter()
                .flat_map(|s| s.ports.iter())
                .flat_map(|p| p.endpoints.iter())
                .filter(|e| e.ready)
                .filter_map(|e| e.node.clone())
                .collect()
        });
        LbAddress { ips, local_nodes }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct L2Decision {
    /// Interface ("" = the interface of the node's address) -> addresses this node answers for.
    pub owned: BTreeMap<String, BTreeSet<IpAddr>>,
    /// Whether this node hears a majority of the cluster.
    pub quorum: bool,
    /// Address -> the elected node (None: no eligible node).
    pub winners: BTreeMap<IpAddr, Option<String>>,
}

/// Decides, for every layer-2 load-balancer address, which node announces it.
///
/// Eligible nodes for an address: alive, selected by an L2Advertisement that covers the
/// address's pool, and — when a service on it has externalTrafficPolicy Local — holding a ready
/// endpoint of that service. The winner is the first in the election's preference order.
pub fn decide(inp: &L2Input) -> L2Decision {
    let names: Vec<String> = inp.nodes.iter().map(|n| n.meta.name.clone()).collect();
    // With no Node objects at all (a single machine), this node is the cluster.
    let cluster: BTreeSet<String> = if names.is_empty() {
        [inp.me.to_string()].into()
    } else {
        names.into_iter().collect()
    };
    let quorum_ok = quorum::has_quorum_of(inp.lease, &cluster);
    let labels_of = |name: &str| {
        inp.nodes
            .iter()
            .find(|n| n.meta.name == name)
            .map(|n| n.meta.labels.clone())
            .unwrap_or_default()
    };

    // Address -> (pool, nodes with a local endpoint if some service on it is Local).
    let mut addrs: BTreeMap<IpAddr, (String, Option<BTreeSet<String>>)> = BTreeMap::new();
    for a in inp.addresses {
        for ip in &a.ips {
            let Some(pool) = inp.pools.pool_of(*ip) else {
                continue;
            };
            let entry = addrs
                .entry(*ip)
                .or_insert_with(|| (pool.name.clone(), None));
            if let Some(local) = &a.local_nodes {
                entry.1 = Some(match entry.1.take() {
                    Some(prev) => prev.intersection(local).cloned().collect(),
                    None => local.clone(),
                });
            }
        }
    }

    let mut out = L2Decision {
        quorum: quorum_ok,
        ..L2Decision::default()
    };
    for (ip, (pool, local)) in addrs {
        let eligible: Vec<&str> = cluster
            .iter()
            .filter(|n| inp.alive.contains(*n))
            .filter(|n| inp.pools.l2_announcers(&pool, &labels_of(n)).is_some())
            .filter(|n| local.as_ref().is_none_or(|l| l.contains(*n)))
            .map(String::as_str)
            .collect();
        let key = ip.to_string();
        let winner = election::elect(&key, &eligible).map(str::to_string);
        if quorum_ok && winner.as_deref() == Some(inp.me) {
            let ifaces = inp
                .pools
                .l2_announcers(&pool, &labels_of(inp.me))
                .unwrap_or_default();
            if ifaces.is_empty() {
                out.owned.entry(String::new()).or_default().insert(ip);
            } else {
                for i in ifaces {
                    out.owned.entry(i).or_default().insert(ip);
                }
            }
        }
        out.winners.insert(ip, winner);
    }
    out
}

/// How long a node that has just gained a majority waits before taking addresses over.
pub const HOLD_DOWN: Duration = Duration::from_millis(1000);

/// How long a holder keeps an address after its new winner came back (a little less than
/// [`HOLD_DOWN`], so the two never answer at once and the gap stays short).
pub const HAND_OVER: Duration = Duration::from_millis(600);

/// The I/O side: membership, responders, status file.
pub struct Announcer {
    me: String,
    port: u16,
    membership: Option<(IpAddr, Membership)>,
    /// Membership changes, to wake up at once.
    events: Option<std::sync::mpsc::Receiver<BTreeSet<String>>>,
    responders: BTreeMap<String, ferry_l2::Responder>,
    owned: BTreeMap<String, BTreeSet<IpAddr>>,
    quorum: Option<bool>,
    /// Since when this node has heard a majority (None: it does not).
    quorum_since: Option<Instant>,
    /// Since when each node has been alive in our view.
    alive_since: BTreeMap<String, Instant>,
    status_file: PathBuf,
    status_written: Option<Instant>,
}

impl Announcer {
    pub fn new(me: &str, port: u16, status_dir: PathBuf) -> Announcer {
        let _ = std::fs::create_dir_all(&status_dir);
        Announcer {
            me: me.to_string(),
            port,
            membership: None,
            events: None,
            responders: BTreeMap::new(),
            owned: BTreeMap::new(),
            quorum: None,
            quorum_since: None,
            alive_since: BTreeMap::new(),
            status_file: status_dir.join(format!("{me}.json")),
            status_written: None,
        }
    }

    /// Starts (or restarts, when this node's address changed) the membership layer, seeded
    /// with the other nodes' addresses.
    pub fn ensure_membership(&mut self, my_ip: Option<IpAddr>, nodes: &[Node]) {
        let Some(ip) = my_ip else { return };
        let seeds: Vec<SocketAddr> = nodes
            .iter()
            .filter(|n| n.meta.name != self.me)
            .filter_map(|n| {
                n.internal_ips()
                    .into_iter()
                    .find(|a| a.is_ipv4() == ip.is_ipv4())
            })
            .map(|a| SocketAddr::new(a, self.port))
            .collect();
        match &self.membership {
            Some((bound, m)) if *bound == ip => {
                m.set_seeds(seeds);
                return;
            }
            _ => {}
        }
        if let Some((_, m)) = self.membership.take() {
            m.stop();
        }
        let mut cfg = MemberConfig::new(self.me.clone(), SocketAddr::new(ip, self.port));
        cfg.seeds = seeds;
        // LAN timings for sub-second failover: a dead node is suspected after a missed 25 ms
        // ack and declared down 100 ms later; heartbeats every 20 ms keep the quorum lease
        // (3/5 of the earliest takeover, ~80 ms) well fed.
        cfg.probe_period = Duration::from_millis(60);
        cfg.probe_rtt = Duration::from_millis(25);
        cfg.suspect_to_down_after = Duration::from_millis(100);
        cfg.gossip_period = Duration::from_millis(30);
        cfg.heartbeat_period = Some(Duration::from_millis(20));
        match Membership::start(cfg) {
            Ok(m) => {
                log!("membership: gossiping on {ip}:{} (SWIM)", self.port);
                self.events = Some(m.subscribe());
                self.membership = Some((ip, m));
            }
            Err(e) => log!("error: membership on {ip}:{}: {e}", self.port),
        }
    }

    /// (alive, lease) views; without membership, only this node.
    pub fn views(&mut self) -> (BTreeSet<String>, BTreeSet<String>) {
        let (alive, lease) = self.current_views();
        let now = Instant::now();
        self.alive_since.retain(|n, _| alive.contains(n));
        for n in &alive {
            self.alive_since.entry(n.clone()).or_insert(now);
        }
        (alive, lease)
    }

    fn current_views(&self) -> (BTreeSet<String>, BTreeSet<String>) {
        match &self.membership {
            Some((_, m)) => {
                let mut alive = m.alive();
                alive.insert(self.me.clone());
                let mut lease = m.lease_view();
                lease.insert(self.me.clone());
                (alive, lease)
            }
            None => {
                let me: BTreeSet<String> = [self.me.clone()].into();
                (me.clone(), me)
            }
        }
    }

    /// Waits `timeout`, or less when membership changes.
    pub fn wait(&self, timeout: Duration) {
        match &self.events {
            Some(rx) => {
                if let Err(std::sync::mpsc::RecvTimeoutError::Disconnected) =
                    rx.recv_timeout(timeout)
                {
                    std::thread::sleep(timeout);
                }
            }
            None => std::thread::sleep(timeout),
        }
    }

    /// Applies a decision: responders answer for exactly the owned addresses.
    ///
    /// A node that has just (re)joined a majority waits [`HOLD_DOWN`] before claiming an
    /// address it does not hold: the current holder needs that long to see it back and let go,
    /// so a healing partition or a restarted agent never makes two nodes answer at once.
    pub fn apply(&mut self, d: &L2Decision, default_iface: Option<&str>) {
        match (d.quorum, self.quorum_since) {
            (true, None) => self.quorum_since = Some(Instant::now()),
            (false, Some(_)) => self.quorum_since = None,
            _ => {}
        }
        let settled = self.quorum_since.is_some_and(|t| t.elapsed() >= HOLD_DOWN);
        if self.quorum != Some(d.quorum) {
            if d.quorum {
                log!("membership: this node hears a majority of the cluster");
            } else {
                log!("membership: this node does not hear a majority of the cluster: it announces nothing");
            }
            self.quorum = Some(d.quorum);
        }
        let mut want: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
        for (iface, ips) in &d.owned {
            let name = if iface.is_empty() {
                match default_iface {
                    Some(n) => n.to_string(),
                    None => {
                        log!("error: no interface holds this node's address; cannot announce {ips:?}");
                        continue;
                    }
                }
            } else {
                iface.clone()
            };
            let held = self.owned.get(&name).cloned().unwrap_or_default();
            want.entry(name).or_default().extend(
                ips.iter()
                    .copied()
                    .filter(|ip| settled || held.contains(ip)),
            );
        }
        // Hand-over: an address we hold whose new winner has only just come back stays with us
        // until shortly before that node's hold-down ends, so that somebody always answers.
        if d.quorum {
            for (iface, held) in &self.owned {
                for ip in held {
                    let newcomer = match d.winners.get(ip) {
                        Some(Some(w)) if *w != self.me => self
                            .alive_since
                            .get(w)
                            .is_some_and(|t| t.elapsed() < HAND_OVER),
                        _ => false,
                    };
                    if newcomer {
                        want.entry(iface.clone()).or_default().insert(*ip);
                    }
                }
            }
        }
        let mut changed = false;
        let ifaces: BTreeSet<String> = want.keys().chain(self.owned.keys()).cloned().collect();
        for iface in ifaces {
            let new = want.get(&iface).cloned().unwrap_or_default();
            let old = self.owned.get(&iface).cloned().unwrap_or_default();
            if new == old {
                continue;
            }
            for ip in new.difference(&old) {
                log!("announcing {ip} on {iface}");
            }
            for ip in old.difference(&new) {
                log!("withdrawing {ip} from {iface}");
            }
            changed = true;
            if !self.responders.contains_key(&iface) {
                match ferry_l2::Responder::start(&iface) {
                    Ok(r) => {
                        self.responders.insert(iface.clone(), r);
                    }
                    Err(e) => {
                        log!("error: cannot answer ARP/NDP on {iface}: {e}");
                        continue;
                    }
                }
            }
            if let Some(r) = self.responders.get(&iface) {
                r.set_owned(new.clone());
            }
            if new.is_empty() {
                self.owned.remove(&iface);
            } else {
                self.owned.insert(iface, new);
            }
        }
        self.write_status(changed);
    }

    /// `announcements/<node>.json`: what this node announces, refreshed every second so that
    /// readers can tell a live claim from a dead agent's leftovers.
    fn write_status(&mut self, force: bool) {
        if !force
            && self
                .status_written
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        let ips: BTreeSet<String> = self
            .owned
            .values()
            .flatten()
            .map(|i| i.to_string())
            .collect();
        let body = serde_json::json!({ "node": self.me, "addresses": ips });
        let tmp = self.status_file.with_extension("tmp");
        if std::fs::write(&tmp, body.to_string()).is_ok() {
            let _ = std::fs::rename(&tmp, &self.status_file);
        }
        self.status_written = Some(Instant::now());
    }

    /// Stops answering (agent shutdown): the other nodes take over when they see this one leave.
    pub fn shutdown(mut self) {
        for (iface, ips) in std::mem::take(&mut self.owned) {
            for ip in ips {
                log!("withdrawing {ip} from {iface}");
            }
        }
        for (_, r) in std::mem::take(&mut self.responders) {
            r.set_owned(BTreeSet::new());
            r.stop();
        }
        let _ = std::fs::remove_file(&self.status_file);
        if let Some((_, m)) = self.membership.take() {
            m.stop();
        }
    }
}

/// Which nodes announce which addresses, from the agents' status files (those refreshed in the
/// last 3 seconds: agents rewrite theirs every second and at every change).
pub fn read_announcers(dir: &std::path::Path) -> BTreeMap<IpAddr, Vec<String>> {
    let mut out: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        let fresh = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age < Duration::from_secs(3));
        if !fresh {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let node = v["node"].as_str().unwrap_or_default().to_string();
        for a in v["addresses"].as_array().into_iter().flatten() {
            if let Some(ip) = a.as_str().and_then(|s| s.parse().ok()) {
                out.entry(ip).or_default().push(node.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::{ConfigMap, Meta, NodeAddress};
    use proptest::prelude::*;

    const SEED_POOL: &str = "address-pools:\n- name: default\n  protocol: layer2\n  addresses:\n  - 192.168.2.200-192.168.2.225\n";

    fn pools() -> PoolConfig {
        let cm = ConfigMap {
            meta: Meta {
                name: "config".into(),
                namespace: "metallb-system".into(),
                ..Meta::default()
            },
            data: [("config".to_string(), SEED_POOL.to_string())].into(),
        };
        let (p, errs) = ferry_model::pools::load(&[cm], &[], &[]);
        assert!(errs.is_empty(), "{errs:?}");
        p
    }

    fn nodes(n: usize) -> Vec<Node> {
        (0..n)
            .map(|i| Node {
                meta: Meta {
                    name: format!("node-{i}"),
                    ..Meta::default()
                },
                addresses: vec![NodeAddress {
                    type_: "InternalIP".into(),
                    address: format!("192.168.2.{}", 11 + i),
                }],
                pod_cidrs: vec![],
            })
            .collect()
    }

    fn addrs(k: usize) -> Vec<LbAddress> {
        (0..k)
            .map(|i| LbAddress {
                ips: vec![format!("192.168.2.{}", 200 + i).parse().unwrap()],
                local_nodes: None,
            })
            .collect()
    }

    fn decide_for(
        me: &str,
        nodes: &[Node],
        alive: &BTreeSet<String>,
        a: &[LbAddress],
    ) -> L2Decision {
        let p = pools();
        decide(&L2Input {
            me,
            nodes,
            alive,
            lease: alive,
            pools: &p,
            addresses: a,
        })
    }

    fn owned(d: &L2Decision) -> BTreeSet<IpAddr> {
        d.owned.values().flatten().copied().collect()
    }

    #[test]
    fn every_address_has_exactly_one_owner_and_all_agree() {
        let ns = nodes(3);
        let all: BTreeSet<String> = ns.iter().map(|n| n.meta.name.clone()).collect();
        let a = addrs(20);
        let mut seen: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
        for n in &all {
            let d = decide_for(n, &ns, &all, &a);
            assert!(d.quorum);
            for ip in owned(&d) {
                seen.entry(ip).or_default().push(n.clone());
            }
        }
        assert_eq!(seen.len(), 20);
        assert!(seen.values().all(|o| o.len() == 1), "{seen:?}");
        // Spread over more than one node.
        let owners: BTreeSet<&String> = seen.values().flatten().collect();
        assert!(owners.len() > 1);
    }

    #[test]
    fn a_minority_announces_nothing_and_the_majority_takes_over() {
        let ns = nodes(3);
        let a = addrs(10);
        // node-0 cut off: it sees only itself; the others see each other.
        let alone: BTreeSet<String> = ["node-0".to_string()].into();
        let rest: BTreeSet<String> = ["node-1".to_string(), "node-2".to_string()].into();
        let d0 = decide_for("node-0", &ns, &alone, &a);
        assert!(!d0.quorum);
        assert!(owned(&d0).is_empty());
        let mut union = BTreeSet::new();
        for n in ["node-1", "node-2"] {
            let d = decide_for(n, &ns, &rest, &a);
            assert!(d.quorum);
            let o = owned(&d);
            assert!(union.is_disjoint(&o));
            union.extend(o);
        }
        assert_eq!(union.len(), 10, "the majority covers every address");
        // An even split: nobody announces.
        let ns4 = nodes(4);
        let half: BTreeSet<String> = ["node-0".to_string(), "node-1".to_string()].into();
        assert!(owned(&decide_for("node-0", &ns4, &half, &a)).is_empty());
    }

    #[test]
    fn external_traffic_policy_local_picks_only_nodes_with_local_endpoints() {
        let ns = nodes(3);
        let all: BTreeSet<String> = ns.iter().map(|n| n.meta.name.clone()).collect();
        let a: Vec<LbAddress> = (0..10)
            .map(|i| LbAddress {
                ips: vec![format!("192.168.2.{}", 200 + i).parse().unwrap()],
                local_nodes: Some(["node-2".to_string()].into()),
            })
            .collect();
        assert_eq!(owned(&decide_for("node-2", &ns, &all, &a)).len(), 10);
        assert!(owned(&decide_for("node-0", &ns, &all, &a)).is_empty());
        // No local endpoint anywhere: nobody.
        let none: Vec<LbAddress> = vec![LbAddress {
            ips: vec!["192.168.2.200".parse().unwrap()],
            local_nodes: Some(BTreeSet::new()),
        }];
        for n in &all {
            assert!(owned(&decide_for(n, &ns, &all, &none)).is_empty());
        }
    }

    #[test]
    fn addresses_outside_pools_are_not_announced() {
        let ns = nodes(1);
        let all: BTreeSet<String> = ["node-0".to_string()].into();
        let a = vec![LbAddress {
            ips: vec!["10.9.9.9".parse().unwrap()],
            local_nodes: None,
        }];
        assert!(owned(&decide_for("node-0", &ns, &all, &a)).is_empty());
    }

    proptest! {
        /// Nodes that share a view of who is alive agree: every address has exactly one owner
        /// when they are a majority, and none otherwise.
        #[test]
        fn identical_views_never_collide(n in 1usize..7, alive_mask in 0u32..128, k in 1usize..26) {
            let ns = nodes(n);
            let alive: BTreeSet<String> = ns.iter().enumerate()
                .filter(|(i, _)| alive_mask & (1 << i) != 0)
                .map(|(_, x)| x.meta.name.clone()).collect();
            let a = addrs(k);
            let mut seen: BTreeMap<IpAddr, usize> = BTreeMap::new();
            for me in &alive {
                for ip in owned(&decide_for(me, &ns, &alive, &a)) {
                    *seen.entry(ip).or_default() += 1;
                }
            }
            prop_assert!(seen.values().all(|c| *c == 1));
            let quorum = alive.len() * 2 > n;
            prop_assert_eq!(seen.len(), if quorum && !alive.is_empty() { k } else { 0 });
        }
    }
}
