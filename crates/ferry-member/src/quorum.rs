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

use std::collections::BTreeSet;

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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
