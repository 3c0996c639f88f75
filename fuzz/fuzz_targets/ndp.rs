//! IPv6 neighbour discovery as the codec reads it: an IPv6 packet into `Ndp::parse`, and
//! `Ndp` values built from the input into bytes and back.
//!
//! The first byte chooses: bit 0 set, the ICMPv6 checksum is fixed before parsing (so
//! mutations get past it to the message and its options); bit 1 set, the rest of the input
//! describes an `Ndp` value (addresses, NS or NA, flags, link-layer option) that must survive
//! emit + parse unchanged.
#![no_main]

use ferry_fuzz::{fix_ndp_checksum, take, take_v6};
use ferry_l2::packet::{
    icmpv6_checksum, MacAddr, Ndp, NdpMessage, NeighborAdvertisement, NeighborSolicitation,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 2 != 0 {
        round_trip(rest);
        return;
    }
    let mut packet = rest.to_vec();
    if mode & 1 != 0 {
        fix_ndp_checksum(&mut packet);
    }
    let Ok(ndp) = Ndp::parse(&packet) else {
        return;
    };
    // What parsed builds back into a packet that parses to the same value, with a correct
    // checksum.
    let mut out = Vec::new();
    ndp.emit(&mut out);
    assert_eq!(
        Ndp::parse(&out),
        Ok(ndp),
        "parse(emit(parse(x))) != parse(x): {out:02x?}"
    );
    assert_eq!(
        icmpv6_checksum(ndp.src, ndp.dst, out.get(40..).unwrap_or(&[])),
        0
    );
});

/// An `Ndp` from the bytes: emit, parse, compare.
fn round_trip(mut data: &[u8]) {
    let [kind, flags, has_mac] = take::<3>(&mut data);
    let src = take_v6(&mut data);
    let dst = take_v6(&mut data);
    let target = take_v6(&mut data);
    let mac = (has_mac & 1 != 0).then(|| MacAddr(take::<6>(&mut data)));
    let message = if kind & 1 == 0 {
        NdpMessage::Solicitation(NeighborSolicitation {
            target,
            source_mac: mac,
        })
    } else {
        NdpMessage::Advertisement(NeighborAdvertisement {
            router: flags & 1 != 0,
            solicited: flags & 2 != 0,
            override_flag: flags & 4 != 0,
            target,
            target_mac: mac,
        })
    };
    let ndp = Ndp { src, dst, message };
    let mut out = Vec::new();
    ndp.emit(&mut out);
    assert_eq!(Ndp::parse(&out), Ok(ndp), "parse(emit(x)) != x: {out:02x?}");
}
