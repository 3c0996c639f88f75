//! A BGP speaker from command-line flags, for tests and demos: peers with the given routers
//! and announces the given routes; prints each session state change on stdout; on SIGTERM or
//! SIGINT sends Cease (administrative shutdown) to every peer and exits.
//!
//!   ferry-bgp-peer --local-asn 64601 --router-id 10.96.0.2 --peer 10.96.0.1,64600 \
//!       --route 10.96.200.1/32 --community 64601:100 --large-community 64601:1:2
//!
//! `--count N` announces N consecutive host routes from each `--route` (for benchmarks).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use clap::Parser;
use ferry_bgp::{Config, LargeCommunity, PeerConfig, Route, Speaker, State};
use ipnet::IpNet;

#[derive(Parser, Debug)]
#[command(about = "ferry's BGP speaker, from flags (tests and demos)")]
struct Args {
    #[arg(long)]
    local_asn: u32,
    #[arg(long)]
    router_id: Ipv4Addr,
    /// A peer: ADDRESS,ASN (repeatable).
    #[arg(long = "peer", required = true)]
    peers: Vec<String>,
    #[arg(long, default_value_t = 179)]
    port: u16,
    #[arg(long, default_value_t = 90)]
    hold_time: u16,
    #[arg(long)]
    keepalive: Option<u16>,
    /// Seconds between connection attempts.
    #[arg(long, default_value_t = 5)]
    connect_retry: u64,
    #[arg(long)]
    source: Option<IpAddr>,
    #[arg(long)]
    ebgp_multihop: bool,
    #[arg(long)]
    password: Option<String>,
    /// Graceful restart time in seconds (0: no graceful restart capability).
    #[arg(long, default_value_t = 120)]
    graceful_restart: u16,
    /// Set the graceful restart R bit (this speaker restarted).
    #[arg(long)]
    restarted: bool,
    #[arg(long)]
    next_hop_v6: Option<Ipv6Addr>,
    /// Also take connections from peers on this address (e.g. 0.0.0.0:179).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Only take connections (with --listen), never open one.
    #[arg(long)]
    passive: bool,
    /// A prefix to announce (repeatable).
    #[arg(long = "route")]
    routes: Vec<IpNet>,
    /// Announce this many consecutive host routes from each --route.
    #[arg(long, default_value_t = 1)]
    count: u32,
    #[arg(long)]
    local_pref: Option<u32>,
    #[arg(long)]
    med: Option<u32>,
    /// A community ASN:VALUE (repeatable).
    #[arg(long = "community")]
    communities: Vec<String>,
    /// A large community GLOBAL:LOCAL1:LOCAL2 (repeatable).
    #[arg(long = "large-community")]
    large_communities: Vec<String>,
}

fn parse_community(s: &str) -> Result<u32, String> {
    let (a, b) = s
        .split_once(':')
        .ok_or_else(|| format!("community {s:?}: not ASN:VALUE"))?;
    let a: u16 = a.parse().map_err(|e| format!("community {s:?}: {e}"))?;
    let b: u16 = b.parse().map_err(|e| format!("community {s:?}: {e}"))?;
    Ok((u32::from(a) << 16) | u32::from(b))
}

fn parse_large(s: &str) -> Result<LargeCommunity, String> {
    let p: Vec<&str> = s.split(':').collect();
    let [g, l1, l2] = p[..] else {
        return Err(format!("large community {s:?}: not GLOBAL:LOCAL1:LOCAL2"));
    };
    let n = |x: &str| {
        x.parse::<u32>()
            .map_err(|e| format!("large community {s:?}: {e}"))
    };
    Ok(LargeCommunity {
        global: n(g)?,
        local1: n(l1)?,
        local2: n(l2)?,
    })
}

fn routes(a: &Args) -> Result<Vec<Route>, String> {
    let communities = a
        .communities
        .iter()
        .map(|c| parse_community(c))
        .collect::<Result<Vec<_>, _>>()?;
    let large = a
        .large_communities
        .iter()
        .map(|c| parse_large(c))
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Vec::new();
    for base in &a.routes {
        for i in 0..a.count {
            let prefix = if a.count == 1 {
                *base
            } else {
                match base.addr() {
                    IpAddr::V4(v) => {
                        IpNet::from(IpAddr::V4(Ipv4Addr::from(u32::from(v).wrapping_add(i))))
                    }
                    IpAddr::V6(v) => IpNet::from(IpAddr::V6(Ipv6Addr::from(
                        u128::from(v).wrapping_add(u128::from(i)),
                    ))),
                }
            };
            let mut r = Route::new(prefix);
            r.local_pref = a.local_pref;
            r.med = a.med;
            r.communities = communities.clone();
            r.large_communities = large.clone();
            out.push(r);
        }
    }
    Ok(out)
}

fn peers(a: &Args) -> Result<Vec<PeerConfig>, String> {
    a.peers
        .iter()
        .map(|p| {
            let (addr, asn) = p
                .split_once(',')
                .ok_or_else(|| format!("--peer {p:?}: not ADDRESS,ASN"))?;
            let addr: IpAddr = addr
                .parse()
                .map_err(|e| format!("--peer {p:?}: address: {e}"))?;
            let asn: u32 = asn.parse().map_err(|e| format!("--peer {p:?}: ASN: {e}"))?;
            let mut s = Config::new(a.local_asn, asn, a.router_id);
            s.hold_time = a.hold_time;
            s.keepalive = a.keepalive;
            s.connect_retry = Duration::from_secs(a.connect_retry);
            s.graceful_restart = (a.graceful_restart > 0).then_some(a.graceful_restart);
            s.restarted = a.restarted;
            s.next_hop_v6 = a.next_hop_v6;
            s.passive = a.passive;
            let mut pc = PeerConfig::new(addr, s);
            pc.port = a.port;
            pc.source = a.source;
            pc.ebgp_multihop = a.ebgp_multihop;
            pc.password = a.password.clone();
            Ok(pc)
        })
        .collect()
}

fn main() {
    let a = Args::parse();
    if a.passive && a.listen.is_none() {
        eprintln!("ferry-bgp-peer: --passive needs --listen");
        std::process::exit(2);
    }
    let (routes, peers) = match (routes(&a), peers(&a)) {
        (Ok(r), Ok(p)) => (r, p),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("ferry-bgp-peer: {e}");
            std::process::exit(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry-bgp-peer: runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(a.listen, peers, routes)) {
        eprintln!("ferry-bgp-peer: {e}");
        std::process::exit(1);
    }
}

async fn run(
    listen: Option<SocketAddr>,
    peers: Vec<PeerConfig>,
    routes: Vec<Route>,
) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (mut speaker, mut events) = Speaker::new(listen)?;
    let addrs: Vec<IpAddr> = peers.iter().map(|p| p.address).collect();
    speaker.set_peers(peers).await;
    let start = Instant::now();
    for a in &addrs {
        speaker.set_routes(*a, routes.clone());
    }
    println!("routes {}", routes.len());
    loop {
        tokio::select! {
            Some(e) = events.recv() => {
                let t = start.elapsed().as_secs_f64();
                if let Some(d) = e.down {
                    println!("{t:.3} peer {}: down: {d}", e.peer);
                } else if let Some(err) = e.error {
                    println!("{t:.3} peer {}: {err}", e.peer);
                } else {
                    println!("{t:.3} peer {}: {}", e.peer, e.state);
                    if e.state == State::Established {
                        println!("{t:.3} peer {}: announced {} routes", e.peer, routes.len());
                    }
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    println!("stopping: Cease to {} peer(s)", addrs.len());
    speaker.shutdown().await;
    Ok(())
}
