//! Allocation state shared through a state directory: `allocations.json`, changed only under an
//! exclusive lock on `allocations.lock`, written atomically (temp file + rename). Every agent and
//! `ferry get` sharing the directory sees the same values.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ferry_model::alloc::{allocate, AllocConfig, AllocResults, AllocState};
use ferry_model::Service;

pub struct StateDir {
    dir: PathBuf,
}

struct Lock(File);

impl Lock {
    fn take(path: &Path) -> Result<Lock> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a file descriptor we own; blocks until the lock is ours.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("locking {}", path.display()));
        }
        Ok(Lock(f))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: unlocking the descriptor we locked (closing would release it too).
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

impl StateDir {
    pub fn new(dir: &Path) -> Result<StateDir> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating state dir {}", dir.display()))?;
        Ok(StateDir {
            dir: dir.to_path_buf(),
        })
    }

    fn file(&self) -> PathBuf {
        self.dir.join("allocations.json")
    }

    fn read(&self) -> Result<AllocState> {
        match std::fs::read_to_string(self.file()) {
            Ok(t) => serde_json::from_str(&t).with_context(|| {
                format!("{} is not valid allocation state", self.file().display())
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AllocState::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.file().display())),
        }
    }

    fn write(&self, st: &AllocState) -> Result<()> {
        let tmp = self
            .dir
            .join(format!(".allocations.json.{}", std::process::id()));
        let mut f = File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(serde_json::to_string_pretty(st)?.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.file())
            .with_context(|| format!("replacing {}", self.file().display()))?;
        Ok(())
    }

    /// Allocates for `services` under the lock; writes the state back if it changed.
    pub fn sync(
        &self,
        services: &[Service],
        cfg: &AllocConfig,
        snapshot_ms: u64,
        now_ms: u64,
    ) -> Result<AllocResults> {
        let _lock = Lock::take(&self.dir.join("allocations.lock"))?;
        let old = self.read()?;
        let (new, results) = allocate(&old, services, cfg, snapshot_ms, now_ms);
        if new != old {
            self.write(&new)?;
        }
        Ok(results)
    }
}
