//! Properties of the pure packet code: parsing never panics whatever the bytes, building then
//! parsing gives back the same frame, and what a responder derives from a frame (solicitation,
//! reply, announcement) is consistent.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ferry_l2::packet::{
    announce, solicited_node, Arp, ArpOperation, Frame, MacAddr, Ndp, NdpMessage,
    NeighborAdvertisement, NeighborSolicitation, NsKind, Payload, Solicitation, ALL_NODES,
    ETHERTYPE_ARP, ETHERTYPE_IPV6,
};
use proptest::prelude::*;

fn mac() -> impl Strategy<Value = MacAddr> {
    any::<[u8; 6]>().prop_map(MacAddr)
}

fn v4() -> impl Strategy<Value = Ipv4Addr> {
    any::<u32>().prop_map(Ipv4Addr::from)
}

fn v6() -> impl Strategy<Value = Ipv6Addr> {
    any::<u128>().prop_map(Ipv6Addr::from)
}

fn arp() -> impl Strategy<Value = Arp> {
    (any::<bool>(), mac(), v4(), mac(), v4()).prop_map(|(req, sm, si, tm, ti)| Arp {
        operation: if req {
            ArpOperation::Request
        } else {
            ArpOperation::Reply
        },
        sender_mac: sm,
        sender_ip: si,
        target_mac: tm,
        target_ip: ti,
    })
}

fn ndp() -> impl Strategy<Value = Ndp> {
    let ns = (v6(), proptest::option::of(mac())).prop_map(|(target, source_mac)| {
        NdpMessage::Solicitation(NeighborSolicitation { target, source_mac })
    });
    let na = (any::<[bool; 3]>(), v6(), proptest::option::of(mac())).prop_map(
        |([router, solicited, override_flag], target, target_mac)| {
            NdpMessage::Advertisement(NeighborAdvertisement {
                router,
                solicited,
                override_flag,
                target,
                target_mac,
            })
        },
    );
    (v6(), v6(), prop_oneof![ns, na]).prop_map(|(src, dst, message)| Ndp { src, dst, message })
}

fn frame() -> impl Strategy<Value = Frame> {
    let payload = prop_oneof![arp().prop_map(Payload::Arp), ndp().prop_map(Payload::Ndp)];
    (mac(), mac(), payload).prop_map(|(dst, src, payload)| Frame { dst, src, payload })
}

/// Everything a responder does with a parsed frame; must not panic either.
fn use_frame(f: &Frame, us: MacAddr) {
    if let Some(s) = f.solicitation() {
        let reply = s.reply(us);
        assert_eq!(Frame::parse(&reply.to_bytes()), Ok(reply));
        let _ = s.addressed_to(us);
    }
    let _ = f.announcement();
    let _ = f.claim();
}

/// A unicast MAC (group bit clear, not all zeros).
fn unicast_mac() -> impl Strategy<Value = MacAddr> {
    any::<[u8; 6]>().prop_map(|mut m| {
        m[0] &= 0xfe;
        m[5] |= 1;
        MacAddr(m)
    })
}

/// An address a host can own: an IPv4 unicast address, or a unique-local IPv6 one.
fn ownable_v4() -> impl Strategy<Value = Ipv4Addr> {
    (1u8..224, any::<[u8; 3]>())
        .prop_map(|(a, [b, c, d])| Ipv4Addr::new(if a == 127 { 10 } else { a }, b, c, d))
}

fn ownable_v6() -> impl Strategy<Value = Ipv6Addr> {
    any::<u128>().prop_map(|x| Ipv6Addr::from((0xfd00u128 << 112) | (x >> 16)))
}

/// Mostly questions a responder must answer (ARP requests, NS of each kind), and some random
/// frames.
fn question() -> impl Strategy<Value = Frame> {
    let arp = (
        unicast_mac(),
        ownable_v4(),
        ownable_v4(),
        any::<bool>(),
        mac(),
        unicast_mac(),
    )
        .prop_filter("sender is not target", |(_, si, ti, ..)| si != ti)
        .prop_map(|(sm, si, ti, bcast, tm, dst)| Frame {
            dst: if bcast { MacAddr::BROADCAST } else { dst },
            src: sm,
            payload: Payload::Arp(Arp {
                operation: ArpOperation::Request,
                sender_mac: sm,
                sender_ip: si,
                target_mac: tm,
                target_ip: ti,
            }),
        });
    let ns = (
        unicast_mac(),
        ownable_v6(),
        ownable_v6(),
        0..3u8,
        any::<bool>(),
        unicast_mac(),
    )
        .prop_map(|(them, target, src, kind, sll, us)| {
            let group = solicited_node(target);
            let (src, dst, eth_dst, sll) = match kind {
                0 => (src, group, MacAddr::ipv6_multicast(group), sll),
                1 => (src, target, us, sll),
                _ => (
                    Ipv6Addr::UNSPECIFIED,
                    group,
                    MacAddr::ipv6_multicast(group),
                    false,
                ),
            };
            Frame {
                dst: eth_dst,
                src: them,
                payload: Payload::Ndp(Ndp {
                    src,
                    dst,
                    message: NdpMessage::Solicitation(NeighborSolicitation {
                        target,
                        source_mac: sll.then_some(them),
                    }),
                }),
            }
        });
    prop_oneof![4 => arp, 4 => ns, 1 => frame()]
}

/// A reply answers the question asked: from us, to the asker, claiming the target for us, and
/// asking nothing itself. The check must run in most cases (counted): on random frames it ran
/// in 9 of 256.
#[test]
fn replies_answer_the_question() {
    use proptest::test_runner::{Config, TestRunner};
    use std::cell::Cell;
    let (cases, asked) = (Cell::new(0u32), Cell::new(0u32));
    let mut runner = TestRunner::new(Config {
        failure_persistence: None,
        ..Config::with_cases(256)
    });
    let result = runner.run(&(question(), unicast_mac()), |(f, us)| {
        cases.set(cases.get() + 1);
        if let Some(s) = f.solicitation() {
            asked.set(asked.get() + 1);
            let reply = s.reply(us);
            prop_assert_eq!(reply.src, us);
            prop_assert!(reply.solicitation().is_none(), "a reply never asks");
            prop_assert_eq!(reply.claim(), Some((s.target(), us)));
            match s {
                Solicitation::Arp(a) => prop_assert_eq!(reply.dst, a.sender_mac),
                Solicitation::Ns(n) if n.kind == NsKind::Dad => {
                    prop_assert_eq!(reply.dst, MacAddr::ipv6_multicast(ALL_NODES))
                }
                Solicitation::Ns(n) => prop_assert_eq!(reply.dst, n.sender_mac),
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // 8 in 9 are well-formed questions: below 3 in 4 of 256 is over 5 standard deviations away.
    assert!(
        asked.get() * 4 >= cases.get() * 3,
        "a question was asked in only {} of {} cases",
        asked.get(),
        cases.get()
    );
}

proptest! {
    #[test]
    fn parse_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(f) = Frame::parse(&bytes) {
            use_frame(&f, MacAddr([2, 0, 0, 0, 0, 1]));
        }
    }

    #[test]
    fn parse_never_panics_behind_an_arp_or_ipv6_header(
        ipv6 in any::<bool>(),
        body in proptest::collection::vec(any::<u8>(), 0..120),
    ) {
        let mut bytes = vec![0xff; 6];
        bytes.extend_from_slice(&[2, 0, 0, 0, 0, 2]);
        let ethertype = if ipv6 { ETHERTYPE_IPV6 } else { ETHERTYPE_ARP };
        bytes.extend_from_slice(&ethertype.to_be_bytes());
        bytes.extend_from_slice(&body);
        if let Ok(f) = Frame::parse(&bytes) {
            use_frame(&f, MacAddr([2, 0, 0, 0, 0, 1]));
        }
    }

    #[test]
    fn build_then_parse_is_identity(f in frame()) {
        let bytes = f.to_bytes();
        prop_assert!(bytes.len() >= 60);
        prop_assert_eq!(Frame::parse(&bytes), Ok(f));
    }

    #[test]
    fn damaged_frames_never_panic(
        f in frame(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        tail in proptest::collection::vec(any::<u8>(), 0..24),
    ) {
        let mut bytes = f.to_bytes();
        for (at, x) in &flips {
            let i = at.index(bytes.len());
            bytes[i] ^= x;
        }
        let cut = cut.index(bytes.len() + 1);
        let _ = Frame::parse(&bytes[..cut]);
        bytes.extend_from_slice(&tail);
        if let Ok(g) = Frame::parse(&bytes) {
            use_frame(&g, MacAddr([2, 0, 0, 0, 0, 1]));
        }
    }

    #[test]
    fn a_flipped_bit_in_an_ndp_message_is_caught(f in ndp(), at in any::<prop::sample::Index>(), bit in 0..8u8) {
        // Any single-bit change inside the ICMPv6 message breaks the checksum (or the format).
        let frame = Frame { dst: MacAddr::BROADCAST, src: MacAddr([2, 0, 0, 0, 0, 2]), payload: Payload::Ndp(f) };
        let mut bytes = frame.to_bytes();
        let icmp_start = 14 + 40;
        let i = icmp_start + at.index(bytes.len() - icmp_start);
        bytes[i] ^= 1 << bit;
        prop_assert!(Frame::parse(&bytes).is_err());
    }

    #[test]
    fn announcements_are_recognised(us in mac(), ip in any::<bool>(), a in v4(), b in v6()) {
        prop_assume!(us.is_unicast());
        let ip = if ip { IpAddr::V4(a) } else { IpAddr::V6(b) };
        let f = Frame::parse(&announce(us, ip).to_bytes()).expect("our own announcement parses");
        prop_assert_eq!(f.solicitation(), None);
        let ownable = match ip {
            IpAddr::V4(a) => !(a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback()),
            IpAddr::V6(b) => !(b.is_unspecified() || b.is_multicast() || b.is_loopback()),
        };
        let got = f.announcement().map(|a| (a.ip, a.mac));
        prop_assert_eq!(got, ownable.then_some((ip, us)));
    }

    #[test]
    fn every_kind_of_ns_is_answered_with_a_valid_na(
        target in v6(), src in v6(), kind in 0..3u8, them in mac(), us in mac(), sll in any::<bool>(),
    ) {
        prop_assume!(us.is_unicast() && them.is_unicast() && us != them);
        prop_assume!(!(target.is_multicast() || target.is_unspecified() || target.is_loopback()));
        prop_assume!(!(src.is_multicast() || src.is_unspecified()));
        let group = solicited_node(target);
        let (src, dst, eth_dst, sll, kind_want) = match kind {
            0 => (src, group, MacAddr::ipv6_multicast(group), sll, NsKind::Multicast),
            1 => (src, target, us, sll, NsKind::Unicast),
            _ => (Ipv6Addr::UNSPECIFIED, group, MacAddr::ipv6_multicast(group), false, NsKind::Dad),
        };
        let ns = Frame {
            dst: eth_dst,
            src: them,
            payload: Payload::Ndp(Ndp {
                src,
                dst,
                message: NdpMessage::Solicitation(NeighborSolicitation {
                    target,
                    source_mac: sll.then_some(them),
                }),
            }),
        };
        let ns = Frame::parse(&ns.to_bytes()).expect("valid NS parses");
        let Some(Solicitation::Ns(s)) = ns.solicitation() else {
            return Err(TestCaseError::fail(format!("not a solicitation: {ns:?}")));
        };
        prop_assert_eq!(s.kind, kind_want);
        prop_assert!(Solicitation::Ns(s).addressed_to(us));
        let reply = Frame::parse(&Solicitation::Ns(s).reply(us).to_bytes()).expect("reply parses");
        let Payload::Ndp(na) = reply.payload else {
            return Err(TestCaseError::fail("not NDP"));
        };
        let NdpMessage::Advertisement(adv) = na.message else {
            return Err(TestCaseError::fail("not an NA"));
        };
        prop_assert_eq!((adv.target, adv.target_mac, adv.override_flag), (target, Some(us), true));
        prop_assert_eq!(na.src, target);
        if kind_want == NsKind::Dad {
            prop_assert_eq!((na.dst, adv.solicited, reply.dst), (ALL_NODES, false, MacAddr::ipv6_multicast(ALL_NODES)));
        } else {
            prop_assert_eq!((na.dst, adv.solicited, reply.dst), (src, true, them));
        }
    }
}
