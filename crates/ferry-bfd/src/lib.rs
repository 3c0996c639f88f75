//! ferry's BFD: Bidirectional Forwarding Detection (RFC 5880) for single-hop IP (RFC 5881),
//! asynchronous mode, so that a router running BFD with the node drops the node's BGP routes
//! within a few hundred milliseconds of the node dying instead of after the BGP hold time.
//!
//! - [`packet`]: the Control packet codec (version 1, no authentication: packets with the A
//!   bit are refused, as are those RFC 5880 6.8.6 says to discard).
//! - [`session`]: one session's state machine, sans-IO (Down/Init/Up/AdminDown, the
//!   three-way handshake, detection time, Poll/Final for timer changes, 1 s transmission
//!   while not Up, jitter, passive mode).
//! - [`edge`]: the thin tokio UDP edge: port 3784, source ports 49152-65535, TTL 255 sent
//!   and required on receipt (GTSM, RFC 5881 5), one task for all sessions.
//!
//! Not implemented: echo mode (MetalLB's BFDProfile `echoMode` is ignored with a warning),
//! demand mode, authentication, multihop (RFC 5883).
//!
//! Why our own: crates.io has no established BFD crate (November 2026): `rust-bfd` is a young
//! daemon (a few commits) with its own event loop and broadcast channel, not a sans-IO state
//! machine one can drive with a simulated clock; `packet-dissector-bfd` only parses. The
//! protocol is small (a 24-byte packet and a four-state machine), and owning it keeps it
//! sans-IO and testable like ferry's BGP speaker.

pub mod edge;
pub mod packet;
pub mod session;

pub use packet::{DecodeError, Diag, Packet, State};
pub use session::{Config, Output, Session};
