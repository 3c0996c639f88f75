//! Pods: a network namespace with a routed veth to its node, running `ferry lab serve-pod`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::state::{now_secs, save_state, write_atomic, Ctx, LabState, PodInfo, PortInfo};
use crate::sys;
use crate::topology::{spawn_in_ns, tail};

/// What to make a pod from.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    /// Pinned node (a Pod's spec.nodeName); None: the node with fewest pods.
    pub node: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<PortInfo>,
    pub owner: Option<String>,
    pub spec_hash: String,
}

/// Ports the pod's server opens: every TCP/UDP container port on both TCP and UDP (80 when
/// there are none).
pub fn server_ports(ports: &[PortInfo]) -> Vec<u16> {
    let set: BTreeSet<u16> = ports
        .iter()
        .filter(|p| p.protocol == "TCP" || p.protocol == "UDP")
        .map(|p| p.port)
        .collect();
    if set.is_empty() {
        vec![80]
    } else {
        set.into_iter().collect()
    }
}

fn pick_node(st: &LabState, pinned: Option<&str>) -> Result<(String, usize)> {
    if let Some(name) = pinned {
        let n = st.node(name).with_context(|| {
            format!(
                "nodeName {name:?} is not a node of this lab (nodes: {})",
                st.node_names().join(", ")
            )
        })?;
        return Ok((n.name.clone(), n.index));
    }
    let n = st
        .nodes
        .iter()
        .min_by_key(|n| (st.pods.iter().filter(|p| p.node == n.name).count(), n.index))
        .context("the lab has no nodes")?;
    Ok((n.name.clone(), n.index))
}

fn pick_ip(st: &LabState, node: &str, index: usize) -> Result<Ipv4Addr> {
    let used: BTreeSet<Ipv4Addr> = st
        .pods
        .iter()
        .filter(|p| p.node == node)
        .map(|p| p.ip)
        .collect();
    (10..=254u8)
        .map(|k| Ipv4Addr::new(10, 42, index as u8, k))
        .find(|ip| !used.contains(ip))
        .with_context(|| format!("no free pod address left on {node}"))
}

/// Creates pods (namespaces, veths, routes, servers) and waits until they accept connections.
/// On failure the pods of this call are removed again. Caller holds the lab lock.
pub fn create_pods(ctx: &Ctx, st: &mut LabState, specs: &[PodSpec]) -> Result<Vec<String>> {
    let mut new: Vec<PodInfo> = Vec::new();
    for spec in specs {
        if st.pod(&spec.name).is_some() || new.iter().any(|p| p.name == spec.name) {
            bail!("pod {:?} exists already", spec.name);
        }
        let ns = ctx.pod_ns(&spec.name);
        if sys::netns_exists(&ns) {
            bail!("namespace {ns} exists already (left over?)");
        }
        let (node, index) = pick_node(st, spec.node.as_deref())?;
        let ip = pick_ip(st, &node, index)?;
        let veth = format!("vp{}", st.next_veth);
        st.next_veth += 1;
        let ports = server_ports(&spec.ports);
        let pod = PodInfo {
            name: spec.name.clone(),
            namespace: spec.namespace.clone(),
            ns: ns.clone(),
            node,
            ip,
            veth,
            pid: None,
            ports: spec.ports.clone(),
            tcp: ports.clone(),
            udp: ports,
            labels: spec.labels.clone(),
            owner: spec.owner.clone(),
            ready: true,
            created: now_secs(),
            spec_hash: spec.spec_hash.clone(),
        };
        st.pods.push(pod.clone());
        st.namespaces.push(ns);
        new.push(pod);
    }
    if new.is_empty() {
        return Ok(Vec::new());
    }
    // Recorded before anything exists so that `down` cleans up after a crash in between.
    save_state(ctx, st)?;
    match build_pods(ctx, st, &new) {
        Ok(()) => {
            save_state(ctx, st)?;
            Ok(new.into_iter().map(|p| p.name).collect())
        }
        Err(e) => {
            let names: Vec<String> = new.iter().map(|p| p.name.clone()).collect();
            let _ = delete_pods(ctx, st, &names);
            let _ = save_state(ctx, st);
            Err(e)
        }
    }
}

fn build_pods(ctx: &Ctx, st: &mut LabState, new: &[PodInfo]) -> Result<()> {
    let names: Vec<String> = new.iter().map(|p| p.ns.clone()).collect();
    sys::add_netns(&names)?;
    let mut per_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in new {
        let node = st.node(&p.node).context("pod on an unknown node")?;
        let gw = node.pod_gateway();
        let lines = per_node.entry(node.ns.clone()).or_default();
        lines.push(format!(
            "link add {} type veth peer name eth0 netns {}",
            p.veth, p.ns
        ));
        lines.push(format!("link set {} up", p.veth));
        lines.push(format!("addr add {gw}/32 dev {} noprefixroute", p.veth));
        lines.push(format!("route replace {}/32 dev {}", p.ip, p.veth));
        lines.push(format!(
            "addr add {}/128 dev {} noprefixroute nodad",
            node.pod_gateway6(),
            p.veth
        ));
        lines.push(format!("route replace {}/128 dev {}", p.ip6(), p.veth));
    }
    // Set before the veths exist: no duplicate address detection to wait for.
    for p in new {
        sys::set_sysctls(&p.ns, &[("net.ipv6.conf.default.accept_dad", "0")])?;
    }
    for (ns, lines) in &per_node {
        sys::ip_batch(Some(ns), lines)?;
    }
    for p in new {
        let node = st.node(&p.node).context("pod on an unknown node")?;
        let gw = node.pod_gateway();
        let gw6 = node.pod_gateway6();
        sys::ip_batch(
            Some(&p.ns),
            &[
                "link set lo up".to_string(),
                "link set eth0 up".to_string(),
                format!("addr add {}/32 dev eth0", p.ip),
                format!("route add {gw} dev eth0"),
                format!("route add default via {gw} dev eth0"),
                format!("addr add {}/128 dev eth0 nodad", p.ip6()),
                format!("route add {gw6} dev eth0"),
                format!("route add default via {gw6} dev eth0"),
            ],
        )?;
    }
    for p in new {
        let mut args = vec![
            "lab".to_string(),
            "serve-pod".to_string(),
            "--name".to_string(),
            p.name.clone(),
        ];
        for port in &p.tcp {
            args.push("--tcp".into());
            args.push(port.to_string());
        }
        for port in &p.udp {
            args.push("--udp".into());
            args.push(port.to_string());
        }
        let exe = ctx.require_exe(crate::state::LAB_EXE_NAME)?;
        let pid = spawn_in_ns(&p.ns, exe, &args, &ctx.pod_log(&p.name))?;
        write_atomic(&ctx.pod_pid_file(&p.name), format!("{pid}\n").as_bytes())?;
        if let Some(rec) = st.pods.iter_mut().find(|r| r.name == p.name) {
            rec.pid = Some(pid);
        }
    }
    save_state(ctx, st)?;
    for p in new {
        let pid = st.pod(&p.name).and_then(|r| r.pid);
        wait_ready(ctx, p, pid)?;
    }
    Ok(())
}

/// Polls (from inside the pod) until every TCP port accepts connections.
fn wait_ready(ctx: &Ctx, p: &PodInfo, pid: Option<u32>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    for &port in &p.tcp {
        let addr = SocketAddr::from((p.ip, port));
        let ok = sys::in_netns(&p.ns, || loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return true;
            }
            if Instant::now() > deadline || pid.is_some_and(|pid| !sys::pid_alive(pid)) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        })?;
        if !ok {
            bail!(
                "pod {} does not accept connections on {addr}; last lines of {}:\n{}",
                p.name,
                ctx.pod_log(&p.name).display(),
                tail(&ctx.pod_log(&p.name), 5)
            );
        }
    }
    Ok(())
}

/// Stops the pods' servers and deletes their namespaces (which removes both veth ends and the
/// node's route). Caller holds the lab lock and saves the state.
pub fn delete_pods(ctx: &Ctx, st: &mut LabState, names: &[String]) -> Result<()> {
    let victims: Vec<PodInfo> = st
        .pods
        .iter()
        .filter(|p| names.contains(&p.name))
        .cloned()
        .collect();
    let pids: Vec<u32> = victims.iter().filter_map(|p| p.pid).collect();
    sys::stop_pids(&pids, false, Duration::from_secs(2), |pid| {
        victims.iter().any(|p| sys::pid_in_netns(pid, &p.ns))
    });
    // Delete the node ends first: a namespace is destroyed asynchronously after `ip netns
    // del`, and its veths (with the node's route to the pod IP) would linger for a while.
    let mut per_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in &victims {
        if let Some(node) = st.node(&p.node) {
            per_node
                .entry(node.ns.clone())
                .or_default()
                .push(format!("link del {}", p.veth));
        }
    }
    for (ns, lines) in &per_node {
        // Links already gone are fine: -force runs every line whatever happens.
        let _ = sys::ip_batch_force(ns, lines);
    }
    let mut errors = Vec::new();
    for p in &victims {
        // Anything else someone started inside the pod (`ferry lab exec`) goes too.
        let stray = sys::netns_pids(&p.ns);
        sys::stop_pids(&stray, false, Duration::from_secs(2), |pid| {
            sys::pid_in_netns(pid, &p.ns)
        });
        if let Err(e) = sys::del_netns(std::slice::from_ref(&p.ns)) {
            errors.push(format!("{e:#}"));
            continue;
        }
        let _ = fs::remove_file(ctx.pod_pid_file(&p.name));
        st.pods.retain(|r| r.name != p.name);
        st.namespaces.retain(|n| *n != p.ns);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("{}", errors.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(port: u16, protocol: &str) -> PortInfo {
        PortInfo {
            name: String::new(),
            port,
            protocol: protocol.into(),
        }
    }

    #[test]
    fn ports_of_server() {
        assert_eq!(server_ports(&[]), vec![80]);
        assert_eq!(
            server_ports(&[port(8080, "TCP"), port(53, "UDP"), port(80, "TCP")]),
            vec![53, 80, 8080]
        );
        assert_eq!(server_ports(&[port(9, "SCTP")]), vec![80]);
    }
}
