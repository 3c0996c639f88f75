//! `ferry lab ...` command line.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::get::{self, NsFilter};
use crate::manifests;
use crate::ops;
use crate::show;
use crate::state::Ctx;
use crate::topology::{self, AgentAction};

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Create the lab: LAN bridge, client, nodes, one ferry agent per node.
    Up {
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// Do not start agents (for tests of the lab itself).
        #[arg(long)]
        no_agents: bool,
        /// Run the lab API server (a test double of kube-apiserver) and the lab runtime
        /// (kubelet, EndpointSlice controller); agents watch the API (`--kubeconfig`), and
        /// `kubectl --kubeconfig "$(ferry lab kubeconfig)"` works on the lab. Default:
        /// $FERRY_LAB_API (1 or 0), else off.
        #[arg(long, default_missing_value = "true", num_args = 0..=1,
              action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
        api: Option<bool>,
        /// Add a `router` namespace on the LAN (192.168.2.1) running BIRD 2 that peers over
        /// BGP with every node (router AS 64512, nodes AS 64513) and installs ECMP routes; the
        /// client routes through it. Needs `bird2`.
        #[arg(long)]
        bgp: bool,
    },
    /// Print the router's kernel routes and BIRD's sessions and routes (labs up with --bgp).
    Router,
    /// Print the path of the lab's kubeconfig (for kubectl; labs brought up with --api).
    Kubeconfig,
    /// Stop every process of the lab and delete its namespaces and files (safe to repeat, works
    /// after a crash).
    Down,
    /// Create or update objects from files (Deployments and Pods become lab pods).
    Apply {
        /// File, directory or `-` (repeatable).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// Delete objects: `delete -f FILE` or `delete svc|deployment|pod|configmap NAME...`.
    Delete {
        #[arg(short = 'f', long = "filename")]
        files: Vec<PathBuf>,
        /// Resource type (svc, deployment, pod, configmap, endpointslice).
        #[arg(required_unless_present = "files")]
        resource: Option<String>,
        names: Vec<String>,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
    /// Run a command in a node, a pod or the client: `exec TARGET -- CMD...`.
    Exec {
        /// Node name, pod name, `client`, `lan` or `router` (--bgp).
        target: String,
        /// The command (after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// Where a connection goes on a node, asked of the live node (its kernel's table, its
    /// agent's settings): `explain NODE -- --from 192.168.2.100 --to 192.168.2.200:80 [-o json]`.
    Explain {
        node: String,
        /// `ferry explain`'s own flags (after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        args: Vec<String>,
    },
    /// List pods, services (from `ferry get svc`), deployments or nodes: `get pods,svc -o wide`.
    Get {
        what: String,
        #[arg(short = 'o', long = "output")]
        output: Option<String>,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[arg(short = 'A', long = "all-namespaces")]
        all_namespaces: bool,
    },
    /// Start, stop (SIGTERM), restart or kill (SIGKILL) a node's agent.
    Agent {
        #[command(subcommand)]
        action: AgentCmd,
    },
    /// Start, stop (SIGTERM), restart or kill (SIGKILL) the lab API server (labs brought up
    /// with --api); it keeps its objects across restarts.
    Api {
        #[command(subcommand)]
        action: ApiCmd,
    },
    /// Print the log of a node's agent (or of a pod's server; `apiserver`, `runtime`).
    Logs { target: String },
    /// Lab-only readiness switch: `set-ready POD false` marks the pod's endpoints not ready.
    SetReady {
        pod: String,
        #[arg(action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
        ready: bool,
    },
    /// Benchmark: client-visible failover time of 192.168.2.200 over N trials (owner's link
    /// down -> first successful request) in a fresh 3-node lab, for ferry or keepalived. Uses
    /// prefix `fo` unless --prefix names another (never the default lab `ferry`).
    BenchFailover(crate::failover::FailoverArgs),
    /// Benchmark: first-packet (TCP connect) latency to the 1st ... 10,000th service for
    /// ferry's layouts and kube-proxy's iptables layout, in namespaces `PREFIX-fp-*` (see
    /// bench/first-packet.sh).
    BenchFirstPacket(crate::firstpacket::FirstPacketArgs),
    /// (internal) The lab API server (`up --api` starts it).
    #[command(hide = true)]
    ServeApi {
        #[arg(long)]
        dir_root: PathBuf,
        /// Port on 127.0.0.1 (0: a free one).
        #[arg(long, default_value_t = 0)]
        port: u16,
    },
    /// (internal) The lab runtime: kubelet and EndpointSlice controller (`up --api`).
    #[command(hide = true)]
    ServeRuntime {
        #[arg(long)]
        dir_root: PathBuf,
    },
    /// (internal) The server inside every lab pod.
    #[command(hide = true)]
    ServePod {
        #[arg(long)]
        name: String,
        #[arg(long)]
        tcp: Vec<u16>,
        #[arg(long)]
        udp: Vec<u16>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AgentCmd {
    /// Start NODE's agent; arguments after `--` are added to the agent's own and kept for this
    /// node (`ferry lab agent restart n1 -- --nodeport-addresses 0.0.0.0/0`).
    Start {
        node: String,
        /// Forget the extra arguments given before.
        #[arg(long)]
        reset_args: bool,
        #[arg(last = true)]
        args: Vec<String>,
    },
    Stop {
        node: String,
    },
    /// Stop and start NODE's agent (with extra arguments after `--`, as for start).
    Restart {
        node: String,
        #[arg(long)]
        reset_args: bool,
        #[arg(last = true)]
        args: Vec<String>,
    },
    Kill {
        node: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApiCmd {
    Start,
    Stop,
    Restart,
    Kill,
}

#[derive(Debug, Args)]
pub struct LabArgs {
    /// Name prefix of every namespace and file of this lab (two labs can run side by side).
    #[arg(long, global = true, default_value = "ferry")]
    pub prefix: String,
    #[command(subcommand)]
    pub command: LabCommand,
}

fn print_report(report: &manifests::Report) -> i32 {
    for l in &report.lines {
        println!("{l}");
    }
    for e in &report.errors {
        eprintln!("{e}");
    }
    i32::from(!report.errors.is_empty())
}

fn docs_or_errors(files: &[PathBuf]) -> Result<(Vec<manifests::Doc>, Vec<String>)> {
    let (docs, errors) = manifests::docs_from_files(files)?;
    for e in &errors {
        eprintln!("error: {e}");
    }
    Ok((docs, errors))
}

/// Runs one `ferry lab` command; returns the process exit code.
pub fn run_lab(args: LabArgs) -> Result<i32> {
    if let LabCommand::ServePod { name, tcp, udp } = &args.command {
        crate::serve::serve_pod(name, tcp, udp)?;
        return Ok(0);
    }
    if let LabCommand::ServeApi { dir_root, port } = &args.command {
        let ctx = Ctx::new(&args.prefix, Some(dir_root.clone()), None)?;
        crate::cluster::serve_api(&ctx, *port)?;
        return Ok(0);
    }
    if let LabCommand::ServeRuntime { dir_root } = &args.command {
        let ctx = Ctx::new(&args.prefix, Some(dir_root.clone()), None)?;
        crate::runtime::serve_runtime(&ctx)?;
        return Ok(0);
    }
    if let LabCommand::BenchFailover(opts) = &args.command {
        return crate::failover::run(&args.prefix, opts);
    }
    if let LabCommand::BenchFirstPacket(opts) = &args.command {
        return crate::firstpacket::run(&args.prefix, opts);
    }
    let ctx = Ctx::new(&args.prefix, None, None)?;
    match args.command {
        LabCommand::ServePod { .. }
        | LabCommand::BenchFailover(_)
        | LabCommand::BenchFirstPacket(_)
        | LabCommand::ServeApi { .. }
        | LabCommand::ServeRuntime { .. } => Ok(0),
        LabCommand::Up {
            nodes,
            no_agents,
            api,
            bgp,
        } => {
            let api = api.unwrap_or_else(crate::api::api_default);
            let report = topology::up_full(&ctx, nodes, !no_agents, api, bgp)?;
            show::print_up(&ctx, &report);
            if let Some(r) = &report.state.router {
                println!(
                    "  router  {}  BIRD 2, AS {} (nodes AS {})  netns {}  birdc -s {}",
                    r.ip,
                    r.asn,
                    r.node_asn,
                    r.ns,
                    r.socket.display()
                );
                println!(
                    "next: ferry lab{} router",
                    crate::state::prefix_flag(&ctx.prefix)
                );
            }
            Ok(0)
        }
        LabCommand::Down => {
            let r = topology::down(&ctx)?;
            if r.existed {
                println!("{}", show::down_line(&ctx, &r));
            } else {
                println!("lab {:?} is not up (nothing to do)", ctx.prefix);
            }
            Ok(0)
        }
        LabCommand::Apply { files } => {
            let (docs, errors) = docs_or_errors(&files)?;
            let report = ops::apply(&ctx, &docs)?;
            Ok(print_report(&report).max(i32::from(!errors.is_empty())))
        }
        LabCommand::Delete {
            files,
            resource,
            names,
            namespace,
        } => {
            if !files.is_empty() {
                if resource.is_some() {
                    anyhow::bail!("give either -f FILE or RESOURCE NAME..., not both");
                }
                let (docs, errors) = docs_or_errors(&files)?;
                let report = ops::delete(&ctx, &docs)?;
                return Ok(print_report(&report).max(i32::from(!errors.is_empty())));
            }
            let Some(resource) = resource else {
                anyhow::bail!("give -f FILE or RESOURCE NAME...");
            };
            // `delete svc/web` works like kubectl.
            let (resource, names) = match resource.split_once('/') {
                Some((r, n)) => {
                    let mut all = vec![n.to_string()];
                    all.extend(names);
                    (r.to_string(), all)
                }
                None => (resource, names),
            };
            if names.is_empty() {
                anyhow::bail!("error: resource(s) were provided, but no name was specified");
            }
            let report = ops::delete_named(&ctx, &resource, &namespace, &names)?;
            Ok(print_report(&report))
        }
        LabCommand::Router => {
            let st = ops::state(&ctx)?;
            print!("{}", crate::router::show(&st)?);
            Ok(0)
        }
        LabCommand::Kubeconfig => {
            let st = ops::state(&ctx)?;
            println!("{}", crate::cluster::kubeconfig_path(&ctx, &st)?.display());
            Ok(0)
        }
        LabCommand::Exec { target, command } => ops::exec_interactive(&ctx, &target, &command),
        LabCommand::Get {
            what,
            output,
            namespace,
            all_namespaces,
        } => {
            let wide = match output.as_deref() {
                None => false,
                Some("wide") => true,
                Some(o) => anyhow::bail!("-o {o} is not supported by `ferry lab get` (only wide)"),
            };
            let ns = if all_namespaces {
                NsFilter::All
            } else {
                NsFilter::One(namespace)
            };
            let st = ops::state(&ctx)?;
            let out = get::get(&ctx, &st, &what, wide, &ns)?;
            print!("{}", out.stdout);
            eprint!("{}", out.stderr);
            Ok(i32::from(!out.ok))
        }
        LabCommand::Explain { node, args } => {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = ops::explain(&ctx, &node, &args)?;
            print!("{}", String::from_utf8_lossy(&out.stdout));
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
            Ok(out.status.code().unwrap_or(1))
        }
        LabCommand::Agent { action } => {
            let (node, action) = match action {
                AgentCmd::Start {
                    node,
                    reset_args,
                    args,
                } => {
                    topology::set_extra_agent_args(&ctx, &node, reset_args, &args)?;
                    (node, AgentAction::Start)
                }
                AgentCmd::Stop { node } => (node, AgentAction::Stop),
                AgentCmd::Restart {
                    node,
                    reset_args,
                    args,
                } => {
                    topology::set_extra_agent_args(&ctx, &node, reset_args, &args)?;
                    (node, AgentAction::Restart)
                }
                AgentCmd::Kill { node } => (node, AgentAction::Kill),
            };
            let (lines, warnings) = topology::agent(&ctx, &node, action)?;
            for l in lines {
                println!("{l}");
            }
            for w in warnings {
                eprintln!("warning: {w}");
            }
            Ok(0)
        }
        LabCommand::Api { action } => {
            use crate::cluster::ApiAction;
            let action = match action {
                ApiCmd::Start => ApiAction::Start,
                ApiCmd::Stop => ApiAction::Stop,
                ApiCmd::Restart => ApiAction::Restart,
                ApiCmd::Kill => ApiAction::Kill,
            };
            for l in crate::cluster::api_action(&ctx, action)? {
                println!("{l}");
            }
            Ok(0)
        }
        LabCommand::Logs { target } => {
            let st = ops::state(&ctx)?;
            let path =
                if target == crate::cluster::API_PROC || target == crate::cluster::RUNTIME_PROC {
                    ctx.proc_log(&target)
                } else if st.node(&target).is_some() {
                    ctx.agent_log(&target)
                } else if st.pod(&target).is_some() {
                    ctx.pod_log(&target)
                } else {
                    anyhow::bail!(
                        "no node or pod {target:?} (nodes: {})",
                        st.node_names().join(", ")
                    );
                };
            match std::fs::read_to_string(&path) {
                Ok(text) => print!("{text}"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    eprintln!("no log yet ({})", path.display())
                }
                Err(e) => return Err(e.into()),
            }
            Ok(0)
        }
        LabCommand::SetReady { pod, ready } => {
            println!("{}", ops::set_ready(&ctx, &pod, ready)?);
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::{Cli, Command};
    use clap::{CommandFactory, Parser};

    fn parse(args: &[&str]) -> LabArgs {
        let cli = Cli::try_parse_from(args).expect("parses");
        match cli.command {
            Command::Lab(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn command_line() {
        Cli::command().debug_assert();
        let a = parse(&["ferry", "lab", "set-ready", "p", "false"]);
        assert!(matches!(
            a.command,
            LabCommand::SetReady { ready: false, .. }
        ));
        let a = parse(&[
            "ferry", "lab", "--prefix", "x", "exec", "client", "--", "ip", "-br", "a",
        ]);
        assert_eq!(a.prefix, "x");
        match a.command {
            LabCommand::Exec { target, command } => {
                assert_eq!(target, "client");
                assert_eq!(command, ["ip", "-br", "a"]);
            }
            other => panic!("{other:?}"),
        }
        let a = parse(&["ferry", "lab", "exec", "n", "ip", "-br", "a"]);
        assert!(matches!(a.command, LabCommand::Exec { command, .. } if command.len() == 3));
        let a = parse(&["ferry", "lab", "delete", "svc", "web", "--prefix", "y"]);
        assert_eq!(a.prefix, "y");
        assert!(
            matches!(a.command, LabCommand::Delete { resource: Some(r), names, .. } if r == "svc" && names == ["web"])
        );
        let a = parse(&["ferry", "lab", "apply", "-f", "a.yaml", "-f", "dir"]);
        assert!(matches!(a.command, LabCommand::Apply { files } if files.len() == 2));
        let cli = Cli::try_parse_from(["ferry", "demo", "--nodes", "3"]).expect("demo");
        assert!(matches!(cli.command, Command::Demo(d) if d.nodes == 3 && d.prefix == "demo"));
        let cli = Cli::try_parse_from(["ferry", "bench", "--services", "5", "--nft-command"])
            .expect("bench");
        assert!(matches!(cli.command, Command::Bench(b) if b.services == 5 && b.nft_command));
        let a = parse(&["ferry", "lab", "up", "--nodes", "3", "--no-agents"]);
        assert!(matches!(
            a.command,
            LabCommand::Up {
                nodes: 3,
                no_agents: true,
                api: None,
                bgp: false,
            }
        ));
        let a = parse(&["ferry", "lab", "up", "--api"]);
        assert!(matches!(
            a.command,
            LabCommand::Up {
                api: Some(true),
                ..
            }
        ));
        let a = parse(&["ferry", "lab", "up", "--api=false", "--no-agents"]);
        assert!(matches!(
            a.command,
            LabCommand::Up {
                api: Some(false),
                ..
            }
        ));
        let a = parse(&["ferry", "lab", "up", "--bgp"]);
        assert!(matches!(a.command, LabCommand::Up { bgp: true, .. }));
        let a = parse(&["ferry", "lab", "router"]);
        assert!(matches!(a.command, LabCommand::Router));
        let a = parse(&["ferry", "lab", "kubeconfig", "--prefix", "p"]);
        assert!(matches!(a.command, LabCommand::Kubeconfig) && a.prefix == "p");
    }
}
