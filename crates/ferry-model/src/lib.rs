//! ferry's model: the Kubernetes objects it reads, how manifests become those objects, the
//! validated internal model, allocation of cluster IPs and node ports, and LoadBalancer address
//! pools (MetalLB's configuration) with their allocation.
//!
//! Everything here is pure: no sockets, no files (callers hand in text and state), no clocks
//! (callers pass `now`). That keeps it unit- and property-testable.

pub mod alloc;
pub mod cidr;
pub mod lbipam;
pub mod manifest;
pub mod objects;
pub mod pools;
pub mod view;
pub mod yaml;

pub use objects::*;
