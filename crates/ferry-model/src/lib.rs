//! ferry's model: the objects it works with (Services, EndpointSlices, Nodes, MetalLB pools,
//! ...), allocation of cluster IPs and node ports, and LoadBalancer address pools (MetalLB's
//! configuration) with their allocation. Reading objects from a source (manifest files, the
//! Kubernetes API) and checking them is `ferry-source`'s job; this crate holds types and
//! policies.
//!
//! Everything here is pure: no sockets, no files (callers hand in text and state), no clocks
//! (callers pass `now`). That keeps it unit- and property-testable.

pub mod alloc;
pub mod bgp;
pub mod cidr;
pub mod display;
pub mod lbipam;
pub mod objects;
pub mod pools;
pub mod view;
pub mod yaml;

pub use objects::*;
