//! [`Tables`] and [`Dataplane`] over the in-memory kernel [`Fake`]: no root, no namespace.
//! What they send and in what order (bounded transactions, base chains last, one transaction
//! for a change), how they recover (drift repaired after a re-read, a refused transaction
//! leaving the previous state), and which path the [`Fallback`] takes. The kernel tests
//! (`kernel.rs`, `tables.rs`) stay the reference for what the real kernel accepts.

#[path = "../../ferry-plan/tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;

use common::*;
use ferry_model::view::ResolvedService;
use ferry_nft::backend::{script, Step};
use ferry_nft::fake::{Fake, FakeTable, Record};
use ferry_nft::{Backend, Dataplane, Fallback, NftError, Tables};
use ferry_plan::diff::{diff, diff_ops, LiveState, Op};
use ferry_plan::ir::TABLE;
use ferry_plan::plan::{plan, plan_sharded};
use ferry_plan::Ruleset;

/// `svcs` with one endpoint fewer in the first port that has two or more.
fn one_endpoint_less(svcs: &[ResolvedService]) -> Vec<ResolvedService> {
    let mut changed = svcs.to_vec();
    let port = changed
        .iter_mut()
        .flat_map(|s| s.ports.iter_mut())
        .find(|p| p.endpoints.len() > 1)
        .expect("a port with endpoints");
    port.endpoints.pop();
    changed
}

/// The fake holds exactly these tables of ferry's, each as planned, and nothing else of
/// ferry's.
fn assert_holds(fake: &Fake, tables: &[Ruleset]) {
    let mut b = fake.clone();
    let mut present = ferry_nft::tables::ferry_tables_in(&mut b).expect("tables");
    present.sort();
    let mut want: Vec<String> = tables.iter().map(|t| t.table_name().to_string()).collect();
    want.sort();
    assert_eq!(present, want);
    for rs in tables {
        let live = b.read_table(rs.table_name()).expect("read");
        let d = diff(&live, rs);
        assert!(d.is_empty(), "{}: {d}\n{}", rs.table_name(), d.script);
    }
}

fn snapshot(fake: &Fake) -> BTreeMap<String, FakeTable> {
    fake.tables()
        .into_iter()
        .filter_map(|t| fake.table(&t).map(|x| (t, x)))
        .collect()
}

fn refs(tables: &[Ruleset]) -> Vec<&Ruleset> {
    tables.iter().collect()
}

// ---- the text path renders the differ's script ----

#[test]
fn the_text_of_the_steps_is_the_differs_script() {
    let a = plan(&with_lb_pools(config()), &many_services(30));
    let b = plan(
        &with_lb_pools(config()),
        &one_endpoint_less(&many_services(30)),
    );
    let leftovers = with_leftovers(a.clone());
    let empty = LiveState::default();
    let empty_table = LiveState {
        table: true,
        ..LiveState::default()
    };
    let cases: Vec<(&str, LiveState, &Ruleset)> = vec![
        ("cold", empty, &a),
        ("empty table", empty_table, &a),
        ("one endpoint", LiveState::of(&a), &b),
        ("leftover maps and chains", LiveState::of(&leftovers), &a),
        ("nothing", LiveState::of(&a), &a),
    ];
    for (what, live, rs) in cases {
        let want = diff(&live, rs).script;
        let ops = diff_ops(&live, rs).ops;
        let got = script(&[Step::Ops {
            rs,
            ops: &ops,
            live: Some(&live),
        }])
        .expect("renders");
        assert_eq!(got, want, "{what}");
    }
    // A shard's objects have no text: the text path cannot carry them.
    let shards = plan_sharded(&sharded(2), &many_services(10));
    let shard = shards.iter().find(|t| t.table_name() != TABLE).unwrap();
    let ops = diff_ops(&LiveState::default(), shard).ops;
    let r = script(&[Step::Ops {
        rs: shard,
        ops: &ops,
        live: None,
    }]);
    assert!(matches!(r, Err(NftError::Unavailable(_))), "{r:?}");
}

// ---- the fake kernel's own checks ----

#[test]
fn the_fake_refuses_what_the_kernel_refuses_and_changes_nothing_then() {
    let rs = plan(&with_lb_pools(config()), &many_services(10));
    let mut fake = Fake::new();
    fake.commit(&[Step::Ops {
        rs: &rs,
        ops: &[Op::Full { replace: false }],
        live: None,
    }])
    .expect("a full load");
    let before = snapshot(&fake);
    let jumping = rs
        .chains
        .values()
        .find(|c| {
            c.base.is_none()
                && c.rules
                    .iter()
                    .any(|r| r.render().contains("jump ") || r.render().contains("goto "))
        })
        .expect("a chain that jumps")
        .name
        .clone();
    let a_set = rs.sets.keys().next().expect("a set").clone();
    let bad: Vec<(&str, Vec<Op>)> = vec![
        (
            "delete a chain that is not there",
            vec![Op::DeleteChain("nope".into())],
        ),
        (
            "flush a chain that is not there",
            vec![Op::FlushChain("nope".into())],
        ),
        (
            "delete a chain that holds rules",
            vec![Op::DeleteChain(jumping.clone())],
        ),
        (
            "delete an element that is not there",
            vec![Op::DeleteElements(
                a_set.clone(),
                vec!["10.255.255.1".into()],
            )],
        ),
        (
            // A good step first: it must not stay.
            "a good step then a bad one",
            vec![
                Op::FlushChain(jumping.clone()),
                Op::DeleteSet("nope".into()),
            ],
        ),
    ];
    for (what, ops) in bad {
        let r = fake.commit(&[Step::Ops {
            rs: &rs,
            ops: &ops,
            live: None,
        }]);
        assert!(matches!(r, Err(NftError::Failed(_))), "{what}: {r:?}");
        assert_eq!(snapshot(&fake), before, "{what}: changed the kernel");
    }
    // A chain whose rules jump to chains not created yet, in a table of its own.
    let fresh = Fake::new();
    let r = fresh.clone().commit(&[
        Step::CreateTable(&rs),
        Step::Ops {
            rs: &rs,
            ops: &[Op::AddChain(jumping.clone()), Op::AddRules(jumping.clone())],
            live: None,
        },
    ]);
    assert!(r.is_err(), "jumps to missing chains: {r:?}");
    assert!(
        fresh.tables().is_empty(),
        "the table created in it stays out too"
    );
    // Deleting a table that is not there fails; one transaction recorded, one per refusal.
    assert!(fake.commit(&[Step::DeleteTable("ferry-9")]).is_err());
    assert_eq!(fake.records().len(), 1);
    assert_eq!(fake.refused(), 6);
}

// ---- transactions: bounds and order ----

#[test]
fn a_sharded_cold_load_is_bounded_hooks_each_table_in_last_and_reads_back() {
    let four = plan_sharded(&sharded(4), &many_services(60));
    let fake = Fake::new();
    let max = 40;
    let mut dp = Tables::with_backend(Box::new(fake.clone())).with_max_ops(max);
    let a = dp.apply(&refs(&four), None).expect("cold load");
    let recs = fake.records();
    assert_eq!(a.transactions, recs.len(), "{a}");
    assert!(recs.len() > four.len(), "{} transactions", recs.len());
    assert_eq!(a.tables_created.len(), four.len());
    for r in &recs {
        assert!(r.ops <= max, "a transaction of {} operations: {r:?}", r.ops);
        assert_eq!(
            r.tables.len(),
            1,
            "one table per transaction when cut: {r:?}"
        );
    }
    for rs in &four {
        let t = rs.table_name();
        let mine: Vec<&Record> = recs.iter().filter(|r| r.tables[0] == t).collect();
        assert_eq!(mine[0].created, [t], "{t} created in its first transaction");
        let (last, rest) = mine.split_last().expect("transactions");
        let bases = rs.chains.values().filter(|c| c.base.is_some()).count();
        assert!(bases > 0);
        assert_eq!(last.hooks.len(), bases, "{t}: every base chain in its last");
        assert!(
            rest.iter().all(|r| r.hooks.is_empty()),
            "{t}: a base chain before the table is complete"
        );
        // Contiguous: a table is built, then the next.
        let first = recs.iter().position(|r| r.tables[0] == t).unwrap();
        assert!(recs[first..first + mine.len()]
            .iter()
            .all(|r| r.tables[0] == t));
    }
    assert_eq!(
        recs.last().unwrap().tables,
        [TABLE],
        "the common table last"
    );
    assert_holds(&fake, &four);

    // Nothing to do: nothing sent.
    fake.clear_records();
    let a = dp.apply(&refs(&four), None).expect("again");
    assert!(
        a.is_empty() && a.transactions == 0 && fake.records().is_empty(),
        "{a}"
    );
}

#[test]
fn a_change_is_one_transaction_and_fewer_shards_delete_theirs_one_at_a_time() {
    let svcs = many_services(60);
    let four = plan_sharded(&sharded(4), &svcs);
    let fake = Fake::new();
    fake.add_table("other");
    let mut dp = Tables::with_backend(Box::new(fake.clone())).with_max_ops(40);
    dp.apply(&refs(&four), None).expect("cold load");

    fake.clear_records();
    let changed = one_endpoint_less(&svcs);
    let four_b = plan_sharded(&sharded(4), &changed);
    let a = dp.apply(&refs(&four_b), None).expect("a change");
    assert_eq!(a.transactions, 1, "{a}");
    let recs = fake.records();
    assert_eq!(recs.len(), 1);
    assert!(recs[0].hooks.is_empty() && recs[0].created.is_empty());
    assert_holds(&fake, &four_b);

    // Two shards, by a new dataplane (a restart): the tables it no longer uses go last, one
    // per transaction, and never another's.
    fake.clear_records();
    let two = plan_sharded(&sharded(2), &changed);
    let mut dp = Tables::with_backend(Box::new(fake.clone())).with_max_ops(40);
    let a = dp.apply(&refs(&two), None).expect("two shards");
    assert_eq!(a.tables_deleted, ["ferry-2", "ferry-3"], "{a}");
    let recs = fake.records();
    let n = recs.len();
    assert_eq!(recs[n - 2].deleted, ["ferry-2"]);
    assert_eq!(recs[n - 1].deleted, ["ferry-3"]);
    assert!(recs[..n - 2].iter().all(|r| r.deleted.is_empty()));
    assert_holds(&fake, &two);
    assert!(fake.tables().contains(&"other".to_string()));

    // Cleanup: ferry's tables only, in one transaction.
    fake.clear_records();
    let mut b = fake.clone();
    let gone = ferry_nft::tables::cleanup_in(&mut b).expect("cleanup");
    assert_eq!(gone, ["ferry", "ferry-0", "ferry-1"]);
    assert_eq!(fake.tables(), ["other"]);
    assert_eq!(fake.records().len(), 1);
}

// ---- recovery ----

#[test]
fn drift_behind_ferrys_back_is_repaired_after_a_re_read() {
    let svcs = many_services(40);
    let four = plan_sharded(&sharded(4), &svcs);
    let fake = Fake::new();
    let mut dp = Tables::with_backend(Box::new(fake.clone()));
    dp.apply(&refs(&four), None).expect("cold load");

    let shard = four[1].table_name().to_string();
    let chain = four[1]
        .chains
        .values()
        .find(|c| c.rules.len() > 1)
        .expect("a chain of rules")
        .name
        .clone();
    assert!(fake.drop_rule(&shard, &chain));
    let (set, key) = four[2]
        .sets
        .values()
        .find_map(|s| {
            s.elements
                .keys()
                .next()
                .map(|k| (s.name.clone(), k.to_string()))
        })
        .expect("an element");
    assert!(fake.delete_element(four[2].table_name(), &set, &key));
    assert!(fake.flush_table(four[3].table_name()));
    assert!(fake.delete_table(TABLE));

    // Not known yet: the view says all is well.
    let a = dp.apply(&refs(&four), None).expect("nothing known");
    assert!(a.is_empty(), "{a}");
    dp.resync();
    fake.clear_records();
    let a = dp.apply(&refs(&four), None).expect("repair");
    assert_eq!(a.tables_created, [TABLE], "{a}");
    assert!(
        a.changes.chains_changed >= 2 && a.changes.elements_added >= 1,
        "{a}"
    );
    assert_holds(&fake, &four);
}

#[test]
fn a_refused_transaction_leaves_the_previous_state_and_the_next_apply_recovers() {
    let svcs = many_services(30);
    let a = plan(&with_lb_pools(config()), &svcs);
    let b = plan(&with_lb_pools(config()), &one_endpoint_less(&svcs));
    let fake = Fake::new();
    let mut dp = Dataplane::with_backend(Box::new(fake.clone()));
    dp.apply(&a).expect("cold");
    let before = snapshot(&fake);

    // An injected refusal.
    fake.fail_next("injected");
    let r = dp.apply(&b);
    assert!(
        matches!(&r, Err(NftError::Failed(w)) if w == "injected"),
        "{r:?}"
    );
    assert_eq!(snapshot(&fake), before);
    dp.apply(&b).expect("the next apply");
    assert_holds(&fake, std::slice::from_ref(&b));

    // Refused by the kernel's own checks: an element ferry deletes (a service removed) is
    // gone already, behind ferry's back. The whole change stays out; the next apply re-reads.
    let c = plan(&with_lb_pools(config()), &svcs[1..]);
    let (set, key) = b
        .sets
        .values()
        .filter(|s| !s.dynamic)
        .find_map(|s| {
            let kept = c.sets.get(&s.name)?;
            s.elements
                .keys()
                .find(|k| !kept.elements.contains_key(&***k))
                .map(|k| (s.name.clone(), k.to_string()))
        })
        .expect("an element of the removed service");
    assert!(fake.delete_element(TABLE, &set, &key));
    let before = snapshot(&fake);
    let r = dp.apply(&c);
    assert!(
        matches!(&r, Err(NftError::Failed(w)) if w.contains(&key)),
        "deleting a missing element must fail: {r:?}"
    );
    assert_eq!(snapshot(&fake), before, "a refused change left something");
    dp.apply(&c).expect("after a re-read");
    assert_holds(&fake, std::slice::from_ref(&c));
}

// ---- which path ----

/// A netlink path and a text path to one fake kernel.
fn two_paths() -> (Fake, Fake) {
    let netlink = Fake::new().path("netlink");
    let text = netlink.path("text");
    text.text_like();
    (netlink, text)
}

fn via(fake: &Fake) -> Vec<String> {
    fake.records().into_iter().map(|r| r.via).collect()
}

#[test]
fn netlink_is_the_path_while_it_works() {
    let (nl, text) = two_paths();
    let rs = plan(&with_lb_pools(config()), &many_services(20));
    let mut dp = Dataplane::with_backend(Box::new(Fallback::new(nl.clone(), text)));
    dp.apply(&rs).expect("apply");
    assert_eq!(via(&nl), ["netlink"]);
    assert!(dp.netlink_refused().is_none());
}

#[test]
fn a_refused_netlink_transaction_goes_as_text_and_is_reported_once() {
    let (nl, text) = two_paths();
    nl.refuse("netlink says no");
    let svcs = many_services(20);
    let a = plan(&with_lb_pools(config()), &svcs);
    let mut dp = Tables::with_backend(Box::new(Fallback::new(nl.clone(), text)));
    dp.apply(&[&a], None).expect("through the fallback");
    assert!(via(&nl).iter().all(|v| v == "text"), "{:?}", via(&nl));
    assert_eq!(dp.netlink_refused().as_deref(), Some("netlink says no"));
    assert!(dp.netlink_refused().is_none(), "reported once");
    assert_holds(&nl, std::slice::from_ref(&a));
    // A change, too.
    let b = plan(&with_lb_pools(config()), &one_endpoint_less(&svcs));
    dp.apply(&[&b], None).expect("a change");
    assert_holds(&nl, std::slice::from_ref(&b));
    assert!(dp.netlink_refused().is_some());
}

#[test]
fn without_netlink_sockets_reads_and_writes_go_as_text_with_nothing_to_report() {
    let (nl, text) = two_paths();
    nl.unavailable();
    let rs = plan(&with_lb_pools(config()), &many_services(20));
    let mut dp = Dataplane::with_backend(Box::new(Fallback::new(nl.clone(), text.clone())));
    dp.apply(&rs).expect("apply");
    dp.resync();
    let again = dp.apply(&rs).expect("read back as text");
    assert!(again.is_empty(), "{again}");
    assert_eq!(via(&text), ["text"]);
    assert!(dp.netlink_refused().is_none());
}

#[test]
fn a_shard_refused_over_netlink_is_an_error_that_changes_nothing() {
    let (nl, text) = two_paths();
    let four = plan_sharded(&sharded(4), &many_services(20));
    let mut dp = Tables::with_backend(Box::new(Fallback::new(nl.clone(), text)));
    dp.apply(&refs(&four), None).expect("cold");
    let before = snapshot(&nl);
    nl.refuse("netlink says no");
    let changed = plan_sharded(&sharded(4), &one_endpoint_less(&many_services(20)));
    let r = dp.apply(&refs(&changed), None);
    let Err(NftError::Failed(why)) = r else {
        panic!("a shard has no text path: {r:?}")
    };
    assert!(why.contains("netlink says no"), "{why}");
    assert_eq!(snapshot(&nl), before);
    assert!(dp.netlink_refused().is_none(), "nothing went as text");
}

#[test]
fn text_writes_only_when_asked_reads_still_first() {
    let (nl, text) = two_paths();
    let rs = plan(&with_lb_pools(config()), &many_services(20));
    let mut dp = Dataplane::with_backend(Box::new(
        Fallback::new(nl.clone(), text).second_writes_only(),
    ));
    dp.apply(&rs).expect("apply");
    assert_eq!(via(&nl), ["text"]);
}
