//! `ferry lab up --bgp`: a `router` namespace on the LAN running BIRD 2 that peers with every
//! node over BGP (router AS 64512, nodes AS 64513), merges the nodes' paths (`merge paths on`)
//! and exports them to its kernel FIB, so a load-balancer address of a bgp pool gets one ECMP
//! route over the nodes. The client's default route points at the router. BIRD also runs BFD
//! (100 ms x 3) with every node and `bfd on` on its sessions, so a node whose agent has a
//! BFDProfile (the seed's `metallb-bgp.yaml` has one) is dropped in about 300 ms when it dies;
//! a node without one is dropped by the hold timer (9 s), as BIRD does not wait for BFD to come
//! up before a session is established.
//!
//! ```text
//!  client 192.168.2.100 ── br0 ── router 192.168.2.1 (BIRD, AS 64512)
//!                           ├──── k3s-master-rpi001 192.168.2.11 (ferry agent, AS 64513)
//!                           └──── k3s-worker-rpi002 192.168.2.12 (ferry agent, AS 64513)
//! ```
//!
//! BIRD runs with a private config, control socket and pid file under the lab's directory; its
//! PID is kept in `pids/router.pid`, so `ferry lab down` stops it like any lab process (also
//! after a crash) and removes its files with the lab's directory.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::state::{write_atomic, Ctx, LabState};
use crate::sys;

/// The router's address on the LAN (free in the lab's plan: the API server is .5, nodes
/// .11-.60, the client .100, layer-2 pools .200-.225).
pub const ROUTER_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 2, 1);
pub const ROUTER_ASN: u32 = 64512;
pub const NODE_ASN: u32 = 64513;
/// The lab's interface on the LAN bridge for the router.
const LAN_IF: &str = "r0";

/// The router of a lab brought up with `--bgp` (in lab.json).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RouterInfo {
    pub ns: String,
    pub ip: Ipv4Addr,
    pub asn: u32,
    pub node_asn: u32,
    /// BIRD's control socket: `birdc -s SOCKET show route`.
    pub socket: PathBuf,
}

pub fn router_ns(ctx: &Ctx) -> String {
    format!("{}-router", ctx.prefix)
}

fn dir(ctx: &Ctx) -> PathBuf {
    ctx.dir().join("router")
}

pub fn pid_file(ctx: &Ctx) -> PathBuf {
    ctx.pids().join("router.pid")
}

pub fn plan(ctx: &Ctx) -> RouterInfo {
    RouterInfo {
        ns: router_ns(ctx),
        ip: ROUTER_IP,
        asn: ROUTER_ASN,
        node_asn: NODE_ASN,
        socket: dir(ctx).join("bird.ctl"),
    }
}

/// BIRD 2's configuration: one BGP session per node (IPv4 and IPv6 routes over it), paths
/// merged into multipath kernel routes. Short timers so that a lab converges in about a second.
pub fn bird_conf(
    router_ip: Ipv4Addr,
    asn: u32,
    node_asn: u32,
    nodes: &[(String, Ipv4Addr)],
) -> String {
    let mut conf = format!(
        "# written by ferry lab up --bgp
router id {router_ip};
protocol device {{ scan time 10; }}
protocol kernel k4 {{ ipv4 {{ export all; import none; }}; merge paths on; }}
protocol kernel k6 {{ ipv6 {{ export all; import none; }}; merge paths on; }}
protocol bfd {{
  interface \"eth0\" {{ min rx interval 100 ms; min tx interval 100 ms; multiplier 3; }};
}}
"
    );
    for (name, ip) in nodes {
        // BIRD's protocol names are identifiers: k3s-master-rpi001 -> k3s_master_rpi001.
        let proto: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        conf += &format!(
            "protocol bgp {proto} {{
  local {router_ip} as {asn}; neighbor {ip} as {node_asn};
  hold time 9; connect delay time 1; connect retry time 1; error wait time 1, 2;
  bfd on;
  ipv4 {{ import all; export none; }};
  ipv6 {{ import all; export none; }};
}}
"
        );
    }
    conf
}

/// Whether BIRD 2 (`bird` and `birdc`) is installed.
pub fn bird_available() -> bool {
    Command::new("sh")
        .args(["-c", "command -v bird && command -v birdc"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The next hops of the kernel route to `ip` in the router's namespace (`ip route show IP`),
/// in the order the kernel lists them; empty when there is no route.
pub fn nexthops(r: &RouterInfo, ip: &str) -> Result<Vec<String>> {
    let out = sys::ip(&["-n", &r.ns, "route", "show", ip])?;
    Ok(parse_nexthops(&out))
}

/// The `via ADDR` gateways of `ip route show` output (one route, plain or multipath).
pub fn parse_nexthops(text: &str) -> Vec<String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0] == "via")
        .map(|w| w[1].to_string())
        .collect()
}

/// Links the router to the LAN, sets its sysctls, points the client at it and starts BIRD.
pub fn build(ctx: &Ctx, st: &LabState, r: &RouterInfo) -> Result<()> {
    if !bird_available() {
        bail!("`ferry lab up --bgp` needs BIRD 2 (`bird` and `birdc`): apt-get install bird2");
    }
    sys::ip_batch(
        Some(&st.lan_ns),
        &[
            format!("link add {LAN_IF} type veth peer name eth0 netns {}", r.ns),
            format!("link set {LAN_IF} master br0 up"),
        ],
    )?;
    sys::set_sysctls(
        &r.ns,
        &[
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            // Client and nodes share the LAN: no redirects, or the client would bypass the
            // router (and its ECMP route) after the first packet.
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.default.send_redirects", "0"),
            // Per-flow ECMP (addresses and ports).
            ("net.ipv4.fib_multipath_hash_policy", "1"),
        ],
    )?;
    sys::ip_batch(
        Some(&r.ns),
        &[
            "link set lo up".to_string(),
            "link set eth0 up".to_string(),
            format!("addr add {}/24 dev eth0", r.ip),
            "addr add fd00:2::1/64 dev eth0 nodad".to_string(),
        ],
    )?;
    sys::set_sysctls(
        &st.client.ns,
        &[
            ("net.ipv4.conf.all.accept_redirects", "0"),
            ("net.ipv4.conf.default.accept_redirects", "0"),
        ],
    )?;
    sys::ip_batch(
        Some(&st.client.ns),
        &[
            format!("route add default via {}", r.ip),
            "route add default via fd00:2::1".to_string(),
        ],
    )?;
    start_bird(ctx, st, r)
}

fn start_bird(ctx: &Ctx, st: &LabState, r: &RouterInfo) -> Result<()> {
    let d = dir(ctx);
    fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    let nodes: Vec<(String, Ipv4Addr)> = st.nodes.iter().map(|n| (n.name.clone(), n.ip)).collect();
    let conf = d.join("bird.conf");
    write_atomic(&conf, bird_conf(r.ip, r.asn, r.node_asn, &nodes).as_bytes())?;
    let args: Vec<String> = vec![
        "-f".into(),
        "-c".into(),
        conf.display().to_string(),
        "-s".into(),
        r.socket.display().to_string(),
        "-P".into(),
        d.join("bird.pid").display().to_string(),
    ];
    let log = ctx.logs().join("router.log");
    let pid = crate::topology::spawn_in_ns(&r.ns, Path::new("bird"), &args, &log)?;
    write_atomic(&pid_file(ctx), format!("{pid}\n").as_bytes())?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if birdc(r, &["show", "status"]).is_ok() {
            return Ok(());
        }
        if !sys::pid_alive(pid) || Instant::now() > deadline {
            bail!(
                "BIRD in {} did not start; last lines of {}:\n{}",
                r.ns,
                log.display(),
                crate::topology::tail(&log, 5)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `birdc -s SOCKET ARGS...`: BIRD's answer.
pub fn birdc(r: &RouterInfo, args: &[&str]) -> Result<String> {
    let out = Command::new("birdc")
        .arg("-s")
        .arg(&r.socket)
        .args(args)
        .output()
        .context("running birdc")?;
    if !out.status.success() {
        bail!(
            "birdc {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ferry lab router`: the router's kernel routes and BIRD's protocols and routes.
pub fn show(st: &LabState) -> Result<String> {
    let Some(r) = &st.router else {
        bail!("this lab has no router (bring it up with `ferry lab up --bgp`)");
    };
    let kernel = sys::ip(&["-n", &r.ns, "route", "show"])?;
    let protocols = birdc(r, &["show", "protocols"])?;
    let routes = birdc(r, &["show", "route"])?;
    Ok(format!(
        "--- ip route (router {})\n{kernel}--- birdc -s {} show protocols\n{protocols}--- show route\n{routes}",
        r.ns,
        r.socket.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_peers_with_every_node() {
        let nodes = vec![
            ("a".to_string(), Ipv4Addr::new(192, 168, 2, 11)),
            ("b".to_string(), Ipv4Addr::new(192, 168, 2, 12)),
        ];
        let c = bird_conf(ROUTER_IP, ROUTER_ASN, NODE_ASN, &nodes);
        assert!(c.contains("router id 192.168.2.1;"));
        assert!(c.contains("merge paths on"));
        assert!(c.contains("protocol bfd {"), "{c}");
        assert_eq!(c.matches("bfd on;").count(), 2, "{c}");
        assert_eq!(c.matches("protocol bgp ").count(), 2);
        let nodes = vec![(
            "k3s-master-rpi001".to_string(),
            Ipv4Addr::new(192, 168, 2, 11),
        )];
        let c2 = bird_conf(ROUTER_IP, ROUTER_ASN, NODE_ASN, &nodes);
        assert!(c2.contains("protocol bgp k3s_master_rpi001 {"), "{c2}");
        assert!(c.contains("local 192.168.2.1 as 64512; neighbor 192.168.2.11 as 64513;"));
        assert!(c.contains("local 192.168.2.1 as 64512; neighbor 192.168.2.12 as 64513;"));
    }

    #[test]
    fn nexthops_of_a_multipath_route() {
        let t = "192.168.3.1 proto bird metric 32 \n\tnexthop via 192.168.2.11 dev eth0 weight 1 \n\tnexthop via 192.168.2.12 dev eth0 weight 1 \n";
        assert_eq!(parse_nexthops(t), ["192.168.2.11", "192.168.2.12"]);
        let one = "192.168.3.1 via 192.168.2.13 dev eth0 proto bird metric 32 \n";
        assert_eq!(parse_nexthops(one), ["192.168.2.13"]);
        assert!(parse_nexthops("").is_empty());
    }

    #[test]
    fn router_address_is_free() {
        use crate::topology::{node_ip, CLIENT_IP, MAX_NODES};
        assert!((0..MAX_NODES).all(|i| node_ip(i) != ROUTER_IP));
        assert_ne!(CLIENT_IP, ROUTER_IP);
    }
}
