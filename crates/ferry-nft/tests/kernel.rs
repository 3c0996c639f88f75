//! The production backend against the real kernel: planned tables applied through
//! [`Dataplane`] (libnftables) and read back with [`read_live`], each test in a network
//! namespace of its own (deleted afterwards, also when the test fails), with load-balancer
//! pools (interval sets: ranges, prefixes and single addresses, IPv4 and IPv6).
//!
//! Needs root and libnftables. Without either the tests print a `ferry-test-skipped:` line and
//! pass, unless the environment variable CI is set: then they fail.

#[path = "../../ferry-plan/tests/common/mod.rs"]
mod common;

mod netns;
use netns::Netns;

use common::*;
use ferry_model::view::ResolvedEndpoint;
use ferry_model::Protocol;
use ferry_nft::{read_live, read_live_json, Dataplane, Nft};
use ferry_plan::diff::LiveState;
use ferry_plan::{diff, plan, Ruleset};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::TestRunner;

// ---- a network namespace per test ----

use ferry_testkit::skip;

/// The production backend (libnftables), or None after a skip (fails under CI) when the
/// library is missing.
fn libnft(test: &str) -> Option<Nft> {
    let nft = Nft::new();
    if nft.backend_name() != "libnftables" {
        skip(test, "libnftables is not installed (libnftables1)");
        return None;
    }
    Some(nft)
}

/// One test at a time talks to libnftables: two threads using it at once (even with contexts
/// of their own, in namespaces of their own) were seen to read a set element of one protocol
/// back as another (`sctp` as `tcp`): its name lookups are not thread-safe. The agent has one
/// thread on it.
static LIBNFT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `f` with the production backend in a namespace of its own; None when skipped.
fn in_kernel<T: Send>(test: &str, f: impl FnOnce(&mut Dataplane) -> T + Send) -> Option<T> {
    let _one = LIBNFT.lock().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::new("kernel", "ferrynft")?;
    // Checked inside the namespace: the same library, but a skip must come before any state.
    libnft(test)?;
    Some(ns.run(|| {
        let nft = Nft::new();
        f(&mut Dataplane::new(nft))
    }))
}

// ---- pools and read-back ----

/// What the kernel holds, read through the production path (netlink) by a fresh backend (no
/// cache), and checked against libnftables' own reading of the same table (its JSON listing).
fn read_back() -> LiveState {
    let mut nft = Nft::new();
    let live = read_live(&mut nft).expect("read_live");
    assert_eq!(
        live,
        ferry_nft::netlink::read_live().expect("netlink"),
        "read_live is the netlink reader"
    );
    let json = read_live_json(&mut nft).expect("read_live_json");
    assert_readers_agree(&live, &json);
    live
}

fn assert_readers_agree(netlink: &LiveState, json: &LiveState) {
    assert_eq!(netlink.table, json.table);
    assert_eq!(
        netlink.chains.keys().collect::<Vec<_>>(),
        json.chains.keys().collect::<Vec<_>>()
    );
    for (name, c) in &json.chains {
        assert_eq!(netlink.chains.get(name), Some(c), "chain {name}");
    }
    assert_eq!(
        netlink.sets.keys().collect::<Vec<_>>(),
        json.sets.keys().collect::<Vec<_>>()
    );
    let ferry_types = [
        "ipv4_addr",
        "ipv6_addr",
        "inet_proto",
        "inet_service",
        "integer",
        "verdict",
    ];
    for (name, s) in &json.sets {
        let ours = s
            .signature
            .split([' ', '.', ':'])
            .filter(|t| !t.is_empty())
            .all(|t| ferry_types.contains(&t));
        if ours {
            assert_eq!(netlink.sets.get(name), Some(s), "set {name}");
        } else {
            // A type ferry never plans: the netlink reader names it by number, so the set
            // differs from every planned one (and is replaced) with either reader.
            let n = &netlink.sets[name];
            assert!(n.signature.contains("type#"), "set {name}: {n:?} / {s:?}");
        }
    }
}

/// The kernel holds exactly `rs`: the same chains (bases, fingerprints in the first rules),
/// sets and elements (the pools' intervals among them), so the differ has nothing to do, and a
/// new dataplane adopts the table without a change.
fn assert_kernel_holds(rs: &Ruleset) {
    let live = read_back();
    let want = LiveState::of(rs);
    for (name, s) in &want.sets {
        assert_eq!(live.sets.get(name), Some(s), "set {name}");
    }
    assert_eq!(
        live.chains.keys().collect::<Vec<_>>(),
        want.chains.keys().collect::<Vec<_>>()
    );
    assert_eq!(live, want);
    let again = diff(&live, rs);
    assert!(again.is_empty(), "read back, still differs: {again}");
    let mut fresh = Dataplane::new(Nft::new());
    let ch = fresh.apply(rs).expect("adopting");
    assert!(ch.is_empty(), "a new dataplane changed the table: {ch}");
}

fn sample<S: Strategy>(runner: &mut TestRunner, s: S) -> S::Value {
    s.new_tree(runner).expect("a value").current()
}

/// The seed's services and `n` random ones (about a quarter IPv6).
fn realistic(runner: &mut TestRunner, n: usize) -> Vec<ferry_model::view::ResolvedService> {
    let specs = sample(runner, proptest::collection::vec(service_spec(), n));
    let mut services = seed_services();
    services.extend(services_from_specs(&specs));
    services
}

// ---- tests ----

#[test]
fn the_pools_read_back_as_planned() {
    in_kernel("the_pools_read_back_as_planned", |dp| {
        let rs = plan(&with_lb_pools(dual_stack_config()), &seed_services());
        // Every pool is in the plan, as ferry writes it.
        let planned = |set: &str| LiveState::of(&rs).sets[set].elements.len();
        assert_eq!(
            planned("lb-pools-v4") + planned("lb-pools-v6"),
            lb_pools().len()
        );
        let ch = dp.apply(&rs).expect("full load");
        assert!(ch.full, "{ch}");
        let live = read_back();
        for set in ["lb-pools-v4", "lb-pools-v6"] {
            assert_eq!(
                live.sets.get(set).map(|s| &s.elements),
                Some(&LiveState::of(&rs).sets[set].elements),
                "{set} as read back"
            );
        }
        assert_kernel_holds(&rs);
    });
}

#[test]
fn a_realistic_table_loads_and_reads_back_as_planned() {
    in_kernel("a_realistic_table_loads_and_reads_back_as_planned", |dp| {
        let mut runner = TestRunner::deterministic();
        let services = realistic(&mut runner, 50);
        assert!(services.iter().any(|s| s.cluster_ip.unwrap().is_ipv6()));
        let rs = plan(&with_lb_pools(dual_stack_config()), &services);
        dp.apply(&rs).expect("full load");
        assert_kernel_holds(&rs);
    });
}

/// Two planned tables, A and B, for round `round` of a test of changes: random services, B
/// evolved from A; every other round the pools change too (one dropped, two added) and the seed
/// loses a pod, then all pods.
fn two_tables(runner: &mut TestRunner, round: usize) -> (Ruleset, Ruleset) {
    let a = sample(runner, proptest::collection::vec(service_spec(), 10..40));
    let other = sample(runner, proptest::collection::vec(service_spec(), 10..45));
    let changes = sample(runner, proptest::collection::vec(change(), 45));
    let cfg_a = with_lb_pools(dual_stack_config());
    let mut cfg_b = cfg_a.clone();
    if round % 2 == 1 {
        cfg_b.lb_pools.remove(round % cfg_b.lb_pools.len());
        cfg_b
            .lb_pools
            .push((ip("fd00:500::100"), ip("fd00:500::1ff")));
        cfg_b.lb_pools.push((ip("172.16.9.3"), ip("172.16.9.40")));
    }
    let mut sa = seed_services();
    sa.extend(services_from_specs(&a));
    let mut sb = seed_services();
    sb.extend(evolve(&a, &other, &changes));
    if round % 2 == 1 {
        sb[0].ports[0].endpoints.pop();
        sb[1].ports[0].endpoints.clear();
    }
    (plan(&cfg_a, &sa), plan(&cfg_b, &sb))
}

#[test]
fn incremental_changes_apply_on_top_of_what_the_kernel_has() {
    in_kernel(
        "incremental_changes_apply_on_top_of_what_the_kernel_has",
        |dp| {
            let mut runner = TestRunner::deterministic();
            for round in 0..6 {
                let (ra, rb) = two_tables(&mut runner, round);

                dp.nft()
                    .expect("libnftables")
                    .run("flush ruleset\n")
                    .expect("flush ruleset");
                dp.resync();
                dp.apply(&ra)
                    .unwrap_or_else(|e| panic!("round {round}: loading A refused: {e}"));
                assert_kernel_holds(&ra);
                for (to, what) in [(&rb, "A->B"), (&ra, "B->A")] {
                    let ch = dp
                        .apply(to)
                        .unwrap_or_else(|e| panic!("round {round} {what} refused: {e}"));
                    assert!(!ch.full, "round {round} {what}: {ch}");
                    assert_kernel_holds(to);
                }
            }
        },
    );
}

#[test]
fn a_changed_layout_is_replaced_in_one_transaction() {
    in_kernel("a_changed_layout_is_replaced_in_one_transaction", |dp| {
        let rs = plan(&with_lb_pools(config()), &seed_services());
        // What an older ferry might have left: its base chains at other priorities.
        let mut old = rs.clone();
        let mut moved = 0;
        for c in old.chains.values_mut() {
            if let Some(b) = std::sync::Arc::make_mut(c).base.as_mut() {
                b.priority += 5;
                moved += 1;
            }
        }
        assert!(moved > 0);
        dp.apply(&old).expect("load the old layout");
        dp.resync();
        let ch = dp.apply(&rs).expect("replace the table");
        assert!(ch.full, "{ch}");
        assert_kernel_holds(&rs);
    });
}

#[test]
fn leftover_maps_pointing_at_leftover_chains_are_removed() {
    in_kernel(
        "leftover_maps_pointing_at_leftover_chains_are_removed",
        |dp| {
            let b = plan(&with_lb_pools(config()), &seed_services());
            let a = with_leftovers(b.clone());
            dp.apply(&a).expect("load A");
            assert_eq!(read_back(), LiveState::of(&a));
            dp.resync();
            dp.apply(&b).expect("A -> B");
            assert_kernel_holds(&b);
        },
    );
}

#[test]
fn comments_and_names_at_their_longest_load() {
    in_kernel("comments_and_names_at_their_longest_load", |dp| {
        // Namespace and name at Kubernetes' 63-character limit, a named SCTP port at 65535.
        let long = "a".repeat(63);
        let svc = Svc::new(&long, "10.43.9.9")
            .namespace(&"n".repeat(63))
            .named_port(
                &"p".repeat(15),
                Protocol::Sctp,
                65535,
                Some(32767),
                &[ep("10.42.0.9", 65535)],
            )
            .external_ip("192.168.2.60")
            .build();
        let rs = plan(&with_lb_pools(config()), &[svc]);
        dp.apply(&rs).expect("load");
        assert_kernel_holds(&rs);
    });
}

#[test]
fn changed_verdicts_at_the_same_key_apply() {
    in_kernel("changed_verdicts_at_the_same_key_apply", |dp| {
        let web = |eps: &[ResolvedEndpoint]| {
            Svc::new("web", "10.43.2.1")
                .node_port(Protocol::Tcp, 80, 30080, eps)
                .external_ip("192.168.2.50")
        };
        let local_pod = [ep("10.42.0.85", 80).on(NODE)];
        let elsewhere = [ep("10.42.1.170", 80)];
        let cfg = with_lb_pools(config());
        // No endpoint here: reject (none anywhere) -> drop (Local policies, one on another
        // node). With one here: goto external-... -> goto local-...
        let steps = [
            plan(&cfg, &[web(&[]).build()]),
            plan(
                &cfg,
                &[web(&elsewhere)
                    .external_policy_local()
                    .internal_policy_local()
                    .build()],
            ),
            plan(&cfg, &[web(&local_pod).external_policy_local().build()]),
            plan(&cfg, &[web(&local_pod).build()]),
            plan(&cfg, &[web(&[]).build()]),
        ];
        dp.apply(&steps[0]).expect("load");
        for (i, next) in steps.iter().enumerate().skip(1) {
            let ch = dp
                .apply(next)
                .unwrap_or_else(|e| panic!("step {i} refused: {e}"));
            assert!(ch.elements_deleted > 0 && !ch.full, "step {i}: {ch}");
            assert_kernel_holds(next);
        }
    });
}

#[test]
fn release_cache_keeps_applying() {
    in_kernel("release_cache_keeps_applying", |dp| {
        let a = plan(&with_lb_pools(config()), &seed_services());
        let mut sb = seed_services();
        sb[0].ports[0].endpoints.pop();
        let b = plan(&with_lb_pools(config()), &sb);
        dp.apply(&a).expect("load");
        dp.release_cache();
        let ch = dp.apply(&b).expect("after release_cache");
        assert!(!ch.is_empty() && !ch.full, "{ch}");
        assert_kernel_holds(&b);
    });
}

#[test]
fn netlink_and_json_readers_agree_on_foreign_additions() {
    in_kernel(
        "netlink_and_json_readers_agree_on_foreign_additions",
        |dp| {
            // No table: both read an empty state.
            assert_eq!(read_back(), LiveState::default());
            let rs = plan(&with_lb_pools(dual_stack_config()), &seed_services());
            dp.apply(&rs).expect("load");
            // What a careless operator or another tool might add inside ferry's table.
            dp.nft()
                .expect("libnftables")
                .run(concat!(
                    "add chain inet ferry stray-input { type filter hook input priority 0; }\n",
                    "add chain inet ferry stray-empty\n",
                    "add rule inet ferry stray-empty tcp dport { 22, 80 } accept comment \"x [zz]\"\n",
                    "add rule inet ferry stray-empty counter\n",
                    "add rule inet ferry services tcp dport 9999 drop\n",
                    "add set inet ferry stray-ranges { type ipv4_addr; flags interval; }\n",
                    "add element inet ferry stray-ranges { 0.0.0.0-0.0.0.9, 10.0.0.0/24, ",
                    "10.0.1.0-10.0.1.7, 10.0.3.3, 250.0.0.0-255.255.255.255 }\n",
                    "add set inet ferry stray-ranges6 { type ipv6_addr; flags interval; }\n",
                    "add element inet ferry stray-ranges6 { fd00::/64, fd01::1, ::-::3 }\n",
                    "add map inet ferry stray-map { type ipv4_addr : ipv4_addr; }\n",
                    "add element inet ferry stray-map { 10.1.1.1 : 10.2.2.2 }\n",
                    "add set inet ferry stray-ether { type ether_addr; }\n",
                    "add element inet ferry stray-ether { 02:00:00:00:00:01 }\n",
                    "add set inet ferry stray-pairs { type ipv6_addr . inet_service; }\n",
                    "add element inet ferry stray-pairs { fd00::5 . 443 comment \"c\" }\n",
                    "add map inet ferry stray-vmap { type inet_proto . inet_service : verdict; }\n",
                    "add element inet ferry stray-vmap { udp . 53 : accept, tcp . 1 : drop, ",
                    "sctp . 2 : jump stray-empty, udp . 3 : return }\n",
                    "add set inet ferry stray-timeout { type ipv4_addr; flags dynamic,timeout; timeout 1h; }\n",
                    "add element inet ferry stray-timeout { 10.9.9.9 }\n",
                ))
                .expect("foreign additions");
            let live = read_back();
            assert_eq!(live.chains["stray-empty"].rules, 2);
            // "[zz]" is not a fingerprint ferry writes: read as none (the chain is rewritten).
            assert_eq!(live.chains["stray-empty"].fingerprint, None);
            assert_eq!(
                live.chains["services"].rules,
                LiveState::of(&rs).chains["services"].rules + 1
            );
            assert_eq!(
                live.sets["stray-ranges"]
                    .elements
                    .keys()
                    .map(|k| &**k)
                    .collect::<Vec<_>>(),
                [
                    "0.0.0.0-0.0.0.9",
                    "10.0.0.0-10.0.0.255",
                    "10.0.1.0-10.0.1.7",
                    "10.0.3.3",
                    "250.0.0.0-255.255.255.255"
                ]
            );
            // And once the differ has put everything back, both read the plan.
            dp.resync();
            dp.apply(&rs).expect("repair");
            assert_kernel_holds(&rs);
            // A protocol nft names from /etc/protocols reads back as its number, which the
            // differ's delete takes as well.
            dp.nft()
                .expect("libnftables")
                .run("add element inet ferry service-ips-v4 { 10.0.0.1 . 58 . 3 : drop }\n")
                .expect("a stray element");
            let live = ferry_nft::netlink::read_live().expect("netlink");
            assert_eq!(
                live.sets["service-ips-v4"]
                    .elements
                    .get("10.0.0.1 . 58 . 3")
                    .map(|e| e.verdict()),
                Some(Some(&ferry_plan::ir::Verdict::Drop))
            );
            dp.resync();
            let ch = dp.apply(&rs).expect("repair");
            assert_eq!(ch.elements_deleted, 1, "{ch}");
            assert_kernel_holds(&rs);
        },
    );
}

/// Panics, showing the lines around the first difference, unless the two listings are equal.
fn assert_same_listing(what: &str, text: &str, netlink: &str) {
    if text == netlink {
        return;
    }
    let first = text
        .lines()
        .zip(netlink.lines())
        .position(|(a, b)| a != b)
        .unwrap_or(0);
    let show = |s: &str| {
        s.lines()
            .skip(first.saturating_sub(3))
            .take(8)
            .collect::<Vec<_>>()
            .join("\n")
    };
    panic!(
        "{what}: listings differ at line {first}:\nlibnftables:\n{}\nnetlink:\n{}",
        show(text),
        show(netlink)
    );
}

/// `nft list table inet ferry` after loading `rs` into a fresh namespace through `dp`.
fn listing_after_load(rs: &Ruleset, netlink: bool) -> String {
    let ns = Netns::new("kernel", "ferrynft").expect("root");
    ns.run(|| {
        if netlink {
            // Straight through the encoder and the socket: no fallback can hide a refusal.
            match ferry_nft::encode::full_load(rs, false) {
                Ok(batch) => {
                    ferry_nft::netlink::send_batch(&batch).expect("the kernel takes the batch")
                }
                // Through the agent's path: libnftables takes what the encoder does not know.
                Err(_) => {
                    let ch = Dataplane::new(Nft::new()).apply(rs).expect("full load");
                    assert!(ch.full, "{ch}");
                }
            }
        } else {
            let mut dp = Dataplane::new(Nft::new()).text_only();
            let ch = dp.apply(rs).expect("full load");
            assert!(ch.full, "{ch}");
        }
        let mut nft = Nft::new();
        let listing = nft
            .run(&format!("list table inet {}", ferry_plan::ir::TABLE))
            .expect("nft list table");
        let raw = ferry_nft::netlink::raw_elements().expect("raw elements");
        format!("{listing}\n{raw:?}")
    })
}

#[test]
fn netlink_full_loads_list_exactly_as_libnftables_loads() {
    let _one = LIBNFT.lock().unwrap_or_else(|e| e.into_inner());
    if Netns::new("kernel", "ferrynft").is_none()
        || libnft("netlink_full_loads_list_exactly_as_libnftables_loads").is_none()
    {
        return;
    }
    let mut runner = TestRunner::deterministic();
    let local_pod = [ep("10.42.0.85", 80).on(NODE)];
    let web = Svc::new("web", "10.43.2.1")
        .node_port(Protocol::Tcp, 80, 30080, &local_pod)
        .external_ip("192.168.2.50")
        .external_policy_local()
        .build();
    let with_features = realistic(&mut runner, 60);
    assert!(with_features.iter().any(|s| s.affinity_timeout.is_some()));
    assert!(with_features
        .iter()
        .any(|s| s.load_balancer_source_ranges.len() > 1));
    // Pods told by interface (a name, a prefix), and masquerade-all.
    let by_interface = |name: &str, prefix: bool| {
        let mut c = with_lb_pools(config());
        c.local_interface = Some(ferry_plan::plan::LocalInterface {
            name: name.into(),
            prefix,
        });
        c
    };
    let mut masquerade_all = with_lb_pools(config());
    masquerade_all.masquerade_all = true;
    let tables = [
        plan(&by_interface("cni0", false), &with_features),
        plan(&by_interface("veth", true), &seed_services()),
        plan(&masquerade_all, &seed_services()),
        plan(&with_lb_pools(dual_stack_config()), &seed_services()),
        plan(&with_lb_pools(dual_stack_config()), &with_features),
        plan(&with_lb_pools(config()), &[web]),
        with_leftovers(plan(&with_lb_pools(config()), &seed_services())),
    ];
    for (i, rs) in tables.iter().enumerate() {
        if let Err(e) = ferry_nft::encode::full_load(rs, false) {
            panic!("table {i} is not encodable: {e}");
        }
    }
    for (i, rs) in tables.iter().enumerate() {
        let text = listing_after_load(rs, false);
        let netlink = listing_after_load(rs, true);
        assert_same_listing(&format!("table {i}"), &text, &netlink);
        assert!(text.lines().count() > 20, "{text}");
    }
}

type Raw = ferry_nft::netlink::RawElements;

/// The listings (and the sets' raw elements, which a listing cannot show all of: an unpaired
/// range end, say) after each of `steps`, applied in turn by one dataplane in a fresh namespace
/// (over netlink, or as libnftables text); with netlink, every step must have been encodable.
fn listings_after_steps(steps: &[Ruleset], netlink: bool) -> Vec<(String, Raw)> {
    let ns = Netns::new("kernel", "ferrynft").expect("root");
    ns.run(|| {
        let dp = Dataplane::new(Nft::new());
        let mut dp = if netlink { dp } else { dp.text_only() };
        let mut out = Vec::new();
        for (i, rs) in steps.iter().enumerate() {
            let ch = dp
                .apply(rs)
                .unwrap_or_else(|e| panic!("step {i} refused: {e}"));
            if netlink && !ch.is_empty() {
                if let Err(e) = ferry_nft::encode::changes(rs, &ch.ops) {
                    panic!("step {i} not encodable ({e}): {ch}");
                }
            }
            assert!(i == 0 || !ch.full, "step {i} reloaded everything: {ch}");
            // Dynamic sets hold what packets wrote: not compared.
            let mut raw = ferry_nft::netlink::raw_elements().expect("raw elements");
            raw.retain(|name, _| {
                !name.starts_with("affinity-") || name.starts_with("affinity-frontends")
            });
            out.push((
                Nft::new()
                    .run(&format!("list table inet {}", ferry_plan::ir::TABLE))
                    .expect("nft list table"),
                raw,
            ));
        }
        out
    })
}

#[test]
fn netlink_changes_list_exactly_as_libnftables_changes() {
    let _one = LIBNFT.lock().unwrap_or_else(|e| e.into_inner());
    if Netns::new("kernel", "ferrynft").is_none()
        || libnft("netlink_changes_list_exactly_as_libnftables_changes").is_none()
    {
        return;
    }
    let mut runner = TestRunner::deterministic();
    for round in 0..4 {
        let (ra, rb) = two_tables(&mut runner, round);
        let steps = [ra.clone(), rb, ra];
        let text = listings_after_steps(&steps, false);
        let netlink = listings_after_steps(&steps, true);
        for (i, ((t, traw), (n, nraw))) in text.iter().zip(&netlink).enumerate() {
            for (set, els) in traw {
                assert_eq!(
                    nraw.get(set),
                    Some(els),
                    "round {round} step {i}: the kernel's raw elements of {set} differ"
                );
            }
            assert_eq!(traw.len(), nraw.len());
            assert_same_listing(&format!("round {round} step {i}"), t, n);
        }
    }
}

#[test]
fn a_refused_netlink_batch_is_applied_as_text() {
    in_kernel("a_refused_netlink_batch_is_applied_as_text", |dp| {
        dp.spoil_netlink_batches();
        let a = plan(&with_lb_pools(config()), &seed_services());
        let ch = dp.apply(&a).expect("the full load, through the fallback");
        assert!(ch.full, "{ch}");
        let why = dp.netlink_refused().expect("the kernel refused the batch");
        assert!(why.contains("no-such-chain-ferry-test"), "{why}");
        assert_kernel_holds(&a);
        // An incremental change too; nothing is left to report afterwards.
        let mut sb = seed_services();
        sb[0].ports[0].endpoints.pop();
        let b = plan(&with_lb_pools(config()), &sb);
        let ch = dp.apply(&b).expect("a change, through the fallback");
        assert!(!ch.is_empty() && !ch.full, "{ch}");
        assert!(dp.netlink_refused().is_some());
        assert!(dp.netlink_refused().is_none());
        assert_kernel_holds(&b);
    });
}

// ---- the sharded layout ----

/// Every table of a sharded layout holds exactly its plan, read back over netlink and through
/// libnftables' JSON alike, and a dataplane of its own adopts it without a change.
fn assert_kernel_holds_tables(tables: &[Ruleset]) {
    let mut nft = Nft::new();
    for rs in tables {
        let name = rs.table_name();
        let live = ferry_nft::netlink::read_live_table(name).expect("netlink");
        let json = ferry_nft::read_live_json_table(&mut nft, name).expect("json");
        assert_readers_agree(&live, &json);
        assert!(live.table, "table {name} missing");
        assert_eq!(live, LiveState::of(rs), "table {name}");
        let ch = Dataplane::for_table(Nft::new(), name)
            .apply(rs)
            .expect("adopting");
        assert!(
            ch.is_empty(),
            "table {name}: a new dataplane changed it: {ch}"
        );
    }
}

#[test]
fn sharded_tables_load_in_one_batch_read_back_and_change_one_shard_at_a_time() {
    in_kernel(
        "sharded_tables_load_in_one_batch_read_back_and_change_one_shard_at_a_time",
        |_dp| {
            let mut runner = TestRunner::deterministic();
            let mut services = realistic(&mut runner, 40);
            for n in [2u16, 5] {
                let cfg = ferry_plan::PlanConfig {
                    shards: n,
                    ..with_lb_pools(dual_stack_config())
                };
                let tables = ferry_plan::plan::plan_sharded(&cfg, &services);
                assert_eq!(tables.len(), usize::from(n) + 1);
                Nft::new().run("flush ruleset\n").expect("flush ruleset");
                // One transaction for all of them.
                let full = [ferry_plan::diff::Op::Full { replace: false }];
                let parts: Vec<(&Ruleset, &[ferry_plan::diff::Op])> =
                    tables.iter().map(|t| (t, &full[..])).collect();
                let batch = ferry_nft::encode::batch(&parts).expect("encodable");
                ferry_nft::netlink::send_batch(&batch).expect("the kernel takes the batch");
                assert_kernel_holds_tables(&tables);
                let listing = Nft::new().run("list tables inet\n").expect("list tables");
                for t in &tables {
                    assert!(
                        listing.contains(&format!("table inet {}\n", t.table_name())),
                        "{listing}"
                    );
                }

                // Change one service's endpoints: only its shard's table differs, and a
                // dataplane of that table alone brings the kernel there.
                let mut dps: Vec<Dataplane> = tables
                    .iter()
                    .map(|t| Dataplane::for_table(Nft::new(), t.table_name()))
                    .collect();
                let i = services
                    .iter()
                    .position(|s| s.ports.iter().any(|p| !p.endpoints.is_empty()))
                    .expect("a service with endpoints");
                for p in &mut services[i].ports {
                    p.endpoints.truncate(1);
                    if let Some(e) = p.endpoints.first_mut() {
                        e.port = e.port.wrapping_add(1).max(1);
                    }
                }
                let shard = ferry_plan::plan::shard_of(&services[i].id, n);
                let after = ferry_plan::plan::plan_sharded(&cfg, &services);
                for (k, (dp, rs)) in dps.iter_mut().zip(&after).enumerate() {
                    let ch = dp.apply(rs).expect("applying");
                    assert!(!ch.full, "table {k}: {ch}");
                    // Table 0 is the common one; shard s is table s + 1.
                    assert_eq!(
                        !ch.is_empty(),
                        k == usize::from(shard) + 1,
                        "table {k} (the change is in shard {shard}): {ch}"
                    );
                }
                assert_kernel_holds_tables(&after);
            }
        },
    );
}

/// What ferry loads can be saved and loaded back as a firewall is (`nft list ruleset >
/// /etc/nftables.conf`, then `nft -f` at boot), and nft can still add a rule that names an
/// endpoint map once it exists (with `meta l4proto . th dport` in the maps' `typeof`, nft
/// 1.0.6 refuses that: "conflicting protocols specified"). Every protocol and family of the
/// endpoint maps, by address and by node port.
#[test]
fn a_loaded_table_lists_as_a_script_nft_loads_back() {
    in_kernel("a_loaded_table_lists_as_a_script_nft_loads_back", |dp| {
        let mut runner = TestRunner::deterministic();
        let services = realistic(&mut runner, 60);
        let rs = plan(&with_lb_pools(dual_stack_config()), &services);
        // Endpoint maps of each protocol hold draws (by address, and by node port for TCP).
        let drawn = |map: &str| rs.sets.get(map).map_or(0, |s| s.elements.len());
        for map in [
            "endpoints-tcp-v4",
            "endpoints-udp-v4",
            "nodeport-endpoints-tcp-v4",
        ] {
            assert!(drawn(map) > 0, "{map} is empty in the sample");
        }
        dp.apply(&rs).expect("full load");
        let before = read_back();
        let mut nft = Nft::new();
        let table = format!("list table inet {}", ferry_plan::ir::TABLE);
        let saved = nft.run(&table).expect("nft list table");
        nft.run(&format!("delete table inet {}", ferry_plan::ir::TABLE))
            .expect("delete");
        nft.run(&saved)
            .unwrap_or_else(|e| panic!("nft refused its own listing: {e}\n{saved}"));
        // The same table (sets list their elements in no fixed order: compared as read).
        assert_eq!(read_back(), before, "reloaded from the listing");
        assert_kernel_holds(&rs);
        // A rule added later, by hand, naming the maps of each protocol and family.
        nft.run(&format!(
            "add chain inet {0} by-hand; \
             add rule inet {0} by-hand meta l4proto udp dnat ip to ip daddr . udp dport . numgen random mod 2 map @endpoints-udp-v4; \
             add rule inet {0} by-hand meta l4proto tcp dnat ip to tcp dport . numgen random mod 2 map @nodeport-endpoints-tcp-v4; \
             add rule inet {0} by-hand meta l4proto sctp dnat ip6 to ip6 daddr . sctp dport . numgen random mod 3 map @endpoints-sctp-v6",
            ferry_plan::ir::TABLE
        ))
        .expect("a rule naming the endpoint maps");
    });
}
