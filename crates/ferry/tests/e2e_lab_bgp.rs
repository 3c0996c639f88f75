//! End to end: `ferry lab up --bgp`. The lab's router namespace runs BIRD 2 peering with every
//! node; with the seed's Deployment, MetalLB's BGP configuration (metallb-bgp.yaml: a bgp
//! pool, a BGPAdvertisement, a BGPPeer pointing at the router) and a LoadBalancer Service on
//! that pool, the router's kernel gets one ECMP route over both nodes and the client, whose
//! default route is the router, reaches both pods through it. `ferry lab down` stops BIRD and
//! leaves no namespace behind.
//!
//! Needs root and bird2; otherwise it prints `ferry-test-skipped:` and passes, unless CI is
//! set: then it fails.
//!
//! Run: `cargo test -p ferry --test e2e_lab_bgp -- --test-threads 1 --nocapture`

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{demo, external_ips, Lab, LabConfig, CONVERGE, FERRY};
use ferry_lab::seed::{METALLB_BGP, NEXTCLOUD_DEV_LOADBALANCER_BGP};

const SVC: &str = "nextcloud-dev-loadbalancer-bgp";

fn bird_found() -> bool {
    Command::new("sh")
        .args(["-c", "command -v bird && command -v birdc"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn out(lab: &Lab, target: &str, cmd: &[&str]) -> String {
    let o = lab.exec(target, cmd).expect("exec");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn lab_bgp_ecmp_through_router() {
    let test = "lab_bgp_ecmp_through_router";
    if !common::root(test) {
        return;
    }
    if !bird_found() {
        ferry_lab::skip(test, "bird2 is not installed (scripts/install-deps.sh)");
        return;
    }
    let lab = LabConfig::new(Lab::unique_prefix())
        .nodes(2)
        .bgp(true)
        .exe(FERRY)
        .up()
        .expect("lab up --bgp");
    for w in &lab.warnings {
        eprintln!("{test}: lab warning: {w}");
    }
    let st = lab.state().unwrap();
    let router = st.router.clone().expect("lab.json has the router");
    let prefix = lab.prefix().to_string();

    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    lab.apply_yaml(METALLB_BGP).unwrap();
    lab.apply_yaml(NEXTCLOUD_DEV_LOADBALANCER_BGP).unwrap();
    let deadline = Instant::now() + CONVERGE;
    let vip = loop {
        if let Some(ip) = external_ips(&lab, SVC).into_iter().next() {
            break ip;
        }
        assert!(Instant::now() < deadline, "{SVC} got no address");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        vip.starts_with("192.168.3."),
        "{SVC} got {vip}, not from the bgp pool"
    );

    // One kernel route over both nodes in the router.
    let want: Vec<String> = st.nodes.iter().map(|n| format!("via {} ", n.ip)).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let route = loop {
        let r = out(&lab, "router", &["ip", "-4", "route", "show", &vip]);
        if want.iter().all(|w| r.contains(w.as_str())) {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "no ECMP route for {vip} over {want:?} in the router:\n{r}\n{}",
            ferry_lab::router::show(&lab.state().unwrap()).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    println!("router: ip route show {vip}\n{route}");
    assert_eq!(
        route.lines().filter(|l| l.starts_with(&vip)).count(),
        1,
        "one route: {route}"
    );
    // `ferry lab exec router -- birdc -s SOCK show route` works.
    let sock = router.socket.display().to_string();
    let b = out(&lab, "router", &["birdc", "-s", &sock, "show", "route"]);
    assert!(b.contains(&vip), "{b}");

    // The client reaches both pods through the router.
    let pods = common::pod_names(&lab, "nextcloud-dev", 2);
    let url = format!("http://{vip}/");
    let seen = common::until_all_answer(&lab, "client", &url, &pods);
    println!("client reached {seen:?} on {url}");
    let r = out(&lab, "client", &["ip", "route", "get", &vip]);
    assert!(r.contains(&format!("via {}", router.ip)), "{r}");

    // Down stops BIRD and removes the router's namespace and files.
    let bird_pid: u32 = std::fs::read_to_string(ferry_lab::router::pid_file(lab.ctx()))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    drop(lab);
    assert!(
        !ferry_lab::sys::pid_alive(bird_pid),
        "BIRD {bird_pid} still runs"
    );
    assert!(common::namespaces_of(&prefix).is_empty());
    assert!(!router.socket.exists());
}
