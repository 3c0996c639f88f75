//! The layer-2 election (pure): for every load-balancer address, which node answers ARP/NDP.
//!
//! Every agent runs the same deterministic election over the same inputs (the cluster's Node
//! objects, the load-balancer allocations, and its view of who is alive), so they agree without
//! exchanging messages about addresses. A node announces only while it hears from a majority of
//! the cluster's nodes, so in a partition at most one side announces an address.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ferry_member::{election, quorum};
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
                .filter_map(|e| e.node.as_deref().map(str::to_string))
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
