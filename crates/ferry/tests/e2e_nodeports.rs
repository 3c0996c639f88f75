//! End to end: `--nodeport-addresses` (kube-proxy's flag) chooses which of a node's addresses
//! serve node ports, in a lab: `primary` (the default, the Node's InternalIP), a CIDR covering
//! a second address on the node's LAN interface as well, and that second address alone.

mod common;

use common::demo;

#[test]
fn nodeport_addresses_choose_which_addresses_serve_node_ports() {
    let Some(lab) = common::lab(
        "nodeport_addresses_choose_which_addresses_serve_node_ports",
        1,
    ) else {
        return;
    };
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    lab.apply_yaml(demo::NEXTCLOUD_DEV_NODEPORT).unwrap();
    let port = common::node_port(&lab, "nextcloud-dev-nodeport");
    let pods = common::pod_names(&lab, "nextcloud-dev", 2);
    let node = lab.node_name(0);
    let primary = lab.node_ip(0).to_string();
    // A second address on the node's LAN interface (the client's subnet, outside the pools).
    let second = "192.168.2.99";
    common::run_ok(
        &lab,
        &node,
        &["ip", "addr", "add", &format!("{second}/24"), "dev", "eth0"],
    );
    let url = |addr: &str| format!("http://{addr}:{port}/");

    // primary: the InternalIP serves it, the second address does not (nothing listens there).
    common::until_all_answer(&lab, "client", &url(&primary), &pods);
    common::until_fails(&lab, "client", &url(second));

    // A CIDR holding both: both serve it.
    lab.agent_restart_with(&node, &["--nodeport-addresses", "192.168.2.0/24"])
        .unwrap();
    common::until_all_answer(&lab, "client", &url(second), &pods);
    common::until_all_answer(&lab, "client", &url(&primary), &pods);
    assert!(
        lab.agent_log(&node)
            .contains(&format!("node ports served on {primary}, {second}")),
        "{}",
        lab.agent_log(&node)
    );

    // The second address alone: the InternalIP stops serving it.
    lab.agent_restart_with(&node, &["--nodeport-addresses", &format!("{second}/32")])
        .unwrap();
    common::until_fails(&lab, "client", &url(&primary));
    common::until_all_answer(&lab, "client", &url(second), &pods);

    // No address matches: nothing serves it, and the agent says why.
    lab.agent_restart_with(&node, &["--nodeport-addresses", "172.16.0.0/12"])
        .unwrap();
    common::until_fails(&lab, "client", &url(second));
    let deadline = std::time::Instant::now() + common::CONVERGE;
    while !lab
        .agent_log(&node)
        .contains("no address of this node matches --nodeport-addresses 172.16.0.0/12")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            lab.agent_log(&node)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    // Back to the default.
    lab.agent_restart_with(&node, &[]).unwrap();
    common::until_all_answer(&lab, "client", &url(&primary), &pods);
    common::until_fails(&lab, "client", &url(second));
}
