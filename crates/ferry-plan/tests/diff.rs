//! The differ: from what the kernel has to what is planned, changing only what differs.
//!
//! Scripts are checked against a small model of the kernel's table ([`Kernel`]) that refuses
//! what nftables refuses (adding what exists, deleting what is missing or still referenced,
//! naming chains and sets that do not exist), so the ordering of commands is checked too.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use ferry_model::view::{ResolvedEndpoint, ResolvedService};
use ferry_model::Protocol;
use ferry_plan::diff::{fingerprint_of_comment, LiveChain, LiveSet, LiveState};
use ferry_plan::ir::Verdict;
use ferry_plan::{diff, plan, Changes, Ruleset};
use proptest::prelude::*;

fn planned(services: &[ResolvedService]) -> Ruleset {
    plan(&config(), services)
}

fn elements(rs: &Ruleset) -> usize {
    rs.sets.values().map(|s| s.elements.len()).sum()
}

/// `n` ClusterIP services with two endpoints each on this node (pod addresses unique per
/// service).
fn many_services(n: u32) -> Vec<ResolvedService> {
    (0..n)
        .map(|i| {
            let a = |k: u32| format!("10.42.{}.{}", i / 100, (i % 100) * 2 + k + 1);
            Svc::new(&format!("app-{i}"), &format!("10.43.1.{}", i + 1))
                .port(
                    Protocol::Tcp,
                    80,
                    &[ep(&a(0), 8080).on(NODE), ep(&a(1), 8080).on(NODE)],
                )
                .build()
        })
        .collect()
}

fn lines(script: &str) -> Vec<&str> {
    script.lines().collect()
}

fn assert_counts(
    ch: &Changes,
    added: usize,
    changed: usize,
    deleted: usize,
    e_add: usize,
    e_del: usize,
) {
    assert_eq!(
        (
            ch.chains_added,
            ch.chains_changed,
            ch.chains_deleted,
            ch.elements_added,
            ch.elements_deleted
        ),
        (added, changed, deleted, e_add, e_del),
        "counts (chains +~-, elements +-) of:\n{}",
        ch.script
    );
}

// ---- a model of the kernel's side ----

/// ferry's table as nftables would hold it, fed the differ's scripts line by line.
#[derive(Debug, Default, Clone, PartialEq)]
struct Kernel {
    table: bool,
    /// Chain -> its rules as text.
    chains: BTreeMap<String, Vec<String>>,
    /// Set -> (is a map, key text -> verdict text).
    sets: BTreeMap<String, (bool, BTreeMap<String, Option<String>>)>,
}

/// Chains named by `jump`/`goto` and sets named by `@` in a rule or element.
fn references(text: &str) -> (Vec<String>, Vec<String>) {
    let words: Vec<&str> = text.split_whitespace().collect();
    let mut chains = vec![];
    let mut sets = vec![];
    for (i, w) in words.iter().enumerate() {
        if (*w == "jump" || *w == "goto") && i + 1 < words.len() {
            chains.push(words[i + 1].to_string());
        }
        if let Some(s) = w.strip_prefix('@') {
            sets.push(s.to_string());
        }
    }
    (chains, sets)
}

/// The items between `{ ` and the final ` }`.
fn braced(rest: &str) -> Vec<&str> {
    let inner = rest
        .split_once("{ ")
        .and_then(|(_, r)| r.strip_suffix(" }"))
        .unwrap_or_else(|| panic!("no {{ }} in {rest}"));
    inner.split(", ").collect()
}

impl Kernel {
    fn loaded(rs: &Ruleset) -> Kernel {
        let mut k = Kernel::default();
        k.apply(&rs.render_full())
            .unwrap_or_else(|e| panic!("full load refused: {e}"));
        k
    }

    fn chain_in_use(&self, name: &str) -> bool {
        let by_rule = self
            .chains
            .values()
            .flatten()
            .any(|r| references(r).0.iter().any(|c| c == name));
        let by_element = self.sets.values().any(|(_, els)| {
            els.values()
                .flatten()
                .any(|v| references(v).0.iter().any(|c| c == name))
        });
        by_rule || by_element
    }

    fn set_in_use(&self, name: &str) -> bool {
        self.chains
            .values()
            .flatten()
            .any(|r| references(r).1.iter().any(|s| s == name))
    }

    /// Applies a script as one transaction: all or nothing.
    fn apply(&mut self, script: &str) -> Result<(), String> {
        let mut next = self.clone();
        for line in script.lines() {
            next.command(line)
                .map_err(|e| format!("{e}\n  at: {line}"))?;
        }
        *self = next;
        Ok(())
    }

    fn command(&mut self, line: &str) -> Result<(), String> {
        let words: Vec<&str> = line.splitn(5, ' ').collect();
        let [verb, what, family, table, rest] = words[..] else {
            if line == "delete table inet ferry" {
                *self = Kernel::default();
                return Ok(());
            }
            return Err("unparsed".into());
        };
        if (family, table) != ("inet", "ferry") {
            return Err("not ferry's table".into());
        }
        let name = rest.split(' ').next().unwrap_or_default().to_string();
        match (verb, what) {
            ("add", "table") => self.table = true,
            _ if !self.table => return Err("no table".into()),
            ("add", "set" | "map") => {
                if self.sets.contains_key(&name) {
                    return Err(format!("set {name} exists"));
                }
                self.sets.insert(name, (what == "map", BTreeMap::new()));
            }
            ("delete", "set" | "map") => {
                if self.set_in_use(&name) {
                    return Err(format!("set {name} is in use"));
                }
                self.sets.remove(&name).ok_or(format!("no set {name}"))?;
            }
            ("add", "chain") => {
                if self.chains.insert(name.clone(), vec![]).is_some() {
                    return Err(format!("chain {name} exists"));
                }
            }
            ("flush", "chain") => self
                .chains
                .get_mut(&name)
                .ok_or(format!("no chain {name}"))?
                .clear(),
            ("delete", "chain") => {
                let rules = self.chains.get(&name).ok_or(format!("no chain {name}"))?;
                if !rules.is_empty() || self.chain_in_use(&name) {
                    return Err(format!("chain {name} is busy"));
                }
                self.chains.remove(&name);
            }
            ("add", "rule") => {
                let rule = rest[name.len()..].trim().to_string();
                let (chains, sets) = references(&rule);
                for c in chains {
                    if !self.chains.contains_key(&c) {
                        return Err(format!("no chain {c}"));
                    }
                }
                for s in sets {
                    if !self.sets.contains_key(&s) {
                        return Err(format!("no set {s}"));
                    }
                }
                self.chains
                    .get_mut(&name)
                    .ok_or(format!("no chain {name}"))?
                    .push(rule);
            }
            ("add", "element") => {
                for item in braced(rest) {
                    let (key, verdict) = match item.split_once(" : ") {
                        Some((k, v)) => (k, Some(v.to_string())),
                        None => (item, None),
                    };
                    let key = key.split(" comment ").next().unwrap_or(key).to_string();
                    for c in references(verdict.as_deref().unwrap_or("")).0 {
                        if !self.chains.contains_key(&c) {
                            return Err(format!("no chain {c}"));
                        }
                    }
                    let (is_map, els) = self.sets.get_mut(&name).ok_or(format!("no set {name}"))?;
                    if *is_map != verdict.is_some() {
                        return Err(format!("{item}: wrong shape for {name}"));
                    }
                    if els.insert(key.clone(), verdict).is_some() {
                        return Err(format!("element {key} exists in {name}"));
                    }
                }
            }
            ("delete", "element") => {
                for key in braced(rest) {
                    let (_, els) = self.sets.get_mut(&name).ok_or(format!("no set {name}"))?;
                    els.remove(key)
                        .ok_or(format!("no element {key} in {name}"))?;
                }
            }
            _ => return Err("unknown command".into()),
        }
        Ok(())
    }

    /// What the differ would read back from this kernel.
    fn live_state(&self, rs_for_bases: &Ruleset) -> LiveState {
        LiveState {
            table: self.table,
            chains: self
                .chains
                .iter()
                .map(|(n, rules)| {
                    let fp = rules.first().and_then(|r| {
                        let c = r.rsplit_once("comment \"")?.1.strip_suffix('"')?;
                        fingerprint_of_comment(c)
                    });
                    let base = rs_for_bases.chains.get(n.as_str()).and_then(|c| c.base);
                    (
                        n.as_str().into(),
                        LiveChain {
                            base,
                            fingerprint: fp,
                            rules: rules.len(),
                        },
                    )
                })
                .collect(),
            sets: self
                .sets
                .iter()
                .map(|(n, (_, els))| {
                    let signature = rs_for_bases.sets[n].signature();
                    let elements = els
                        .iter()
                        .map(|(k, v)| {
                            (
                                k.as_str().into(),
                                match v.as_deref().and_then(parse_endpoint) {
                                    Some(to) => LiveSet::endpoint_element(to),
                                    None => LiveSet::element(v.as_deref().map(parse_verdict)),
                                },
                            )
                        })
                        .collect();
                    (
                        n.clone(),
                        LiveSet {
                            signature,
                            elements,
                        },
                    )
                })
                .collect(),
        }
    }
}

/// The data of an endpoint map's element, `10.42.0.1 . 8080`.
fn parse_endpoint(v: &str) -> Option<(std::net::IpAddr, u16)> {
    let (a, p) = v.split_once(" . ")?;
    Some((a.parse().ok()?, p.parse().ok()?))
}

fn parse_verdict(v: &str) -> Verdict {
    match v.split_once(' ') {
        Some(("goto", c)) => Verdict::Goto(c.into()),
        Some(("jump", c)) => Verdict::Jump(c.into()),
        _ => match v {
            "accept" => Verdict::Accept,
            "drop" => Verdict::Drop,
            "return" => Verdict::Return,
            _ => panic!("verdict {v}"),
        },
    }
}

/// Applies diff(live A -> B) to a kernel holding A and checks it then holds exactly B.
fn check_transition(a: &Ruleset, b: &Ruleset) -> Changes {
    let mut k = Kernel::loaded(a);
    assert_eq!(
        k.live_state(a),
        LiveState::of(a),
        "the model reads A back as A"
    );
    let ch = diff(&LiveState::of(a), b);
    k.apply(&ch.script)
        .unwrap_or_else(|e| panic!("refused: {e}\nscript:\n{}", ch.script));
    assert_eq!(
        k.live_state(b),
        LiveState::of(b),
        "after diff(A->B) the kernel holds B"
    );
    assert_eq!(
        k,
        Kernel::loaded(b),
        "rules and elements as a full load of B"
    );
    ch
}

// ---- tests ----

#[test]
fn from_nothing_is_a_full_load() {
    let rs = planned(&seed_services());
    let ch = diff(&LiveState::default(), &rs);
    assert!(ch.full);
    assert_eq!(ch.script, rs.render_full());
    assert!(!ch.script.contains("delete table"), "nothing to delete");
    assert_counts(&ch, rs.chains.len(), 0, 0, elements(&rs), 0);
    let k = Kernel::loaded(&rs);
    assert_eq!(k.live_state(&rs), LiveState::of(&rs));
}

#[test]
fn nothing_changed_means_an_empty_script() {
    for services in [vec![], seed_services(), many_services(100)] {
        let rs = planned(&services);
        let ch = diff(&LiveState::of(&rs), &rs);
        assert!(ch.is_empty(), "{}", ch.script);
        assert_eq!(ch, Changes::default());
    }
}

#[test]
fn a_rule_deleted_or_added_behind_our_back_is_repaired() {
    let rs = planned(&many_services(10));
    let name = "service-default/app-4/tcp/80";
    for drift in [-1i64, 1] {
        // The first rule (and its fingerprint) is intact; the count is not.
        let mut live = LiveState::of(&rs);
        let c = live.chains.get_mut(name).expect("planned chain");
        c.rules = (c.rules as i64 + drift) as usize;
        let ch = diff(&live, &rs);
        assert_eq!(ch.chains_changed, 1, "{}", ch.script);
        assert_eq!(
            lines(&ch.script)[0],
            format!("flush chain inet ferry {name}")
        );
    }
}

#[test]
fn one_more_endpoint_rewrites_one_chain_and_nothing_else() {
    let before = many_services(100);
    let a = planned(&before);

    // A pod of this node new to the table: one chain (it goes to the draw among one more),
    // the endpoint's draw in the endpoint map, and the pod's hairpin entry. The first service
    // with three endpoints brings the chain that draws among three.
    let mut after = before.clone();
    after[42].ports[0]
        .endpoints
        .push(ep("10.42.9.9", 8080).on(NODE));
    let b = planned(&after);
    let ch = check_transition(&a, &b);
    assert_counts(&ch, 1, 1, 0, 2, 0);
    assert!(ch
        .script
        .contains("flush chain inet ferry service-default/app-42/tcp/80"));
    assert!(ch
        .script
        .contains("add rule inet ferry service-default/app-42/tcp/80 goto choose-3-tcp-v4"));
    assert!(ch
        .script
        .contains("add rule inet ferry choose-3-tcp-v4 meta l4proto tcp dnat ip to ip daddr . tcp dport . numgen random mod 3 map @endpoints-tcp-v4"));
    assert!(ch.script.contains(
        "add element inet ferry endpoints-tcp-v4 { 10.43.1.43 . 80 . 2 : 10.42.9.9 . 8080 }"
    ));
    assert!(ch
        .script
        .contains("add element inet ferry hairpin-v4 { 10.42.9.9 . 10.42.9.9 }"));

    // A pod that already backs another service: the chain and the draw.
    let mut after = before.clone();
    let shared = before[7].ports[0].endpoints[0].clone();
    after[42].ports[0].endpoints.push(shared);
    let ch = check_transition(&a, &planned(&after));
    assert_counts(&ch, 1, 1, 0, 1, 0);

    // Two services with three endpoints: the second finds the chain that draws among three.
    let mut after2 = after.clone();
    let shared = before[7].ports[0].endpoints[0].clone();
    after2[43].ports[0].endpoints.push(shared);
    let ch = check_transition(&planned(&after), &planned(&after2));
    assert_counts(&ch, 0, 1, 0, 1, 0);
    // And when the first goes back to two, the chain stays for the second.
    let mut after3 = after2.clone();
    after3[42].ports[0].endpoints.pop();
    let ch = check_transition(&planned(&after2), &planned(&after3));
    assert_counts(&ch, 0, 1, 0, 0, 1);

    // A pod of another node: the chain and the draw, no hairpin entry (its own node DNATs its
    // packets, so it never comes back to itself through this one).
    let mut after = before.clone();
    after[42].ports[0].endpoints.push(ep("10.42.9.9", 8080));
    let ch = check_transition(&a, &planned(&after));
    assert_counts(&ch, 1, 1, 0, 1, 0);
    assert!(!ch.script.contains("hairpin"), "{}", ch.script);

    // An endpoint replaced by another (a rolling update): no chain, one element changed in
    // place (deleted and added with the new endpoint), and the old pod's hairpin entry gone.
    let mut after = before.clone();
    after[42].ports[0].endpoints[1] = ep("10.42.9.9", 8080);
    let ch = check_transition(&a, &planned(&after));
    assert_counts(&ch, 0, 0, 0, 1, 2);
    assert!(!ch.script.contains("chain"), "{}", ch.script);
    assert!(ch.script.contains(
        "add element inet ferry endpoints-tcp-v4 { 10.43.1.43 . 80 . 1 : 10.42.9.9 . 8080 }"
    ));
}

#[test]
fn removing_a_service_deletes_its_chains_and_elements() {
    let mut before = many_services(10);
    before.push(
        Svc::new("web", "10.43.2.1")
            .node_port(Protocol::Tcp, 80, 30080, &[ep("10.42.7.1", 80).on(NODE)])
            .build(),
    );
    let a = planned(&before);
    let b = planned(&before[..10]);
    let ch = check_transition(&a, &b);
    // service- and external- chains; service-ips, node port, cluster-ips, cluster-ip-ports
    // and hairpin entries.
    assert_counts(&ch, 0, 0, 2, 0, 5);
    let l = lines(&ch.script);
    for want in [
        "delete element inet ferry service-ips-v4 { 10.43.2.1 . tcp . 80 }",
        "delete element inet ferry cluster-ip-ports-v4 { 10.43.2.1 . tcp . 80 }",
        "delete element inet ferry service-nodeports-v4 { tcp . 30080 }",
        "delete element inet ferry cluster-ips-v4 { 10.43.2.1 }",
        "delete element inet ferry hairpin-v4 { 10.42.7.1 . 10.42.7.1 }",
        "delete chain inet ferry service-default/web/tcp/80",
        "delete chain inet ferry external-default/web/tcp/80",
    ] {
        assert!(l.contains(&want), "missing {want:?} in:\n{}", ch.script);
    }
}

#[test]
fn losing_the_last_endpoint_moves_the_service_to_the_no_endpoint_map() {
    let before = many_services(5);
    let a = planned(&before);
    let mut after = before.clone();
    after[3].ports[0].endpoints.clear();
    let ch = check_transition(&a, &planned(&after));
    // -service-ips, -2 hairpin, -2 draws, +no-endpoint-services.
    assert_counts(&ch, 0, 0, 1, 1, 5);
    let l = lines(&ch.script);
    let pos = |want: &str| {
        l.iter()
            .position(|x| x.starts_with(want))
            .unwrap_or_else(|| panic!("missing {want:?} in:\n{}", ch.script))
    };
    let del = pos("delete element inet ferry service-ips-v4 { 10.43.1.4 . tcp . 80 }");
    let add = pos(
        "add element inet ferry no-endpoint-services-v4 { 10.43.1.4 . tcp . 80 comment \"default/app-3 80/TCP\" : goto reject-service }",
    );
    let gone = pos("delete chain inet ferry service-default/app-3/tcp/80");
    assert!(
        del < gone,
        "the map must stop naming the chain before it goes"
    );
    assert!(add > 0);
}

#[test]
fn a_changed_verdict_deletes_and_re_adds_the_key() {
    // Local policies, no endpoint on this node: rejected while no node has one (as
    // kube-proxy), dropped once another node has one, at the same keys.
    let local = |eps: &[ResolvedEndpoint]| {
        Svc::new("web", "10.43.2.1")
            .node_port(Protocol::Tcp, 80, 30080, eps)
            .external_policy_local()
            .internal_policy_local()
            .build()
    };
    let a = planned(&[local(&[])]);
    let b = planned(&[local(&[ep("10.42.1.170", 80)])]);
    let ch = check_transition(&a, &b);
    assert_counts(&ch, 0, 0, 0, 2, 2);
    assert_eq!(
        lines(&ch.script),
        [
            "delete element inet ferry no-endpoint-nodeports-v4 { tcp . 30080 }",
            "add element inet ferry no-endpoint-nodeports-v4 { tcp . 30080 comment \"default/web 80/TCP\" : drop }",
            "delete element inet ferry no-endpoint-services-v4 { 10.43.2.1 . tcp . 80 }",
            "add element inet ferry no-endpoint-services-v4 { 10.43.2.1 . tcp . 80 comment \"default/web 80/TCP\" : drop }",
        ]
    );

    // With a local endpoint: goto external-... becomes goto local-..., chains swap.
    let eps = [ep("10.42.0.85", 80).on(NODE)];
    let a = planned(&[Svc::new("web", "10.43.2.1")
        .node_port(Protocol::Tcp, 80, 30080, &eps)
        .build()]);
    let b = planned(&[Svc::new("web", "10.43.2.1")
        .node_port(Protocol::Tcp, 80, 30080, &eps)
        .external_policy_local()
        .build()]);
    let ch = check_transition(&a, &b);
    assert_counts(&ch, 1, 0, 1, 1, 1);
    assert!(ch
        .script
        .contains("delete element inet ferry service-nodeports-v4 { tcp . 30080 }"));
    assert!(ch.script.contains(": goto local-default/web/tcp/80 }"));
}

#[test]
fn a_changed_layout_replaces_the_table_in_one_transaction() {
    let rs = planned(&seed_services());
    let mut live = LiveState::of(&rs);
    live.sets.get_mut("hairpin-v4").unwrap().signature = "ipv4_addr".into();
    let ch = diff(&live, &rs);
    assert!(ch.full);
    assert_eq!(lines(&ch.script)[0], "delete table inet ferry");
    assert_eq!(
        ch.script,
        format!("delete table inet ferry\n{}", rs.render_full())
    );

    let mut live = LiveState::of(&rs);
    live.chains.get_mut("nat-output").unwrap().base = None;
    assert!(diff(&live, &rs).full, "a base chain that is not one");
}

#[test]
fn maps_and_chains_no_longer_planned_are_removed_even_when_they_reference_each_other() {
    let b = planned(&seed_services());
    let a = with_leftovers(b.clone());
    let ch = check_transition(&a, &b);
    assert!(!ch.full);
    assert_eq!(ch.chains_deleted, 1);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// From any planned A to any B (B mostly A with some services changed, added or removed):
    /// the script is accepted by the kernel model, leaves exactly B, counts what it does, and
    /// B compared with itself is empty.
    #[test]
    fn any_transition_lands_on_the_plan(
        a in service_specs(16),
        other in service_specs(20),
        changes in proptest::collection::vec(change(), 20),
    ) {
        let cfg = with_lb_pools(dual_stack_config());
        let ra = plan(&cfg, &services_from_specs(&a));
        let rb = plan(&cfg, &evolve(&a, &other, &changes));
        let ch = check_transition(&ra, &rb);
        prop_assert!(!ch.full);

        let (la, lb) = (LiveState::of(&ra), LiveState::of(&rb));
        let names = |l: &LiveState| l.chains.keys().cloned().collect::<BTreeSet<_>>();
        prop_assert_eq!(ch.chains_added, names(&lb).difference(&names(&la)).count());
        prop_assert_eq!(ch.chains_deleted, names(&la).difference(&names(&lb)).count());
        let changed = lb.chains.iter()
            .filter(|(n, c)| la.chains.get(*n).is_some_and(|old| old.fingerprint != c.fingerprint))
            .count();
        prop_assert_eq!(ch.chains_changed, changed);
        let (mut added, mut deleted) = (0, 0);
        for (n, s) in &lb.sets {
            // Sets may come and go (a new client-affinity map): a new one held nothing.
            let none = BTreeMap::new();
            let old = la.sets.get(n).map_or(&none, |s| &s.elements);
            let same = |a: Option<&std::sync::Arc<ferry_plan::ir::Element>>, b: &ferry_plan::ir::Element| {
                a.is_some_and(|a| a.same_value(b))
            };
            added += s.elements.iter().filter(|(k, v)| !same(old.get(*k), v)).count();
            deleted += old.iter().filter(|(k, v)| !same(s.elements.get(*k), v)).count();
        }
        prop_assert_eq!((ch.elements_added, ch.elements_deleted), (added, deleted));
        prop_assert_eq!(ch.script.matches("flush chain").count(), ch.chains_changed + ch.chains_deleted);
        prop_assert_eq!(ch.is_empty(), la == lb);

        prop_assert!(diff(&lb, &rb).is_empty());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The incremental path: the planner's update and the touched-only script, over a history
    /// of snapshots, keep the kernel (model) exactly at a full load of each plan, and the
    /// tracked state equal to what a full read would give.
    #[test]
    fn touched_only_scripts_land_on_the_plan(
        a in service_specs(12),
        other in service_specs(14),
        c1 in proptest::collection::vec(change(), 14),
        c2 in proptest::collection::vec(change(), 14),
    ) {
        use ferry_plan::diff::diff_touched;
        use ferry_plan::plan::Planner;
        let cfg = with_lb_pools(dual_stack_config());
        let history = [
            services_from_specs(&a),
            evolve(&a, &other, &c1),
            evolve(&other, &a, &c2),
            services_from_specs(&a),
        ];
        let mut p = Planner::default();
        let (rs0, t0) = p.update(&cfg, &history[0]);
        prop_assert!(t0.full);
        let mut k = Kernel::loaded(rs0);
        let mut live = LiveState::of(rs0);
        for snap in &history[1..] {
            let (rs, t) = p.update(&cfg, snap);
            prop_assert!(!t.full);
            // A set that comes or goes (client-affinity maps) needs the full comparison, as
            // the dataplane then does.
            let touched_only = diff_touched(&live, rs, &t);
            let sets_change = live.sets.keys().ne(rs.sets.keys());
            prop_assert_eq!(touched_only.is_none(), sets_change);
            let ch = touched_only.clone().unwrap_or_else(|| diff(&live, rs));
            k.apply(&ch.script)
                .unwrap_or_else(|e| panic!("refused: {e}\nscript:\n{}", ch.script));
            if touched_only.is_some() {
                live.update_touched(rs, &t);
            } else {
                live = LiveState::of(rs);
            }
            prop_assert_eq!(&live, &LiveState::of(rs));
            prop_assert_eq!(&k, &Kernel::loaded(rs));
            prop_assert_eq!(rs, &plan(&cfg, snap));
        }
    }
}
