//! The majority rule (pure): a node announces addresses only while it sees a strict majority of
//! the cluster.
//!
//! `cluster_size` is the number of nodes the cluster has, taken from its Node objects (what the
//! API server says), never from gossip: gossip only tells who this node can currently reach, and
//! a node cut off from everyone would otherwise conclude that it alone is the whole cluster.
//!
//! # Why this prevents two nodes answering for one address
//!
//! In a partition, nodes split into groups that cannot reach each other. Two disjoint groups
//! cannot both hold more than half of the same `cluster_size` nodes (a + b <= n and a, b > n/2
//! would give a + b > n), so at most one group has a majority. Only that group keeps announcing,
//! and inside it [`crate::election::elect`] over the same alive set gives every member the same
//! winner for an address. The nodes of every other group see less than a majority and stop
//! announcing everything, including the addresses they were answering for until then.
//!
//! With an even split (2 of 4, say) neither side has a majority and **no one** announces: a
//! deliberate trade-off of availability for safety. Two answering nodes for one IP (flapping ARP
//! caches, half of the clients on the wrong node, broken connections) is worse than a short,
//! visible outage; odd cluster sizes avoid the tie.
//!
//! # Timing
//!
//! The rule is exact about views, not about clocks. A node that gets cut off keeps its old view
//! until its failure detector notices, while the majority declares it down after roughly
//! `probe_period + suspect_to_down_after`. The holder of an address must therefore give up
//! *before* the majority can take over: keep announcing only while a majority was **heard from
//! recently** ([`crate::Membership::heard_within`] with a lease shorter than the takeover time,
//! see [`crate::MemberConfig::quorum_lease`]), and take an address over only when its previous
//! holder has been declared down ([`crate::Membership::alive`]).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// True when `alive_including_self` nodes are a strict majority of `cluster_size`.
///
/// A cluster of size 0 (no Node objects known yet) has no quorum.
pub fn has_quorum(alive_including_self: usize, cluster_size: usize) -> bool {
    cluster_size > 0 && alive_including_self > cluster_size / 2
}

/// [`has_quorum`] counting only the alive nodes that are also cluster nodes (a gossip member
/// whose Node object is gone does not count, nor does one the API server does not know yet).
pub fn has_quorum_of(alive: &BTreeSet<String>, cluster_nodes: &BTreeSet<String>) -> bool {
    has_quorum(
        alive.intersection(cluster_nodes).count(),
        cluster_nodes.len(),
    )
}

/// Until when a node keeps its majority if it hears nothing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuorumLease {
    /// No majority now.
    Lost,
    /// A majority of the cluster was heard from recently enough; it lapses at this instant
    /// unless more is heard.
    Until(Instant),
    /// This node alone is a majority (a one-node cluster): nothing to hear from.
    Unbounded,
}

/// The moment this node's majority lapses if it hears nothing more: the node counts itself
/// (when it is a cluster node) and every other cluster node heard from within `lease`;
/// `last_heard` holds when each peer was last heard from. The result is the `k`-th most recent
/// of those times plus `lease`, with `k` the number of other nodes a majority needs.
///
/// This is [`has_quorum_of`] over [`crate::Membership::heard_within`]`(lease)` turned into a
/// deadline, so a responder can check it before every answer without asking anyone.
pub fn quorum_lease(
    me: &str,
    last_heard: &BTreeMap<String, Instant>,
    cluster_nodes: &BTreeSet<String>,
    lease: Duration,
    now: Instant,
) -> QuorumLease {
    let n = cluster_nodes.len();
    if n == 0 {
        return QuorumLease::Lost;
    }
    let me_counts = usize::from(cluster_nodes.contains(me));
    let needed = (n / 2 + 1).saturating_sub(me_counts);
    if needed == 0 {
        return QuorumLease::Unbounded;
    }
    let mut expiries: Vec<Instant> = last_heard
        .iter()
        .filter(|(name, _)| name.as_str() != me && cluster_nodes.contains(name.as_str()))
        .map(|(_, t)| *t + lease)
        .filter(|until| *until > now)
        .collect();
    if expiries.len() < needed {
        return QuorumLease::Lost;
    }
    expiries.sort_unstable_by(|a, b| b.cmp(a));
    QuorumLease::Until(expiries[needed - 1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn lease_is_the_kth_most_recent_hearing_plus_the_lease() {
        let t0 = Instant::now();
        let lease = Duration::from_millis(80);
        let cluster: BTreeSet<String> = ["a", "b", "c", "d", "e"].map(String::from).into();
        let heard: BTreeMap<String, Instant> = [
            ("b".to_string(), ms(t0, 100)),
            ("c".to_string(), ms(t0, 90)),
            ("d".to_string(), ms(t0, 50)),
            ("x".to_string(), ms(t0, 120)),
        ]
        .into();
        // a + 2 others of 5: the 2nd most recent cluster peer (c at 90) + 80.
        assert_eq!(
            quorum_lease("a", &heard, &cluster, lease, ms(t0, 100)),
            QuorumLease::Until(ms(t0, 170))
        );
        // At 170, c's hearing is too old: b and d? d expired at 130: lost.
        assert_eq!(
            quorum_lease("a", &heard, &cluster, lease, ms(t0, 170)),
            QuorumLease::Lost
        );
        // A one-node cluster, and a node that is not a cluster node.
        let one: BTreeSet<String> = ["a".to_string()].into();
        assert_eq!(
            quorum_lease("a", &heard, &one, lease, t0),
            QuorumLease::Unbounded
        );
        assert_eq!(
            quorum_lease("z", &BTreeMap::new(), &one, lease, t0),
            QuorumLease::Lost
        );
        assert_eq!(
            quorum_lease("a", &heard, &BTreeSet::new(), lease, t0),
            QuorumLease::Lost
        );
    }

    proptest! {
        /// The deadline agrees with counting who was heard within the lease, at every instant
        /// before it (quorum) and at it (none).
        #[test]
        fn lease_agrees_with_counting(
            n in 1usize..8,
            heard_ms in proptest::collection::vec(proptest::option::of(0u64..300), 8),
            now_ms in 0u64..400,
            probe_ms in 0u64..500,
        ) {
            let t0 = Instant::now();
            let lease = Duration::from_millis(80);
            let names: Vec<String> = (0..n).map(|i| format!("n{i}")).collect();
            let cluster: BTreeSet<String> = names.iter().cloned().collect();
            let heard: BTreeMap<String, Instant> = names.iter().zip(&heard_ms)
                .skip(1)
                .filter_map(|(name, h)| h.filter(|h| *h <= now_ms).map(|h| (name.clone(), ms(t0, h))))
                .collect();
            let count_at = |at: Instant| {
                let mut view: BTreeSet<String> = heard.iter()
                    .filter(|(_, t)| **t + lease > at)
                    .map(|(n, _)| n.clone()).collect();
                view.insert(names[0].clone());
                has_quorum_of(&view, &cluster)
            };
            let now = ms(t0, now_ms);
            let probe = ms(t0, now_ms + probe_ms);
            match quorum_lease(&names[0], &heard, &cluster, lease, now) {
                QuorumLease::Lost => prop_assert!(!count_at(now)),
                QuorumLease::Unbounded => prop_assert!(count_at(probe)),
                QuorumLease::Until(t) => {
                    prop_assert!(count_at(now));
                    prop_assert_eq!(count_at(probe), probe < t);
                }
            }
        }
    }

    #[test]
    fn small_clusters() {
        assert!(!has_quorum(0, 0));
        assert!(!has_quorum(1, 0));
        assert!(has_quorum(1, 1));
        // Two nodes: both must be up.
        assert!(!has_quorum(1, 2));
        assert!(has_quorum(2, 2));
        // Three nodes: two of three.
        assert!(!has_quorum(1, 3));
        assert!(has_quorum(2, 3));
        // Four nodes: an even split has no majority.
        assert!(!has_quorum(2, 4));
        assert!(has_quorum(3, 4));
        assert!(has_quorum(3, 5));
        assert!(!has_quorum(2, 5));
    }

    #[test]
    fn disjoint_groups_never_both_have_quorum() {
        for n in 0..200 {
            for a in 0..=n {
                for b in 0..=(n - a) {
                    assert!(!(has_quorum(a, n) && has_quorum(b, n)), "n={n} a={a} b={b}");
                }
            }
        }
    }

    #[test]
    fn majority_with_unknown_members() {
        let nodes: BTreeSet<String> = ["a", "b", "c"].map(String::from).into();
        let alive: BTreeSet<String> = ["a", "x", "y"].map(String::from).into();
        // x and y are not cluster nodes: a alone is 1 of 3.
        assert!(!has_quorum_of(&alive, &nodes));
        let alive: BTreeSet<String> = ["a", "c"].map(String::from).into();
        assert!(has_quorum_of(&alive, &nodes));
    }

    proptest! {
        #[test]
        fn any_partition_has_at_most_one_majority(sizes in proptest::collection::vec(0usize..20, 1..6)) {
            let n: usize = sizes.iter().sum();
            let majorities = sizes.iter().filter(|s| has_quorum(**s, n)).count();
            prop_assert!(majorities <= 1);
            // And an unsplit cluster always has one.
            prop_assert_eq!(has_quorum(n, n), n > 0);
        }
    }
}
