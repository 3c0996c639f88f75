//! `ferry lab`: a Kubernetes-like cluster of network namespaces on one host, and `ferry demo`.

use clap::{Args, Subcommand};

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Create the lab: LAN bridge, client, nodes, one ferry agent per node.
    Up {
        #[arg(long, default_value_t = 2)]
        nodes: usize,
    },
}

#[derive(Debug, Args)]
pub struct LabArgs {
    /// Name prefix of every namespace and file of this lab (two labs can run side by side).
    #[arg(long, global = true, default_value = "ferry")]
    pub prefix: String,
    #[command(subcommand)]
    pub command: LabCommand,
}

/// Runs one `ferry lab` command; returns the process exit code.
pub fn run_lab(args: LabArgs) -> anyhow::Result<i32> {
    let _ = args;
    anyhow::bail!("not yet")
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    #[arg(long, default_value = "demo")]
    pub prefix: String,
}

/// `ferry demo`: brings a lab up, replays the seed, tears it down.
pub fn run_demo(args: DemoArgs) -> anyhow::Result<i32> {
    let _ = args;
    anyhow::bail!("not yet")
}
