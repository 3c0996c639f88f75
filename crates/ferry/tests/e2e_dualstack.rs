//! End to end: dual-stack Services in a lab whose pods have IPv4 and IPv6 addresses
//! (10.42.N.K and fd00:42:N::K), manifest mode with service CIDRs of both families
//! (10.43.0.0/16, fd00:43::/108). A RequireDualStack Service of type LoadBalancer (addresses of
//! both families from one MetalLB pool) answers on both cluster IPs from a pod and on both node
//! ports and both load-balancer addresses from the outside client, each time from an endpoint
//! of the family asked for (the pods report the address that served: X-Server-Addr); an
//! IPv6-only Service answers over IPv6; a SingleStack IPv4 Service's node port is not served
//! on the nodes' IPv6 addresses. The IPv6 load-balancer address is resolved by the client over
//! NDP to the announcing node.
//!
//! And SCTP: the kernel's support is probed; where it has SCTP, an association goes through
//! a Service; where it has none, the table with ferry's SCTP rules is still loaded into the
//! kernel and read back (what nftables does without the SCTP module).

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::{Lab, CONVERGE};

const DUAL_POOL: &str = "apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata:
  name: lan-dual
  namespace: metallb-system
spec:
  addresses:
  - 192.168.2.200-192.168.2.225
  - fd00:2::200-fd00:2::210
---
apiVersion: metallb.io/v1beta1
kind: L2Advertisement
metadata:
  name: lan-dual
  namespace: metallb-system
spec:
  ipAddressPools:
  - lan-dual
";

const LB4: &str = "192.168.2.210";
const LB6: &str = "fd00:2::205";

const SERVICES: &str = "apiVersion: v1
kind: Service
metadata:
  name: dual
  annotations:
    metallb.io/loadBalancerIPs: 192.168.2.210,fd00:2::205
spec:
  type: LoadBalancer
  ipFamilyPolicy: RequireDualStack
  selector:
    app: nextcloud
  ports:
  - port: 80
---
apiVersion: v1
kind: Service
metadata:
  name: six
spec:
  ipFamilyPolicy: SingleStack
  ipFamilies: [IPv6]
  selector:
    app: nextcloud
  ports:
  - port: 8080
    targetPort: 80
---
apiVersion: v1
kind: Service
metadata:
  name: four
spec:
  type: NodePort
  selector:
    app: nextcloud
  ports:
  - port: 80
";

/// One answer: the pod's name and the address it was reached on.
fn served(lab: &Lab, from: &str, url: &str) -> Result<(String, SocketAddr), String> {
    let family = if url.contains('[') { "-6" } else { "-4" };
    let out = lab
        .exec(
            from,
            &["curl", family, "-g", "-sSi", "--max-time", "2", url],
        )
        .map_err(|e| format!("exec: {e:#}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "curl {url} from {from}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let server = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("X-Server-Addr: "))
        .and_then(|a| a.trim().parse().ok())
        .ok_or_else(|| format!("no X-Server-Addr in:\n{text}"))?;
    let pod = text.lines().last().unwrap_or_default().trim().to_string();
    Ok((pod, server))
}

/// Asks `url` until every pod has answered (bounded); each answer must come from the pod's
/// address of the family of the URL. The pods that answered.
fn all_answer_on_family(
    lab: &Lab,
    from: &str,
    url: &str,
    pods: &[common::PodInfo],
) -> BTreeSet<String> {
    let v6 = url.contains('[');
    let deadline = Instant::now() + CONVERGE;
    let mut seen = BTreeSet::new();
    let mut last_err = String::new();
    while seen.len() < pods.len() {
        match served(lab, from, url) {
            Ok((pod, server)) => {
                let p = pods
                    .iter()
                    .find(|p| p.name == pod)
                    .unwrap_or_else(|| panic!("{url}: answered by {pod}, not one of the pods"));
                let want: IpAddr = if v6 { p.ip6().into() } else { p.ip.into() };
                assert_eq!(
                    server.ip(),
                    want,
                    "{url} from {from}: {pod} served on {server}, not on its {} address",
                    if v6 { "IPv6" } else { "IPv4" }
                );
                seen.insert(pod);
            }
            Err(e) => last_err = e,
        }
        assert!(
            Instant::now() < deadline,
            "{url} from {from}: only {seen:?} answered; last error: {last_err}"
        );
    }
    seen
}

/// spec.clusterIPs of a Service from `ferry get svc -o json`, polled until it has `n`.
fn cluster_ips(lab: &Lab, name: &str, n: usize) -> Vec<IpAddr> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let ips: Vec<IpAddr> = lab
            .ferry_get(&["svc", "-o", "json"])
            .ok()
            .and_then(|j| serde_json::from_str::<serde_json::Value>(&j).ok())
            .and_then(|v| {
                v["items"]
                    .as_array()?
                    .iter()
                    .find(|s| s["metadata"]["name"].as_str() == Some(name))
                    .and_then(|s| s["spec"]["clusterIPs"].as_array().cloned())
            })
            .unwrap_or_default()
            .iter()
            .filter_map(|i| i.as_str()?.parse().ok())
            .collect();
        if ips.len() == n {
            return ips;
        }
        assert!(
            Instant::now() < deadline,
            "service {name}: clusterIPs {ips:?}, wanted {n}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn url(ip: IpAddr, port: u16) -> String {
    format!("http://{}/", SocketAddr::new(ip, port))
}

#[test]
fn dual_stack_services_reach_endpoints_of_each_family() {
    // Manifest mode: the lab API server allocates IPv4 cluster IPs only.
    let Some(lab) = common::lab_manifests("dual_stack_services_reach_endpoints_of_each_family", 2)
    else {
        return;
    };
    lab.apply_yaml(common::demo::NEXTCLOUD_DEV).unwrap();
    lab.apply_yaml(DUAL_POOL).unwrap();
    lab.apply_yaml(SERVICES).unwrap();
    let client_pod = common::debian(&lab);
    let pods = common::pods_of(&lab, "nextcloud-dev");
    assert_eq!(pods.len(), 2, "{pods:?}");

    let dual = cluster_ips(&lab, "dual", 2);
    assert!(dual[0].is_ipv4() && dual[1].is_ipv6(), "{dual:?}");
    assert!(
        "fd00:43::/108"
            .parse::<ferry_model::cidr::Cidr>()
            .unwrap()
            .contains(dual[1]),
        "{dual:?}"
    );
    common::wait_external_ips(&lab, "dual", &[LB4, LB6]);
    let np = common::node_port(&lab, "dual");
    let st = lab.state().unwrap();
    let node = &st.nodes[0];
    let node4: IpAddr = node.ip.into();
    let node6: IpAddr = node.ip6.parse().unwrap();

    // From a pod: both cluster IPs. From the outside client: both node ports of a node, both
    // load-balancer addresses.
    let cases = [
        (client_pod.as_str(), url(dual[0], 80)),
        (client_pod.as_str(), url(dual[1], 80)),
        ("client", url(node4, np)),
        ("client", url(node6, np)),
        ("client", url(LB4.parse().unwrap(), 80)),
        ("client", url(LB6.parse().unwrap(), 80)),
    ];
    for (from, u) in &cases {
        let seen = all_answer_on_family(&lab, from, u, &pods);
        println!("{from} -> {u}: answered by {seen:?}, each on its own address of that family");
    }

    // The IPv6 load-balancer address was resolved over NDP to the announcing node's MAC.
    let owner = common::wait_one_announcer(&lab, LB6, Duration::from_millis(300));
    let (mac, states) = common::neigh(&lab, "client", LB6).expect("a neighbour entry for LB6");
    assert_eq!(
        mac,
        common::eth0_mac(&lab, &owner),
        "the client resolved {LB6} to {mac} ({states:?}), not to the announcer {owner}"
    );
    println!("{LB6}: neighbour entry {mac} {states:?} on the client, announced by {owner}");

    // An IPv6-only Service: an IPv6 cluster IP, IPv6 endpoints.
    let six = cluster_ips(&lab, "six", 1);
    assert!(six[0].is_ipv6(), "{six:?}");
    all_answer_on_family(&lab, &client_pod, &url(six[0], 8080), &pods);

    // A SingleStack IPv4 Service: its node port answers on IPv4, and nothing on IPv6.
    let four = cluster_ips(&lab, "four", 1);
    assert!(four[0].is_ipv4(), "{four:?}");
    let np4 = common::node_port(&lab, "four");
    all_answer_on_family(&lab, "client", &url(node4, np4), &pods);
    let err = served(&lab, "client", &url(node6, np4)).expect_err("IPv6 node port of `four`");
    println!("four: IPv4 node port {np4} answers; on {node6}: {err}");
}

/// Whether this kernel has SCTP: socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP) works (Err with
/// the errno text when it does not, e.g. EPROTONOSUPPORT without the sctp module).
fn kernel_sctp() -> Result<(), String> {
    // SAFETY: socket() has no preconditions; the descriptor is closed right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    // SAFETY: fd is ours and open.
    unsafe { libc::close(fd) };
    Ok(())
}

const SCTP_SERVICE: &str = "apiVersion: v1
kind: Service
metadata:
  name: sctp
spec:
  type: NodePort
  ipFamilyPolicy: RequireDualStack
  selector:
    app: nextcloud
  ports:
  - port: 9999
    protocol: SCTP
    targetPort: 9999
";

/// Waits (bounded) until `node`'s table (`nft list table inet ferry`, read back from the
/// kernel) has, for every entry of `want`, a line holding all of its parts; the listing.
fn wait_table_holds(lab: &Lab, node: &str, want: &[Vec<String>]) -> String {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let out = common::run_ok(lab, node, &["nft", "list", "table", "inet", "ferry"]);
        let missing: Vec<&Vec<String>> = want
            .iter()
            .filter(|w| {
                !out.lines()
                    .any(|l| w.iter().all(|part| l.contains(part.as_str())))
            })
            .collect();
        if missing.is_empty() {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "{node}: the kernel's table lacks {missing:?}:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// SCTP through a dual-stack Service. The rules (cluster IPs, node port, the draw among the
/// pods of each family from the SCTP endpoint maps) are checked in the kernel's table on every kernel:
/// nftables matches SCTP by protocol number and port offset, without the SCTP module. Where
/// the kernel has SCTP, an association from the client through the node port and from a pod
/// through both cluster IPs reaches a pod (socat); where it has none this part is skipped,
/// saying so (the kernel's support is outside ferry's control, so the test passes on the
/// strength of the rules).
#[test]
fn sctp_through_a_dual_stack_service() {
    let test = "sctp_through_a_dual_stack_service";
    let Some(lab) = common::lab_manifests(test, 1) else {
        return;
    };
    lab.apply_yaml(common::demo::NEXTCLOUD_DEV).unwrap();
    lab.apply_yaml(SCTP_SERVICE).unwrap();
    let pods = common::pods_of(&lab, "nextcloud-dev");
    assert_eq!(pods.len(), 2, "{pods:?}");
    let ips = cluster_ips(&lab, "sctp", 2);
    let np = common::node_port(&lab, "sctp");
    let node = lab.state().unwrap().nodes[0].name.clone();
    let parts = |v: &[&str]| -> Vec<String> { v.iter().map(|s| s.to_string()).collect() };
    // The services' and node ports' map elements (key ... verdict, one line each), the draws
    // from the SCTP endpoint maps of each family, and each pod in them (by each cluster IP,
    // and by the node port).
    let (cip4, cip6) = (
        format!("{} . sctp . 9999 ", ips[0]),
        format!("{} . sctp . 9999 ", ips[1]),
    );
    let node_port = format!("sctp . {np} ");
    let mut want = vec![
        parts(&[&cip4, ": goto service-default/sctp/sctp/9999 }"]),
        parts(&[&cip6, ": goto service-default/sctp/sctp/9999/ipv6 }"]),
        parts(&[&node_port, ": goto external-default/sctp/sctp/9999 }"]),
        parts(&[&node_port, ": goto external-default/sctp/sctp/9999/ipv6 }"]),
    ];
    for rule in [
        "dnat ip to ip daddr . sctp dport . numgen random mod 2 map @endpoints-sctp-v4",
        "dnat ip to sctp dport . numgen random mod 2 map @nodeport-endpoints-sctp-v4",
        "dnat ip6 to ip6 daddr . sctp dport . numgen random mod 2 map @endpoints-sctp-v6",
        "dnat ip6 to sctp dport . numgen random mod 2 map @nodeport-endpoints-sctp-v6",
    ] {
        want.push(parts(&[rule]));
    }
    for p in &pods {
        let (v4, v6) = (
            format!(": {} . 9999", p.ip),
            format!(": {} . 9999", p.ip6()),
        );
        for key in [&ips[0], &ips[1]] {
            let ep = if key.is_ipv6() { &v6 } else { &v4 };
            want.push(parts(&[&format!("{key} . 9999 . "), ep]));
        }
        want.push(parts(&[&format!("{np} . "), &v4]));
        want.push(parts(&[&format!("{np} . "), &v6]));
    }
    wait_table_holds(&lab, &node, &want);
    println!("sctp: the kernel's table on {node} holds {want:#?}");

    if let Err(why) = kernel_sctp() {
        // Not through ferry_testkit::skip: the rules were checked, and a kernel without SCTP
        // is no reason to fail under CI.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "ferry-test-skipped: e2e_dualstack/{test} (the SCTP association only): kernel has \
             no SCTP (socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP): {why}); its rules were \
             loaded into and read back from the kernel's nftables"
        );
        return;
    }
    if !lab
        .exec("client", &["socat", "-V"])
        .is_ok_and(|o| o.status.success())
    {
        ferry_lab::skip(test, "the kernel has SCTP but socat is not installed");
        return;
    }
    // Each pod answers an association with its name.
    let mut servers = Vec::new();
    for p in &pods {
        let reply = format!("SYSTEM:echo {}", p.name);
        for listen in [
            "SCTP4-LISTEN:9999,fork,reuseaddr",
            "SCTP6-LISTEN:9999,fork,reuseaddr",
        ] {
            servers.push(lab.spawn(&p.name, &["socat", listen, &reply]).unwrap());
        }
    }
    let names: BTreeSet<String> = pods.iter().map(|p| p.name.clone()).collect();
    let st = lab.state().unwrap();
    let node4 = st.nodes[0].ip.to_string();
    let node6 = format!("[{}]", st.nodes[0].ip6);
    let client_pod = common::debian(&lab);
    let targets = [
        ("client", format!("SCTP:{node4}:{np}")),
        ("client", format!("SCTP:{node6}:{np}")),
        (client_pod.as_str(), format!("SCTP:{}:9999", ips[0])),
        (client_pod.as_str(), format!("SCTP:[{}]:9999", ips[1])),
    ];
    let mut result = Ok(());
    for (from, to) in &targets {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let out = lab.exec(from, &["timeout", "3", "socat", "-", to]).unwrap();
            let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if names.contains(&got) {
                println!("sctp: {from} -> {to}: association answered by {got}");
                break;
            }
            if Instant::now() > deadline {
                result = Err(format!("{from} -> {to}: no pod answered ({got:?})"));
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    for mut s in servers {
        let _ = s.kill();
        let _ = s.wait();
    }
    result.unwrap();
}
