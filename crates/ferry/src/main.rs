//! The `ferry` binary: node agent, kubectl-style views, lab and demo.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "ferry", version, about = "Kubernetes Services for bare-metal clusters")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// A cluster of network namespaces on this host.
    Lab(ferry_lab::LabArgs),
    /// Bring up a lab and replay the seed's walk through Service types.
    Demo(ferry_lab::DemoArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
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
