//! `bench/first-packet.sh` times real paths: with 100 services x 4 endpoints in the benchmark's
//! own namespaces, connections to services #1, #50 and #100 under every layout (ferry's one
//! table, ferry's shards, kube-proxy's iptables layout through iptables-nft, kube-proxy's
//! nftables layout) arrive at that service's own endpoints, spread over more than one, and the
//! timing loop runs. The check itself can fail: without rules the cluster IPs lead nowhere,
//! and a ruleset that DNATs service #1 elsewhere is caught. Root only (skipped otherwise,
//! failing under $CI).

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use ferry_lab::firstpacket::{self, Layout, Server, Topology};
use ferry_lab::{require_root, skip};

fn installed(tool: &str) -> bool {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(tool).is_file())
}

#[test]
fn every_layout_reaches_the_services_endpoints() {
    let test = "every_layout_reaches_the_services_endpoints";
    if !require_root(test) {
        return;
    }
    let mut layouts = vec![
        Layout::Ferry,
        Layout::FerrySharded,
        Layout::KubeProxyNftables,
    ];
    if installed("iptables-nft-restore") {
        layouts.push(Layout::KubeProxyIptables);
    } else {
        skip(
            test,
            "kube-proxy layout needs iptables-nft-restore (iptables)",
        );
    }
    let prefix = format!("fpt{}", std::process::id());
    let topo = Topology::create(&prefix).expect("topology");
    let server = Server::start(&topo.ep).expect("listener");
    let svcs = firstpacket::services(100, 4);
    let targets = [1, 50, 100];

    // No rules: the endpoints answer directly, the cluster IPs do not.
    topo.load(Layout::Direct, &svcs, 4).expect("flush");
    firstpacket::verify(&topo, &server, Layout::Direct, &svcs, &targets, 2).expect("direct");
    let err = firstpacket::verify(&topo, &server, Layout::Ferry, &svcs, &[1], 1)
        .expect_err("no rules, yet the cluster IP answered");
    eprintln!("without rules, as expected: {err:#}");

    // A ruleset that sends service #1 to other addresses (that answer too) is caught.
    let mut wrong = svcs.clone();
    for (j, e) in wrong[0].ports[0].endpoints.iter_mut().enumerate() {
        e.addr = IpAddr::V4(Ipv4Addr::new(10, 42, 250, 1 + j as u8));
    }
    for layout in &layouts {
        topo.load(*layout, &wrong, 4).expect("load");
        let err = firstpacket::verify(&topo, &server, *layout, &svcs, &[1], 8)
            .expect_err("service #1 DNATed elsewhere, yet verified");
        assert!(
            format!("{err:#}").contains("not at its endpoints"),
            "{layout:?}: {err:#}"
        );
    }

    for layout in layouts {
        let took = topo.load(layout, &svcs, 4).expect("load");
        eprintln!("{layout:?}: loaded in {took:?}");
        firstpacket::verify(&topo, &server, layout, &svcs, &targets, 16)
            .unwrap_or_else(|e| panic!("{layout:?}: {e:#}"));
        let per = firstpacket::measure(&topo, layout, &svcs, &[1, 100], 20, 2)
            .unwrap_or_else(|e| panic!("{layout:?}: {e:#}"));
        assert_eq!(per.micros.len(), 2);
        let timed: usize = per.micros.iter().map(Vec::len).sum();
        assert_eq!(timed + per.timeouts.iter().sum::<usize>(), 40);
        assert!(per.micros.iter().flatten().all(|&us| us > 0.0));
    }
    topo.flush().expect("flush");
}
