//! What `ferry lab up` and `down` print; shared by the `lab` commands and the demo.

use crate::state::{prefix_flag, Ctx};
use crate::topology::{self, DownReport};

/// What `ferry lab up` prints: the lab, its nodes and agents, warnings, what to do next.
pub fn print_up(ctx: &Ctx, report: &topology::UpReport) {
    let st = &report.state;
    println!(
        "lab {:?} up: {} nodes, client {} ({}), files in {}",
        ctx.prefix,
        st.nodes.len(),
        st.client.ip,
        st.client.ns,
        ctx.dir().display()
    );
    for n in &st.nodes {
        let agent = match topology::agent_pid(ctx, st, &n.name) {
            Some(pid) => format!("agent pid {pid}"),
            None if st.agents => "agent not running".to_string(),
            None => "no agent".to_string(),
        };
        println!(
            "  {:<18} {:<14} pods {:<14} netns {}  {agent}",
            n.name, n.ip, n.pod_cidr, n.ns
        );
    }
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    let p = prefix_flag(&ctx.prefix);
    if let Some(api) = &st.api {
        println!(
            "  API server (a test double of kube-apiserver) on {} (host) and {} (LAN); \
             kubeconfig {}",
            api.host_url(),
            api.lan_url(),
            ctx.kubeconfig().display()
        );
        println!("next: kubectl --kubeconfig \"$(ferry lab{p} kubeconfig)\" apply -f FILE");
    }
    println!(
        "next: ferry lab{p} apply -f FILE; ferry lab{p} get pods,svc -o wide; ferry lab{p} down"
    );
}

/// What `ferry lab down` prints after taking a lab down.
pub fn down_line(ctx: &Ctx, r: &DownReport) -> String {
    format!(
        "lab {:?} down: {} processes stopped, {} namespaces deleted",
        ctx.prefix,
        r.processes,
        r.namespaces.len()
    )
}
