//! Layer-2 announcement decisions, pure: no sockets, no clock (time is passed in).
//!
//! - [`decide`]: which node should answer for each load-balancer address, from the Node
//!   objects, the pools and advertisements, the addresses in use and the membership view;
//! - [`holder`]: when this node may start answering for an address it won and when it must
//!   stop (hold-down, hand-over) and the lease the responder checks before every answer.
//!
//! The agent's layer-2 thread feeds both from membership and the model; the raw-socket
//! responders (`ferry-l2`) do what the [`holder::Step`] says.

pub mod claims;
pub mod decide;
pub mod holder;

pub use decide::{decide, L2Decision, L2Input, LbAddress};
pub use holder::{Event, Holder, Step, Timing};
