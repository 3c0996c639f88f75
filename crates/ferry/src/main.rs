//! The `ferry` binary: node agent, kubectl-style views, lab and demo.
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

mod agent;
mod agent_core;
mod announce;
mod bench;
mod get;
mod http;
mod logging;
mod metrics;
mod netwatch;
mod source;
mod state;

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
    /// Remove ferry's nftables table from this network namespace.
    Cleanup,
    /// Print the planned nftables script for a manifest directory (nothing is applied).
    Plan(agent::AgentArgs),
    /// Time plan + apply of many services in this network namespace (see bench/dataplane.sh).
    Bench(bench::BenchArgs),
    /// A cluster of network namespaces on this host.
    Lab(ferry_lab::LabArgs),
    /// Bring up a lab and replay the seed's walk through Service types.
    Demo(ferry_lab::DemoArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Agent(args) => agent::run(args),
        Command::Get(args) => get::run(args),
        Command::Cleanup => cleanup(),
        Command::Plan(args) => plan(args),
        Command::Bench(args) => bench::run(args),
        Command::Lab(args) => ferry_lab::run_lab(args),
        Command::Demo(args) => ferry_lab::run_demo(args),
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

fn cleanup() -> anyhow::Result<i32> {
    let mut nft = ferry_nft::Nft::new();
    if ferry_nft::cleanup(&mut nft)? {
        println!("removed table inet ferry");
    } else {
        println!("no table inet ferry here: nothing to do");
    }
    Ok(0)
}

fn plan(args: agent::AgentArgs) -> anyhow::Result<i32> {
    use state::AllocStore;
    let state = state::StateDir::new(&args.state_dir)?;
    let snap = source::read_dir(&args.manifests)?;
    let pools =
        ferry_model::pools::load(&snap.config_maps, &snap.ip_pools, &snap.l2_advertisements);
    // What the agents allocated; nothing is written.
    let allocated = state.view(
        &snap.services,
        &snap.namespaces,
        &pools.0,
        &args.alloc_config(),
        source::now_ms(),
    )?;
    let mut planner = ferry_plan::plan::Planner::default();
    let host = netwatch::interface_addresses();
    let p = agent::compute(&mut planner, &args, &snap, pools, allocated, &host);
    for d in &p.diagnostics {
        eprintln!("{d}");
    }
    print!("{}", planner.ruleset().render_full());
    Ok(0)
}
