//! Which node answers for an address (pure, no messages).
//!
//! Every agent ranks the eligible nodes for a key (a LoadBalancer IP, say) by a stable hash of
//! `node + "#" + key` and takes the first. Given the same set of eligible nodes, every agent
//! reaches the same answer without talking to anyone; different keys land on different nodes, so
//! addresses spread over the cluster; and removing a node only moves the keys it was winning
//! (the relative order of the others does not change: this is rendezvous / highest-random-weight
//! hashing, as MetalLB does it with sha256).
//!
//! The hash is FNV-1a 64 over the bytes of `node`, `#` and `key`, followed by the SplitMix64
//! finalizer (FNV alone mixes the last bytes poorly, and node names often differ only there).
//! It is part of the wire contract: all agents of a cluster must use the same function, so it
//! must never change without a coordinated upgrade. Ties (equal hashes) are broken by the node
//! name, so the order is total.

/// The stable rank of `node` for `key`: lower ranks are preferred.
pub fn rank(node: &str, key: &str) -> u64 {
    use std::hash::Hasher;
    let mut f = fnv::FnvHasher::default();
    f.write(node.as_bytes());
    f.write(b"#");
    f.write(key.as_bytes());
    let mut h = f.finish();
    // SplitMix64 finalizer: full avalanche.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The eligible nodes for `key`, most preferred first. Duplicates are removed; the result does
/// not depend on the order of `eligible`.
pub fn preference_order<'a>(key: &str, eligible: &[&'a str]) -> Vec<&'a str> {
    let mut ranked: Vec<(u64, &'a str)> = eligible.iter().map(|n| (rank(n, key), *n)).collect();
    ranked.sort_unstable();
    ranked.dedup();
    ranked.into_iter().map(|(_, n)| n).collect()
}

/// The node that answers for `key` among `eligible` (None when there is none): the first of
/// [`preference_order`].
pub fn elect<'a>(key: &str, eligible: &[&'a str]) -> Option<&'a str> {
    eligible
        .iter()
        .map(|n| (rank(n, key), *n))
        .min()
        .map(|(_, n)| n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn names() -> impl Strategy<Value = Vec<String>> {
        proptest::collection::vec("[a-z][a-z0-9-]{0,12}", 1..12)
    }

    #[test]
    fn empty_has_no_winner() {
        assert_eq!(elect("10.0.0.1", &[]), None);
        assert!(preference_order("10.0.0.1", &[]).is_empty());
    }

    #[test]
    fn rank_is_stable() {
        // Pinned values: the function is part of the cluster-wide contract.
        assert_ne!(rank("node-a", "10.0.0.1"), rank("node-b", "10.0.0.1"));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(rank("ab", "c"), rank("a", "bc"));
        assert_eq!(rank("node-a", "10.0.0.1"), 0xa652_2712_df3b_99b5);
        assert_eq!(rank("node-b", "10.0.0.1"), 0xda78_6de8_5fe1_b6b3);
    }

    #[test]
    fn duplicates_are_removed() {
        let order = preference_order("k", &["a", "b", "a", "c", "b"]);
        assert_eq!(order.len(), 3);
        assert_eq!(Some(order[0]), elect("k", &["a", "b", "a", "c", "b"]));
    }

    #[test]
    fn spreads_keys_uniformly() {
        let nodes = ["node-1", "node-2", "node-3", "node-4", "node-5"];
        let keys = 20_000;
        let mut wins: BTreeMap<&str, usize> = BTreeMap::new();
        for i in 0..keys {
            let key = format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256);
            *wins
                .entry(elect(&key, &nodes).expect("non-empty"))
                .or_default() += 1;
        }
        let expected = keys / nodes.len();
        for n in nodes {
            let got = wins.get(n).copied().unwrap_or(0);
            // 4000 expected; a binomial standard deviation is ~57, allow ~5%.
            assert!(
                got.abs_diff(expected) < expected / 20,
                "{n}: {got} of {keys} ({wins:?})"
            );
        }
    }

    #[test]
    fn similar_names_spread_too() {
        // Names that differ only in their last byte must not all favour one node.
        let nodes: Vec<String> = (0..10).map(|i| format!("worker{i}")).collect();
        let refs: Vec<&str> = nodes.iter().map(String::as_str).collect();
        let mut wins: BTreeMap<&str, usize> = BTreeMap::new();
        for i in 0..10_000 {
            let key = format!("192.168.{}.{}", i / 256, i % 256);
            *wins
                .entry(elect(&key, &refs).expect("non-empty"))
                .or_default() += 1;
        }
        assert_eq!(wins.len(), 10);
        for (n, got) in &wins {
            assert!(got.abs_diff(1000) < 150, "{n}: {got} ({wins:?})");
        }
    }

    proptest! {
        #[test]
        fn independent_of_input_order(mut nodes in names(), key in "[0-9.:a-f]{1,20}", seed in any::<u64>()) {
            let refs: Vec<&str> = nodes.iter().map(String::as_str).collect();
            let winner = elect(&key, &refs).map(str::to_string);
            let order: Vec<String> = preference_order(&key, &refs).into_iter().map(str::to_string).collect();
            // A deterministic shuffle driven by the seed.
            let len = nodes.len();
            let mut s = seed;
            for i in (1..len).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                nodes.swap(i, (s >> 33) as usize % (i + 1));
            }
            let refs: Vec<&str> = nodes.iter().map(String::as_str).collect();
            prop_assert_eq!(elect(&key, &refs).map(str::to_string), winner.clone());
            let order2: Vec<String> = preference_order(&key, &refs).into_iter().map(str::to_string).collect();
            prop_assert_eq!(&order2, &order);
            prop_assert_eq!(order.first().cloned(), winner);
        }

        #[test]
        fn removing_a_non_winner_keeps_the_winner(nodes in names(), key in "[0-9.]{1,15}", pick in any::<usize>()) {
            let refs: Vec<&str> = nodes.iter().map(String::as_str).collect();
            let winner = elect(&key, &refs).expect("non-empty");
            let victim = refs[pick % refs.len()];
            prop_assume!(victim != winner);
            let rest: Vec<&str> = refs.iter().copied().filter(|n| *n != victim).collect();
            prop_assert_eq!(elect(&key, &rest), Some(winner));
        }

        #[test]
        fn removing_the_winner_promotes_the_runner_up(nodes in names(), key in "[0-9.]{1,15}") {
            let refs: Vec<&str> = nodes.iter().map(String::as_str).collect();
            let order = preference_order(&key, &refs);
            let rest: Vec<&str> = refs.iter().copied().filter(|n| *n != order[0]).collect();
            prop_assert_eq!(elect(&key, &rest), order.get(1).copied());
            // And the rest of the order is unchanged.
            prop_assert_eq!(preference_order(&key, &rest), order[1..].to_vec());
        }
    }
}
