//! The agent's metrics, liveness and readiness, served by [`crate::http`].
//!
//! Names follow kube-proxy (`kubeproxy_*`) and MetalLB (`metallb_*`) where one of them has the
//! metric, so their dashboards and alerts work unchanged; the rest is `ferry_*`. Built on
//! `prometheus-client`: every setter is a few atomics (or one short lock for label sets), so the
//! agent calls them from any thread through an `Arc<Metrics>`.
//!
//! | metric | type | from |
//! | --- | --- | --- |
//! | `kubeproxy_sync_proxy_rules_duration_seconds` | histogram | [`Metrics::observe_sync`] |
//! | `kubeproxy_sync_proxy_rules_last_timestamp_seconds` | gauge | [`Metrics::observe_sync`] (ok) |
//! | `kubeproxy_sync_proxy_rules_service_changes_total` | counter | [`Metrics::add_changes`] |
//! | `kubeproxy_sync_proxy_rules_endpoint_changes_total` | counter | [`Metrics::add_changes`] |
//! | `kubeproxy_network_programming_duration_seconds` | histogram | [`Metrics::observe_network_programming`] |
//! | `ferry_sync_failures_total` | counter | [`Metrics::observe_sync`] (failed) |
//! | `ferry_programmed_services`, `ferry_programmed_endpoints` | gauge | [`Metrics::set_programmed`] |
//! | `metallb_allocator_addresses_in_use_total{pool}` | gauge | [`Metrics::set_pool`], [`Metrics::set_pools`] |
//! | `metallb_allocator_addresses_total{pool}` | gauge | [`Metrics::set_pool`], [`Metrics::set_pools`] |
//! | `metallb_speaker_announced{ip,node,protocol,service}` | gauge (1) | [`Metrics::set_announced`] |
//! | `metallb_bgp_session_up{peer}` | gauge (0/1) | [`Metrics::set_bgp_session`], [`Metrics::set_bgp_peers`] |
//! | `metallb_bgp_announced_prefixes_total{peer}` | gauge | [`Metrics::set_bgp_peers`] |
//! | `metallb_bfd_session_up{peer}` | gauge (0/1) | [`Metrics::set_bfd_session`] |
//! | `ferry_membership_alive`, `_cluster_size`, `_quorum` | gauge | [`Metrics::set_membership`] |
//! | `ferry_membership_*_total` | counter | [`Metrics::set_member_stats`] |
//! | `ferry_l2_takeovers_total` | counter | [`Metrics::inc_takeover`] |
//! | `ferry_l2_*_total{interface}` | counter | [`Metrics::set_responder_counters`] |
//! | `ferry_ready` | gauge | [`Metrics::set_ready`] |
//! | `ferry_lb_controller_leader` | gauge | [`Metrics::set_leader`] (API mode) |
//!
//! MetalLB's two allocator gauges end in `_total` (as MetalLB names them); `promtool check
//! metrics` reports that as a lint warning, nothing else.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_l2::Counters;
use ferry_member::Stats;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// Content type of [`Metrics::encode`] (Prometheus text format 0.0.4).
pub const TEXT_CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
/// Content type of [`Metrics::encode_openmetrics`].
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long a loop may go without [`Metrics::heartbeat`] before `/healthz` fails.
pub const DEFAULT_LIVENESS_TIMEOUT: Duration = Duration::from_secs(60);

/// The protocol label of `metallb_speaker_announced` (ferry announces by ARP/NDP only).
const PROTOCOL_LAYER2: &str = "layer2";

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct PoolLabels {
    pool: String,
}

/// MetalLB's BGP label: the peer as `address:port`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
}

fn peer_label(peer: std::net::SocketAddr) -> PeerLabels {
    PeerLabels {
        peer: peer.to_string(),
    }
}

/// MetalLB's label set, in the order client_golang prints it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct AnnouncedLabels {
    ip: String,
    node: String,
    protocol: String,
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct InterfaceLabels {
    interface: String,
}

/// Counters that mirror a cumulative count kept elsewhere (a responder's [`Counters`], the
/// membership's [`Stats`]). Each update adds the growth since the previous snapshot; a snapshot
/// lower than the previous one means the source started over (a new responder), and then all of
/// it is new. The exported counter never goes down.
fn mirror(counter: &Counter, previous: u64, now: u64) {
    let delta = if now >= previous { now - previous } else { now };
    if delta > 0 {
        counter.inc_by(delta);
    }
}

fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Locks, going on with the data if another thread panicked while holding the lock: every
/// value here is written whole, so it is never half-updated.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One family per field of [`Counters`], labelled by interface.
#[derive(Default)]
struct ResponderFamilies {
    frames: Family<InterfaceLabels, Counter>,
    requests: Family<InterfaceLabels, Counter>,
    requests_owned: Family<InterfaceLabels, Counter>,
    replies: Family<InterfaceLabels, Counter>,
    announcements: Family<InterfaceLabels, Counter>,
    garbage: Family<InterfaceLabels, Counter>,
    ignored: Family<InterfaceLabels, Counter>,
    conflicts: Family<InterfaceLabels, Counter>,
    unleased: Family<InterfaceLabels, Counter>,
    errors: Family<InterfaceLabels, Counter>,
}

impl ResponderFamilies {
    fn register(&self, r: &mut Registry) {
        let all: [(&str, &str, &Family<InterfaceLabels, Counter>); 10] = [
            (
                "ferry_l2_frames",
                "ARP and IPv6 frames read by the layer-2 responder",
                &self.frames,
            ),
            (
                "ferry_l2_requests",
                "ARP requests and neighbour solicitations seen, for any address",
                &self.requests,
            ),
            (
                "ferry_l2_requests_owned",
                "ARP requests and neighbour solicitations for an address this node owns",
                &self.requests_owned,
            ),
            (
                "ferry_l2_replies",
                "ARP replies and neighbour advertisements sent in answer",
                &self.replies,
            ),
            (
                "ferry_l2_announcements",
                "Gratuitous ARPs and unsolicited neighbour advertisements sent",
                &self.announcements,
            ),
            (
                "ferry_l2_garbage",
                "Broken ARP or NDP frames (truncated, malformed, bad checksum)",
                &self.garbage,
            ),
            (
                "ferry_l2_ignored",
                "Frames the responder had no business with",
                &self.ignored,
            ),
            (
                "ferry_l2_conflicts",
                "Frames in which another MAC claims an address this node owns",
                &self.conflicts,
            ),
            (
                "ferry_l2_unleased",
                "Requests for an owned address left unanswered because the ownership lease had run out",
                &self.unleased,
            ),
            (
                "ferry_l2_errors",
                "Failed sends, receives and group joins of the responder",
                &self.errors,
            ),
        ];
        for (name, help, family) in all {
            r.register(name, help, family.clone());
        }
    }

    fn update(&self, labels: &InterfaceLabels, was: &Counters, now: &Counters) {
        let Counters {
            frames,
            requests,
            requests_owned,
            replies,
            announcements,
            garbage,
            ignored,
            conflicts,
            unleased,
            errors,
        } = *now;
        mirror(&self.frames.get_or_create(labels), was.frames, frames);
        mirror(&self.requests.get_or_create(labels), was.requests, requests);
        mirror(
            &self.requests_owned.get_or_create(labels),
            was.requests_owned,
            requests_owned,
        );
        mirror(&self.replies.get_or_create(labels), was.replies, replies);
        mirror(
            &self.announcements.get_or_create(labels),
            was.announcements,
            announcements,
        );
        mirror(&self.garbage.get_or_create(labels), was.garbage, garbage);
        mirror(&self.ignored.get_or_create(labels), was.ignored, ignored);
        mirror(
            &self.conflicts.get_or_create(labels),
            was.conflicts,
            conflicts,
        );
        mirror(&self.unleased.get_or_create(labels), was.unleased, unleased);
        mirror(&self.errors.get_or_create(labels), was.errors, errors);
    }

    fn remove(&self, labels: &InterfaceLabels) {
        for family in [
            &self.frames,
            &self.requests,
            &self.requests_owned,
            &self.replies,
            &self.announcements,
            &self.garbage,
            &self.ignored,
            &self.conflicts,
            &self.unleased,
            &self.errors,
        ] {
            family.remove(labels);
        }
    }
}

/// One counter per field of [`Stats`].
#[derive(Default)]
struct MemberCounters {
    datagrams_in: Counter,
    datagrams_out: Counter,
    garbage: Counter,
    rejected: Counter,
    heartbeats_in: Counter,
    internal_errors: Counter,
    restarts: Counter,
    renewals: Counter,
    send_errors: Counter,
}

impl MemberCounters {
    fn register(&self, r: &mut Registry) {
        let all: [(&str, &str, &Counter); 9] = [
            (
                "ferry_membership_datagrams_received",
                "Membership datagrams received",
                &self.datagrams_in,
            ),
            (
                "ferry_membership_datagrams_sent",
                "Membership datagrams sent",
                &self.datagrams_out,
            ),
            (
                "ferry_membership_garbage",
                "Datagrams on the membership port without ferry's envelope, dropped",
                &self.garbage,
            ),
            (
                "ferry_membership_rejected",
                "Membership datagrams the SWIM engine refused",
                &self.rejected,
            ),
            (
                "ferry_membership_heartbeats_received",
                "Membership heartbeats received",
                &self.heartbeats_in,
            ),
            (
                "ferry_membership_internal_errors",
                "Errors the SWIM engine returned from timers or announces",
                &self.internal_errors,
            ),
            (
                "ferry_membership_restarts",
                "Times this node started over after losing every member",
                &self.restarts,
            ),
            (
                "ferry_membership_renewals",
                "Times this node renewed its identity after the cluster declared it down",
                &self.renewals,
            ),
            (
                "ferry_membership_send_errors",
                "Membership datagrams the socket failed to send",
                &self.send_errors,
            ),
        ];
        for (name, help, counter) in all {
            r.register(name, help, counter.clone());
        }
    }

    fn update(&self, was: &Stats, now: &Stats) {
        let Stats {
            datagrams_in,
            datagrams_out,
            garbage,
            rejected,
            heartbeats_in,
            internal_errors,
            restarts,
            renewals,
            send_errors,
        } = *now;
        mirror(&self.datagrams_in, was.datagrams_in, datagrams_in);
        mirror(&self.datagrams_out, was.datagrams_out, datagrams_out);
        mirror(&self.garbage, was.garbage, garbage);
        mirror(&self.rejected, was.rejected, rejected);
        mirror(&self.heartbeats_in, was.heartbeats_in, heartbeats_in);
        mirror(&self.internal_errors, was.internal_errors, internal_errors);
        mirror(&self.restarts, was.restarts, restarts);
        mirror(&self.renewals, was.renewals, renewals);
        mirror(&self.send_errors, was.send_errors, send_errors);
    }
}

/// The agent's metrics and health. Share it as `Arc<Metrics>`; every method takes `&self`.
pub struct Metrics {
    registry: Registry,
    node: String,
    liveness_timeout: Duration,
    ready: AtomicBool,
    /// Per loop name: when it last called [`Metrics::heartbeat`].
    heartbeats: Mutex<HashMap<String, Instant>>,

    sync_duration: Histogram,
    sync_last_timestamp: Gauge<f64, AtomicU64>,
    sync_failures: Counter,
    service_changes: Counter,
    endpoint_changes: Counter,
    network_programming: Histogram,
    programmed_services: Gauge,
    programmed_endpoints: Gauge,

    pool_in_use: Family<PoolLabels, Gauge>,
    pool_total: Family<PoolLabels, Gauge>,
    pools: Mutex<BTreeSet<PoolLabels>>,
    announced: Family<AnnouncedLabels, Gauge>,
    announced_set: Mutex<BTreeSet<AnnouncedLabels>>,
    bgp_session_up: Family<PeerLabels, Gauge>,
    bgp_prefixes: Family<PeerLabels, Gauge>,
    bgp_peers: Mutex<BTreeSet<PeerLabels>>,
    bfd_session_up: Family<PeerLabels, Gauge>,

    membership_alive: Gauge,
    membership_cluster_size: Gauge,
    membership_quorum: Gauge,
    member_counters: MemberCounters,
    member_last: Mutex<Stats>,
    takeovers: Counter,

    responders: ResponderFamilies,
    responder_last: Mutex<HashMap<String, Counters>>,
    ready_gauge: Gauge,
    leader_gauge: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("node", &self.node)
            .field("ready", &self.is_ready())
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// Metrics of the agent on `node` (the `node` label of `metallb_speaker_announced`), with
    /// [`DEFAULT_LIVENESS_TIMEOUT`].
    pub fn new(node: &str) -> Metrics {
        Metrics::with_liveness_timeout(node, DEFAULT_LIVENESS_TIMEOUT)
    }

    /// As [`Metrics::new`]; `/healthz` fails once a loop's last heartbeat is older than
    /// `liveness_timeout`.
    pub fn with_liveness_timeout(node: &str, liveness_timeout: Duration) -> Metrics {
        let sync_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let network_programming = Histogram::new(network_programming_buckets());
        let mut m = Metrics {
            registry: Registry::default(),
            node: node.to_string(),
            liveness_timeout,
            ready: AtomicBool::new(false),
            heartbeats: Mutex::new(HashMap::new()),
            sync_duration,
            sync_last_timestamp: Gauge::default(),
            sync_failures: Counter::default(),
            service_changes: Counter::default(),
            endpoint_changes: Counter::default(),
            network_programming,
            programmed_services: Gauge::default(),
            programmed_endpoints: Gauge::default(),
            pool_in_use: Family::default(),
            pool_total: Family::default(),
            pools: Mutex::new(BTreeSet::new()),
            announced: Family::default(),
            announced_set: Mutex::new(BTreeSet::new()),
            bgp_session_up: Family::default(),
            bgp_prefixes: Family::default(),
            bgp_peers: Mutex::new(BTreeSet::new()),
            bfd_session_up: Family::default(),
            membership_alive: Gauge::default(),
            membership_cluster_size: Gauge::default(),
            membership_quorum: Gauge::default(),
            member_counters: MemberCounters::default(),
            member_last: Mutex::new(Stats::default()),
            takeovers: Counter::default(),
            responders: ResponderFamilies::default(),
            responder_last: Mutex::new(HashMap::new()),
            ready_gauge: Gauge::default(),
            leader_gauge: Gauge::default(),
        };
        m.register();
        m
    }

    fn register(&mut self) {
        let r = &mut self.registry;
        r.register_with_unit(
            "kubeproxy_sync_proxy_rules_duration",
            "SyncProxyRules latency in seconds: one plan and apply of the nftables ruleset",
            Unit::Seconds,
            self.sync_duration.clone(),
        );
        r.register_with_unit(
            "kubeproxy_sync_proxy_rules_last_timestamp",
            "The last time proxy rules were successfully synced",
            Unit::Seconds,
            self.sync_last_timestamp.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            self.service_changes.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            self.endpoint_changes.clone(),
        );
        r.register_with_unit(
            "kubeproxy_network_programming_duration",
            "In Cluster Network Programming Latency in seconds: from a change seen to its rules in the kernel",
            Unit::Seconds,
            self.network_programming.clone(),
        );
        r.register(
            "ferry_sync_failures",
            "Syncs of the nftables ruleset that failed",
            self.sync_failures.clone(),
        );
        r.register(
            "ferry_programmed_services",
            "Services in the ruleset last applied to the kernel",
            self.programmed_services.clone(),
        );
        r.register(
            "ferry_programmed_endpoints",
            "Endpoints in the ruleset last applied to the kernel",
            self.programmed_endpoints.clone(),
        );
        r.register(
            "metallb_allocator_addresses_in_use_total",
            "Number of IP addresses in use, per pool",
            self.pool_in_use.clone(),
        );
        r.register(
            "metallb_allocator_addresses_total",
            "Number of usable IP addresses, per pool",
            self.pool_total.clone(),
        );
        r.register(
            "metallb_speaker_announced",
            "Services being announced from this node. This is desired state, it does not guarantee that the routing protocols have converged",
            self.announced.clone(),
        );
        r.register(
            "metallb_bgp_session_up",
            "BGP session state (1 is up, 0 is down)",
            self.bgp_session_up.clone(),
        );
        r.register(
            "metallb_bfd_session_up",
            "BFD session state (1 is up, 0 is down)",
            self.bfd_session_up.clone(),
        );
        r.register(
            "metallb_bgp_announced_prefixes_total",
            "Number of prefixes currently being advertised on the BGP session",
            self.bgp_prefixes.clone(),
        );
        r.register(
            "ferry_membership_alive",
            "Members this node sees alive, itself included",
            self.membership_alive.clone(),
        );
        r.register(
            "ferry_membership_cluster_size",
            "Nodes the cluster is configured with",
            self.membership_cluster_size.clone(),
        );
        r.register(
            "ferry_membership_quorum",
            "1 when this node sees a quorum of the cluster alive, else 0",
            self.membership_quorum.clone(),
        );
        self.member_counters.register(r);
        r.register(
            "ferry_l2_takeovers",
            "Times this node took over announcing an address",
            self.takeovers.clone(),
        );
        self.responders.register(r);
        r.register(
            "ferry_ready",
            "1 once the first full sync is in the kernel, else 0",
            self.ready_gauge.clone(),
        );
        r.register(
            "ferry_lb_controller_leader",
            "1 while this agent holds the load-balancer controller's Lease, else 0",
            self.leader_gauge.clone(),
        );
    }

    /// One sync (plan and apply) took `duration`; `ok` when it reached the kernel.
    pub fn observe_sync(&self, duration: Duration, ok: bool) {
        self.sync_duration.observe(duration.as_secs_f64());
        if ok {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            self.sync_last_timestamp.set(now);
        } else {
            self.sync_failures.inc();
        }
    }

    /// `services` Service and `endpoints` EndpointSlice changes were taken in.
    pub fn add_changes(&self, services: u64, endpoints: u64) {
        self.service_changes.inc_by(services);
        self.endpoint_changes.inc_by(endpoints);
    }

    /// A change seen `latency` ago is now in the kernel.
    pub fn observe_network_programming(&self, latency: Duration) {
        self.network_programming.observe(latency.as_secs_f64());
    }

    /// The ruleset now in the kernel has `services` services and `endpoints` endpoints.
    pub fn set_programmed(&self, services: u64, endpoints: u64) {
        self.programmed_services.set(gauge_value(services));
        self.programmed_endpoints.set(gauge_value(endpoints));
    }

    /// Every pool as `(name, in_use, total)`: pools not listed are removed.
    pub fn set_pools<I, S>(&self, pools: I)
    where
        I: IntoIterator<Item = (S, u64, u64)>,
        S: Into<String>,
    {
        let mut known = lock(&self.pools);
        let mut now = BTreeSet::new();
        for (pool, in_use, total) in pools {
            let labels = PoolLabels { pool: pool.into() };
            self.pool_in_use
                .get_or_create(&labels)
                .set(gauge_value(in_use));
            self.pool_total
                .get_or_create(&labels)
                .set(gauge_value(total));
            now.insert(labels);
        }
        for gone in known.difference(&now) {
            self.pool_in_use.remove(gone);
            self.pool_total.remove(gone);
        }
        *known = now;
    }

    /// The addresses this node announces now, each with its service (`namespace/name`):
    /// replaces the previous set (addresses no longer announced vanish from the output).
    pub fn set_announced<I, S>(&self, announced: I)
    where
        I: IntoIterator<Item = (IpAddr, S)>,
        S: Into<String>,
    {
        let mut known = lock(&self.announced_set);
        let mut now = BTreeSet::new();
        for (ip, service) in announced {
            let labels = AnnouncedLabels {
                ip: ip.to_string(),
                node: self.node.clone(),
                protocol: PROTOCOL_LAYER2.to_string(),
                service: service.into(),
            };
            self.announced.get_or_create(&labels).set(1);
            now.insert(labels);
        }
        for gone in known.difference(&now) {
            self.announced.remove(gone);
        }
        *known = now;
    }

    /// The BGP peers now, each with the number of prefixes announced to it: replaces the
    /// previous set (peers gone vanish; a new peer's session counts as down until
    /// [`Metrics::set_bgp_session`]).
    pub fn set_bgp_peers(&self, peers: impl IntoIterator<Item = (std::net::SocketAddr, usize)>) {
        let mut known = lock(&self.bgp_peers);
        let mut now = BTreeSet::new();
        for (peer, prefixes) in peers {
            let labels = peer_label(peer);
            self.bgp_prefixes
                .get_or_create(&labels)
                .set(gauge_value(prefixes as u64));
            if !known.contains(&labels) {
                self.bgp_session_up.get_or_create(&labels).set(0);
            }
            now.insert(labels);
        }
        for gone in known.difference(&now) {
            self.bgp_prefixes.remove(gone);
            self.bgp_session_up.remove(gone);
        }
        *known = now;
    }

    /// A BGP session came up or went down (peers not in [`Metrics::set_bgp_peers`]'s set are
    /// ignored).
    pub fn set_bgp_session(&self, peer: std::net::SocketAddr, up: bool) {
        let labels = peer_label(peer);
        if lock(&self.bgp_peers).contains(&labels) {
            self.bgp_session_up
                .get_or_create(&labels)
                .set(i64::from(up));
        }
    }

    /// A BFD session's state (its peer as an address, as MetalLB labels it): up, down, or
    /// gone (None: the session no longer runs).
    pub fn set_bfd_session(&self, peer: std::net::IpAddr, up: Option<bool>) {
        let labels = PeerLabels {
            peer: peer.to_string(),
        };
        if let Some(up) = up {
            self.bfd_session_up
                .get_or_create(&labels)
                .set(i64::from(up));
        } else {
            self.bfd_session_up.remove(&labels);
        }
    }

    /// The membership view: `alive` members (this node included) of `cluster_size`, and
    /// whether that is a quorum.
    pub fn set_membership(&self, alive: usize, cluster_size: usize, quorum: bool) {
        self.membership_alive.set(gauge_value(alive as u64));
        self.membership_cluster_size
            .set(gauge_value(cluster_size as u64));
        self.membership_quorum.set(i64::from(quorum));
    }

    /// This node took over announcing an address (failover to it, or a hand-over).
    pub fn inc_takeover(&self) {
        self.takeovers.inc();
    }

    /// The latest counters of the membership (`Membership::stats()`).
    pub fn set_member_stats(&self, stats: Stats) {
        let mut last = lock(&self.member_last);
        self.member_counters.update(&last, &stats);
        *last = stats;
    }

    /// The latest counters of the responder on `iface` (`Responder::counters()`).
    pub fn set_responder_counters(&self, iface: &str, counters: Counters) {
        let labels = InterfaceLabels {
            interface: iface.to_string(),
        };
        let mut last = lock(&self.responder_last);
        let was = last.get(iface).copied().unwrap_or_default();
        self.responders.update(&labels, &was, &counters);
        last.insert(iface.to_string(), counters);
    }

    /// The responder on `iface` is gone for good: its series vanish.
    pub fn remove_responder(&self, iface: &str) {
        let labels = InterfaceLabels {
            interface: iface.to_string(),
        };
        lock(&self.responder_last).remove(iface);
        self.responders.remove(&labels);
    }

    /// The first full sync is in the kernel: `/readyz` answers 200 from now on.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
        self.ready_gauge.set(1);
    }

    /// Whether this agent leads the load-balancer controller.
    pub fn set_leader(&self, leading: bool) {
        self.leader_gauge.set(i64::from(leading));
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Loop `name` is alive. Each loop that calls this once must go on calling it more often
    /// than the liveness timeout, or `/healthz` fails.
    pub fn heartbeat(&self, name: &str) {
        let now = Instant::now();
        let mut beats = lock(&self.heartbeats);
        match beats.get_mut(name) {
            Some(at) => *at = now,
            None => {
                beats.insert(name.to_string(), now);
            }
        }
    }

    /// The loops whose last heartbeat is older than the liveness timeout, with that age,
    /// sorted by name. Empty: healthy.
    pub fn stale_loops(&self) -> Vec<(String, Duration)> {
        let now = Instant::now();
        let mut stale: Vec<(String, Duration)> = lock(&self.heartbeats)
            .iter()
            .map(|(name, at)| (name.clone(), now.saturating_duration_since(*at)))
            .filter(|(_, age)| *age > self.liveness_timeout)
            .collect();
        stale.sort();
        stale
    }

    /// Everything, in the Prometheus text format (version 0.0.4, [`TEXT_CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String fails only if an encoder does: none of ours does.
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            out.push_str(&format!("# encoding failed: {e}\n"));
        }
        out
    }

    /// Everything, in OpenMetrics 1.0 ([`OPENMETRICS_CONTENT_TYPE`]).
    pub fn encode_openmetrics(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            out.push_str(&format!("# encoding failed: {e}\n"));
        }
        out
    }
}

/// kube-proxy's buckets: 0.25 s, 0.5 s, then each second to 59 s, every 5 s to 115 s, every
/// 30 s to 5 min.
fn network_programming_buckets() -> Vec<f64> {
    let mut b = vec![0.25, 0.5];
    b.extend((1..=59).map(f64::from));
    b.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    b.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample line that starts with `series` (name and labels, exactly).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
    }

    fn series_of<'a>(text: &'a str, metric: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                l.strip_prefix(metric)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            })
            .collect()
    }

    #[test]
    fn sync_observations_fill_histogram_timestamp_and_failures() {
        let m = Metrics::new("n1");
        m.observe_sync(Duration::from_millis(3), true);
        m.observe_sync(Duration::from_millis(100), false);
        let text = m.encode();
        let count = "kubeproxy_sync_proxy_rules_duration_seconds_count";
        assert_eq!(sample(&text, count), Some(2.0), "{text}");
        let sum = sample(&text, "kubeproxy_sync_proxy_rules_duration_seconds_sum").unwrap();
        assert!((sum - 0.103).abs() < 1e-9, "{sum}");
        // 3 ms falls in the 4 ms bucket, 100 ms in the 128 ms one.
        let le = |b: &str| {
            sample(
                &text,
                &format!("kubeproxy_sync_proxy_rules_duration_seconds_bucket{{le=\"{b}\"}}"),
            )
        };
        assert_eq!(le("0.002"), Some(0.0));
        assert_eq!(le("0.004"), Some(1.0));
        assert_eq!(le("0.064"), Some(1.0));
        assert_eq!(le("0.128"), Some(2.0));
        assert_eq!(le("+Inf"), Some(2.0));
        assert_eq!(sample(&text, "ferry_sync_failures_total"), Some(1.0));
        let last = sample(&text, "kubeproxy_sync_proxy_rules_last_timestamp_seconds").unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!((now - last).abs() < 60.0, "last sync {last}, now {now}");
    }

    #[test]
    fn failed_sync_leaves_last_timestamp_alone() {
        let m = Metrics::new("n1");
        m.observe_sync(Duration::from_millis(1), false);
        let text = m.encode();
        assert_eq!(
            sample(&text, "kubeproxy_sync_proxy_rules_last_timestamp_seconds"),
            Some(0.0)
        );
    }

    #[test]
    fn network_programming_buckets_match_kube_proxy() {
        let b = network_programming_buckets();
        assert_eq!(b.len(), 2 + 59 + 12 + 7);
        assert!(b.windows(2).all(|w| w[0] < w[1]), "{b:?}");
        assert_eq!(b[..3], [0.25, 0.5, 1.0]);
        assert_eq!(b.last(), Some(&300.0));
        let m = Metrics::new("n1");
        m.observe_network_programming(Duration::from_millis(1500));
        let text = m.encode();
        let le = |b: &str| {
            sample(
                &text,
                &format!("kubeproxy_network_programming_duration_seconds_bucket{{le=\"{b}\"}}"),
            )
        };
        assert_eq!(le("1"), Some(0.0), "{text}");
        assert_eq!(le("2"), Some(1.0));
    }

    #[test]
    fn changes_and_programmed_counts() {
        let m = Metrics::new("n1");
        m.add_changes(2, 5);
        m.add_changes(1, 0);
        m.set_programmed(7, 12);
        m.set_programmed(6, 11);
        let text = m.encode();
        assert_eq!(
            sample(&text, "kubeproxy_sync_proxy_rules_service_changes_total"),
            Some(3.0)
        );
        assert_eq!(
            sample(&text, "kubeproxy_sync_proxy_rules_endpoint_changes_total"),
            Some(5.0)
        );
        assert_eq!(sample(&text, "ferry_programmed_services"), Some(6.0));
        assert_eq!(sample(&text, "ferry_programmed_endpoints"), Some(11.0));
    }

    #[test]
    fn pools_are_replaced_whole() {
        let m = Metrics::new("n1");
        m.set_pools([("a", 1, 8), ("b", 2, 4)]);
        m.set_pools([("a", 3, 8), ("b", 2, 4)]);
        let text = m.encode();
        let in_use = "metallb_allocator_addresses_in_use_total";
        assert_eq!(sample(&text, &format!("{in_use}{{pool=\"a\"}}")), Some(3.0));
        assert_eq!(sample(&text, &format!("{in_use}{{pool=\"b\"}}")), Some(2.0));
        assert_eq!(
            sample(&text, "metallb_allocator_addresses_total{pool=\"a\"}"),
            Some(8.0)
        );

        m.set_pools([("b", 0, 4), ("c", 1, 256)]);
        let text = m.encode();
        assert_eq!(series_of(&text, in_use).len(), 2, "{text}");
        assert_eq!(sample(&text, &format!("{in_use}{{pool=\"a\"}}")), None);
        assert_eq!(sample(&text, &format!("{in_use}{{pool=\"b\"}}")), Some(0.0));
        assert_eq!(
            sample(&text, "metallb_allocator_addresses_total{pool=\"c\"}"),
            Some(256.0)
        );
        assert_eq!(
            series_of(&text, "metallb_allocator_addresses_total").len(),
            2
        );
    }

    #[test]
    fn announced_set_replaces_and_stale_labels_vanish() {
        let m = Metrics::new("node-1");
        let a: IpAddr = "192.0.2.10".parse().unwrap();
        let b: IpAddr = "2001:db8::10".parse().unwrap();
        let c: IpAddr = "192.0.2.11".parse().unwrap();
        m.set_announced(vec![
            (a, "default/web".to_string()),
            (b, "default/web".to_string()),
        ]);
        let text = m.encode();
        let series = |ip: &str, svc: &str| {
            format!(
                "metallb_speaker_announced{{ip=\"{ip}\",node=\"node-1\",protocol=\"layer2\",service=\"{svc}\"}}"
            )
        };
        assert_eq!(
            sample(&text, &series("192.0.2.10", "default/web")),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(&text, &series("2001:db8::10", "default/web")),
            Some(1.0)
        );

        m.set_announced(vec![(b, "default/web"), (c, "kube-system/dns")]);
        let text = m.encode();
        assert_eq!(
            sample(&text, &series("192.0.2.10", "default/web")),
            None,
            "{text}"
        );
        assert_eq!(
            sample(&text, &series("2001:db8::10", "default/web")),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, &series("192.0.2.11", "kube-system/dns")),
            Some(1.0)
        );
        assert_eq!(series_of(&text, "metallb_speaker_announced").len(), 2);

        m.set_announced(Vec::<(IpAddr, String)>::new());
        assert!(series_of(&m.encode(), "metallb_speaker_announced").is_empty());
    }

    #[test]
    fn bgp_peers_and_sessions() {
        let m = Metrics::new("node-1");
        let a: std::net::SocketAddr = "10.97.0.1:179".parse().unwrap();
        let b: std::net::SocketAddr = "[fd00::1]:1179".parse().unwrap();
        m.set_bgp_peers([(a, 2), (b, 0)]);
        m.set_bgp_session(a, true);
        let text = m.encode();
        let up = |p: &str| format!("metallb_bgp_session_up{{peer=\"{p}\"}}");
        let pfx = |p: &str| format!("metallb_bgp_announced_prefixes_total{{peer=\"{p}\"}}");
        assert_eq!(sample(&text, &up("10.97.0.1:179")), Some(1.0), "{text}");
        assert_eq!(sample(&text, &up("[fd00::1]:1179")), Some(0.0), "{text}");
        assert_eq!(sample(&text, &pfx("10.97.0.1:179")), Some(2.0), "{text}");
        // A peer gone vanishes; an unknown one is not created.
        m.set_bgp_peers([(a, 1)]);
        m.set_bgp_session(b, true);
        let text = m.encode();
        assert_eq!(sample(&text, &up("[fd00::1]:1179")), None, "{text}");
        assert_eq!(sample(&text, &up("10.97.0.1:179")), Some(1.0), "{text}");
        assert_eq!(sample(&text, &pfx("10.97.0.1:179")), Some(1.0), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new("n\"1");
        m.set_announced([("192.0.2.1".parse::<IpAddr>().unwrap(), "a\\b\nc")]);
        let text = m.encode();
        assert!(
            text.contains(r#"node="n\"1""#) && text.contains(r#"service="a\\b\nc""#),
            "{text}"
        );
    }

    #[test]
    fn membership_view_and_takeovers() {
        let m = Metrics::new("n1");
        m.set_membership(2, 3, true);
        m.inc_takeover();
        m.inc_takeover();
        let text = m.encode();
        assert_eq!(sample(&text, "ferry_membership_alive"), Some(2.0));
        assert_eq!(sample(&text, "ferry_membership_cluster_size"), Some(3.0));
        assert_eq!(sample(&text, "ferry_membership_quorum"), Some(1.0));
        assert_eq!(sample(&text, "ferry_l2_takeovers_total"), Some(2.0));
        m.set_membership(1, 3, false);
        assert_eq!(sample(&m.encode(), "ferry_membership_quorum"), Some(0.0));
    }

    #[test]
    fn member_stats_are_mirrored_and_never_go_down() {
        let m = Metrics::new("n1");
        let s = Stats {
            datagrams_in: 10,
            datagrams_out: 20,
            garbage: 1,
            rejected: 2,
            heartbeats_in: 3,
            internal_errors: 4,
            restarts: 5,
            renewals: 6,
            send_errors: 7,
        };
        m.set_member_stats(s);
        let text = m.encode();
        for (name, v) in [
            ("datagrams_received", 10.0),
            ("datagrams_sent", 20.0),
            ("garbage", 1.0),
            ("rejected", 2.0),
            ("heartbeats_received", 3.0),
            ("internal_errors", 4.0),
            ("restarts", 5.0),
            ("renewals", 6.0),
            ("send_errors", 7.0),
        ] {
            let series = format!("ferry_membership_{name}_total");
            assert_eq!(sample(&text, &series), Some(v), "{series}\n{text}");
        }
        m.set_member_stats(Stats {
            datagrams_in: 15,
            ..s
        });
        assert_eq!(
            sample(&m.encode(), "ferry_membership_datagrams_received_total"),
            Some(15.0)
        );
        // A membership that started over counts from 0 again: the exported counter goes on.
        m.set_member_stats(Stats {
            datagrams_in: 2,
            ..s
        });
        let text = m.encode();
        assert_eq!(
            sample(&text, "ferry_membership_datagrams_received_total"),
            Some(17.0)
        );
        assert_eq!(
            sample(&text, "ferry_membership_datagrams_sent_total"),
            Some(20.0)
        );
    }

    #[test]
    fn responder_counters_per_interface() {
        let m = Metrics::new("n1");
        let c = Counters {
            frames: 100,
            requests: 40,
            requests_owned: 10,
            replies: 9,
            announcements: 5,
            garbage: 1,
            ignored: 50,
            conflicts: 2,
            unleased: 4,
            errors: 3,
        };
        m.set_responder_counters("eth0", c);
        m.set_responder_counters(
            "eth1",
            Counters {
                frames: 7,
                ..Counters::default()
            },
        );
        let text = m.encode();
        let s = |name: &str, iface: &str| {
            sample(
                &text,
                &format!("ferry_l2_{name}_total{{interface=\"{iface}\"}}"),
            )
        };
        assert_eq!(s("frames", "eth0"), Some(100.0), "{text}");
        assert_eq!(s("requests", "eth0"), Some(40.0));
        assert_eq!(s("requests_owned", "eth0"), Some(10.0));
        assert_eq!(s("replies", "eth0"), Some(9.0));
        assert_eq!(s("announcements", "eth0"), Some(5.0));
        assert_eq!(s("garbage", "eth0"), Some(1.0));
        assert_eq!(s("ignored", "eth0"), Some(50.0));
        assert_eq!(s("conflicts", "eth0"), Some(2.0));
        assert_eq!(s("unleased", "eth0"), Some(4.0));
        assert_eq!(s("errors", "eth0"), Some(3.0));
        assert_eq!(s("frames", "eth1"), Some(7.0));
        assert_eq!(s("replies", "eth1"), Some(0.0));

        m.set_responder_counters("eth0", Counters { frames: 130, ..c });
        assert_eq!(
            sample(&m.encode(), "ferry_l2_frames_total{interface=\"eth0\"}"),
            Some(130.0)
        );

        m.remove_responder("eth0");
        let text = m.encode();
        assert!(!text.contains("interface=\"eth0\""), "{text}");
        assert!(text.contains("interface=\"eth1\""));
        // A new responder on eth0 starts from its own zero.
        m.set_responder_counters(
            "eth0",
            Counters {
                frames: 4,
                ..Counters::default()
            },
        );
        assert_eq!(
            sample(&m.encode(), "ferry_l2_frames_total{interface=\"eth0\"}"),
            Some(4.0)
        );
    }

    #[test]
    fn readiness_starts_false() {
        let m = Metrics::new("n1");
        assert!(!m.is_ready());
        assert_eq!(sample(&m.encode(), "ferry_ready"), Some(0.0));
        m.set_ready();
        assert!(m.is_ready());
        assert_eq!(sample(&m.encode(), "ferry_ready"), Some(1.0));
    }

    #[test]
    fn heartbeats_go_stale_per_loop() {
        let m = Metrics::with_liveness_timeout("n1", Duration::from_millis(300));
        assert!(m.stale_loops().is_empty(), "no loop registered: healthy");
        m.heartbeat("sync");
        m.heartbeat("l2");
        assert!(m.stale_loops().is_empty());
        std::thread::sleep(Duration::from_millis(400));
        m.heartbeat("l2");
        let stale = m.stale_loops();
        assert_eq!(stale.len(), 1, "{stale:?}");
        assert_eq!(stale[0].0, "sync");
        assert!(stale[0].1 >= Duration::from_millis(300));
        m.heartbeat("sync");
        assert!(m.stale_loops().is_empty());
    }

    #[test]
    fn openmetrics_output_ends_with_eof() {
        let m = Metrics::new("n1");
        m.inc_takeover();
        let text = m.encode_openmetrics();
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            text.contains("# TYPE ferry_l2_takeovers counter\n"),
            "{text}"
        );
        assert!(text.contains("\nferry_l2_takeovers_total 1\n"), "{text}");
        assert!(!m.encode().contains("# EOF"));
    }

    #[test]
    fn metrics_are_shared_across_threads() {
        let m = std::sync::Arc::new(Metrics::new("n1"));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..250 {
                        m.inc_takeover();
                        m.observe_sync(Duration::from_millis(1), true);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let text = m.encode();
        assert_eq!(sample(&text, "ferry_l2_takeovers_total"), Some(1000.0));
        assert_eq!(
            sample(&text, "kubeproxy_sync_proxy_rules_duration_seconds_count"),
            Some(1000.0)
        );
    }
}
