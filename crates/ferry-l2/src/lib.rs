//! ferry's layer-2 announcement: makes LoadBalancer addresses reachable on the LAN the way
//! MetalLB's layer-2 mode does, by answering "who has X?" for them from userspace.
//!
//! - [`packet`] is pure: Ethernet II, ARP, IPv6 neighbour solicitation / advertisement, parse
//!   and build, plus what a frame means to a responder. No I/O; parsing never panics.
//! - [`Responder`] is the I/O edge: AF_PACKET sockets on one interface, a background thread
//!   that answers ARP requests and NS for the owned addresses and announces addresses
//!   (gratuitous ARP, unsolicited NA) when they become owned.
//! - [`socket`] holds the raw sockets (all of the crate's `unsafe`); tests and tools use
//!   [`socket::PacketSocket`] to send and capture frames.
//!
//! The owned addresses are never added to an interface: the kernel does not answer for them,
//! the responder does. Whatever routes or DNATs traffic to them is someone else's job.

pub mod packet;
mod responder;
pub mod socket;

pub use packet::MacAddr;
pub use responder::{Config, Counters, Responder};

/// Why a responder or socket could not start.
#[derive(Debug, thiserror::Error)]
pub enum L2Error {
    #[error("no network interface named {0:?} in this network namespace")]
    NoSuchInterface(String),
    #[error("{ifname} is not an Ethernet interface (ARP hardware type {hardware_type})")]
    NotEthernet { ifname: String, hardware_type: u16 },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}
