//! kube-proxy's own packet-flow expectations, replayed against ferry.
//!
//! kube-proxy's nftables tests (`pkg/proxy/nftables/proxier_test.go` in kubernetes/kubernetes)
//! state what must happen to a connection as packet flows: from a source address to a
//! destination address and port, the connection reaches one of these endpoints (masqueraded or
//! not), or is dropped, or rejected. `tests/kube-proxy-flows/` holds every scenario of those
//! tests that has flows, as data: one file per scenario, whose first document gives the node's
//! settings and the flows with kube-proxy's verdicts, and whose other documents are the
//! Services and EndpointSlices, read by ferry's own manifest reader. A flow where ferry
//! deliberately differs carries `knownDifference: {reason, output, masq}`: what ferry does
//! instead, and why.
//!
//! Each scenario is planned as the agent plans it (manifests → model → `ferry_plan::plan`), then
//! every flow is replayed twice:
//! - through ferry's tracer (`ferry_plan::trace`): `flows_through_the_tracer`, pure;
//! - on the kernel: `flows_on_the_kernel` loads the planned table into a network namespace (the
//!   node) and sends a real connection from a client placed where the flow's source is: a pod
//!   (namespace `pods`, or `eps` when the pod is itself an endpoint: hairpin), an outside client
//!   (`out`), or the node itself. Every endpoint address listens in namespace `eps` and answers
//!   with the address it was reached on and the address the connection came from; `out` accepts
//!   connections to any address (AnyIP), so traffic that ferry leaves alone and routes out is
//!   seen too, and the node answers on its own addresses. Verdicts: the endpoint(s) reached and
//!   whether the source was rewritten; refused (REJECT: TCP reset or ICMP unreachable);
//!   nothing (DROP); or left alone (delivered to the node, or routed on).
//!
//! Both must agree with each other on every flow, and with kube-proxy except where a known
//! difference says otherwise. Run with `--nocapture` to see the table;
//! `cargo test -p ferry --test kube_proxy_flows -- --nocapture --test-threads 1`.

use std::collections::BTreeSet;
use std::fmt;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_model::cidr::Cidr;
use ferry_model::view::resolve;
use ferry_model::{Object, Protocol};
use ferry_plan::plan::DEFAULT_MASQUERADE_MARK;
use ferry_plan::trace::{trace, Fate, Packet};
use ferry_plan::{PlanConfig, Ruleset};
use serde::Deserialize;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/kube-proxy-flows");

// ---- the data ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Header {
    kind: String,
    /// The kube-proxy test (and subtest) the scenario comes from.
    kube_proxy_test: String,
    #[serde(default)]
    description: String,
    node: NodeSettings,
    flows: Vec<Flow>,
    /// kube-proxy's second sync in the same test, with every EndpointSlice deleted.
    #[serde(default)]
    after_deleting_endpoint_slices: Vec<Flow>,
}

/// kube-proxy's fake proxier: its node, its interfaces' addresses and its flags.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NodeSettings {
    name: String,
    /// The node's interface addresses (kube-proxy's fake `eth0`); traffic from one of them is
    /// the node's own.
    addresses: Vec<IpAddr>,
    /// `--nodeport-addresses`: node ports are served on the addresses inside these CIDRs.
    #[serde(deserialize_with = "cidrs")]
    node_port_addresses: Vec<Cidr>,
    /// `--cluster-cidr` (local-traffic detection by CIDR); empty: no local-traffic detector.
    #[serde(rename = "clusterCIDR", deserialize_with = "cidrs")]
    cluster_cidr: Vec<Cidr>,
    #[serde(rename = "serviceCIDR", deserialize_with = "cidrs")]
    service_cidr: Vec<Cidr>,
    #[serde(default)]
    masquerade_all: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Flow {
    name: String,
    from: IpAddr,
    to: SocketAddr,
    #[serde(default = "tcp")]
    protocol: String,
    /// kube-proxy's verdict: endpoints "a:p, b:p", "DROP", "REJECT", or "" (not NATed).
    output: String,
    #[serde(default)]
    masq: bool,
    known_difference: Option<KnownDifference>,
}

fn cidrs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Cidr>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|c| c.parse().map_err(serde::de::Error::custom))
        .collect()
}

fn tcp() -> String {
    "TCP".into()
}

/// Where ferry deliberately differs from kube-proxy: what it does instead, and why.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct KnownDifference {
    reason: String,
    output: String,
    #[serde(default)]
    masq: bool,
}

struct Scenario {
    file: String,
    header: Header,
    /// The scenario's objects as ferry's manifest reader read them.
    objects: Vec<Object>,
}

impl Scenario {
    /// The flows of each sync: (label, with the EndpointSlices?, flows).
    fn phases(&self) -> Vec<(&'static str, bool, &[Flow])> {
        let mut v = vec![("", true, self.header.flows.as_slice())];
        if !self.header.after_deleting_endpoint_slices.is_empty() {
            v.push((
                " (EndpointSlices deleted)",
                false,
                self.header.after_deleting_endpoint_slices.as_slice(),
            ));
        }
        v
    }
}

fn scenarios() -> Vec<Scenario> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(DIR)
        .unwrap_or_else(|e| panic!("{DIR}: {e}"))
        .map(|e| e.expect("reading the flows directory").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no scenarios in {DIR}");
    files.iter().map(|p| load(p)).collect()
}

fn load(path: &Path) -> Scenario {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{file}: {e}"));
    // Document 1 is the test's own; the others are Kubernetes objects.
    let mut docs = text.split("\n---\n").filter(|d| {
        d.lines()
            .any(|l| !l.trim().is_empty() && !l.starts_with('#') && l != "---")
    });
    let first = docs.next().unwrap_or_default();
    let header: Header =
        serde_saphyr::from_str(first).unwrap_or_else(|e| panic!("{file} document 1: {e}"));
    assert_eq!(header.kind, "KubeProxyFlowTest", "{file} document 1: kind");
    let manifests = docs.collect::<Vec<_>>().join("\n---\n");
    let parsed = ferry_source::manifest::parse_text(&file, &manifests);
    assert!(
        parsed.errors.is_empty() && parsed.warnings.is_empty(),
        "{file}: ferry's manifest reader: {:?} {:?}",
        parsed
            .errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>(),
        parsed
            .warnings
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
    );
    Scenario {
        file,
        header,
        objects: parsed.objects,
    }
}

/// The scenario planned as the agent plans it: services with the cluster IPs and node ports of
/// their specs and the load-balancer addresses of their status (what the API server and a
/// load-balancer controller wrote), resolved against the EndpointSlices, with the node's flags.
fn plan_for(s: &Scenario, with_slices: bool) -> Ruleset {
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for o in &s.objects {
        match o {
            Object::Service(svc) => services.push(svc.clone()),
            Object::EndpointSlice(sl) if with_slices => slices.push(sl.clone()),
            _ => {}
        }
    }
    let (allocs, _) = ferry_kube::status::from_api(&services, &Default::default());
    let allocations = allocs
        .into_iter()
        .map(|(r, a)| match a {
            Ok(a) => (r, a),
            Err(e) => panic!("{}: Service {r}: {e}", s.file),
        })
        .collect();
    let resolved = resolve(&services, &allocations, &slices);
    let n = &s.header.node;
    let cfg = PlanConfig {
        node_name: n.name.clone(),
        node_ips: node_port_ips(n),
        cluster_cidrs: n.cluster_cidr.clone(),
        local_interface: None,
        masquerade_all: n.masquerade_all,
        service_cidrs: n.service_cidr.clone(),
        node_zone: None,
        masquerade_mark: DEFAULT_MASQUERADE_MARK,
        lb_pools: vec![],
        shards: 1,
    };
    ferry_plan::plan(&cfg, &resolved)
}

/// `--nodeport-addresses`: the node's addresses inside the CIDRs (loopback never).
fn node_port_ips(n: &NodeSettings) -> Vec<IpAddr> {
    n.addresses
        .iter()
        .copied()
        .filter(|a| !a.is_loopback() && n.node_port_addresses.iter().any(|c| c.contains(*a)))
        .collect()
}

fn protocol(f: &Flow) -> Protocol {
    Protocol::parse_k8s(&f.protocol).unwrap_or_else(|| panic!("flow {:?}: protocol", f.name))
}

// ---- verdicts ----

#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    /// DNAT to one of these endpoints; the source masqueraded or not.
    To {
        endpoints: BTreeSet<SocketAddr>,
        masq: bool,
    },
    /// Not a service address: left alone (kube-proxy's "").
    Untouched,
    Drop,
    Reject,
    /// Anything else (mixed outcomes, an unexpected error): never matches.
    Other(String),
}

impl Verdict {
    fn parse(output: &str, masq: bool) -> Verdict {
        match output.trim() {
            "" => Verdict::Untouched,
            "DROP" => Verdict::Drop,
            "REJECT" => Verdict::Reject,
            list => Verdict::To {
                endpoints: list
                    .split(',')
                    .map(|e| {
                        e.trim()
                            .parse()
                            .unwrap_or_else(|_| panic!("bad endpoint {e:?} in {output:?}"))
                    })
                    .collect(),
                masq,
            },
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::To { endpoints, masq } => {
                let list: Vec<String> = endpoints.iter().map(|e| e.to_string()).collect();
                write!(f, "{}{}", list.join(", "), if *masq { " masq" } else { "" })
            }
            Verdict::Untouched => f.write_str("(not NATed)"),
            Verdict::Drop => f.write_str("DROP"),
            Verdict::Reject => f.write_str("REJECT"),
            Verdict::Other(s) => write!(f, "?? {s}"),
        }
    }
}

/// kube-proxy's verdict, and ferry's where it deliberately differs.
fn expectations(f: &Flow) -> (Verdict, Verdict) {
    let kp = Verdict::parse(&f.output, f.masq);
    let ferry = match &f.known_difference {
        Some(d) => Verdict::parse(&d.output, d.masq),
        None => kp.clone(),
    };
    (kp, ferry)
}

/// Where the tracer says the flow's first packet goes.
fn traced(rs: &Ruleset, node: &NodeSettings, f: &Flow) -> Verdict {
    let pkt = Packet {
        saddr: f.from,
        daddr: f.to.ip(),
        proto: protocol(f),
        dport: f.to.port(),
        local_origin: node.addresses.contains(&f.from),
        iif: None,
    };
    let outcomes = trace(rs, &pkt);
    let mut endpoints = BTreeSet::new();
    let mut masqs = BTreeSet::new();
    let mut others = Vec::new();
    for o in &outcomes {
        match &o.fate {
            Fate::Dnat {
                addr,
                port,
                masquerade,
            } => {
                endpoints.insert(SocketAddr::new(*addr, *port));
                masqs.insert(*masquerade);
            }
            Fate::Untouched { .. } => others.push(Verdict::Untouched),
            Fate::Dropped => others.push(Verdict::Drop),
            Fate::Rejected { .. } => others.push(Verdict::Reject),
        }
    }
    match (endpoints.is_empty(), others.as_slice(), masqs.len()) {
        (false, [], 1) => Verdict::To {
            endpoints,
            masq: masqs.contains(&true),
        },
        (true, [one], _) => one.clone(),
        _ => Verdict::Other(format!("{outcomes:?}")),
    }
}

// ---- through the tracer ----

#[test]
fn flows_through_the_tracer() {
    let (mut total, mut matched, mut known) = (0, 0, 0);
    let mut failures = Vec::new();
    for s in scenarios() {
        for (label, with_slices, flows) in s.phases() {
            let rs = plan_for(&s, with_slices);
            for f in flows {
                total += 1;
                let (kp, ferry) = expectations(f);
                let got = traced(&rs, &s.header.node, f);
                let line = format!(
                    "{}{label}: {} ({} {} -> {}): kube-proxy {kp}, tracer {got}",
                    s.file, f.name, f.protocol, f.from, f.to
                );
                println!("{line}");
                if got != ferry {
                    failures.push(line);
                } else if f.known_difference.is_some() {
                    known += 1;
                } else {
                    matched += 1;
                }
            }
        }
    }
    println!(
        "kube-proxy flows: {matched} of {total} match through ferry's tracer, {known} known differences"
    );
    assert!(
        failures.is_empty(),
        "{} flows differ from what is expected of ferry:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The data is what it claims: every scenario names its kube-proxy test, has flows, and every
/// known difference says why and really differs.
#[test]
fn the_data_is_well_formed() {
    let all = scenarios();
    assert!(all.len() >= 20, "{} scenarios", all.len());
    for s in &all {
        assert!(
            s.header.kube_proxy_test.starts_with("Test"),
            "{}: kubeProxyTest",
            s.file
        );
        assert!(!s.header.description.is_empty(), "{}: description", s.file);
        assert!(!s.header.flows.is_empty(), "{}: no flows", s.file);
        for (_, _, flows) in s.phases() {
            for f in flows {
                let _ = protocol(f);
                if let Some(d) = &f.known_difference {
                    assert!(
                        !d.reason.trim().is_empty(),
                        "{}: {}: reason",
                        s.file,
                        f.name
                    );
                    let (kp, ferry) = expectations(f);
                    assert_ne!(kp, ferry, "{}: {}: not a difference", s.file, f.name);
                }
            }
        }
    }
}

// ---- on the kernel ----

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// One scenario's namespaces: `node` (ferry's table), `eps` (every endpoint address), `pods`
/// (pods that are not endpoints), `out` (outside clients; accepts any address). Deleted on drop.
struct Net {
    node: String,
    eps: String,
    pods: String,
    out: String,
    stop: Arc<AtomicBool>,
    servers: Vec<std::thread::JoinHandle<()>>,
}

/// The node's addresses towards the endpoints, the pods and the outside router.
const NODE_EPS: [&str; 2] = ["100.64.0.1", "fd64::1"];
const NODE_PODS: [&str; 2] = ["100.64.0.2", "fd64::2"];
const OUT_ROUTER: [&str; 2] = ["100.65.0.2", "fd65::2"];

fn host(ip: IpAddr) -> String {
    format!("{ip}/{}", if ip.is_ipv4() { 32 } else { 128 })
}

fn nodad(ip: IpAddr) -> &'static str {
    if ip.is_ipv6() {
        " nodad"
    } else {
        ""
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.servers.drain(..) {
            let _ = t.join();
        }
        let _ = ferry_lab::sys::del_netns(&[
            self.node.clone(),
            self.eps.clone(),
            self.pods.clone(),
            self.out.clone(),
        ]);
    }
}

/// Where a flow's client runs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Place {
    Node,
    Endpoints,
    Pods,
    Outside,
}

struct Layout {
    endpoints: BTreeSet<(IpAddr, u16, Protocol)>,
    endpoint_ips: BTreeSet<IpAddr>,
    pod_ips: BTreeSet<IpAddr>,
    outside_ips: BTreeSet<IpAddr>,
    /// Ports the node and the outside listen on (TCP), to see traffic left alone.
    catch_ports: BTreeSet<u16>,
}

impl Layout {
    fn of(s: &Scenario) -> Layout {
        let node = &s.header.node;
        let mut l = Layout {
            endpoints: BTreeSet::new(),
            endpoint_ips: BTreeSet::new(),
            pod_ips: BTreeSet::new(),
            outside_ips: BTreeSet::new(),
            catch_ports: BTreeSet::new(),
        };
        for o in &s.objects {
            if let Object::EndpointSlice(sl) = o {
                for e in &sl.endpoints {
                    for ip in &e.addresses {
                        l.endpoint_ips.insert(*ip);
                        for p in &sl.ports {
                            l.endpoints.insert((*ip, p.port, p.protocol));
                        }
                    }
                }
            }
        }
        for (_, _, flows) in s.phases() {
            for f in flows {
                if protocol(f) == Protocol::Tcp {
                    l.catch_ports.insert(f.to.port());
                }
                if node.addresses.contains(&f.from) || l.endpoint_ips.contains(&f.from) {
                    continue;
                }
                if node.cluster_cidr.iter().any(|c| c.contains(f.from)) || pod_like(f.from) {
                    l.pod_ips.insert(f.from);
                } else {
                    l.outside_ips.insert(f.from);
                }
            }
        }
        l
    }

    fn place(&self, node: &NodeSettings, ip: IpAddr) -> Place {
        if node.addresses.contains(&ip) {
            Place::Node
        } else if self.endpoint_ips.contains(&ip) {
            Place::Endpoints
        } else if self.pod_ips.contains(&ip) {
            Place::Pods
        } else {
            Place::Outside
        }
    }
}

/// kube-proxy's tests' pod addresses (10.0.0.0/8, fd00:10::/48), also where a scenario has no
/// local-traffic detector.
fn pod_like(ip: IpAddr) -> bool {
    ["10.0.0.0/8", "fd00:10::/48"]
        .iter()
        .any(|c| c.parse::<Cidr>().is_ok_and(|c| c.contains(ip)))
}

impl Net {
    fn new(s: &Scenario, l: &Layout) -> Net {
        let base = format!(
            "kpf{}-{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let net = Net {
            node: format!("{base}-node"),
            eps: format!("{base}-eps"),
            pods: format!("{base}-pods"),
            out: format!("{base}-out"),
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
        };
        let names = [
            net.node.clone(),
            net.eps.clone(),
            net.pods.clone(),
            net.out.clone(),
        ];
        ferry_lab::sys::add_netns(&names).expect("ip netns add");
        // No duplicate address detection: addresses (link-local ones too) usable at once.
        for ns in &names {
            ferry_lab::sys::set_sysctls(
                ns,
                &[
                    ("net.ipv6.conf.all.accept_dad", "0"),
                    ("net.ipv6.conf.default.accept_dad", "0"),
                ],
            )
            .expect("sysctls");
        }
        let mut node = vec![
            "link set lo up".to_string(),
            format!("link add eps type veth peer name node netns {}", net.eps),
            format!("link add pods type veth peer name node netns {}", net.pods),
            format!("link add ext type veth peer name node netns {}", net.out),
        ];
        for dev in ["eps", "pods", "ext"] {
            node.push(format!("link set {dev} up"));
        }
        for (dev, addrs) in [("eps", NODE_EPS), ("pods", NODE_PODS)] {
            for a in addrs {
                let ip: IpAddr = a.parse().expect("address");
                node.push(format!("addr add {} dev {dev}{}", host(ip), nodad(ip)));
            }
        }
        for ip in &s.header.node.addresses {
            let len = if ip.is_ipv4() { 24 } else { 64 };
            node.push(format!("addr add {ip}/{len} dev ext{}", nodad(*ip)));
        }
        for ip in &l.endpoint_ips {
            node.push(format!("route add {} dev eps", host(*ip)));
        }
        for ip in &l.pod_ips {
            node.push(format!("route add {} dev pods", host(*ip)));
        }
        for ip in &l.outside_ips {
            node.push(format!("route replace {} dev ext", host(*ip)));
        }
        for r in OUT_ROUTER {
            node.push(format!("route add default via {r} dev ext onlink"));
        }
        ferry_lab::sys::ip_batch(Some(&net.node), &node).expect("node namespace");
        ferry_lab::sys::set_sysctls(
            &net.node,
            &[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv6.conf.all.forwarding", "1"),
            ],
        )
        .expect("node sysctls");

        for (ns, ips, gw) in [
            (&net.eps, &l.endpoint_ips, NODE_EPS),
            (&net.pods, &l.pod_ips, NODE_PODS),
        ] {
            let mut lines = vec!["link set lo up".to_string(), "link set node up".to_string()];
            for ip in ips {
                lines.push(format!("addr add {} dev node{}", host(*ip), nodad(*ip)));
            }
            for g in gw {
                lines.push(format!("route add default via {g} dev node onlink"));
            }
            ferry_lab::sys::ip_batch(Some(ns), &lines).expect("pod namespace");
        }

        // Outside: the clients' addresses, and every other address delivered here too (AnyIP),
        // so what the node routes on instead of translating reaches a listener. Its own
        // connections go to the node first (rule `iif lo`), even to its own addresses (a client
        // using a load-balancer address as its source, as kube-proxy's tests have).
        let mut out = vec!["link set lo up".to_string(), "link set node up".to_string()];
        for a in OUT_ROUTER {
            let ip: IpAddr = a.parse().expect("address");
            out.push(format!("addr add {} dev node{}", host(ip), nodad(ip)));
        }
        for ip in &l.outside_ips {
            out.push(format!("addr add {} dev node{}", host(*ip), nodad(*ip)));
        }
        let v4 = s.header.node.addresses.iter().find(|a| a.is_ipv4());
        let v6 = s.header.node.addresses.iter().find(|a| a.is_ipv6());
        for gw in [v4, v6].into_iter().flatten() {
            out.push(format!(
                "route add default via {gw} dev node onlink table 100"
            ));
        }
        out.push("route add local 0.0.0.0/0 dev lo table local".into());
        out.push("route add local ::/0 dev lo table local".into());
        ferry_lab::sys::ip_batch(Some(&net.out), &out).expect("outside namespace");
        for fam in ["-4", "-6"] {
            for rule in [
                "add pref 10 iif lo lookup 100",
                "add pref 100 lookup local",
                "del pref 0",
            ] {
                let mut args = vec![fam, "-n", &net.out, "rule"];
                args.extend(rule.split(' '));
                ferry_lab::sys::ip(&args).expect("outside namespace: rules");
            }
        }
        ferry_lab::sys::set_sysctls(
            &net.out,
            &[
                ("net.ipv4.conf.all.accept_local", "1"),
                ("net.ipv4.conf.node.accept_local", "1"),
            ],
        )
        .expect("outside sysctls");
        net
    }

    fn ns(&self, p: Place) -> &str {
        match p {
            Place::Node => &self.node,
            Place::Endpoints => &self.eps,
            Place::Pods => &self.pods,
            Place::Outside => &self.out,
        }
    }

    fn load(&self, rs: &Ruleset) {
        // As the agent does: the change from what the kernel has (nothing, or the previous
        // phase's table); then the kernel's table, read back, must be the planned one.
        let again = ferry_lab::sys::in_netns(&self.node, || {
            let mut dp = ferry_nft::Dataplane::new(ferry_nft::Nft::new());
            dp.apply(rs).map_err(|e| e.to_string())?;
            dp.resync();
            dp.apply(rs).map_err(|e| e.to_string())
        })
        .expect("entering the node namespace")
        .unwrap_or_else(|e| panic!("loading the planned table: {e}"));
        assert!(
            again.is_empty(),
            "the kernel's table differs from the planned one: {}",
            again.script
        );
    }

    /// Listeners: every endpoint (in `eps`), and the catch ports on the node and outside.
    fn serve(&mut self, l: &Layout) {
        let mut socks = Vec::new();
        for (ip, port, proto) in &l.endpoints {
            if *proto == Protocol::Sctp && !sctp_supported() {
                continue;
            }
            let addr = SocketAddr::new(*ip, *port);
            socks.push(("eps", listen(&self.eps, addr, *proto, false)));
        }
        for port in &l.catch_ports {
            let any = SocketAddr::new("::".parse().expect("::"), *port);
            socks.push(("node", listen(&self.node, any, Protocol::Tcp, true)));
            socks.push(("out", listen(&self.out, any, Protocol::Tcp, true)));
        }
        for (who, (sock, proto)) in socks {
            let stop = self.stop.clone();
            self.servers
                .push(std::thread::spawn(move || serve(who, sock, proto, &stop)));
        }
    }
}

fn sctp_supported() -> bool {
    use socket2::{Domain, Socket, Type};
    static SCTP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SCTP.get_or_init(|| {
        Socket::new(
            Domain::IPV4,
            Type::STREAM,
            Some(socket2::Protocol::from(libc::IPPROTO_SCTP)),
        )
        .is_ok()
    })
}

fn sock_type(proto: Protocol) -> (socket2::Type, Option<socket2::Protocol>) {
    match proto {
        Protocol::Tcp => (socket2::Type::STREAM, Some(socket2::Protocol::TCP)),
        Protocol::Udp => (socket2::Type::DGRAM, Some(socket2::Protocol::UDP)),
        Protocol::Sctp => (
            socket2::Type::STREAM,
            Some(socket2::Protocol::from(libc::IPPROTO_SCTP)),
        ),
    }
}

/// A socket bound in namespace `ns` (it stays there whichever thread uses it).
fn listen(
    ns: &str,
    addr: SocketAddr,
    proto: Protocol,
    dual_stack: bool,
) -> (socket2::Socket, Protocol) {
    let sock = ferry_lab::sys::in_netns(ns, || -> std::io::Result<socket2::Socket> {
        let (ty, p) = sock_type(proto);
        let s = socket2::Socket::new(socket2::Domain::for_address(addr), ty, p)?;
        if dual_stack {
            s.set_only_v6(false)?;
        }
        s.set_reuse_address(true)?;
        s.bind(&addr.into())?;
        if proto != Protocol::Udp {
            s.listen(64)?;
        }
        // accept() and recv() wake up to look at the stop flag.
        s.set_read_timeout(Some(Duration::from_millis(50)))?;
        Ok(s)
    })
    .expect("entering a namespace")
    .unwrap_or_else(|e| panic!("listening on {addr} ({proto:?}) in {ns}: {e}"));
    (sock, proto)
}

/// Answers every connection (datagram) with "WHO LOCAL PEER": where it ran, the address it
/// was reached on, and the address it came from.
fn serve(who: &'static str, sock: socket2::Socket, proto: Protocol, stop: &AtomicBool) {
    let local = sock
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map(|a| a.to_string())
        .unwrap_or_default();
    if proto == Protocol::Udp {
        let udp: std::net::UdpSocket = sock.into();
        let mut buf = [0u8; 512];
        while !stop.load(Ordering::SeqCst) {
            if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(format!("{who} {local} {peer}\n").as_bytes(), peer);
            }
        }
        return;
    }
    while !stop.load(Ordering::SeqCst) {
        let Ok((conn, peer)) = sock.accept() else {
            continue;
        };
        let mut conn: std::net::TcpStream = conn.into();
        // What the connection was reached on: for the catch-all listeners, the original
        // destination (the node's own address, or any address outside).
        let here = conn.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let peer = peer.as_socket().map(|a| a.to_string()).unwrap_or_default();
        let _ = conn.write_all(format!("{who} {here} {peer}\n").as_bytes());
        let _ = conn.shutdown(std::net::Shutdown::Write);
    }
}

/// What one connection attempt saw.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    /// Answered by `who` ("eps", "node", "out"), reached on `here`, from `peer`.
    Answer {
        who: String,
        here: SocketAddr,
        peer: IpAddr,
    },
    Refused,
    Nothing,
    Failed(String),
}

/// How long silence takes to count as DROP; a flow the tracer does not drop gets a second
/// chance of [`LONG_WAIT`] before its silence counts (a busy machine is no disagreement).
const WAIT: Duration = Duration::from_millis(500);
const LONG_WAIT: Duration = Duration::from_secs(3);

fn attempt(ns: &str, from: IpAddr, to: SocketAddr, proto: Protocol, wait: Duration) -> Seen {
    let sock = ferry_lab::sys::in_netns(ns, || -> std::io::Result<socket2::Socket> {
        let (ty, p) = sock_type(proto);
        let s = socket2::Socket::new(socket2::Domain::for_address(to), ty, p)?;
        s.bind(&SocketAddr::new(from, 0).into())?;
        Ok(s)
    })
    .expect("entering a namespace");
    let sock = match sock {
        Ok(s) => s,
        Err(e) => return Seen::Failed(format!("socket bound to {from}: {e}")),
    };
    let mut buf = Vec::new();
    let io = |e: std::io::Error| -> Seen {
        use std::io::ErrorKind::*;
        match e.kind() {
            ConnectionRefused => Seen::Refused,
            TimedOut | WouldBlock => Seen::Nothing,
            _ => Seen::Failed(e.to_string()),
        }
    };
    if proto == Protocol::Udp {
        let udp: std::net::UdpSocket = sock.into();
        let r = udp
            .connect(to)
            .and_then(|_| udp.set_read_timeout(Some(wait)))
            .and_then(|_| udp.send(b"x"))
            .and_then(|_| {
                let mut b = [0u8; 512];
                let n = udp.recv(&mut b)?;
                buf.extend_from_slice(&b[..n]);
                Ok(())
            });
        if let Err(e) = r {
            return io(e);
        }
    } else {
        if let Err(e) = sock.connect_timeout(&to.into(), wait) {
            return io(e);
        }
        let mut s: std::net::TcpStream = sock.into();
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if let Err(e) = s.read_to_end(&mut buf) {
            return Seen::Failed(format!("connected, then: {e}"));
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let mut w = text.split_whitespace();
    match (
        w.next(),
        w.next().and_then(|h| h.parse().ok()),
        w.next()
            .and_then(|p| p.parse::<SocketAddr>().ok())
            .map(|p| p.ip()),
    ) {
        (Some(who), Some(here), Some(peer)) => Seen::Answer {
            who: who.into(),
            here: unmap(here),
            peer: unmap_ip(peer),
        },
        _ => Seen::Failed(format!("answer {text:?}")),
    }
}

/// The catch-all listeners are dual-stack: IPv4 shows as ::ffff:a.b.c.d.
fn unmap_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

fn unmap(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(unmap_ip(a.ip()), a.port())
}

/// The kernel's verdict on a flow: one attempt, more while the endpoints reached could still
/// be fewer than the tracer's (each new connection is a new random choice).
fn on_the_kernel(net: &Net, place: Place, f: &Flow, want: &Verdict) -> Verdict {
    let proto = protocol(f);
    let ns = net.ns(place);
    let wanted = match want {
        Verdict::To { endpoints, .. } => endpoints.len(),
        _ => 1,
    };
    let mut endpoints = BTreeSet::new();
    let mut masqs = BTreeSet::new();
    let mut tries = 0;
    loop {
        tries += 1;
        let mut seen = attempt(ns, f.from, f.to, proto, WAIT);
        if seen == Seen::Nothing && *want != Verdict::Drop {
            seen = attempt(ns, f.from, f.to, proto, LONG_WAIT);
        }
        match seen {
            Seen::Answer { who, here, peer } if who == "eps" => {
                endpoints.insert(here);
                masqs.insert(peer != f.from);
            }
            Seen::Answer { .. } if tries == 1 => return Verdict::Untouched,
            Seen::Refused if tries == 1 => return Verdict::Reject,
            Seen::Nothing if tries == 1 => return Verdict::Drop,
            other => return Verdict::Other(format!("try {tries}: {other:?}")),
        }
        // At least 3 tries (one endpoint must stay one); up to 16 to see more than one.
        let enough = tries >= 3 && (endpoints.len() >= wanted.min(2) || tries >= 16);
        if enough {
            break;
        }
    }
    if masqs.len() != 1 {
        return Verdict::Other(format!("{endpoints:?}, masquerade sometimes"));
    }
    Verdict::To {
        endpoints,
        masq: masqs.contains(&true),
    }
}

/// The kernel agrees with the tracer: same verdict; for endpoints, only endpoints the tracer
/// allows, and more than one reached where the tracer has more than one.
fn agree(kernel: &Verdict, tracer: &Verdict) -> bool {
    match (kernel, tracer) {
        (
            Verdict::To {
                endpoints: k,
                masq: km,
            },
            Verdict::To {
                endpoints: t,
                masq: tm,
            },
        ) => km == tm && k.is_subset(t) && (t.len() < 2 || k.len() >= 2),
        (Verdict::Other(_), _) | (_, Verdict::Other(_)) => false,
        (k, t) => k == t,
    }
}

#[test]
fn flows_on_the_kernel() {
    if !ferry_lab::require_root("flows_on_the_kernel") {
        return;
    }
    let t0 = Instant::now();
    let (mut total, mut matched, mut known, mut not_run) = (0, 0, 0, 0);
    let mut failures = Vec::new();
    let mut ipv6 = (0, 0);
    for s in scenarios() {
        let layout = Layout::of(&s);
        let mut net = Net::new(&s, &layout);
        net.serve(&layout);
        for (label, with_slices, flows) in s.phases() {
            let rs = plan_for(&s, with_slices);
            net.load(&rs);
            for f in flows {
                total += 1;
                let (kp, ferry) = expectations(f);
                let tracer = traced(&rs, &s.header.node, f);
                let head = format!(
                    "{}{label}: {} ({} {} -> {})",
                    s.file, f.name, f.protocol, f.from, f.to
                );
                if protocol(f) == Protocol::Sctp && !sctp_supported() {
                    not_run += 1;
                    println!("{head}: kube-proxy {kp}, tracer {tracer}, kernel: not run (this kernel has no SCTP)");
                    continue;
                }
                let place = layout.place(&s.header.node, f.from);
                let kernel = on_the_kernel(&net, place, f, &tracer);
                let line = format!(
                    "{head} from {place:?}: kube-proxy {kp}, tracer {tracer}, kernel {kernel}"
                );
                println!("{line}");
                let v6 = f.to.is_ipv6();
                if v6 {
                    ipv6.0 += 1;
                }
                if !agree(&kernel, &tracer) {
                    failures.push(format!("{line}: the kernel and the tracer disagree"));
                } else if tracer != ferry {
                    failures.push(format!("{line}: not what is expected of ferry ({ferry})"));
                } else if f.known_difference.is_some() {
                    known += 1;
                } else {
                    matched += 1;
                    if v6 {
                        ipv6.1 += 1;
                    }
                }
            }
        }
    }
    println!(
        "kube-proxy flows: {matched} of {total} match on the kernel, {known} known differences, \
         {not_run} not run (SCTP); IPv6: {} of {}; {:.1} s",
        ipv6.1,
        ipv6.0,
        t0.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} flows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
