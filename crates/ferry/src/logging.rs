//! Agent log lines, written by a thread of their own.
//!
//! `log!` never blocks and never panics: the line is queued (up to [`QUEUE`] lines) for a writer
//! thread, so a full or closed stderr pipe can stall neither the layer-2 thread nor the sync
//! loop, and a reader that went away (`ferry agent 2>&1 | head`) does not kill the agent. Lines
//! that do not fit in the queue are counted and the count is written once there is room.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Lines queued before new ones are dropped.
const QUEUE: usize = 4096;

enum Msg {
    Line(String),
    Flush(SyncSender<()>),
}

static SENDER: OnceLock<Mutex<SyncSender<Msg>>> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);

fn sender() -> SyncSender<Msg> {
    let m = SENDER.get_or_init(|| {
        let (tx, rx) = sync_channel(QUEUE);
        // If the thread cannot start, lines are dropped (and counted): logging is not worth
        // stopping the agent for.
        let _ = std::thread::Builder::new()
            .name("ferry-log".into())
            .spawn(move || writer(rx));
        Mutex::new(tx)
    });
    m.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn writer(rx: Receiver<Msg>) {
    let mut err = std::io::stderr();
    for msg in rx {
        match msg {
            Msg::Line(line) => {
                let dropped = DROPPED.swap(0, Ordering::Relaxed);
                if dropped > 0 {
                    let _ = writeln!(
                        err,
                        "{} ({dropped} log lines dropped: stderr was too slow)",
                        crate::agent::timestamp()
                    );
                }
                // A closed or broken stderr is not an error worth stopping for.
                let _ = writeln!(err, "{line}");
            }
            Msg::Flush(done) => {
                let _ = err.flush();
                let _ = done.send(());
            }
        }
    }
}

/// Queues one line (already formatted, with its timestamp). Control characters (a newline in
/// an object's name, an escape sequence) are escaped: one event, one line, nothing that moves
/// a terminal's cursor.
pub fn line(text: String) {
    match sender().try_send(Msg::Line(escape_controls(text))) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn escape_controls(text: String) -> String {
    if !text.chars().any(char::is_control) {
        return text;
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Waits (at most `timeout`) until the lines queued so far are written.
pub fn flush(timeout: Duration) {
    let (tx, rx) = sync_channel(1);
    if sender().send(Msg::Flush(tx)).is_ok() {
        let _ = rx.recv_timeout(timeout);
    }
}

#[cfg(test)]
mod tests {
    use super::escape_controls;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape_controls("plain: ok".into()), "plain: ok");
        assert_eq!(
            escape_controls("Service default/we\nb\x1b[2J: bad".into()),
            "Service default/we\\nb\\u{1b}[2J: bad"
        );
    }
}
