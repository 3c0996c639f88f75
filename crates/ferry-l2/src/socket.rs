//! The kernel edge: AF_PACKET sockets bound to one interface, IPv6 multicast group membership
//! and an eventfd to wake a polling thread. All of the crate's `unsafe` is here.
//!
//! Sockets keep the network namespace they were created in: open them from a thread that is in
//! the namespace you mean, then use them from any thread.

use std::ffi::CString;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::Ipv6Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use crate::packet::MacAddr;
use crate::L2Error;

/// How the kernel classified a received frame (`sll_pkttype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketType {
    /// Unicast to this interface's MAC.
    Host,
    Broadcast,
    Multicast,
    /// Unicast to another MAC (seen because of promiscuous mode or a flooding switch), or
    /// tagged with a VLAN nobody on this host handles.
    OtherHost,
    /// Sent by this host.
    Outgoing,
    Other(u8),
}

impl PacketType {
    fn from_raw(t: u8) -> PacketType {
        match t {
            libc::PACKET_HOST => PacketType::Host,
            libc::PACKET_BROADCAST => PacketType::Broadcast,
            libc::PACKET_MULTICAST => PacketType::Multicast,
            libc::PACKET_OTHERHOST => PacketType::OtherHost,
            libc::PACKET_OUTGOING => PacketType::Outgoing,
            t => PacketType::Other(t),
        }
    }
}

/// One frame read by [`PacketSocket::recv`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Bytes written to the buffer.
    pub len: usize,
    /// The frame was longer than the buffer (the rest is lost).
    pub truncated: bool,
    pub packet_type: PacketType,
}

/// An AF_PACKET `SOCK_RAW` socket bound to one Ethernet interface and one EtherType: it reads
/// and writes whole frames (Ethernet header included). Non-blocking.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: u32,
    mac: MacAddr,
}

fn last_error(what: impl Into<String>) -> L2Error {
    L2Error::Io {
        what: what.into(),
        source: io::Error::last_os_error(),
    }
}

/// The index of interface `ifname` in the calling thread's network namespace.
pub fn interface_index(ifname: &str) -> Result<u32, L2Error> {
    let name = CString::new(ifname).map_err(|_| L2Error::NoSuchInterface(ifname.to_string()))?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        let err = io::Error::last_os_error();
        return Err(match err.raw_os_error() {
            Some(libc::ENODEV) | Some(libc::ENXIO) => L2Error::NoSuchInterface(ifname.into()),
            _ => L2Error::Io {
                what: format!("if_nametoindex({ifname})"),
                source: err,
            },
        });
    }
    Ok(index)
}

fn sockaddr_ll(ifindex: u32, protocol: u16) -> Result<libc::sockaddr_ll, L2Error> {
    // SAFETY: sockaddr_ll is plain old data; all zeros is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol.to_be();
    addr.sll_ifindex =
        i32::try_from(ifindex).map_err(|_| L2Error::NoSuchInterface(ifindex.to_string()))?;
    Ok(addr)
}

impl PacketSocket {
    /// Opens a socket on `ifname` (in the calling thread's network namespace) that receives
    /// frames of EtherType `protocol` only. Fails for interfaces that are not Ethernet.
    pub fn open(ifname: &str, protocol: u16) -> Result<PacketSocket, L2Error> {
        let ifindex = interface_index(ifname)?;
        // Protocol 0: the socket receives nothing until bound, so no frame from another
        // interface slips in between socket() and bind().
        // SAFETY: plain syscall; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        };
        if raw < 0 {
            return Err(last_error("socket(AF_PACKET, SOCK_RAW)"));
        }
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let addr = sockaddr_ll(ifindex, protocol)?;
        // SAFETY: `addr` is a valid sockaddr_ll and the length passed is its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(last_error(format!("bind AF_PACKET socket to {ifname}")));
        }
        // The bound address names the interface's hardware type and address.
        // SAFETY: as above, all zeros is a valid sockaddr_ll.
        let mut bound: libc::sockaddr_ll = unsafe { zeroed() };
        let mut len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `bound` has room for `len` bytes; the kernel writes at most that many.
        let rc = unsafe {
            libc::getsockname(
                fd.as_raw_fd(),
                (&mut bound as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(last_error(format!("getsockname on {ifname}")));
        }
        if bound.sll_hatype != libc::ARPHRD_ETHER || bound.sll_halen != 6 {
            return Err(L2Error::NotEthernet {
                ifname: ifname.to_string(),
                hardware_type: bound.sll_hatype,
            });
        }
        let [a, b, c, d, e, f, ..] = bound.sll_addr;
        Ok(PacketSocket {
            fd,
            ifindex,
            mac: MacAddr([a, b, c, d, e, f]),
        })
    }

    /// The interface's MAC address, as it was when the socket was opened.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Asks the interface to accept every multicast frame for as long as this socket is open
    /// (PACKET_MR_ALLMULTI), so NS to any solicited-node group reach it even where the NIC
    /// filters multicast by address.
    pub fn accept_all_multicast(&self) -> Result<(), L2Error> {
        // SAFETY: packet_mreq is plain old data; all zeros is a valid value.
        let mut mreq: libc::packet_mreq = unsafe { zeroed() };
        mreq.mr_ifindex = self.ifindex as libc::c_int;
        mreq.mr_type = libc::PACKET_MR_ALLMULTI as libc::c_ushort;
        // SAFETY: `mreq` is a valid packet_mreq and the length passed is its size.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_ADD_MEMBERSHIP,
                (&mreq as *const libc::packet_mreq).cast(),
                size_of::<libc::packet_mreq>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(last_error("PACKET_ADD_MEMBERSHIP (all multicast)"));
        }
        Ok(())
    }

    /// Sends one whole frame on the interface.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: `frame` is valid for reads of `frame.len()` bytes during the call.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != frame.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short send"));
        }
        Ok(())
    }

    /// Reads one frame into `buf` if one is queued; `Ok(None)` when none is.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<Received>> {
        // SAFETY: as above, all zeros is a valid sockaddr_ll.
        let mut from: libc::sockaddr_ll = unsafe { zeroed() };
        let mut len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes and `from` for `len` bytes;
        // MSG_TRUNC makes the kernel return the frame's real length but write no more than
        // the buffer holds.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(err);
        }
        let n = n as usize;
        Ok(Some(Received {
            len: n.min(buf.len()),
            truncated: n > buf.len(),
            packet_type: PacketType::from_raw(from.sll_pkttype),
        }))
    }

    /// Waits up to `timeout` for a frame to read; true if one is queued.
    pub fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        let mut fds = [libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        Ok(poll(&mut fds, timeout)? > 0)
    }
}

impl AsFd for PacketSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for PacketSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// poll(2) over `fds` for at most `timeout` (rounded up to whole milliseconds). EINTR counts
/// as "nothing ready".
pub(crate) fn poll(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<usize> {
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `fds` is a valid slice of pollfd for the duration of the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(err);
    }
    Ok(n as usize)
}

/// An AF_INET6 datagram socket used only to join and leave multicast groups on one
/// interface: the kernel then accepts those groups' frames and reports the membership with
/// MLD, so snooping switches forward solicitations to this host.
#[derive(Debug)]
pub(crate) struct GroupSocket {
    fd: OwnedFd,
    ifindex: u32,
}

impl GroupSocket {
    pub(crate) fn open(ifindex: u32) -> Result<GroupSocket, L2Error> {
        // SAFETY: plain syscall; the result is checked before use.
        let raw = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(last_error("socket(AF_INET6, SOCK_DGRAM)"));
        }
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(GroupSocket { fd, ifindex })
    }

    fn membership(&self, group: Ipv6Addr, option: libc::c_int) -> io::Result<()> {
        let mreq = libc::ipv6_mreq {
            ipv6mr_multiaddr: libc::in6_addr {
                s6_addr: group.octets(),
            },
            ipv6mr_interface: self.ifindex as _,
        };
        // SAFETY: `mreq` is a valid ipv6_mreq and the length passed is its size.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::IPPROTO_IPV6,
                option,
                (&mreq as *const libc::ipv6_mreq).cast(),
                size_of::<libc::ipv6_mreq>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub(crate) fn join(&self, group: Ipv6Addr) -> io::Result<()> {
        self.membership(group, libc::IPV6_ADD_MEMBERSHIP)
    }

    pub(crate) fn leave(&self, group: Ipv6Addr) -> io::Result<()> {
        self.membership(group, libc::IPV6_DROP_MEMBERSHIP)
    }
}

/// An eventfd: [`Waker::wake`] from any thread makes a `poll` on [`Waker::fd`] return.
#[derive(Debug)]
pub(crate) struct Waker {
    fd: OwnedFd,
}

impl Waker {
    pub(crate) fn new() -> Result<Waker, L2Error> {
        // SAFETY: plain syscall; the result is checked before use.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(last_error("eventfd"));
        }
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        Ok(Waker {
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
        })
    }

    pub(crate) fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer; failure (counter saturated) means a wake
        // is already pending, which is all we want.
        unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    /// Consumes pending wakes.
    pub(crate) fn drain(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live buffer; EAGAIN (nothing pending) is fine.
        unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
