//! Helpers shared by the fuzz targets: turning fuzzer bytes into inputs the codec's deeper
//! paths accept, and the properties checked on every parsed frame.
//!
//! Random bytes almost never carry a correct ICMPv6 checksum, so most NDP inputs would stop at
//! the checksum check; [`fix_ndp_checksum`] writes the right one so that mutations reach the
//! option walker and the frame logic. The targets use it for half of their inputs (chosen by
//! a bit of the input), so the checksum check itself is still fuzzed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ferry_l2::packet::{
    announce, icmpv6_checksum, AnnouncementKind, Frame, MacAddr, Payload, ETHERNET_HEADER_LEN,
    MIN_FRAME_LEN,
};

/// Offset of the ICMPv6 checksum inside an IPv6 packet carrying ICMPv6 (no extension headers).
const CHECKSUM_AT: usize = 40 + 2;

/// In an IPv6 packet (starting at `ip[0]`), replaces the ICMPv6 checksum by the correct one for
/// the payload the header's length field covers. Leaves packets too short for that alone.
pub fn fix_ndp_checksum(ip: &mut [u8]) {
    let (Some(len), Some(src), Some(dst)) = (ip.get(4..6), ip.get(8..24), ip.get(24..40)) else {
        return;
    };
    let payload_len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    let (Ok(src), Ok(dst)) = (<[u8; 16]>::try_from(src), <[u8; 16]>::try_from(dst)) else {
        return;
    };
    let (src, dst) = (Ipv6Addr::from(src), Ipv6Addr::from(dst));
    let Some(icmp) = ip.get_mut(40..40 + payload_len) else {
        return;
    };
    if icmp.len() < 4 {
        return;
    }
    icmp[2] = 0;
    icmp[3] = 0;
    let sum = icmpv6_checksum(src, dst, icmp);
    ip[CHECKSUM_AT..CHECKSUM_AT + 2].copy_from_slice(&sum.to_be_bytes());
}

/// Same, for an Ethernet frame whose IPv6 packet starts after the 14-byte header.
pub fn fix_frame_checksum(frame: &mut [u8]) {
    if let Some(ip) = frame.get_mut(ETHERNET_HEADER_LEN..) {
        fix_ndp_checksum(ip);
    }
}

/// Whether `ip` is an address a host can own (what the codec's `ownable_*` say).
fn ownable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() || v4.is_loopback())
        }
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast() || v6.is_loopback()),
    }
}

/// Builds `frame`, parses it back and checks it is the same frame, padded to the minimum
/// Ethernet length.
pub fn assert_round_trip(frame: &Frame) {
    let bytes = frame.to_bytes();
    assert!(
        bytes.len() >= MIN_FRAME_LEN,
        "{frame:?}: {} bytes",
        bytes.len()
    );
    assert_eq!(
        Frame::parse(&bytes),
        Ok(*frame),
        "parse(emit(x)) != x: {bytes:02x?}"
    );
}

/// Every property of a frame that parsed: it builds back to itself, and what it means to a
/// responder (question, announcement, claim) is consistent with the answer the responder
/// builds. `our_mac` is the responder's MAC (any unicast MAC).
pub fn check_frame(frame: &Frame, our_mac: MacAddr) {
    assert_round_trip(frame);
    let claim = frame.claim();
    if let Some((ip, mac)) = claim {
        assert!(
            ownable(ip) && mac.is_unicast(),
            "{frame:?} claims {ip} at {mac}"
        );
    }
    if let Some(a) = frame.announcement() {
        assert!(ownable(a.ip) && a.mac.is_unicast(), "{frame:?}: {a:?}");
        // An announcement is a claim of the same address by the same MAC.
        assert_eq!(claim, Some((a.ip, a.mac)), "{frame:?}: {a:?}");
        let kind = match a.ip {
            IpAddr::V4(_) => AnnouncementKind::GratuitousArp,
            IpAddr::V6(_) => AnnouncementKind::UnsolicitedNa,
        };
        assert_eq!(a.kind, kind);
        assert!(
            frame.solicitation().is_none(),
            "{frame:?} both asks and announces"
        );
    }
    if let Some(s) = frame.solicitation() {
        assert!(ownable(s.target()), "{frame:?} asks about {}", s.target());
        assert!(frame.src.is_unicast(), "{frame:?}");
        // Sent to a group or to one host, never to the zero MAC.
        assert!(
            frame.dst.is_multicast() || frame.dst.is_unicast(),
            "{frame:?}"
        );
        assert_eq!(s.eth_dst(), frame.dst);
        assert_eq!(
            s.addressed_to(our_mac),
            frame.dst.is_multicast() || frame.dst == our_mac
        );
        if our_mac.is_unicast() {
            let reply = s.reply(our_mac);
            assert_round_trip(&reply);
            assert_eq!(reply.src, our_mac);
            // The answer claims the asked-about address for us, and asks nothing back.
            assert_eq!(reply.claim(), Some((s.target(), our_mac)), "{reply:?}");
            assert_eq!(reply.solicitation(), None, "{reply:?}");
        }
    }
}

/// The announcement `mac` makes for `ip` round-trips and is recognised as one (when a host
/// can own `ip` and `mac` is a host's MAC).
pub fn check_announce(mac: MacAddr, ip: IpAddr) {
    let frame = announce(mac, ip);
    assert_round_trip(&frame);
    if ownable(ip) && mac.is_unicast() {
        let a = frame.announcement();
        assert_eq!(a.map(|a| (a.ip, a.mac)), Some((ip, mac)), "{frame:?}");
        assert_eq!(frame.solicitation(), None);
    }
    if let Payload::Arp(arp) = frame.payload {
        assert_eq!(arp.sender_ip, arp.target_ip);
    }
}

/// Takes `N` bytes from the front of `data` (zeros when it runs out).
pub fn take<const N: usize>(data: &mut &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let n = data.len().min(N);
    out[..n].copy_from_slice(&data[..n]);
    *data = &data[n..];
    out
}

/// An IPv4 address from 4 bytes of `data`.
pub fn take_v4(data: &mut &[u8]) -> Ipv4Addr {
    Ipv4Addr::from(take::<4>(data))
}

/// An IPv6 address from 16 bytes of `data`.
pub fn take_v6(data: &mut &[u8]) -> Ipv6Addr {
    Ipv6Addr::from(take::<16>(data))
}
