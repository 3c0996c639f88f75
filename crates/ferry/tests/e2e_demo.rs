//! End to end: `ferry demo` replays the seed on a fresh lab and leaves nothing behind.

mod common;

use std::process::Command;

#[test]
fn demo_replays_the_seed() {
    if !common::root("demo_replays_the_seed") {
        return;
    }
    let prefix = ferry_lab::Lab::unique_prefix();
    let _cleanup = common::DownOnDrop(prefix.clone());
    let out = Command::new(common::FERRY)
        .args(["demo", "--prefix", &prefix])
        .output()
        .expect("running ferry demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "ferry demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    // With kubectl installed (CI installs it) the demo shows the seed's own kubectl commands,
    // against the lab API server; without it, `ferry lab` runs the same steps.
    let kubectl = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    let tool = if kubectl { "kubectl" } else { "ferry lab" };
    for line in [
        format!("$ {tool} apply -f nextcloud-dev.yaml"),
        format!("$ {tool} get pods,svc -o wide"),
        "$ ferry lab up --nodes 3 --api".to_string(),
    ] {
        assert!(stdout.contains(&line), "missing {line:?} in:\n{stdout}");
    }
    for line in [
        "deployment.apps/nextcloud-dev created",
        "service/nextcloud-dev-clusterip created",
        "service/nextcloud-dev-clusterip   ClusterIP",
        "service \"nextcloud-dev-clusterip\" deleted",
        "service/nextcloud-dev-nodeport created",
        "# all nextcloud pods answered through the cluster IP",
        "# k3s-master-rpi001 forwarded the node port to pod nextcloud-dev-",
        "# k3s-worker-rpi002 forwarded the node port to pod nextcloud-dev-",
        "# k3s-worker-rpi003 forwarded the node port to pod nextcloud-dev-",
        // The second half: the LoadBalancer Service and a failover.
        "service \"nextcloud-dev-nodeport\" deleted",
        "service/nextcloud-dev-loadbalancer created",
        "$ ferry lab get svc -o wide",
        "<pending>",
        "Service default/nextcloud-dev-loadbalancer pending: no address pool",
        "configmap/config created",
        "   192.168.2.200   ",
        "ANNOUNCED-BY",
        "# all nextcloud pods answered through the load-balancer address 192.168.2.200",
        "$ ferry lab agent kill ",
        "after the agent died (gratuitous ARP)",
        "requests answered, ",
        "$ ferry lab agent start ",
        "$ ferry lab exec lan -- ip link set n",
        "took over 192.168.2.200)",
        "exactly one node announces it",
        "# demo finished",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    // "# client recovered after N ms (...)": the failover, measured.
    let recovered: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("# client recovered after "))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no recovery time in:\n{stdout}"));
    println!("demo: the client recovered {recovered} ms after the announcer's link went down");
    assert!(recovered < 2000, "recovered only after {recovered} ms");

    // The BGP part: it runs whenever BIRD 2 is installed (CI installs it: there it must run).
    let bird = Command::new("sh")
        .args(["-c", "command -v bird && command -v birdc"])
        .output()
        .is_ok_and(|o| o.status.success());
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty());
    if !bird && !ci {
        assert!(stdout.contains("# (BGP part skipped"), "{stdout}");
        ferry_lab::skip(
            "demo_replays_the_seed (its BGP part)",
            "bird2 is not installed (scripts/install-deps.sh)",
        );
    } else {
        for line in [
            "$ ferry lab up --nodes 3 --api --bgp".to_string(),
            "# the seed's next step: BGP.".to_string(),
            format!("$ {tool} apply -f metallb-bgp.yaml"),
            format!("$ {tool} apply -f nextcloud-dev-loadbalancer-bgp.yaml"),
            "   192.168.3.1   ".to_string(),
            // ANNOUNCED-BY of the bgp Service: every node (from their announcement files).
            "k3s-master-rpi001,k3s-worker-rpi002,k3s-worker-rpi003".to_string(),
            "$ ferry lab exec router -- ip route show 192.168.3.1".to_string(),
            "nexthop via 192.168.2.11 ".to_string(),
            "nexthop via 192.168.2.12 ".to_string(),
            "nexthop via 192.168.2.13 ".to_string(),
            "# one route to 192.168.3.1 over all 3 nodes".to_string(),
            "# all nextcloud pods answered through the load-balancer address 192.168.3.1 (BGP, through the router)".to_string(),
            "# node failure: k3s-worker-rpi003's link to the LAN goes down".to_string(),
            "# k3s-worker-rpi003 is back: the router's route to 192.168.3.1 is over all 3 nodes again".to_string(),
        ] {
            assert!(stdout.contains(&line), "missing {line:?} in:\n{stdout}");
        }
        // "# the router dropped NODE from the route N ms after ...": BFD, measured.
        let dropped: u64 = stdout
            .lines()
            .find_map(|l| l.strip_prefix("# the router dropped k3s-worker-rpi003 from the route "))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no BFD drop time in:\n{stdout}"));
        println!("demo: the router dropped the failed node {dropped} ms after its link went down");
        // BFD at 100 ms x 3 detects in ~300 ms; the hold timer would take 9 s.
        assert!(
            dropped < 1500,
            "the router dropped the node only after {dropped} ms"
        );
    }
    assert_eq!(common::namespaces_of(&prefix), Vec::<String>::new());
}
