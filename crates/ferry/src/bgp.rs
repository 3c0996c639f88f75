//! BGP mode in the agent (issue 10): what this node announces to which peer, computed per sync
//! from the snapshot ([`wanted`], pure: MetalLB's configuration -> eligible addresses ->
//! announcements -> the speaker's peers and routes), and the shell's side ([`BgpSide`]): one
//! long-lived [`ferry_bgp::Speaker`] that gets the peers when they change and every peer's
//! routes after every sync (an empty list included: that withdraws), whose session events go
//! to the log, and which sends Cease to every peer on SIGTERM ([`BgpSide::shutdown`]). On
//! SIGKILL nothing is sent: graceful restart keeps the routes at the router until the next
//! agent has announced them again. Peers with a `bfdProfile` also get a BFD session
//! ([`ferry_bfd::edge::Bfd`], started with the first such peer); when one goes Down the BGP
//! session to that peer is torn down at once ([`ferry_bgp::Speaker::peer_down`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ferry_bfd::edge::{Bfd, BfdEvent, PeerSpec};

use ferry_bgp::{Config, LargeCommunity, PeerConfig, PeerEvent, Speaker, State};
use ferry_model::bgp as model;
use ferry_model::Service;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::agent_core::{Diagnostic, Severity};
use crate::metrics::Metrics;
use crate::source::Snapshot;

/// What this node announces by BGP after a sync.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wanted {
    /// The sessions this node has (the BGPPeers selecting it), by peer address.
    pub peers: Vec<PeerConfig>,
    /// For each peer of `peers`, the full set of routes (possibly none).
    pub routes: Vec<(IpAddr, Vec<ferry_bgp::Route>)>,
    /// The BFD sessions: one per peer with a `bfdProfile`.
    pub bfd: Vec<PeerSpec>,
}

/// The announcements of node `node` (`labels`, addresses `node_ips`): `services` carry their
/// load-balancer addresses as allocated. Problems go to `diagnostics`, naming object and
/// field. Pure.
pub fn wanted(
    snap: &Snapshot,
    node: &str,
    labels: &BTreeMap<String, String>,
    node_ips: &[IpAddr],
    services: &[Service],
    diagnostics: &mut Vec<Diagnostic>,
) -> Wanted {
    // The pools as MetalLB has them (before node addresses are split out: an advertisement's
    // aggregation is checked against the pool's own prefixes); their errors are reported with
    // the pools'.
    let (pools, _) =
        ferry_model::pools::load(&snap.config_maps, &snap.ip_pools, &snap.l2_advertisements);
    let (cfg, errors) = model::load(&pools, &snap.bgp_inputs());
    for e in errors {
        diagnostics.push(Diagnostic {
            severity: match e.severity {
                ferry_model::pools::Severity::Error => Severity::Error,
                ferry_model::pools::Severity::Warning => Severity::Warning,
            },
            object: Some(e.object.clone()),
            reason: "InvalidBGPConfig",
            message: e.to_string(),
        });
    }
    if cfg.is_empty() {
        return Wanted::default();
    }
    let with_ips: Vec<(&Service, &[IpAddr])> = services
        .iter()
        .filter(|s| !s.extra.load_balancer_ingress.is_empty())
        .map(|s| (s, s.extra.load_balancer_ingress.as_slice()))
        .collect();
    let addresses = model::eligible_addresses(node, &with_ips, &snap.slices, &pools);
    let announcements = cfg.announcements(labels, &addresses);
    let mut out = Wanted::default();
    for pr in announcements {
        let Some(peer) = cfg.peer(&pr.peer) else {
            continue;
        };
        let problem = |message: String| Diagnostic {
            severity: Severity::Error,
            object: Some(peer.source.clone()),
            reason: "BGPPeerNotStarted",
            message: format!("{}: {message}", peer.source),
        };
        if out.peers.iter().any(|p| p.address == peer.peer_address) {
            diagnostics.push(problem(format!(
                "peerAddress {}: another peer of node {node} has this address already",
                peer.peer_address
            )));
            continue;
        }
        let Some(pc) = peer_config(peer, node_ips) else {
            diagnostics.push(problem(format!(
                "routerID: not set, and node {node} has no IPv4 address to take it from"
            )));
            continue;
        };
        if pc.session.keepalive.map(u64::from) != Some(peer.keepalive_time.as_secs()) {
            diagnostics.push(Diagnostic {
                severity: Severity::Warning,
                object: Some(peer.source.clone()),
                reason: "KeepaliveAdjusted",
                message: format!(
                    "{}: keepaliveTime {} s: ferry's speaker sends KEEPALIVEs at least every \
                     third of the hold time ({} s): every {} s instead",
                    peer.source,
                    peer.keepalive_time.as_secs(),
                    peer.hold_time.as_secs(),
                    pc.session.keepalive.unwrap_or_default()
                ),
            });
        }
        if let Err(e) = pc.validate() {
            diagnostics.push(problem(e));
            continue;
        }
        if let Some(name) = &peer.bfd_profile {
            match (cfg.bfd_profile(name), pc.address) {
                (Some(prof), IpAddr::V4(_)) => out.bfd.push(PeerSpec {
                    peer: pc.address,
                    local: pc.source,
                    config: bfd_config(prof),
                }),
                (Some(_), IpAddr::V6(_)) => diagnostics.push(Diagnostic {
                    severity: Severity::Warning,
                    object: Some(peer.source.clone()),
                    reason: "BFDNotSupported",
                    message: format!(
                        "{}: bfdProfile {name}: ferry's BFD speaks IPv4 only so far; the \
                         session to {} runs without it (failures are found by the hold timer)",
                        peer.source, pc.address
                    ),
                }),
                // The model drops peers naming unknown profiles.
                (None, _) => {}
            }
        }
        out.routes
            .push((pc.address, pr.routes.iter().map(route).collect()));
        out.peers.push(pc);
    }
    out
}

/// The speaker's configuration of a validated peer; None without a router ID.
fn peer_config(p: &model::BgpPeer, node_ips: &[IpAddr]) -> Option<PeerConfig> {
    let v4 = node_ips.iter().find_map(|ip| match ip {
        IpAddr::V4(a) => Some(*a),
        IpAddr::V6(_) => None,
    });
    let v6 = node_ips.iter().find_map(|ip| match ip {
        IpAddr::V6(a) => Some(*a),
        IpAddr::V4(_) => None,
    });
    let router_id: Ipv4Addr = p.router_id.or(v4)?;
    let mut session = Config::new(p.my_asn, p.peer_asn, router_id);
    session.hold_time = u16::try_from(p.hold_time.as_secs()).unwrap_or(u16::MAX);
    // MetalLB takes any keepalive up to the hold time; the speaker (RFC 4271's advice) at most
    // a third of it: a longer one is shortened (and reported by the caller).
    let keepalive = u16::try_from(p.keepalive_time.as_secs()).unwrap_or(u16::MAX);
    session.keepalive = Some(match session.hold_time {
        0 => keepalive,
        hold => keepalive.min(hold / 3),
    });
    // The next hop of the other family (the session's own local address serves its family).
    match p.peer_address {
        IpAddr::V4(_) => session.next_hop_v6 = v6,
        IpAddr::V6(_) => session.next_hop_v4 = v4,
    }
    let mut pc = PeerConfig::new(p.peer_address, session);
    pc.port = p.peer_port;
    pc.source = p.source_address;
    pc.ebgp_multihop = p.ebgp_multihop;
    pc.password = p.password.as_ref().map(|pw| pw.0.clone());
    Some(pc)
}

/// A BFDProfile's timers. `minimumTtl` is for multihop sessions (FRR's meaning): single-hop
/// sessions always send TTL 255 and require it (RFC 5881 GTSM); `echoMode` is not supported
/// (the model warns).
fn bfd_config(p: &model::BfdProfile) -> ferry_bfd::Config {
    ferry_bfd::Config {
        desired_min_tx: Duration::from_millis(p.transmit_interval_ms.into()),
        required_min_rx: Duration::from_millis(p.receive_interval_ms.into()),
        detect_mult: p.detect_multiplier,
        passive: p.passive_mode,
    }
}

fn route(r: &model::Route) -> ferry_bgp::Route {
    let mut out = ferry_bgp::Route::new(r.prefix);
    out.local_pref = r.local_pref;
    out.communities = r.communities.clone();
    out.large_communities = r
        .large_communities
        .iter()
        .map(|[global, local1, local2]| LargeCommunity {
            global: *global,
            local1: *local1,
            local2: *local2,
        })
        .collect();
    out
}

/// An event of the BGP speaker or of BFD.
#[derive(Debug)]
pub enum SideEvent {
    Bgp(PeerEvent),
    Bfd(BfdEvent),
}

/// The shell's side: the speaker and its events.
pub struct BgpSide {
    speaker: Speaker,
    events: UnboundedReceiver<PeerEvent>,
    peers: Vec<PeerConfig>,
    /// The last error logged per peer (connect errors repeat every retry: logged once).
    last_error: BTreeMap<IpAddr, String>,
    metrics: Arc<Metrics>,
    /// BFD: started with the first peer that has a profile (it binds UDP port 3784).
    bfd: Option<Bfd>,
    bfd_events: Option<UnboundedReceiver<BfdEvent>>,
    bfd_peers: Vec<PeerSpec>,
    /// The BFD sessions Up now (one going Down takes its BGP session down).
    bfd_up: std::collections::BTreeSet<IpAddr>,
    /// The prefixes last handed to the speaker, by peer.
    routes: BTreeMap<IpAddr, Vec<ipnet::IpNet>>,
    /// The peers whose session is Established now.
    established: std::collections::BTreeSet<IpAddr>,
}

impl BgpSide {
    /// A speaker with no peers (it connects out only: MetalLB's speaker does not listen).
    pub fn start(metrics: Arc<Metrics>) -> std::io::Result<BgpSide> {
        let (speaker, events) = Speaker::new(None)?;
        Ok(BgpSide {
            speaker,
            events,
            peers: Vec::new(),
            last_error: BTreeMap::new(),
            metrics,
            bfd: None,
            bfd_events: None,
            bfd_peers: Vec::new(),
            bfd_up: Default::default(),
            routes: BTreeMap::new(),
            established: Default::default(),
        })
    }

    fn peer_addr(&self, peer: IpAddr) -> Option<SocketAddr> {
        self.peers
            .iter()
            .find(|p| p.address == peer)
            .map(|p| SocketAddr::new(p.address, p.port))
    }

    /// Hands a sync's announcements to the speaker.
    pub async fn apply(&mut self, w: Wanted) {
        if w.peers != self.peers {
            let shown: Vec<String> = w
                .peers
                .iter()
                .map(|p| format!("{}:{} (AS {})", p.address, p.port, p.session.peer_asn))
                .collect();
            log!(
                "bgp: peers {}",
                if shown.is_empty() {
                    "none".to_string()
                } else {
                    shown.join(", ")
                }
            );
            self.speaker.set_peers(w.peers.clone()).await;
            self.last_error
                .retain(|a, _| w.peers.iter().any(|p| p.address == *a));
            self.peers = w.peers;
        }
        let counts: Vec<(SocketAddr, usize)> = w
            .routes
            .iter()
            .filter_map(|(peer, r)| Some((self.peer_addr(*peer)?, r.len())))
            .collect();
        self.metrics.set_bgp_peers(counts);
        self.apply_bfd(w.bfd);
        self.routes = w
            .routes
            .iter()
            .map(|(peer, r)| (*peer, r.iter().map(|r| r.prefix).collect()))
            .collect();
        for (peer, routes) in w.routes {
            self.speaker.set_routes(peer, routes);
        }
    }

    /// Of `addresses`, those this node announces now: covered by a route it hands to a peer
    /// whose session is Established (for `ferry get svc -o wide`'s ANNOUNCED-BY).
    pub fn announced(
        &self,
        addresses: impl IntoIterator<Item = IpAddr>,
    ) -> std::collections::BTreeSet<IpAddr> {
        announced_by(&self.routes, &self.established, addresses)
    }

    fn apply_bfd(&mut self, peers: Vec<PeerSpec>) {
        if peers == self.bfd_peers {
            return;
        }
        if self.bfd.is_none() && !peers.is_empty() {
            let listen = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), ferry_bfd::edge::PORT);
            match Bfd::start(listen) {
                Ok((b, ev)) => {
                    self.bfd = Some(b);
                    self.bfd_events = Some(ev);
                }
                Err(e) => {
                    log!("bfd: cannot listen on {listen}: {e}; BGP sessions run without BFD");
                    self.bfd_peers = peers;
                    return;
                }
            }
        }
        for gone in self
            .bfd_peers
            .iter()
            .filter(|o| !peers.iter().any(|p| p.peer == o.peer))
        {
            self.metrics.set_bfd_session(gone.peer, None);
            self.bfd_up.remove(&gone.peer);
        }
        for p in &peers {
            if !self.bfd_peers.iter().any(|o| o.peer == p.peer) {
                self.metrics.set_bfd_session(p.peer, Some(false));
            }
        }
        let shown: Vec<String> = peers
            .iter()
            .map(|p| {
                format!(
                    "{} ({} ms tx, {} ms rx, x{}{})",
                    p.peer,
                    p.config.desired_min_tx.as_millis(),
                    p.config.required_min_rx.as_millis(),
                    p.config.detect_mult,
                    if p.config.passive { ", passive" } else { "" }
                )
            })
            .collect();
        log!(
            "bfd: sessions {}",
            if shown.is_empty() {
                "none".to_string()
            } else {
                shown.join(", ")
            }
        );
        if let Some(b) = &self.bfd {
            b.set_peers(peers.clone());
        }
        self.bfd_peers = peers;
    }

    /// The next BGP or BFD event (None: both channels closed).
    pub async fn next_event(&mut self) -> Option<SideEvent> {
        match &mut self.bfd_events {
            Some(bfd) => tokio::select! {
                Some(ev) = self.events.recv() => Some(SideEvent::Bgp(ev)),
                Some(ev) = bfd.recv() => Some(SideEvent::Bfd(ev)),
                else => None,
            },
            None => self.events.recv().await.map(SideEvent::Bgp),
        }
    }

    pub fn handle_event(&mut self, ev: SideEvent) {
        match ev {
            SideEvent::Bgp(ev) => self.log_event(ev),
            SideEvent::Bfd(ev) => self.bfd_event(ev),
        }
    }

    /// A BFD state change: logged, exported, and a session going Down from Up takes the BGP
    /// session to that peer down at once (the router, running BFD too, drops our routes).
    pub fn bfd_event(&mut self, ev: BfdEvent) {
        if let Some(e) = ev.error {
            log!("bfd: peer {}: {e}", ev.peer);
            return;
        }
        if !self.bfd_peers.iter().any(|p| p.peer == ev.peer) {
            return;
        }
        let up = ev.state == ferry_bfd::State::Up;
        self.metrics.set_bfd_session(ev.peer, Some(up));
        if up {
            self.bfd_up.insert(ev.peer);
            log!("bfd: peer {}: session Up", ev.peer);
        } else if self.bfd_up.remove(&ev.peer) {
            log!(
                "bfd: peer {}: session {} ({}): BGP session torn down",
                ev.peer,
                ev.state,
                ev.diag
            );
            self.speaker.peer_down(ev.peer);
        }
    }

    /// A session event into the log.
    pub fn log_event(&mut self, ev: PeerEvent) {
        if ev.down.is_none() && ev.state == State::Established {
            self.established.insert(ev.peer);
        } else if ev.error.is_none() || ev.down.is_some() {
            self.established.remove(&ev.peer);
        }
        if let Some(a) = self.peer_addr(ev.peer) {
            self.metrics
                .set_bgp_session(a, ev.down.is_none() && ev.state == State::Established);
        }
        if let Some(r) = &ev.down {
            log!("bgp: peer {}: session down: {r}", ev.peer);
        }
        if let Some(e) = ev.error {
            if self.last_error.get(&ev.peer) != Some(&e) {
                log!("bgp: peer {}: {e}", ev.peer);
                self.last_error.insert(ev.peer, e);
            }
            return;
        }
        // Only Established is news: the other states come and go with every retry, and a
        // session that ends reports why above.
        if ev.down.is_none() && ev.state == State::Established {
            self.last_error.remove(&ev.peer);
            log!("bgp: peer {}: session Established", ev.peer);
        }
    }

    /// Cease to every peer (their routes withdrawn at once).
    pub async fn shutdown(self) {
        if !self.peers.is_empty() {
            log!(
                "stopping; bgp: Cease to {} peer(s), routes withdrawn",
                self.peers.len()
            );
        }
        self.speaker.shutdown().await;
    }
}

/// Of `addresses`, those covered by a prefix in `routes` of a peer in `established`.
fn announced_by(
    routes: &BTreeMap<IpAddr, Vec<ipnet::IpNet>>,
    established: &std::collections::BTreeSet<IpAddr>,
    addresses: impl IntoIterator<Item = IpAddr>,
) -> std::collections::BTreeSet<IpAddr> {
    addresses
        .into_iter()
        .filter(|a| {
            routes
                .iter()
                .filter(|(peer, _)| established.contains(*peer))
                .any(|(_, prefixes)| prefixes.iter().any(|p| p.contains(a)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announced_only_to_established_peers() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let net = |s: &str| s.parse::<ipnet::IpNet>().unwrap();
        let routes = BTreeMap::from([
            (ip("10.0.0.1"), vec![net("10.77.0.5/32")]),
            (ip("10.0.0.2"), vec![net("10.78.0.0/24")]),
        ]);
        let addrs = [ip("10.77.0.5"), ip("10.78.0.9"), ip("10.79.0.1")];
        let none = announced_by(&routes, &Default::default(), addrs);
        assert!(none.is_empty());
        let one = announced_by(&routes, &[ip("10.0.0.2")].into(), addrs);
        assert_eq!(one, [ip("10.78.0.9")].into());
        let both = announced_by(&routes, &[ip("10.0.0.1"), ip("10.0.0.2")].into(), addrs);
        assert_eq!(both, [ip("10.77.0.5"), ip("10.78.0.9")].into());
    }

    const MANIFESTS: &str = r#"apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {name: bgp, namespace: metallb-system}
spec: {addresses: [10.77.0.0/24]}
---
apiVersion: metallb.io/v1beta1
kind: BGPAdvertisement
metadata: {name: adv, namespace: metallb-system}
spec: {ipAddressPools: [bgp], localPref: 120, communities: ["64600:7", "large:1:2:3"]}
---
apiVersion: metallb.io/v1beta2
kind: BGPPeer
metadata: {name: router, namespace: metallb-system}
spec: {myASN: 64601, peerASN: 64600, peerAddress: 10.76.0.1, holdTime: 9s}
---
apiVersion: metallb.io/v1beta2
kind: BGPPeer
metadata: {name: broken, namespace: metallb-system}
spec: {myASN: 64601, peerASN: 64600, peerAddress: 10.76.0.2, holdTime: 2s}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {type: LoadBalancer, selector: {app: web}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: local, namespace: default}
spec: {type: LoadBalancer, externalTrafficPolicy: Local, selector: {app: local}, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local-1, namespace: default, labels: {kubernetes.io/service-name: local}}
addressType: IPv4
endpoints:
- {addresses: [10.42.0.5], nodeName: n1, conditions: {ready: true}}
ports: [{port: 80, protocol: TCP}]
"#;

    fn snapshot(text: &str) -> Snapshot {
        let dir = std::env::temp_dir().join(format!(
            "ferry-bgp-unit-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("all.yaml"), text).unwrap();
        let snap = crate::source::read_dir(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        snap
    }

    fn with_ips(snap: &Snapshot) -> Vec<Service> {
        let mut services = snap.services.clone();
        for s in &mut services {
            let ip = match s.meta.name.as_str() {
                "local" => "10.77.0.10",
                _ => "10.77.0.11",
            };
            s.extra.load_balancer_ingress = vec![ip.parse().unwrap()];
        }
        services
    }

    fn prefixes(w: &Wanted) -> Vec<(String, Vec<String>)> {
        w.routes
            .iter()
            .map(|(a, r)| {
                let p = r.iter().map(|r| r.prefix.to_string()).collect();
                (a.to_string(), p)
            })
            .collect()
    }

    #[test]
    fn routes_per_peer_follow_the_traffic_policy() {
        let snap = snapshot(MANIFESTS);
        let services = with_ips(&snap);
        let ips: Vec<IpAddr> = vec!["10.76.0.11".parse().unwrap()];
        let mut d = Vec::new();
        let labels = BTreeMap::new();
        let n1 = wanted(&snap, "n1", &labels, &ips, &services, &mut d);
        // 10.77.0.10 is the Local Service's (its endpoint on n1), 10.77.0.11 the Cluster one's.
        assert_eq!(
            prefixes(&n1),
            [(
                "10.76.0.1".to_string(),
                vec!["10.77.0.10/32".to_string(), "10.77.0.11/32".to_string()]
            )]
        );
        let r = &n1.routes[0].1[0];
        assert_eq!(r.local_pref, Some(120));
        assert_eq!(r.communities, [(64600 << 16) | 7]);
        assert_eq!(r.large_communities.len(), 1);
        let p = &n1.peers[0];
        assert_eq!(p.session.router_id, Ipv4Addr::new(10, 76, 0, 11));
        assert_eq!(p.session.hold_time, 9);
        assert_eq!((p.session.local_asn, p.session.peer_asn), (64601, 64600));
        // n2 has no endpoint of the Local service: only the Cluster one's address.
        let n2 = wanted(&snap, "n2", &labels, &ips, &services, &mut Vec::new());
        assert_eq!(
            prefixes(&n2),
            [("10.76.0.1".to_string(), vec!["10.77.0.11/32".to_string()])]
        );
        // The broken peer is reported, naming object and field, and not started.
        let bad: Vec<&Diagnostic> = d
            .iter()
            .filter(|d| d.object.as_deref() == Some("BGPPeer metallb-system/broken"))
            .collect();
        assert!(bad.iter().any(|d| d.message.contains("holdTime")), "{d:#?}");
        // No Service: the peer stays, with no routes (that withdraws).
        let none = wanted(&snap, "n1", &labels, &ips, &[], &mut Vec::new());
        assert_eq!(prefixes(&none), [("10.76.0.1".to_string(), vec![])]);
    }

    #[test]
    fn without_a_router_id_the_peer_is_not_started() {
        let snap = snapshot(MANIFESTS);
        let mut d = Vec::new();
        let v6: Vec<IpAddr> = vec!["fd00::1".parse().unwrap()];
        let w = wanted(&snap, "n1", &BTreeMap::new(), &v6, &[], &mut d);
        assert!(w.peers.is_empty());
        assert!(
            d.iter().any(|d| d.reason == "BGPPeerNotStarted"
                && d.message
                    .contains("BGPPeer metallb-system/router: routerID")),
            "{d:#?}"
        );
    }

    #[test]
    fn a_long_keepalive_is_shortened_with_a_warning() {
        let text = MANIFESTS.replace("holdTime: 9s}", "holdTime: 9s, keepaliveTime: 6s}");
        let snap = snapshot(&text);
        let mut d = Vec::new();
        let ips: Vec<IpAddr> = vec!["10.76.0.11".parse().unwrap()];
        let w = wanted(&snap, "n1", &BTreeMap::new(), &ips, &[], &mut d);
        assert_eq!(w.peers.len(), 1, "{d:#?}");
        assert_eq!(w.peers[0].session.keepalive, Some(3));
        assert!(w.peers[0].validate().is_ok());
        assert!(
            d.iter().any(|d| d.reason == "KeepaliveAdjusted"
                && d.message
                    .contains("BGPPeer metallb-system/router: keepaliveTime 6 s")),
            "{d:#?}"
        );
        // The default (a third) is no news.
        let mut d = Vec::new();
        wanted(
            &snapshot(MANIFESTS),
            "n1",
            &BTreeMap::new(),
            &ips,
            &[],
            &mut d,
        );
        assert!(!d.iter().any(|d| d.reason == "KeepaliveAdjusted"), "{d:#?}");
    }

    #[test]
    fn a_bfd_profile_runs_a_bfd_session_to_the_peer() {
        let text = MANIFESTS.replace("holdTime: 9s}", "holdTime: 9s, bfdProfile: fast}")
            + "---\napiVersion: metallb.io/v1beta1\nkind: BFDProfile\n\
               metadata: {name: fast, namespace: metallb-system}\n\
               spec: {receiveInterval: 100, transmitInterval: 150, detectMultiplier: 4, \
               passiveMode: true}\n";
        let snap = snapshot(&text);
        let mut d = Vec::new();
        let ips: Vec<IpAddr> = vec!["10.76.0.11".parse().unwrap()];
        let w = wanted(&snap, "n1", &BTreeMap::new(), &ips, &[], &mut d);
        assert_eq!(w.peers.len(), 1, "{d:#?}");
        assert_eq!(
            w.bfd,
            [PeerSpec {
                peer: "10.76.0.1".parse().unwrap(),
                local: None,
                config: ferry_bfd::Config {
                    desired_min_tx: Duration::from_millis(150),
                    required_min_rx: Duration::from_millis(100),
                    detect_mult: 4,
                    passive: true,
                },
            }]
        );
        assert!(!d.iter().any(|d| d.reason == "BFDNotSupported"), "{d:#?}");
        // Without the profile: no BFD session.
        let w = wanted(
            &snapshot(MANIFESTS),
            "n1",
            &BTreeMap::new(),
            &ips,
            &[],
            &mut d,
        );
        assert!(w.bfd.is_empty());
    }

    #[test]
    fn no_bgp_configuration_no_peers() {
        let snap = snapshot("apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n");
        let mut d = Vec::new();
        let w = wanted(&snap, "n1", &BTreeMap::new(), &[], &[], &mut d);
        assert_eq!(w, Wanted::default());
        assert!(d.is_empty(), "{d:#?}");
    }
}
