//! End to end: faults around a single agent in a network namespace of the test's own — a reader
//! of its stderr that goes away, files in its manifest directory that would block or never end
//! a read (a FIFO, a link to /dev/zero), and its table changed behind its back (a rule deleted,
//! a foreign rule added, the table deleted, `nft flush ruleset`). The agent keeps running,
//! keeps applying changes and repairs its table at once.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{CONVERGE, FERRY};

/// A network namespace and an agent in it; both gone on drop (the agent by PID).
struct Node {
    ns: String,
    dir: PathBuf,
    agent: Option<Child>,
}

impl Node {
    fn new(tag: &str) -> Node {
        let ns = format!("ff-{tag}-{}", std::process::id());
        let ok = Command::new("ip")
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

    fn manifests(&self) -> PathBuf {
        self.dir.join("manifests")
    }

    /// Starts the agent with its stderr going to `stderr`.
    fn start(&mut self, stderr: Stdio) -> &mut Child {
        let extra: Vec<String> = std::env::var("FERRY_TEST_AGENT_ARGS")
            .map(|a| a.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default();
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let child = self.agent_command(&extra).stderr(stderr).spawn().unwrap();
        self.agent.insert(child)
    }

    /// `ferry agent` in the namespace, with `extra` arguments.
    fn agent_command(&self, extra: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns", "exec", &self.ns, FERRY, "agent", "--no-l2", "--node", "n1",
        ])
        .arg("--manifests")
        .arg(self.manifests())
        .arg("--state-dir")
        .arg(self.dir.join("state"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
        cmd
    }

    fn table(&self) -> String {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &self.ns, "nft", "list", "table", "inet", "ferry",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits (bounded) until the agent's table mentions `needle`.
    fn wait_table(&self, needle: &str) {
        let deadline = Instant::now() + CONVERGE;
        while !self.table().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "{needle} never reached the table:\n{}",
                self.table()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `nft ARGS` in the namespace (as another process would).
    fn nft(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "nft"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nft {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits (bounded) until `check` holds for the table; returns how long it took.
    fn until_table(&self, what: &str, check: impl Fn(&str) -> bool) -> Duration {
        let t0 = Instant::now();
        while !check(&self.table()) {
            assert!(
                t0.elapsed() < CONVERGE,
                "{what}: never repaired:\n{}",
                self.table()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        t0.elapsed()
    }

    fn alive(&mut self) -> bool {
        self.agent
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// SIGTERM, then the exit status.
    fn stop(&mut self) -> Option<i32> {
        let mut c = self.agent.take()?;
        // SAFETY: kill(2) on the PID of our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A foreign rule in ferry's base chain (another process's hand edit): the agent must remove it.
const FOREIGN_RULE: [&str; 9] = [
    "add",
    "rule",
    "inet",
    "ferry",
    "nat-prerouting",
    "tcp",
    "dport",
    "9999",
    "drop",
];
fn service(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec: {{clusterIP: {ip}, selector: {{app: {name}}}, ports: [{{port: 80}}]}}\n"
    )
}

fn write(dir: &Path, file: &str, text: &str) {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, dir.join(file)).unwrap();
}

#[test]
fn a_closed_stderr_does_not_stop_the_agent() {
    if !common::root("a_closed_stderr_does_not_stop_the_agent") {
        return;
    }
    let mut node = Node::new("stderr");
    write(&node.manifests(), "a.yaml", &service("a", "10.43.0.21"));
    // stderr is a pipe whose reader has gone before the agent writes its first line.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    node.start(Stdio::from(writer));
    node.wait_table("10.43.0.21");
    // Many log lines later (each change logs), it is still there and still applying.
    for i in 0..20 {
        write(
            &node.manifests(),
            "b.yaml",
            &service("b", &format!("10.43.1.{}", 10 + i)),
        );
        node.wait_table(&format!("10.43.1.{}", 10 + i));
    }
    assert!(node.alive(), "the agent died when its stderr closed");
    assert_eq!(node.stop(), Some(0), "SIGTERM: a clean exit");
}

#[test]
fn fifos_and_endless_files_neither_block_nor_stop_the_agent() {
    if !common::root("fifos_and_endless_files_neither_block_nor_stop_the_agent") {
        return;
    }
    let mut node = Node::new("fifo");
    let m = node.manifests();
    write(&m, "a.yaml", &service("a", "10.43.0.31"));
    node.start(Stdio::null());
    node.wait_table("10.43.0.31");
    let fifo = std::ffi::CString::new(m.join("x.yaml").to_string_lossy().as_bytes()).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    std::os::unix::fs::symlink("/dev/zero", m.join("zero.yaml")).unwrap();
    // Changes after them still arrive.
    write(&m, "b.yaml", &service("b", "10.43.0.32"));
    node.wait_table("10.43.0.32");
    write(&m, "b.yaml", &service("b", "10.43.0.33"));
    node.wait_table("10.43.0.33");
    assert!(node.alive());
    assert_eq!(node.stop(), Some(0));
}

#[test]
fn a_table_changed_behind_the_agents_back_is_repaired_at_once() {
    if !common::root("a_table_changed_behind_the_agents_back_is_repaired_at_once") {
        return;
    }
    let mut node = Node::new("drift");
    let m = node.manifests();
    write(&m, "a.yaml", &service("a", "10.43.0.41"));
    write(
        &m,
        "a-slice.yaml",
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: a-1, namespace: default, labels: {kubernetes.io/service-name: a}}\n\
         addressType: IPv4\nports: [{port: 80, protocol: TCP}]\n\
         endpoints: [{addresses: [10.42.0.5], conditions: {ready: true}}]\n",
    );
    node.start(Stdio::null());
    node.wait_table("10.42.0.5");
    let dnat = |t: &str| t.contains("dnat ip to 10.42.0.5:80");
    assert!(dnat(&node.table()));

    // 1. The DNAT rule deleted by handle (the chain's first rule, with the fingerprint, stays).
    let chain = "service-default/a/tcp/80";
    let listing = node.nft(&["-a", "list", "chain", "inet", "ferry", chain]);
    let handle = listing
        .lines()
        .find(|l| l.contains("dnat ip to 10.42.0.5:80"))
        .and_then(|l| l.rsplit("# handle ").next())
        .map(|h| h.trim().to_string())
        .expect("the dnat rule and its handle");
    node.nft(&["delete", "rule", "inet", "ferry", chain, "handle", &handle]);
    let t1 = node.until_table("deleted rule", dnat);

    // 2. A foreign rule in ferry's base chain.
    node.nft(&FOREIGN_RULE);
    let t2 = node.until_table("foreign rule", |t| !t.contains("9999"));

    // 3. The table deleted; 4. the whole ruleset flushed (a firewall reload).
    node.nft(&["delete", "table", "inet", "ferry"]);
    let t3 = node.until_table("deleted table", dnat);
    node.nft(&["flush", "ruleset"]);
    let t4 = node.until_table("flushed ruleset", dnat);
    eprintln!(
        "repaired: deleted rule in {t1:?}, foreign rule in {t2:?}, deleted table in {t3:?}, flushed ruleset in {t4:?}"
    );
    assert!(node.alive());
    assert_eq!(node.stop(), Some(0));
}

/// A large write (a cold load cut into several transactions) goes out of nftables' change
/// notifications; a foreign change while the agent is out (it stays out 3 s after writing here,
/// `FERRY_TEST_QUIET_PAUSE_MS`) is told by the ruleset's generation and repaired at once all the
/// same (the periodic resync is off). A small change afterwards stays in the notifications.
#[test]
fn a_change_while_the_agent_writes_out_of_the_notifications_is_repaired() {
    if !common::root("a_change_while_the_agent_writes_out_of_the_notifications_is_repaired") {
        return;
    }
    let mut node = Node::new("quiet");
    let m = node.manifests();
    // 400 services with an endpoint each: about 3,000 operations, more than one transaction.
    let mut text = String::new();
    for i in 0..400 {
        let name = format!("s{i}");
        text += "---\n";
        text += &service(&name, &format!("10.43.{}.{}", 10 + i / 200, 10 + i % 200));
        text += &format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nports: [{{port: 80, protocol: TCP}}]\n\
             endpoints: [{{addresses: [10.42.{}.{}], conditions: {{ready: true}}}}]\n",
            i / 200,
            10 + i % 200
        );
    }
    write(&m, "services.yaml", &text);
    let log = node.dir.join("agent.log");
    let child = node
        .agent_command(&["--resync-s", "0"])
        .env("FERRY_TEST_QUIET_PAUSE_MS", "3000")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    node.agent = Some(child);
    let out_line = "(test) out of nftables' notifications";
    let deadline = Instant::now() + CONVERGE;
    while !read_log(&log).contains(out_line) {
        assert!(Instant::now() < deadline, "never out:\n{}", read_log(&log));
        std::thread::sleep(Duration::from_millis(20));
    }
    // Written, not yet back in the group: another process adds a rule to ferry's base chain.
    assert!(node.table().contains("10.42.1.209:80"), "the load is in");
    node.nft(&FOREIGN_RULE);
    let took = node.until_table("foreign rule added while out", |t| !t.contains("9999"));
    eprintln!("repaired {took:?} after the foreign change (the agent was out 3 s of it)");
    let text = read_log(&log);
    assert!(
        text.contains("nftables: generation ") && text.contains("re-reading ferry's tables"),
        "{text}"
    );
    assert_eq!(text.matches(out_line).count(), 1, "{text}");

    // One more service: a small write, in the group as before (no pause, repaired at once).
    write(&m, "b.yaml", &service("b", "10.43.9.9"));
    node.wait_table("10.43.9.9");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(read_log(&log).matches(out_line).count(), 1);
    // Back in the group: a deleted table is noticed at once again.
    node.nft(&["delete", "table", "inet", "ferry"]);
    node.until_table("deleted table", |t| t.contains("10.43.9.9"));
    let text = read_log(&log);
    assert!(node.alive(), "{text}");
    assert_eq!(node.stop(), Some(0));
}

#[test]
fn a_second_agent_in_the_namespace_waits_for_the_first_or_refuses() {
    if !common::root("a_second_agent_in_the_namespace_waits_for_the_first_or_refuses") {
        return;
    }
    let mut node = Node::new("two");
    let m = node.manifests();
    write(&m, "a.yaml", &service("a", "10.43.0.51"));
    node.start(Stdio::null());
    node.wait_table("10.43.0.51");

    // A second agent that may wait 1 s: refuses, and leaves the first one's table alone.
    let out = node
        .agent_command(&["--wait-for-previous-s", "1"])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("another ferry agent runs in this network namespace"),
        "{err}"
    );
    assert!(node.alive());
    assert!(node.table().contains("10.43.0.51"));

    // A rolling update: the new agent waits; the old one stops; the new one takes over.
    let next = node
        .agent_command(&["--wait-for-previous-s", "30"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let mut next = next;
    assert!(next.try_wait().unwrap().is_none(), "the new agent waits");
    assert_eq!(node.stop(), Some(0));
    node.agent = Some(next);
    write(&m, "b.yaml", &service("b", "10.43.0.52"));
    node.wait_table("10.43.0.52");
    assert!(
        node.table().contains("10.43.0.51"),
        "the old rules were kept meanwhile"
    );
    assert_eq!(node.stop(), Some(0));
}

/// The agent's log so far (its stderr went to `log`).
fn read_log(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

#[test]
fn a_pool_over_the_lan_never_makes_the_node_claim_its_gateway_or_itself() {
    if !common::root("a_pool_over_the_lan_never_makes_the_node_claim_its_gateway_or_itself") {
        return;
    }
    // The agent's namespace with eth0 192.168.60.2/24 and a default route via .1, which lives
    // in a second namespace (the "router").
    let mut node = Node::new("gw");
    let router = format!("{}-r", node.ns);
    let sh = |args: &[&str]| {
        let ok = Command::new("ip").args(args).status().unwrap();
        assert!(ok.success(), "ip {args:?}");
    };
    sh(&["netns", "add", &router]);
    struct Gone(String);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _router = Gone(router.clone());
    sh(&[
        "-n", &node.ns, "link", "add", "eth0", "type", "veth", "peer", "name", "r0", "netns",
        &router,
    ]);
    sh(&[
        "-n",
        &node.ns,
        "addr",
        "add",
        "192.168.60.2/24",
        "dev",
        "eth0",
    ]);
    sh(&["-n", &node.ns, "link", "set", "eth0", "up"]);
    sh(&["-n", &node.ns, "link", "set", "lo", "up"]);
    sh(&[
        "-n",
        &node.ns,
        "route",
        "add",
        "default",
        "via",
        "192.168.60.1",
    ]);
    sh(&["-n", &router, "addr", "add", "192.168.60.1/24", "dev", "r0"]);
    sh(&["-n", &router, "link", "set", "r0", "up"]);

    // A pool over the start of the LAN, and three LoadBalancer services: they get .0, .1 (the
    // gateway, which only this node knows) and .3: never .2, the node's own address (no Node
    // objects here, so the host's addresses are the node's).
    let m = node.manifests();
    write(
        &m,
        "pool.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: config, namespace: metallb-system}\n\
         data:\n  config: |\n    address-pools:\n    - name: lan\n      protocol: layer2\n\
         \x20     addresses: [192.168.60.0/29]\n",
    );
    for (i, name) in ["s0", "s1", "s2"].iter().enumerate() {
        write(
            &m,
            &format!("{name}.yaml"),
            &format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default, \
                 creationTimestamp: '2026-01-01T00:00:0{i}Z'}}\n\
                 spec: {{type: LoadBalancer, selector: {{app: x}}, ports: [{{port: 80}}]}}\n"
            ),
        );
    }
    let log = node.dir.join("agent.log");
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &node.ns,
        FERRY,
        "agent",
        "--node",
        "n1",
        "--manifests",
    ])
    .arg(&m)
    .arg("--state-dir")
    .arg(node.dir.join("state"))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&log).unwrap());
    node.agent = Some(cmd.spawn().unwrap());

    // The first address is announced (after the 1 s hold-down); the gateway and the node's
    // own address are refused, with the reason.
    let deadline = Instant::now() + CONVERGE;
    loop {
        let text = read_log(&log);
        let done = text.contains("announcing 192.168.60.0 on eth0")
            && text.contains("announcing 192.168.60.3 on eth0")
            && text.contains("not announcing 192.168.60.1: it is a gateway of this node");
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "agent log:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let text = read_log(&log);
    for never in [
        "announcing 192.168.60.1 on",
        "announcing 192.168.60.2 on",
        "not announcing 192.168.60.2",
    ] {
        assert!(!text.contains(never), "{never}:\n{text}");
    }
    let kept = std::fs::read_to_string(node.dir.join("state").join("lb-allocations.json")).unwrap();
    assert!(
        !kept.contains("\"192.168.60.2\""),
        "the node's address was handed out: {kept}"
    );
    // Unused pool addresses are refused, but not the gateway's or the node's own: the pool set
    // the refusal rule reads has holes there.
    let listing = node.nft(&["list", "set", "inet", "ferry", "lb-pools-v4"]);
    let elements: String = listing
        .split_once("elements = {")
        .map(|(_, rest)| rest.split('}').next().unwrap_or_default().to_string())
        .unwrap_or_default();
    let elements: Vec<&str> = elements.split(',').map(str::trim).collect();
    assert_eq!(
        elements,
        ["192.168.60.0", "192.168.60.3-192.168.60.7"],
        "{listing}"
    );
    // A LAN neighbour whose address the pool covers (.5, unused by any service) stays
    // reachable from the node: the refusal applies to arriving traffic only.
    sh(&["-n", &router, "addr", "add", "192.168.60.5/24", "dev", "r0"]);
    let mut server = Command::new("ip")
        .args([
            "netns",
            "exec",
            &router,
            "python3",
            "-m",
            "http.server",
            "8080",
        ])
        .args(["--bind", "192.168.60.5"])
        .current_dir(&node.dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + CONVERGE;
    let code = loop {
        let out = Command::new("ip")
            .args(["netns", "exec", &node.ns, "curl", "-s", "-o", "/dev/null"])
            .args([
                "-w",
                "%{http_code}",
                "--max-time",
                "2",
                "http://192.168.60.5:8080/",
            ])
            .output()
            .unwrap();
        let code = String::from_utf8_lossy(&out.stdout).into_owned();
        if code == "200" || Instant::now() > deadline {
            break code;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(
        code, "200",
        "the node cannot reach its neighbour 192.168.60.5"
    );
    assert!(node.alive());
    assert_eq!(node.stop(), Some(0));
}

/// Issue 7, repro 5: with a full pool, the Services' file truncated for half a second and
/// written back (a non-atomic rewrite) moves no address and hands none to the pending one.
/// (Without the grace period, everything is allocated afresh in name order when the file comes
/// back: the pending "a" would take .200, "b" move to .201 and "c" lose its address.)
#[test]
fn a_file_truncated_for_a_moment_moves_no_address() {
    if !common::root("a_file_truncated_for_a_moment_moves_no_address") {
        return;
    }
    let mut node = Node::new("trunc");
    let m = node.manifests();
    write(
        &m,
        "pool.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: config, namespace: metallb-system}\n\
         data:\n  config: |\n    address-pools:\n    - name: two\n      protocol: layer2\n\
         \x20     addresses: [198.51.100.200-198.51.100.201]\n",
    );
    let svc = |name: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{type: LoadBalancer, selector: {{app: x}}, ports: [{{port: 80}}]}}\n"
        )
    };
    let state = node.dir.join("state").join("lb-allocations.json");
    let holders = || -> Vec<(String, String)> {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&state).unwrap_or_default())
                .unwrap_or_default();
        let mut out: Vec<(String, String)> = v["services"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, e)| (k.clone(), e["ips"].to_string()))
            .collect();
        out.sort();
        out
    };
    write(&m, "services.yaml", &(svc("b") + &svc("c")));
    node.start(Stdio::null());
    node.wait_table("198.51.100.201");
    // "a" comes later: the pool is full, it waits.
    let text = svc("a") + &svc("b") + &svc("c");
    write(&m, "services.yaml", &text);
    std::thread::sleep(Duration::from_secs(1));
    let before = holders();
    assert_eq!(
        before,
        [
            ("default/b".to_string(), r#"["198.51.100.200"]"#.to_string()),
            ("default/c".to_string(), r#"["198.51.100.201"]"#.to_string()),
        ]
    );
    // Truncated in place (as an editor or `>` would), then written back 0.5 s later.
    std::fs::write(m.join("services.yaml"), "").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(m.join("services.yaml"), &text).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(holders(), before, "an address moved");
    let table = node.table();
    assert!(table.contains("198.51.100.200") && table.contains("198.51.100.201"));
}

/// Uninstalling: with --cleanup-on-exit a stopped agent takes its table with it; without it
/// (upgrades, restarts) the rules stay.
#[test]
fn cleanup_on_exit_removes_the_table_and_only_then() {
    if !common::root("cleanup_on_exit_removes_the_table_and_only_then") {
        return;
    }
    let mut node = Node::new("cleanup");
    write(&node.manifests(), "a.yaml", &service("a", "10.43.0.41"));
    node.start(Stdio::null());
    node.wait_table("10.43.0.41");
    assert_eq!(node.stop(), Some(0));
    assert!(
        node.table().contains("10.43.0.41"),
        "a plain stop keeps the rules"
    );
    let child = node
        .agent_command(&["--cleanup-on-exit"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    node.agent = Some(child);
    std::thread::sleep(Duration::from_secs(1));
    assert!(node.table().contains("10.43.0.41"));
    assert_eq!(node.stop(), Some(0));
    assert_eq!(node.table(), "", "the table is gone");
}
