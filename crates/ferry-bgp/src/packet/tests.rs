use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use proptest::prelude::*;

use super::*;

const FOUR: Codec = Codec {
    four_octet_as: true,
};
const TWO: Codec = Codec {
    four_octet_as: false,
};

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn marker() -> &'static str {
    "ffffffffffffffffffffffffffffffff"
}

fn one(bytes: &[u8], codec: Codec) -> Message {
    let (m, n) = decode(bytes, codec).unwrap().unwrap();
    assert_eq!(n, bytes.len());
    m
}

#[test]
fn keepalive_is_the_bare_header() {
    // RFC 4271 §4.4: a KEEPALIVE is the 19-byte header alone.
    let b = hex(&format!("{} 0013 04", marker()));
    assert_eq!(one(&b, FOUR), Message::Keepalive);
    assert_eq!(encode(&Message::Keepalive, FOUR), b);
}

#[test]
fn partial_input_waits() {
    let b = encode(&Message::Keepalive, FOUR);
    for n in 0..b.len() {
        assert_eq!(decode(&b[..n], FOUR).unwrap(), None, "{n} bytes");
    }
}

#[test]
fn header_errors() {
    let mut b = encode(&Message::Keepalive, FOUR);
    b[3] = 0;
    assert_eq!(
        decode(&b, FOUR).unwrap_err().error,
        ErrorKind::Header(HeaderSubcode::ConnectionNotSynchronized)
    );
    // A KEEPALIVE of 20 bytes: Bad Message Length, data = the length field.
    let b = hex(&format!("{} 0014 04 00", marker()));
    let e = decode(&b, FOUR).unwrap_err();
    assert_eq!(e.error, ErrorKind::Header(HeaderSubcode::BadMessageLength));
    assert_eq!(e.data, vec![0, 0x14]);
    let b = hex(&format!("{} 1001 02", marker()));
    assert_eq!(
        decode(&b, FOUR).unwrap_err().error,
        ErrorKind::Header(HeaderSubcode::BadMessageLength)
    );
    let b = hex(&format!("{} 0013 07", marker()));
    let e = decode(&b, FOUR).unwrap_err();
    assert_eq!(e.error, ErrorKind::Header(HeaderSubcode::BadMessageType));
    assert_eq!(e.data, vec![7]);
}

/// BIRD 2.0.12's OPEN, captured (`tcpdump -w` in a node namespace of the lab of
/// tests/bird.rs: AS 64600, hold 9, router id 10.96.0.1, `graceful restart on`). BIRD puts
/// all capabilities in one optional parameter: multiprotocol IPv4 and IPv6 unicast, route
/// refresh, graceful restart (restart time 120, both families, F clear), four-octet AS 64600,
/// enhanced route refresh (70), long-lived graceful restart (71, empty).
const BIRD_OPEN: &str = "ffffffffffffffffffffffffffffffff00430104fc5800090a6000012602240104000100010104000200010200400a0078000101000002010041040000fc5846004700";

#[test]
fn open_from_bird() {
    let b = hex(BIRD_OPEN);
    let Message::Open(o) = one(&b, FOUR) else {
        panic!("not an OPEN")
    };
    assert_eq!(o.my_as, 64600);
    assert_eq!(o.asn(), 64600);
    assert_eq!(o.hold_time, 9);
    assert_eq!(o.router_id, Ipv4Addr::new(10, 96, 0, 1));
    assert_eq!(o.families(), vec![Family::Ipv4Unicast, Family::Ipv6Unicast]);
    assert!(o.route_refresh());
    let gr = o.graceful_restart().unwrap();
    assert_eq!(gr.restart_time, 120);
    assert!(!gr.restart_state);
    assert_eq!(
        gr.families,
        vec![(Family::Ipv4Unicast, false), (Family::Ipv6Unicast, false)]
    );
    for code in [70, 71] {
        assert!(o.capabilities.contains(&Capability::Unknown {
            code,
            value: vec![]
        }));
    }
    // We put one capability per optional parameter (both layouts are RFC 5492's): other
    // bytes, the same OPEN.
    let again = encode(&Message::Open(o.clone()), FOUR);
    assert_eq!(one(&again, FOUR), Message::Open(o));
}

/// What ferry-bgp-peer sent BIRD in the same capture: its OPEN (AS 64601, hold 9, router id
/// 10.96.0.11, graceful restart 120 with F set for both families), an UPDATE for
/// 10.96.200.1/32, and the End-of-RIB markers, which BIRD sent byte for byte the same.
#[test]
fn our_messages_as_captured() {
    let open = "ffffffffffffffffffffffffffffffff00470104fc5900090a60000b2a0206010400010001020601040002000102020200020c400a00780001018000020180020641040000fc59";
    let Message::Open(o) = one(&hex(open), FOUR) else {
        panic!()
    };
    assert_eq!(o.asn(), 64601);
    assert_eq!(
        o.graceful_restart().unwrap().families,
        vec![(Family::Ipv4Unicast, true), (Family::Ipv6Unicast, true)]
    );
    assert_eq!(encode(&Message::Open(o), FOUR), hex(open));
    let update = "ffffffffffffffffffffffffffffffff003002000000144001010040020602010000fc594003040a60000b200a60c801";
    let Message::Update(u) = one(&hex(update), FOUR) else {
        panic!()
    };
    assert_eq!(u.nlri, vec!["10.96.200.1/32".parse().unwrap()]);
    assert_eq!(u.attributes.next_hop, Some(Ipv4Addr::new(10, 96, 0, 11)));
    assert_eq!(
        encode(
            &Message::Update(Update::end_of_rib(Family::Ipv4Unicast)),
            FOUR
        ),
        hex("ffffffffffffffffffffffffffffffff00170200000000")
    );
    assert_eq!(
        encode(
            &Message::Update(Update::end_of_rib(Family::Ipv6Unicast)),
            FOUR
        ),
        hex("ffffffffffffffffffffffffffffffff001d0200000006800f03000201")
    );
}

#[test]
fn open_four_octet_as_uses_as_trans() {
    // RFC 6793 §4.1: My AS is AS_TRANS (23456 = 0x5ba0) when the AS needs four octets.
    let o = Open::new(4_200_000_000, 90, Ipv4Addr::new(10, 96, 1, 2), Vec::new());
    let b = encode(&Message::Open(o.clone()), FOUR);
    assert_eq!(&b[20..22], &[0x5b, 0xa0]);
    // Capability 65, length 4, 4200000000 = 0xfa56ea00.
    assert_eq!(&b[b.len() - 6..], &hex("41 04 fa56ea00")[..]);
    let Message::Open(back) = one(&b, FOUR) else {
        panic!()
    };
    assert_eq!(back.asn(), 4_200_000_000);
    assert_eq!(back, o);
}

#[test]
fn graceful_restart_capability_bytes() {
    // RFC 4724 §3: R bit, 12-bit restart time, then AFI, SAFI, flags (F = 0x80) per family.
    let o = Open {
        my_as: 64512,
        hold_time: 9,
        router_id: Ipv4Addr::new(1, 2, 3, 4),
        capabilities: vec![Capability::GracefulRestart(GracefulRestart {
            restart_state: true,
            notification: false,
            restart_time: 300,
            families: vec![(Family::Ipv4Unicast, true), (Family::Ipv6Unicast, false)],
        })],
    };
    let b = encode(&Message::Open(o.clone()), FOUR);
    assert_eq!(&b[29..], &hex("02 0c 40 0a 812c 0001 01 80 0002 01 00")[..]);
    assert_eq!(one(&b, FOUR), Message::Open(o));
}

#[test]
fn open_errors() {
    let open = |ver: &str, hold: &str, id: &str, opts: &str| {
        let body = format!("{ver} fde8 {hold} {id} {opts}");
        let len = 19 + hex(&body).len();
        hex(&format!("{} {len:04x} 01 {body}", marker()))
    };
    let e = decode(&open("03", "00f0", "01010101", "00"), FOUR).unwrap_err();
    assert_eq!(e.error, ErrorKind::Open(OpenSubcode::UnsupportedVersion));
    assert_eq!(e.data, vec![0, 4]);
    let e = decode(&open("04", "0002", "01010101", "00"), FOUR).unwrap_err();
    assert_eq!(e.error, ErrorKind::Open(OpenSubcode::UnacceptableHoldTime));
    let e = decode(&open("04", "00f0", "00000000", "00"), FOUR).unwrap_err();
    assert_eq!(e.error, ErrorKind::Open(OpenSubcode::BadBgpIdentifier));
    let e = decode(&open("04", "00f0", "01010101", "03 01 01 00"), FOUR).unwrap_err();
    assert_eq!(
        e.error,
        ErrorKind::Open(OpenSubcode::UnsupportedOptionalParameter)
    );
    // A capability that overruns its parameter.
    let e = decode(&open("04", "00f0", "01010101", "04 02 02 41 04"), FOUR).unwrap_err();
    assert_eq!(e.error, ErrorKind::Open(OpenSubcode::Unspecific));
    // Hold time 0 is fine (no keepalives).
    assert!(decode(&open("04", "0000", "01010101", "00"), FOUR).is_ok());
}

#[test]
fn notification_and_cease() {
    // Cease (6), administrative shutdown (2), RFC 8203 text "bye".
    let b = hex(&format!("{} 0019 03 06 02 03 627965", marker()));
    let Message::Notification(n) = one(&b, FOUR) else {
        panic!()
    };
    assert_eq!(
        n.error,
        ErrorKind::Cease(CeaseSubcode::AdministrativeShutdown)
    );
    assert_eq!(n.to_string(), "cease: AdministrativeShutdown \"bye\"");
    assert_eq!(encode(&Message::Notification(n), FOUR), b);
    let b = hex(&format!("{} 0015 03 04 00", marker()));
    assert_eq!(
        one(&b, FOUR),
        Message::Notification(Notification::new(ErrorKind::HoldTimerExpired))
    );
    assert_eq!(
        ErrorKind::from_codes(9, 9),
        ErrorKind::Other {
            code: 9,
            subcode: 9
        }
    );
}

#[test]
fn route_refresh() {
    // RFC 2918 §3: AFI 2, reserved, SAFI 1.
    let b = hex(&format!("{} 0017 05 0002 00 01", marker()));
    assert_eq!(
        one(&b, FOUR),
        Message::RouteRefresh(RouteRefresh { afi: 2, safi: 1 })
    );
    assert_eq!(
        encode(
            &Message::RouteRefresh(RouteRefresh { afi: 2, safi: 1 }),
            FOUR
        ),
        b
    );
}

/// An IPv4 UPDATE built by hand from RFC 4271 §4.3 and the attribute RFCs: 10.96.200.1/32
/// with ORIGIN IGP, AS_PATH (sequence 65001, four-octet), NEXT_HOP 10.96.0.2, LOCAL_PREF 200,
/// COMMUNITIES 65535:666 (0xffff029a), LARGE_COMMUNITY 65001:1:2.
fn v4_update_bytes() -> Vec<u8> {
    let attrs = "40 01 01 00
                 40 02 06 02 01 0000fde9
                 40 03 04 0a600002
                 40 05 04 000000c8
                 c0 08 04 ffff029a
                 c0 20 0c 0000fde9 00000001 00000002";
    let a = hex(attrs);
    let nlri = "20 0a60c801";
    let len = 19 + 2 + 2 + a.len() + hex(nlri).len();
    hex(&format!(
        "{} {len:04x} 02 0000 {:04x} {attrs} {nlri}",
        marker(),
        a.len()
    ))
}

#[test]
fn ipv4_update() {
    let b = v4_update_bytes();
    let Message::Update(u) = one(&b, FOUR) else {
        panic!()
    };
    assert!(u.problems.is_empty());
    assert_eq!(u.nlri, vec!["10.96.200.1/32".parse().unwrap()]);
    let a = &u.attributes;
    assert_eq!(a.origin, Some(Origin::Igp));
    assert_eq!(
        a.as_path,
        Some(vec![Segment {
            kind: SegmentKind::Sequence,
            asns: vec![65001]
        }])
    );
    assert_eq!(a.next_hop, Some(Ipv4Addr::new(10, 96, 0, 2)));
    assert_eq!(a.local_pref, Some(200));
    assert_eq!(a.communities, vec![0xffff_029a]);
    assert_eq!(
        a.large_communities,
        vec![LargeCommunity {
            global: 65001,
            local1: 1,
            local2: 2
        }]
    );
    assert_eq!(encode(&Message::Update(u), FOUR), b);
}

#[test]
fn two_octet_as_path_and_as4_path() {
    let mut u = Update::default();
    u.attributes.origin = Some(Origin::Igp);
    u.attributes.as_path = Some(vec![Segment {
        kind: SegmentKind::Sequence,
        asns: vec![4_200_000_000],
    }]);
    u.attributes.next_hop = Some(Ipv4Addr::new(10, 0, 0, 1));
    u.nlri = vec!["10.1.0.0/16".parse().unwrap()];
    let b = encode(&Message::Update(u), TWO);
    // AS_PATH with AS_TRANS, then AS4_PATH (optional transitive, type 17) with the real AS.
    let attrs = hex("40 01 01 00  40 02 04 02 01 5ba0  40 03 04 0a000001  c0 11 06 02 01 fa56ea00");
    assert_eq!(&b[23..23 + attrs.len()], &attrs[..]);
    let Message::Update(back) = one(&b, TWO) else {
        panic!()
    };
    assert_eq!(back.attributes.other[0].type_code, 17);
}

#[test]
fn ipv6_mp_reach_with_link_local_and_end_of_rib() {
    let mut u = Update::default();
    u.attributes.origin = Some(Origin::Igp);
    u.attributes.as_path = Some(vec![]);
    u.attributes.mp_reach = Some(MpReach {
        family: Family::Ipv6Unicast,
        next_hop: "fd00:96::2".parse().unwrap(),
        link_local: Some("fe80::2".parse().unwrap()),
        nlri: vec!["fd00:96:200::1/128".parse().unwrap()],
    });
    let b = encode(&Message::Update(u.clone()), FOUR);
    // RFC 4760 §3: AFI 2, SAFI 1, next hop length 32 (RFC 2545), reserved 0, prefix.
    let mp = hex(
        "80 0e 36 0002 01 20 fd000096000000000000000000000002 fe800000000000000000000000000002 00
         80 fd000096020000000000000000000001",
    );
    assert!(b.windows(mp.len()).any(|w| w == mp), "{b:02x?}");
    assert_eq!(one(&b, FOUR), Message::Update(u.clone()));
    assert_eq!(u.is_end_of_rib(), None);
    // End-of-RIB: IPv4 is the empty UPDATE (23 bytes); IPv6 an empty MP_UNREACH_NLRI.
    let eor4 = encode(
        &Message::Update(Update::end_of_rib(Family::Ipv4Unicast)),
        FOUR,
    );
    assert_eq!(eor4, hex(&format!("{} 0017 02 0000 0000", marker())));
    let eor6 = encode(
        &Message::Update(Update::end_of_rib(Family::Ipv6Unicast)),
        FOUR,
    );
    assert_eq!(
        eor6,
        hex(&format!("{} 001d 02 0000 0006 80 0f 03 0002 01", marker()))
    );
    for (b, f) in [(eor4, Family::Ipv4Unicast), (eor6, Family::Ipv6Unicast)] {
        let Message::Update(u) = one(&b, FOUR) else {
            panic!()
        };
        assert_eq!(u.is_end_of_rib(), Some(f));
    }
}

/// An UPDATE from attributes bytes and NLRI bytes.
fn update(attrs: &str, nlri: &str) -> Vec<u8> {
    let a = hex(attrs);
    let len = 23 + a.len() + hex(nlri).len();
    hex(&format!(
        "{} {len:04x} 02 0000 {:04x} {attrs} {nlri}",
        marker(),
        a.len()
    ))
}

fn decoded(b: &[u8]) -> Update {
    match one(b, FOUR) {
        Message::Update(u) => u,
        m => panic!("{m:?}"),
    }
}

const GOOD: &str = "40 01 01 00  40 02 00  40 03 04 0a000001";

#[test]
fn rfc7606_treat_as_withdraw() {
    let nlri = "20 0a000001";
    assert_eq!(decoded(&update(GOOD, nlri)).handling(), None);
    for (attrs, what) in [
        ("40 01 01 03  40 02 00  40 03 04 0a000001", "ORIGIN 3"),
        (
            "40 01 02 0000  40 02 00  40 03 04 0a000001",
            "ORIGIN length 2",
        ),
        (
            "40 01 01 00  40 02 02 02 01  40 03 04 0a000001",
            "AS_PATH short",
        ),
        (
            "40 01 01 00  40 02 02 02 00  40 03 04 0a000001",
            "empty segment",
        ),
        (
            "40 01 01 00  40 02 00  40 03 03 0a0000",
            "NEXT_HOP length 3",
        ),
        (
            "40 01 01 00  40 02 00  40 03 04 0a000001 80 04 02 0000",
            "MED length 2",
        ),
        (
            "40 01 01 00  40 02 00  40 03 04 0a000001 40 05 00",
            "LOCAL_PREF empty",
        ),
        (
            "40 01 01 00  40 02 00  40 03 04 0a000001 c0 08 03 000000",
            "COMMUNITIES 3",
        ),
        (
            "40 01 01 00  40 02 00  40 03 04 0a000001 c0 20 04 00000000",
            "LARGE 4",
        ),
        (
            "c0 01 01 00  40 02 00  40 03 04 0a000001",
            "ORIGIN flagged optional",
        ),
        ("40 02 00  40 03 04 0a000001", "ORIGIN missing"),
        ("40 01 01 00  40 03 04 0a000001", "AS_PATH missing"),
        ("40 01 01 00  40 02 00", "NEXT_HOP missing"),
        (
            "40 01 01 00  40 02 00  40 03 04 0a000001 c0 08 09 00",
            "attribute overrun",
        ),
    ] {
        let u = decoded(&update(attrs, nlri));
        assert_eq!(u.handling(), Some(Handling::TreatAsWithdraw), "{what}");
        assert_eq!(u.announced().len(), 1, "{what}: the NLRI are still found");
    }
    // Without NLRI a missing attribute is nothing to worry about (withdraw-only UPDATE).
    let w = hex(&format!("{} 001c 02 0005 200a000001 0000", marker()));
    let u = decoded(&w);
    assert_eq!(u.handling(), None);
    assert_eq!(u.withdrawn_all().len(), 1);
}

#[test]
fn rfc7606_attribute_discard() {
    let nlri = "20 0a000001";
    for (extra, what) in [
        ("40 06 01 00", "ATOMIC_AGGREGATE length 1"),
        ("c0 07 03 000000", "AGGREGATOR length 3"),
        ("40 01 01 02", "ORIGIN repeated"),
    ] {
        let u = decoded(&update(&format!("{GOOD} {extra}"), nlri));
        assert_eq!(u.handling(), Some(Handling::AttributeDiscard), "{what}");
        assert_eq!(u.attributes.origin, Some(Origin::Igp), "{what}");
        assert!(!u.attributes.atomic_aggregate && u.attributes.aggregator.is_none());
    }
}

#[test]
fn rfc7606_session_reset() {
    let nlri = "20 0a000001";
    let sub = |b: &[u8]| match decode(b, FOUR) {
        Err(DecodeError {
            error: ErrorKind::Update(s),
            ..
        }) => s,
        r => panic!("{r:?}"),
    };
    // Withdrawn length overruns the message.
    let b = hex(&format!("{} 0017 02 0009 0000", marker()));
    assert_eq!(sub(&b), UpdateSubcode::MalformedAttributeList);
    // NLRI with a /33.
    assert_eq!(
        sub(&update(GOOD, "21 0a00000100")),
        UpdateSubcode::InvalidNetworkField
    );
    // NLRI that stops inside a prefix.
    assert_eq!(
        sub(&update(GOOD, "20 0a00")),
        UpdateSubcode::InvalidNetworkField
    );
    // MP_REACH_NLRI with a 5-byte IPv6 next hop.
    assert_eq!(
        sub(&update(
            &format!("{GOOD} 80 0e 0a 0002 01 05 0000000000 00"),
            nlri
        )),
        UpdateSubcode::OptionalAttributeError
    );
    // MP_UNREACH_NLRI twice.
    assert_eq!(
        sub(&update(
            &format!("{GOOD} 80 0f 03 0002 01 80 0f 03 0002 01"),
            nlri
        )),
        UpdateSubcode::MalformedAttributeList
    );
    // An unrecognized well-known attribute (type 99, not optional).
    assert_eq!(
        sub(&update(&format!("{GOOD} 40 63 00"), nlri)),
        UpdateSubcode::UnrecognizedWellKnownAttribute
    );
}

#[test]
fn unknown_optional_attributes_are_kept() {
    let u = decoded(&update(&format!("{GOOD} c0 63 02 abcd"), "20 0a000001"));
    assert_eq!(u.handling(), None);
    assert_eq!(
        u.attributes.other,
        vec![RawAttribute {
            flags: 0xc0,
            type_code: 99,
            value: vec![0xab, 0xcd]
        }]
    );
}

#[test]
fn pack_splits_at_4096_bytes() {
    let attrs = Attributes {
        origin: Some(Origin::Igp),
        as_path: Some(vec![Segment {
            kind: SegmentKind::Sequence,
            asns: vec![65001],
        }]),
        next_hop: Some(Ipv4Addr::new(10, 0, 0, 1)),
        ..Attributes::default()
    };
    let prefixes: Vec<IpNet> = (0..2000u32)
        .map(|i| IpNet::from(IpAddr::from(Ipv4Addr::from(0x0a00_0000 + i))))
        .collect();
    for a in [Some(&attrs), None] {
        let msgs = pack(Family::Ipv4Unicast, a, &prefixes, FOUR);
        assert!(msgs.len() >= 3);
        let mut seen = Vec::new();
        for m in &msgs {
            assert!(m.len() <= MAX_LEN);
            let Message::Update(u) = one(m, FOUR) else {
                panic!()
            };
            seen.extend(if a.is_some() {
                u.announced()
            } else {
                u.withdrawn_all()
            });
        }
        assert_eq!(seen, prefixes);
    }
    let v6: Vec<IpNet> = (0..1000u128)
        .map(|i| {
            IpNet::from(IpAddr::from(Ipv6Addr::from(
                0xfd00_0000_0000_0000_0000_0000_0000_0000 + i,
            )))
        })
        .collect();
    let mut a6 = attrs.clone();
    a6.next_hop = None;
    a6.mp_reach = Some(MpReach {
        family: Family::Ipv6Unicast,
        next_hop: "fd00::1".parse().unwrap(),
        link_local: None,
        nlri: vec![],
    });
    for a in [Some(&a6), None] {
        let msgs = pack(Family::Ipv6Unicast, a, &v6, FOUR);
        assert!(msgs.len() >= 5);
        let mut seen = Vec::new();
        for m in &msgs {
            assert!(m.len() <= MAX_LEN);
            let Message::Update(u) = one(m, FOUR) else {
                panic!()
            };
            seen.extend(if a.is_some() {
                u.announced()
            } else {
                u.withdrawn_all()
            });
        }
        assert_eq!(seen, v6);
    }
}

// ---- properties ----

fn v4net() -> impl Strategy<Value = ipnet::Ipv4Net> {
    (any::<u32>(), 0u8..=32)
        .prop_map(|(a, l)| ipnet::Ipv4Net::new(Ipv4Addr::from(a), l).unwrap().trunc())
}

fn v6net() -> impl Strategy<Value = IpNet> {
    (any::<u128>(), 0u8..=128)
        .prop_map(|(a, l)| IpNet::V6(ipnet::Ipv6Net::new(Ipv6Addr::from(a), l).unwrap().trunc()))
}

fn attributes(four: bool) -> impl Strategy<Value = Attributes> {
    let asn = if four {
        any::<u32>().boxed()
    } else {
        (0u32..=0xffff).boxed()
    };
    let segment = (
        prop_oneof![Just(SegmentKind::Sequence), Just(SegmentKind::Set)],
        prop::collection::vec(asn, 1..5),
    )
        .prop_map(|(kind, asns)| Segment { kind, asns });
    let mp = (
        prop::collection::vec(v6net(), 0..10),
        any::<u128>(),
        prop::option::of(any::<u128>()),
    )
        .prop_map(|(nlri, nh, ll)| MpReach {
            family: Family::Ipv6Unicast,
            next_hop: Ipv6Addr::from(nh).into(),
            link_local: ll.map(Ipv6Addr::from),
            nlri,
        });
    let unreach = prop::collection::vec(v6net(), 0..10).prop_map(|withdrawn| MpUnreach {
        family: Family::Ipv6Unicast,
        withdrawn,
    });
    let large = (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(g, a, b)| LargeCommunity {
        global: g,
        local1: a,
        local2: b,
    });
    let raw = (40u8..=200, prop::collection::vec(any::<u8>(), 0..300)).prop_map(|(t, value)| {
        RawAttribute {
            flags: 0xc0,
            type_code: t,
            value,
        }
    });
    (
        (
            prop::option::of(prop_oneof![
                Just(Origin::Igp),
                Just(Origin::Egp),
                Just(Origin::Incomplete)
            ]),
            prop::option::of(prop::collection::vec(segment, 0..3)),
            prop::option::of(any::<u32>().prop_map(Ipv4Addr::from)),
            prop::option::of(any::<u32>()),
            prop::option::of(any::<u32>()),
            any::<bool>(),
        ),
        (
            prop::collection::vec(any::<u32>(), 0..5),
            prop::collection::vec(large, 0..5),
            prop::option::of(mp),
            prop::option::of(unreach),
            prop::option::of(raw),
        ),
    )
        .prop_map(
            |((origin, as_path, next_hop, med, local_pref, atomic), (comm, lc, mp, un, raw))| {
                Attributes {
                    origin,
                    as_path,
                    next_hop,
                    med,
                    local_pref,
                    atomic_aggregate: atomic,
                    aggregator: None,
                    communities: comm,
                    large_communities: lc,
                    mp_reach: mp,
                    mp_unreach: un,
                    other: raw.into_iter().collect(),
                }
            },
        )
}

fn well_formed(u: &Update) -> bool {
    let reaches = !u.nlri.is_empty()
        || u.attributes
            .mp_reach
            .as_ref()
            .is_some_and(|m| !m.nlri.is_empty());
    let a = &u.attributes;
    !reaches
        || (a.origin.is_some()
            && a.as_path.is_some()
            && (u.nlri.is_empty() || a.next_hop.is_some()))
}

proptest! {
    #[test]
    fn update_round_trips(
        four in any::<bool>(),
        withdrawn in prop::collection::vec(v4net(), 0..20),
        nlri in prop::collection::vec(v4net(), 0..20),
        attrs in any::<bool>().prop_flat_map(attributes),
    ) {
        let codec = Codec { four_octet_as: four };
        let mut attrs = attrs;
        if !four {
            // Four-octet AS numbers need the capability (else AS_TRANS and AS4_PATH).
            if let Some(p) = &mut attrs.as_path {
                for s in p { for a in &mut s.asns { *a &= 0xffff; } }
            }
        }
        let u = Update { withdrawn, attributes: attrs, nlri, problems: vec![] };
        let b = encode(&Message::Update(u.clone()), codec);
        prop_assume!(b.len() <= MAX_LEN);
        let (m, n) = decode(&b, codec).unwrap().unwrap();
        prop_assert_eq!(n, b.len());
        let Message::Update(back) = m else { panic!() };
        if well_formed(&u) {
            prop_assert_eq!(back, u);
        } else {
            prop_assert_eq!(back.handling(), Some(Handling::TreatAsWithdraw));
        }
    }

    #[test]
    fn open_round_trips(asn in any::<u32>(), hold in prop_oneof![Just(0u16), 3u16..], id in 1u32..,
                        rr in any::<bool>(), gr in prop::option::of((any::<bool>(), 0u16..4096)),
                        v6 in any::<bool>()) {
        let mut caps = vec![Capability::Multiprotocol(Family::Ipv4Unicast)];
        if v6 { caps.push(Capability::Multiprotocol(Family::Ipv6Unicast)); }
        if rr { caps.push(Capability::RouteRefresh); }
        if let Some((r, t)) = gr {
            caps.push(Capability::GracefulRestart(GracefulRestart {
                restart_state: r, notification: false, restart_time: t,
                families: vec![(Family::Ipv4Unicast, true)],
            }));
        }
        let o = Open::new(asn, hold, Ipv4Addr::from(id), caps);
        let b = encode(&Message::Open(o.clone()), FOUR);
        prop_assert_eq!(decode(&b, FOUR).unwrap().unwrap().0, Message::Open(o.clone()));
        prop_assert_eq!(o.asn(), asn);
    }

    #[test]
    fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600), four in any::<bool>()) {
        let codec = Codec { four_octet_as: four };
        let _ = decode(&bytes, codec);
        // Also behind a valid header, so the body parsers see it.
        for ty in 1u8..=5 {
            let mut b = vec![0xff; 16];
            b.extend_from_slice(&((19 + bytes.len()) as u16).to_be_bytes());
            b.push(ty);
            b.extend_from_slice(&bytes);
            if let Ok(Some((Message::Update(u), _))) = decode(&b, codec) {
                // Whatever decodes re-encodes without panicking.
                let _ = encode(&Message::Update(u), codec);
            }
        }
    }
}
