//! One agent per network namespace.
//!
//! The agent holds the abstract unix socket `@ferry-agent` for as long as it runs. Abstract
//! socket names belong to the network namespace, so a second agent in the same namespace (a
//! mistake, or the new pod of a rolling update) cannot bind it: it waits for the first to stop,
//! up to a limit, and then refuses to start, instead of fighting over the table. The kernel
//! releases the name when the holder exits, however it exits.

use std::io::ErrorKind;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The name held (`@ferry-agent` in `ss -xl`).
pub const NAME: &[u8] = b"ferry-agent";

/// Held for the agent's life.
pub struct Singleton {
    _socket: UnixListener,
}

/// Claims the namespace, waiting up to `wait` for an agent that holds it to stop.
pub fn claim(wait: Duration) -> Result<Singleton> {
    let addr = SocketAddr::from_abstract_name(NAME).context("abstract socket name")?;
    let deadline = Instant::now() + wait;
    let mut said = false;
    loop {
        match UnixListener::bind_addr(&addr) {
            Ok(socket) => {
                if said {
                    log!("the previous agent has stopped: taking over");
                }
                return Ok(Singleton { _socket: socket });
            }
            Err(e) if e.kind() == ErrorKind::AddrInUse => {
                if Instant::now() >= deadline {
                    bail!(
                        "another ferry agent runs in this network namespace (it holds the \
                         abstract socket @ferry-agent) and did not stop within {wait:?}: stop it \
                         first, or raise --wait-for-previous-s"
                    );
                }
                if !said {
                    log!(
                        "another ferry agent runs in this network namespace: waiting up to {wait:?} \
                         for it to stop (a rolling update?)"
                    );
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e).context("binding the abstract socket @ferry-agent"),
        }
    }
}
