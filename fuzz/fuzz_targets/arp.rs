//! ARP (RFC 826) as the codec reads it from the LAN: arbitrary bytes into `Arp::parse`.
//!
//! The format has no free fields, so parsing is lossless: whatever parses builds back to the
//! same 28 bytes, and parses again to the same value.
#![no_main]

use ferry_l2::packet::{Arp, ARP_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(arp) = Arp::parse(data) else {
        return;
    };
    let mut out = Vec::new();
    arp.emit(&mut out);
    assert_eq!(out.len(), ARP_LEN);
    assert_eq!(
        Some(out.as_slice()),
        data.get(..ARP_LEN),
        "emit(parse(x)) != x"
    );
    assert_eq!(Arp::parse(&out), Ok(arp));
});
