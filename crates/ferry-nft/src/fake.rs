//! [`Fake`]: an in-memory kernel behind [`Backend`], for fast tests of the logic above the
//! kernel (what [`crate::Tables`] and [`crate::Dataplane`] decide to send, in what order, and
//! how they recover), with no root and no network namespace. The kernel tests remain the
//! reference for what the kernel accepts and reads back; this is an addition, not a substitute.
//!
//! It holds tables, chains, rules, sets and elements, and applies a transaction the way
//! nf_tables does, all or nothing, with the checks that matter to ferry: deleting what is not
//! there, a chain or set still in use, or a table's object in a table that does not exist
//! fails the transaction; so do a rule or element naming a set or chain that does not exist,
//! a jump to a base chain, and adding an object that exists with another definition (another
//! hook, another type, another verdict at the same key; re-adding the same is accepted, as
//! ferry's messages carry no `NLM_F_EXCL`). It reads back exactly what it holds.
//!
//! It counts: each committed transaction is recorded ([`Record`]: its operations, the tables
//! it touched, the base chains it created). And it takes faults: fail the next transaction
//! ([`Fake::fail_next`]), refuse every one ([`Fake::refuse`]), refuse everything as a kernel
//! without netlink would ([`Fake::unavailable`]), carry the table `ferry` only as the text path
//! does ([`Fake::text_like`]), and change the tables behind ferry's back ([`Fake::drop_rule`],
//! [`Fake::flush_table`], [`Fake::delete_table`], [`Fake::delete_element`]).
//!
//! A `Fake` is a handle: clones share the kernel, so a test keeps one to look and meddle
//! while the dataplane owns another. [`Fake::path`] makes a handle on the same kernel with
//! faults and a label of its own: two paths to one kernel, as netlink and libnftables are.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_plan::diff::{fingerprint_of_comment, LiveChain, LiveSet, Op};
use ferry_plan::ir::{BaseChain, Chain, Key, Verdict, TABLE};
use ferry_plan::{LiveState, Ruleset};

use crate::backend::{Backend, Step};
use crate::NftError;

/// A rule as the fake holds it: its text (without comment), its comment, and what it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeRule {
    pub text: String,
    pub comment: Option<String>,
    /// Sets named (`@set`).
    pub sets: Vec<String>,
    /// Chains jumped or gone to.
    pub chains: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeChain {
    pub base: Option<BaseChain>,
    pub rules: Vec<FakeRule>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeSet {
    pub signature: String,
    /// Key text -> the element's verdict (maps of verdicts) or endpoint (maps to endpoints),
    /// or neither.
    pub elements: BTreeMap<Key, FakeValue>,
}

/// What an element holds besides its key.
pub type FakeValue = (Option<Verdict>, Option<(std::net::IpAddr, u16)>);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeTable {
    pub chains: BTreeMap<String, FakeChain>,
    pub sets: BTreeMap<String, FakeSet>,
}

/// One committed transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// The label of the handle that committed it (see [`Fake::path`]).
    pub via: String,
    /// Operations: one per table, chain, set, rule or element created or deleted.
    pub ops: usize,
    /// The tables whose objects it changed, in the order first touched.
    pub tables: Vec<String>,
    /// Base chains it created: (table, chain).
    pub hooks: Vec<(String, String)>,
    pub created: Vec<String>,
    pub deleted: Vec<String>,
}

#[derive(Debug, Default)]
struct Kernel {
    tables: BTreeMap<String, FakeTable>,
    records: Vec<Record>,
    /// Transactions refused (injected or by the checks).
    refused: usize,
}

#[derive(Debug, Default)]
struct Faults {
    fail_next: Option<String>,
    refuse: Option<String>,
    unavailable: bool,
    text_like: bool,
}

/// An in-memory nf_tables (see the module's documentation).
#[derive(Debug, Clone)]
pub struct Fake {
    kernel: Arc<Mutex<Kernel>>,
    faults: Arc<Mutex<Faults>>,
    label: &'static str,
}

impl Default for Fake {
    fn default() -> Self {
        Fake::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Fake {
    /// An empty kernel, reached by a handle labelled "fake".
    pub fn new() -> Fake {
        Fake {
            kernel: Arc::default(),
            faults: Arc::default(),
            label: "fake",
        }
    }

    /// Another handle on the same kernel, with its own label and faults.
    pub fn path(&self, label: &'static str) -> Fake {
        Fake {
            kernel: self.kernel.clone(),
            faults: Arc::default(),
            label,
        }
    }

    // ---- faults ----

    /// The next transaction through this handle is refused (changing nothing).
    pub fn fail_next(&self, why: &str) {
        lock(&self.faults).fail_next = Some(why.to_string());
    }

    /// Every transaction through this handle is refused, as a kernel refuses a batch.
    pub fn refuse(&self, why: &str) {
        lock(&self.faults).refuse = Some(why.to_string());
    }

    /// Everything through this handle is [`NftError::Unavailable`], as netlink is where its
    /// sockets are refused.
    pub fn unavailable(&self) {
        lock(&self.faults).unavailable = true;
    }

    /// This handle carries the objects of the table `ferry` only, as the text path does.
    pub fn text_like(&self) {
        lock(&self.faults).text_like = true;
    }

    /// Removes the last rule of a chain behind ferry's back; false when there is none.
    pub fn drop_rule(&self, table: &str, chain: &str) -> bool {
        let mut k = lock(&self.kernel);
        k.tables
            .get_mut(table)
            .and_then(|t| t.chains.get_mut(chain))
            .and_then(|c| c.rules.pop())
            .is_some()
    }

    /// `nft flush table`: every rule of every chain goes (chains and sets stay).
    pub fn flush_table(&self, table: &str) -> bool {
        let mut k = lock(&self.kernel);
        let Some(t) = k.tables.get_mut(table) else {
            return false;
        };
        for c in t.chains.values_mut() {
            c.rules.clear();
        }
        true
    }

    /// Deletes a table behind ferry's back.
    pub fn delete_table(&self, table: &str) -> bool {
        lock(&self.kernel).tables.remove(table).is_some()
    }

    /// Deletes an element behind ferry's back.
    pub fn delete_element(&self, table: &str, set: &str, key: &str) -> bool {
        let mut k = lock(&self.kernel);
        k.tables
            .get_mut(table)
            .and_then(|t| t.sets.get_mut(set))
            .and_then(|s| s.elements.remove(key))
            .is_some()
    }

    /// Creates an empty table that is not ferry's (or is: any name).
    pub fn add_table(&self, table: &str) {
        lock(&self.kernel)
            .tables
            .entry(table.to_string())
            .or_default();
    }

    // ---- looking ----

    /// The transactions committed so far, in order.
    pub fn records(&self) -> Vec<Record> {
        lock(&self.kernel).records.clone()
    }

    /// Forgets the records (the kernel's contents stay).
    pub fn clear_records(&self) {
        let mut k = lock(&self.kernel);
        k.records.clear();
        k.refused = 0;
    }

    /// Transactions refused so far (injected faults and failed checks).
    pub fn refused(&self) -> usize {
        lock(&self.kernel).refused
    }

    /// A copy of a table as the fake holds it.
    pub fn table(&self, table: &str) -> Option<FakeTable> {
        lock(&self.kernel).tables.get(table).cloned()
    }

    /// Every table's name.
    pub fn tables(&self) -> Vec<String> {
        lock(&self.kernel).tables.keys().cloned().collect()
    }

    fn faults(&self) -> MutexGuard<'_, Faults> {
        lock(&self.faults)
    }
}

/// What a rule names: sets (`@name`) and chains (`jump name`, `goto name`).
fn references(text: &str) -> (Vec<String>, Vec<String>) {
    let (mut sets, mut chains) = (Vec::new(), Vec::new());
    let mut words = text.split_whitespace().peekable();
    while let Some(w) = words.next() {
        if let Some(s) = w.strip_prefix('@') {
            let s = s.trim_end_matches(|c: char| !(c.is_alphanumeric() || c == '_' || c == '-'));
            sets.push(s.to_string());
        } else if w == "jump" || w == "goto" {
            if let Some(c) = words.peek() {
                chains.push(c.trim_end_matches([';', ',', '}']).to_string());
            }
        }
    }
    (sets, chains)
}

fn fail(what: String) -> NftError {
    NftError::Failed(format!("fake kernel: {what}"))
}

/// The rules of a planned chain as the kernel gets them (the first carries the fingerprint in
/// its comment, as both encoders write it).
fn rules_of(c: &Chain) -> Vec<FakeRule> {
    let fp = c.fingerprint();
    c.rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let comment = if i == 0 {
                Some(fp.in_comment(r.comment.as_deref()))
            } else {
                r.comment.as_deref().map(str::to_string)
            };
            let mut bare = r.clone();
            bare.comment = None;
            let text = bare.render();
            let (sets, chains) = references(&text);
            FakeRule {
                text,
                comment,
                sets,
                chains,
            }
        })
        .collect()
}

/// One transaction applied to a copy of the tables.
struct Txn<'k> {
    tables: &'k mut BTreeMap<String, FakeTable>,
    rec: Record,
}

impl Txn<'_> {
    fn touch(&mut self, table: &str) {
        if !self.rec.tables.iter().any(|t| t == table) {
            self.rec.tables.push(table.to_string());
        }
    }

    fn table(&mut self, name: &str) -> Result<&mut FakeTable, NftError> {
        self.tables
            .get_mut(name)
            .ok_or_else(|| fail(format!("no table {name}")))
    }

    fn create_table(&mut self, name: &str) {
        if !self.tables.contains_key(name) {
            self.tables.insert(name.to_string(), FakeTable::default());
            self.rec.created.push(name.to_string());
            self.rec.ops += 1;
        }
        self.touch(name);
    }

    fn delete_table(&mut self, name: &str) -> Result<(), NftError> {
        self.tables
            .remove(name)
            .ok_or_else(|| fail(format!("delete table {name}: no such table")))?;
        self.rec.deleted.push(name.to_string());
        self.rec.ops += 1;
        self.touch(name);
        Ok(())
    }

    fn add_set(&mut self, t: &str, rs: &Ruleset, name: &str) -> Result<(), NftError> {
        let s = rs
            .sets
            .get(name)
            .ok_or_else(|| fail(format!("set {name} is not planned")))?;
        let signature = s.signature();
        let table = self.table(t)?;
        match table.sets.get(name) {
            Some(have) if have.signature != signature => {
                return Err(fail(format!(
                    "add set {t} {name}: exists as {} (not {signature})",
                    have.signature
                )))
            }
            Some(_) => {}
            None => {
                table.sets.insert(
                    name.to_string(),
                    FakeSet {
                        signature,
                        elements: BTreeMap::new(),
                    },
                );
                self.rec.ops += 1;
            }
        }
        Ok(())
    }

    fn add_chain(&mut self, t: &str, rs: &Ruleset, name: &str) -> Result<(), NftError> {
        let c = rs
            .chains
            .get(name)
            .ok_or_else(|| fail(format!("chain {name} is not planned")))?;
        let table = self.table(t)?;
        match table.chains.get(name) {
            Some(have) if have.base != c.base => {
                return Err(fail(format!(
                    "add chain {t} {name}: exists with another hook"
                )))
            }
            Some(_) => {}
            None => {
                table.chains.insert(
                    name.to_string(),
                    FakeChain {
                        base: c.base,
                        rules: Vec::new(),
                    },
                );
                self.rec.ops += 1;
                if c.base.is_some() {
                    self.rec.hooks.push((t.to_string(), name.to_string()));
                }
            }
        }
        Ok(())
    }

    /// A jump or goto target must exist and be a regular chain.
    fn check_target(table: &FakeTable, t: &str, what: &str, chain: &str) -> Result<(), NftError> {
        match table.chains.get(chain) {
            None => Err(fail(format!("{what}: jumps to {t} {chain}, no such chain"))),
            Some(c) if c.base.is_some() => {
                Err(fail(format!("{what}: jumps to the base chain {t} {chain}")))
            }
            Some(_) => Ok(()),
        }
    }

    fn add_rules(&mut self, t: &str, rs: &Ruleset, name: &str) -> Result<(), NftError> {
        let c = rs
            .chains
            .get(name)
            .ok_or_else(|| fail(format!("chain {name} is not planned")))?;
        let rules = rules_of(c);
        let table = self.table(t)?;
        for r in &rules {
            let what = format!("add rule {t} {name} {}", r.text);
            if let Some(s) = r.sets.iter().find(|s| !table.sets.contains_key(*s)) {
                return Err(fail(format!("{what}: no set {s}")));
            }
            for target in &r.chains {
                Self::check_target(table, t, &what, target)?;
            }
        }
        let n = rules.len();
        table
            .chains
            .get_mut(name)
            .ok_or_else(|| fail(format!("add rule {t} {name}: no such chain")))?
            .rules
            .extend(rules);
        self.rec.ops += n;
        Ok(())
    }

    fn flush_chain(&mut self, t: &str, name: &str) -> Result<(), NftError> {
        let c = self
            .table(t)?
            .chains
            .get_mut(name)
            .ok_or_else(|| fail(format!("flush chain {t} {name}: no such chain")))?;
        let n = c.rules.len();
        c.rules.clear();
        self.rec.ops += n.max(1);
        Ok(())
    }

    fn add_elements(
        &mut self,
        t: &str,
        rs: &Ruleset,
        name: &str,
        keys: &[String],
    ) -> Result<(), NftError> {
        let s = rs
            .sets
            .get(name)
            .ok_or_else(|| fail(format!("set {name} is not planned")))?;
        let table = self.table(t)?;
        let mut add = Vec::with_capacity(keys.len());
        for k in keys {
            let (key, e) = s
                .elements
                .get_key_value(k.as_str())
                .ok_or_else(|| fail(format!("element {name} {k} is not planned")))?;
            if let Some(Verdict::Jump(c) | Verdict::Goto(c)) = e.verdict() {
                Self::check_target(table, t, &format!("add element {t} {name} {k}"), c)?;
            }
            add.push((key.clone(), (e.verdict().cloned(), e.to())));
        }
        let set = table
            .sets
            .get_mut(name)
            .ok_or_else(|| fail(format!("add element {t} {name}: no such set")))?;
        for (k, v) in add {
            match set.elements.get(&k) {
                Some(have) if *have != v => {
                    return Err(fail(format!(
                        "add element {t} {name} {k}: exists with another verdict"
                    )))
                }
                Some(_) => {}
                None => {
                    set.elements.insert(k, v);
                }
            }
        }
        self.rec.ops += keys.len();
        Ok(())
    }

    fn delete_elements(&mut self, t: &str, name: &str, keys: &[String]) -> Result<(), NftError> {
        let set = self
            .table(t)?
            .sets
            .get_mut(name)
            .ok_or_else(|| fail(format!("delete element {t} {name}: no such set")))?;
        for k in keys {
            if set.elements.remove(k.as_str()).is_none() {
                return Err(fail(format!(
                    "delete element {t} {name} {k}: no such element"
                )));
            }
        }
        self.rec.ops += keys.len();
        Ok(())
    }

    fn delete_set(&mut self, t: &str, name: &str) -> Result<(), NftError> {
        let table = self.table(t)?;
        if let Some((c, _)) = table
            .chains
            .iter()
            .find(|(_, c)| c.rules.iter().any(|r| r.sets.iter().any(|s| s == name)))
        {
            return Err(fail(format!("delete set {t} {name}: in use by chain {c}")));
        }
        let s = table
            .sets
            .remove(name)
            .ok_or_else(|| fail(format!("delete set {t} {name}: no such set")))?;
        self.rec.ops += 1 + s.elements.len();
        Ok(())
    }

    fn delete_chain(&mut self, t: &str, name: &str) -> Result<(), NftError> {
        let table = self.table(t)?;
        let c = table
            .chains
            .get(name)
            .ok_or_else(|| fail(format!("delete chain {t} {name}: no such chain")))?;
        if !c.rules.is_empty() {
            return Err(fail(format!(
                "delete chain {t} {name}: holds {} rules",
                c.rules.len()
            )));
        }
        let by_rule = table
            .chains
            .iter()
            .find(|(_, c)| c.rules.iter().any(|r| r.chains.iter().any(|x| x == name)))
            .map(|(n, _)| format!("chain {n}"));
        let by_element = table
            .sets
            .iter()
            .find(|(_, s)| {
                s.elements.values().any(
                    |v| matches!(&v.0, Some(Verdict::Jump(c) | Verdict::Goto(c)) if **c == *name),
                )
            })
            .map(|(n, _)| format!("map {n}"));
        if let Some(user) = by_rule.or(by_element) {
            return Err(fail(format!("delete chain {t} {name}: in use by {user}")));
        }
        table.chains.remove(name);
        self.rec.ops += 1;
        Ok(())
    }

    fn full(&mut self, t: &str, rs: &Ruleset, replace: bool) -> Result<(), NftError> {
        if replace {
            self.delete_table(t)?;
        }
        self.create_table(t);
        for s in rs.sets.keys() {
            self.add_set(t, rs, s)?;
        }
        for c in rs.chains.keys() {
            self.add_chain(t, rs, c)?;
        }
        for c in rs.chains.values().filter(|c| !c.rules.is_empty()) {
            self.add_rules(t, rs, &c.name)?;
        }
        for s in rs
            .sets
            .values()
            .filter(|s| !s.dynamic && !s.elements.is_empty())
        {
            let keys: Vec<String> = s.elements.keys().map(|k| k.to_string()).collect();
            self.add_elements(t, rs, &s.name, &keys)?;
        }
        Ok(())
    }

    fn ops(&mut self, rs: &Ruleset, ops: &[Op]) -> Result<(), NftError> {
        let t = rs.table_name();
        if let [Op::Full { replace }] = ops {
            return self.full(t, rs, *replace);
        }
        if !ops.is_empty() {
            self.table(t)?;
            self.touch(t);
        }
        for op in ops {
            match op {
                Op::Full { .. } => return Err(fail("a full load among other steps".into())),
                Op::AddSet(n) => self.add_set(t, rs, n)?,
                Op::AddChain(n) => self.add_chain(t, rs, n)?,
                Op::AddRules(n) => self.add_rules(t, rs, n)?,
                Op::FlushChain(n) => self.flush_chain(t, n)?,
                Op::AddElements(n, keys) => self.add_elements(t, rs, n, keys)?,
                Op::DeleteElements(n, keys) => self.delete_elements(t, n, keys)?,
                Op::DeleteSet(n) => self.delete_set(t, n)?,
                Op::DeleteChain(n) => self.delete_chain(t, n)?,
            }
        }
        Ok(())
    }
}

/// A table as the readers report it.
fn live_of(t: &FakeTable) -> LiveState {
    LiveState {
        table: true,
        chains: t
            .chains
            .iter()
            .map(|(n, c)| {
                let fingerprint = c
                    .rules
                    .first()
                    .and_then(|r| r.comment.as_deref())
                    .and_then(fingerprint_of_comment);
                (
                    n.as_str().into(),
                    LiveChain {
                        base: c.base,
                        fingerprint,
                        rules: c.rules.len(),
                    },
                )
            })
            .collect(),
        sets: t
            .sets
            .iter()
            .map(|(n, s)| {
                (
                    n.clone(),
                    LiveSet {
                        signature: s.signature.clone(),
                        elements: s
                            .elements
                            .iter()
                            .map(|(k, (v, to))| {
                                let e = match to {
                                    Some(to) => LiveSet::endpoint_element(*to),
                                    None => LiveSet::element(v.clone()),
                                };
                                (k.clone(), e)
                            })
                            .collect(),
                    },
                )
            })
            .collect(),
    }
}

impl Backend for Fake {
    fn name(&self) -> &'static str {
        self.label
    }

    fn table_names(&mut self) -> Result<Vec<String>, NftError> {
        if self.faults().unavailable {
            return Err(NftError::Unavailable(format!(
                "{}: unavailable",
                self.label
            )));
        }
        Ok(self.tables())
    }

    fn read_table(&mut self, table: &str) -> Result<LiveState, NftError> {
        if self.faults().unavailable {
            return Err(NftError::Unavailable(format!(
                "{}: unavailable",
                self.label
            )));
        }
        Ok(lock(&self.kernel)
            .tables
            .get(table)
            .map(live_of)
            .unwrap_or_default())
    }

    fn commit(&mut self, steps: &[Step<'_>]) -> Result<Duration, NftError> {
        let start = Instant::now();
        {
            let mut f = self.faults();
            if f.unavailable {
                return Err(NftError::Unavailable(format!(
                    "{}: unavailable",
                    self.label
                )));
            }
            if f.text_like {
                let other = steps.iter().find_map(|s| match s {
                    Step::Ops { rs, ops, .. } if !ops.is_empty() && rs.table_name() != TABLE => {
                        Some(rs.table_name())
                    }
                    _ => None,
                });
                if let Some(t) = other {
                    return Err(NftError::Unavailable(format!(
                        "{}: table {t}: names the table {TABLE} only",
                        self.label
                    )));
                }
            }
            let injected = f.fail_next.take().or_else(|| f.refuse.clone());
            drop(f);
            if let Some(why) = injected {
                lock(&self.kernel).refused += 1;
                return Err(NftError::Failed(why));
            }
        }
        let mut k = lock(&self.kernel);
        let mut tables = k.tables.clone();
        let mut txn = Txn {
            tables: &mut tables,
            rec: Record {
                via: self.label.to_string(),
                ..Record::default()
            },
        };
        let mut result = Ok(());
        for step in steps {
            result = match *step {
                Step::CreateTable(rs) => {
                    txn.create_table(rs.table_name());
                    Ok(())
                }
                Step::DeleteTable(t) => txn.delete_table(t),
                Step::Ops { rs, ops, .. } => txn.ops(rs, ops),
            };
            if result.is_err() {
                break;
            }
        }
        match result {
            Ok(()) => {
                let rec = txn.rec;
                k.tables = tables;
                k.records.push(rec);
                Ok(start.elapsed())
            }
            Err(e) => {
                k.refused += 1;
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_name_their_sets_and_chains() {
        let (s, c) = references(
            "ip daddr . meta l4proto . th dport vmap @service-ips-v4 jump svc-a goto svc-b",
        );
        assert_eq!(s, ["service-ips-v4"]);
        assert_eq!(c, ["svc-a", "svc-b"]);
        let (s, c) = references("update @aff-1 { ip saddr timeout 10s : ip daddr . th dport }");
        assert_eq!(s, ["aff-1"]);
        assert!(c.is_empty());
        let (s, c) = references("meta l4proto { tcp, udp } accept");
        assert!(s.is_empty() && c.is_empty());
    }
}
