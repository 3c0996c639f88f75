//! `ferry get bgppeers` and `ferry get bgproutes`: MetalLB's BGP configuration as ferry reads
//! it, and the routes a node would announce, from manifests and the agents' allocation state.
//! (No root needed: nothing touches the kernel.)

use std::process::Command;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// Two legacy peers (one for rack a only), a bgp pool announced as host routes with a
/// community and as a /24; a Cluster service and a Local one whose only endpoint is on n1.
const MANIFESTS: &str = r#"apiVersion: v1
kind: ConfigMap
metadata: {name: config, namespace: metallb-system}
data:
  config: |
    peers:
    - {peer-address: 10.0.0.1, peer-asn: 64501, my-asn: 64500}
    - peer-address: 10.0.0.2
      peer-asn: 64502
      my-asn: 64500
      node-selectors: [{match-labels: {rack: a}}]
    bgp-communities: {no-advertise: '65535:65282'}
    address-pools:
    - name: bgp
      protocol: bgp
      addresses: [198.51.100.0/24]
      bgp-advertisements:
      - {localpref: 100, communities: [no-advertise]}
      - {aggregation-length: 24}
---
apiVersion: v1
kind: Node
metadata: {name: n1, labels: {rack: a}}
---
apiVersion: v1
kind: Node
metadata: {name: n2, labels: {rack: b}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {type: LoadBalancer, selector: {app: web}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: local, namespace: default}
spec: {type: LoadBalancer, externalTrafficPolicy: Local, selector: {app: local}, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local-1, namespace: default, labels: {kubernetes.io/service-name: local}}
addressType: IPv4
endpoints:
- {addresses: [10.42.0.5], nodeName: n1, conditions: {ready: true}}
ports: [{port: 80, protocol: TCP}]
"#;

/// What the agents allocated.
const LB: &str = r#"{"services": {"default/web": {"ips": ["198.51.100.10"], "pool": "bgp", "updated_ms": 1},
              "default/local": {"ips": ["198.51.100.11"], "pool": "bgp", "updated_ms": 1}}}
"#;

fn ferry(args: &[&str]) -> String {
    let out = Command::new(FERRY).args(args).output().expect("ferry runs");
    assert!(
        out.status.success(),
        "ferry {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The table's rows, split on whitespace, without the header.
fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect()
}

#[test]
fn peers_and_routes_per_node() {
    let tmp = std::env::temp_dir().join(format!("ferry-get-bgp-{}", std::process::id()));
    let (manifests, state) = (tmp.join("manifests"), tmp.join("state"));
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(manifests.join("all.yaml"), MANIFESTS).unwrap();
    std::fs::write(state.join("lb-allocations.json"), LB).unwrap();
    let (m, s) = (manifests.to_str().unwrap(), state.to_str().unwrap());
    let get = |what: &[&str]| {
        let mut args = vec!["get"];
        args.extend_from_slice(what);
        args.extend_from_slice(&["--manifests", m, "--state-dir", s]);
        ferry(&args)
    };

    let peers = rows(&get(&["bgppeers"]));
    let names: Vec<&str> = peers.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(names, ["peers[0]", "peers[1]"]);
    assert_eq!(peers[1][1], "10.0.0.2:179");
    assert_eq!(peers[1][6], "rack=a");
    let n2 = rows(&get(&["bgppeers", "--node", "n2"]));
    assert_eq!(n2.len(), 1, "rack b does not peer with peers[1]");

    // n1 (rack a, with the Local service's endpoint): both addresses to both peers.
    let n1 = rows(&get(&["bgproutes", "--node", "n1"]));
    let got: Vec<(&str, &str, &str, &str)> = n1
        .iter()
        .map(|r| (r[0].as_str(), r[1].as_str(), r[2].as_str(), r[3].as_str()))
        .collect();
    let mut want = Vec::new();
    for peer in ["peers[0]", "peers[1]"] {
        want.push((peer, "198.51.100.0/24", "<none>", "<none>"));
        want.push((peer, "198.51.100.10/32", "100", "65535:65282"));
        want.push((peer, "198.51.100.11/32", "100", "65535:65282"));
    }
    assert_eq!(got, want);
    // n2: one peer, and not the Local service's address (no endpoint there).
    let n2 = get(&["bgproutes", "--node", "n2"]);
    let prefixes: Vec<String> = rows(&n2).into_iter().map(|r| r[1].clone()).collect();
    assert_eq!(prefixes, ["198.51.100.0/24", "198.51.100.10/32"], "{n2}");

    let json: serde_json::Value =
        serde_json::from_str(&get(&["bgproutes", "--node", "n2", "-o", "json"])).unwrap();
    assert_eq!(
        json["peers"][0]["routes"][1]["communities"][0],
        "65535:65282"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}
