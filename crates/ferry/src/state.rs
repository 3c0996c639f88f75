//! Where allocations live: the [`AllocStore`] interface, and the file store of manifest mode.
//!
//! Cluster IPs, node ports (manifest mode only: in a cluster the API server allocates them)
//! and load-balancer addresses are all allocated through an [`AllocStore`]. The file store
//! keeps them in a state directory: `allocations.json` and `lb-allocations.json`, changed only
//! under an exclusive lock on `allocations.lock` (taken with a timeout: a lock held elsewhere
//! fails the sync, which is retried, instead of stalling the agent), written atomically (temp
//! file + rename). Every agent sharing the directory sees the same values; `ferry get` only
//! reads them ([`AllocStore::view`]).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_model::alloc::{allocate, port_key, AllocConfig, AllocResults, AllocState, Allocation};
use ferry_model::lbipam::{self, LbAllocation, LbResults, LbState};
use ferry_model::pools::PoolConfig;
use ferry_model::{Namespace, Service};
use serde::{de::DeserializeOwned, Serialize};

/// The load-balancer class ferry serves (services without a class are served too).
pub const LOAD_BALANCER_CLASS: &str = "ferry.dev/lb";

pub struct StateDir {
    dir: PathBuf,
}

/// Allocation: what every service gets, kept where all agents see it.
pub trait AllocStore {
    /// Allocates what is missing and keeps it; returns every service's allocation.
    fn sync(
        &self,
        services: &[Service],
        namespaces: &[Namespace],
        pools: &PoolConfig,
        cfg: &AllocConfig,
        snapshot_ms: u64,
        now_ms: u64,
    ) -> Result<(AllocResults, LbResults)>;

    /// What is kept now, changing nothing: services nobody has allocated for yet are left out
    /// (their cluster IP shows as `<none>`, their load-balancer address as `<pending>`).
    fn view(
        &self,
        services: &[Service],
        namespaces: &[Namespace],
        pools: &PoolConfig,
        now_ms: u64,
    ) -> Result<(AllocResults, LbResults)>;
}

/// How long a sync waits for the allocation lock before failing (and being retried).
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(5);

struct Lock(File);

impl Lock {
    fn take(path: &Path, timeout: Duration) -> Result<Lock> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let deadline = Instant::now() + timeout;
        loop {
            // SAFETY: flock on a file descriptor we own; LOCK_NB never blocks.
            let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                return Ok(Lock(f));
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(err).with_context(|| format!("locking {}", path.display()));
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} is held by another process for more than {:?}",
                    path.display(),
                    timeout
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: unlocking the descriptor we locked (closing would release it too).
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

impl StateDir {
    /// A state directory to read only (a missing one reads as empty; nothing is created).
    pub fn at(dir: &Path) -> StateDir {
        StateDir {
            dir: dir.to_path_buf(),
        }
    }

    /// The agent's state directory, created if missing.
    pub fn new(dir: &Path) -> Result<StateDir> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating state dir {}", dir.display()))?;
        Ok(StateDir {
            dir: dir.to_path_buf(),
        })
    }

    /// The load-balancer addresses manifest mode kept here (read only): a node moving to the
    /// Kubernetes API hands them to the controller, so addresses survive the switch.
    pub fn manifest_lb_allocations(&self) -> Result<LbState> {
        self.read("lb-allocations.json")
    }

    fn read<T: DeserializeOwned + Default>(&self, name: &str) -> Result<T> {
        let path = self.dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(t) => serde_json::from_str(&t)
                .with_context(|| format!("{} is not valid ferry state", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn write<T: Serialize>(&self, name: &str, value: &T) -> Result<()> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.{}", std::process::id()));
        let mut f = File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(serde_json::to_string_pretty(value)?.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))?;
        Ok(())
    }

    /// Where agents say which addresses they announce (for `ferry get svc -o wide`).
    pub fn announcements_dir(&self) -> PathBuf {
        self.dir.join("announcements")
    }
}

impl AllocStore for StateDir {
    /// Allocates cluster IPs, node ports and load-balancer addresses for `services` under the
    /// lock; writes the state back where it changed.
    fn sync(
        &self,
        services: &[Service],
        namespaces: &[Namespace],
        pools: &PoolConfig,
        cfg: &AllocConfig,
        snapshot_ms: u64,
        now_ms: u64,
    ) -> Result<(AllocResults, LbResults)> {
        let _lock = Lock::take(&self.dir.join("allocations.lock"), LOCK_TIMEOUT)?;
        let old: AllocState = self.read("allocations.json")?;
        let (new, results) = allocate(&old, services, cfg, snapshot_ms, now_ms);
        if new != old {
            self.write("allocations.json", &new)?;
        }
        let old_lb: LbState = self.read("lb-allocations.json")?;
        let (new_lb, lb) = lbipam::allocate_with_grace(
            &old_lb,
            services,
            namespaces,
            pools,
            Some(LOAD_BALANCER_CLASS),
            snapshot_ms,
            now_ms,
            cfg.release_grace_ms,
        );
        if new_lb != old_lb {
            self.write("lb-allocations.json", &new_lb)?;
        }
        Ok((results, lb))
    }

    fn view(
        &self,
        services: &[Service],
        namespaces: &[Namespace],
        pools: &PoolConfig,
        now_ms: u64,
    ) -> Result<(AllocResults, LbResults)> {
        // What was kept, as it was kept (even where this command's flags would allocate
        // differently); services nobody allocated for yet are left out. Nothing is written.
        let kept: AllocState = self.read("allocations.json")?;
        let results: AllocResults = services
            .iter()
            .filter_map(|svc| {
                let r = svc.meta.object_ref();
                let a = kept.services.get(&r.to_string())?;
                let node_ports = svc
                    .ports
                    .iter()
                    .map(|p| a.node_ports.get(&port_key(p.port, p.protocol)).copied())
                    .collect();
                let allocation = Allocation {
                    cluster_ip: a.cluster_ip,
                    secondary_cluster_ip: a.secondary_cluster_ip,
                    node_ports,
                    health_check_node_port: a
                        .node_ports
                        .get(ferry_model::alloc::HEALTH_CHECK_KEY)
                        .copied(),
                };
                Some((r, Ok(allocation)))
            })
            .collect();
        let old_lb: LbState = self.read("lb-allocations.json")?;
        let (_, mut lb) = lbipam::allocate(
            &old_lb,
            services,
            namespaces,
            pools,
            Some(LOAD_BALANCER_CLASS),
            now_ms,
            now_ms,
        );
        // Kept addresses as kept; for the rest only why they are pending (an address the
        // allocator would pick here is nobody's yet).
        for (r, a) in lb.iter_mut() {
            if let Some(e) = old_lb.services.get(&r.to_string()) {
                *a = Ok(LbAllocation {
                    ips: e.ips.clone(),
                    pool: e.pool.clone(),
                });
            }
        }
        lb.retain(|r, a| a.is_err() || old_lb.services.contains_key(&r.to_string()));
        Ok((results, lb))
    }
}
