//! Pure packet code: Ethernet II frames carrying ARP (IPv4 over Ethernet) or IPv6 neighbour
//! discovery (ICMPv6 Neighbor Solicitation / Advertisement).
//!
//! No I/O and no global state. Everything that reads bytes takes them as untrusted (they come
//! from anyone on the LAN): parsing never panics, it returns a [`ParseError`], and the lints
//! below keep indexing, `unwrap` and `panic!` out of this module. Building is the inverse of
//! parsing: `Frame::parse(&frame.to_bytes()) == Ok(frame)` for every frame this module can
//! represent.
//!
//! - [`Frame`] is one parsed frame: its Ethernet addresses and an [`Arp`] or [`Ndp`] payload;
//! - [`Frame::solicitation`] recognises a question a responder may have to answer (ARP request
//!   or probe, multicast NS, unicast NUD probe, DAD probe) and [`Solicitation::reply`] builds
//!   the answer;
//! - [`Frame::announcement`] recognises gratuitous ARP / unsolicited NA and [`announce`] builds
//!   them; [`Frame::claim`] is any frame by which a host asserts "this IP is at this MAC".

#![deny(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::unreachable,
    clippy::todo
)]

mod arp;
mod ndp;
mod neighbor;

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

pub use arp::{Arp, ArpOperation, ARP_LEN};
pub use ndp::{
    icmpv6_checksum, solicited_node, Ndp, NdpMessage, NeighborAdvertisement, NeighborSolicitation,
    ALL_NODES, NDP_HOP_LIMIT,
};
pub use neighbor::{
    announce, Announcement, AnnouncementKind, ArpSolicitation, NsKind, NsSolicitation, Solicitation,
};

/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// EtherType of an IEEE 802.1Q VLAN tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// EtherType of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// Length of an Ethernet II header (no VLAN tag).
pub const ETHERNET_HEADER_LEN: usize = 14;
/// Shortest Ethernet frame without its FCS: built frames are padded with zeros to this length.
pub const MIN_FRAME_LEN: usize = 60;

/// Why bytes are not a frame this crate handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Ends before a field or length says it should.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// Claims to be ARP or neighbour discovery but breaks its format.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// An NS or NA whose ICMPv6 checksum does not add up.
    #[error("bad ICMPv6 checksum")]
    Checksum,
    /// Well-formed as far as read, but not something this crate handles (another EtherType,
    /// another IPv6 payload or ICMPv6 type, an unusual ARP operation): ordinary LAN traffic.
    #[error("not handled: {0}")]
    Unsupported(&'static str),
}

impl ParseError {
    /// True for broken input (truncated, malformed, bad checksum), false for traffic that is
    /// merely not ARP or NS/NA.
    pub fn is_garbage(&self) -> bool {
        !matches!(self, ParseError::Unsupported(_))
    }
}

/// An Ethernet (EUI-48) address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// ff:ff:ff:ff:ff:ff
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);
    /// 00:00:00:00:00:00
    pub const ZERO: MacAddr = MacAddr([0; 6]);

    /// The multicast MAC an IPv6 multicast group maps to (RFC 2464: 33:33 + its last 32 bits).
    pub fn ipv6_multicast(group: Ipv6Addr) -> MacAddr {
        let [.., a, b, c, d] = group.octets();
        MacAddr([0x33, 0x33, a, b, c, d])
    }

    pub fn is_broadcast(&self) -> bool {
        *self == MacAddr::BROADCAST
    }

    /// Group bit set (broadcast included).
    pub fn is_multicast(&self) -> bool {
        let [first, ..] = self.0;
        first & 1 == 1
    }

    /// An address one host can have: not multicast, not all zeros.
    pub fn is_unicast(&self) -> bool {
        !self.is_multicast() && *self != MacAddr::ZERO
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A string that is not six colon-separated hex bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a MAC address: {0:?}")]
pub struct ParseMacError(pub String);

impl FromStr for MacAddr {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<MacAddr, ParseMacError> {
        let err = || ParseMacError(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.trim().split(':');
        for byte in out.iter_mut() {
            let part = parts.next().ok_or_else(err)?;
            if part.is_empty() || part.len() > 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

/// The payload of a [`Frame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Payload {
    Arp(Arp),
    Ndp(Ndp),
}

/// One Ethernet II frame carrying ARP or an NS/NA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Frame {
    pub dst: MacAddr,
    pub src: MacAddr,
    pub payload: Payload,
}

impl Frame {
    /// Parses one frame as received from an AF_PACKET socket (Ethernet header included, no
    /// FCS). Trailing bytes after the payload (Ethernet padding) are ignored.
    pub fn parse(bytes: &[u8]) -> Result<Frame, ParseError> {
        let mut r = Reader::new(bytes);
        let dst = MacAddr(r.array("Ethernet header")?);
        let src = MacAddr(r.array("Ethernet header")?);
        let payload = match r.u16("Ethernet header")? {
            ETHERTYPE_ARP => Payload::Arp(Arp::parse(r.rest())?),
            ETHERTYPE_IPV6 => Payload::Ndp(Ndp::parse(r.rest())?),
            ETHERTYPE_VLAN => return Err(ParseError::Unsupported("VLAN-tagged frame")),
            _ => return Err(ParseError::Unsupported("EtherType")),
        };
        Ok(Frame { dst, src, payload })
    }

    /// The EtherType this frame's payload goes with.
    pub fn ethertype(&self) -> u16 {
        match self.payload {
            Payload::Arp(_) => ETHERTYPE_ARP,
            Payload::Ndp(_) => ETHERTYPE_IPV6,
        }
    }

    /// Appends the frame's bytes (padded to [`MIN_FRAME_LEN`]) to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.dst.0);
        out.extend_from_slice(&self.src.0);
        out.extend_from_slice(&self.ethertype().to_be_bytes());
        match &self.payload {
            Payload::Arp(arp) => arp.emit(out),
            Payload::Ndp(ndp) => ndp.emit(out),
        }
        let len = out.len().saturating_sub(start);
        if len < MIN_FRAME_LEN {
            out.resize(start.saturating_add(MIN_FRAME_LEN), 0);
        }
    }

    /// The frame's bytes, ready to send on an AF_PACKET `SOCK_RAW` socket.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96);
        self.emit(&mut out);
        out
    }
}

/// A cursor over untrusted bytes: every read is bounds-checked and fails with `Truncated`.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf }
    }

    fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ParseError> {
        if self.buf.len() < n {
            return Err(ParseError::Truncated(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], ParseError> {
        <[u8; N]>::try_from(self.take(N, what)?).map_err(|_| ParseError::Truncated(what))
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, ParseError> {
        let [b] = self.array::<1>(what)?;
        Ok(b)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, ParseError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    fn rest(self) -> &'a [u8] {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

    use super::*;

    #[test]
    fn mac_text_round_trips() {
        let mac: MacAddr = "02:0a:FF:00:10:9c".parse().unwrap();
        assert_eq!(mac, MacAddr([0x02, 0x0a, 0xff, 0x00, 0x10, 0x9c]));
        assert_eq!(mac.to_string(), "02:0a:ff:00:10:9c");
        for bad in [
            "",
            "02:0a:ff:00:10",
            "02:0a:ff:00:10:9c:00",
            "02:0a:ff:00:10:xyz",
            "::::::",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert!(MacAddr::BROADCAST.is_multicast() && MacAddr::BROADCAST.is_broadcast());
        assert!(!MacAddr::ZERO.is_unicast());
        assert!(mac.is_unicast());
        assert_eq!(
            MacAddr::ipv6_multicast("ff02::1:ff00:200".parse().unwrap()).to_string(),
            "33:33:ff:00:02:00"
        );
    }

    #[test]
    fn other_ethertypes_are_unsupported_not_garbage() {
        let mut ipv4 = vec![0xff; 12];
        ipv4.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        ipv4.resize(60, 0);
        let err = Frame::parse(&ipv4).unwrap_err();
        assert!(!err.is_garbage(), "{err}");
        assert_eq!(
            Frame::parse(&ipv4[..13]),
            Err(ParseError::Truncated("Ethernet header"))
        );
    }
}
