//! BGP mode end to end (issue 10): two `ferry agent`s, each in a node namespace, read one
//! manifest directory with MetalLB's BGP configuration (an IPAddressPool, a BGPAdvertisement,
//! a BGPPeer pointing at the router) and announce the load-balancer address to a router
//! namespace running BIRD 2 with `merge paths on`; the router's kernel FIB gets one ECMP route
//! over the nodes that are eligible. A client namespace behind the router reaches the Service
//! through it.
//!
//! ```text
//!  client 10.98.0.2 ── 10.98.0.1 router (BIRD, AS 64600) br0 10.97.0.1/24
//!                                   ├── n1 10.97.0.11 (ferry agent, AS 64601)
//!                                   └── n2 10.97.0.12 (ferry agent, AS 64601)
//! ```
//!
//! Needs root and bird2 (scripts/install-deps.sh); otherwise it prints `ferry-test-skipped:`
//! and passes, unless CI is set: then it fails. Agents and BIRD are killed by PID and the
//! namespaces deleted when the bed drops, also on panic.
//!
//! BFD: with a BFDProfile on the BGPPeer and BIRD running `protocol bfd` with `bfd on`, a
//! node whose link is cut leaves the router's route within a few hundred milliseconds; without
//! BFD only when the hold time runs out.
//!
//! Run: `cargo test -p ferry --test e2e_bgp -- --test-threads 1 --nocapture`

mod common;

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const VIP: &str = "10.99.0.10";
const VIP6: &str = "fd00:99::10";
const ROUTER_ASN: u32 = 64600;
const NODE_ASN: u32 = 64601;

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn run(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn must(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn node_addr(i: usize) -> String {
    format!("10.97.0.1{i}")
}

fn node_addr6(i: usize) -> String {
    format!("fd00:97::1{i}")
}

/// Root and BIRD; else skip (fail under CI).
fn ready(test: &str) -> bool {
    if !ferry_lab::require_root(test) {
        return false;
    }
    let found = Command::new("sh")
        .args([
            "-c",
            "command -v bird && command -v birdc && command -v curl",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        ferry_lab::skip(
            test,
            "bird2 or curl is not installed (scripts/install-deps.sh)",
        );
    }
    found
}

/// The namespaces, BIRD, the agents and a web server; all gone on drop.
struct Bed {
    prefix: String,
    dir: PathBuf,
    namespaces: Vec<String>,
    bird: Option<Child>,
    agents: Vec<Option<Child>>,
    servers: Vec<Child>,
    /// The lab API server (API mode), in the router namespace.
    api: Option<Child>,
}

impl Drop for Bed {
    fn drop(&mut self) {
        let api = self.api.iter_mut();
        for c in self
            .agents
            .iter_mut()
            .flatten()
            .chain(self.servers.iter_mut())
            .chain(api)
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(b) = &mut self.bird {
            let _ = b.kill();
            let _ = b.wait();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = run(&["ip", "netns", "del", ns]);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Bed {
    fn new(nodes: usize) -> Bed {
        Bed::with_bfd(nodes, false)
    }

    /// `bfd`: BIRD also runs BFD (100 ms x 3) with every node and `bfd on` on its sessions.
    fn with_bfd(nodes: usize, bfd: bool) -> Bed {
        let prefix = format!(
            "fbgpe{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(&prefix);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("manifests")).unwrap();
        fs::create_dir_all(dir.join("state")).unwrap();
        let mut bed = Bed {
            prefix,
            dir,
            namespaces: Vec::new(),
            bird: None,
            agents: Vec::new(),
            servers: Vec::new(),
            api: None,
        };
        let (r, c) = (bed.router(), bed.ns("c"));
        bed.netns(&r);
        bed.netns(&c);
        bed.ip(&r, "link add br0 type bridge");
        bed.ip(&r, "link set br0 up");
        bed.ip(&r, "addr add 10.97.0.1/24 dev br0");
        bed.ip(&r, "addr add fd00:97::1/64 dev br0 nodad");
        bed.ip(
            &r,
            &format!("link add c0 type veth peer name eth0 netns {c}"),
        );
        bed.ip(&r, "link set c0 up");
        bed.ip(&r, "addr add 10.98.0.1/24 dev c0");
        bed.ip(&c, "link set eth0 up");
        bed.ip(&c, "addr add 10.98.0.2/24 dev eth0");
        bed.ip(&c, "route add default via 10.98.0.1");
        bed.sysctl(&r, "net.ipv4.ip_forward=1");
        for key in ["iptables", "ip6tables", "arptables"] {
            // Bridge netfilter may not be there at all: then nothing to turn off.
            let _ = run(&[
                "ip",
                "netns",
                "exec",
                &r,
                "sysctl",
                "-qw",
                &format!("net.bridge.bridge-nf-call-{key}=0"),
            ]);
        }
        for i in 1..=nodes {
            let n = bed.node(i);
            bed.netns(&n);
            bed.ip(
                &r,
                &format!("link add v{i} type veth peer name eth0 netns {n}"),
            );
            bed.ip(&r, &format!("link set v{i} master br0 up"));
            bed.ip(&n, "link set eth0 up");
            bed.ip(&n, &format!("addr add {}/24 dev eth0", node_addr(i)));
            bed.ip(&n, &format!("addr add {}/64 dev eth0 nodad", node_addr6(i)));
            bed.ip(&n, "route add default via 10.97.0.1");
            bed.sysctl(&n, "net.ipv4.ip_forward=1");
            bed.agents.push(None);
        }
        bed.start_bird(nodes, bfd);
        bed
    }

    fn ns(&self, what: &str) -> String {
        format!("{}-{what}", self.prefix)
    }
    fn router(&self) -> String {
        self.ns("r")
    }
    fn client(&self) -> String {
        self.ns("c")
    }
    fn node(&self, i: usize) -> String {
        self.ns(&format!("n{i}"))
    }

    fn netns(&mut self, name: &str) {
        must(&["ip", "netns", "add", name]);
        self.namespaces.push(name.to_string());
        must(&["ip", "-n", name, "link", "set", "lo", "up"]);
    }

    fn ip(&self, ns: &str, args: &str) {
        let mut a = vec!["ip", "-n", ns];
        a.extend(args.split_whitespace());
        must(&a);
    }

    fn sysctl(&self, ns: &str, kv: &str) {
        must(&["ip", "netns", "exec", ns, "sysctl", "-qw", kv]);
    }

    fn sock(&self) -> String {
        self.dir.join("bird.ctl").display().to_string()
    }

    fn start_bird(&mut self, nodes: usize, bfd: bool) {
        let mut conf = format!(
            "router id 10.97.0.1;
log \"{log}\" all;
protocol device {{ scan time 10; }}
protocol kernel k4 {{ ipv4 {{ export all; import none; }}; merge paths on; }}
protocol kernel k6 {{ ipv6 {{ export all; import none; }}; merge paths on; }}
",
            log = self.dir.join("bird.log").display()
        );
        if bfd {
            conf += "protocol bfd {
  interface \"br0\" { min rx interval 100 ms; min tx interval 100 ms; multiplier 3; };
}
";
        }
        for i in 1..=nodes {
            // Short waits so that the test does not sit out BIRD's defaults.
            conf += &format!(
                "protocol bgp n{i} {{
  local 10.97.0.1 as {ROUTER_ASN}; neighbor {nb} as {NODE_ASN};
  hold time 9; connect delay time 1; connect retry time 1; error wait time 1, 2;{bfd}
  ipv4 {{ import all; export none; }};
  ipv6 {{ import all; export none; }};
}}
",
                nb = node_addr(i),
                bfd = if bfd { "\n  bfd on;" } else { "" }
            );
        }
        let path = self.dir.join("bird.conf");
        fs::write(&path, conf).unwrap();
        // `ip netns exec` execs BIRD: the child's PID is BIRD's.
        let child = Command::new("ip")
            .args(["netns", "exec", &self.router(), "bird", "-f", "-c"])
            .arg(&path)
            .arg("-s")
            .arg(self.sock())
            .arg("-P")
            .arg(self.dir.join("bird.pid"))
            .stdout(Stdio::null())
            .stderr(fs::File::create(self.dir.join("bird.err")).unwrap())
            .spawn()
            .expect("start bird");
        self.bird = Some(child);
        let sock = self.sock();
        let up = measure(Duration::from_secs(5), || {
            run(&["birdc", "-s", &sock, "show", "status"])
                .status
                .success()
        });
        assert!(up.is_some(), "BIRD did not start: {}", self.log("bird.err"));
    }

    fn birdc(&self, cmd: &str) -> String {
        let sock = self.sock();
        let mut a = vec!["birdc", "-s", &sock];
        a.extend(cmd.split_whitespace());
        must(&a)
    }

    /// Writes a manifest file atomically (the agents watch the directory).
    fn manifest(&self, name: &str, text: &str) {
        let d = self.dir.join("manifests");
        let tmp = d.join(format!(".{name}.tmp"));
        fs::write(&tmp, text).unwrap();
        fs::rename(&tmp, d.join(name)).unwrap();
    }

    fn remove_manifest(&self, name: &str) {
        fs::remove_file(self.dir.join("manifests").join(name)).unwrap();
    }

    /// Starts `ferry agent` in node `i`, reading the manifest directory.
    fn agent(&mut self, i: usize) {
        let source = vec![
            "--manifests".into(),
            self.dir.join("manifests").display().to_string(),
            "--state-dir".into(),
            self.dir.join("state").display().to_string(),
        ];
        self.agent_with(i, &source);
    }

    /// Starts `ferry agent` in node `i` with these source and state flags.
    fn agent_with(&mut self, i: usize, source: &[String]) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("n{i}.log")))
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.node(i), FERRY, "agent", "--no-l2"])
            .args(source)
            .args(["--node", &format!("n{i}")])
            .args(["--metrics-addr", "127.0.0.1:10249"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start ferry agent");
        self.agents[i - 1] = Some(child);
    }

    /// Sends `signal` to node `i`'s agent and waits for it to exit.
    fn stop_agent(&mut self, i: usize, signal: i32) -> Duration {
        let start = Instant::now();
        if let Some(mut c) = self.agents[i - 1].take() {
            // SAFETY: kill(2) on the PID of a child not reaped yet (so not reused).
            unsafe { libc::kill(c.id() as libc::pid_t, signal) };
            let _ = c.wait();
        }
        start.elapsed()
    }

    /// Starts an HTTP server in node `i` on its address, port 8080, answering "n<i>".
    fn web_server(&mut self, i: usize) {
        let root = self.dir.join(format!("www{i}"));
        fs::create_dir_all(&root).unwrap();
        fs::write(root.join("index.html"), format!("n{i}\n")).unwrap();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.node(i),
                "python3",
                "-m",
                "http.server",
            ])
            .args(["8080", "--bind", &node_addr(i), "--directory"])
            .arg(&root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start python3 -m http.server");
        self.servers.push(child);
        let (ns, url) = (self.node(i), format!("http://{}:8080/", node_addr(i)));
        let up = measure(Duration::from_secs(10), || {
            run(&[
                "ip",
                "netns",
                "exec",
                &ns,
                "curl",
                "-sf",
                "--max-time",
                "1",
                &url,
            ])
            .status
            .success()
        });
        assert!(up.is_some(), "the web server in n{i} did not start");
    }

    /// The value of a metric's series on node `i`'s agent (its metrics on the namespace's
    /// loopback).
    fn metric(&self, i: usize, series: &str) -> Option<f64> {
        let out = run(&[
            "ip",
            "netns",
            "exec",
            &self.node(i),
            "curl",
            "-sf",
            "--max-time",
            "2",
            "http://127.0.0.1:10249/metrics",
        ]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// The lab API server in the router namespace, on 10.97.0.1:6443 (the nodes reach it
    /// over br0), with MetalLB's and ferry's namespaces.
    fn start_api(&mut self) {
        let apiserver = common::build_binary("ferry-apiserver", "ferry-apiserver");
        fs::write(
            self.kubeconfig(),
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster: {server: 'http://10.97.0.1:6443'}\nusers:\n- name: lab\n  user: {}\ncontexts:\n- name: lab\n  context: {cluster: lab, user: lab, namespace: default}\ncurrent-context: lab\n",
        )
        .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.router()])
            .arg(apiserver)
            .args(["--listen", "10.97.0.1:6443", "--state"])
            .arg(self.dir.join("api-state.json"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(self.dir.join("api.log")).unwrap())
            .spawn()
            .expect("start ferry-apiserver");
        self.api = Some(child);
        let up = measure(Duration::from_secs(10), || {
            self.kubectl(&["get", "--raw", "/version"], None).is_ok()
        });
        assert!(up.is_some(), "API server not up: {}", self.log("api.log"));
        self.apply(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: ferry-system}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: metallb-system}\n",
        );
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.router(), "kubectl", "--kubeconfig"])
            .arg(self.kubeconfig())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl");
        if let Some(mut input) = child.stdin.take() {
            let _ = input.write_all(stdin.unwrap_or_default().as_bytes());
        }
        let out = child.wait_with_output().expect("kubectl");
        match out.status.success() {
            true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
            false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        }
    }

    fn apply(&self, yaml: &str) {
        if let Err(e) = self.kubectl(&["apply", "-f", "-"], Some(yaml)) {
            panic!("kubectl apply: {e}\n{yaml}");
        }
    }

    fn kernel_route(&self) -> String {
        self.kernel_route_of(VIP)
    }

    fn kernel_route_of(&self, addr: &str) -> String {
        let family = if addr.contains(':') { "-6" } else { "-4" };
        must(&["ip", "-n", &self.router(), family, "route", "show", addr])
    }

    fn log(&self, name: &str) -> String {
        fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    fn dump(&self) -> String {
        format!(
            "--- kernel route\n{}--- birdc show protocols all\n{}\n--- show route all\n{}\n--- n1.log\n{}\n--- n2.log\n{}",
            self.kernel_route(),
            self.birdc("show protocols all"),
            self.birdc("show route all"),
            self.log("n1.log"),
            self.log("n2.log"),
        )
    }

    /// Waits until the router's kernel route for VIP goes over exactly `want` (none: no route).
    fn wait_nexthops(&self, want: &[&str], what: &str) -> Duration {
        self.wait_nexthops_of(VIP, want, what)
    }

    fn wait_nexthops_of(&self, addr: &str, want: &[&str], what: &str) -> Duration {
        let took = measure(Duration::from_secs(15), || {
            let k = self.kernel_route_of(addr);
            nexthops(&k) == want && routes_listed(&k, addr) == usize::from(!want.is_empty())
        });
        took.unwrap_or_else(|| panic!("timed out: {what} (want {want:?}):\n{}", self.dump()))
    }

    fn curl(&self) -> Result<String, String> {
        let out = run(&[
            "ip",
            "netns",
            "exec",
            &self.client(),
            "curl",
            "-sS",
            "--max-time",
            "2",
            &format!("http://{VIP}/"),
        ]);
        match out.status.success() {
            true => Ok(String::from_utf8_lossy(&out.stdout).trim().to_string()),
            false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        }
    }
}

/// Polls until `f` holds; the time it took.
fn measure(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// The kernel route's next hops ("nexthop via X" lines, or the single "via X"), sorted.
fn nexthops(route: &str) -> Vec<String> {
    let mut out: Vec<String> = route
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "via")
        .map(|w| w[1].to_string())
        .collect();
    out.sort();
    out
}

fn routes_listed(route: &str, addr: &str) -> usize {
    route.lines().filter(|l| l.starts_with(addr)).count()
}

/// MetalLB's BGP configuration: a one-address bgp pool, its advertisement, the router as a
/// peer of every node; the nodes with their addresses.
fn config(nodes: usize) -> String {
    let mut s = format!(
        "apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {{name: bgp, namespace: metallb-system}}
spec: {{addresses: [{VIP}/32]}}
---
apiVersion: metallb.io/v1beta1
kind: BGPAdvertisement
metadata: {{name: bgp, namespace: metallb-system}}
spec: {{ipAddressPools: [bgp]}}
---
apiVersion: metallb.io/v1beta2
kind: BGPPeer
metadata: {{name: router, namespace: metallb-system}}
spec: {{myASN: {NODE_ASN}, peerASN: {ROUTER_ASN}, peerAddress: 10.97.0.1, holdTime: 9s}}
"
    );
    for i in 1..=nodes {
        s += &format!(
            "---
apiVersion: v1
kind: Node
metadata: {{name: n{i}}}
status: {{addresses: [{{type: InternalIP, address: {}}}, {{type: InternalIP, address: {}}}]}}
",
            node_addr(i),
            node_addr6(i)
        );
    }
    s
}

/// A LoadBalancer Service with one ready endpoint, on node 1 (its web server).
fn service(policy: &str) -> String {
    service_on(policy, &[1])
}

/// A LoadBalancer Service with a ready endpoint on each of `nodes` (their web servers).
fn service_on(policy: &str, nodes: &[usize]) -> String {
    let endpoints: String = nodes
        .iter()
        .map(|i| {
            format!(
                "- {{addresses: [{}], nodeName: n{i}, conditions: {{ready: true}}}}\n",
                node_addr(*i)
            )
        })
        .collect();
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec: {{type: LoadBalancer, externalTrafficPolicy: {policy}, selector: {{app: web}}, ports: [{{port: 80, targetPort: 8080}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
endpoints:
{endpoints}ports: [{{port: 8080, protocol: TCP}}]
"
    )
}

#[test]
fn agents_announce_ecmp_routes_to_bird() {
    if !ready("agents_announce_ecmp_routes_to_bird") {
        return;
    }
    let mut bed = Bed::new(2);
    bed.manifest("metallb.yaml", &config(2));
    bed.manifest("web.yaml", &service("Cluster"));
    // A bad peer beside the good one: reported by object and field, the rest stands.
    bed.manifest(
        "broken.yaml",
        "apiVersion: metallb.io/v1beta2
kind: BGPPeer
metadata: {name: broken, namespace: metallb-system}
spec: {myASN: 64601, peerASN: 64600, peerAddress: 10.97.0.2, holdTime: 2s}
",
    );
    bed.web_server(1);
    bed.agent(1);
    bed.agent(2);

    // externalTrafficPolicy Cluster: every node announces; BIRD merges the paths into one
    // kernel route with both nodes as next hops.
    bed.wait_nexthops(&["10.97.0.11", "10.97.0.12"], "ECMP over both nodes");
    let k = bed.kernel_route();
    println!("Cluster:\n{k}");
    let b = bed.birdc(&format!("show route {VIP}/32 all"));
    assert!(b.contains(&format!("BGP.as_path: {NODE_ASN}")), "{b}");
    for i in 1..=2 {
        assert!(
            bed.log(&format!("n{i}.log"))
                .contains("bgp: peer 10.97.0.1: session Established"),
            "{}",
            bed.dump()
        );
    }
    let log = bed.log("n1.log");
    let bad = log
        .lines()
        .find(|l| l.contains("BGPPeer metallb-system/broken"))
        .unwrap_or_else(|| panic!("the bad BGPPeer is not reported:\n{log}"));
    assert!(bad.contains("spec.holdTime"), "{bad}");
    println!("reported: {bad}");
    // A client behind the router reaches the Service.
    let got = measure(Duration::from_secs(10), || {
        bed.curl().is_ok_and(|s| s == "n1")
    });
    assert!(got.is_some(), "curl: {:?}\n{}", bed.curl(), bed.dump());

    let up = "metallb_bgp_session_up{peer=\"10.97.0.1:179\"}";
    let prefixes = "metallb_bgp_announced_prefixes_total{peer=\"10.97.0.1:179\"}";
    for i in 1..=2 {
        assert_eq!(bed.metric(i, up), Some(1.0), "n{i}");
        assert_eq!(bed.metric(i, prefixes), Some(1.0), "n{i}");
    }

    // Local: only the node with a ready endpoint announces.
    bed.manifest("web.yaml", &service("Local"));
    bed.wait_nexthops(&["10.97.0.11"], "only n1 (the endpoint's node)");
    assert_eq!(bed.metric(2, prefixes), Some(0.0));
    assert_eq!(bed.metric(1, prefixes), Some(1.0));
    // The endpoint no longer ready: no node is eligible, the route goes; ready again, back.
    bed.manifest(
        "web.yaml",
        &service("Local").replace("ready: true", "ready: false"),
    );
    bed.wait_nexthops(&[], "withdrawn: no ready endpoint");
    bed.manifest("web.yaml", &service("Local"));
    bed.wait_nexthops(&["10.97.0.11"], "n1 again (its endpoint ready)");
    println!("Local:\n{}", bed.kernel_route());
    assert_eq!(bed.curl(), Ok("n1".to_string()), "{}", bed.dump());

    // Back to Cluster, then SIGTERM on node 2: its path goes at once (Cease).
    bed.manifest("web.yaml", &service("Cluster"));
    bed.wait_nexthops(&["10.97.0.11", "10.97.0.12"], "ECMP again");
    let exit = bed.stop_agent(2, libc::SIGTERM);
    let gone = bed.wait_nexthops(&["10.97.0.11"], "n2 withdrawn on SIGTERM");
    println!("SIGTERM: agent exited in {exit:?}, n2's next hop gone {gone:?} after that");
    assert!(gone < Duration::from_secs(1), "{gone:?}");
    let p = bed.birdc("show protocols all n2");
    assert!(
        p.contains("Administrative shutdown"),
        "BIRD did not get a Cease:\n{p}"
    );
    assert!(
        bed.log("n2.log").contains("bgp: Cease"),
        "{}",
        bed.log("n2.log")
    );

    // The Service deleted: withdrawn.
    bed.remove_manifest("web.yaml");
    bed.wait_nexthops(&[], "withdrawn with the Service");
    assert!(bed.curl().is_err());
}

#[test]
fn clients_spread_over_nodes_and_sigkill_keeps_routes() {
    if !ready("clients_spread_over_nodes_and_sigkill_keeps_routes") {
        return;
    }
    let mut bed = Bed::new(2);
    // The router hashes flows by ports too, so one client's connections take both paths.
    bed.sysctl(&bed.router(), "net.ipv4.fib_multipath_hash_policy=1");
    bed.manifest("metallb.yaml", &config(2));
    // Local with an endpoint on each node: the answer tells which node a request went through.
    bed.manifest("web.yaml", &service_on("Local", &[1, 2]));
    bed.web_server(1);
    bed.web_server(2);
    bed.agent(1);
    bed.agent(2);
    bed.wait_nexthops(&["10.97.0.11", "10.97.0.12"], "ECMP over both nodes");
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..40 {
        let r = bed.curl().unwrap_or_else(|e| format!("error: {e}"));
        *seen.entry(r).or_insert(0) += 1;
    }
    println!("40 requests through the router: {seen:?}");
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        ["n1", "n2"],
        "{}",
        bed.dump()
    );

    // SIGKILL: no Cease; BIRD keeps node 2's path (graceful restart) and node 2's rules still
    // forward, until the next agent has announced again.
    bed.stop_agent(2, libc::SIGKILL);
    let down = measure(Duration::from_secs(5), || {
        !bed.birdc("show protocols n2").contains("Established")
    });
    assert!(down.is_some(), "BIRD still sees n2 up:\n{}", bed.dump());
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        let k = bed.kernel_route();
        assert_eq!(nexthops(&k), ["10.97.0.11", "10.97.0.12"], "{}", bed.dump());
        std::thread::sleep(Duration::from_millis(20));
    }
    bed.agent(2);
    let up = measure(Duration::from_secs(15), || {
        let k = bed.kernel_route();
        assert_eq!(nexthops(&k), ["10.97.0.11", "10.97.0.12"], "{}", bed.dump());
        bed.birdc("show protocols n2").contains("Established")
    });
    assert!(up.is_some(), "n2 not back:\n{}", bed.dump());
    // Re-announced: the route is no longer stale.
    let fresh = measure(Duration::from_secs(5), || {
        !bed.birdc(&format!("show route {VIP}/32 all"))
            .contains("stale")
    });
    assert!(
        fresh.is_some(),
        "{}",
        bed.birdc(&format!("show route {VIP}/32 all"))
    );
    bed.wait_nexthops(&["10.97.0.11", "10.97.0.12"], "both after the restart");
    assert!(bed.curl().is_ok());
}

#[test]
fn api_mode_announces_too() {
    if !ready("api_mode_announces_too") {
        return;
    }
    let mut bed = Bed::new(2);
    bed.start_api();
    bed.apply(&config(2));
    bed.apply(&service("Cluster"));
    bed.web_server(1);
    for i in 1..=2 {
        let kc = bed.kubeconfig().display().to_string();
        let state = bed.dir.join(format!("state-n{i}")).display().to_string();
        bed.agent_with(i, &["--kubeconfig".into(), kc, "--state-dir".into(), state]);
    }
    // The controller (one agent, elected) writes the address into the Service's status; both
    // agents announce it.
    bed.wait_nexthops(
        &["10.97.0.11", "10.97.0.12"],
        "ECMP over both nodes (API mode)",
    );
    let ip = bed
        .kubectl(
            &[
                "get",
                "svc",
                "web",
                "-o",
                "jsonpath={.status.loadBalancer.ingress[0].ip}",
            ],
            None,
        )
        .unwrap_or_default();
    assert_eq!(ip, VIP);
    let got = measure(Duration::from_secs(10), || {
        bed.curl().is_ok_and(|s| s == "n1")
    });
    assert!(got.is_some(), "curl: {:?}\n{}", bed.curl(), bed.dump());
    bed.kubectl(&["delete", "svc", "web"], None).unwrap();
    bed.wait_nexthops(&[], "withdrawn with the Service (API mode)");
}

#[test]
fn ipv6_address_over_the_ipv4_session() {
    if !ready("ipv6_address_over_the_ipv4_session") {
        return;
    }
    let mut bed = Bed::new(2);
    // An IPv6 pool in the same advertisement; its address goes over the IPv4 sessions
    // (MP-BGP) with each node's IPv6 address as the next hop.
    let config = config(2).replace(
        &format!("spec: {{addresses: [{VIP}/32]}}"),
        &format!("spec: {{addresses: [{VIP}/32, {VIP6}/128]}}"),
    );
    bed.manifest("metallb.yaml", &config);
    bed.manifest(
        "web6.yaml",
        &format!(
            "apiVersion: v1
kind: Service
metadata: {{name: web6, namespace: default, annotations: {{metallb.io/loadBalancerIPs: '{VIP6}'}}}}
spec: {{type: LoadBalancer, selector: {{app: web}}, ports: [{{port: 80}}]}}
"
        ),
    );
    bed.agent(1);
    bed.agent(2);
    bed.wait_nexthops_of(VIP6, &["fd00:97::11", "fd00:97::12"], "IPv6 ECMP route");
    println!("IPv6:\n{}", bed.kernel_route_of(VIP6));
    bed.remove_manifest("web6.yaml");
    bed.wait_nexthops_of(VIP6, &[], "IPv6 route withdrawn");
}

/// `config` with a BFDProfile of 100 ms x 3 on the BGPPeer.
fn config_bfd(nodes: usize) -> String {
    config(nodes).replace("holdTime: 9s}", "holdTime: 9s, bfdProfile: fast}")
        + "---
apiVersion: metallb.io/v1beta1
kind: BFDProfile
metadata: {name: fast, namespace: metallb-system}
spec: {receiveInterval: 100, transmitInterval: 100, detectMultiplier: 3}
"
}

/// Node 2's link cut: the time until the router's kernel route is over node 1 only.
fn cut_node_2(bed: &Bed, limit: Duration) -> Option<Duration> {
    bed.ip(&bed.node(2), "link set eth0 down");
    measure(limit, || nexthops(&bed.kernel_route()) == ["10.97.0.11"])
}

#[test]
fn bfd_drops_a_dead_node_in_well_under_a_second() {
    if !ready("bfd_drops_a_dead_node_in_well_under_a_second") {
        return;
    }
    let mut bed = Bed::with_bfd(2, true);
    bed.manifest("metallb.yaml", &config_bfd(2));
    bed.manifest("web.yaml", &service_on("Cluster", &[1, 2]));
    bed.agent(1);
    bed.agent(2);
    bed.wait_nexthops(&["10.97.0.11", "10.97.0.12"], "ECMP over both nodes");
    let up = measure(Duration::from_secs(10), || {
        bed.birdc("show bfd sessions").matches(" Up ").count() == 2
    });
    assert!(
        up.is_some(),
        "BFD sessions not Up:\n{}\n{}",
        bed.birdc("show bfd sessions"),
        bed.dump()
    );
    println!("{}", bed.birdc("show bfd sessions"));
    let series = "metallb_bfd_session_up{peer=\"10.97.0.1\"}";
    let m = measure(Duration::from_secs(5), || {
        bed.metric(1, series) == Some(1.0)
    });
    assert!(m.is_some(), "{series}: {:?}", bed.metric(1, series));
    // Both sessions stay Up (the fast rate agreed by Poll/Final holds).
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        bed.birdc("show bfd sessions").matches(" Up ").count(),
        2,
        "{}",
        bed.dump()
    );

    let took = cut_node_2(&bed, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("node 2 not removed:\n{}", bed.dump()));
    println!("link cut -> node 2 out of the router's route: {took:?} (BFD 100 ms x 3)");
    assert!(
        took < Duration::from_millis(800),
        "{took:?}\n{}",
        bed.dump()
    );
    // Node 2's own BFD went Down too and took its BGP session down.
    let torn = measure(Duration::from_secs(3), || {
        bed.log("n2.log").contains("BGP session torn down")
    });
    assert!(torn.is_some(), "{}", bed.log("n2.log"));
}

#[test]
fn without_bfd_the_hold_time_decides() {
    if !ready("without_bfd_the_hold_time_decides") {
        return;
    }
    let mut bed = Bed::new(2);
    bed.manifest("metallb.yaml", &config(2));
    bed.manifest("web.yaml", &service_on("Cluster", &[1, 2]));
    bed.agent(1);
    bed.agent(2);
    bed.wait_nexthops(&["10.97.0.11", "10.97.0.12"], "ECMP over both nodes");
    let took = cut_node_2(&bed, Duration::from_secs(15))
        .unwrap_or_else(|| panic!("node 2 not removed:\n{}", bed.dump()));
    println!("link cut -> node 2 out of the router's route: {took:?} (hold time 9 s, no BFD)");
    // The hold timer runs from the last KEEPALIVE (every 3 s): 6 to 9 s.
    assert!(took > Duration::from_secs(5), "{took:?}");
}
