//! The BGP-4 message codec (RFC 4271 §4), pure: bytes in, typed messages out, and back.
//!
//! [`decode`] reads one message from the front of a buffer (`Ok(None)`: not all of it is there
//! yet). An error that must reset the session is a [`DecodeError`], which carries the
//! NOTIFICATION to send. A malformed UPDATE that RFC 7606 says not to reset the session for is
//! decoded anyway: [`Update::problems`] lists what was wrong and what to do
//! ([`Handling::TreatAsWithdraw`] or [`Handling::AttributeDiscard`]).

mod notification;
mod open;
mod update;

pub use notification::{
    CeaseSubcode, ErrorKind, FsmSubcode, HeaderSubcode, Notification, OpenSubcode, UpdateSubcode,
};
pub use open::{Capability, GracefulRestart, Open};
pub use update::{
    AsPath, Attributes, Handling, LargeCommunity, MpReach, MpUnreach, Origin, Problem,
    RawAttribute, Segment, SegmentKind, Update,
};

use std::fmt;

/// The length of the fixed header: marker, length, type.
pub const HEADER_LEN: usize = 19;
/// The largest message (RFC 4271; extended messages, RFC 8654, are not negotiated).
pub const MAX_LEN: usize = 4096;
/// The two-octet AS number that stands for a four-octet one (RFC 6793).
pub const AS_TRANS: u16 = 23456;

/// Message type codes.
pub mod kind {
    pub const OPEN: u8 = 1;
    pub const UPDATE: u8 = 2;
    pub const NOTIFICATION: u8 = 3;
    pub const KEEPALIVE: u8 = 4;
    pub const ROUTE_REFRESH: u8 = 5;
}

/// An address family this speaker knows (AFI/SAFI, RFC 4760).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    Ipv4Unicast,
    Ipv6Unicast,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::Ipv4Unicast, Family::Ipv6Unicast];

    pub fn afi_safi(self) -> (u16, u8) {
        match self {
            Family::Ipv4Unicast => (1, 1),
            Family::Ipv6Unicast => (2, 1),
        }
    }

    pub fn from_afi_safi(afi: u16, safi: u8) -> Option<Family> {
        match (afi, safi) {
            (1, 1) => Some(Family::Ipv4Unicast),
            (2, 1) => Some(Family::Ipv6Unicast),
            _ => None,
        }
    }

    pub fn of(net: &ipnet::IpNet) -> Family {
        match net {
            ipnet::IpNet::V4(_) => Family::Ipv4Unicast,
            ipnet::IpNet::V6(_) => Family::Ipv6Unicast,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ipv4Unicast => "ipv4-unicast",
            Family::Ipv6Unicast => "ipv6-unicast",
        })
    }
}

/// What both ends agreed on that changes the encoding: four-octet AS numbers in AS_PATH
/// (RFC 6793) when both sent the capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Codec {
    pub four_octet_as: bool,
}

/// ROUTE-REFRESH (RFC 2918): the peer asks for the Adj-RIB-Out of one family again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteRefresh {
    pub afi: u16,
    pub safi: u8,
}

/// One BGP message. (An UPDATE is much bigger than the others; messages are short-lived, so
/// it is not boxed.)
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Open(Open),
    Update(Update),
    Notification(Notification),
    Keepalive,
    RouteRefresh(RouteRefresh),
}

/// A message the session cannot go on after: send [`DecodeError::notification`] and close.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} ({error})")]
pub struct DecodeError {
    pub error: ErrorKind,
    /// The NOTIFICATION's data field (what the RFCs say to echo back).
    pub data: Vec<u8>,
    pub what: String,
}

impl DecodeError {
    pub(crate) fn new(error: ErrorKind, data: Vec<u8>, what: impl Into<String>) -> Self {
        DecodeError {
            error,
            data,
            what: what.into(),
        }
    }

    pub fn notification(&self) -> Notification {
        Notification {
            error: self.error,
            data: self.data.clone(),
        }
    }
}

/// Reads the message at the front of `buf`: `Ok(None)` when it is not complete yet, else the
/// message and how many bytes it took.
pub fn decode(buf: &[u8], codec: Codec) -> Result<Option<(Message, usize)>, DecodeError> {
    if buf.len() < HEADER_LEN {
        // The marker can be checked before the rest arrives.
        if buf.iter().take(16).any(|&b| b != 0xff) {
            return Err(DecodeError::new(
                ErrorKind::Header(HeaderSubcode::ConnectionNotSynchronized),
                Vec::new(),
                "marker is not all ones",
            ));
        }
        return Ok(None);
    }
    if buf[..16].iter().any(|&b| b != 0xff) {
        return Err(DecodeError::new(
            ErrorKind::Header(HeaderSubcode::ConnectionNotSynchronized),
            Vec::new(),
            "marker is not all ones",
        ));
    }
    let len = usize::from(u16::from_be_bytes([buf[16], buf[17]]));
    let ty = buf[18];
    let bad_len = || {
        DecodeError::new(
            ErrorKind::Header(HeaderSubcode::BadMessageLength),
            buf[16..18].to_vec(),
            format!("message length {len} for type {ty}"),
        )
    };
    if !(HEADER_LEN..=MAX_LEN).contains(&len) {
        return Err(bad_len());
    }
    let min = match ty {
        kind::OPEN => 29,
        kind::UPDATE => 23,
        kind::NOTIFICATION => 21,
        kind::KEEPALIVE => 19,
        kind::ROUTE_REFRESH => 23,
        _ => {
            return Err(DecodeError::new(
                ErrorKind::Header(HeaderSubcode::BadMessageType),
                vec![ty],
                format!("message type {ty}"),
            ))
        }
    };
    if len < min || (ty == kind::KEEPALIVE && len != 19) || (ty == kind::ROUTE_REFRESH && len != 23)
    {
        return Err(bad_len());
    }
    if buf.len() < len {
        return Ok(None);
    }
    let body = &buf[HEADER_LEN..len];
    let msg = match ty {
        kind::OPEN => Message::Open(open::decode(body)?),
        kind::UPDATE => Message::Update(update::decode(body, codec)?),
        kind::NOTIFICATION => Message::Notification(notification::decode(body)),
        kind::KEEPALIVE => Message::Keepalive,
        _ => Message::RouteRefresh(RouteRefresh {
            afi: u16::from_be_bytes([body[0], body[1]]),
            safi: body[3],
        }),
    };
    Ok(Some((msg, len)))
}

/// The bytes of `msg`. An UPDATE too big for one message is the caller's to split (see
/// [`update::pack`]); this encodes it as given and the length field would overflow, so
/// [`Update`]s built by this crate never are.
pub fn encode(msg: &Message, codec: Codec) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&[0xff; 16]);
    out.extend_from_slice(&[0, 0]);
    match msg {
        Message::Open(o) => {
            out.push(kind::OPEN);
            open::encode(o, &mut out);
        }
        Message::Update(u) => {
            out.push(kind::UPDATE);
            update::encode(u, codec, &mut out);
        }
        Message::Notification(n) => {
            out.push(kind::NOTIFICATION);
            let (code, sub) = n.error.codes();
            out.push(code);
            out.push(sub);
            out.extend_from_slice(&n.data);
        }
        Message::Keepalive => out.push(kind::KEEPALIVE),
        Message::RouteRefresh(r) => {
            out.push(kind::ROUTE_REFRESH);
            out.extend_from_slice(&r.afi.to_be_bytes());
            out.push(0);
            out.push(r.safi);
        }
    }
    let len = u16::try_from(out.len()).unwrap_or(u16::MAX);
    out[16..18].copy_from_slice(&len.to_be_bytes());
    out
}

pub use update::pack;

/// A cursor over a byte slice that never reads past the end.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }
    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }
    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

#[cfg(test)]
mod tests;
