//! The thin TCP edge (tokio): a [`Speaker`] owns one task per configured peer, each driving a
//! [`Session`] with a real connection and the clock, and optionally a listener for peers that
//! connect to us. The agent tells it which peers exist ([`Speaker::set_peers`]) and, per
//! peer, the routes wanted ([`Speaker::set_routes`]); session state changes come out of the
//! event channel.
//!
//! Connection collisions are kept simple: a peer's task holds one connection at a time; a
//! connection the peer opens while ours is being set up replaces our attempt, one that arrives
//! while a session is past Active is refused (closed).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::session::{Action, Config, DownReason, Event, Route, Session, State};
use crate::sockopt;

/// The well-known BGP port.
pub const BGP_PORT: u16 = 179;

/// One peer, as MetalLB's BGPPeer has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub address: IpAddr,
    /// Default 179.
    pub port: u16,
    /// ASNs, router id, timers, graceful restart, next hops.
    pub session: Config,
    /// The local address to connect from.
    pub source: Option<IpAddr>,
    /// eBGP to a peer more than one hop away: TTL 255 instead of 1. (Internal peers: the
    /// system's default TTL either way.)
    pub ebgp_multihop: bool,
    /// TCP MD5 signature key (RFC 2385).
    pub password: Option<String>,
}

impl PeerConfig {
    pub fn new(address: IpAddr, session: Config) -> Self {
        PeerConfig {
            address,
            port: BGP_PORT,
            session,
            source: None,
            ebgp_multihop: false,
            password: None,
        }
    }

    /// What is wrong with this peer's configuration, if anything, naming the field (as
    /// MetalLB's BGPPeer names it).
    pub fn validate(&self) -> Result<(), String> {
        let at = |e: String| format!("peer {}: {e}", self.address);
        self.session.validate().map_err(at)?;
        if self.port == 0 {
            return Err(at("peerPort 0".into()));
        }
        if let Some(pw) = &self.password {
            if pw.is_empty() || pw.len() > 80 {
                return Err(at(format!(
                    "password: {} bytes, TCP MD5 keys are 1 to 80 bytes",
                    pw.len()
                )));
            }
        }
        if let Some(src) = self.source {
            if src.is_ipv4() != self.address.is_ipv4() {
                return Err(at(format!(
                    "sourceAddress {src}: not of the peer address's family"
                )));
            }
        }
        Ok(())
    }

    fn ttl(&self) -> Option<u8> {
        match (self.session.is_ibgp(), self.ebgp_multihop) {
            (true, _) => None,
            (false, false) => Some(1),
            (false, true) => Some(255),
        }
    }
}

/// A session's state changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerEvent {
    pub peer: IpAddr,
    pub state: State,
    /// Why an established session ended (an event of its own, `state` Idle; the state change
    /// to Idle follows as usual).
    pub down: Option<DownReason>,
    /// Problems of the edge (connect errors, socket options), for the log.
    pub error: Option<String>,
}

enum Cmd {
    Routes(Vec<Route>),
    Down,
    Stop(oneshot::Sender<()>),
}

struct Peer {
    config: PeerConfig,
    cmds: mpsc::UnboundedSender<Cmd>,
    task: JoinHandle<()>,
}

type Accepted = Arc<Mutex<HashMap<IpAddr, mpsc::UnboundedSender<TcpStream>>>>;

/// The speaker: peers' tasks and the listener. Must be created inside a tokio runtime.
pub struct Speaker {
    peers: HashMap<IpAddr, Peer>,
    events: mpsc::UnboundedSender<PeerEvent>,
    accepted: Accepted,
    listener: Option<(std::os::fd::RawFd, JoinHandle<()>)>,
    listen_v6: bool,
}

impl Speaker {
    /// A speaker with no peers yet. `listen`: also take connections peers open to us (e.g.
    /// `[::]:179`); connections from addresses that are not configured peers are closed.
    pub fn new(
        listen: Option<SocketAddr>,
    ) -> io::Result<(Speaker, mpsc::UnboundedReceiver<PeerEvent>)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let accepted: Accepted = Arc::default();
        let listener = match listen {
            Some(addr) => {
                let sock = if addr.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                sock.set_reuseaddr(true)?;
                sock.bind(addr)?;
                let l = sock.listen(64)?;
                let fd = l.as_raw_fd();
                let task = tokio::spawn(accept(l, accepted.clone()));
                Some((fd, task))
            }
            None => None,
        };
        Ok((
            Speaker {
                peers: HashMap::new(),
                events: tx,
                accepted,
                listener,
                listen_v6: listen.is_some_and(|a| a.is_ipv6()),
            },
            rx,
        ))
    }

    /// The peers from now on: new ones start, removed ones stop (Cease), changed ones restart.
    pub async fn set_peers(&mut self, peers: Vec<PeerConfig>) {
        let wanted: HashMap<IpAddr, PeerConfig> =
            peers.into_iter().map(|p| (p.address, p)).collect();
        let gone: Vec<IpAddr> = self
            .peers
            .iter()
            .filter(|(a, p)| wanted.get(a) != Some(&p.config))
            .map(|(a, _)| *a)
            .collect();
        for a in gone {
            if let Some(p) = self.peers.remove(&a) {
                stop(p).await;
            }
            if let Ok(mut m) = self.accepted.lock() {
                m.remove(&a);
            }
            if let Some((fd, _)) = &self.listener {
                let _ = sockopt::set_md5(*fd, self.listen_key(a), b"");
            }
        }
        for (a, config) in wanted {
            if self.peers.contains_key(&a) {
                continue;
            }
            if let Err(e) = config.validate() {
                let _ = self.events.send(PeerEvent {
                    peer: a,
                    state: State::Idle,
                    down: None,
                    error: Some(format!("not started: {e}")),
                });
                continue;
            }
            if let (Some((fd, _)), Some(pw)) = (&self.listener, &config.password) {
                if let Err(e) = sockopt::set_md5(*fd, self.listen_key(a), pw.as_bytes()) {
                    let _ = self.events.send(PeerEvent {
                        peer: a,
                        state: State::Idle,
                        down: None,
                        error: Some(format!("TCP MD5 on the listener: {e}")),
                    });
                }
            }
            let (ctx, crx) = mpsc::unbounded_channel();
            let (atx, arx) = mpsc::unbounded_channel();
            if let Ok(mut m) = self.accepted.lock() {
                m.insert(a, atx);
            }
            let task = tokio::spawn(run(config.clone(), crx, arx, self.events.clone()));
            self.peers.insert(
                a,
                Peer {
                    config,
                    cmds: ctx,
                    task,
                },
            );
        }
    }

    /// The address a listener's MD5 key is set for: an IPv4 peer reaches a dual-stack IPv6
    /// listener as an IPv4-mapped address.
    fn listen_key(&self, peer: IpAddr) -> IpAddr {
        match peer {
            IpAddr::V4(v4) if self.listen_v6 => IpAddr::V6(v4.to_ipv6_mapped()),
            other => other,
        }
    }

    /// The routes to announce to `peer` (replacing what was asked before). Unknown peers are
    /// ignored. A peer's session starts with its first routes (an empty list included), so
    /// that its first End-of-RIB follows the full table (see the crate docs on restarts).
    pub fn set_routes(&self, peer: IpAddr, routes: Vec<Route>) {
        if let Some(p) = self.peers.get(&peer) {
            let _ = p.cmds.send(Cmd::Routes(routes));
        }
    }

    /// The path to `peer` is down (BFD said so): the connection is dropped at once, without
    /// waiting for the hold timer, and the session starts over as after a lost connection.
    pub fn peer_down(&self, peer: IpAddr) {
        if let Some(p) = self.peers.get(&peer) {
            let _ = p.cmds.send(Cmd::Down);
        }
    }

    /// Stops every session (Cease, administrative shutdown) and waits until each has written
    /// its NOTIFICATION (at most a second each).
    pub async fn shutdown(mut self) {
        for (_, p) in self.peers.drain() {
            stop(p).await;
        }
        if let Some((_, t)) = self.listener.take() {
            t.abort();
        }
    }
}

impl Drop for Speaker {
    /// Dropped without [`Speaker::shutdown`]: each peer's task sees its command channel close
    /// and sends Cease on its own; the listener stops.
    fn drop(&mut self) {
        if let Some((_, t)) = self.listener.take() {
            t.abort();
        }
    }
}

async fn stop(p: Peer) {
    let (tx, rx) = oneshot::channel();
    if p.cmds.send(Cmd::Stop(tx)).is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(1), rx).await;
    }
    p.task.abort();
}

async fn accept(l: TcpListener, accepted: Accepted) {
    loop {
        let Ok((stream, from)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let ip = match from.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        let to = accepted.lock().ok().and_then(|m| m.get(&ip).cloned());
        if let Some(to) = to {
            let _ = to.send(stream);
        }
        // Not a peer: dropped (closed).
    }
}

async fn connect(p: &PeerConfig) -> io::Result<TcpStream> {
    let to = SocketAddr::new(p.address, p.port);
    let sock = if to.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(pw) = &p.password {
        sockopt::set_md5(sock.as_raw_fd(), p.address, pw.as_bytes())?;
    }
    if let Some(ttl) = p.ttl() {
        sockopt::set_ttl(sock.as_raw_fd(), &to, ttl)?;
    }
    if let Some(src) = p.source {
        sock.bind(SocketAddr::new(src, 0))?;
    }
    let s = sock.connect(to).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

type Connecting =
    std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<TcpStream>> + Send>>;

/// One peer's task: the session, its connection and its timers.
async fn run(
    p: PeerConfig,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    mut accepted: mpsc::UnboundedReceiver<TcpStream>,
    events: mpsc::UnboundedSender<PeerEvent>,
) {
    let mut s = Session::new(p.session.clone());
    let mut conn: Option<TcpStream> = None;
    let mut connecting: Option<Connecting> = None;
    let mut buf = vec![0u8; 64 * 1024];
    let mut last = s.state();
    let mut unannounceable = std::collections::BTreeSet::new();
    let mut stopping: Option<oneshot::Sender<()>> = None;
    let mut started = false;
    let report = |state: State, down: Option<DownReason>, error: Option<String>| {
        let _ = events.send(PeerEvent {
            peer: p.address,
            state,
            down,
            error,
        });
    };
    // The session starts with the first routes: an End-of-RIB sent before the agent knows
    // its routes would make a router that kept them over our restart flush them.
    loop {
        // Carry out what the session asked for.
        while let Some(a) = s.poll_action() {
            match a {
                Action::Connect => {
                    conn = None;
                    let pc = p.clone();
                    connecting = Some(Box::pin(async move { connect(&pc).await }));
                }
                Action::Send(bytes) => {
                    if let Some(c) = &mut conn {
                        // A peer that stops reading must not stall the session's timers for
                        // longer than its hold time (the kernel would wait many minutes).
                        let limit = Some(s.hold_time())
                            .filter(|h| !h.is_zero())
                            .unwrap_or(Duration::from_secs(90));
                        let res = tokio::time::timeout(limit, c.write_all(&bytes)).await;
                        let err = match res {
                            Ok(Ok(())) => None,
                            Ok(Err(e)) => Some(format!("write: {e}")),
                            Err(_) => Some(format!("write: peer not reading for {limit:?}")),
                        };
                        if let Some(e) = err {
                            conn = None;
                            report(s.state(), None, Some(e));
                            s.handle(Instant::now().into_std(), Event::TcpFailed);
                        }
                    }
                }
                Action::Close => {
                    connecting = None;
                    if let Some(mut c) = conn.take() {
                        let _ = c.shutdown().await;
                    }
                }
                Action::Established => {}
                Action::Down(r) => report(State::Idle, Some(r), None),
            }
        }
        if s.state() != last {
            last = s.state();
            report(last, None, None);
        }
        let skipped = s.unannounceable();
        if skipped != unannounceable {
            if !skipped.is_empty() {
                let some: Vec<String> = skipped.iter().take(3).map(|p| p.to_string()).collect();
                report(
                    last,
                    None,
                    Some(format!(
                        "{} route(s) not announced (no next hop of their family, or the family \
                         was not negotiated): {}{}",
                        skipped.len(),
                        some.join(", "),
                        if skipped.len() > 3 { ", ..." } else { "" }
                    )),
                );
            }
            unannounceable = skipped;
        }
        if let Some(done) = stopping.take() {
            let _ = done.send(());
            return;
        }
        let deadline = s.poll_timeout().map(Instant::from_std);
        tokio::select! {
            cmd = cmds.recv() => match cmd {
                Some(Cmd::Routes(r)) => {
                    s.set_routes(r);
                    if !started {
                        started = true;
                        s.handle(Instant::now().into_std(), Event::Start);
                    }
                }
                Some(Cmd::Down) => {
                    connecting = None;
                    if conn.take().is_some() {
                        s.handle(Instant::now().into_std(), Event::TcpFailed);
                    }
                }
                Some(Cmd::Stop(done)) => {
                    s.handle(Instant::now().into_std(), Event::Stop);
                    stopping = Some(done);
                }
                None => {
                    s.handle(Instant::now().into_std(), Event::Stop);
                    let (tx, _) = oneshot::channel();
                    stopping = Some(tx);
                }
            },
            res = async { connecting.as_mut().expect("guarded").await }, if connecting.is_some() => {
                connecting = None;
                let now = Instant::now().into_std();
                match res.and_then(|c| c.local_addr().map(|l| (c, l))) {
                    Ok((c, local)) => {
                        conn = Some(c);
                        s.handle(now, Event::TcpConnected { local: local.ip() });
                    }
                    Err(e) => {
                        report(s.state(), None, Some(format!("connect to {}:{}: {e}", p.address, p.port)));
                        s.handle(now, Event::TcpFailed);
                    }
                }
            },
            Some(c) = accepted.recv() => {
                let now = Instant::now().into_std();
                if conn.is_none() && matches!(s.state(), State::Idle | State::Connect | State::Active) {
                    connecting = None;
                    if let Ok(local) = c.local_addr() {
                        let _ = c.set_nodelay(true);
                        if let Some(ttl) = p.ttl() {
                            let _ = sockopt::set_ttl(c.as_raw_fd(), &SocketAddr::new(p.address, p.port), ttl);
                        }
                        conn = Some(c);
                        s.handle(now, Event::TcpConnected { local: local.ip() });
                    }
                }
                // else: dropped (collision: ours stands).
            },
            n = async { conn.as_mut().expect("guarded").read(&mut buf).await }, if conn.is_some() => {
                let now = Instant::now().into_std();
                match n {
                    Ok(0) | Err(_) => {
                        conn = None;
                        s.handle(now, Event::TcpFailed);
                    }
                    Ok(n) => s.handle(now, Event::Bytes(&buf[..n])),
                }
            },
            _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {
                s.handle(Instant::now().into_std(), Event::Tick);
            },
        }
    }
}
