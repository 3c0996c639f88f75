//! End to end: an agent with `--nft-shards 4` in a lab — the services spread over the tables
//! `ferry-0`..`ferry-3` beside the common table `ferry` answer through the kernel (curl to every
//! cluster IP from the node, a node port from outside), a change to one service rewrites its
//! shard's table only, a deleted or flushed shard table, a deleted rule and `nft flush ruleset`
//! are repaired at once, a restart with `--nft-shards 2` leaves no `ferry-2`/`ferry-3` and keeps
//! serving, a foreign table is never touched, and `ferry cleanup` removes all of ferry's tables.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{demo, Lab, CONVERGE, FERRY};

const SERVICES: usize = 8;

/// Whether a table's listing DNATs to some endpoint's port 81: an endpoint map element
/// (`... : 10.42.0.10 . 81`, listed several to a line) or a DNAT rule (`dnat ip to A:81`).
fn to_port_81(listing: &str) -> bool {
    listing.contains(":81 ")
        || listing.contains(" . 81,")
        || listing.contains(" . 81 }")
        || listing.contains(" . 81\n")
}

fn services_yaml(target_port_of_3: u16) -> String {
    (0..SERVICES)
        .map(|i| {
            let target = if i == 3 { target_port_of_3 } else { 80 };
            format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}}}\n\
                 spec: {{selector: {{app: nextcloud, environment: dev}}, \
                 ports: [{{port: 8080, targetPort: {target}}}]}}\n"
            )
        })
        .collect()
}

fn nft(lab: &Lab, node: &str, args: &[&str]) -> String {
    let mut cmd = vec!["nft"];
    cmd.extend_from_slice(args);
    common::run_ok(lab, node, &cmd)
}

/// ferry's tables on `node`, sorted.
fn ferry_tables(lab: &Lab, node: &str) -> Vec<String> {
    let mut t: Vec<String> = nft(lab, node, &["list", "tables", "inet"])
        .lines()
        .filter_map(|l| l.strip_prefix("table inet "))
        .filter(|n| *n == "ferry" || n.starts_with("ferry-"))
        .map(str::to_string)
        .collect();
    t.sort();
    t
}

/// Each of ferry's tables listed with rule handles (a rewritten rule gets a new handle).
fn listings(lab: &Lab, node: &str) -> BTreeMap<String, String> {
    ferry_tables(lab, node)
        .into_iter()
        .map(|t| {
            let l = nft(lab, node, &["-a", "list", "table", "inet", &t]);
            (t, l)
        })
        .collect()
}

/// Waits (bounded) until `check` holds for `node`'s tables; how long it took.
fn until(
    lab: &Lab,
    node: &str,
    what: &str,
    check: impl Fn(&BTreeMap<String, String>) -> bool,
) -> Duration {
    let t0 = Instant::now();
    loop {
        let l = listings(lab, node);
        if check(&l) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < CONVERGE,
            "{what}: never so; tables {:?}",
            l.keys().collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The table holding `svc`'s chains.
fn table_of(l: &BTreeMap<String, String>, svc: &str) -> Option<String> {
    let needle = format!("service-default/{svc}/");
    l.iter()
        .find(|(_, text)| text.contains(&needle))
        .map(|(t, _)| t.clone())
}

fn all_answer(lab: &Lab, node: &str, ips: &[String], pods: &[String]) {
    for ip in ips {
        let body = common::curl_ok(lab, node, &format!("http://{ip}:8080/"));
        assert!(pods.contains(&body), "{ip}: {body}");
    }
}

fn foreign_table_intact(lab: &Lab, node: &str) {
    let t = nft(lab, node, &["list", "table", "inet", "other"]);
    assert!(t.contains("tcp dport 9 counter"), "{t}");
}

#[test]
fn sharded_tables_serve_change_alone_heal_and_shrink() {
    let test = "sharded_tables_serve_change_alone_heal_and_shrink";
    let Some(lab) = common::lab(test, 1) else {
        return;
    };
    let node = lab.node_name(0);
    common::run_ok(
        &lab,
        &node,
        &[
            "sh",
            "-c",
            "nft add table inet other && nft add chain inet other keep '{ type filter hook input priority 0; }' && nft add rule inet other keep tcp dport 9 counter",
        ],
    );
    lab.agent_restart_with(&node, &["--nft-shards", "4"])
        .expect("restart with --nft-shards 4");
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    lab.apply_yaml(demo::NEXTCLOUD_DEV_NODEPORT).unwrap();
    lab.apply_yaml(&services_yaml(80)).unwrap();
    let pods = common::pod_names(&lab, "nextcloud-dev", 2);
    let ips: Vec<String> = (0..SERVICES)
        .map(|i| common::svc_addr(&lab, &format!("svc-{i}")).0.to_string())
        .collect();
    let want: Vec<String> = ["ferry", "ferry-0", "ferry-1", "ferry-2", "ferry-3"]
        .map(String::from)
        .to_vec();
    until(&lab, &node, "five tables, every service in one", |l| {
        l.keys().cloned().collect::<Vec<_>>() == want
            && (0..SERVICES).all(|i| table_of(l, &format!("svc-{i}")).is_some())
    });
    let l = listings(&lab, &node);
    let spread: std::collections::BTreeSet<String> = (0..SERVICES)
        .filter_map(|i| table_of(&l, &format!("svc-{i}")))
        .collect();
    assert!(spread.len() >= 2, "services all in {spread:?}");
    assert!(!l["ferry"].contains("service-default/"), "common table");
    // Through the kernel: every cluster IP from the node, the node port from outside.
    all_answer(&lab, &node, &ips, &pods);
    let port = common::node_port(&lab, "nextcloud-dev-nodeport");
    common::until_all_answer(
        &lab,
        "client",
        &format!("http://{}:{port}/", lab.node_ip(0)),
        &pods,
    );
    foreign_table_intact(&lab, &node);

    // One service changed: its shard's table only is rewritten (rule handles elsewhere kept).
    let home = table_of(&l, "svc-3").expect("svc-3's table");
    lab.apply_yaml(&services_yaml(81)).unwrap();
    until(&lab, &node, "svc-3 to port 81", |l| {
        l.get(&home).is_some_and(|t| to_port_81(t))
    });
    std::thread::sleep(Duration::from_millis(500));
    let after = listings(&lab, &node);
    for (t, text) in &after {
        if *t == home {
            assert_ne!(text, &l[t], "{t}");
        } else {
            assert_eq!(text, &l[t], "{t} changed with svc-3 ({home})");
        }
    }
    lab.apply_yaml(&services_yaml(80)).unwrap();
    until(&lab, &node, "svc-3 back to 80", |l| {
        l.get(&home).is_some_and(|t| !to_port_81(t))
    });

    // Repairs: a deleted shard table, a flushed one, a deleted rule, the whole ruleset.
    let serving = |l: &BTreeMap<String, String>| {
        l.keys().cloned().collect::<Vec<_>>() == want
            && (0..SERVICES).all(|i| table_of(l, &format!("svc-{i}")).is_some())
            && l[&home].contains("dnat ip to")
    };
    nft(&lab, &node, &["delete", "table", "inet", &home]);
    let t_deleted = until(&lab, &node, "deleted shard table", serving);
    nft(&lab, &node, &["flush", "table", "inet", &home]);
    let t_flushed = until(&lab, &node, "flushed shard table", serving);
    let chain = "service-default/svc-3/tcp/8080";
    let listing = nft(&lab, &node, &["-a", "list", "chain", "inet", &home, chain]);
    let handle = listing
        .lines()
        .find(|l| l.contains("goto choose-"))
        .and_then(|l| l.rsplit("# handle ").next())
        .map(|h| h.trim().to_string())
        .expect("the rule going to the endpoint draw, and its handle");
    nft(
        &lab,
        &node,
        &["delete", "rule", "inet", &home, chain, "handle", &handle],
    );
    let dnats = |l: &BTreeMap<String, String>| {
        // The chain's own rules: from its header to the next chain's.
        l.get(&home)
            .and_then(|t| {
                let plain = format!("chain {chain} {{");
                let quoted = format!("chain \"{chain}\" {{");
                t.split(&plain).nth(1).or_else(|| t.split(&quoted).nth(1))
            })
            .and_then(|rest| rest.split("\n\tchain ").next())
            .map_or(0, |c| c.matches("goto choose-").count())
    };
    // (The agent may have put it back before this reads: no check of the gap here.)
    let t_rule = until(&lab, &node, "deleted rule", |l| serving(l) && dnats(l) == 1);
    foreign_table_intact(&lab, &node);
    nft(&lab, &node, &["flush", "ruleset"]);
    let t_ruleset = until(&lab, &node, "flushed ruleset", serving);
    eprintln!(
        "repaired: deleted shard table in {t_deleted:?}, flushed shard table in {t_flushed:?}, \
         deleted rule in {t_rule:?}, flushed ruleset in {t_ruleset:?}"
    );
    assert!(
        t_deleted < Duration::from_secs(2),
        "deleted shard table repaired only after {t_deleted:?}"
    );
    all_answer(&lab, &node, &ips, &pods);

    // `ferry explain` traces through every table and compares all of them with the kernel.
    let out = lab
        .explain(
            &node,
            &[
                "--local",
                "--to",
                &format!("{}:8080/tcp", ips[3]),
                "-o",
                "json",
            ],
        )
        .expect("explain runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("explain's JSON");
    assert_eq!(v["kernel"]["as_planned"], true, "{v}");
    let entered = format!("{home}:{chain}");
    let outcomes = v["outcomes"].as_array().expect("outcomes");
    assert!(!outcomes.is_empty(), "{v}");
    for o in outcomes {
        assert_eq!(o["fate"], "dnat", "{v}");
        assert!(
            o["chains"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c.as_str() == Some(entered.as_str()))),
            "{entered} not entered: {v}"
        );
    }

    // Restart with two shards: ferry-2 and ferry-3 go, the foreign table stays, all serve.
    common::run_ok(
        &lab,
        &node,
        &[
            "sh",
            "-c",
            "nft add table inet other && nft add chain inet other keep '{ type filter hook input priority 0; }' && nft add rule inet other keep tcp dport 9 counter",
        ],
    );
    lab.agent_restart_with(&node, &["--nft-shards", "2"])
        .expect("restart with --nft-shards 2");
    let two: Vec<String> = ["ferry", "ferry-0", "ferry-1"].map(String::from).to_vec();
    until(&lab, &node, "three tables", |l| {
        l.keys().cloned().collect::<Vec<_>>() == two
            && (0..SERVICES).all(|i| table_of(l, &format!("svc-{i}")).is_some())
    });
    all_answer(&lab, &node, &ips, &pods);
    foreign_table_intact(&lab, &node);

    // Cleanup, the agent stopped: all of ferry's tables, nothing else.
    lab.agent_stop(&node).expect("agent stop");
    let out = common::run_ok(&lab, &node, &[FERRY, "cleanup"]);
    assert!(out.contains("removed table inet ferry-1"), "{out}");
    assert!(ferry_tables(&lab, &node).is_empty());
    foreign_table_intact(&lab, &node);
}

/// A namespace of the test's own with an agent in it (automatic `--nft-shards`); both gone on
/// drop (the agent by PID).
struct Node {
    ns: String,
    dir: std::path::PathBuf,
    agent: Option<std::process::Child>,
}

impl Node {
    fn new(tag: &str) -> Node {
        let ns = format!("ff-{tag}-{}", std::process::id());
        let ok = std::process::Command::new("ip")
            .args(["netns", "add", &ns])
            .status()
            .unwrap();
        assert!(ok.success(), "ip netns add {ns}");
        let dir = std::env::temp_dir().join(&ns);
        std::fs::create_dir_all(dir.join("manifests")).unwrap();
        Node {
            ns,
            dir,
            agent: None,
        }
    }

    fn start(&mut self) {
        let child = std::process::Command::new("ip")
            .args([
                "netns", "exec", &self.ns, FERRY, "agent", "--no-l2", "--node", "n1",
            ])
            .arg("--manifests")
            .arg(self.dir.join("manifests"))
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("agent.log")).unwrap())
            .spawn()
            .unwrap();
        self.agent = Some(child);
    }

    fn nft(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns, "nft"])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn tables(&self) -> Vec<String> {
        let mut t: Vec<String> = self
            .nft(&["list", "tables", "inet"])
            .lines()
            .filter_map(|l| l.strip_prefix("table inet "))
            .filter(|n| *n == "ferry" || n.starts_with("ferry-"))
            .map(str::to_string)
            .collect();
        t.sort();
        t
    }

    fn write_services(&self, n: usize) {
        let text: String = (0..n)
            .map(|i| {
                format!(
                    "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: default}}\n\
                     spec: {{clusterIP: 10.43.{}.{}, ports: [{{port: 80}}]}}\n",
                    10 + i / 250,
                    1 + i % 250
                )
            })
            .collect();
        let m = self.dir.join("manifests");
        std::fs::write(m.join(".s.tmp"), text).unwrap();
        std::fs::rename(m.join(".s.tmp"), m.join("s.yaml")).unwrap();
    }

    /// Waits (bounded: a debug build plans a thousand services in seconds) for the tables.
    fn until_tables(&self, want: &[&str], check: impl Fn(&Node) -> bool) {
        let t0 = Instant::now();
        while self.tables() != want || !check(self) {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "tables {:?}, want {want:?}; agent threads {:?}; log:\n{}",
                self.tables(),
                self.threads(),
                std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The agent's threads: (name, where each waits), for a failure's message.
    fn threads(&self) -> Vec<(String, String)> {
        let Some(pid) = self.agent.as_ref().map(|c| c.id()) else {
            return Vec::new();
        };
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
            .unwrap_or_default();
        tasks
            .into_iter()
            .map(|t| {
                let read = |f: &str| std::fs::read_to_string(t.join(f)).unwrap_or_default();
                (read("comm").trim().to_string(), read("wchan"))
            })
            .collect()
    }

    fn has_cluster_ip(&self, table: &str, ip: &str) -> bool {
        self.nft(&["list", "set", "inet", table, "cluster-ips-v4"])
            .contains(ip)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn automatic_shards_grow_past_a_thousand_services_and_shrink_back() {
    if !common::root("automatic_shards_grow_past_a_thousand_services_and_shrink_back") {
        return;
    }
    let mut node = Node::new("autoshard");
    node.write_services(200);
    node.start();
    node.until_tables(&["ferry"], |n| n.has_cluster_ip("ferry", "10.43.10.200"));
    // 1,100 services: two shard tables, built and hooked in before the common table drops
    // the services it held; the load is cut into several transactions.
    node.write_services(1100);
    node.until_tables(&["ferry", "ferry-0", "ferry-1"], |n| {
        n.has_cluster_ip("ferry", "10.43.14.100")
    });
    // The service (no endpoints: refused) is its shard's, no longer the common table's.
    let refusing = |t: &str| {
        let listing = node.nft(&["list", "table", "inet", t]);
        let set = ["set", "map"].iter().find_map(|k| {
            let head = format!("{k} no-endpoint-services-v4 {{");
            listing.split(&head).nth(1)?.split("\n\t}").next()
        });
        set.is_some_and(|s| s.contains("10.43.14.100"))
    };
    assert!(!refusing("ferry"), "the common table keeps no services");
    assert!(
        refusing("ferry-0") != refusing("ferry-1"),
        "in one shard: {}",
        node.nft(&["list", "table", "inet", "ferry-0"])
    );
    let log = std::fs::read_to_string(node.dir.join("agent.log")).unwrap();
    assert!(
        log.lines().any(|l| l.contains("transactions, the longest")),
        "a cut load logs its transactions:\n{log}"
    );
    // Down to 100: a quarter of the tables would do, so one table again.
    node.write_services(100);
    node.until_tables(&["ferry"], |n| {
        !n.has_cluster_ip("ferry", "10.43.14.100") && n.has_cluster_ip("ferry", "10.43.10.100")
    });
    let log = std::fs::read_to_string(node.dir.join("agent.log")).unwrap();
    assert!(
        log.contains("deleted the tables no longer used: ferry-0 ferry-1"),
        "{log}"
    );
}
