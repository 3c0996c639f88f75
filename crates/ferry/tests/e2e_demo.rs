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
    assert_eq!(common::namespaces_of(&prefix), Vec::<String>::new());
}
