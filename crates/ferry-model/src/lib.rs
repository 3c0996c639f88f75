//! ferry's model: the Kubernetes objects it reads, how manifests become those objects, the
//! validated internal model, and allocation of cluster IPs and node ports.
//!
//! Everything here is pure: no sockets, no files (callers hand in text and state), no clocks
//! (callers pass `now`). That keeps it unit- and property-testable.

pub mod alloc;
pub mod cidr;
pub mod manifest;
pub mod objects;
pub mod view;

pub use objects::*;
