//! End to end through the Kubernetes API: the lab API server (`ferry-apiserver`) and agents
//! started with `--kubeconfig`, in two network namespaces of the test's own joined by a veth
//! pair (the "LAN" 192.168.60.0/24: node n1 .1 also hosts the API server, node n2 .2), driven
//! with kubectl as a user would.
//!
//! - the seed's path: a LoadBalancer Service pending, then an address from the ConfigMap pool
//!   written into its status by the elected controller (`kubectl get svc`), Events
//!   (`IPAllocated`, `nodeAssigned`), the Lease naming the leader, rules on both nodes;
//! - addresses already in status (a cluster moving from MetalLB) are kept, even where the
//!   allocator alone would have given them to an older Service, and so are those a node kept
//!   in manifest mode (a switch from manifests to the API);
//! - the leader stopped (SIGTERM: the Lease is released) or killed (SIGKILL: it expires):
//!   another node leads, no address changes, the new leader assigns new Services;
//! - the API server away for 10 s: the kernel table and the announcement stay exactly as they
//!   were; when it is back (its watch history gone: watches get 410 and list again), a change
//!   made meanwhile is applied.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::FERRY;

const API: &str = "192.168.60.1:6443";

struct Cluster {
    tag: String,
    dir: PathBuf,
    /// Namespaces: [n1 (with the API server), n2].
    ns: [String; 2],
    api: Option<Child>,
    apiserver: PathBuf,
    agents: [Option<Child>; 2],
}

const NODES: [&str; 2] = ["n1", "n2"];

fn sh(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(st.success(), "{args:?}");
}

impl Cluster {
    fn new(tag: &str) -> Option<Cluster> {
        if !common::root(tag) {
            return None;
        }
        let apiserver = common::build_binary("ferry-apiserver", "ferry-apiserver");
        let tag = format!("fk{}-{}", tag, std::process::id());
        let ns = [format!("{tag}-n1"), format!("{tag}-n2")];
        let dir = std::env::temp_dir().join(&tag);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let c = Cluster {
            tag,
            dir,
            ns: ns.clone(),
            api: None,
            apiserver,
            agents: [None, None],
        };
        for n in &ns {
            sh(&["ip", "netns", "add", n]);
            sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
        }
        sh(&[
            "ip", "-n", &ns[0], "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
            "netns", &ns[1],
        ]);
        for (i, n) in ns.iter().enumerate() {
            let addr = format!("192.168.60.{}/24", i + 1);
            sh(&["ip", "-n", n, "addr", "add", &addr, "dev", "eth0"]);
            sh(&["ip", "-n", n, "link", "set", "eth0", "up"]);
        }
        std::fs::write(
            c.kubeconfig(),
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster: {{server: 'http://{API}'}}\nusers:\n- name: lab\n  user: {{}}\ncontexts:\n- name: lab\n  context: {{cluster: lab, user: lab, namespace: default}}\ncurrent-context: lab\n"
            ),
        )
        .unwrap();
        Some(c)
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    fn log(&self, i: usize) -> PathBuf {
        self.dir.join(format!("agent-{}.log", NODES[i]))
    }

    fn start_api(&mut self) {
        self.start_api_with(&[]);
    }

    fn start_api_with(&mut self, extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("api.log"))
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns[0]])
            .arg(&self.apiserver)
            .args(["--listen", API, "--state"])
            .arg(self.dir.join("api-state.json"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.api = Some(child);
        let t0 = Instant::now();
        while self.try_kubectl(&["get", "--raw", "/version"]).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "API server never up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill_api(&mut self) {
        if let Some(mut c) = self.api.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn start_agent(&mut self, i: usize) {
        self.start_agent_with(i, &[]);
    }

    fn start_agent_with(&mut self, i: usize, extra: &[&str]) {
        let kubeconfig = self.kubeconfig();
        self.start_agent_kc(i, &kubeconfig, extra);
    }

    fn start_agent_kc(&mut self, i: usize, kubeconfig: &std::path::Path, extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(i))
            .unwrap();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns[i],
                FERRY,
                "agent",
                "--node",
                NODES[i],
            ])
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--state-dir")
            .arg(self.dir.join(format!("state-{}", NODES[i])))
            .args(["--metrics-addr", "127.0.0.1:10249"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agents[i] = Some(child);
    }

    /// Ends agent `i` with `signal` and waits for it.
    fn stop_agent(&mut self, i: usize, signal: i32) {
        if let Some(mut c) = self.agents[i].take() {
            // SAFETY: kill(2) on the PID of our own child.
            unsafe { libc::kill(c.id() as i32, signal) };
            let _ = c.wait();
        }
    }

    fn try_kubectl(&self, args: &[&str]) -> Result<String, String> {
        self.kubectl_with(args, None)
    }

    fn kubectl_with(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns[0], "kubectl", "--kubeconfig"])
            .arg(self.kubeconfig())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        let mut child = cmd.spawn().unwrap();
        if let Some(text) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
        }
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "kubectl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn kubectl(&self, args: &[&str]) -> String {
        self.try_kubectl(args).unwrap_or_else(|e| panic!("{e}"))
    }

    fn apply(&self, yaml: &str) {
        self.kubectl_with(&["apply", "-f", "-"], Some(yaml))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// The addresses in a Service's status.
    fn ingress(&self, svc: &str) -> String {
        self.kubectl(&[
            "get",
            "svc",
            svc,
            "-o",
            "jsonpath={.status.loadBalancer.ingress[*].ip}",
        ])
    }

    fn wait_ingress(&self, svc: &str, want: &str, within: Duration) -> Duration {
        let t0 = Instant::now();
        loop {
            let got = self.ingress(svc);
            if got == want {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < within,
                "{svc}: status has {got:?}, want {want:?}\nn1:\n{}\nn2:\n{}",
                self.read_log(0),
                self.read_log(1)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn holder(&self) -> String {
        self.try_kubectl(&[
            "-n",
            "ferry-system",
            "get",
            "lease",
            "ferry-lb-controller",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
        .unwrap_or_default()
    }

    /// Waits (bounded) until `node` holds the Lease; how long it took.
    fn wait_holder(&self, node: &str, within: Duration) -> Duration {
        let t0 = Instant::now();
        while self.holder() != node {
            assert!(t0.elapsed() < within, "{node} never took the lease");
            std::thread::sleep(Duration::from_millis(100));
        }
        t0.elapsed()
    }

    fn read_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.log(i)).unwrap_or_default()
    }

    fn table(&self, i: usize) -> String {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns[i],
                "nft",
                "list",
                "table",
                "inet",
                "ferry",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_table(&self, i: usize, what: &str, check: impl Fn(&str) -> bool) {
        let t0 = Instant::now();
        while !check(&self.table(i)) {
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "{what} never on {}:\n{}\nlog:\n{}",
                NODES[i],
                self.table(i),
                self.read_log(i)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The cluster's base objects: namespaces, both Nodes, the seed's pool (as a ConfigMap).
    fn base(&self) {
        self.apply(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: ferry-system}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: metallb-system}\n",
        );
        let mut nodes = String::new();
        for (i, n) in NODES.iter().enumerate() {
            nodes.push_str(&format!(
                "---\napiVersion: v1\nkind: Node\nmetadata: {{name: {n}, labels: {{kubernetes.io/hostname: {n}}}}}\nstatus:\n  addresses: [{{type: InternalIP, address: 192.168.60.{}}}]\n",
                i + 1
            ));
        }
        self.apply(&nodes);
        self.apply(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: config, namespace: metallb-system}\ndata:\n  config: |\n    address-pools:\n    - name: default\n      protocol: layer2\n      addresses:\n      - 192.168.60.200-192.168.60.203\n",
        );
    }
}

fn lb_service(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  type: LoadBalancer\n  selector: {{app: {name}}}\n  ports: [{{port: 80, targetPort: 8080}}]\n"
    )
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..2 {
            if let Some(mut c) = self.agents[i].take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        self.kill_api();
        for n in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("{}: logs kept in {}", self.tag, self.dir.display());
        }
    }
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

fn wait_log(c: &Cluster, i: usize, needle: &str, within: Duration) -> Duration {
    let t0 = Instant::now();
    while !c.read_log(i).contains(needle) {
        assert!(
            t0.elapsed() < within,
            "{} never logged {needle:?}:\n{}",
            NODES[i],
            c.read_log(i)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    t0.elapsed()
}

#[test]
fn seed_journey_through_the_api() {
    let Some(mut c) = Cluster::new("seed") else {
        return;
    };
    c.start_api();
    c.base();
    c.apply(&lb_service("web"));
    // Nobody assigns it before an agent runs: pending, as `kubectl get svc` shows.
    let svc = c.kubectl(&["get", "svc", "web"]);
    assert!(svc.contains("<pending>"), "{svc}");
    c.start_agent(0);
    c.start_agent(1);
    let took = c.wait_ingress("web", "192.168.60.200", Duration::from_secs(20));
    eprintln!("address written {took:?} after the agents started");
    let svc = c.kubectl(&["get", "svc", "web"]);
    assert!(svc.contains("192.168.60.200"), "{svc}");
    let mode = c.kubectl(&[
        "get",
        "svc",
        "web",
        "-o",
        "jsonpath={.status.loadBalancer.ingress[0].ipMode}",
    ]);
    assert_eq!(mode, "VIP");
    let holder = c.holder();
    assert!(NODES.contains(&holder.as_str()), "lease holder {holder:?}");
    // Cluster IP and node port as the API server allocated them, on both nodes.
    let cip = c.kubectl(&["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"]);
    let np = c.kubectl(&[
        "get",
        "svc",
        "web",
        "-o",
        "jsonpath={.spec.ports[0].nodePort}",
    ]);
    for i in 0..2 {
        c.wait_table(i, "cluster IP, node port and LB address", |t| {
            t.contains(&cip) && t.contains(&np) && t.contains("192.168.60.200")
        });
    }
    // Exactly one node announces it, and says so in an Event.
    let t0 = Instant::now();
    let announcers = loop {
        let a: Vec<usize> = (0..2)
            .filter(|i| c.read_log(*i).contains("announcing 192.168.60.200"))
            .collect();
        if !a.is_empty() || t0.elapsed() > Duration::from_secs(10) {
            break a;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(announcers.len(), 1, "announcers {announcers:?}");
    let t0 = Instant::now();
    let events = loop {
        let ev = c.kubectl(&["get", "events"]);
        if ev.contains("nodeAssigned") || t0.elapsed() > Duration::from_secs(10) {
            break ev;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(events.contains("IPAllocated"), "{events}");
    assert!(
        events.contains(r#"Assigned IP ["192.168.60.200"]"#),
        "{events}"
    );
    assert!(
        events.contains(&format!(
            r#"announcing from node "{}""#,
            NODES[announcers[0]]
        )),
        "{events}"
    );
    // `ferry explain` asks the API too: the address is web's, which has no endpoints.
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &c.ns[0],
            FERRY,
            "explain",
            "--node",
            "n1",
            "--kubeconfig",
        ])
        .arg(c.kubeconfig())
        .args(["--from", "192.168.60.99", "--to", "192.168.60.200:80"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("service default/web") && text.contains("rejected"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The pool runs dry: pending, with the reason in an Event.
    for n in ["b", "c", "d", "e"] {
        c.apply(&lb_service(n));
    }
    c.wait_ingress("d", "192.168.60.203", Duration::from_secs(10));
    let t0 = Instant::now();
    loop {
        let ev = c.kubectl(&["get", "events", "--field-selector", "involvedObject.name=e"]);
        if ev.contains("AllocationFailed") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no AllocationFailed: {ev}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(c.ingress("e"), "");
    // Deleting a Service frees its address for the pending one.
    c.kubectl(&["delete", "svc", "b"]);
    c.wait_ingress("e", "192.168.60.201", Duration::from_secs(10));
    // A Service of another loadBalancerClass is never touched.
    c.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: other}\nspec:\n  type: LoadBalancer\n  loadBalancerClass: example.com/other\n  ports: [{port: 80}]\n",
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(c.ingress("other"), "");
    // Deleted from the API: gone from the kernel.
    c.kubectl(&["delete", "svc", "web"]);
    for i in 0..2 {
        c.wait_table(i, "web removed", |t| !t.contains(&cip));
    }
}

#[test]
fn addresses_in_status_are_kept() {
    let Some(mut c) = Cluster::new("keep") else {
        return;
    };
    c.start_api();
    c.base();
    // "older" is created first: alone, the allocator would give it the pool's first address.
    c.apply(&lb_service("older"));
    std::thread::sleep(Duration::from_millis(1100));
    c.apply(&lb_service("migrated"));
    // MetalLB had given "migrated" .200 (and another controller gave "foreign" an address
    // outside ferry's pools).
    c.kubectl(&[
        "patch",
        "svc",
        "migrated",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"loadBalancer":{"ingress":[{"ip":"192.168.60.200","ipMode":"VIP"}]}}}"#,
    ]);
    // "switched" ran in manifest mode on this node, which kept .203 for it in its state dir
    // (the allocator alone would give it .202).
    c.apply(&lb_service("switched"));
    let state = c.dir.join("state-n1");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(
        state.join("lb-allocations.json"),
        r#"{"services":{"default/switched":{"ips":["192.168.60.203"],"pool":"default","updated_ms":1}}}"#,
    )
    .unwrap();
    c.start_agent(0);
    c.wait_ingress("older", "192.168.60.201", Duration::from_secs(20));
    assert_eq!(
        c.ingress("migrated"),
        "192.168.60.200",
        "the address stayed"
    );
    c.wait_ingress("switched", "192.168.60.203", Duration::from_secs(5));
    // Restarting the controller changes nothing.
    c.stop_agent(0, libc::SIGTERM);
    c.start_agent(0);
    wait_log(
        &c,
        0,
        "services: table already as planned",
        Duration::from_secs(15),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(c.ingress("migrated"), "192.168.60.200");
    assert_eq!(c.ingress("older"), "192.168.60.201");
    assert_eq!(c.ingress("switched"), "192.168.60.203");
    assert_eq!(
        count(&c.read_log(0), "assigned 192.168.60.20"),
        2,
        "{}",
        c.read_log(0)
    );
}

#[test]
fn leader_stopped_or_killed_another_takes_over_and_no_address_moves() {
    let Some(mut c) = Cluster::new("lead") else {
        return;
    };
    c.start_api();
    c.base();
    c.apply(&lb_service("a"));
    c.start_agent(0);
    c.wait_ingress("a", "192.168.60.200", Duration::from_secs(20));
    assert_eq!(c.holder(), "n1");
    c.start_agent(1);
    wait_log(
        &c,
        1,
        "the load-balancer controller runs on n1",
        Duration::from_secs(10),
    );
    // The metrics say who leads.
    let leader_metric = |i: usize| -> String {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &c.ns[i],
                "curl",
                "-s",
                "http://127.0.0.1:10249/metrics",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with("ferry_lb_controller_leader "))
            .unwrap_or("")
            .to_string()
    };
    let t0 = Instant::now();
    while leader_metric(0) != "ferry_lb_controller_leader 1"
        || leader_metric(1) != "ferry_lb_controller_leader 0"
    {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{} / {}",
            leader_metric(0),
            leader_metric(1)
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // SIGTERM: the Lease is released, n2 leads at its next attempt (every 2 s).
    c.stop_agent(0, libc::SIGTERM);
    let took = c.wait_holder("n2", Duration::from_secs(6));
    eprintln!("released lease taken after {took:?}");
    c.apply(&lb_service("b"));
    c.wait_ingress("b", "192.168.60.201", Duration::from_secs(10));
    assert_eq!(c.ingress("a"), "192.168.60.200");

    // SIGKILL: nobody releases; the Lease expires (15 s unchanged) and n1 takes it.
    c.start_agent(0);
    wait_log(
        &c,
        0,
        "the load-balancer controller runs on n2",
        Duration::from_secs(10),
    );
    c.stop_agent(1, libc::SIGKILL);
    let took = c.wait_holder("n1", Duration::from_secs(25));
    eprintln!("expired lease taken after {took:?}");
    c.apply(&lb_service("c"));
    c.wait_ingress("c", "192.168.60.202", Duration::from_secs(10));
    assert_eq!(c.ingress("a"), "192.168.60.200");
    assert_eq!(c.ingress("b"), "192.168.60.201");
}

#[test]
fn api_server_away_changes_nothing_and_changes_apply_when_back() {
    let Some(mut c) = Cluster::new("away") else {
        return;
    };
    c.start_api();
    c.base();
    c.apply(&lb_service("web"));
    c.start_agent(0);
    c.start_agent(1);
    c.wait_ingress("web", "192.168.60.200", Duration::from_secs(20));
    for i in 0..2 {
        c.wait_table(i, "web", |t| t.contains("192.168.60.200"));
    }
    let announcer = |c: &Cluster| -> Vec<usize> {
        (0..2)
            .filter(|i| {
                let log = c.read_log(*i);
                log.rfind("announcing 192.168.60.200") > log.rfind("withdrawing 192.168.60.200")
            })
            .collect()
    };
    let t0 = Instant::now();
    while announcer(&c).len() != 1 {
        assert!(t0.elapsed() < Duration::from_secs(10), "no announcer");
        std::thread::sleep(Duration::from_millis(100));
    }
    let before: Vec<String> = (0..2).map(|i| c.table(i)).collect();
    let who = announcer(&c);
    c.kill_api();
    // 10 s without the API server: nothing moves.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        for i in 0..2 {
            assert_eq!(c.table(i), before[i], "{} changed its table", NODES[i]);
        }
        assert_eq!(announcer(&c), who, "the announcer changed");
        std::thread::sleep(Duration::from_millis(500));
    }
    for i in 0..2 {
        assert!(
            c.read_log(i).contains("objects kept as last seen"),
            "{}",
            c.read_log(i)
        );
    }
    // Back, with its objects but not its watch history: watches get 410 and list again.
    c.start_api();
    c.apply(&lb_service("later"));
    c.wait_ingress("later", "192.168.60.201", Duration::from_secs(30));
    for i in 0..2 {
        c.wait_table(i, "the Service made after the API server came back", |t| {
            t.contains("192.168.60.201")
        });
        // Everything else as it was.
        assert!(c.table(i).contains("192.168.60.200"));
    }
    assert_eq!(c.ingress("web"), "192.168.60.200");
}

#[test]
fn roles_load_balancer_only_and_proxy_only() {
    let Some(mut c) = Cluster::new("roles") else {
        return;
    };
    c.start_api();
    c.base();
    c.apply(&lb_service("web"));
    // Beside kube-proxy: addresses and announcement, no nftables at all.
    for i in 0..2 {
        c.start_agent_with(i, &["--role", "load-balancer"]);
    }
    c.wait_ingress("web", "192.168.60.200", Duration::from_secs(20));
    let t0 = Instant::now();
    while !(0..2).any(|i| c.read_log(i).contains("announcing 192.168.60.200")) {
        assert!(t0.elapsed() < Duration::from_secs(10), "nobody announces");
        std::thread::sleep(Duration::from_millis(100));
    }
    for (i, node) in NODES.iter().enumerate() {
        assert_eq!(c.table(i), "", "role load-balancer wrote rules on {node}");
    }
    for i in 0..2 {
        c.stop_agent(i, libc::SIGTERM);
    }
    // kube-proxy's part only: the rules, for addresses someone else wrote too; no Lease, no
    // announcement, no status writes.
    c.kubectl(&[
        "patch",
        "svc",
        "web",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"loadBalancer":{"ingress":[{"ip":"203.0.113.7"}]}}}"#,
    ]);
    let holder_before = c.kubectl(&[
        "-n",
        "ferry-system",
        "get",
        "lease",
        "ferry-lb-controller",
        "-o",
        "jsonpath={.spec.renewTime}",
    ]);
    let logs_before: Vec<usize> = (0..2).map(|i| c.read_log(i).len()).collect();
    for i in 0..2 {
        c.start_agent_with(i, &["--role", "proxy"]);
    }
    for i in 0..2 {
        c.wait_table(i, "the address another controller wrote", |t| {
            t.contains("203.0.113.7")
        });
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        c.ingress("web"),
        "203.0.113.7",
        "a proxy never writes status"
    );
    let renew_after = c.kubectl(&[
        "-n",
        "ferry-system",
        "get",
        "lease",
        "ferry-lb-controller",
        "-o",
        "jsonpath={.spec.renewTime}",
    ]);
    assert_eq!(
        renew_after, holder_before,
        "a proxy never touches the Lease"
    );
    for (i, before) in logs_before.iter().enumerate() {
        let new = &c.read_log(i)[*before..];
        assert!(!new.contains("announcing"), "{new}");
        assert!(!new.contains("membership"), "{new}");
    }
}

/// The (apiGroup, resource, verb) triples the roles bound to ferry's ServiceAccount in
/// deploy/ferry.yaml grant.
fn granted_by_deploy() -> std::collections::BTreeSet<(String, String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/ferry.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
    let mut out = std::collections::BTreeSet::new();
    for d in docs {
        if !matches!(d["kind"].as_str(), Some("Role" | "ClusterRole")) {
            continue;
        }
        for r in d["rules"].as_array().unwrap() {
            let list = |k: &str| -> Vec<String> {
                r[k].as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect()
            };
            for g in list("apiGroups") {
                for res in list("resources") {
                    for v in list("verbs") {
                        out.insert((g.clone(), res.clone(), v));
                    }
                }
            }
        }
    }
    out
}

#[test]
fn rbac_is_least_privilege() {
    let Some(mut c) = Cluster::new("rbac") else {
        return;
    };
    let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/ferry.yaml");
    c.start_api_with(&[
        "--authorize",
        deploy,
        "--token",
        "agent-token=system:serviceaccount:ferry-system:ferry",
    ]);
    c.base();
    // The agents present the ServiceAccount's token.
    let kc = c.dir.join("agent-kubeconfig");
    std::fs::write(
        &kc,
        std::fs::read_to_string(c.kubeconfig())
            .unwrap()
            .replace("user: {}", "user: {token: agent-token}"),
    )
    .unwrap();
    c.apply(&lb_service("web"));
    c.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: np}\nspec:\n  type: NodePort\n  selector: {app: np}\n  ports: [{port: 80}]\n",
    );
    for i in 0..2 {
        c.start_agent_kc(i, &kc, &[]);
    }
    c.wait_ingress("web", "192.168.60.200", Duration::from_secs(20));
    let announcer = |c: &Cluster| -> Option<usize> {
        (0..2).find(|i| {
            let log = c.read_log(*i);
            log.rfind("announcing 192.168.60.200") > log.rfind("withdrawing 192.168.60.200")
        })
    };
    let wait_announcer = |c: &Cluster, not: Option<usize>| -> usize {
        let t0 = Instant::now();
        loop {
            if let Some(a) = announcer(c).filter(|a| Some(*a) != not) {
                return a;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "no announcer");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // The other node stops: no majority of two, so the announcer withdraws; it comes back
    // and the same node (the election is deterministic) announces again: its second
    // nodeAssigned Event is the same as its first, so its recorder patches it (a series).
    let t0 = Instant::now();
    while !c.kubectl(&["get", "events"]).contains("nodeAssigned") {
        assert!(t0.elapsed() < Duration::from_secs(15), "no nodeAssigned");
        std::thread::sleep(Duration::from_millis(200));
    }
    let first = wait_announcer(&c, None);
    let other = 1 - first;
    c.stop_agent(other, libc::SIGTERM);
    let t0 = Instant::now();
    while announcer(&c).is_some() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no withdrawal without a majority"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c.start_agent_kc(other, &kc, &[]);
    assert_eq!(
        wait_announcer(&c, None),
        first,
        "the election moved the address"
    );
    let t0 = Instant::now();
    while count(&c.read_log(first), "announcing 192.168.60.200") < 2
        || !c
            .kubectl(&["get", "events", "-o", "yaml"])
            .contains("count: 2")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no second nodeAssigned: {}",
            c.kubectl(&["get", "events", "-o", "yaml"])
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let seen: serde_json::Value =
        serde_json::from_str(&c.kubectl(&["get", "--raw", "/debug/ferry/authz"])).unwrap();
    let accesses = seen["accesses"].as_array().unwrap();
    assert!(!accesses.is_empty());
    let refused: Vec<&serde_json::Value> = accesses
        .iter()
        .filter(|a| a["allowed"] == serde_json::Value::Bool(false))
        .collect();
    assert!(
        refused.is_empty(),
        "the agent needed more than deploy/ferry.yaml grants: {refused:#?}"
    );
    let used: std::collections::BTreeSet<(String, String, String)> = accesses
        .iter()
        .map(|a| {
            (
                a["apiGroup"].as_str().unwrap().to_string(),
                a["resource"].as_str().unwrap().to_string(),
                a["verb"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let unused: Vec<_> = granted_by_deploy().difference(&used).cloned().collect();
    assert!(
        unused.is_empty(),
        "deploy/ferry.yaml grants what no request used: {unused:?}\nused: {used:?}"
    );
    for i in 0..2 {
        assert!(!c.read_log(i).contains("Forbidden"), "{}", c.read_log(i));
    }
}

/// `podman` with the settings this kind of machine needs: runc (crun refuses hybrid
/// cgroups), cgroupfs, and rlimits within the sandbox's own (podman's defaults exceed them).
fn podman(args: &[&str]) -> std::process::Output {
    let nofile = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(4).map(str::to_string))
        })
        .unwrap_or_else(|| "1024".into());
    let mut cmd = Command::new("podman");
    cmd.args(["--cgroup-manager=cgroupfs"]).args(args);
    if args.first() == Some(&"run") {
        // Only for `run`: the flags go after the subcommand.
        cmd = Command::new("podman");
        let ulimit = format!("nofile={nofile}:{nofile}");
        cmd.args(["--cgroup-manager=cgroupfs", "run", "--runtime", "runc"])
            .args([
                "--pull",
                "never",
                "--ulimit",
                &ulimit,
                "--ulimit",
                "nproc=4096:4096",
            ])
            .args(&args[1..]);
    }
    cmd.output().unwrap()
}

#[test]
fn image_runs_the_agent_and_the_node_forwards_a_node_port() {
    let Some(mut c) = Cluster::new("image") else {
        return;
    };
    for tool in ["podman", "umoci", "skopeo", "runc"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .unwrap()
            .status
            .success();
        if !found {
            assert!(
                std::env::var_os("CI").is_none_or(|v| v.is_empty()),
                "{tool} is missing (CI installs it)"
            );
            println!("ferry-test-skipped: image test: {tool} is not installed");
            return;
        }
    }
    // The image, from the binary under test (stripped), nothing pulled.
    let tag = format!("test-{}", std::process::id());
    let out = c.dir.join("image");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/build-image.sh");
    let built = Command::new(script)
        .args(["--binary", FERRY, "--tag", &tag, "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "build-image.sh: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let report = String::from_utf8_lossy(&built.stdout).into_owned();
    eprintln!("{report}");
    assert!(report.contains("libnftables.so.1"), "{report}");
    let image = format!("localhost/ferry:{tag}");
    let tar = out.join("ferry-image.tar");
    let loaded = podman(&["load", "-q", "-i", tar.to_str().unwrap()]);
    assert!(
        loaded.status.success(),
        "{}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    struct Cleanup(String, String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = podman(&["rm", "-f", &self.0]);
            let _ = podman(&["rmi", "-f", &self.1]);
        }
    }
    let name = format!("ferry-{tag}");
    let _cleanup = Cleanup(name.clone(), image.clone());

    c.start_api();
    c.base();
    sh(&[
        "ip",
        "netns",
        "exec",
        &c.ns[0],
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ]);
    // The endpoint: a web server on the other node's address (no agent there).
    let mut server = Command::new("ip")
        .args([
            "netns",
            "exec",
            &c.ns[1],
            "python3",
            "-m",
            "http.server",
            "8080",
        ])
        .args(["--bind", "192.168.60.2"])
        .current_dir(&c.dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    c.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  type: NodePort\n  ports: [{port: 80, targetPort: 8080}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  labels: {kubernetes.io/service-name: web}\naddressType: IPv4\nendpoints:\n- addresses: [192.168.60.2]\n  conditions: {ready: true}\nports: [{port: 8080, protocol: TCP}]\n",
    );
    // The agent as the DaemonSet runs it: host network (the node's namespace), only
    // NET_ADMIN and NET_RAW, a read-only root.
    let state = c.dir.join("image-state");
    std::fs::create_dir_all(&state).unwrap();
    let netns = format!("ns:/run/netns/{}", c.ns[0]);
    let kc = format!("{}:/kubeconfig:ro", c.kubeconfig().display());
    let st = format!("{}:/var/lib/ferry", state.display());
    let run = podman(&[
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        &netns,
        "--cap-drop",
        "ALL",
        "--cap-add",
        "NET_ADMIN,NET_RAW",
        "--read-only",
        "-v",
        &kc,
        "-v",
        &st,
        &image,
        "agent",
        "--kubeconfig",
        "/kubeconfig",
        "--node",
        "n1",
        "--state-dir",
        "/var/lib/ferry",
        "--metrics-addr",
        "127.0.0.1:10249",
    ]);
    assert!(
        run.status.success(),
        "podman run: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let np = c.kubectl(&[
        "get",
        "svc",
        "web",
        "-o",
        "jsonpath={.spec.ports[0].nodePort}",
    ]);
    let url = format!("http://192.168.60.1:{np}/");
    let t0 = Instant::now();
    let answered = loop {
        let out = Command::new("ip")
            .args(["netns", "exec", &c.ns[1], "curl", "-s", "-o", "/dev/null"])
            .args(["-w", "%{http_code}", "--max-time", "2", &url])
            .output()
            .unwrap();
        let code = String::from_utf8_lossy(&out.stdout).into_owned();
        if code == "200" {
            break true;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let logs = podman(&["logs", &name]);
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        answered,
        "node port {url} never answered; agent log:\n{}{}",
        String::from_utf8_lossy(&logs.stdout),
        String::from_utf8_lossy(&logs.stderr)
    );
    // Its health endpoint answers where the DaemonSet's probes look.
    let health = Command::new("ip")
        .args([
            "netns",
            "exec",
            &c.ns[0],
            "curl",
            "-s",
            "http://127.0.0.1:10249/readyz",
        ])
        .output()
        .unwrap();
    assert_eq!(health.status.code(), Some(0));
}
