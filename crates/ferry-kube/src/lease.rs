//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go does it.
//!
//! kube-runtime has no leader election, and the crates that add one either still use kube 4
//! or take the lock with server-side apply conflicts; client-go's algorithm needs only GET and
//! a PUT carrying the resourceVersion read (two candidates racing: one gets 409 Conflict), so
//! it is written here: the decision is pure ([`Elector`], time passed in), the loop
//! ([`run`]) is the edge.
//!
//! - A candidate takes the Lease when it is free (no holder) or when the record it last saw
//!   has not changed for the lease duration *by its own clock* (the holder's clock is never
//!   compared with ours: client-go's observedTime).
//! - The leader renews every retry period, and stops acting as leader when it has not renewed
//!   for the renew deadline (10 s by default), before any other candidate can take over
//!   (15 s after it last saw the record change): never two leaders, whatever the timing.
//! - On shutdown the leader releases the Lease (no holder), so another takes it at once.
//!
//! The holder identity is the node name, so `kubectl get lease -n ferry-system` shows which
//! node runs the controller.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

/// client-go's (and kube-vip's) defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    pub lease: Duration,
    pub renew_deadline: Duration,
    pub retry: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            lease: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
}

/// What to do with the Lease now.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// It does not exist: create it, held by us.
    Create(LeaseSpec),
    /// Write this spec (renew ours, or take a free or expired one).
    Update(LeaseSpec),
    /// Someone else holds it and it has not expired: try again later.
    Wait { holder: String },
}

/// The election's state for one candidate (pure: instants and wall time are passed in).
#[derive(Debug, Clone)]
pub struct Elector {
    identity: String,
    timings: Timings,
    /// The record last seen (resourceVersion and spec) and when we first saw it so.
    observed: Option<(Record, Instant)>,
    /// When we last wrote the Lease as its holder.
    renewed_at: Option<Instant>,
}

/// A Lease as observed: every write changes its resourceVersion, even one that leaves the
/// spec as it was (a clock that did not move).
type Record = (Option<String>, LeaseSpec);

fn record_of(l: &Lease) -> Record {
    (
        l.metadata.resource_version.clone(),
        l.spec.clone().unwrap_or_default(),
    )
}

impl Elector {
    pub fn new(identity: impl Into<String>, timings: Timings) -> Self {
        Elector {
            identity: identity.into(),
            timings,
            observed: None,
            renewed_at: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn timings(&self) -> Timings {
        self.timings
    }

    /// Until when we may act as leader (None: we are not the leader).
    pub fn leader_until(&self) -> Option<Instant> {
        self.renewed_at.map(|t| t + self.timings.renew_deadline)
    }

    pub fn is_leader(&self, now: Instant) -> bool {
        self.leader_until().is_some_and(|until| now < until)
    }

    /// The Lease as read now (None: it does not exist), and what to do about it. `wall` is
    /// the wall-clock time written into the record.
    pub fn step(&mut self, current: Option<&Lease>, now: Instant, wall: Timestamp) -> Step {
        let Some(lease) = current else {
            self.observed = None;
            return Step::Create(self.record(None, wall));
        };
        let rec = record_of(lease);
        match &self.observed {
            Some((seen, _)) if *seen == rec => {}
            _ => self.observed = Some((rec, now)),
        }
        let cur = lease.spec.as_ref().unwrap_or(&EMPTY);
        let holder = cur.holder_identity.clone().unwrap_or_default();
        if holder.is_empty() || holder == self.identity {
            return Step::Update(self.record(Some(cur), wall));
        }
        // Someone else's: expired only when unchanged for its duration by our clock.
        let duration = cur
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs)
            .unwrap_or(self.timings.lease);
        let seen_at = self.observed.as_ref().map_or(now, |(_, t)| *t);
        if now.saturating_duration_since(seen_at) >= duration {
            Step::Update(self.record(Some(cur), wall))
        } else {
            // Not ours: whatever we held has been taken.
            self.renewed_at = None;
            Step::Wait { holder }
        }
    }

    /// The write of the last step succeeded at `now` (an instant taken *before* the write was
    /// sent, so the deadline errs early); `written` is the Lease the server returned.
    pub fn written(&mut self, written: &Lease, now: Instant) {
        self.renewed_at = Some(now);
        self.observed = Some((record_of(written), now));
    }

    /// The write failed (conflict, API server away): keep leading only until the deadline.
    pub fn write_failed(&mut self) {
        self.observed = None;
    }

    /// The record to write for us as holder.
    fn record(&self, cur: Option<&LeaseSpec>, wall: Timestamp) -> LeaseSpec {
        let ours = cur.is_some_and(|c| c.holder_identity.as_deref() == Some(&self.identity));
        let transitions = cur.and_then(|c| c.lease_transitions).unwrap_or(0);
        let now = MicroTime(wall);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.timings.lease.as_secs() as i32),
            acquire_time: if ours {
                cur.and_then(|c| c.acquire_time.clone())
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(if ours || cur.is_none() {
                transitions
            } else {
                transitions + 1
            }),
            ..LeaseSpec::default()
        }
    }

    /// The record that gives the Lease up (client-go's ReleaseOnCancel).
    pub fn release(&self, cur: &LeaseSpec, wall: Timestamp) -> Option<LeaseSpec> {
        if cur.holder_identity.as_deref() != Some(&self.identity) {
            return None;
        }
        Some(LeaseSpec {
            holder_identity: None,
            lease_duration_seconds: Some(1),
            renew_time: Some(MicroTime(wall)),
            ..cur.clone()
        })
    }
}

static EMPTY: LeaseSpec = LeaseSpec {
    acquire_time: None,
    holder_identity: None,
    lease_duration_seconds: None,
    lease_transitions: None,
    preferred_holder: None,
    renew_time: None,
    strategy: None,
};

/// The leader's deadline as it changes: `Some(until)` while this candidate leads.
pub type Leadership = watch::Receiver<Option<Instant>>;

/// Runs the election until `stop` fires, then releases the Lease if held. The Lease
/// `namespace/name` is created when missing (the namespace is not). `log` gets a line when
/// leadership changes and on errors.
pub async fn run(
    api: Api<Lease>,
    name: String,
    mut elector: Elector,
    leader: watch::Sender<Option<Instant>>,
    mut stop: watch::Receiver<bool>,
    log: impl Fn(String),
) {
    let retry = elector.timings().retry;
    let mut last_error: Option<String> = None;
    let mut last_holder: Option<String> = None;
    loop {
        let now = Instant::now();
        let wall = Timestamp::now();
        let result = async {
            let current = api.get_opt(&name).await?;
            let step = elector.step(current.as_ref(), now, wall);
            match step {
                Step::Wait { holder } => Ok::<_, kube::Error>(Some(holder)),
                Step::Create(spec) => {
                    let lease = Lease {
                        metadata: ObjectMeta {
                            name: Some(name.clone()),
                            ..ObjectMeta::default()
                        },
                        spec: Some(spec.clone()),
                    };
                    let written = api.create(&PostParams::default(), &lease).await?;
                    elector.written(&written, now);
                    Ok(Some(elector.identity().to_string()))
                }
                Step::Update(spec) => {
                    let mut lease = current.unwrap_or_default();
                    lease.spec = Some(spec);
                    let written = api.replace(&name, &PostParams::default(), &lease).await?;
                    elector.written(&written, now);
                    Ok(Some(elector.identity().to_string()))
                }
            }
        }
        .await;
        match result {
            Ok(holder) => {
                if last_error.take().is_some() {
                    log(format!("lease {name}: reachable again"));
                }
                if holder != last_holder {
                    if holder.as_deref() == Some(elector.identity()) {
                        log(format!(
                            "lease {name}: this node leads the load-balancer controller"
                        ));
                    } else if let Some(h) = &holder {
                        log(format!(
                            "lease {name}: the load-balancer controller runs on {h}"
                        ));
                    }
                    last_holder = holder;
                }
            }
            Err(e) => {
                elector.write_failed();
                let msg = match &e {
                    kube::Error::Api(s) if s.code == 409 => {
                        "another candidate wrote it first".to_string()
                    }
                    kube::Error::Api(s) if s.code == 404 && s.message.contains("namespace") => {
                        format!(
                            "{} (the agent never creates its namespace: deploy/ferry.yaml does)",
                            s.message
                        )
                    }
                    kube::Error::Api(s) => format!("{} ({} {})", s.message, s.code, s.reason),
                    e => e.to_string(),
                };
                if last_error.as_deref() != Some(&msg) {
                    log(format!("lease {name}: {msg} (retrying every {retry:?})"));
                    last_error = Some(msg);
                }
            }
        }
        let until = elector.leader_until().filter(|u| *u > Instant::now());
        leader.send_if_modified(|v| {
            let changed = *v != until;
            *v = until;
            changed
        });
        // Wake for the next attempt, when leadership would lapse, or to stop.
        let next = Instant::now() + retry;
        let wake = until.map_or(next, |u| u.min(next));
        tokio::select! {
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            break;
        }
    }
    leader.send_replace(None);
    if elector.is_leader(Instant::now()) {
        if let Ok(Some(mut lease)) = api.get_opt(&name).await {
            if let Some(spec) = lease
                .spec
                .as_ref()
                .and_then(|s| elector.release(s, Timestamp::now()))
            {
                lease.spec = Some(spec);
                if api
                    .replace(&name, &PostParams::default(), &lease)
                    .await
                    .is_ok()
                {
                    log(format!("lease {name}: released"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wall(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    /// The API server's side: the Lease and its resourceVersion.
    #[derive(Default)]
    struct Store {
        lease: Option<Lease>,
        rv: u64,
    }

    impl Store {
        fn write(&mut self, spec: LeaseSpec) -> Lease {
            self.rv += 1;
            let l = Lease {
                metadata: ObjectMeta {
                    resource_version: Some(self.rv.to_string()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec),
            };
            self.lease = Some(l.clone());
            l
        }

        /// One step of `e` at `now`, its write landing; whether it wrote.
        fn step(&mut self, e: &mut Elector, now: Instant, w: Timestamp) -> bool {
            match e.step(self.lease.as_ref(), now, w) {
                Step::Create(s) | Step::Update(s) => {
                    let l = self.write(s);
                    e.written(&l, now);
                    true
                }
                Step::Wait { .. } => false,
            }
        }
    }

    fn spec(s: &Store) -> LeaseSpec {
        s.lease.as_ref().unwrap().spec.clone().unwrap()
    }

    #[test]
    fn first_candidate_creates_then_renews() {
        let t0 = Instant::now();
        let mut st = Store::default();
        let mut a = Elector::new("a", Timings::default());
        assert!(matches!(a.step(None, t0, wall(0)), Step::Create(_)));
        assert!(!a.is_leader(t0), "not before the write succeeded");
        assert!(st.step(&mut a, t0, wall(0)));
        let first = spec(&st);
        assert_eq!(first.holder_identity.as_deref(), Some("a"));
        assert!(a.is_leader(t0 + Duration::from_secs(9)));
        assert!(!a.is_leader(t0 + Duration::from_secs(10)), "renew deadline");
        assert!(st.step(&mut a, t0 + Duration::from_secs(2), wall(2)));
        let renewed = spec(&st);
        assert_eq!(
            renewed.acquire_time, first.acquire_time,
            "acquire time kept"
        );
        assert_ne!(renewed.renew_time, first.renew_time);
        assert_eq!(renewed.lease_transitions, Some(0));
    }

    #[test]
    fn others_wait_for_expiry_by_their_own_clock() {
        let t0 = Instant::now();
        let mut st = Store::default();
        let mut a = Elector::new("a", Timings::default());
        st.step(&mut a, t0, wall(0));
        let first = spec(&st);
        let mut b = Elector::new("b", Timings::default());
        // b first sees the record late; the holder's clock (wall) says it is ancient.
        let seen = t0 + Duration::from_secs(5);
        assert!(!st.step(&mut b, seen, wall(1000)));
        assert!(!st.step(&mut b, seen + Duration::from_secs(14), wall(1000)));
        assert!(st.step(&mut b, seen + Duration::from_secs(15), wall(1000)));
        let taken = spec(&st);
        assert_eq!(taken.holder_identity.as_deref(), Some("b"));
        assert_eq!(taken.lease_transitions, Some(1));
        assert_ne!(taken.acquire_time, first.acquire_time);
        // a learns it lost at its next step.
        assert!(!st.step(&mut a, seen + Duration::from_secs(16), wall(16)));
        assert!(!a.is_leader(seen + Duration::from_secs(16)));
    }

    #[test]
    fn a_renewed_record_restarts_the_wait() {
        let t0 = Instant::now();
        let mut st = Store::default();
        let mut a = Elector::new("a", Timings::default());
        let mut b = Elector::new("b", Timings::default());
        st.step(&mut a, t0, wall(0));
        assert!(!st.step(&mut b, t0, wall(0)));
        // a renews with a clock that did not move: the resourceVersion still changes.
        st.step(&mut a, t0 + Duration::from_secs(10), wall(0));
        // 20 s after b first saw the lease, but only 10 s after it changed.
        assert!(!st.step(&mut b, t0 + Duration::from_secs(20), wall(0)));
    }

    #[test]
    fn released_lease_is_taken_at_once() {
        let t0 = Instant::now();
        let mut st = Store::default();
        let mut a = Elector::new("a", Timings::default());
        st.step(&mut a, t0, wall(0));
        let mut b = Elector::new("b", Timings::default());
        assert!(!st.step(&mut b, t0, wall(0)));
        assert!(
            b.release(&spec(&st), wall(1)).is_none(),
            "only the holder releases"
        );
        let released = a.release(&spec(&st), wall(1)).unwrap();
        st.write(released);
        assert!(st.step(&mut b, t0 + Duration::from_secs(1), wall(1)));
    }

    proptest::proptest! {
        /// Two candidates stepping at random times, each write landing or failing (conflict,
        /// API server away), the wall clock possibly stuck: never both leaders at one instant.
        #[test]
        fn never_two_leaders(ops in proptest::collection::vec((0u8..2, 0u64..6000, proptest::bool::ANY, 0i64..3), 1..200)) {
            let t0 = Instant::now();
            let mut els = [Elector::new("a", Timings::default()), Elector::new("b", Timings::default())];
            let mut st = Store::default();
            let mut now = t0;
            let mut clock = 0;
            for (who, dt_ms, lands, tick) in ops {
                now += Duration::from_millis(dt_ms);
                clock += tick;
                let e = &mut els[who as usize];
                match e.step(st.lease.as_ref(), now, wall(clock)) {
                    Step::Create(s) | Step::Update(s) if lands => {
                        let l = st.write(s);
                        e.written(&l, now);
                    }
                    Step::Create(_) | Step::Update(_) => e.write_failed(),
                    Step::Wait { .. } => {}
                }
                let leaders = els.iter().filter(|e| e.is_leader(now)).count();
                proptest::prop_assert!(leaders <= 1, "two leaders at {:?}", now - t0);
            }
        }
    }
}
