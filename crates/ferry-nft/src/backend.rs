//! What [`crate::Dataplane`] and [`crate::Tables`] need from a kernel, behind one trait:
//!
//! - [`Netlink`]: nf_tables netlink, ferry's own messages ([`crate::encode`], sent and read by
//!   [`crate::netlink`]): no text, no libnftables; the default path.
//! - [`NftText`]: libnftables (or the `nft` command) with `nft` scripts rendered from the same
//!   steps, and its JSON listing to read back: the fallback, for a construct the encoder lacks
//!   or a batch the kernel refused, and where netlink sockets are refused. Its scripts name the
//!   table `ferry` only, so it carries the one-table layout, not shard tables.
//! - [`Fallback`]: the one place that chooses: the first backend (netlink), and the second
//!   (text) when the first is unavailable or the kernel refused its transaction (a refused
//!   transaction changed nothing, so the same steps go again as text). The refusal is kept for
//!   the agent to report ([`Backend::take_refusal`]).
//! - [`crate::fake::Fake`]: an in-memory kernel for fast tests of the logic above it (no root,
//!   no namespaces): atomic transactions with the kernel's checks, read-back, counters and
//!   injected faults. The kernel tests stay the reference; the fake does not replace them.

use std::borrow::BorrowMut;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use ferry_plan::diff::Op;
use ferry_plan::ir::{render_elements, FAMILY, TABLE};
use ferry_plan::{LiveState, Ruleset};

use crate::{encode, netlink, read_live_json_table, Nft, NftError};

/// One step of a transaction (see [`Backend::commit`]).
#[derive(Debug, Clone, Copy)]
pub enum Step<'a> {
    /// Creates the planned table, empty (its objects follow, in this transaction or later
    /// ones). Creating a table that exists changes nothing.
    CreateTable(&'a Ruleset),
    /// The differ's steps for the planned table `rs` (a lone [`Op::Full`] loads it whole), with
    /// what the kernel holds of it when known (a text script says `map` or `set` when deleting
    /// one).
    Ops {
        rs: &'a Ruleset,
        ops: &'a [Op],
        live: Option<&'a LiveState>,
    },
    /// Deletes a table, whatever it holds.
    DeleteTable(&'a str),
}

/// A kernel's nf_tables, as ferry uses it: list its tables, read one back, commit a
/// transaction (all or nothing), and nothing else.
pub trait Backend {
    /// For logs and errors: "netlink", "libnftables", "nft command", "fake".
    fn name(&self) -> &'static str;

    /// The names of this network namespace's inet tables (ferry's and others').
    fn table_names(&mut self) -> Result<Vec<String>, NftError>;

    /// The table `table` as the differ compares it with a plan; an empty state (`table:
    /// false`) when there is none.
    fn read_table(&mut self, table: &str) -> Result<LiveState, NftError>;

    /// Commits `steps` in order as one transaction: all of them or, on error, none. Returns
    /// how long the kernel took (the exchange, without preparing it). An error
    /// [`NftError::Unavailable`] says this backend cannot carry these steps at all (no socket,
    /// no library, a construct it cannot express): another backend may.
    fn commit(&mut self, steps: &[Step<'_>]) -> Result<Duration, NftError>;

    /// The kernel's reason for refusing the last transaction that another path then carried
    /// (taken: reported once).
    fn take_refusal(&mut self) -> Option<String> {
        None
    }

    /// Frees what the backend caches between transactions (libnftables' copy of the ruleset).
    fn release_cache(&mut self) {}

    /// The libnftables runner, for a backend that has one.
    fn nft(&mut self) -> Option<&mut Nft> {
        None
    }

    /// Tests only: every netlink transaction ends with a message the kernel refuses.
    #[doc(hidden)]
    fn spoil_netlink_batches(&mut self) {}
}

impl<B: Backend + ?Sized> Backend for Box<B> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn table_names(&mut self) -> Result<Vec<String>, NftError> {
        (**self).table_names()
    }
    fn read_table(&mut self, table: &str) -> Result<LiveState, NftError> {
        (**self).read_table(table)
    }
    fn commit(&mut self, steps: &[Step<'_>]) -> Result<Duration, NftError> {
        (**self).commit(steps)
    }
    fn take_refusal(&mut self) -> Option<String> {
        (**self).take_refusal()
    }
    fn release_cache(&mut self) {
        (**self).release_cache()
    }
    fn nft(&mut self) -> Option<&mut Nft> {
        (**self).nft()
    }
    fn spoil_netlink_batches(&mut self) {
        (**self).spoil_netlink_batches()
    }
}

/// nf_tables netlink: [`crate::encode`]'s batches sent by [`crate::netlink`].
#[derive(Debug, Default)]
pub struct Netlink {
    spoil: bool,
}

impl Netlink {
    pub fn new() -> Netlink {
        Netlink::default()
    }
}

impl Backend for Netlink {
    fn name(&self) -> &'static str {
        "netlink"
    }

    fn table_names(&mut self) -> Result<Vec<String>, NftError> {
        netlink::table_names()
    }

    fn read_table(&mut self, table: &str) -> Result<LiveState, NftError> {
        netlink::read_live_table(table)
    }

    fn commit(&mut self, steps: &[Step<'_>]) -> Result<Duration, NftError> {
        let only_ops = steps.iter().all(|s| matches!(s, Step::Ops { .. }));
        let encoded = if only_ops {
            // `batch` sizes its buffer for full loads up front.
            let parts: Vec<(&Ruleset, &[Op])> = steps
                .iter()
                .filter_map(|s| match s {
                    Step::Ops { rs, ops, .. } => Some((*rs, *ops)),
                    _ => None,
                })
                .collect();
            encode::batch(&parts)
        } else {
            let steps: Vec<encode::Step<'_>> = steps
                .iter()
                .map(|s| match *s {
                    Step::CreateTable(rs) => encode::Step::CreateTable(rs),
                    Step::Ops { rs, ops, .. } => encode::Step::Ops(rs, ops),
                    Step::DeleteTable(t) => encode::Step::DeleteTable(t),
                })
                .collect();
            encode::steps(&steps)
        };
        let mut batch =
            encoded.map_err(|e| NftError::Unavailable(format!("not encodable: {}", e.0)))?;
        if self.spoil {
            encode::spoil(&mut batch);
        }
        let t = Instant::now();
        netlink::send_batch(&batch)?;
        Ok(t.elapsed())
    }

    fn spoil_netlink_batches(&mut self) {
        self.spoil = true;
    }
}

/// libnftables (or the `nft` command): scripts rendered from the steps, JSON listings read
/// back. Holds its [`Nft`] (`NftText<&mut Nft>` borrows one).
pub struct NftText<N: BorrowMut<Nft> = Nft> {
    nft: N,
}

impl<N: BorrowMut<Nft>> NftText<N> {
    pub fn new(nft: N) -> NftText<N> {
        NftText { nft }
    }
}

impl<N: BorrowMut<Nft>> Backend for NftText<N> {
    fn name(&self) -> &'static str {
        self.nft.borrow().backend_name()
    }

    fn table_names(&mut self) -> Result<Vec<String>, NftError> {
        let v = self
            .nft
            .borrow_mut()
            .run_json(&format!("list tables {FAMILY}"))?;
        Ok(v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o["table"]["name"].as_str().map(str::to_string))
            .collect())
    }

    fn read_table(&mut self, table: &str) -> Result<LiveState, NftError> {
        read_live_json_table(self.nft.borrow_mut(), table)
    }

    fn commit(&mut self, steps: &[Step<'_>]) -> Result<Duration, NftError> {
        let script = script(steps)?;
        if script.is_empty() {
            return Ok(Duration::ZERO);
        }
        let t = Instant::now();
        self.nft.borrow_mut().run(&script)?;
        Ok(t.elapsed())
    }

    fn release_cache(&mut self) {
        self.nft.borrow_mut().release_cache();
    }

    fn nft(&mut self) -> Option<&mut Nft> {
        Some(self.nft.borrow_mut())
    }
}

/// The `nft -f` script of a transaction: the differ's text for the same steps
/// ([`ferry_plan::diff::diff`]'s script when the steps are [`ferry_plan::diff::diff_ops`]'s).
/// [`NftError::Unavailable`] when a step changes the objects of another table than [`TABLE`]
/// (the rendering names that one).
pub fn script(steps: &[Step<'_>]) -> Result<String, NftError> {
    let mut out = String::new();
    for step in steps {
        match *step {
            Step::CreateTable(rs) => {
                let _ = writeln!(
                    out,
                    "add table {FAMILY} {} {{ comment \"managed by ferry\"; }}",
                    rs.table_name()
                );
            }
            Step::DeleteTable(t) => {
                let _ = writeln!(out, "delete table {FAMILY} {t}");
            }
            Step::Ops { rs, ops, live } => {
                if ops.is_empty() {
                    continue;
                }
                if rs.table_name() != TABLE {
                    return Err(NftError::Unavailable(format!(
                        "table {}: nft scripts name the table {TABLE} only",
                        rs.table_name()
                    )));
                }
                render_ops(&mut out, rs, ops, live)?;
            }
        }
    }
    Ok(out)
}

fn render_ops(
    out: &mut String,
    rs: &Ruleset,
    ops: &[Op],
    live: Option<&LiveState>,
) -> Result<(), NftError> {
    let missing = |what: &str, name: &str| {
        NftError::Output(format!("{what} {name} is not in the planned table"))
    };
    for op in ops {
        match op {
            Op::Full { replace } => {
                if *replace {
                    let _ = writeln!(out, "delete table {FAMILY} {TABLE}");
                }
                out.push_str(&rs.render_full());
            }
            Op::AddSet(n) => {
                let s = rs.sets.get(n).ok_or_else(|| missing("set", n))?;
                out.push_str(&s.render_def());
                out.push('\n');
            }
            Op::AddChain(n) => {
                let c = rs.chains.get(n).ok_or_else(|| missing("chain", n))?;
                out.push_str(&c.render_add());
                out.push('\n');
            }
            Op::AddRules(n) => {
                let c = rs.chains.get(n).ok_or_else(|| missing("chain", n))?;
                c.render_rules(out);
            }
            Op::FlushChain(n) => {
                let _ = writeln!(out, "flush chain {FAMILY} {TABLE} {n}");
            }
            Op::AddElements(n, keys) => {
                let s = rs.sets.get(n).ok_or_else(|| missing("set", n))?;
                let mut els = Vec::with_capacity(keys.len());
                for k in keys {
                    let (k, e) = s
                        .elements
                        .get_key_value(k.as_str())
                        .ok_or_else(|| missing("element", &format!("{n} {k}")))?;
                    els.push((&**k, &**e));
                }
                render_elements(out, "add", n, els.into_iter());
            }
            Op::DeleteElements(n, keys) => {
                for chunk in keys.chunks(1000) {
                    let _ = writeln!(
                        out,
                        "delete element {FAMILY} {TABLE} {n} {{ {} }}",
                        chunk.join(", ")
                    );
                }
            }
            Op::DeleteSet(n) => {
                let map = live
                    .and_then(|l| l.sets.get(n))
                    .is_some_and(|s| s.signature.contains(" : "));
                let kind = if map { "map" } else { "set" };
                let _ = writeln!(out, "delete {kind} {FAMILY} {TABLE} {n}");
            }
            Op::DeleteChain(n) => {
                let _ = writeln!(out, "delete chain {FAMILY} {TABLE} {n}");
            }
        }
    }
    Ok(())
}

/// The choice of path, in one place: reads and writes go to `first` (netlink), and to `then`
/// (text) when `first` is unavailable ([`NftError::Unavailable`]) or the kernel refused its
/// transaction. A refused transaction changed nothing (all or nothing), so the same steps go
/// again: a gap in the encoder costs speed, never the node's dataplane. When `then` cannot
/// carry them either (a shard table), the refusal is the error.
pub struct Fallback<P: Backend = Netlink, S: Backend = NftText> {
    first: P,
    then: S,
    /// Writes try `first`; off: every write goes to `then` (reads still try `first`).
    first_writes: bool,
    refused: Option<String>,
}

impl Fallback {
    /// Netlink, else libnftables (or the `nft` command) through `nft`: ferry's default.
    pub fn kernel(nft: Nft) -> Fallback {
        Fallback::new(Netlink::new(), NftText::new(nft))
    }
}

impl<'a> Fallback<Netlink, NftText<&'a mut Nft>> {
    /// [`Fallback::kernel`] borrowing the runner.
    pub fn kernel_with(nft: &'a mut Nft) -> Fallback<Netlink, NftText<&'a mut Nft>> {
        Fallback::new(Netlink::new(), NftText::new(nft))
    }
}

impl<P: Backend, S: Backend> Fallback<P, S> {
    pub fn new(first: P, then: S) -> Fallback<P, S> {
        Fallback {
            first,
            then,
            first_writes: true,
            refused: None,
        }
    }

    /// Every write through the second backend (for comparison: benchmarks and tests).
    pub fn second_writes_only(mut self) -> Fallback<P, S> {
        self.first_writes = false;
        self
    }

    fn or_then<T>(
        first: Result<T, NftError>,
        then: impl FnOnce() -> Result<T, NftError>,
    ) -> Result<T, NftError> {
        match first {
            Err(NftError::Unavailable(_)) => then(),
            other => other,
        }
    }
}

impl<P: Backend, S: Backend> Backend for Fallback<P, S> {
    fn name(&self) -> &'static str {
        if self.first_writes {
            self.first.name()
        } else {
            self.then.name()
        }
    }

    fn table_names(&mut self) -> Result<Vec<String>, NftError> {
        let then = &mut self.then;
        Self::or_then(self.first.table_names(), || then.table_names())
    }

    fn read_table(&mut self, table: &str) -> Result<LiveState, NftError> {
        let then = &mut self.then;
        Self::or_then(self.first.read_table(table), || then.read_table(table))
    }

    fn commit(&mut self, steps: &[Step<'_>]) -> Result<Duration, NftError> {
        if !self.first_writes {
            return self.then.commit(steps);
        }
        let refused = match self.first.commit(steps) {
            Ok(d) => return Ok(d),
            Err(NftError::Unavailable(_)) => None,
            Err(e) => Some(e),
        };
        match self.then.commit(steps) {
            Ok(d) => {
                if let Some(e) = refused {
                    self.refused = Some(match e {
                        NftError::Failed(why) | NftError::Output(why) => why,
                        e => e.to_string(),
                    });
                }
                Ok(d)
            }
            Err(NftError::Unavailable(why)) => Err(match refused {
                Some(NftError::Failed(r)) => {
                    NftError::Failed(format!("{r} (and no other path: {why})"))
                }
                Some(e) => NftError::Output(format!("{e} (and no other path: {why})")),
                None => NftError::Unavailable(why),
            }),
            Err(e) => Err(e),
        }
    }

    fn take_refusal(&mut self) -> Option<String> {
        self.refused.take()
    }

    fn release_cache(&mut self) {
        self.first.release_cache();
        self.then.release_cache();
    }

    fn nft(&mut self) -> Option<&mut Nft> {
        if self.then.nft().is_some() {
            self.then.nft()
        } else {
            self.first.nft()
        }
    }

    fn spoil_netlink_batches(&mut self) {
        self.first.spoil_netlink_batches();
    }
}
