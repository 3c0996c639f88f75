//! Shared helpers for the real-client tests: a server on 127.0.0.1:0 and a kubeconfig.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_apiserver::{Config, Running};

/// Whether a missing client must fail the test (env `CI` set) rather than skip it.
pub fn require_or_skip(what: &str) -> bool {
    if std::env::var_os("CI").is_some() {
        panic!("{what} is missing and CI is set: install it (scripts/install-deps.sh)");
    }
    eprintln!("SKIP: {what} is missing");
    false
}

pub struct Lab {
    pub server: Running,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
}

impl Lab {
    pub fn start(config: Config) -> Lab {
        let server = Running::start("127.0.0.1:0".parse().expect("address"), config)
            .expect("start the API server");
        let dir = tempfile::tempdir().expect("temporary directory");
        let kubeconfig = dir.path().join("kubeconfig");
        server
            .write_kubeconfig(&kubeconfig)
            .expect("write the kubeconfig");
        Lab {
            server,
            dir,
            kubeconfig,
        }
    }

    pub fn quick() -> Lab {
        Lab::start(Config {
            bookmark_interval: Duration::from_millis(300),
            ..Config::default()
        })
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write a manifest");
        p
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// kubectl, if installed (env `KUBECTL`, else /usr/bin/kubectl, else `kubectl` on the PATH).
pub fn kubectl_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KUBECTL") {
        return Some(PathBuf::from(p));
    }
    let fixed = Path::new("/usr/bin/kubectl");
    if fixed.exists() {
        return Some(fixed.to_path_buf());
    }
    Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| PathBuf::from("kubectl"))
}
