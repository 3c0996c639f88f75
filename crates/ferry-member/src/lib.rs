//! ferry's node membership and per-address leader election, for announcing LoadBalancer IPs in
//! layer 2 from exactly one node per address.
//!
//! - [`election`] (pure): every agent ranks the eligible nodes for an address by a stable hash
//!   and takes the first, so all agents agree on the answering node without exchanging a message.
//! - [`quorum`] (pure): a node announces only while it sees a strict majority of the cluster's
//!   nodes; why that rules out two answering nodes in a partition, and the timing rule that goes
//!   with it.
//! - [`engine`] (pure, time passed in): SWIM failure detection and gossip (the `foca` crate) with
//!   joining, heartbeats and an envelope around it; deterministic in simulation.
//! - [`member`]: the I/O edge, a thread with a UDP socket driving the engine:
//!   [`Membership::start`], [`Membership::alive`], [`Membership::subscribe`].
//!
//! How an agent uses it, for each LoadBalancer address `ip`:
//! 1. `eligible` = the nodes in [`Membership::alive`] that may announce `ip` (ready, matching
//!    the pool's node selector, with a local endpoint if `externalTrafficPolicy: Local`);
//! 2. if [`elect`]`(ip, eligible)` is this node **and** [`has_quorum_of`]`(lease_view, nodes)`
//!    holds (with [`Membership::lease_view`] and the cluster's Node names), answer ARP/NDP for
//!    `ip`; otherwise do not.
//! 3. Hand-overs are ordered so that the old holder stops first: a node stops as soon as its
//!    view says it lost (a higher-ranked node appeared, or the lease view lost the majority),
//!    whereas it starts only once the previous holder is declared down (a suspect still counts
//!    as alive) and, after it (re)joined or regained quorum, only after a short hold (about a
//!    second) so that the news of its arrival has reached the old holder.

pub mod election;
pub mod engine;
pub mod member;
pub mod quorum;

pub use election::{elect, preference_order};
pub use engine::{NodeId, Peer, Stats};
pub use member::{Error, MemberConfig, Membership, DEFAULT_PORT};
pub use quorum::{has_quorum, has_quorum_of, quorum_lease, QuorumLease};
