//! The `ferry-lab` binary's command line: `lab`, `demo` and `bench`. `ferry lab ...`,
//! `ferry demo ...` and `ferry bench ...` run this binary with the same arguments, so the agent
//! binary does not carry the lab, the demo or the benchmarks.

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::bench::BenchArgs;
use crate::cli::LabArgs;
use crate::demo::DemoArgs;

#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    bin_name = "ferry",
    version,
    about = "ferry's lab, demo and benchmarks (run as `ferry lab|demo|bench`)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// A cluster of network namespaces on this host.
    Lab(LabArgs),
    /// Bring up a lab and replay the seed's walk through Service types.
    Demo(DemoArgs),
    /// Time plan + apply of many services in this network namespace (see bench/dataplane.sh).
    Bench(BenchArgs),
}

/// Runs one command; returns the process exit code.
pub fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Lab(args) => crate::cli::run_lab(args),
        Command::Demo(args) => crate::demo::run_demo(args),
        Command::Bench(args) => crate::bench::run(args),
    }
}

/// The binary's `main`: parse, run, exit with the command's code (1 and the error on stderr
/// when it fails).
pub fn main() -> ! {
    let cli = Cli::parse();
    let what = match &cli.command {
        Command::Lab(_) => "ferry lab",
        Command::Demo(_) => "ferry demo",
        Command::Bench(_) => "ferry bench",
    };
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("{what}: {e:#}");
            std::process::exit(1);
        }
    }
}
