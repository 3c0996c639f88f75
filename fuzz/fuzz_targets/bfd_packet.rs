//! BFD Control packets as a peer sends them: arbitrary bytes into
//! `ferry_bfd::Packet::decode`, then into sessions in each state.
//!
//! Whatever decodes encodes back to the same 24 bytes (the length field aside) and decodes to
//! the same value; a session fed it never panics, keeps a timeout while it has a peer to
//! talk to, and its packets decode.
#![no_main]

use std::time::{Duration, Instant};

use ferry_bfd::{Config, Output, Packet, Session, State};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(p) = Packet::decode(data) else {
        return;
    };
    let out = p.encode();
    assert_eq!(out[..3], data[..3]);
    assert_eq!(out[4..], data[4..24]);
    assert_eq!(Packet::decode(&out), Ok(p));
    let now = Instant::now();
    for warm in [State::Down, State::Init, State::Up, State::AdminDown] {
        let mut s = Session::new(Config::default(), 9, now);
        let mut peer = p;
        peer.your_disc = 9;
        peer.poll = false;
        peer.fin = false;
        match warm {
            State::Down => {}
            State::Init => {
                peer.state = State::Down;
                s.handle_packet(&peer, now);
            }
            State::Up => {
                peer.state = State::Init;
                s.handle_packet(&peer, now);
            }
            State::AdminDown => s.set_admin_down(true, now),
        }
        assert_eq!(s.state(), warm);
        s.handle_packet(&p, now + Duration::from_millis(1));
        let mut t = now + Duration::from_millis(2);
        for _ in 0..8 {
            s.handle_timeout(t);
            while let Some(o) = s.poll_output() {
                if let Output::Send(q) = o {
                    assert_eq!(Packet::decode(&q.encode()), Ok(q));
                }
            }
            match s.poll_timeout() {
                Some(next) => t = next.max(t + Duration::from_micros(1)),
                None => break,
            }
        }
    }
});
