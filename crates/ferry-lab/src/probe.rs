//! The client's request loop: `curl` from inside a network namespace, one request after
//! another with short timeouts, each one timed. The demo's failover step and the end-to-end
//! tests use it to see when the client is served again and how long it was not.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::sys;

/// How long one probe may wait for a connection, and for the whole answer.
pub const CONNECT_TIMEOUT: &str = "0.25";
pub const MAX_TIME: &str = "0.5";

/// One request of a probe loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// When it began and ended, from the probe's start.
    pub began: Duration,
    pub ended: Duration,
    /// The body (trimmed; a pod name) or curl's complaint.
    pub result: Result<String, String>,
}

/// One `curl -sS --connect-timeout 0.25 --max-time 0.5 URL` in namespace `ns`: the trimmed
/// body, or curl's complaint.
pub fn curl_once(ns: &str, url: &str) -> Result<String, String> {
    let argv = [
        "curl",
        "-sS",
        "--connect-timeout",
        CONNECT_TIMEOUT,
        "--max-time",
        MAX_TIME,
        url,
    ];
    match sys::exec_output(ns, &argv) {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Err(e) => Err(format!("{e:#}")),
    }
}

/// Curls `url` from `ns` until `stop` is set, 10 ms between requests; times count from `start`.
pub fn probe_loop(ns: &str, url: &str, start: Instant, stop: &AtomicBool) -> Vec<Attempt> {
    probe_loop_with(ns, url, start, stop, |_| {})
}

/// [`probe_loop`], calling `each` with every attempt as soon as it ends.
pub fn probe_loop_with(
    ns: &str,
    url: &str,
    start: Instant,
    stop: &AtomicBool,
    mut each: impl FnMut(&Attempt),
) -> Vec<Attempt> {
    let mut out = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let began = start.elapsed();
        let result = curl_once(ns, url);
        let a = Attempt {
            began,
            ended: start.elapsed(),
            result,
        };
        each(&a);
        out.push(a);
        std::thread::sleep(Duration::from_millis(10));
    }
    out
}

/// How long after `cut` the first request that began at or after it succeeded (its end), if
/// one did.
pub fn recovered_after(attempts: &[Attempt], cut: Duration) -> Option<Duration> {
    attempts
        .iter()
        .find(|a| a.began >= cut && a.result.is_ok())
        .map(|a| a.ended.saturating_sub(cut))
}

/// The longest stretch without an answer (from the start of the first failed request of a run
/// of failures to the end of the next successful one, or of the last request) and the number
/// of failed requests.
pub fn longest_outage(attempts: &[Attempt]) -> (Duration, usize) {
    let mut longest = Duration::ZERO;
    let mut failed = 0;
    let mut run_start: Option<Duration> = None;
    for a in attempts {
        match &a.result {
            Err(_) => {
                failed += 1;
                run_start.get_or_insert(a.began);
            }
            Ok(_) => {
                if let Some(s) = run_start.take() {
                    longest = longest.max(a.ended.saturating_sub(s));
                }
            }
        }
    }
    if let (Some(s), Some(last)) = (run_start, attempts.last()) {
        longest = longest.max(last.ended.saturating_sub(s));
    }
    (longest, failed)
}

/// Requests that began at or after `cut` and failed.
pub fn failed_since(attempts: &[Attempt], cut: Duration) -> usize {
    attempts
        .iter()
        .filter(|a| a.began >= cut && a.result.is_err())
        .count()
}

/// The longest request among those still running at or after `cut`.
pub fn slowest_since(attempts: &[Attempt], cut: Duration) -> Duration {
    attempts
        .iter()
        .filter(|a| a.ended >= cut)
        .map(|a| a.ended.saturating_sub(a.began))
        .max()
        .unwrap_or_default()
}

/// The answers seen while waiting for every pod of a set to answer. Done when each wanted pod
/// has answered since the last answer that came from elsewhere (a pod not in the set, or any
/// other body): stray answers are allowed while the cluster converges, but not in the final
/// round. An empty set is refused: waiting for nobody would pass at once.
#[derive(Debug, Clone)]
pub struct AnswerTally {
    want: std::collections::BTreeSet<String>,
    seen: std::collections::BTreeSet<String>,
    strays: Vec<String>,
}

impl AnswerTally {
    /// Errs when `want` is empty.
    pub fn new(want: &[String]) -> Result<Self, String> {
        if want.is_empty() {
            return Err("no pods to wait for: an empty set would pass at once".into());
        }
        Ok(Self {
            want: want.iter().cloned().collect(),
            seen: Default::default(),
            strays: Vec::new(),
        })
    }

    /// One answer's body (trimmed here).
    pub fn record(&mut self, body: &str) {
        let body = body.trim();
        if self.want.contains(body) {
            self.seen.insert(body.to_string());
        } else {
            // Start over: all wanted pods must answer after the last stray.
            self.seen.clear();
            self.strays.push(body.to_string());
        }
    }

    /// Every wanted pod answered since the last stray answer.
    pub fn done(&self) -> bool {
        self.seen == self.want
    }

    /// The wanted pods that answered since the last stray answer.
    pub fn seen(&self) -> &std::collections::BTreeSet<String> {
        &self.seen
    }

    /// Answers that came from outside the set, in order.
    pub fn strays(&self) -> &[String] {
        &self.strays
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(began: u64, ended: u64, ok: bool) -> Attempt {
        Attempt {
            began: Duration::from_millis(began),
            ended: Duration::from_millis(ended),
            result: if ok {
                Ok("pod".into())
            } else {
                Err("timeout".into())
            },
        }
    }

    #[test]
    fn outages_and_recovery() {
        let ms = Duration::from_millis;
        let a = [
            at(0, 5, true),
            at(15, 20, true),
            at(30, 530, false), // in flight at the cut (100)
            at(540, 1040, false),
            at(1050, 1060, true),
            at(1070, 1075, false),
            at(1085, 1090, true),
        ];
        assert_eq!(recovered_after(&a, ms(100)), Some(ms(960)));
        assert_eq!(recovered_after(&a, ms(2000)), None);
        // 30 -> 1060, then 1070 -> 1090.
        assert_eq!(longest_outage(&a), (ms(1030), 3));
        assert_eq!(failed_since(&a, ms(100)), 2);
        assert_eq!(slowest_since(&a, ms(100)), ms(500));
        // A run of failures at the end counts up to the last request's end.
        assert_eq!(
            longest_outage(&[at(0, 5, true), at(10, 510, false)]),
            (ms(500), 1)
        );
        assert_eq!(longest_outage(&[]), (Duration::ZERO, 0));
    }

    #[test]
    fn tally_needs_every_wanted_pod_after_the_last_stray() {
        let v = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(AnswerTally::new(&[]).is_err());
        let mut t = AnswerTally::new(&v(&["a", "b"])).unwrap();
        assert!(!t.done());
        t.record("a\n");
        assert!(!t.done());
        t.record("x"); // not wanted: a must answer again
        t.record("b");
        assert!(!t.done(), "{:?}", t.seen());
        t.record("a");
        assert!(t.done());
        assert_eq!(t.strays(), ["x"]);
        // Answers from a single pod never satisfy a set of two.
        let mut t = AnswerTally::new(&v(&["a", "b"])).unwrap();
        for _ in 0..100 {
            t.record("a");
        }
        assert!(!t.done());
        // An empty body is a stray too.
        let mut t = AnswerTally::new(&v(&["a"])).unwrap();
        t.record("");
        assert!(!t.done());
        assert_eq!(t.strays(), [""]);
    }
}
