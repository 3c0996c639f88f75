//! The API source reads MetalLB's BGP kinds and the Secrets BGPPeers name, as it reads pools:
//! against the lab API server (in-process, on loopback), objects created, changed and deleted
//! show in the snapshot, and `ferry_model::bgp::load` makes a configuration of them.

use std::time::{Duration, Instant};

use ferry_apiserver::{Config, Running};
use ferry_kube::{ApiSource, SourceConfig};
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, PostParams};
use kube::{Api, Client};
use serde_json::json;

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

async fn create(client: &Client, ar: &ApiResource, ns: Option<&str>, obj: serde_json::Value) {
    let api: Api<DynamicObject> = match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, ar),
        None => Api::all_with(client.clone(), ar),
    };
    let obj: DynamicObject = serde_json::from_value(obj).expect("an object");
    api.create(&PostParams::default(), &obj)
        .await
        .expect("created");
}

/// Waits until `ok` holds for the source's snapshot.
async fn wait_for(src: &ApiSource, what: &str, ok: impl Fn(&ferry_source::Snapshot) -> bool) {
    let t0 = Instant::now();
    loop {
        if src.ready() && ok(&src.snapshot()) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{what}: waiting for {:?}; {:#?}",
            src.waiting_for(),
            src.snapshot().errors
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bgp_kinds_through_the_api() {
    let server = Running::start("127.0.0.1:0".parse().unwrap(), Config::default())
        .expect("the lab API server starts");
    let config = kube::Config::new(server.url().parse().expect("a URL"));
    let client = Client::try_from(config).expect("a client");
    create(
        &client,
        &resource("", "v1", "Namespace", "namespaces"),
        None,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "metallb-system"}}),
    )
    .await;
    let ns = Some("metallb-system");
    let m = |kind: &str, version: &str, plural: &str| resource("metallb.io", version, kind, plural);
    create(
        &client,
        &m("IPAddressPool", "v1beta1", "ipaddresspools"),
        ns,
        json!({"apiVersion": "metallb.io/v1beta1", "kind": "IPAddressPool",
               "metadata": {"name": "bgp"}, "spec": {"addresses": ["198.51.100.0/24"]}}),
    )
    .await;
    create(
        &client,
        &resource("", "v1", "Secret", "secrets"),
        ns,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "md5"},
               "type": "kubernetes.io/basic-auth", "data": {"password": "aHVudGVyMg=="}}),
    )
    .await;
    create(
        &client,
        &m("BFDProfile", "v1beta1", "bfdprofiles"),
        ns,
        json!({"apiVersion": "metallb.io/v1beta1", "kind": "BFDProfile",
               "metadata": {"name": "fast"}, "spec": {"receiveInterval": 100}}),
    )
    .await;
    create(
        &client,
        &m("Community", "v1beta1", "communities"),
        ns,
        json!({"apiVersion": "metallb.io/v1beta1", "kind": "Community",
               "metadata": {"name": "aliases"},
               "spec": {"communities": [{"name": "no-advertise", "value": "65535:65282"}]}}),
    )
    .await;
    create(
        &client,
        &m("BGPPeer", "v1beta2", "bgppeers"),
        ns,
        json!({"apiVersion": "metallb.io/v1beta2", "kind": "BGPPeer",
               "metadata": {"name": "tor"},
               "spec": {"myASN": 64500, "peerASN": 64501, "peerAddress": "10.0.0.1",
                        "bfdProfile": "fast", "passwordSecret": {"name": "md5"}}}),
    )
    .await;
    create(
        &client,
        &m("BGPAdvertisement", "v1beta1", "bgpadvertisements"),
        ns,
        json!({"apiVersion": "metallb.io/v1beta1", "kind": "BGPAdvertisement",
               "metadata": {"name": "all"}, "spec": {"communities": ["no-advertise"]}}),
    )
    .await;

    let src = ApiSource::start(client.clone(), SourceConfig::default(), || {}, |_| {});
    wait_for(&src, "every BGP kind", |s| {
        s.bgp_peers.len() == 1
            && s.bgp_advertisements.len() == 1
            && s.communities.len() == 1
            && s.bfd_profiles.len() == 1
            && s.secrets.len() == 1
    })
    .await;
    let snap = src.snapshot();
    assert!(snap.errors.is_empty(), "{:#?}", snap.errors);
    let (pools, errs) = ferry_model::pools::load(&snap.config_maps, &snap.ip_pools, &[]);
    assert!(errs.is_empty(), "{errs:?}");
    let (cfg, errs) = ferry_model::bgp::load(&pools, &snap.bgp_inputs());
    assert!(errs.is_empty(), "{errs:#?}");
    let tor = cfg.peer("tor").expect("the peer");
    assert_eq!(tor.password.as_ref().map(|p| p.0.as_str()), Some("hunter2"));
    assert_eq!(
        cfg.bfd_profile("fast").map(|b| b.receive_interval_ms),
        Some(100)
    );
    assert_eq!(cfg.advertisements[0].pools, ["bgp"]);
    assert_eq!(
        cfg.advertisements[0].communities,
        [ferry_model::bgp::Community::Standard(0xffff_ff02)]
    );

    // A deleted Secret: the peer that needs it is dropped, with an error naming it.
    let secrets: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "metallb-system",
        &resource("", "v1", "Secret", "secrets"),
    );
    secrets
        .delete("md5", &DeleteParams::default())
        .await
        .expect("deleted");
    wait_for(&src, "the Secret gone", |s| s.secrets.is_empty()).await;
    let snap = src.snapshot();
    let (cfg, errs) = ferry_model::bgp::load(&pools, &snap.bgp_inputs());
    assert!(cfg.peers.is_empty());
    assert!(
        errs.iter().any(|e| e.object == "BGPPeer metallb-system/tor"
            && e.field == "spec.passwordSecret"
            && e.message.contains("not found")),
        "{errs:#?}"
    );
    drop(server);
}
