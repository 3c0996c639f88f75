//! ferry's tables as one dataplane: the common table `ferry` and the shard tables `ferry-K` of
//! a sharded layout (`ferry_plan::plan::plan_sharded`), or the one table `ferry`.
//!
//! A change of any size up to [`MAX_OPS`] operations is one transaction over every table it
//! touches (a netlink batch spans tables: all or nothing). A larger one (a cold start, a new
//! layout) is cut into transactions of at most [`MAX_OPS`] operations each ([`transactions`]),
//! so that the kernel never holds the CPU for long (kube-proxy keeps to 1,000 after kernel
//! soft lockups), and never shows packets a half-built table: a table the kernel lacks is
//! created without its base chains, filled chunk by chunk while no hook reaches it, and hooked
//! in last, complete; a packet for a service whose table is not hooked yet falls through as it
//! did before its Service existed. New shard tables are built first and the common table is
//! changed last, so that when the layout changes (one table to shards, or another number of
//! shards) the services the old tables held stay served until their new tables are in.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ferry_plan::diff::{diff_ops, diff_touched_ops, Op};
use ferry_plan::ir::TABLE;
use ferry_plan::plan::Touched;
use ferry_plan::{Changes, LiveState, Ruleset};

use crate::backend::{Backend, Fallback, Step};
use crate::{Nft, NftError};

/// The most operations (a rule, an element, a chain, a set) one transaction carries when a
/// change must be cut: a cold start or a new layout. A change within it is never cut.
pub const MAX_OPS: usize = 2000;

/// Whether `name` is one of ferry's tables: `ferry`, or a shard table `ferry-K`.
pub fn is_ferry_table(name: &str) -> bool {
    name == TABLE || is_shard_table(name)
}

/// Whether `name` is a shard table `ferry-K` (K decimal digits).
pub fn is_shard_table(name: &str) -> bool {
    name.strip_prefix(TABLE)
        .and_then(|r| r.strip_prefix('-'))
        .is_some_and(|d| !d.is_empty() && d.len() <= 5 && d.bytes().all(|b| b.is_ascii_digit()))
}

/// ferry's tables in this network namespace (over netlink, else through `nft`'s listing).
pub fn ferry_tables(nft: &mut Nft) -> Result<Vec<String>, NftError> {
    ferry_tables_in(&mut Fallback::kernel_with(nft))
}

/// ferry's tables among those `backend` lists, sorted.
pub fn ferry_tables_in(backend: &mut dyn Backend) -> Result<Vec<String>, NftError> {
    let mut out: Vec<String> = backend
        .table_names()?
        .into_iter()
        .filter(|n| is_ferry_table(n))
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// What one table needs.
#[derive(Debug)]
pub struct TableChange<'a> {
    pub rs: &'a Ruleset,
    /// The kernel lacks the table: it is created, filled, and hooked in last.
    pub create: bool,
    /// The steps (for a table to create: every object, as the differ adds them to an empty
    /// table).
    pub ops: Vec<Op>,
    /// What the kernel holds of it (for the weight of flushing and deleting).
    pub live: Option<&'a LiveState>,
}

/// Steps for table `table` (an index into the changes) within one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub table: usize,
    /// Create the table first.
    pub create: bool,
    pub ops: Vec<Op>,
}

/// One transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub parts: Vec<Part>,
    /// Tables deleted (at the end).
    pub delete: Vec<String>,
}

impl Txn {
    /// The operations it carries (see [`weight`]).
    pub fn weight(&self, changes: &[TableChange<'_>]) -> usize {
        self.parts
            .iter()
            .map(|p| {
                usize::from(p.create)
                    + p.ops
                        .iter()
                        .map(|o| weight(o, &changes[p.table]))
                        .sum::<usize>()
            })
            .sum::<usize>()
            + self.delete.len()
    }
}

/// The operations a step makes the kernel do: one per rule, element, chain or set.
pub fn weight(op: &Op, t: &TableChange<'_>) -> usize {
    let live_rules = |c: &str| t.live.and_then(|l| l.chains.get(c)).map_or(0, |c| c.rules);
    match op {
        Op::Full { .. } => {
            t.rs.chains.len()
                + t.rs.sets.len()
                + t.rs.chains.values().map(|c| c.rules.len()).sum::<usize>()
                + t.rs.sets.values().map(|s| s.elements.len()).sum::<usize>()
        }
        Op::AddRules(c) => t.rs.chains.get(c).map_or(1, |c| c.rules.len().max(1)),
        Op::FlushChain(c) => live_rules(c).max(1),
        Op::AddElements(_, keys) | Op::DeleteElements(_, keys) => keys.len().max(1),
        Op::DeleteSet(s) => {
            1 + t
                .live
                .and_then(|l| l.sets.get(s))
                .map_or(0, |s| s.elements.len())
        }
        Op::AddSet(_) | Op::AddChain(_) | Op::DeleteChain(_) => 1,
    }
}

/// The transactions that make `changes` and delete the tables `delete`: one when it all
/// weighs at most `max`; else each table on its own, cut into transactions of at most `max`
/// (a single step heavier than that, a chain's rules, goes alone), tables to create first,
/// then the other shard tables, the common table [`TABLE`] last, and the deletions after (one
/// table each).
/// A table to create gets its base chains (and their rules) in its last transaction; a chain
/// that is flushed and refilled is never cut apart; a table replaced whole goes in one.
///
/// The steps move from `changes` into the transactions (a cold load has hundreds of thousands).
pub fn transactions(changes: &mut [TableChange<'_>], delete: &[String], max: usize) -> Vec<Txn> {
    let max = max.max(1);
    let active = |c: &TableChange<'_>| c.create || !c.ops.is_empty();
    if !changes.iter().any(active) && delete.is_empty() {
        return Vec::new();
    }
    let total: usize = changes
        .iter()
        .map(|c| usize::from(c.create) + c.ops.iter().map(|o| weight(o, c)).sum::<usize>())
        .sum::<usize>()
        + delete.len();
    if total <= max {
        // Base chains last within the transaction too: the order is the kernel's business,
        // but a reader of the batch finds the same shape as in the cut case.
        let parts = changes
            .iter_mut()
            .enumerate()
            .filter(|(_, c)| active(c))
            .map(|(i, c)| Part {
                table: i,
                create: c.create,
                ops: hook_last(c.rs, std::mem::take(&mut c.ops)),
            })
            .collect();
        return vec![Txn {
            parts,
            delete: delete.to_vec(),
        }];
    }
    let mut order: Vec<usize> = (0..changes.len())
        .filter(|i| active(&changes[*i]))
        .collect();
    order.sort_by_key(|i| {
        let c = &changes[*i];
        match (c.create, c.rs.table_name() == TABLE) {
            (true, false) => 0,
            (false, false) => 1,
            (true, true) => 2,
            (false, true) => 3,
        }
    });
    let mut out = Vec::new();
    for i in order {
        let taken = std::mem::take(&mut changes[i].ops);
        let c = &changes[i];
        if let [Op::Full { .. }] = taken.as_slice() {
            out.push(Txn {
                parts: vec![Part {
                    table: i,
                    create: c.create,
                    ops: taken,
                }],
                delete: Vec::new(),
            });
            continue;
        }
        let hooks: BTreeSet<String> = hook_chains(c.rs, &taken)
            .into_iter()
            .map(str::to_string)
            .collect();
        let ops = hook_last(c.rs, taken);
        // Units: steps that go together (a flush and the refill of its chain), the elements
        // of a big step cut to fit.
        let mut units: Vec<Vec<Op>> = Vec::new();
        let mut hook_unit: Vec<Op> = Vec::new();
        let mut it = ops.into_iter().peekable();
        while let Some(op) = it.next() {
            match op {
                Op::AddChain(ref n) | Op::AddRules(ref n) if hooks.contains(&**n) => {
                    hook_unit.push(op)
                }
                Op::FlushChain(ref n) if matches!(it.peek(), Some(Op::AddRules(m)) if m == n) => {
                    let next = it.next().into_iter();
                    units.push(std::iter::once(op).chain(next).collect());
                }
                Op::AddElements(set, keys) if keys.len() > max => {
                    for k in keys.chunks(max) {
                        units.push(vec![Op::AddElements(set.clone(), k.to_vec())]);
                    }
                }
                Op::DeleteElements(set, keys) if keys.len() > max => {
                    for k in keys.chunks(max) {
                        units.push(vec![Op::DeleteElements(set.clone(), k.to_vec())]);
                    }
                }
                op => units.push(vec![op]),
            }
        }
        if !hook_unit.is_empty() {
            units.push(hook_unit);
        }
        let mut chunk: Vec<Op> = Vec::new();
        let mut chunk_weight = usize::from(c.create);
        let mut first = true;
        for u in units {
            let w: usize = u.iter().map(|o| weight(o, c)).sum();
            if !chunk.is_empty() && chunk_weight + w > max {
                out.push(Txn {
                    parts: vec![Part {
                        table: i,
                        create: c.create && first,
                        ops: std::mem::take(&mut chunk),
                    }],
                    delete: Vec::new(),
                });
                first = false;
                chunk_weight = 0;
            }
            chunk.extend(u);
            chunk_weight += w;
        }
        if !chunk.is_empty() || (c.create && first) {
            out.push(Txn {
                parts: vec![Part {
                    table: i,
                    create: c.create && first,
                    ops: chunk,
                }],
                delete: Vec::new(),
            });
        }
    }
    // A table deleted is as much work for the kernel as its contents: one at a time.
    for d in delete {
        out.push(Txn {
            parts: Vec::new(),
            delete: vec![d.clone()],
        });
    }
    out
}

/// The base chains a change creates: hooked in only once the rest is there.
fn hook_chains<'a>(rs: &Ruleset, ops: &'a [Op]) -> BTreeSet<&'a str> {
    ops.iter()
        .filter_map(|o| match o {
            Op::AddChain(n) if rs.chains.get(n).is_some_and(|x| x.base.is_some()) => Some(&**n),
            _ => None,
        })
        .collect()
}

/// `ops` with the creation of base chains (and their rules) moved to the end.
fn hook_last(rs: &Ruleset, ops: Vec<Op>) -> Vec<Op> {
    let hooks: BTreeSet<String> = hook_chains(rs, &ops)
        .into_iter()
        .map(str::to_string)
        .collect();
    if hooks.is_empty() {
        return ops;
    }
    let (hook, mut rest): (Vec<Op>, Vec<Op>) = ops.into_iter().partition(|o| match o {
        Op::AddChain(n) | Op::AddRules(n) => hooks.contains(&**n),
        _ => false,
    });
    rest.extend(hook);
    rest
}

/// What one [`Tables::apply`] did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Every table's changes added up (the steps of all tables in `ops`).
    pub changes: Changes,
    pub tables_created: Vec<String>,
    pub tables_deleted: Vec<String>,
    /// Transactions committed, and the longest of them (sending the batch to the kernel's
    /// answer).
    pub transactions: usize,
    pub longest: Duration,
}

impl Applied {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.tables_deleted.is_empty()
    }
}

impl std::fmt::Display for Applied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.changes)?;
        if !self.tables_created.is_empty() {
            write!(f, "; tables created: {}", self.tables_created.join(" "))?;
        }
        if !self.tables_deleted.is_empty() {
            write!(f, "; tables deleted: {}", self.tables_deleted.join(" "))?;
        }
        if self.transactions > 1 {
            write!(
                f,
                "; {} transactions, the longest {} ms",
                self.transactions,
                self.longest.as_millis()
            )?;
        }
        Ok(())
    }
}

/// Owns ferry's tables in the current network namespace: the common table and the shards.
pub struct Tables {
    backend: Box<dyn Backend>,
    /// What the kernel holds of each of ferry's tables, as far as we know; None forces a read
    /// before the next apply.
    live: Option<BTreeMap<String, LiveState>>,
    max_ops: usize,
}

impl Tables {
    /// Over netlink, with libnftables' text through `nft` as the fallback for the one-table
    /// layout ([`Fallback::kernel`]).
    pub fn new(nft: Nft) -> Tables {
        Tables::with_backend(Box::new(Fallback::kernel(nft)))
    }

    /// Through `backend` (a [`crate::fake::Fake`] in tests).
    pub fn with_backend(backend: Box<dyn Backend>) -> Tables {
        Tables {
            backend,
            live: None,
            max_ops: MAX_OPS,
        }
    }

    /// Cuts large changes into transactions of at most `max` operations (default [`MAX_OPS`]).
    pub fn with_max_ops(mut self, max: usize) -> Tables {
        self.max_ops = max.max(1);
        self
    }

    /// The libnftables runner of the text path (None for a backend without one).
    pub fn nft(&mut self) -> Option<&mut Nft> {
        self.backend.nft()
    }

    /// The backend the changes go through.
    pub fn backend(&mut self) -> &mut dyn Backend {
        &mut *self.backend
    }

    /// Frees what the backend caches between changes (libnftables' copy of the ruleset).
    pub fn release_cache(&mut self) {
        self.backend.release_cache();
    }

    /// Forgets what we know of the kernel's tables: the next apply reads them back first.
    pub fn resync(&mut self) {
        self.live = None;
    }

    /// The kernel's reason for refusing the last netlink batch that was then applied as text
    /// (taken: reported once).
    pub fn netlink_refused(&mut self) -> Option<String> {
        self.backend.take_refusal()
    }

    /// Reads every table of ferry's that the kernel has.
    fn read(&mut self) -> Result<BTreeMap<String, LiveState>, NftError> {
        let mut live = BTreeMap::new();
        for name in ferry_tables_in(&mut *self.backend)? {
            let l = self.backend.read_table(&name)?;
            if l.table {
                live.insert(name, l);
            }
        }
        Ok(live)
    }

    /// Makes the kernel hold `desired` (the common table and the shards, or the one table) and
    /// none other of ferry's tables, touching only what differs: one transaction when the
    /// change weighs at most the limit, else several (see [`transactions`]). `touched` (one per
    /// table, from the planner) limits the comparison to what the plan touched once the
    /// kernel's tables are known. On failure the next call reads the kernel again.
    pub fn apply(
        &mut self,
        desired: &[&Ruleset],
        touched: Option<&[Touched]>,
    ) -> Result<Applied, NftError> {
        let known = self.live.is_some();
        let mut live = match self.live.take() {
            Some(l) => l,
            None => self.read()?,
        };
        let touched = touched.filter(|t| known && t.len() == desired.len());
        let wanted: BTreeSet<&str> = desired.iter().map(|r| r.table_name()).collect();
        let delete: Vec<String> = live
            .keys()
            .filter(|n| !wanted.contains(n.as_str()) && is_shard_table(n))
            .cloned()
            .collect();
        let mut changes = Vec::with_capacity(desired.len());
        // Per table: whether its view of the kernel can be updated from `touched`.
        let mut by_touched = Vec::with_capacity(desired.len());
        let mut applied = Applied::default();
        for (i, rs) in desired.iter().enumerate() {
            let l = live.get(rs.table_name());
            let found = match (touched, l) {
                (Some(t), Some(l)) => diff_touched_ops(l, rs, &t[i]),
                _ => None,
            };
            by_touched.push(found.is_some());
            let ch = match (found, l) {
                (Some(ch), _) => ch,
                (None, Some(l)) => diff_ops(l, rs),
                (None, None) => diff_ops(
                    &LiveState {
                        table: true,
                        ..LiveState::default()
                    },
                    rs,
                ),
            };
            let create = l.is_none();
            if create {
                applied.tables_created.push(rs.table_name().to_string());
            }
            add_counts(&mut applied.changes, &ch, create);
            changes.push(TableChange {
                rs,
                create,
                ops: ch.ops,
                live: l,
            });
        }
        let txns = transactions(&mut changes, &delete, self.max_ops);
        let result = self.commit(&changes, &txns, &mut applied);
        let failed = result.is_err();
        drop(changes);
        applied.changes.ops = txns
            .into_iter()
            .flat_map(|t| t.parts)
            .flat_map(|p| p.ops)
            .collect();
        if failed {
            self.live = None;
            return result.map(|_| applied);
        }
        for (i, rs) in desired.iter().enumerate() {
            match (touched, by_touched[i], live.get_mut(rs.table_name())) {
                (Some(t), true, Some(l)) => l.update_touched(rs, &t[i]),
                _ => {
                    live.insert(rs.table_name().to_string(), LiveState::of(rs));
                }
            }
        }
        for d in &delete {
            live.remove(d);
        }
        applied.tables_deleted = delete;
        self.live = Some(live);
        result.map(|_| applied)
    }

    /// Sends the transactions in order (the backend chooses the path: see [`Fallback`]).
    fn commit(
        &mut self,
        changes: &[TableChange<'_>],
        txns: &[Txn],
        applied: &mut Applied,
    ) -> Result<(), NftError> {
        for txn in txns {
            let mut steps = Vec::new();
            for p in &txn.parts {
                let c = &changes[p.table];
                if p.create {
                    steps.push(Step::CreateTable(c.rs));
                }
                steps.push(Step::Ops {
                    rs: c.rs,
                    ops: &p.ops,
                    live: c.live,
                });
            }
            for d in &txn.delete {
                steps.push(Step::DeleteTable(d));
            }
            let took = self.backend.commit(&steps)?;
            applied.longest = applied.longest.max(took);
            applied.transactions += 1;
        }
        Ok(())
    }
}

fn add_counts(sum: &mut Changes, ch: &Changes, create: bool) {
    sum.chains_added += ch.chains_added;
    sum.chains_changed += ch.chains_changed;
    sum.chains_deleted += ch.chains_deleted;
    sum.elements_added += ch.elements_added;
    sum.elements_deleted += ch.elements_deleted;
    sum.full |= ch.full || create;
}

/// Removes every table of ferry's (the common one and the shards) in one transaction; the
/// names removed.
pub fn cleanup_all(nft: &mut Nft) -> Result<Vec<String>, NftError> {
    cleanup_in(&mut Fallback::kernel_with(nft))
}

/// [`cleanup_all`] through `backend`.
pub fn cleanup_in(backend: &mut dyn Backend) -> Result<Vec<String>, NftError> {
    let names = ferry_tables_in(backend)?;
    if names.is_empty() {
        return Ok(names);
    }
    let steps: Vec<Step<'_>> = names.iter().map(|n| Step::DeleteTable(n)).collect();
    backend.commit(&steps)?;
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ferry_tables_are_told_by_name() {
        for ok in ["ferry", "ferry-0", "ferry-15", "ferry-31"] {
            assert!(is_ferry_table(ok), "{ok}");
        }
        for not in [
            "ferry-",
            "ferry-x",
            "ferry-1a",
            "ferryx",
            "other",
            "ferry-0-1",
            "kube-proxy",
            "ferry-123456",
        ] {
            assert!(!is_ferry_table(not), "{not}");
        }
        assert!(!is_shard_table("ferry"));
    }
}
