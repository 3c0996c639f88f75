//! The BFD Control packet (RFC 5880 section 4.1), without authentication: a pure codec.

use std::time::Duration;

/// The mandatory part of a Control packet, in bytes.
pub const LEN: usize = 24;

/// BFD protocol version 1.
pub const VERSION: u8 = 1;

/// Session state as carried in packets (RFC 5880 4.1, "Sta").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    AdminDown = 0,
    Down = 1,
    Init = 2,
    Up = 3,
}

impl State {
    fn from_bits(b: u8) -> State {
        match b & 3 {
            0 => State::AdminDown,
            1 => State::Down,
            2 => State::Init,
            _ => State::Up,
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::AdminDown => "AdminDown",
            State::Down => "Down",
            State::Init => "Init",
            State::Up => "Up",
        })
    }
}

/// Diagnostic codes (RFC 5880 4.1); values 9-31 are reserved and kept as they came.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Diag {
    None,
    ControlDetectionTimeExpired,
    EchoFunctionFailed,
    NeighborSignaledSessionDown,
    ForwardingPlaneReset,
    PathDown,
    ConcatenatedPathDown,
    AdministrativelyDown,
    ReverseConcatenatedPathDown,
    Reserved(u8),
}

impl Diag {
    pub fn from_code(c: u8) -> Diag {
        match c & 0x1f {
            0 => Diag::None,
            1 => Diag::ControlDetectionTimeExpired,
            2 => Diag::EchoFunctionFailed,
            3 => Diag::NeighborSignaledSessionDown,
            4 => Diag::ForwardingPlaneReset,
            5 => Diag::PathDown,
            6 => Diag::ConcatenatedPathDown,
            7 => Diag::AdministrativelyDown,
            8 => Diag::ReverseConcatenatedPathDown,
            c => Diag::Reserved(c),
        }
    }

    pub fn code(self) -> u8 {
        match self {
            Diag::None => 0,
            Diag::ControlDetectionTimeExpired => 1,
            Diag::EchoFunctionFailed => 2,
            Diag::NeighborSignaledSessionDown => 3,
            Diag::ForwardingPlaneReset => 4,
            Diag::PathDown => 5,
            Diag::ConcatenatedPathDown => 6,
            Diag::AdministrativelyDown => 7,
            Diag::ReverseConcatenatedPathDown => 8,
            Diag::Reserved(c) => c & 0x1f,
        }
    }
}

impl std::fmt::Display for Diag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Diag::None => f.write_str("no diagnostic"),
            Diag::ControlDetectionTimeExpired => f.write_str("control detection time expired"),
            Diag::EchoFunctionFailed => f.write_str("echo function failed"),
            Diag::NeighborSignaledSessionDown => f.write_str("neighbor signaled session down"),
            Diag::ForwardingPlaneReset => f.write_str("forwarding plane reset"),
            Diag::PathDown => f.write_str("path down"),
            Diag::ConcatenatedPathDown => f.write_str("concatenated path down"),
            Diag::AdministrativelyDown => f.write_str("administratively down"),
            Diag::ReverseConcatenatedPathDown => f.write_str("reverse concatenated path down"),
            Diag::Reserved(c) => write!(f, "diagnostic {c}"),
        }
    }
}

/// A BFD Control packet. Intervals are in microseconds on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    pub diag: Diag,
    pub state: State,
    /// Poll.
    pub poll: bool,
    /// Final.
    pub fin: bool,
    /// Control Plane Independent.
    pub cpi: bool,
    /// Authentication Present (never set by us; packets with it are refused).
    pub auth: bool,
    /// Demand mode.
    pub demand: bool,
    /// Multipoint (must be zero).
    pub multipoint: bool,
    pub detect_mult: u8,
    pub my_disc: u32,
    pub your_disc: u32,
    /// Desired Min TX Interval, microseconds.
    pub desired_min_tx: u32,
    /// Required Min RX Interval, microseconds.
    pub required_min_rx: u32,
    /// Required Min Echo RX Interval, microseconds (0: no echo).
    pub required_min_echo_rx: u32,
}

/// Why a received packet is discarded (RFC 5880 6.8.6).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{0} bytes, a BFD Control packet has at least 24")]
    Short(usize),
    #[error("version {0}, only BFD version 1 is spoken")]
    Version(u8),
    #[error("length field {field} with {got} bytes received (24 to the datagram's size)")]
    Length { field: u8, got: usize },
    #[error("Detect Mult 0")]
    DetectMult,
    #[error("Multipoint bit set")]
    Multipoint,
    #[error("My Discriminator 0")]
    MyDiscriminator,
    #[error("Your Discriminator 0 in state {0}")]
    YourDiscriminator(State),
    #[error("authentication present: ferry's BFD has no authentication configured")]
    Authentication,
}

impl Packet {
    /// The wire form (24 bytes, no authentication section).
    pub fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[0] = (VERSION << 5) | self.diag.code();
        b[1] = ((self.state as u8) << 6)
            | (u8::from(self.poll) << 5)
            | (u8::from(self.fin) << 4)
            | (u8::from(self.cpi) << 3)
            | (u8::from(self.auth) << 2)
            | (u8::from(self.demand) << 1)
            | u8::from(self.multipoint);
        b[2] = self.detect_mult;
        b[3] = LEN as u8;
        b[4..8].copy_from_slice(&self.my_disc.to_be_bytes());
        b[8..12].copy_from_slice(&self.your_disc.to_be_bytes());
        b[12..16].copy_from_slice(&self.desired_min_tx.to_be_bytes());
        b[16..20].copy_from_slice(&self.required_min_rx.to_be_bytes());
        b[20..24].copy_from_slice(&self.required_min_echo_rx.to_be_bytes());
        b
    }

    /// Parses and checks a received datagram as RFC 5880 6.8.6 asks (everything but the
    /// demultiplexing by Your Discriminator, which needs the sessions).
    pub fn decode(b: &[u8]) -> Result<Packet, DecodeError> {
        if b.len() < LEN {
            return Err(DecodeError::Short(b.len()));
        }
        let version = b[0] >> 5;
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let auth = b[1] & 0x04 != 0;
        let len = b[3];
        let min = if auth { LEN + 2 } else { LEN };
        if usize::from(len) < min || usize::from(len) > b.len() {
            return Err(DecodeError::Length {
                field: len,
                got: b.len(),
            });
        }
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let p = Packet {
            diag: Diag::from_code(b[0]),
            state: State::from_bits(b[1] >> 6),
            poll: b[1] & 0x20 != 0,
            fin: b[1] & 0x10 != 0,
            cpi: b[1] & 0x08 != 0,
            auth,
            demand: b[1] & 0x02 != 0,
            multipoint: b[1] & 0x01 != 0,
            detect_mult: b[2],
            my_disc: u32_at(4),
            your_disc: u32_at(8),
            desired_min_tx: u32_at(12),
            required_min_rx: u32_at(16),
            required_min_echo_rx: u32_at(20),
        };
        if p.detect_mult == 0 {
            return Err(DecodeError::DetectMult);
        }
        if p.multipoint {
            return Err(DecodeError::Multipoint);
        }
        if p.my_disc == 0 {
            return Err(DecodeError::MyDiscriminator);
        }
        if p.your_disc == 0 && !matches!(p.state, State::Down | State::AdminDown) {
            return Err(DecodeError::YourDiscriminator(p.state));
        }
        if p.auth {
            return Err(DecodeError::Authentication);
        }
        Ok(p)
    }

    pub fn desired_min_tx(&self) -> Duration {
        Duration::from_micros(self.desired_min_tx.into())
    }

    pub fn required_min_rx(&self) -> Duration {
        Duration::from_micros(self.required_min_rx.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Packet {
        Packet {
            diag: Diag::None,
            state: State::Up,
            poll: true,
            fin: false,
            cpi: false,
            auth: false,
            demand: false,
            multipoint: false,
            detect_mult: 3,
            my_disc: 0x0102_0304,
            your_disc: 7,
            desired_min_tx: 100_000,
            required_min_rx: 300_000,
            required_min_echo_rx: 0,
        }
    }

    #[test]
    fn wire_form_is_rfc_5880s() {
        let b = sample().encode();
        assert_eq!(b[0], 0x20, "version 1, diag 0");
        assert_eq!(b[1], 0xe0, "Up, Poll");
        assert_eq!(&b[2..4], &[3, 24]);
        assert_eq!(&b[4..8], &[1, 2, 3, 4]);
        assert_eq!(&b[12..16], &100_000u32.to_be_bytes());
        assert_eq!(Packet::decode(&b), Ok(sample()));
    }

    #[test]
    fn refused_as_rfc_5880_6_8_6_says() {
        let good = sample().encode();
        assert_eq!(Packet::decode(&good[..23]), Err(DecodeError::Short(23)));
        let mut b = good;
        b[0] = 0x40;
        assert_eq!(Packet::decode(&b), Err(DecodeError::Version(2)));
        let mut b = good;
        b[3] = 30;
        assert!(matches!(
            Packet::decode(&b),
            Err(DecodeError::Length { .. })
        ));
        let mut b = good;
        b[2] = 0;
        assert_eq!(Packet::decode(&b), Err(DecodeError::DetectMult));
        let mut b = good;
        b[1] |= 1;
        assert_eq!(Packet::decode(&b), Err(DecodeError::Multipoint));
        let mut b = good;
        b[4..8].fill(0);
        assert_eq!(Packet::decode(&b), Err(DecodeError::MyDiscriminator));
        let mut b = good;
        b[8..12].fill(0);
        assert_eq!(
            Packet::decode(&b),
            Err(DecodeError::YourDiscriminator(State::Up))
        );
        let mut p = sample();
        p.your_disc = 0;
        p.state = State::Down;
        assert!(
            Packet::decode(&p.encode()).is_ok(),
            "Down may not know it yet"
        );
        let mut v = good.to_vec();
        v[1] |= 4;
        v[3] = 28;
        v.extend_from_slice(&[1, 4, 0, 0]);
        assert_eq!(Packet::decode(&v), Err(DecodeError::Authentication));
        // Trailing bytes past the length field are ignored.
        let mut v = good.to_vec();
        v.extend_from_slice(&[9, 9]);
        assert_eq!(Packet::decode(&v), Ok(sample()));
    }

    fn arb_state() -> impl Strategy<Value = State> {
        (0u8..4).prop_map(State::from_bits)
    }

    proptest! {
        #[test]
        fn round_trips(diag in 0u8..32, state in arb_state(), poll: bool, fin: bool, cpi: bool,
                       demand: bool, mult in 1u8.., my in 1u32.., your: u32, tx: u32, rx: u32,
                       echo: u32) {
            let p = Packet { diag: Diag::from_code(diag), state, poll, fin, cpi, auth: false,
                demand, multipoint: false, detect_mult: mult, my_disc: my,
                your_disc: if your == 0 && !matches!(state, State::Down | State::AdminDown) { 1 } else { your },
                desired_min_tx: tx, required_min_rx: rx, required_min_echo_rx: echo };
            prop_assert_eq!(Packet::decode(&p.encode()), Ok(p));
        }

        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(p) = Packet::decode(&b) {
                let mut want = b[..24].to_vec();
                want[3] = 24;
                prop_assert_eq!(&p.encode()[..], &want[..]);
            }
        }
    }
}
