//! The `ferry` binary: node agent, kubectl-style views, lab and demo.
//!
//! Data flows one way: source (manifests) -> model (allocation, endpoints) -> plan (nftables
//! ruleset) -> dataplane (the kernel).

/// Agent log lines: a wall-clock time, then the message (to stderr).
macro_rules! log {
    ($($arg:tt)*) => {
        eprintln!("{} {}", crate::agent::timestamp(), format!($($arg)*))
    };
}

mod agent;
mod announce;
mod bench;
mod get;
// The metrics endpoint; the agent wires it in behind `--metrics-addr`.
#[allow(dead_code)]
mod http;
#[allow(dead_code)]
mod metrics;
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
    let state = state::StateDir::new(&args.state_dir)?;
    let snap = source::read_dir(&args.manifests)?;
    for e in &snap.errors {
        eprintln!("error: {e}");
    }
    let mut planner = ferry_plan::plan::Planner::default();
    let p = agent::compute(&mut planner, &args, &state, &snap, source::now_ms())?;
    for r in &p.rejected {
        eprintln!("rejected: {r}");
    }
    print!("{}", planner.ruleset().render_full());
    Ok(0)
}
