//! ferry's nftables dataplane: the I/O edge of the planner.
//!
//! - [`Dataplane`] applies a planned [`Ruleset`] as one atomic transaction that touches only
//!   what differs from the kernel's table; [`Tables`] does the same for the common table and
//!   the shard tables of a sharded layout, cutting large loads into bounded transactions.
//! - Both talk to the kernel through a [`Backend`] ([`backend`]): list the tables, read one
//!   back, commit a transaction (all or nothing). The backends:
//!   - [`Netlink`]: nf_tables netlink, ferry's own messages ([`encode`], sent and read by
//!     [`netlink`]); no text and no libnftables on the hot path. The default.
//!   - [`NftText`]: libnftables in-process ([`Nft`]; the `nft` command where the library is
//!     missing), `nft` scripts rendered from the same steps and JSON listings read back
//!     ([`read_live_json`]). The fallback, and the reference the netlink path is tested
//!     against; its scripts name the table `ferry` only (the one-table layout).
//!   - [`Fallback`]: the one place that picks the path: netlink first, text when netlink is
//!     unavailable or the kernel refused the batch (reported once through
//!     `netlink_refused`). What [`Dataplane::new`] and [`Tables::new`] use.
//!   - [`fake::Fake`]: an in-memory kernel with the kernel's checks, counters and injected
//!     faults, for fast tests of the logic above (no root). Tests against the real kernel
//!     stay the reference.
//! - [`read_live`] reads ferry's table back (netlink, else libnftables' JSON listing) so an
//!   agent adopts what it finds; [`cleanup`] removes ferry's tables.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::io::Write;
use std::process::{Command, Stdio};

use ferry_plan::diff::{fingerprint_of_comment, LiveChain, LiveSet};
use ferry_plan::ir::{BaseChain, ChainType, Hook, Verdict, FAMILY, TABLE};
use ferry_plan::{Changes, LiveState, Ruleset};
use serde_json::Value as Json;

pub mod backend;
pub mod encode;
pub mod fake;
pub mod netlink;
pub mod tables;

use backend::Step;
pub use backend::{Backend, Fallback, Netlink, NftText};
pub use tables::Tables;

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nft failed: {0}")]
    Failed(String),
    #[error("cannot run nft: {0}")]
    Unavailable(String),
    #[error("unexpected nft output: {0}")]
    Output(String),
}

type CtxNew = unsafe extern "C" fn(c_uint) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type CtxInt = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxBuf = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type CtxSetFlags = unsafe extern "C" fn(*mut c_void, c_uint);
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

const NFT_CTX_OUTPUT_JSON: c_uint = 1 << 4;

struct LibNft {
    _lib: libloading::Library,
    ctx: *mut c_void,
    new: CtxNew,
    buf_out: CtxInt,
    buf_err: CtxInt,
    free: CtxFree,
    get_out: CtxBuf,
    get_err: CtxBuf,
    set_flags: CtxSetFlags,
    run: RunCmd,
}

impl LibNft {
    fn open() -> Result<LibNft, String> {
        // SAFETY: loading the system's libnftables; the symbols are its documented C API
        // (libnftables(3)) and are used with the signatures it documents.
        unsafe {
            let lib = libloading::Library::new("libnftables.so.1").map_err(|e| e.to_string())?;
            let new: CtxNew = *lib
                .get::<CtxNew>(b"nft_ctx_new\0")
                .map_err(|e| e.to_string())?;
            let free: CtxFree = *lib.get(b"nft_ctx_free\0").map_err(|e| e.to_string())?;
            let buf_out: CtxInt = *lib
                .get(b"nft_ctx_buffer_output\0")
                .map_err(|e| e.to_string())?;
            let buf_err: CtxInt = *lib
                .get(b"nft_ctx_buffer_error\0")
                .map_err(|e| e.to_string())?;
            let get_out: CtxBuf = *lib
                .get(b"nft_ctx_get_output_buffer\0")
                .map_err(|e| e.to_string())?;
            let get_err: CtxBuf = *lib
                .get(b"nft_ctx_get_error_buffer\0")
                .map_err(|e| e.to_string())?;
            let set_flags: CtxSetFlags = *lib
                .get(b"nft_ctx_output_set_flags\0")
                .map_err(|e| e.to_string())?;
            let run: RunCmd = *lib
                .get(b"nft_run_cmd_from_buffer\0")
                .map_err(|e| e.to_string())?;
            let ctx = Self::new_ctx(new, buf_out, buf_err, free)?;
            Ok(LibNft {
                _lib: lib,
                ctx,
                new,
                buf_out,
                buf_err,
                free,
                get_out,
                get_err,
                set_flags,
                run,
            })
        }
    }

    /// A context with buffered output and error.
    ///
    /// # Safety
    /// The functions must be libnftables' own.
    unsafe fn new_ctx(
        new: CtxNew,
        buf_out: CtxInt,
        buf_err: CtxInt,
        free: CtxFree,
    ) -> Result<*mut c_void, String> {
        let ctx = new(0);
        if ctx.is_null() {
            return Err("nft_ctx_new failed".into());
        }
        if buf_out(ctx) != 0 || buf_err(ctx) != 0 {
            free(ctx);
            return Err("cannot buffer libnftables output".into());
        }
        Ok(ctx)
    }

    /// Replaces the context with a fresh one: libnftables keeps a copy of the ruleset it last
    /// read in its context (megabytes at thousands of services) for as long as it lives.
    fn reset(&mut self) {
        // SAFETY: the functions were loaded from libnftables in `open`; the old context is
        // freed once, and only after its replacement exists.
        unsafe {
            if let Ok(ctx) = Self::new_ctx(self.new, self.buf_out, self.buf_err, self.free) {
                (self.free)(self.ctx);
                self.ctx = ctx;
            }
        }
    }

    fn run(&mut self, script: &str, json: bool) -> Result<String, NftError> {
        let c = CString::new(script).map_err(|_| NftError::Failed("script contains NUL".into()))?;
        // SAFETY: ctx is a live context owned by self; buffers are NUL-terminated strings owned
        // by the context, copied out before the next call.
        unsafe {
            (self.set_flags)(self.ctx, if json { NFT_CTX_OUTPUT_JSON } else { 0 });
            let rc = (self.run)(self.ctx, c.as_ptr());
            let out = cstr((self.get_out)(self.ctx));
            let err = cstr((self.get_err)(self.ctx));
            if rc != 0 {
                return Err(NftError::Failed(err.trim().to_string()));
            }
            Ok(out)
        }
    }
}

fn cstr(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: non-null NUL-terminated buffer from libnftables.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

impl Drop for LibNft {
    fn drop(&mut self) {
        // SAFETY: ctx was created by nft_ctx_new and is freed once.
        unsafe { (self.free)(self.ctx) }
    }
}

enum Runner {
    Lib(LibNft),
    Command,
}

/// Runs nftables scripts.
pub struct Nft {
    backend: Runner,
}

impl Nft {
    /// libnftables when present, else the `nft` command.
    pub fn new() -> Nft {
        match LibNft::open() {
            Ok(l) => Nft {
                backend: Runner::Lib(l),
            },
            Err(_) => Nft {
                backend: Runner::Command,
            },
        }
    }

    /// Always through the `nft` command (for comparison in benchmarks).
    pub fn command() -> Nft {
        Nft {
            backend: Runner::Command,
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Runner::Lib(_) => "libnftables",
            Runner::Command => "nft command",
        }
    }

    /// Frees what the backend caches between scripts (libnftables' copy of the ruleset); the
    /// next script fetches what it needs again.
    pub fn release_cache(&mut self) {
        if let Runner::Lib(l) = &mut self.backend {
            l.reset();
        }
    }

    /// Runs a script as one transaction; returns what nft printed.
    pub fn run(&mut self, script: &str) -> Result<String, NftError> {
        self.run_inner(script, false)
    }

    /// Runs a listing command with JSON output.
    pub fn run_json(&mut self, cmd: &str) -> Result<Json, NftError> {
        let out = self.run_inner(cmd, true)?;
        serde_json::from_str(&out).map_err(|e| NftError::Output(e.to_string()))
    }

    fn run_inner(&mut self, script: &str, json: bool) -> Result<String, NftError> {
        match &mut self.backend {
            Runner::Lib(l) => l.run(script, json),
            Runner::Command => {
                let mut cmd = Command::new("nft");
                if json {
                    // Listings print their JSON only when given as arguments, not with -f.
                    cmd.arg("-j").args(script.split_whitespace());
                } else {
                    cmd.args(["-f", "-"]);
                }
                let mut child = cmd
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(|e| NftError::Unavailable(e.to_string()))?;
                if let Some(mut stdin) = child.stdin.take().filter(|_| !json) {
                    stdin
                        .write_all(script.as_bytes())
                        .map_err(|e| NftError::Unavailable(e.to_string()))?;
                }
                let out = child
                    .wait_with_output()
                    .map_err(|e| NftError::Unavailable(e.to_string()))?;
                if !out.status.success() {
                    return Err(NftError::Failed(
                        String::from_utf8_lossy(&out.stderr).trim().to_string(),
                    ));
                }
                Ok(String::from_utf8_lossy(&out.stdout).into_owned())
            }
        }
    }
}

impl Default for Nft {
    fn default() -> Self {
        Nft::new()
    }
}

/// Whether ferry's table exists (over netlink, else through `nft`'s listing).
pub fn table_exists(nft: &mut Nft) -> Result<bool, NftError> {
    let names = Fallback::kernel_with(nft).table_names()?;
    Ok(names.iter().any(|n| n == TABLE))
}

fn items(v: &Json) -> impl Iterator<Item = (&str, &Json)> {
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.as_object())
        .flat_map(|o| o.iter().map(|(k, v)| (k.as_str(), v)))
}

/// Reads ferry's table from the kernel (empty state when there is none): over netlink, or
/// through `nft`'s JSON listing where netlink sockets are refused.
pub fn read_live(nft: &mut Nft) -> Result<LiveState, NftError> {
    read_live_table(nft, TABLE)
}

/// [`read_live`] of the table `table` (a shard of a sharded layout).
pub fn read_live_table(nft: &mut Nft, table: &str) -> Result<LiveState, NftError> {
    Fallback::kernel_with(nft).read_table(table)
}

/// Reads ferry's table through `nft -j list table` (empty state when there is none); what
/// [`read_live`] did before it read netlink, kept as its fallback and its reference in tests.
pub fn read_live_json(nft: &mut Nft) -> Result<LiveState, NftError> {
    read_live_json_table(nft, TABLE)
}

/// [`read_live_json`] of the table `table`.
pub fn read_live_json_table(nft: &mut Nft, table: &str) -> Result<LiveState, NftError> {
    // One listing (listing is the slow part at 100,000 rules); "no such table" is an empty state.
    let v = match nft.run_json(&format!("list table {FAMILY} {table}")) {
        Ok(v) => v,
        Err(NftError::Failed(msg)) if msg.contains("No such file or directory") => {
            return Ok(LiveState::default())
        }
        Err(e) => return Err(e),
    };
    let mut live = LiveState {
        table: true,
        ..LiveState::default()
    };
    for (kind, o) in items(&v) {
        match kind {
            "chain" => {
                let Some(name) = o["name"].as_str() else {
                    continue;
                };
                let base = match (o["type"].as_str(), o["hook"].as_str(), o["prio"].as_i64()) {
                    (Some(t), Some(h), Some(p)) => {
                        let type_ = match t {
                            "nat" => ChainType::Nat,
                            _ => ChainType::Filter,
                        };
                        let hook = match h {
                            "prerouting" => Some(Hook::Prerouting),
                            "output" => Some(Hook::Output),
                            "postrouting" => Some(Hook::Postrouting),
                            _ => None,
                        };
                        // A hook ferry never uses reads as a regular chain: not ferry's, so it
                        // is deleted (or refilled) like any chain that is not planned.
                        hook.map(|hook| BaseChain {
                            type_,
                            hook,
                            priority: p as i32,
                        })
                    }
                    _ => None,
                };
                live.chains.insert(
                    name.into(),
                    LiveChain {
                        base,
                        fingerprint: None,
                        rules: 0,
                    },
                );
            }
            "rule" => {
                // Rules come in order; the first rule of a chain carries its fingerprint.
                let Some(chain) = o["chain"].as_str() else {
                    continue;
                };
                if let Some(c) = live.chains.get_mut(chain) {
                    c.rules += 1;
                    if c.rules == 1 {
                        c.fingerprint = o["comment"].as_str().and_then(fingerprint_of_comment);
                    }
                }
            }
            "set" | "map" => {
                let Some(name) = o["name"].as_str() else {
                    continue;
                };
                let key = match &o["type"] {
                    Json::String(s) => s.clone(),
                    Json::Array(a) => a
                        .iter()
                        .filter_map(|t| t.as_str())
                        .collect::<Vec<_>>()
                        .join(" . "),
                    _ => String::new(),
                };
                let signature = match o["map"].as_str() {
                    Some(m) => format!("{key} : {m}"),
                    None => key,
                };
                let mut elements = std::collections::BTreeMap::new();
                for e in o["elem"].as_array().into_iter().flatten() {
                    let (k, verdict, to) = match e.as_array() {
                        Some(pair) if pair.len() == 2 && kind == "map" => (
                            key_of(&pair[0]),
                            verdict_of(&pair[1]),
                            endpoint_of(&pair[1]),
                        ),
                        _ => (key_of(e), None, None),
                    };
                    // A key or verdict we can't read is dropped from the view: the differ then
                    // re-adds the planned element, and a stray one is left (reported at start).
                    if let Some(k) = k {
                        let e = match to {
                            Some(to) => LiveSet::endpoint_element(to),
                            None => LiveSet::element(verdict),
                        };
                        elements.insert(k.into(), e);
                    }
                }
                live.sets.insert(
                    name.to_string(),
                    LiveSet {
                        signature,
                        elements,
                    },
                );
            }
            _ => {}
        }
    }
    Ok(live)
}

fn key_of(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Number(n) => Some(n.to_string()),
        Json::Object(o) => {
            if let Some(e) = o.get("elem") {
                return key_of(&e["val"]);
            }
            if let Some(c) = o.get("concat").and_then(|c| c.as_array()) {
                let parts: Option<Vec<String>> = c.iter().map(key_of).collect();
                return parts.map(|p| p.join(" . "));
            }
            // Interval sets: {"range": [a, b]}, or {"prefix": {...}} when a range is a prefix.
            if let Some([a, b]) = o.get("range").and_then(|r| r.as_array()).map(Vec::as_slice) {
                return Some(format!("{}-{}", a.as_str()?, b.as_str()?));
            }
            if let Some(p) = o.get("prefix") {
                let addr: std::net::IpAddr = p["addr"].as_str()?.parse().ok()?;
                let len = u32::try_from(p["len"].as_u64()?).ok()?;
                return prefix_as_range(addr, len);
            }
            None
        }
        _ => None,
    }
}

/// "a-b" for a prefix, as ferry writes ranges.
fn prefix_as_range(addr: std::net::IpAddr, len: u32) -> Option<String> {
    use std::net::IpAddr;
    let (bits, v) = match addr {
        IpAddr::V4(a) => (32, u128::from(u32::from(a))),
        IpAddr::V6(a) => (128, u128::from(a)),
    };
    if len > bits {
        return None;
    }
    let host = bits - len;
    let last = if host >= 128 {
        u128::MAX
    } else {
        v | ((1u128 << host) - 1)
    };
    let ip = |x: u128| -> IpAddr {
        if bits == 32 {
            IpAddr::from((x as u32).to_be_bytes())
        } else {
            IpAddr::from(x.to_be_bytes())
        }
    };
    Some(if host == 0 {
        ip(v).to_string()
    } else {
        format!("{}-{}", ip(v), ip(last))
    })
}

/// An endpoint map element's data, `{"concat": ["10.42.0.1", 8080]}`.
fn endpoint_of(v: &Json) -> Option<(std::net::IpAddr, u16)> {
    match v["concat"].as_array()?.as_slice() {
        [a, p] => Some((a.as_str()?.parse().ok()?, u16::try_from(p.as_u64()?).ok()?)),
        _ => None,
    }
}

fn verdict_of(v: &Json) -> Option<Verdict> {
    let o = v.as_object()?;
    let (k, val) = o.iter().next()?;
    let target = || val["target"].as_str().map(str::to_string);
    match k.as_str() {
        "accept" => Some(Verdict::Accept),
        "drop" => Some(Verdict::Drop),
        "return" => Some(Verdict::Return),
        "goto" => target().map(|t| Verdict::Goto(t.into())),
        "jump" => target().map(|t| Verdict::Jump(t.into())),
        _ => None,
    }
}

/// Owns ferry's table in the current network namespace.
pub struct Dataplane {
    backend: Box<dyn Backend>,
    /// What the kernel holds, as far as we know; None forces a read before the next apply.
    live: Option<LiveState>,
    /// The table owned (None: [`TABLE`]); the rulesets applied must name the same.
    table: Option<String>,
}

impl Dataplane {
    /// Over netlink, with libnftables' text through `nft` as the fallback
    /// ([`Fallback::kernel`]).
    pub fn new(nft: Nft) -> Dataplane {
        Dataplane::with_backend(Box::new(Fallback::kernel(nft)))
    }

    /// Through `backend` (a [`fake::Fake`] in tests).
    pub fn with_backend(backend: Box<dyn Backend>) -> Dataplane {
        Dataplane {
            backend,
            live: None,
            table: None,
        }
    }

    /// A dataplane owning the table `name` (one table of a sharded layout, see
    /// `ferry_plan::plan::plan_sharded`). Only netlink writes carry a table of another name
    /// than [`TABLE`]: the text rendering names [`TABLE`].
    pub fn for_table(nft: Nft, name: &str) -> Dataplane {
        Dataplane::new(nft).owning(name)
    }

    /// This dataplane owns the table `name` instead of [`TABLE`].
    pub fn owning(mut self, name: &str) -> Dataplane {
        self.table = (name != TABLE).then(|| name.to_string());
        self
    }

    /// Every change through libnftables' text (for comparison: benchmarks and tests); reads
    /// still go over netlink where they can.
    pub fn text_only(mut self) -> Dataplane {
        let nft = self
            .backend
            .nft()
            .map(|n| std::mem::replace(n, Nft::command()))
            .unwrap_or_default();
        self.backend = Box::new(Fallback::kernel(nft).second_writes_only());
        self
    }

    /// The kernel's reason for refusing the last netlink batch that was then applied as text
    /// (taken: reported once).
    pub fn netlink_refused(&mut self) -> Option<String> {
        self.backend.take_refusal()
    }

    /// Tests only: makes every netlink batch end with a message the kernel refuses, to prove
    /// the text fallback.
    #[doc(hidden)]
    pub fn spoil_netlink_batches(&mut self) {
        self.backend.spoil_netlink_batches();
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

    /// Forgets what we know of the kernel's table: the next apply reads it back first.
    pub fn resync(&mut self) {
        self.live = None;
    }

    fn commit(&mut self, desired: &Ruleset, changes: &Changes) -> Result<(), NftError> {
        if changes.is_empty() {
            return Ok(());
        }
        let step = Step::Ops {
            rs: desired,
            ops: &changes.ops,
            live: self.live.as_ref(),
        };
        let done = self.backend.commit(&[step]).map(|_| ());
        if done.is_err() {
            self.live = None;
        }
        done
    }

    /// Applies `desired` as one transaction touching only what differs. On failure the next
    /// call reads the kernel's table again.
    pub fn apply(&mut self, desired: &Ruleset) -> Result<Changes, NftError> {
        let live = match self.live.take() {
            Some(l) => l,
            None => self
                .backend
                .read_table(self.table.as_deref().unwrap_or(TABLE))?,
        };
        let changes = ferry_plan::diff::diff_ops(&live, desired);
        self.live = Some(live);
        self.commit(desired, &changes)?;
        self.live = Some(LiveState::of(desired));
        Ok(changes)
    }

    /// Like [`Dataplane::apply`], but compares only what the planner says it touched: the cost
    /// follows the size of the change, not of the table. Falls back to a full comparison when
    /// the kernel's table is not known (start, after an error) or everything was touched.
    pub fn apply_touched(
        &mut self,
        desired: &Ruleset,
        touched: &ferry_plan::plan::Touched,
    ) -> Result<Changes, NftError> {
        let Some(live) = self.live.as_ref() else {
            return self.apply(desired);
        };
        let Some(changes) = ferry_plan::diff::diff_touched_ops(live, desired, touched) else {
            return self.apply(desired);
        };
        self.commit(desired, &changes)?;
        if let Some(live) = self.live.as_mut() {
            live.update_touched(desired, touched);
        }
        Ok(changes)
    }
}

/// `ferry cleanup`: removes ferry's tables (the common table `ferry` and the shard tables
/// `ferry-K` of a sharded layout), never another's; true when there was one.
pub fn cleanup(nft: &mut Nft) -> Result<bool, NftError> {
    Ok(!tables::cleanup_all(nft)?.is_empty())
}
