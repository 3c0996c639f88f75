//! End to end: LoadBalancer Services with MetalLB-style address pools, announced in layer 2
//! (ARP/NDP) by one elected node, in a 3-node lab: the seed's pending-then-assigned sequence,
//! the CRD format, exactly one answering MAC, failover when the announcer's agent dies or its
//! link goes down, a symmetric partition without split brain, IPv6 via NDP,
//! externalTrafficPolicy Local, and exhausted pools.
//!
//! The tests run one at a time (a lock), because several measure sub-second failovers that a
//! neighbouring lab's agents competing for the CPU would blur. Each brings up its own lab
//! (downed on drop, also on panic), bounds every wait and prints what it measured.

mod common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{
    arp_watch, arping, demo, eth0_mac, external_ips, log_announcers, log_line_since, ms_between,
    ms_of_day_now, node_index, ns_of, pods_of, svc_column, wait_external_ips, wait_log_since,
    wait_one_announcer, Lab, CONVERGE,
};

const LB: &str = "nextcloud-dev-loadbalancer";
const VIP: &str = "192.168.2.200";
const VIP_URL: &str = "http://192.168.2.200/";

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs the tests of this file one after another.
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn vip() -> Ipv4Addr {
    VIP.parse().unwrap()
}

/// The seed: the Deployment, the LoadBalancer Service and the MetalLB ConfigMap; waits until
/// the Service has 192.168.2.200, both pods answer on it from the client and exactly one node
/// announces it. The announcer.
fn seed_lb(lab: &Lab) -> String {
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    lab.apply_yaml(demo::NEXTCLOUD_DEV_LOADBALANCER).unwrap();
    lab.apply_yaml(demo::METALLB_CONFIG).unwrap();
    wait_external_ips(lab, LB, &[VIP]);
    let pods = common::pod_names(lab, "nextcloud-dev", 2);
    common::until_all_answer(lab, "client", VIP_URL, &pods);
    wait_one_announcer(lab, VIP, Duration::from_millis(300))
}

/// Waits (bounded) until `svc`'s ANNOUNCED-BY column (`ferry get svc -o wide`) is `want`.
fn wait_announced_by(lab: &Lab, svc: &str, want: &str) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let got = svc_column(lab, svc, "ANNOUNCED-BY", true);
        if got.as_deref() == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{svc}: ANNOUNCED-BY {got:?}, wanted {want}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// (1) The seed's exact sequence: pending without a pool, 192.168.2.200 with the seed's
/// ConfigMap, both pods answer from outside the cluster.
#[test]
fn seed_pending_then_assigned() {
    let _serial = serial();
    let Some(lab) = common::lab("seed_pending_then_assigned", 3) else {
        return;
    };
    let t0 = ms_of_day_now();
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    let out = lab.apply_yaml(demo::NEXTCLOUD_DEV_LOADBALANCER).unwrap();
    assert_eq!(out.trim(), format!("service/{LB} created"));
    // `ferry get svc`: <pending>, and the allocator says why (every agent in manifest mode,
    // the load-balancer controller with the API).
    assert_eq!(
        svc_column(&lab, LB, "EXTERNAL-IP", false).as_deref(),
        Some("<pending>")
    );
    common::wait_any_log_since(
        &lab,
        t0,
        &format!("Service default/{LB} pending: no address pool"),
        CONVERGE,
    );
    assert!(lab.curl("client", VIP_URL).is_err());

    let applied = Instant::now();
    let out = lab.apply_yaml(demo::METALLB_CONFIG).unwrap();
    assert_eq!(out.trim(), "configmap/config created");
    wait_external_ips(&lab, LB, &[VIP]);
    assert_eq!(
        svc_column(&lab, LB, "EXTERNAL-IP", false).as_deref(),
        Some(VIP),
        "the first address of the seed's pool"
    );
    let first = common::curl_ok(&lab, "client", VIP_URL);
    let reachable = applied.elapsed();
    let pods = common::pod_names(&lab, "nextcloud-dev", 2);
    assert!(pods.contains(&first), "{first} is not one of {pods:?}");
    let seen = common::until_all_answer(&lab, "client", VIP_URL, &pods);
    assert_eq!(seen, pods.iter().cloned().collect::<BTreeSet<_>>());
    let owner = wait_one_announcer(&lab, VIP, Duration::from_millis(300));
    println!(
        "seed: {VIP} answered the client {} ms after the MetalLB ConfigMap was applied; \
         announced by {owner}; pods answered: {seen:?}",
        ms(reachable)
    );
}

const CRD_POOL: &str = "apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata:
  name: lan
  namespace: metallb-system
spec:
  addresses:
  - 192.168.2.200-192.168.2.225
---
apiVersion: metallb.io/v1beta1
kind: L2Advertisement
metadata:
  name: lan
  namespace: metallb-system
spec:
  ipAddressPools:
  - lan
";

/// A copy of the seed's LoadBalancer Service under another name.
fn lb_named(name: &str) -> String {
    demo::NEXTCLOUD_DEV_LOADBALANCER.replace(&format!("name: {LB}"), &format!("name: {name}"))
}

/// (2) The same with IPAddressPool + L2Advertisement; a second Service gets the next address;
/// deleting and re-adding the first gives it a free address again, never a duplicate.
#[test]
fn same_with_crds() {
    let _serial = serial();
    let Some(lab) = common::lab("same_with_crds", 3) else {
        return;
    };
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    lab.apply_yaml(demo::NEXTCLOUD_DEV_LOADBALANCER).unwrap();
    lab.apply_yaml(CRD_POOL).unwrap();
    wait_external_ips(&lab, LB, &[VIP]);
    let pods = common::pod_names(&lab, "nextcloud-dev", 2);
    common::until_all_answer(&lab, "client", VIP_URL, &pods);

    lab.apply_yaml(&lb_named("second")).unwrap();
    wait_external_ips(&lab, "second", &["192.168.2.201"]);
    common::until_all_answer(&lab, "client", "http://192.168.2.201/", &pods);
    let owner201 = wait_one_announcer(&lab, "192.168.2.201", Duration::from_millis(300));

    // Delete the first: its address is withdrawn and no longer answers ARP.
    let owner200 = wait_one_announcer(&lab, VIP, Duration::from_millis(300));
    let t = ms_of_day_now();
    lab.delete("svc", LB).unwrap();
    wait_log_since(
        &lab,
        &owner200,
        t,
        &format!("withdrawing {VIP} from eth0"),
        CONVERGE,
    );
    let a = arping(&lab, "client", VIP, &["-c", "2", "-W", "0.3"]);
    assert!(a.replies.is_empty(), "{VIP} still answers:\n{}", a.output);

    // Re-adding it: a free address (the lowest, .200 again), never .201.
    lab.apply_yaml(demo::NEXTCLOUD_DEV_LOADBALANCER).unwrap();
    wait_external_ips(&lab, LB, &[VIP]);
    assert_eq!(external_ips(&lab, "second"), vec!["192.168.2.201"]);
    common::until_all_answer(&lab, "client", VIP_URL, &pods);
    // Each address is announced by exactly one node and answered by one MAC.
    for ip in [VIP, "192.168.2.201"] {
        let owner = wait_one_announcer(&lab, ip, Duration::from_millis(300));
        let a = arping(&lab, "client", ip, &["-c", "2", "-W", "0.3"]);
        assert_eq!(
            a.macs(),
            [eth0_mac(&lab, &owner)].into(),
            "{ip}:\n{}",
            a.output
        );
        assert_eq!(a.replies.len(), 2, "{ip}:\n{}", a.output);
    }
    // The JSON lists every address once.
    let json = lab.ferry_get(&["svc", "-o", "json"]).unwrap();
    assert_eq!(json.matches("\"192.168.2.200\"").count(), 1, "{json}");
    assert_eq!(json.matches("\"192.168.2.201\"").count(), 1, "{json}");
    println!("crds: .200 by {owner200} (re-added: .200 again), .201 by {owner201}");
}

/// (3) ARP for the address is answered by exactly one MAC, the announcing node's; an unused
/// pool address and an address outside the pool get no answer.
#[test]
fn arp_answered_by_exactly_one_mac() {
    let _serial = serial();
    let Some(lab) = common::lab("arp_answered_by_exactly_one_mac", 3) else {
        return;
    };
    let owner = seed_lb(&lab);
    let owner_mac = eth0_mac(&lab, &owner);
    let macs: Vec<String> = lab.node_names().iter().map(|n| eth0_mac(&lab, n)).collect();
    assert_eq!(
        macs.iter().collect::<BTreeSet<_>>().len(),
        3,
        "node MACs {macs:?}"
    );

    let a = arping(&lab, "client", VIP, &["-c", "3"]);
    assert_eq!(a.replies.len(), 3, "3 requests, 3 replies:\n{}", a.output);
    assert_eq!(a.macs(), [owner_mac.clone()].into(), "{}", a.output);
    assert!(a.output.contains("(0 extra)"), "{}", a.output);
    // The client's kernel resolved it the same way.
    let (mac, _) = common::neigh(&lab, "client", VIP).expect("client has a neighbour entry");
    assert_eq!(mac, owner_mac);
    // `ferry get svc -o wide` names the announcer.
    wait_announced_by(&lab, LB, &owner);

    for (ip, what) in [
        ("192.168.2.220", "an unused pool address"),
        ("192.168.2.226", "the address after the pool"),
        ("192.168.2.99", "an address nobody has"),
    ] {
        let a = arping(&lab, "client", ip, &["-c", "3", "-W", "0.3"]);
        assert!(
            a.replies.is_empty(),
            "{what} {ip} was answered:\n{}",
            a.output
        );
    }
    println!("arp: {VIP} answered 3/3 by {owner} ({owner_mac}); .220, .226, .99 unanswered");
}

/// How soon after an announcer's agent dies the client's neighbour entry must have moved.
const SWITCH_WITHIN: Duration = Duration::from_millis(600);

/// (4) SIGKILL of the announcing node's agent: another node announces and the client's
/// neighbour entry moves to its MAC (gratuitous ARP) within [`SWITCH_WITHIN`]; the client
/// keeps being served (the dead agent's rules stay in its node's kernel).
#[test]
fn failover_agent_killed() {
    let _serial = serial();
    let Some(lab) = common::lab("failover_agent_killed", 3) else {
        return;
    };
    let owner = seed_lb(&lab);
    let owner_mac = eth0_mac(&lab, &owner);
    let client_ns = ns_of(&lab, "client");
    let (mac, _) = common::neigh_in(&client_ns, VIP).expect("client has a neighbour entry");
    assert_eq!(mac, owner_mac);

    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let (attempts, watch, cut, killed_ms, switched) = std::thread::scope(|s| {
        let probe = s.spawn(|| common::probe_loop(&client_ns, VIP_URL, start, &stop));
        let watch = s.spawn(|| {
            arp_watch(
                &lab,
                "client",
                vip(),
                Duration::from_millis(50),
                Duration::from_secs(4),
                false,
            )
        });
        std::thread::sleep(Duration::from_millis(500));
        let cut = start.elapsed();
        let killed_ms = ms_of_day_now();
        lab.agent_kill(&owner).unwrap();
        // The client's neighbour entry for the address, polled.
        let mut switched = None;
        while start.elapsed() < cut + Duration::from_secs(3) {
            if let Some((mac, states)) = common::neigh_in(&client_ns, VIP) {
                if mac != owner_mac && !mac.is_empty() {
                    switched = Some((start.elapsed() - cut, mac, states));
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(1000));
        stop.store(true, Ordering::SeqCst);
        (
            probe.join().unwrap(),
            watch.join().unwrap(),
            cut,
            killed_ms,
            switched,
        )
    });

    let (new_owner, t_announce, _) =
        common::any_log_since(&lab, killed_ms, "announcing 192.168.2.200 on eth0")
            .expect("another node announces the address");
    assert_ne!(new_owner, owner);
    let new_mac = eth0_mac(&lab, &new_owner);
    let takeover = ms_between(killed_ms, t_announce);
    let (switch_after, mac, states) = switched.expect("the client's entry never moved");
    assert_eq!(
        mac, new_mac,
        "the client's entry moved to the new announcer"
    );
    // The agent's LAN timings take over after 161-244 ms in virtual time (ferry-member's
    // engine tests); measured here 170-190 ms. The limit leaves room for a loaded machine but
    // not for a lost second (it was 2 s).
    assert!(
        switch_after < SWITCH_WITHIN,
        "neighbour entry switched only after {switch_after:?} (limit {SWITCH_WITHIN:?})"
    );
    // The switch came from the new owner's gratuitous ARPs (the watch only listens).
    let since_cut =
        |d: Duration| (watch.started.unwrap() + d).saturating_duration_since(start + cut);
    let garp: Vec<Duration> = watch
        .gratuitous
        .iter()
        .filter(|(_, m)| *m == new_mac)
        .map(|(d, _)| since_cut(*d))
        .collect();
    assert!(
        !garp.is_empty(),
        "no gratuitous ARP from {new_mac}: {:?}",
        watch.gratuitous
    );
    let (outage, failed) = common::longest_outage(&attempts);
    println!(
        "agent killed on {owner}: {new_owner} announced after {takeover} ms (its log), \
         first gratuitous ARP seen by the client ~{} ms, client's neighbour entry -> {new_mac} \
         ({states:?}) after {} ms; curl: {} requests, {failed} failed, longest outage {} ms",
        ms(garp[0]),
        ms(switch_after),
        attempts.len(),
        ms(outage)
    );
    // The dead agent's rules stay in its node's kernel: measured 0 ms without an answer.
    assert!(
        outage < SWITCH_WITHIN,
        "the client went unserved for {outage:?} (limit {SWITCH_WITHIN:?})"
    );
    assert_eq!(log_announcers(&lab, VIP), vec![new_owner]);
}

/// (5) The announcing node's bridge port goes down: the client is served again within 1 s.
/// Back up, the node waits its 1 s hold-down, then exactly one node announces again.
#[test]
fn failover_link_down() {
    let _serial = serial();
    let Some(lab) = common::lab("failover_link_down", 3) else {
        return;
    };
    let owner = seed_lb(&lab);
    let i = node_index(&lab, &owner);
    // A pod on the node that goes away would still get half the connections (nothing here
    // marks a node NotReady): take it out of the endpoints first, as the control plane would.
    for p in pods_of(&lab, "nextcloud-dev") {
        if p.node == owner {
            println!(
                "(marking {} on {owner} not ready before cutting {owner})",
                p.name
            );
            lab.set_ready(&p.name, false).unwrap();
        }
    }
    let pods: Vec<String> = pods_of(&lab, "nextcloud-dev")
        .into_iter()
        .filter(|p| p.node != owner)
        .map(|p| p.name)
        .collect();
    assert!(!pods.is_empty(), "every nextcloud-dev pod runs on {owner}");
    common::until_all_answer(&lab, "client", VIP_URL, &pods);
    let client_ns = ns_of(&lab, "client");

    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let (attempts, cut, down_ms) = std::thread::scope(|s| {
        let probe = s.spawn(|| common::probe_loop(&client_ns, VIP_URL, start, &stop));
        std::thread::sleep(Duration::from_millis(500));
        let cut = start.elapsed();
        let down_ms = ms_of_day_now();
        common::set_lan_port(&lab, i, false);
        std::thread::sleep(Duration::from_millis(2000));
        stop.store(true, Ordering::SeqCst);
        (probe.join().unwrap(), cut, down_ms)
    });
    let recovered = common::recovered_after(&attempts, cut);
    let (outage, failed) = common::longest_outage(&attempts);
    let (new_owner, t_new, _) = common::any_log_since(&lab, down_ms, "announcing 192.168.2.200")
        .expect("another node announces the address");
    let (t_off, _) = wait_log_since(&lab, &owner, down_ms, "withdrawing 192.168.2.200", CONVERGE);
    println!(
        "link down on {owner} (n{i}): it withdrew after {} ms, {new_owner} announced after {} ms, \
         client recovered after {:?} ms; curl: {} requests, {failed} failed, longest outage {} ms",
        ms_between(down_ms, t_off),
        ms_between(down_ms, t_new),
        recovered.map(ms),
        attempts.len(),
        ms(outage)
    );
    let recovered = recovered.expect("the client never recovered");
    assert!(
        recovered < Duration::from_secs(1),
        "the client recovered only after {recovered:?}"
    );
    assert_ne!(new_owner, owner);

    // Back up: no moment with two answering MACs, then exactly one announcer.
    let up_ms = ms_of_day_now();
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let (watch, attempts) = std::thread::scope(|s| {
        let probe = s.spawn(|| common::probe_loop(&client_ns, VIP_URL, start, &stop));
        let watch = s.spawn(|| {
            arp_watch(
                &lab,
                "client",
                vip(),
                Duration::from_millis(20),
                Duration::from_millis(3000),
                true,
            )
        });
        common::set_lan_port(&lab, i, true);
        let w = watch.join().unwrap();
        stop.store(true, Ordering::SeqCst);
        (w, probe.join().unwrap())
    });
    assert!(
        watch.split_brain().is_empty(),
        "two MACs answered at once after the link came back: {:?}",
        watch.split_brain()
    );
    let last = wait_one_announcer(&lab, VIP, Duration::from_millis(1500));
    let a = arping(&lab, "client", VIP, &["-c", "3", "-W", "0.3"]);
    assert_eq!(a.macs(), [eth0_mac(&lab, &last)].into(), "{}", a.output);
    assert_eq!(a.replies.len(), 3, "{}", a.output);
    let (outage, failed) = common::longest_outage(&attempts);
    // The address ranks `owner` first: once back with a majority it takes the address back,
    // only after its hold-down.
    assert_eq!(
        last, owner,
        "{owner} is back and ranks first for {VIP}, yet {last} answers"
    );
    let note = {
        let (t_major, _) = wait_log_since(
            &lab,
            &owner,
            up_ms,
            "membership: this node hears a majority",
            CONVERGE,
        );
        let (t_back, _) = wait_log_since(&lab, &owner, up_ms, "announcing 192.168.2.200", CONVERGE);
        let held = ms_between(t_major, t_back);
        assert!(
            held >= 950,
            "{owner} announced {held} ms after rejoining (hold-down 1 s)"
        );
        let (t_gone, _) = wait_log_since(
            &lab,
            &new_owner,
            up_ms,
            "withdrawing 192.168.2.200",
            CONVERGE,
        );
        format!(
            "; {owner} rejoined after {} ms, {new_owner} withdrew after {} ms, {owner} announced \
             after {} ms (hold-down {held} ms; {} ms without an announcer)",
            ms_between(up_ms, t_major),
            ms_between(up_ms, t_gone),
            ms_between(up_ms, t_back),
            ms_between(t_gone, t_back)
        )
    };
    println!(
        "link up on {owner}: one announcer ({last}){note}; ARP samples: {} ({} unanswered, none \
         by two MACs); curl: {} requests, {failed} failed, longest outage {} ms",
        watch.samples.len(),
        watch.unanswered(),
        attempts.len(),
        ms(outage)
    );
}

/// (6) The announcer is cut off from the two other nodes (the client still reaches all three):
/// it loses its majority and withdraws, one of the others announces, and at no moment do two
/// MACs answer; after healing, still one.
#[test]
fn symmetric_partition_no_split_brain() {
    let _serial = serial();
    let Some(lab) = common::lab("symmetric_partition_no_split_brain", 3) else {
        return;
    };
    let a_name = seed_lb(&lab);
    let a = node_index(&lab, &a_name);
    let a_mac = eth0_mac(&lab, &a_name);
    let others: Vec<usize> = (0..3).filter(|&j| j != a).collect();

    let cut_ms = ms_of_day_now();
    let (watch, samples) = std::thread::scope(|s| {
        let watch = s.spawn(|| {
            arp_watch(
                &lab,
                "client",
                vip(),
                Duration::from_millis(20),
                Duration::from_millis(2500),
                true,
            )
        });
        common::partition(&lab, a, &others);
        // arping samples during the first 2 s after the cut.
        let t = Instant::now();
        let mut samples = Vec::new();
        while t.elapsed() < Duration::from_secs(2) {
            let r = arping(&lab, "client", VIP, &["-c", "1", "-W", "0.1"]);
            samples.push((t.elapsed(), r));
        }
        (watch.join().unwrap(), samples)
    });

    let (t_lost, _) = wait_log_since(
        &lab,
        &a_name,
        cut_ms,
        "membership: this node does not hear a majority of the cluster: it announces nothing",
        CONVERGE,
    );
    let (t_off, _) = wait_log_since(
        &lab,
        &a_name,
        cut_ms,
        "withdrawing 192.168.2.200 from eth0",
        CONVERGE,
    );
    let (b_name, t_on, _) = common::any_log_since(&lab, cut_ms, "announcing 192.168.2.200 on eth0")
        .expect("B or C announces");
    assert_ne!(b_name, a_name);
    let b_mac = eth0_mac(&lab, &b_name);

    for (at, r) in &samples {
        assert!(
            r.macs().len() <= 1,
            "arping at +{at:?} saw {:?}:\n{}",
            r.macs(),
            r.output
        );
    }
    assert!(
        watch.split_brain().is_empty(),
        "two MACs answered one request: {:?}",
        watch.split_brain()
    );
    // Order: A's MAC, then B's, never back.
    let answerers = watch.answerers();
    assert!(
        answerers == vec![a_mac.clone(), b_mac.clone()] || answerers == vec![b_mac.clone()],
        "answerers over time {answerers:?} (A {a_mac}, B {b_mac})"
    );
    // B answers every request: three in a row (a second try is allowed, as a starved
    // machine may let B's lease lapse for a moment, when it stays silent by design; only B's
    // MAC may ever answer).
    let mut r = arping(&lab, "client", VIP, &["-c", "3"]);
    for _ in 0..2 {
        assert_eq!(r.macs(), [b_mac.clone()].into(), "{}", r.output);
        if r.replies.len() == 3 {
            break;
        }
        r = arping(&lab, "client", VIP, &["-c", "3"]);
    }
    assert_eq!(r.macs(), [b_mac.clone()].into(), "{}", r.output);
    assert_eq!(r.replies.len(), 3, "{}", r.output);
    assert_eq!(log_announcers(&lab, VIP), vec![b_name.clone()]);
    println!(
        "partition of {a_name}: it lost its majority after {} ms and withdrew after {} ms; \
         {b_name} announced after {} ms ({} ms with no announcer); {} ARP requests every 20 ms, \
         {} unanswered, none answered by two MACs; {} arping samples, each <= 1 MAC",
        ms_between(cut_ms, t_lost),
        ms_between(cut_ms, t_off),
        ms_between(cut_ms, t_on),
        ms_between(t_off, t_on),
        watch.samples.len(),
        watch.unanswered(),
        samples.len()
    );

    // Heal.
    let heal_ms = ms_of_day_now();
    let watch = std::thread::scope(|s| {
        let watch = s.spawn(|| {
            arp_watch(
                &lab,
                "client",
                vip(),
                Duration::from_millis(20),
                Duration::from_millis(3000),
                true,
            )
        });
        common::heal(&lab);
        watch.join().unwrap()
    });
    assert!(
        watch.split_brain().is_empty(),
        "two MACs answered one request after healing: {:?}",
        watch.split_brain()
    );
    let last = wait_one_announcer(&lab, VIP, Duration::from_millis(1500));
    let r = arping(&lab, "client", VIP, &["-c", "3"]);
    assert_eq!(r.macs(), [eth0_mac(&lab, &last)].into(), "{}", r.output);
    assert_eq!(r.replies.len(), 3, "{}", r.output);
    let back = log_line_since(&lab, &last, heal_ms, "announcing 192.168.2.200")
        .map(|(t, _)| format!(" after {} ms", ms_between(heal_ms, t)))
        .unwrap_or_default();
    println!(
        "healed: {last} announces{back}; {} ARP requests, {} unanswered, none by two MACs",
        watch.samples.len(),
        watch.unanswered()
    );
}

/// The EtherType wildcard of AF_PACKET sockets.
const ETH_P_ALL: u16 = 0x0003;

const V6_POOL: &str = "apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata:
  name: lan6
  namespace: metallb-system
spec:
  addresses:
  - fd00:2::200-fd00:2::210
---
apiVersion: metallb.io/v1beta1
kind: L2Advertisement
metadata:
  name: lan6
  namespace: metallb-system
spec:
  ipAddressPools:
  - lan6
---
apiVersion: v1
kind: Service
metadata:
  name: web6
  annotations:
    metallb.io/loadBalancerIPs: fd00:2::200
spec:
  type: LoadBalancer
  selector:
    app: nextcloud
  ports:
  - port: 80
";

/// The sources of the solicited NAs for `target` among received frames.
fn solicited_nas(
    frames: &[(ferry_l2::socket::PacketType, ferry_l2::packet::Frame)],
    target: &str,
) -> Vec<String> {
    use ferry_l2::packet::{NdpMessage, Payload};
    frames
        .iter()
        .filter(|(t, _)| *t != ferry_l2::socket::PacketType::Outgoing)
        .filter_map(|(_, f)| match f.payload {
            Payload::Ndp(ndp) => match ndp.message {
                NdpMessage::Advertisement(na)
                    if na.solicited && na.target.to_string() == target =>
                {
                    Some(f.src.to_string())
                }
                _ => None,
            },
            Payload::Arp(_) => None,
        })
        .collect()
}

/// (7) An IPv6 pool on the LAN's subnet: NDP for the address is answered by exactly one node,
/// the announcer, for multicast resolution and for unicast NUD probes (the lab's pods and
/// service CIDR are IPv4, so only the announcement is tested, not traffic).
#[test]
fn ipv6_pool_via_ndp() {
    use ferry_l2::packet::{Frame, NsKind, Solicitation, ETHERTYPE_IPV6};
    use ferry_l2::socket::PacketType;

    let _serial = serial();
    // The lab API server has no IPv6 Services: manifest mode.
    let Some(lab) = common::lab_manifests("ipv6_pool_via_ndp", 3) else {
        return;
    };
    const IP6: &str = "fd00:2::200";
    let t0 = ms_of_day_now();
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    lab.apply_yaml(V6_POOL).unwrap();
    wait_external_ips(&lab, "web6", &[IP6]);
    let owner = wait_one_announcer(&lab, IP6, Duration::from_millis(300));
    let owner_mac = eth0_mac(&lab, &owner);

    // The announcer sends unsolicited NAs up to 2 s after taking the address, which ndisc6
    // would print as answers too: let them pass first.
    let (t_on, _) = wait_log_since(&lab, &owner, t0, "announcing fd00:2::200 on eth0", CONVERGE);
    let quiet_from = ms_between(ms_of_day_now(), t_on) + 2300;
    if quiet_from > 0 {
        std::thread::sleep(Duration::from_millis(quiet_from as u64));
    }

    // ndisc6: one solicitation, exactly one answer, from the announcer (and on the wire:
    // exactly one solicited NA).
    let sock = common::raw_socket(&lab, "client", ETHERTYPE_IPV6);
    let (macs, out) = common::ndisc6(&lab, "client", IP6, 1000);
    assert_eq!(macs, vec![owner_mac.clone()], "{out}");
    let frames = common::drain_frames(&sock, Duration::from_millis(100));
    assert_eq!(
        solicited_nas(&frames, IP6),
        vec![owner_mac.clone()],
        "{frames:?}"
    );
    for ip in ["fd00:2::205", "fd00:2::220"] {
        let (macs, out) = common::ndisc6(&lab, "client", ip, 500);
        assert!(macs.is_empty(), "{ip} answered: {out}");
    }
    let frames = common::drain_frames(&sock, Duration::from_millis(100));
    assert!(
        solicited_nas(&frames, "fd00:2::205").is_empty()
            && solicited_nas(&frames, "fd00:2::220").is_empty(),
        "{frames:?}"
    );

    // The client's kernel: address resolution (multicast NS), then a NUD probe (unicast NS
    // to the cached MAC) once the entry is STALE; both answered with a solicited NA.
    let client_ns = ns_of(&lab, "client");
    ferry_lab::sys::set_sysctls(
        &client_ns,
        &[("net.ipv6.neigh.eth0.delay_first_probe_time", "0")],
    )
    .unwrap();
    let to: SocketAddr = "[fd00:2::200]:9".parse().unwrap();
    let wait_reachable = |what: &str| -> Duration {
        let t = Instant::now();
        loop {
            if let Some((mac, states)) = common::neigh_in(&client_ns, IP6) {
                if states.iter().any(|s| s == "REACHABLE") {
                    assert_eq!(mac, owner_mac, "{what}");
                    return t.elapsed();
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(3),
                "{what}: entry {:?}",
                common::neigh_in(&client_ns, IP6)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let answered = |frames: &[(PacketType, Frame)], kind: NsKind| {
        let asked = frames.iter().any(|(t, f)| {
            *t == PacketType::Outgoing
                && matches!(f.solicitation(), Some(Solicitation::Ns(ns))
                    if ns.kind == kind && ns.target.to_string() == IP6
                        && (kind != NsKind::Unicast || ns.eth_dst.to_string() == owner_mac))
        });
        (asked, solicited_nas(frames, IP6))
    };

    let _ = lab.exec(
        "client",
        &["ip", "-6", "neigh", "flush", "to", IP6, "dev", "eth0"],
    );
    // Every frame, in and out (a socket bound to one EtherType does not see outgoing frames).
    let sock = common::raw_socket(&lab, "client", ETH_P_ALL);
    common::udp_send(&lab, "client", to);
    let resolved = wait_reachable("address resolution");
    let frames = common::drain_frames(&sock, Duration::from_millis(200));
    let (asked, answers) = answered(&frames, NsKind::Multicast);
    assert!(asked, "the client sent no multicast NS: {frames:?}");
    assert_eq!(answers, vec![owner_mac.clone()], "{frames:?}");

    common::run_ok(
        &lab,
        "client",
        &[
            "ip", "-6", "neigh", "change", IP6, "dev", "eth0", "nud", "stale",
        ],
    );
    let (_, states) = common::neigh_in(&client_ns, IP6).unwrap();
    assert_eq!(states, vec!["STALE"]);
    let _ = common::drain_frames(&sock, Duration::from_millis(50));
    common::udp_send(&lab, "client", to);
    let probed = wait_reachable("NUD probe");
    let frames = common::drain_frames(&sock, Duration::from_millis(200));
    let (asked, answers) = answered(&frames, NsKind::Unicast);
    assert!(
        asked,
        "the client sent no unicast NS to {owner_mac}: {frames:?}"
    );
    assert_eq!(answers, vec![owner_mac.clone()], "{frames:?}");
    println!(
        "ipv6: {IP6} announced by {owner} ({owner_mac}); ndisc6: one answer; unused fd00:2::205 \
         and fd00:2::220: none; kernel resolution REACHABLE after {} ms, NUD probe answered, \
         REACHABLE after {} ms",
        ms(resolved),
        ms(probed)
    );
}

const WEB_LOCAL: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 1
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: web
        image: nginx
        ports:
        - containerPort: 80
---
apiVersion: v1
kind: Service
metadata:
  name: web-local
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector:
    app: web
  ports:
  - port: 80
";

/// (8) externalTrafficPolicy Local: the node that announces is the one with the pod, and the
/// announcement follows the pod when it moves.
#[test]
fn etp_local_announced_by_pod_node() {
    let _serial = serial();
    let Some(lab) = common::lab("etp_local_announced_by_pod_node", 3) else {
        return;
    };
    lab.apply_yaml(WEB_LOCAL).unwrap();
    lab.apply_yaml(demo::METALLB_CONFIG).unwrap();
    wait_external_ips(&lab, "web-local", &[VIP]);
    let p1 = pods_of(&lab, "web").pop().expect("a web pod");
    let owner = wait_one_announcer(&lab, VIP, Duration::from_millis(300));
    assert_eq!(owner, p1.node, "announced by the node of pod {}", p1.name);
    common::until_all_answer(&lab, "client", VIP_URL, std::slice::from_ref(&p1.name));
    let a = arping(&lab, "client", VIP, &["-c", "2", "-W", "0.3"]);
    assert_eq!(a.macs(), [eth0_mac(&lab, &p1.node)].into(), "{}", a.output);

    // Occupy the pod's node so that its replacement lands elsewhere, then delete the pod.
    lab.apply_yaml(&format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: filler
  labels:
    app: filler
spec:
  nodeName: {}
  containers:
  - name: filler
    image: debian
",
        p1.node
    ))
    .unwrap();
    let t = ms_of_day_now();
    lab.delete("pod", &p1.name).unwrap();
    let p2 = pods_of(&lab, "web").pop().expect("a new web pod");
    assert_ne!(p2.name, p1.name);
    assert_ne!(p2.node, p1.node, "the replacement landed on the same node");
    let (t_on, _) = wait_log_since(
        &lab,
        &p2.node,
        t,
        "announcing 192.168.2.200 on eth0",
        CONVERGE,
    );
    let (t_off, _) = wait_log_since(
        &lab,
        &p1.node,
        t,
        "withdrawing 192.168.2.200 from eth0",
        CONVERGE,
    );
    assert_eq!(
        wait_one_announcer(&lab, VIP, Duration::from_millis(300)),
        p2.node
    );
    common::until_all_answer(&lab, "client", VIP_URL, std::slice::from_ref(&p2.name));
    let a = arping(&lab, "client", VIP, &["-c", "2", "-W", "0.3"]);
    assert_eq!(a.macs(), [eth0_mac(&lab, &p2.node)].into(), "{}", a.output);
    println!(
        "etp Local: {} on {} -> {} on {}: {} withdrew after {} ms, {} announced after {} ms",
        p1.name,
        p1.node,
        p2.name,
        p2.node,
        p1.node,
        ms_between(t, t_off),
        p2.node,
        ms_between(t, t_on)
    );
}

fn one_pool(addresses: &str) -> String {
    format!(
        "apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata:
  name: small
  namespace: metallb-system
spec:
  addresses:
  - {addresses}
---
apiVersion: metallb.io/v1beta1
kind: L2Advertisement
metadata:
  name: small
  namespace: metallb-system
"
    )
}

/// (9) A pool that shrinks to one address for two Services: the older keeps it, the other is
/// pending with the reason in the agents' log (its address withdrawn); deleting the first
/// gives the address to the second.
#[test]
fn pool_shrink_and_pending_reason() {
    let _serial = serial();
    let Some(lab) = common::lab("pool_shrink_and_pending_reason", 3) else {
        return;
    };
    lab.apply_yaml(demo::NEXTCLOUD_DEV).unwrap();
    lab.apply_yaml(&one_pool("192.168.2.200-192.168.2.201"))
        .unwrap();
    lab.apply_yaml(&lb_named("first")).unwrap();
    wait_external_ips(&lab, "first", &[VIP]);
    lab.apply_yaml(&lb_named("second")).unwrap();
    wait_external_ips(&lab, "second", &["192.168.2.201"]);
    let owner201 = wait_one_announcer(&lab, "192.168.2.201", Duration::from_millis(300));

    // Shrink to one address.
    let t = ms_of_day_now();
    lab.apply_yaml(&one_pool("192.168.2.200/32")).unwrap();
    wait_external_ips(&lab, "second", &[]);
    assert_eq!(external_ips(&lab, "first"), vec![VIP]);
    assert_eq!(
        svc_column(&lab, "second", "EXTERNAL-IP", false).as_deref(),
        Some("<pending>")
    );
    let (n, _, reason) =
        common::wait_any_log_since(&lab, t, "Service default/second pending:", CONVERGE);
    assert!(reason.contains("pool small is exhausted"), "{n}: {reason}");
    println!("{n}: {reason}");
    wait_log_since(
        &lab,
        &owner201,
        t,
        "withdrawing 192.168.2.201 from eth0",
        CONVERGE,
    );
    let a = arping(&lab, "client", "192.168.2.201", &["-c", "2", "-W", "0.3"]);
    assert!(a.replies.is_empty(), "{}", a.output);
    let pods = common::pod_names(&lab, "nextcloud-dev", 2);
    common::until_all_answer(&lab, "client", VIP_URL, &pods);

    // Deleting the first hands the address to the second.
    let t = Instant::now();
    lab.delete("svc", "first").unwrap();
    wait_external_ips(&lab, "second", &[VIP]);
    common::until_all_answer(&lab, "client", VIP_URL, &pods);
    let handed = t.elapsed();
    let owner = wait_one_announcer(&lab, VIP, Duration::from_millis(300));
    assert!(log_announcers(&lab, "192.168.2.201").is_empty());
    println!(
        "pool shrink: second pending ({reason}); after deleting first, second served on {VIP} \
         within {} ms, announced by {owner}",
        ms(handed)
    );
}
