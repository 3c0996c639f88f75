//! [`Tables`]: ferry's tables as one dataplane. Pure: how a large change is cut into bounded
//! transactions ([`transactions`]). In the kernel (root, a network namespace per test): a
//! sharded layout loaded in chunks reads back as planned, a change is one transaction, another
//! shard count deletes the tables no longer used and never another's, cleanup removes them all.
//!
//! The kernel tests print a `ferry-test-skipped:` line and pass when not root, unless the
//! environment variable CI is set: then they fail.

#[path = "../../ferry-plan/tests/common/mod.rs"]
mod common;

mod netns;
use netns::Netns;

use std::collections::BTreeMap;

use common::*;
use ferry_nft::tables::{transactions, weight, TableChange, Txn};
use ferry_nft::{Nft, Tables};
use ferry_plan::diff::{diff, diff_ops, LiveState, Op};
use ferry_plan::plan::plan_sharded;
use ferry_plan::Ruleset;

/// Every table created from nothing: the steps the differ gives for an empty table.
fn creating(tables: &[Ruleset]) -> Vec<TableChange<'_>> {
    let empty = LiveState {
        table: true,
        ..LiveState::default()
    };
    tables
        .iter()
        .map(|rs| TableChange {
            rs,
            create: true,
            ops: diff_ops(&empty, rs).ops,
            live: None,
        })
        .collect()
}

/// A step's names, one per element for element steps (cut steps compare with whole ones).
fn op_names(op: &Op) -> Vec<String> {
    match op {
        Op::AddElements(s, keys) => keys.iter().map(|k| format!("add {s} {k}")).collect(),
        Op::DeleteElements(s, keys) => keys.iter().map(|k| format!("delete {s} {k}")).collect(),
        op => vec![format!("{op:?}")],
    }
}

/// Each table's steps as the transactions carry them, in order.
fn per_table(txns: &[Txn]) -> BTreeMap<usize, Vec<Op>> {
    let mut out: BTreeMap<usize, Vec<Op>> = BTreeMap::new();
    for t in txns {
        for p in &t.parts {
            out.entry(p.table)
                .or_default()
                .extend(p.ops.iter().cloned());
        }
    }
    out
}

#[test]
fn a_cold_load_is_cut_into_bounded_transactions_that_hook_each_table_in_last() {
    let tables = plan_sharded(&sharded(4), &many_services(60));
    let mut changes = creating(&tables);
    let originals: Vec<Vec<Op>> = changes.iter().map(|c| c.ops.clone()).collect();
    let total: usize = changes
        .iter()
        .map(|c| 1 + c.ops.iter().map(|o| weight(o, c)).sum::<usize>())
        .sum();
    let max = 40;
    let txns = transactions(&mut changes, &[], max);
    assert!(txns.len() > changes.len(), "{} transactions", txns.len());
    assert!(total > max);
    for t in &txns {
        let w = t.weight(&changes);
        // A step heavier than the bound alone (one chain's rules) may exceed it.
        let single = t.parts.len() == 1 && t.parts[0].ops.len() <= 2;
        assert!(w <= max || single, "a transaction of {w} operations: {t:?}");
        assert_eq!(t.parts.len(), 1, "one table per transaction when cut");
    }
    // Nothing lost, nothing twice, and each table's base chains (hooks) come in its last
    // transaction: no packet ever meets a half-built table.
    let got = per_table(&txns);
    for (i, c) in changes.iter().enumerate() {
        let mut want: Vec<String> = originals[i].iter().flat_map(op_names).collect();
        let mut have: Vec<String> = got[&i].iter().flat_map(op_names).collect();
        want.sort();
        have.sort();
        assert_eq!(have, want, "table {}", c.rs.table_name());
        let mine: Vec<&Txn> = txns.iter().filter(|t| t.parts[0].table == i).collect();
        assert!(mine[0].parts[0].create, "created in its first transaction");
        assert!(mine[1..].iter().all(|t| !t.parts[0].create));
        let bases: Vec<&str> =
            c.rs.chains
                .values()
                .filter(|ch| ch.base.is_some())
                .map(|ch| &*ch.name)
                .collect();
        assert!(!bases.is_empty());
        for (k, t) in mine.iter().enumerate() {
            let hooks = t.parts[0]
                .ops
                .iter()
                .any(|o| matches!(o, Op::AddChain(n) if bases.contains(&&**n)));
            assert_eq!(
                hooks,
                k == mine.len() - 1,
                "{}: base chains in transaction {k} of {}",
                c.rs.table_name(),
                mine.len()
            );
        }
    }
    // The shards first, the common table last.
    let order: Vec<usize> = txns.iter().map(|t| t.parts[0].table).collect();
    assert_eq!(order.last(), Some(&0), "{order:?}");
    assert!(order[..order.len() - 1].iter().any(|i| *i != 0));
    let first_common = order.iter().position(|i| *i == 0).unwrap();
    assert!(order[first_common..].iter().all(|i| *i == 0), "{order:?}");
}

#[test]
fn a_change_within_the_bound_is_one_transaction_over_all_its_tables() {
    let tables = plan_sharded(&sharded(4), &many_services(30));
    let mut changes = creating(&tables);
    let del = vec!["ferry-7".to_string()];
    let txns = transactions(&mut changes, &del, usize::MAX);
    assert_eq!(txns.len(), 1);
    assert_eq!(txns[0].parts.len(), tables.len());
    assert_eq!(txns[0].delete, del);
    assert!(transactions(&mut [], &[], 10).is_empty());
}

#[test]
fn a_refilled_chain_is_never_cut_from_its_flush_and_deletions_come_last() {
    let a = plan_sharded(&sharded(2), &many_services(40));
    let mut more = many_services(40);
    for s in more.iter_mut().skip(3) {
        for p in &mut s.ports {
            p.endpoints.pop();
        }
    }
    let b = plan_sharded(&sharded(2), &more);
    let mut changes: Vec<TableChange<'_>> = a
        .iter()
        .zip(&b)
        .map(|(old, new)| TableChange {
            rs: new,
            create: false,
            ops: diff_ops(&LiveState::of(old), new).ops,
            live: None,
        })
        .collect();
    assert!(changes
        .iter()
        .any(|c| c.ops.iter().any(|o| matches!(o, Op::FlushChain(_)))));
    let del = vec!["ferry-2".to_string(), "ferry-3".to_string()];
    let txns = transactions(&mut changes, &del, 3);
    for t in &txns {
        for p in &t.parts {
            for (k, o) in p.ops.iter().enumerate() {
                if let Op::FlushChain(n) = o {
                    if changes[p.table].rs.chains.contains_key(n) {
                        assert!(
                            matches!(p.ops.get(k + 1), Some(Op::AddRules(m)) if m == n),
                            "{n} flushed without its rules: {:?}",
                            p.ops
                        );
                    }
                }
            }
        }
    }
    let n = txns.len();
    assert!(txns[..n - 2].iter().all(|t| t.delete.is_empty()));
    assert_eq!(txns[n - 2].delete, ["ferry-2"]);
    assert_eq!(txns[n - 1].delete, ["ferry-3"]);
    assert!(txns[n - 2].parts.is_empty() && txns[n - 1].parts.is_empty());
}

// ---- in the kernel ----

/// One kernel test at a time talks to libnftables (its name lookups are not thread-safe: see
/// kernel.rs).
static LIBNFT: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn nft(script: &str) {
    Nft::new().run(script).expect(script);
}

/// The kernel holds exactly these tables of ferry's, each as planned.
fn assert_kernel_holds(tables: &[Ruleset]) {
    let mut present = ferry_nft::tables::ferry_tables(&mut Nft::new()).expect("tables");
    present.sort();
    let mut want: Vec<String> = tables.iter().map(|t| t.table_name().to_string()).collect();
    want.sort();
    assert_eq!(present, want);
    for rs in tables {
        let live = ferry_nft::netlink::read_live_table(rs.table_name()).expect("read");
        let d = diff(&live, rs);
        assert!(d.is_empty(), "{}: {d}", rs.table_name());
    }
}

fn other_table_intact() {
    let out = Nft::new().run("list table inet other\n").expect("other");
    assert!(out.contains("chain keep"), "{out}");
}

#[test]
fn sharded_tables_load_in_chunks_change_in_one_transaction_and_shrink() {
    let test = "sharded_tables_load_in_chunks_change_in_one_transaction_and_shrink";
    let _one = LIBNFT.lock().unwrap_or_else(|e| e.into_inner());
    let Some(ns) = Netns::new(test, "ferrytab") else {
        return;
    };
    ns.run(|| {
        nft("add table inet other\nadd chain inet other keep { type filter hook prerouting priority 0; }\n");
        let svcs = many_services(80);
        let four = plan_sharded(&sharded(4), &svcs);
        let refs: Vec<&Ruleset> = four.iter().collect();
        let mut dp = Tables::new(Nft::new()).with_max_ops(100);
        let a = dp.apply(&refs, None).expect("cold load");
        assert!(a.transactions > four.len(), "{a}");
        assert_eq!(a.tables_created.len(), 5, "{a}");
        assert_kernel_holds(&four);
        other_table_intact();

        // Nothing to do: no transaction.
        let a = dp.apply(&refs, None).expect("again");
        assert!(a.is_empty() && a.transactions == 0, "{a}");

        // One endpoint: one transaction, one chain.
        let mut changed = svcs.clone();
        let victim = changed
            .iter_mut()
            .find(|s| s.ports.iter().any(|p| p.endpoints.len() > 1))
            .expect("a service with endpoints");
        let port = victim
            .ports
            .iter_mut()
            .find(|p| p.endpoints.len() > 1)
            .unwrap();
        port.endpoints.pop();
        let four_b = plan_sharded(&sharded(4), &changed);
        let refs: Vec<&Ruleset> = four_b.iter().collect();
        let a = dp.apply(&refs, None).expect("a change");
        assert_eq!(a.transactions, 1, "{a}");
        assert!(a.changes.chains_changed >= 1 && !a.changes.full, "{a}");
        assert_kernel_holds(&four_b);

        // Two shards, by a new dataplane (a restart): ferry-2 and ferry-3 go.
        let two = plan_sharded(&sharded(2), &changed);
        let refs: Vec<&Ruleset> = two.iter().collect();
        let mut dp = Tables::new(Nft::new()).with_max_ops(100);
        let a = dp.apply(&refs, None).expect("two shards");
        assert_eq!(a.tables_deleted, ["ferry-2", "ferry-3"], "{a}");
        assert_kernel_holds(&two);
        other_table_intact();

        // One table: the shards go, `ferry` holds everything.
        let one = plan_sharded(&sharded(1), &changed);
        let refs: Vec<&Ruleset> = one.iter().collect();
        let a = dp.apply(&refs, None).expect("one table");
        assert_eq!(a.tables_deleted, ["ferry-0", "ferry-1"], "{a}");
        assert_kernel_holds(&one);

        // A deleted shard table is rebuilt after a re-read.
        let refs: Vec<&Ruleset> = four_b.iter().collect();
        dp.apply(&refs, None).expect("four again");
        nft("delete table inet ferry-2\n");
        dp.resync();
        let a = dp.apply(&refs, None).expect("repair");
        assert_eq!(a.tables_created, ["ferry-2"], "{a}");
        assert_kernel_holds(&four_b);

        // Cleanup: all of ferry's tables, and only those.
        let gone = ferry_nft::tables::cleanup_all(&mut Nft::new()).expect("cleanup");
        assert_eq!(gone.len(), 5, "{gone:?}");
        assert!(ferry_nft::tables::ferry_tables(&mut Nft::new())
            .unwrap()
            .is_empty());
        other_table_intact();
    });
}

#[test]
fn a_refused_netlink_load_of_one_table_goes_as_text_in_chunks_and_shards_do_not() {
    let test = "a_refused_netlink_load_of_one_table_goes_as_text_in_chunks_and_shards_do_not";
    let _one = LIBNFT.lock().unwrap_or_else(|e| e.into_inner());
    let Some(ns) = Netns::new(test, "ferrytab") else {
        return;
    };
    ns.run(|| {
        let svcs = many_services(40);
        let one = plan_sharded(&sharded(1), &svcs);
        let mut dp = Tables::new(Nft::new()).with_max_ops(50);
        dp.backend().spoil_netlink_batches();
        let a = dp.apply(&refs(&one), None).expect("cold load as text");
        assert!(a.transactions > 1, "{a}");
        let why = dp.netlink_refused().expect("the kernel refused the batches");
        assert!(why.contains("no-such-chain-ferry-test"), "{why}");
        assert_kernel_holds(&one);
        // A change, as text too.
        let changed = plan_sharded(&sharded(1), &svcs[1..]);
        let a = dp.apply(&refs(&changed), None).expect("a change as text");
        assert_eq!(a.transactions, 1, "{a}");
        assert_kernel_holds(&changed);

        // Shard tables have no text path: the refusal is the error, and nothing changes.
        let four = plan_sharded(&sharded(4), &svcs);
        let r = dp.apply(&refs(&four), None);
        assert!(
            matches!(&r, Err(ferry_nft::NftError::Failed(w)) if w.contains("no-such-chain-ferry-test")),
            "{r:?}"
        );
        assert_kernel_holds(&changed);
    });
}

fn refs(tables: &[Ruleset]) -> Vec<&Ruleset> {
    tables.iter().collect()
}
