//! The thin tokio UDP edge (RFC 5881): one task owns the receiving socket (port 3784, TTL
//! checked per datagram) and every session, each session with its own sending socket (a
//! source port in 49152-65535, TTL 255). The agent says which peers to run
//! ([`Bfd::set_peers`]); state changes come out of the event channel. IPv4 only for now.

use std::collections::HashMap;
use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::packet::{Diag, Packet, State};
use crate::session::{Config, Output, Session};

/// The single-hop control port (RFC 5881 4).
pub const PORT: u16 = 3784;

/// One session to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub peer: IpAddr,
    /// The local address to send from (else the kernel's choice).
    pub local: Option<IpAddr>,
    pub config: Config,
}

/// A session's state changed, or something went wrong at the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BfdEvent {
    pub peer: IpAddr,
    pub state: State,
    pub diag: Diag,
    /// Problems of the edge (socket errors), for the log.
    pub error: Option<String>,
}

/// The running BFD edge. Must be created inside a tokio runtime; dropping it stops it.
pub struct Bfd {
    cmds: mpsc::UnboundedSender<Vec<PeerSpec>>,
    task: JoinHandle<()>,
}

impl Bfd {
    /// Binds `listen` (normally 0.0.0.0:3784) and starts the task, with no sessions yet.
    pub fn start(listen: SocketAddr) -> io::Result<(Bfd, mpsc::UnboundedReceiver<BfdEvent>)> {
        let rx = std::net::UdpSocket::bind(listen)?;
        rx.set_nonblocking(true)?;
        set_int(rx.as_raw_fd(), libc::IPPROTO_IP, libc::IP_RECVTTL, 1)?;
        let rx = UdpSocket::from_std(rx)?;
        let (ctx, crx) = mpsc::unbounded_channel();
        let (etx, erx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(rx, crx, etx));
        Ok((Bfd { cmds: ctx, task }, erx))
    }

    /// The sessions from now on: new peers start (Down), removed ones stop (AdminDown sent
    /// first), changed timers go through a Poll Sequence.
    pub fn set_peers(&self, peers: Vec<PeerSpec>) {
        let _ = self.cmds.send(peers);
    }
}

impl Drop for Bfd {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn set_int(fd: i32, level: i32, opt: i32, v: i32) -> io::Result<()> {
    // SAFETY: a valid socket, an int option of its size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// recvmsg with the IP_TTL control message: (length, source, TTL if the kernel gave it).
fn recv_ttl(fd: i32, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<u8>)> {
    let mut src: MaybeUninit<libc::sockaddr_in> = MaybeUninit::zeroed();
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cmsg = [0u64; 16];
    // SAFETY: msghdr is plain data; every pointer below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = src.as_mut_ptr().cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg) as _;
    // SAFETY: as above.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled an AF_INET address (an IPv4 socket).
    let sin = unsafe { src.assume_init() };
    let from = SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
        u16::from_be(sin.sin_port),
    ));
    let mut ttl = None;
    // SAFETY: walking the control messages the kernel wrote, with libc's macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::IPPROTO_IP && (*c).cmsg_type == libc::IP_TTL {
                let v: i32 = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                ttl = u8::try_from(v).ok();
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, from, ttl))
}

/// A sending socket: TTL 255, a source port in 49152-65535 (RFC 5881 4).
fn tx_socket(spec: &PeerSpec, seed: u32) -> io::Result<UdpSocket> {
    let local = spec.local.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let mut last = io::Error::other("no free source port");
    for i in 0..64u32 {
        let port = 49152 + ((seed.wrapping_mul(2654435761).wrapping_add(i * 257)) % 16384) as u16;
        match std::net::UdpSocket::bind(SocketAddr::new(local, port)) {
            Ok(s) => {
                s.set_nonblocking(true)?;
                s.set_ttl(255)?;
                return UdpSocket::from_std(s);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

struct Entry {
    spec: PeerSpec,
    session: Session,
    sock: Option<UdpSocket>,
}

async fn run(
    rx: UdpSocket,
    mut cmds: mpsc::UnboundedReceiver<Vec<PeerSpec>>,
    events: mpsc::UnboundedSender<BfdEvent>,
) {
    let mut sessions: HashMap<IpAddr, Entry> = HashMap::new();
    let mut next_disc: u32 = std::process::id().wrapping_mul(7919) | 1;
    let mut buf = [0u8; 512];
    let report = |peer: IpAddr, s: &Session, error: Option<String>| {
        let _ = events.send(BfdEvent {
            peer,
            state: s.state(),
            diag: s.diag(),
            error,
        });
    };
    loop {
        for (peer, e) in sessions.iter_mut() {
            while let Some(o) = e.session.poll_output() {
                match o {
                    Output::Send(p) => {
                        if let Some(sock) = &e.sock {
                            let to = SocketAddr::new(*peer, PORT);
                            if let Err(err) = sock.try_send_to(&p.encode(), to) {
                                if err.kind() != io::ErrorKind::WouldBlock {
                                    report(*peer, &e.session, Some(format!("send: {err}")));
                                }
                            }
                        }
                    }
                    Output::State(..) => report(*peer, &e.session, None),
                }
            }
        }
        let deadline = sessions
            .values()
            .filter_map(|e| e.session.poll_timeout())
            .min()
            .map(Instant::from_std);
        tokio::select! {
            cmd = cmds.recv() => {
                let Some(peers) = cmd else { return };
                let now = Instant::now().into_std();
                let wanted: HashMap<IpAddr, PeerSpec> = peers.into_iter().map(|p| (p.peer, p)).collect();
                sessions.retain(|peer, e| {
                    let keep = wanted.get(peer).is_some_and(|w| w.local == e.spec.local);
                    if !keep {
                        // Tell the peer we are going away (AdminDown), once.
                        e.session.set_admin_down(true, now);
                        let p = e.session.packet();
                        if let Some(sock) = &e.sock {
                            let _ = sock.try_send_to(&p.encode(), SocketAddr::new(*peer, PORT));
                        }
                    }
                    keep
                });
                for (peer, spec) in wanted {
                    if let Some(e) = sessions.get_mut(&peer) {
                        if e.spec.config != spec.config {
                            e.session.set_config(spec.config, now);
                            e.spec = spec;
                        }
                        continue;
                    }
                    next_disc = next_disc.wrapping_add(0x9e37_79b9) | 1;
                    let session = Session::new(spec.config, next_disc, now);
                    let sock = match (peer, tx_socket(&spec, next_disc)) {
                        (IpAddr::V6(_), _) => {
                            report(peer, &session, Some("IPv6 BFD is not supported yet".into()));
                            None
                        }
                        (_, Ok(s)) => Some(s),
                        (_, Err(err)) => {
                            report(peer, &session, Some(format!("socket: {err}")));
                            None
                        }
                    };
                    sessions.insert(peer, Entry { spec, session, sock });
                }
            },
            r = rx.async_io(Interest::READABLE, || recv_ttl(rx.as_raw_fd(), &mut buf)) => {
                let Ok((n, from, ttl)) = r else { continue };
                // GTSM (RFC 5881 5): only packets sent with TTL 255 come from one hop away.
                if ttl != Some(255) {
                    continue;
                }
                let Ok(p) = Packet::decode(&buf[..n]) else { continue };
                let now = Instant::now().into_std();
                let e = if p.your_disc != 0 {
                    sessions.values_mut().find(|e| e.session.local_disc() == p.your_disc)
                } else {
                    sessions.get_mut(&from.ip())
                };
                if let Some(e) = e.filter(|e| e.spec.peer == from.ip()) {
                    e.session.handle_packet(&p, now);
                }
            },
            _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {
                let now = Instant::now().into_std();
                for e in sessions.values_mut() {
                    e.session.handle_timeout(now);
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Two edges on loopback addresses (127.0.0.1 and 127.0.0.2), real sockets: they come Up
    /// and one notices the other stopping.
    #[tokio::test]
    async fn two_edges_come_up_over_udp() {
        let a_ip: IpAddr = "127.0.0.1".parse().expect("ip");
        let b_ip: IpAddr = "127.0.0.2".parse().expect("ip");
        let (Ok((a, mut ae)), Ok((b, mut be))) = (
            Bfd::start(SocketAddr::new(a_ip, PORT)),
            Bfd::start(SocketAddr::new(b_ip, PORT)),
        ) else {
            eprintln!("ferry-test-skipped: port 3784 on loopback not available");
            return;
        };
        let cfg = Config {
            desired_min_tx: Duration::from_millis(50),
            required_min_rx: Duration::from_millis(50),
            detect_mult: 3,
            passive: false,
        };
        a.set_peers(vec![PeerSpec {
            peer: b_ip,
            local: Some(a_ip),
            config: cfg,
        }]);
        b.set_peers(vec![PeerSpec {
            peer: a_ip,
            local: Some(b_ip),
            config: cfg,
        }]);
        let up = |rx: &mut mpsc::UnboundedReceiver<BfdEvent>| {
            let mut rx = std::mem::replace(rx, mpsc::unbounded_channel().1);
            async move {
                while let Some(e) = rx.recv().await {
                    assert!(e.error.is_none(), "{e:?}");
                    if e.state == State::Up {
                        return rx;
                    }
                }
                panic!("closed");
            }
        };
        let t = Duration::from_secs(5);
        ae = tokio::time::timeout(t, up(&mut ae)).await.expect("a Up");
        let _be = tokio::time::timeout(t, up(&mut be)).await.expect("b Up");
        // The Poll Sequence to the fast rate.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let cut = std::time::Instant::now();
        drop(b);
        let e = tokio::time::timeout(t, ae.recv())
            .await
            .expect("a Down")
            .expect("event");
        assert_eq!(e.state, State::Down);
        assert_eq!(e.diag, Diag::ControlDetectionTimeExpired);
        assert!(
            cut.elapsed() < Duration::from_millis(400),
            "{:?}",
            cut.elapsed()
        );
    }
}
