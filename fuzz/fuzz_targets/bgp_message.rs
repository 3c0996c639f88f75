//! BGP messages as a peer sends them: arbitrary bytes into `ferry_bgp::packet::decode` (both
//! with and without four-octet AS numbers), and the same bytes into an established session.
//!
//! Whatever decodes as a well-formed UPDATE (no RFC 7606 problem) encodes back to an UPDATE
//! that decodes to the same value; NOTIFICATION, KEEPALIVE and ROUTE-REFRESH too. The session
//! never panics, whatever arrives, and after a decode error it has sent a NOTIFICATION and
//! closed.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use ferry_bgp::packet::{decode, encode, Codec, Message, MAX_LEN};
use ferry_bgp::{Action, Config, Event, Session, State};
use libfuzzer_sys::fuzz_target;

fn round_trip(data: &[u8], codec: Codec) {
    let Ok(Some((m, n))) = decode(data, codec) else {
        return;
    };
    assert!(n <= data.len() && n <= MAX_LEN);
    let check = match &m {
        Message::Update(u) => u.problems.is_empty(),
        Message::Open(_) => false,
        _ => true,
    };
    if !check {
        return;
    }
    let out = encode(&m, codec);
    if out.len() > MAX_LEN {
        return;
    }
    let (back, used) = decode(&out, codec)
        .expect("re-encoded message decodes")
        .expect("re-encoded message is complete");
    assert_eq!(used, out.len());
    assert_eq!(back, m, "decode(encode(m)) != m");
}

fuzz_target!(|data: &[u8]| {
    for four in [false, true] {
        round_trip(
            data,
            Codec {
                four_octet_as: four,
            },
        );
    }
    // An established session (its peer's OPEN and KEEPALIVE handed in first) fed the bytes.
    let now = Instant::now();
    let mut cfg = Config::new(64601, 64600, Ipv4Addr::new(10, 0, 0, 2));
    cfg.keep_received = true;
    let mut s = Session::new(cfg);
    s.handle(now, Event::Start);
    s.handle(
        now,
        Event::TcpConnected {
            local: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
        },
    );
    let open = ferry_bgp::packet::Open::new(64600, 90, Ipv4Addr::new(10, 0, 0, 1), vec![]);
    s.handle(
        now,
        Event::Bytes(&encode(&Message::Open(open), Codec::default())),
    );
    s.handle(
        now,
        Event::Bytes(&encode(&Message::Keepalive, Codec::default())),
    );
    assert_eq!(s.state(), State::Established);
    while s.poll_action().is_some() {}
    s.handle(now, Event::Bytes(data));
    let mut closed = false;
    while let Some(a) = s.poll_action() {
        closed |= a == Action::Close;
    }
    assert_eq!(closed, s.state() == State::Idle);
    s.handle(now, Event::Tick);
});
