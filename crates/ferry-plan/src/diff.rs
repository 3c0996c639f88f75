//! What the kernel has ([`LiveState`]) vs what is planned ([`Ruleset`]) -> one `nft` script that
//! changes only what differs, applied as one atomic transaction.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::ir::*;
use crate::plan::Touched;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveChain {
    pub base: Option<BaseChain>,
    /// From the first rule's comment; None when the chain has no rule or no fingerprint.
    pub fingerprint: Option<Fingerprint>,
    /// How many rules the chain holds: a rule deleted or added behind ferry's back leaves the
    /// first rule's fingerprint as it was, but not the count.
    pub rules: usize,
}

#[derive(Debug, Clone, Default)]
pub struct LiveSet {
    /// As [`Set::signature`].
    pub signature: String,
    /// Key text -> the element (its verdict for maps; see [`LiveSet::element`]). After an
    /// apply these are the planned table's keys and elements, shared (not copies).
    pub elements: BTreeMap<crate::ir::Key, std::sync::Arc<Element>>,
}

/// Equal when the kernel would hold the same: the signature, and the same keys with the same
/// verdicts (elements' comments are not read back).
impl PartialEq for LiveSet {
    fn eq(&self, o: &LiveSet) -> bool {
        self.signature == o.signature
            && self.elements.len() == o.elements.len()
            && self
                .elements
                .iter()
                .zip(&o.elements)
                .all(|((ka, a), (kb, b))| ka == kb && a.same_value(b))
    }
}

impl Eq for LiveSet {}

impl LiveSet {
    /// An element read back from the kernel: what the differ compares is its verdict (plain
    /// sets' members share one bare element).
    pub fn element(verdict: Option<Verdict>) -> std::sync::Arc<Element> {
        Element::shared(verdict, String::new())
    }
    /// An element of a map to endpoints read back from the kernel.
    pub fn endpoint_element(to: (std::net::IpAddr, u16)) -> std::sync::Arc<Element> {
        Element::endpoint(to.0, to.1)
    }
}

/// ferry's table as the kernel has it (read back at start-up, then tracked after each apply).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LiveState {
    pub table: bool,
    pub chains: BTreeMap<Key, LiveChain>,
    pub sets: BTreeMap<String, LiveSet>,
}

impl LiveState {
    /// What the kernel holds once `rs` has been applied.
    pub fn of(rs: &Ruleset) -> LiveState {
        LiveState {
            table: true,
            chains: rs
                .chains
                .values()
                .map(|c| {
                    let fp = (!c.rules.is_empty()).then(|| c.fingerprint());
                    (
                        c.name.clone(),
                        LiveChain {
                            base: c.base,
                            fingerprint: fp,
                            rules: c.rules.len(),
                        },
                    )
                })
                .collect(),
            sets: rs
                .sets
                .values()
                .map(|s| {
                    (
                        s.name.clone(),
                        LiveSet {
                            signature: s.signature(),
                            // What packets write in a dynamic set is not ferry's to track.
                            elements: s
                                .elements
                                .iter()
                                .filter(|_| !s.dynamic)
                                .map(|(k, e)| (k.clone(), e.clone()))
                                .collect(),
                        },
                    )
                })
                .collect(),
        }
    }
}

impl LiveState {
    /// After a successful [`diff_touched`] script: the kernel holds `desired` for everything
    /// touched.
    pub fn update_touched(&mut self, desired: &Ruleset, touched: &Touched) {
        for c in &touched.chains {
            match desired.chains.get(c) {
                Some(x) => {
                    self.chains.insert(
                        c.clone(),
                        LiveChain {
                            base: x.base,
                            fingerprint: (!x.rules.is_empty()).then(|| x.fingerprint()),
                            rules: x.rules.len(),
                        },
                    );
                }
                None => {
                    self.chains.remove(c);
                }
            }
        }
        for (set, keys) in &touched.elements {
            let (Some(ds), Some(ls)) = (desired.sets.get(set), self.sets.get_mut(set)) else {
                continue;
            };
            for k in keys {
                match ds.elements.get(k) {
                    Some(e) => {
                        ls.elements.insert(k.clone(), e.clone());
                    }
                    None => {
                        ls.elements.remove(k);
                    }
                }
            }
        }
    }
}

/// The script for what the planner touched only (see [`crate::plan::Planner::update`]): the
/// touched part of both sides goes through [`diff`], with every set present on both so that
/// none is created or deleted. None when this cannot be done (everything touched, or a planned
/// set the kernel lacks): then diff everything.
pub fn diff_touched(live: &LiveState, desired: &Ruleset, touched: &Touched) -> Option<Changes> {
    diff_touched_with(live, desired, touched, true)
}

/// [`diff_touched`] without the text script (the steps only: [`Changes::ops`]).
pub fn diff_touched_ops(live: &LiveState, desired: &Ruleset, touched: &Touched) -> Option<Changes> {
    diff_touched_with(live, desired, touched, false)
}

fn diff_touched_with(
    live: &LiveState,
    desired: &Ruleset,
    touched: &Touched,
    render: bool,
) -> Option<Changes> {
    // Sets come and go (an affinity map per generation of a service port's endpoints): the
    // full comparison creates and deletes them.
    if touched.full
        || !live.table
        || !desired.sets.keys().all(|n| live.sets.contains_key(n))
        || !live.sets.keys().all(|n| desired.sets.contains_key(n))
    {
        return None;
    }
    let mut want = Ruleset::default();
    let mut have = LiveState {
        table: true,
        ..LiveState::default()
    };
    for (name, s) in &desired.sets {
        let l = &live.sets[name];
        if l.signature != s.signature() {
            return None;
        }
        want.sets.insert(
            name.clone(),
            Set {
                name: s.name.clone(),
                key: s.key.clone(),
                is_vmap: s.is_vmap,
                interval: s.interval,
                data: s.data.clone(),
                dynamic: s.dynamic,
                proto: s.proto,
                comment: s.comment.clone(),
                elements: BTreeMap::new(),
            },
        );
        have.sets.insert(
            name.clone(),
            LiveSet {
                signature: l.signature.clone(),
                elements: BTreeMap::new(),
            },
        );
    }
    for c in &touched.chains {
        if let Some(x) = desired.chains.get(c) {
            want.chains.insert(c.clone(), x.clone());
        }
        if let Some(l) = live.chains.get(c) {
            have.chains.insert(c.clone(), l.clone());
        }
    }
    for (set, keys) in &touched.elements {
        let (Some(ds), Some(ls)) = (desired.sets.get(set), live.sets.get(set)) else {
            continue;
        };
        for k in keys {
            if let (Some(e), Some(w)) = (ds.elements.get(k), want.sets.get_mut(set)) {
                w.elements.insert(k.clone(), e.clone());
            }
            if let (Some(v), Some(h)) = (ls.elements.get(k), have.sets.get_mut(set)) {
                h.elements.insert(k.clone(), v.clone());
            }
        }
    }
    Some(diff_with(&have, &want, render))
}

/// Extracts the fingerprint from a rule comment ending in "[fp]" (None when there is none, or
/// what is there is not one ferry writes).
pub fn fingerprint_of_comment(comment: &str) -> Option<Fingerprint> {
    let c = comment.trim_end();
    let open = c.rfind('[')?;
    if !c.ends_with(']') {
        return None;
    }
    Fingerprint::parse(&c[open + 1..c.len() - 1])
}

/// One step of a change, by name: what [`Changes::script`] says, for a backend that builds its
/// own messages (the objects themselves are the planned table's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Replace the whole table with the planned one (`replace`: delete the one there first).
    Full {
        replace: bool,
    },
    /// Create the planned set (empty).
    AddSet(String),
    /// Create the planned chain (empty).
    AddChain(Key),
    /// Append all the planned chain's rules.
    AddRules(Key),
    /// Delete every rule of a chain.
    FlushChain(Key),
    /// Add these planned elements (by key text).
    AddElements(String, Vec<String>),
    /// Delete these elements (by the key text the kernel's were read back as).
    DeleteElements(String, Vec<String>),
    DeleteSet(String),
    DeleteChain(Key),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// The `nft -f` script; empty when nothing differs.
    pub script: String,
    /// The same steps, in the same order.
    pub ops: Vec<Op>,
    pub chains_added: usize,
    pub chains_changed: usize,
    pub chains_deleted: usize,
    pub elements_added: usize,
    pub elements_deleted: usize,
    /// The whole table is recreated (first start, or a layout the differ can't patch).
    pub full: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

impl std::fmt::Display for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}chains +{} ~{} -{}, elements +{} -{}",
            if self.full { "full load: " } else { "" },
            self.chains_added,
            self.chains_changed,
            self.chains_deleted,
            self.elements_added,
            self.elements_deleted
        )
    }
}

/// Elements to delete (live, and gone or changed) and to add (planned, and new or changed).
fn merge_elements<'a>(
    live: &'a BTreeMap<crate::ir::Key, std::sync::Arc<Element>>,
    want: &'a BTreeMap<crate::ir::Key, std::sync::Arc<Element>>,
) -> (Vec<&'a str>, Vec<(&'a str, &'a Element)>) {
    use std::cmp::Ordering;
    let (mut del, mut add) = (Vec::new(), Vec::new());
    let mut l = live.iter().map(|(k, v)| (&**k, v)).peekable();
    let mut w = want.iter().map(|(k, e)| (&**k, &**e)).peekable();
    loop {
        match (l.peek().copied(), w.peek().copied()) {
            (None, None) => break,
            (Some((lk, _)), None) => {
                del.push(lk);
                l.next();
            }
            (None, Some(we)) => {
                add.push(we);
                w.next();
            }
            (Some((lk, lv)), Some((wk, we))) => match lk.cmp(wk) {
                Ordering::Less => {
                    del.push(lk);
                    l.next();
                }
                Ordering::Greater => {
                    add.push((wk, we));
                    w.next();
                }
                Ordering::Equal => {
                    if !lv.same_value(we) {
                        del.push(lk);
                        add.push((wk, we));
                    }
                    l.next();
                    w.next();
                }
            },
        }
    }
    (del, add)
}

/// The commands that turn `live` into `desired`, touching nothing that is already right.
pub fn diff(live: &LiveState, desired: &Ruleset) -> Changes {
    let ch = diff_with(live, desired, true);
    debug_assert_eq!(ch.ops.is_empty(), ch.script.is_empty(), "{ch:?}");
    ch
}

/// [`diff`] without the text script: the steps only ([`Changes::ops`]), for a backend that
/// writes them itself (rendering ~100 MB of text at 10,000 services costs ~0.2 s).
pub fn diff_ops(live: &LiveState, desired: &Ruleset) -> Changes {
    diff_with(live, desired, false)
}

fn diff_with(live: &LiveState, desired: &Ruleset, render: bool) -> Changes {
    let incompatible = desired.sets.values().any(|s| {
        live.sets
            .get(&s.name)
            .is_some_and(|l| l.signature != s.signature())
    }) || desired
        .chains
        .values()
        .any(|c| live.chains.get(&c.name).is_some_and(|l| l.base != c.base));
    if !live.table || incompatible {
        let mut script = String::new();
        if render {
            if live.table {
                // A different layout (an upgrade): replace the table in the same transaction.
                let _ = writeln!(script, "delete table {FAMILY} {TABLE}");
            }
            script.push_str(&desired.render_full());
        }
        return Changes {
            script,
            ops: vec![Op::Full {
                replace: live.table,
            }],
            chains_added: desired.chains.len(),
            elements_added: desired.sets.values().map(|s| s.elements.len()).sum(),
            full: true,
            ..Changes::default()
        };
    }

    let mut ch = Changes::default();
    let mut out = String::new();
    // 1. New sets, 2. new (empty) chains: everything a rule or element may name exists first.
    let mut ops = Vec::new();
    for s in desired.sets.values() {
        if !live.sets.contains_key(&s.name) {
            if render {
                out.push_str(&s.render_def());
                out.push('\n');
            }
            ops.push(Op::AddSet(s.name.clone()));
        }
    }
    for c in desired.chains.values() {
        if !live.chains.contains_key(&c.name) {
            if render {
                out.push_str(&c.render_add());
                out.push('\n');
            }
            ops.push(Op::AddChain(c.name.clone()));
            ch.chains_added += 1;
        }
    }
    // 3. Rules of new and changed chains.
    for c in desired.chains.values() {
        match live.chains.get(&c.name) {
            None => {
                if render {
                    c.render_rules(&mut out);
                }
                if !c.rules.is_empty() {
                    ops.push(Op::AddRules(c.name.clone()));
                }
            }
            Some(l) => {
                let want = (!c.rules.is_empty()).then(|| c.fingerprint());
                if l.fingerprint != want
                    || want.is_none() && !c.rules.is_empty()
                    || l.rules != c.rules.len()
                {
                    if render {
                        let _ = writeln!(out, "flush chain {FAMILY} {TABLE} {}", c.name);
                        c.render_rules(&mut out);
                    }
                    ops.push(Op::FlushChain(c.name.clone()));
                    if !c.rules.is_empty() {
                        ops.push(Op::AddRules(c.name.clone()));
                    }
                    ch.chains_changed += 1;
                }
            }
        }
    }
    // 4. Elements: delete what is gone or changed, then add what is new or changed.
    let empty = LiveSet::default();
    for s in desired.sets.values().filter(|s| !s.dynamic) {
        // Dynamic sets' elements are written by packets (client affinity): never touched.
        let l = live.sets.get(&s.name).unwrap_or(&empty);
        // Both maps are sorted by key text: one merge pass finds what to delete and add (keys
        // read back from the kernel are kept as text, and deleted by that text).
        let (del, add) = merge_elements(&l.elements, &s.elements);
        for chunk in del.chunks(1000).filter(|_| render) {
            let _ = writeln!(
                out,
                "delete element {FAMILY} {TABLE} {} {{ {} }}",
                s.name,
                chunk.join(", ")
            );
        }
        ch.elements_deleted += del.len();
        ch.elements_added += add.len();
        if !del.is_empty() {
            ops.push(Op::DeleteElements(
                s.name.clone(),
                del.iter().map(|k| k.to_string()).collect(),
            ));
        }
        if !add.is_empty() {
            ops.push(Op::AddElements(
                s.name.clone(),
                add.iter().map(|(k, _)| k.to_string()).collect(),
            ));
        }
        if render {
            render_elements(&mut out, "add", &s.name, add.into_iter());
        }
    }
    // 5. Chains no longer planned: empty them all, then delete (they may reference each other).
    let gone: Vec<&Key> = live
        .chains
        .keys()
        .filter(|n| !desired.chains.contains_key(*n))
        .collect();
    for n in &gone {
        if render {
            let _ = writeln!(out, "flush chain {FAMILY} {TABLE} {n}");
        }
        ops.push(Op::FlushChain((*n).clone()));
    }
    // 6. Sets no longer planned, once no rule names them and before the chains their
    // elements may still jump to.
    for n in live.sets.keys().filter(|n| !desired.sets.contains_key(*n)) {
        let kind = if live.sets[n].signature.contains(" : ") {
            "map"
        } else {
            "set"
        };
        if render {
            let _ = writeln!(out, "delete {kind} {FAMILY} {TABLE} {n}");
        }
        ops.push(Op::DeleteSet(n.to_string()));
    }
    for n in &gone {
        if render {
            let _ = writeln!(out, "delete chain {FAMILY} {TABLE} {n}");
        }
        ops.push(Op::DeleteChain((*n).clone()));
    }
    ch.chains_deleted = gone.len();
    ch.script = out;
    ch.ops = ops;
    ch
}
