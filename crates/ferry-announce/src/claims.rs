//! The agents' announcement files (`<state-dir>/announcements/<node>.json`): what each node
//! announces now. An agent rewrites its own every second and at every change, so a file older
//! than [`FRESH`] is a dead agent's leftover. `ferry get svc -o wide` and the lab read them
//! for the ANNOUNCED-BY column. (File I/O, kept beside the announcement logic so the format
//! lives in one place.)

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

/// How recent a file must be to count.
pub const FRESH: Duration = Duration::from_secs(3);

/// Writes `path` (atomically): `node` announces `owned`.
pub fn write(path: &Path, node: &str, owned: &BTreeSet<IpAddr>) {
    let ips: BTreeSet<String> = owned.iter().map(|i| i.to_string()).collect();
    let body = serde_json::json!({ "node": node, "addresses": ips });
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, body.to_string()).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

/// Which nodes announce which addresses (each address's nodes in name order), from the fresh
/// files in `dir`.
pub fn read(dir: &Path) -> BTreeMap<IpAddr, Vec<String>> {
    let mut out: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        let fresh = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age < FRESH);
        let Some(v) = fresh
            .then(|| std::fs::read_to_string(&path).ok())
            .flatten()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        else {
            continue;
        };
        let node = v["node"].as_str().unwrap_or_default().to_string();
        for a in v["addresses"].as_array().into_iter().flatten() {
            if let Some(ip) = a.as_str().and_then(|s| s.parse().ok()) {
                out.entry(ip).or_default().push(node.clone());
            }
        }
    }
    // In name order, whatever order the directory lists the files in.
    for nodes in out.values_mut() {
        nodes.sort();
        nodes.dedup();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_claims_read_back_and_stale_ones_do_not() {
        let dir = std::env::temp_dir().join(format!("ferry-claims-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ip: IpAddr = "192.168.2.200".parse().unwrap();
        write(&dir.join("n1.json"), "n1", &BTreeSet::from([ip]));
        write(&dir.join("n2.json"), "n2", &BTreeSet::new());
        std::fs::write(dir.join("junk.json"), "{not json").unwrap();
        assert_eq!(read(&dir), BTreeMap::from([(ip, vec!["n1".to_string()])]));
        // Several nodes (BGP: every node announces): in name order.
        write(&dir.join("n3.json"), "n3", &BTreeSet::from([ip]));
        write(&dir.join("n0.json"), "n0", &BTreeSet::from([ip]));
        assert_eq!(read(&dir)[&ip], ["n0", "n1", "n3"]);
        std::fs::remove_file(dir.join("n3.json")).unwrap();
        std::fs::remove_file(dir.join("n0.json")).unwrap();
        // A file older than FRESH is a dead agent's.
        let old = std::time::SystemTime::now() - Duration::from_secs(10);
        let f = std::fs::File::options()
            .write(true)
            .open(dir.join("n1.json"))
            .unwrap();
        f.set_modified(old).unwrap();
        assert!(read(&dir).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
