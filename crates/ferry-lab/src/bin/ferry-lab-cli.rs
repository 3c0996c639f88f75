//! A stand-alone `ferry lab` (no agent, no `get svc`): the tests of the lab crate use it as the
//! executable that runs `lab serve-pod` inside pods. Same arguments as `ferry`: `lab ...`.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "ferry-lab-cli", about = "ferry lab without the rest of ferry")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// A cluster of network namespaces on this host.
    Lab(ferry_lab::LabArgs),
}

fn main() {
    let cli = Cli::parse();
    let Command::Lab(args) = cli.command;
    match ferry_lab::run_lab(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ferry lab: {e:#}");
            std::process::exit(1);
        }
    }
}
