//! The `ferry` binary: node agent and kubectl-style views. `ferry lab`, `ferry demo` and
//! `ferry bench` run the `ferry-lab` binary found next to this one.
//!
//! Data flows one way: source (manifests) -> model (allocation, endpoints) -> plan (nftables
//! ruleset) -> dataplane (the kernel).

/// Agent log lines: a wall-clock time, then the message (to stderr, from a writer thread:
/// never blocks, never panics; see `logging`).
macro_rules! log {
    ($($arg:tt)*) => {
        crate::logging::line(format!("{} {}", crate::agent::timestamp(), format_args!($($arg)*)))
    };
}

/// jemalloc (see Cargo.toml for why), returning freed pages to the system after a second; or
/// the C library's malloc when the environment has `FERRY_MALLOC=system` (for heap profilers
/// such as heaptrack, which see only malloc: `bench/idle.sh --heaptrack`).
#[global_allocator]
static GLOBAL: Allocator = Allocator;

/// jemalloc, or the system's allocator: chosen once, at the first allocation (the process's
/// first), and never changed, so every block is freed by the allocator that gave it.
struct Allocator;

/// 0: not chosen yet, 1: jemalloc, 2: the system's.
static CHOSEN: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

impl Allocator {
    #[inline]
    fn system(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        match CHOSEN.load(Relaxed) {
            1 => false,
            2 => true,
            _ => {
                // SAFETY: getenv with a NUL-terminated name; it allocates nothing. The first
                // allocation happens before any thread is started (no concurrent setenv).
                let v = unsafe { libc::getenv(c"FERRY_MALLOC".as_ptr()) };
                // SAFETY: getenv's result is NULL or a NUL-terminated string.
                let system = !v.is_null() && unsafe { std::ffi::CStr::from_ptr(v) } == c"system";
                CHOSEN.store(if system { 2 } else { 1 }, Relaxed);
                system
            }
        }
    }
}

// SAFETY: every call goes to one of two allocators, the same one for the whole run.
unsafe impl std::alloc::GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        if self.system() {
            unsafe { std::alloc::System.alloc(l) }
        } else {
            unsafe { tikv_jemallocator::Jemalloc.alloc(l) }
        }
    }
    #[inline]
    unsafe fn alloc_zeroed(&self, l: std::alloc::Layout) -> *mut u8 {
        if self.system() {
            unsafe { std::alloc::System.alloc_zeroed(l) }
        } else {
            unsafe { tikv_jemallocator::Jemalloc.alloc_zeroed(l) }
        }
    }
    #[inline]
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        if self.system() {
            unsafe { std::alloc::System.dealloc(p, l) }
        } else {
            unsafe { tikv_jemallocator::Jemalloc.dealloc(p, l) }
        }
    }
    #[inline]
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, new: usize) -> *mut u8 {
        if self.system() {
            unsafe { std::alloc::System.realloc(p, l, new) }
        } else {
            unsafe { tikv_jemallocator::Jemalloc.realloc(p, l, new) }
        }
    }
}

/// jemalloc's options, read at its start (`_rjem_` is the crate's symbol prefix): dirty and
/// muzzy pages go back to the system after 1 s, so an idle agent holds what it uses, not its
/// peak; one arena and no per-thread caches (the agent allocates mostly on one thread at a
/// time: these only held freed blocks out of reach, ~2.5 MiB at 10,000 services, with no
/// measurable cost to a sync).
#[used]
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: &[u8; 60] = b"dirty_decay_ms:1000,muzzy_decay_ms:0,narenas:1,tcache:false\0";

mod agent;
mod agent_core;
mod announce;
mod bgp;
mod explain;
mod get;
mod healthcheck;
mod http;
mod logging;
mod metrics;
mod netwatch;
mod singleton;
mod source;
mod state;

use std::ffi::OsString;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "Kubernetes Services for bare-metal clusters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node agent in this network namespace.
    Agent(agent::AgentArgs),
    /// kubectl-style listing: `ferry get svc [-o wide|yaml|json]`.
    Get(get::GetArgs),
    /// Where a new connection goes on a node, and why: `ferry explain --node N --manifests DIR
    /// --from 192.168.2.100 --to 192.168.2.200:80` (or --kubeconfig). Changes nothing.
    Explain(explain::ExplainArgs),
    /// Remove ferry's nftables table from this network namespace.
    Cleanup,
    /// Print the planned nftables script for a manifest directory (nothing is applied).
    Plan(agent::AgentArgs),
    /// Time plan + apply of many services in this network namespace (runs `ferry-lab bench`).
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// A cluster of network namespaces on this host (runs `ferry-lab lab`).
    #[command(disable_help_flag = true)]
    Lab {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Bring up a lab and replay the seed's walk through Service types (runs `ferry-lab demo`).
    #[command(disable_help_flag = true)]
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Agent(args) => agent::run(args),
        Command::Get(args) => get::run(args),
        Command::Explain(args) => explain::run(args),
        Command::Cleanup => cleanup(),
        Command::Plan(args) => plan(args),
        Command::Bench { args } => run_lab_binary("bench", &args),
        Command::Lab { args } => run_lab_binary("lab", &args),
        Command::Demo { args } => run_lab_binary("demo", &args),
    };
    logging::flush(std::time::Duration::from_secs(1));
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ferry: {e:#}");
            std::process::exit(1);
        }
    }
}

/// `ferry lab|demo|bench ARGS...`: execs `ferry-lab lab|demo|bench ARGS...` ($FERRY_LAB_EXE,
/// else `ferry-lab` next to this executable). Exec keeps the process, so its exit code and
/// signals are the command's own. The lab runs this `ferry` for its agents ($FERRY_EXE).
fn run_lab_binary(command: &str, args: &[OsString]) -> anyhow::Result<i32> {
    use anyhow::Context as _;
    use std::os::unix::process::CommandExt as _;
    let me = std::env::current_exe().context("finding the running executable")?;
    let lab = match std::env::var_os("FERRY_LAB_EXE").filter(|v| !v.is_empty()) {
        Some(p) => std::path::PathBuf::from(p),
        None => me.with_file_name("ferry-lab"),
    };
    if !lab.is_file() {
        anyhow::bail!(
            "`ferry {command}` runs the ferry-lab executable, and there is none at {}: build it \
             with `cargo build --release` (which builds ferry and ferry-lab) or `cargo build -p \
             ferry-lab`, or point FERRY_LAB_EXE at it",
            lab.display()
        );
    }
    let mut cmd = std::process::Command::new(&lab);
    cmd.arg(command).args(args);
    if std::env::var_os("FERRY_EXE").is_none_or(|v| v.is_empty()) {
        cmd.env("FERRY_EXE", &me);
    }
    let err = cmd.exec();
    Err(anyhow::Error::new(err).context(format!("running {}", lab.display())))
}

fn cleanup() -> anyhow::Result<i32> {
    let mut nft = ferry_nft::Nft::new();
    let removed = ferry_nft::tables::cleanup_all(&mut nft)?;
    if removed.is_empty() {
        println!("no table inet ferry here: nothing to do");
    }
    for t in removed {
        println!("removed table inet {t}");
    }
    Ok(0)
}

fn plan(mut args: agent::AgentArgs) -> anyhow::Result<i32> {
    use state::AllocStore;
    // The script names one table: the one-table layout, whatever --nft-shards says.
    args.nft_shards = 1;
    let state = state::StateDir::at(&args.state_dir);
    let snap = source::read_dir(args.manifest_dir()?)?;
    let host = netwatch::host_net();
    let pools = agent::load_pools(&snap, &args.service_cidr, &host);
    // What the agents allocated; nothing is written.
    let allocated = state.view(&snap.services, &snap.namespaces, &pools.0, source::now_ms())?;
    let mut planner = agent::TablePlanner::default();
    let p = agent::compute(
        &mut planner,
        &args,
        &snap,
        pools,
        agent::Allocated::All(allocated.0, allocated.1),
        &host,
    );
    for d in &p.diagnostics {
        eprintln!("{d}");
    }
    for t in planner.tables() {
        print!("{}", t.render_full());
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passed_on(argv: &[&str]) -> Vec<String> {
        let cli = Cli::try_parse_from(argv).expect("parses");
        let args = match cli.command {
            Command::Lab { args } | Command::Demo { args } | Command::Bench { args } => args,
            other => panic!("{other:?}"),
        };
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    /// `ferry lab|demo|bench` hand every argument to ferry-lab as given, flags, `--` and
    /// `--help` included.
    #[test]
    fn lab_commands_pass_their_arguments_on() {
        assert_eq!(
            passed_on(&["ferry", "lab", "--prefix", "x", "exec", "client", "--", "ip", "-br"]),
            ["--prefix", "x", "exec", "client", "--", "ip", "-br"]
        );
        assert_eq!(passed_on(&["ferry", "demo", "--help"]), ["--help"]);
        assert_eq!(
            passed_on(&["ferry", "bench", "--services", "10", "-h"]),
            ["--services", "10", "-h"]
        );
        assert!(passed_on(&["ferry", "lab"]).is_empty());
    }
}
