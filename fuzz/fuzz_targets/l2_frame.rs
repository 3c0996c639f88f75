//! Ethernet frames as the responder receives them: `Frame::parse`, then everything the
//! responder asks of a frame (`solicitation`, `announcement`, `claim`) and the frames it
//! builds in answer (`Solicitation::reply`, `announce`), each checked to round-trip through
//! bytes. Also `MacAddr`'s text form.
//!
//! The first byte chooses: bit 0 set, the ICMPv6 checksum of an IPv6 frame is fixed before
//! parsing (see `fix_frame_checksum`). The next 6 bytes are the responder's MAC (forced
//! unicast); the rest is the frame.
#![no_main]

use std::net::IpAddr;

use ferry_fuzz::{check_announce, check_frame, fix_frame_checksum, take, take_v4, take_v6};
use ferry_l2::packet::{Frame, MacAddr};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // MAC addresses as text (flags and config): what parses prints back to the same address.
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(mac) = text.parse::<MacAddr>() {
            assert_eq!(mac.to_string().parse::<MacAddr>(), Ok(mac));
        }
    }
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let mut mac = take::<6>(&mut rest);
    mac[0] &= 0xfe; // not multicast
    mac[5] |= 1; // not zero
    let our_mac = MacAddr(mac);

    // Announcements of addresses taken from the input round-trip.
    let mut ips = rest;
    check_announce(our_mac, IpAddr::V4(take_v4(&mut ips)));
    check_announce(our_mac, IpAddr::V6(take_v6(&mut ips)));

    let mut frame = rest.to_vec();
    if mode & 1 != 0 {
        fix_frame_checksum(&mut frame);
    }
    match Frame::parse(&frame) {
        Ok(f) => check_frame(&f, our_mac),
        Err(e) => {
            // The error is one of the kinds the responder counts; its text is never empty.
            assert!(!e.to_string().is_empty());
        }
    }
});
