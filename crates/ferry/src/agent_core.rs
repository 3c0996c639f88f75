//! The agent's core, pure (no I/O, `now` passed in): when to sync, and which problems to
//! report.
//!
//! The shell (`agent.rs`) feeds it inputs — a source changed, the host's addresses changed, a
//! sync finished — and asks it what to do: [`Core::poll_sync`] says when to start a sync,
//! [`Core::poll_timeout`] when to ask again. Syncs coalesce changes as kube-proxy's
//! min-sync-period does: a change after a quiet spell is synced at once, changes that follow
//! within [`SyncConfig::min_interval`] of the last sync's start wait for it and are synced
//! together, and a sync never overlaps another. A failed sync is retried with backoff; the
//! kernel's table is re-read and repaired every [`SyncConfig::resync`].
//!
//! Layer-2 announcement does not go through here: it runs on its own thread (`announce.rs`)
//! and is never behind a sync.

use std::collections::BTreeSet;
use std::fmt;
use std::time::{Duration, Instant};

/// Sync pacing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncConfig {
    /// Least time between the starts of two syncs.
    pub min_interval: Duration,
    /// First retry delay after a failed sync (doubled each failure, up to `max_retry`).
    pub retry: Duration,
    pub max_retry: Duration,
    /// Re-read the kernel's table and repair it this often (None: never).
    pub resync: Option<Duration>,
}

impl Default for SyncConfig {
    fn default() -> SyncConfig {
        SyncConfig {
            min_interval: Duration::from_millis(100),
            retry: Duration::from_secs(1),
            max_retry: Duration::from_secs(30),
            resync: Some(Duration::from_secs(300)),
        }
    }
}

/// A sync to run now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncJob {
    /// Re-read the kernel's table first (periodic resync, or after a failure).
    pub reread_kernel: bool,
}

/// When to sync.
#[derive(Debug, Clone)]
pub struct Core {
    cfg: SyncConfig,
    /// Something changed since the last sync started.
    dirty: bool,
    in_flight: bool,
    last_start: Option<Instant>,
    failures: u32,
    retry_at: Option<Instant>,
    resync_at: Option<Instant>,
    reread_next: bool,
    synced_once: bool,
}

impl Core {
    /// A core with everything to sync.
    pub fn new(cfg: SyncConfig, now: Instant) -> Core {
        Core {
            cfg,
            dirty: true,
            in_flight: false,
            last_start: None,
            failures: 0,
            retry_at: None,
            resync_at: cfg.resync.map(|r| now + r),
            reread_next: false,
            synced_once: false,
        }
    }

    /// The source (or the host's addresses) changed.
    pub fn handle_change(&mut self) {
        self.dirty = true;
    }

    /// Another process changed the nftables ruleset: the next sync re-reads ferry's table from
    /// the kernel and repairs what differs (a deleted table, a deleted or foreign rule).
    pub fn handle_kernel_changed(&mut self) {
        self.dirty = true;
        self.reread_next = true;
    }

    /// Whether the first sync has reached the kernel.
    pub fn ready(&self) -> bool {
        self.synced_once
    }

    fn earliest_start(&self) -> Option<Instant> {
        self.last_start.map(|t| t + self.cfg.min_interval)
    }

    /// The sync to start now, if any. The caller must report its end with
    /// [`Core::handle_sync_done`].
    pub fn poll_sync(&mut self, now: Instant) -> Option<SyncJob> {
        if self.in_flight {
            return None;
        }
        if self.resync_at.is_some_and(|t| now >= t) {
            self.reread_next = true;
            self.dirty = true;
            self.resync_at = self.cfg.resync.map(|r| now + r);
        }
        let retry_due = self.retry_at.is_some_and(|t| now >= t);
        if !(self.dirty || retry_due) {
            return None;
        }
        if self.retry_at.is_some_and(|t| now < t) {
            return None;
        }
        if self.earliest_start().is_some_and(|t| now < t) {
            return None;
        }
        self.in_flight = true;
        self.dirty = false;
        self.retry_at = None;
        self.last_start = Some(now);
        Some(SyncJob {
            reread_kernel: std::mem::take(&mut self.reread_next),
        })
    }

    /// A sync ended; a failed one is retried (after re-reading the kernel's table).
    pub fn handle_sync_done(&mut self, now: Instant, ok: bool) {
        self.in_flight = false;
        if ok {
            self.failures = 0;
            self.synced_once = true;
        } else {
            let backoff = self
                .cfg
                .retry
                .saturating_mul(1 << self.failures.min(16))
                .min(self.cfg.max_retry);
            self.failures += 1;
            self.retry_at = Some(now + backoff);
            self.reread_next = true;
        }
    }

    /// The latest moment the shell should call [`Core::poll_sync`] again, with no new input.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.in_flight {
            return None;
        }
        let mut at = self.resync_at;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                at = Some(at.map_or(t, |a| a.min(t)));
            }
        };
        if let Some(r) = self.retry_at {
            consider(Some(r.max(self.earliest_start().unwrap_or(r))));
        } else if self.dirty {
            consider(Some(self.earliest_start().unwrap_or_else(Instant::now)));
        }
        at
    }
}

/// How bad a [`Diagnostic`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Warning,
    Error,
}

/// A problem with one object, ready to become a Kubernetes Event: the object, a reason in
/// CamelCase and a message.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Diagnostic {
    pub severity: Severity,
    /// "Kind namespace/name" (None when no object can be named, e.g. an unreadable file).
    pub object: Option<String>,
    pub reason: &'static str,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    /// The log line's text (the message names the object where it has one).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Warning => "warning",
            Severity::Error => "error",
        };
        write!(f, "{sev}: {}: {}", self.reason, self.message)
    }
}

/// The problems reported last time, so that each is logged once while it lasts.
#[derive(Debug, Default)]
pub struct Reported {
    current: BTreeSet<Diagnostic>,
}

impl Reported {
    /// Replaces the current problems; returns the new ones (to log) and how many cleared.
    pub fn update(&mut self, now: Vec<Diagnostic>) -> (Vec<Diagnostic>, usize) {
        let next: BTreeSet<Diagnostic> = now.into_iter().collect();
        let new: Vec<Diagnostic> = next.difference(&self.current).cloned().collect();
        let cleared = self.current.difference(&next).count();
        self.current = next;
        (new, cleared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    fn cfg() -> SyncConfig {
        SyncConfig {
            min_interval: Duration::from_millis(100),
            retry: Duration::from_millis(1000),
            max_retry: Duration::from_millis(4000),
            resync: Some(Duration::from_secs(300)),
        }
    }

    #[test]
    fn first_sync_at_once_then_changes_coalesce() {
        let t0 = Instant::now();
        let mut c = Core::new(cfg(), t0);
        assert!(!c.ready());
        assert_eq!(
            c.poll_sync(t0),
            Some(SyncJob {
                reread_kernel: false
            })
        );
        assert_eq!(c.poll_sync(t0), None, "never two at once");
        c.handle_change();
        c.handle_change();
        assert_eq!(c.poll_timeout(), None, "nothing while one is running");
        c.handle_sync_done(at(t0, 30), true);
        assert!(c.ready());
        // Changes during the sync: one more sync, at the min interval after the last start.
        assert_eq!(c.poll_timeout(), Some(at(t0, 100)));
        assert_eq!(c.poll_sync(at(t0, 50)), None);
        assert!(c.poll_sync(at(t0, 100)).is_some());
        c.handle_sync_done(at(t0, 110), true);
        // Quiet: nothing until the resync.
        assert_eq!(c.poll_sync(at(t0, 5000)), None);
        assert_eq!(c.poll_timeout(), Some(at(t0, 300_000)));
        // A change after a quiet spell: at once.
        c.handle_change();
        assert!(c.poll_sync(at(t0, 5000)).is_some());
    }

    #[test]
    fn failures_retry_with_backoff_and_reread_the_kernel() {
        let t0 = Instant::now();
        let mut c = Core::new(cfg(), t0);
        c.poll_sync(t0).unwrap();
        c.handle_sync_done(at(t0, 10), false);
        assert!(!c.ready());
        assert_eq!(c.poll_timeout(), Some(at(t0, 1010)));
        assert_eq!(c.poll_sync(at(t0, 500)), None);
        c.handle_change();
        assert_eq!(
            c.poll_sync(at(t0, 600)),
            None,
            "a change does not cut the backoff"
        );
        assert_eq!(
            c.poll_sync(at(t0, 1010)),
            Some(SyncJob {
                reread_kernel: true
            })
        );
        c.handle_sync_done(at(t0, 1020), false);
        assert_eq!(c.poll_timeout(), Some(at(t0, 3020)), "doubled");
        c.poll_sync(at(t0, 3020)).unwrap();
        c.handle_sync_done(at(t0, 3030), false);
        c.poll_sync(at(t0, 7030)).unwrap();
        c.handle_sync_done(at(t0, 7040), false);
        assert_eq!(c.poll_timeout(), Some(at(t0, 11_040)), "capped");
        c.poll_sync(at(t0, 11_040)).unwrap();
        c.handle_sync_done(at(t0, 11_050), true);
        assert!(c.ready());
        assert_eq!(c.poll_sync(at(t0, 20_000)), None);
    }

    #[test]
    fn a_foreign_change_to_the_ruleset_rereads_the_kernel_in_the_next_sync() {
        let t0 = Instant::now();
        let mut c = Core::new(cfg(), t0);
        c.poll_sync(t0).unwrap();
        c.handle_sync_done(at(t0, 10), true);
        c.handle_kernel_changed();
        // Coalesced like any change: at the min interval after the last start.
        assert_eq!(c.poll_sync(at(t0, 50)), None);
        assert_eq!(
            c.poll_sync(at(t0, 100)),
            Some(SyncJob {
                reread_kernel: true
            })
        );
        c.handle_sync_done(at(t0, 110), true);
        c.handle_change();
        assert_eq!(
            c.poll_sync(at(t0, 300)),
            Some(SyncJob {
                reread_kernel: false
            }),
            "once only"
        );
    }

    #[test]
    fn periodic_resync_rereads_the_kernel() {
        let t0 = Instant::now();
        let mut c = Core::new(cfg(), t0);
        c.poll_sync(t0).unwrap();
        c.handle_sync_done(at(t0, 10), true);
        assert_eq!(
            c.poll_sync(at(t0, 300_000)),
            Some(SyncJob {
                reread_kernel: true
            })
        );
        c.handle_sync_done(at(t0, 300_010), true);
        assert_eq!(c.poll_timeout(), Some(at(t0, 600_000)));
    }

    proptest! {
        /// Under any sequence of changes and sync durations: syncs never overlap, starts are
        /// at least min_interval apart, and every change is followed by a sync that starts
        /// after it.
        #[test]
        fn syncs_never_overlap_and_every_change_is_synced(
            events in proptest::collection::vec((0u64..300, any::<bool>(), 1u64..400), 1..40)
        ) {
            let t0 = Instant::now();
            let mut c = Core::new(SyncConfig { resync: None, ..cfg() }, t0);
            let mut now = 0u64;
            let mut running: Option<u64> = None; // end time
            let mut starts: Vec<u64> = Vec::new();
            let mut last_change: Option<u64> = None;
            let mut pending = events.into_iter();
            let mut next_change: Option<(u64, u64)> = None;
            loop {
                if next_change.is_none() {
                    next_change = pending.next().map(|(gap, _, dur)| (now + gap, dur));
                }
                if let Some(end) = running {
                    if next_change.is_none_or(|(t, _)| end <= t) {
                        now = end;
                        c.handle_sync_done(at(t0, now), true);
                        running = None;
                        continue;
                    }
                }
                if let Some(job) = c.poll_sync(at(t0, now)) {
                    prop_assert!(!job.reread_kernel);
                    prop_assert!(running.is_none());
                    if let Some(prev) = starts.last() {
                        prop_assert!(now >= prev + 100);
                    }
                    starts.push(now);
                    let dur = next_change.map_or(50, |(_, d)| d);
                    running = Some(now + dur);
                    continue;
                }
                let wake = c.poll_timeout().map(|t| t.duration_since(t0).as_millis() as u64);
                match (next_change, wake) {
                    (Some((t, _)), w) if w.is_none_or(|w| t <= w) => {
                        now = now.max(t);
                        c.handle_change();
                        last_change = Some(now);
                        next_change = None;
                    }
                    (_, Some(w)) if running.is_none() => now = now.max(w),
                    (None, _) if running.is_some() => {}
                    (None, None) => break,
                    _ => {}
                }
            }
            if let Some(ch) = last_change {
                prop_assert!(starts.iter().any(|s| *s >= ch), "change at {} never synced: {:?}", ch, starts);
            }
        }
    }

    #[test]
    fn diagnostics_are_reported_once_while_they_last() {
        let d = |m: &str| Diagnostic {
            severity: Severity::Error,
            object: Some(format!("Service default/{m}")),
            reason: "Rejected",
            message: m.to_string(),
        };
        let mut r = Reported::default();
        assert_eq!(r.update(vec![d("a"), d("b")]).0.len(), 2);
        assert_eq!(r.update(vec![d("b"), d("a")]), (vec![], 0));
        assert_eq!(r.update(vec![d("c")]), (vec![d("c")], 2));
        assert_eq!(d("x").to_string(), "error: Rejected: x");
    }
}
