//! A fresh network namespace per kernel test, shared by `kernel.rs` and `tables.rs`.

use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use ferry_testkit::skip;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A fresh network namespace, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// A namespace named `PREFIX-PID-N`; None (after saying so) when not root, for `test`;
    /// under $CI the skip fails instead.
    pub fn new(test: &str, prefix: &str) -> Option<Netns> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            skip(test, "needs root (network namespaces)");
            return None;
        }
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("running ip netns add");
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Netns { name })
    }

    /// Runs `f` on a thread of its own that has entered the namespace (so the netlink sockets
    /// opened there talk to this namespace's nftables), re-raising its panic.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        std::thread::scope(|s| {
            let h = std::thread::Builder::new()
                .name(std::thread::current().name().unwrap_or("kernel").into())
                .spawn_scoped(s, move || {
                    // SAFETY: setns on a namespace fd we own, on this thread only.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                    f()
                })
                .expect("spawning a thread");
            h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(o) if o.status.success() => {}
            other => eprintln!("could not delete netns {}: {other:?}", self.name),
        }
    }
}
