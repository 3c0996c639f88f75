//! kube-rs (the client ferry's agent uses) against the test double, from a kubeconfig the
//! server wrote: typed create/replace/patch_status, a 409 on a stale replace, Leases the way
//! client-go-style leader election uses them, `watcher` (initial list, then changes), a raw
//! watch with bookmarks, and a watch from an expired resourceVersion (an ERROR event, 410).

mod common;

use std::time::Duration;

use common::{kubectl_path, Lab};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::Client;
use serde_json::json;

async fn client(lab: &Lab) -> Client {
    let kc = Kubeconfig::read_from(&lab.kubeconfig).expect("read the kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("a kube config");
    Client::try_from(cfg).expect("a client")
}

fn service(name: &str) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]},
    }))
    .expect("a Service")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_writes_leases_and_watches() {
    let lab = Lab::quick();
    let client = client(&lab).await;
    let svcs: Api<Service> = Api::namespaced(client.clone(), "default");

    let created = svcs
        .create(&PostParams::default(), &service("web"))
        .await
        .expect("create");
    let spec = created.spec.clone().expect("spec");
    assert!(spec.cluster_ip.is_some_and(|ip| ip.starts_with("10.43.")));
    assert!(spec.ports.expect("ports")[0].node_port.is_some());
    let err = svcs
        .create(&PostParams::default(), &service("web"))
        .await
        .expect_err("duplicate");
    match err {
        kube::Error::Api(s) => assert_eq!(s.code, 409),
        other => panic!("expected an API error, got {other}"),
    }

    // watcher: the initial list, then a status write arrives as an Apply.
    let mut stream = watcher(svcs.clone(), watcher::Config::default()).boxed();
    let mut initial = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.try_next()).await {
            Ok(Ok(Some(watcher::Event::InitApply(s)))) => {
                initial.push(s.metadata.name.unwrap_or_default())
            }
            Ok(Ok(Some(watcher::Event::InitDone))) => break,
            Ok(Ok(Some(_))) => {}
            other => panic!("watcher before InitDone: {other:?}"),
        }
    }
    assert_eq!(initial, ["web"]);
    let patched = svcs
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.5", "ipMode": "VIP"}]}}})),
        )
        .await
        .expect("patch_status");
    assert_eq!(
        patched.spec.and_then(|s| s.type_),
        Some("LoadBalancer".to_string())
    );
    let seen = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.try_next()).await {
            Ok(Ok(Some(watcher::Event::Apply(s)))) => break s,
            Ok(Ok(Some(_))) => {}
            other => panic!("watcher after InitDone: {other:?}"),
        }
    };
    let ingress = seen
        .status
        .and_then(|s| s.load_balancer)
        .and_then(|l| l.ingress)
        .expect("ingress");
    assert_eq!(ingress[0].ip.as_deref(), Some("192.0.2.5"));
    assert_eq!(ingress[0].ip_mode.as_deref(), Some("VIP"));

    // A replace with the first resourceVersion is stale now.
    let err = svcs
        .replace("web", &PostParams::default(), &created)
        .await
        .expect_err("stale");
    match err {
        kube::Error::Api(s) => assert_eq!((s.code, s.reason.as_str()), (409, "Conflict")),
        other => panic!("expected an API error, got {other}"),
    }

    // A Lease as client-go-style leader election uses it: create, then GET + PUT with the
    // resourceVersion; the loser of a race gets 409.
    // Namespaces must exist first (the NamespaceLifecycle admission's rule).
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let ns = serde_json::from_value(json!({"metadata": {"name": "ferry-system"}})).expect("ns");
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .expect("create the namespace");
    let leases: Api<Lease> = Api::namespaced(client.clone(), "ferry-system");
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "ferry-controller"},
        "spec": {"holderIdentity": "node-a", "leaseDurationSeconds": 15},
    }))
    .expect("a Lease");
    leases
        .create(&PostParams::default(), &lease)
        .await
        .expect("create the lease");
    let mut mine = leases.get("ferry-controller").await.expect("get the lease");
    let mut theirs = mine.clone();
    mine.spec
        .get_or_insert_with(Default::default)
        .holder_identity = Some("node-b".into());
    leases
        .replace("ferry-controller", &PostParams::default(), &mine)
        .await
        .expect("take over");
    theirs
        .spec
        .get_or_insert_with(Default::default)
        .holder_identity = Some("node-c".into());
    let err = leases
        .replace("ferry-controller", &PostParams::default(), &theirs)
        .await
        .expect_err("lost race");
    match err {
        kube::Error::Api(s) => assert_eq!(s.code, 409),
        other => panic!("expected an API error, got {other}"),
    }
    let holder = leases
        .get("ferry-controller")
        .await
        .expect("get")
        .spec
        .and_then(|s| s.holder_identity);
    assert_eq!(holder.as_deref(), Some("node-b"));
}

/// kube-rs's Recorder writes events.k8s.io/v1 Events (create, then a merge patch for a
/// series); they are read back through core/v1, as `kubectl get events` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorder_events_are_visible_as_core_events() {
    use k8s_openapi::api::core::v1::Event as CoreEvent;
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    use kube::Resource;

    let lab = Lab::quick();
    let client = client(&lab).await;
    let svcs: Api<Service> = Api::namespaced(client.clone(), "default");
    let svc = svcs
        .create(&PostParams::default(), &service("web"))
        .await
        .expect("create");
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "ferry".into(),
            instance: Some("node-a".into()),
        },
    );
    let ev = Event {
        type_: EventType::Normal,
        reason: "IPAllocated".into(),
        note: Some("Assigned IP [\"192.0.2.1\"]".into()),
        action: "Allocate".into(),
        secondary: None,
    };
    let reference = svc.object_ref(&());
    recorder.publish(&ev, &reference).await.expect("publish");
    recorder
        .publish(&ev, &reference)
        .await
        .expect("publish again (a series)");

    let core: Api<CoreEvent> = Api::namespaced(client.clone(), "default");
    let list = core
        .list(&kube::api::ListParams::default().fields("involvedObject.name=web"))
        .await
        .expect("list core/v1 events");
    assert_eq!(list.items.len(), 1, "{:?}", list.items);
    let e = &list.items[0];
    assert_eq!(e.reason.as_deref(), Some("IPAllocated"));
    assert_eq!(e.message.as_deref(), Some("Assigned IP [\"192.0.2.1\"]"));
    assert_eq!(e.involved_object.kind.as_deref(), Some("Service"));
    assert_eq!(e.reporting_component.as_deref(), Some("ferry"));
    assert_eq!(e.series.as_ref().and_then(|s| s.count), Some(2));

    if let Some(kubectl) = kubectl_path() {
        let out = std::process::Command::new(kubectl)
            .arg("--kubeconfig")
            .arg(&lab.kubeconfig)
            .args(["get", "events"])
            .output()
            .expect("run kubectl");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let row = text.lines().nth(1).unwrap_or_default();
        assert!(
            row.contains("Normal")
                && row.contains("IPAllocated")
                && row.contains("service/web")
                && row.contains("Assigned IP"),
            "{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_bookmarks_and_expired() {
    let lab = Lab::start(ferry_apiserver::Config {
        history: 3,
        bookmark_interval: Duration::from_millis(200),
        ..Default::default()
    });
    let client = client(&lab).await;
    let svcs: Api<Service> = Api::namespaced(client, "default");
    let list = svcs.list(&Default::default()).await.expect("list");
    let rv = list
        .metadata
        .resource_version
        .expect("a list resourceVersion");

    let events: Vec<_> = svcs
        .watch(&WatchParams::default().timeout(1), &rv)
        .await
        .expect("watch")
        .collect()
        .await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Ok(WatchEvent::Bookmark(b)) if b.metadata.resource_version == rv)),
        "{events:?}"
    );

    for i in 0..5 {
        svcs.create(&PostParams::default(), &service(&format!("s{i}")))
            .await
            .expect("create");
    }
    let events: Vec<_> = svcs
        .watch(&WatchParams::default().timeout(1), &rv)
        .await
        .expect("watch")
        .collect()
        .await;
    assert_eq!(events.len(), 1, "{events:?}");
    match &events[0] {
        Ok(WatchEvent::Error(e)) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected an ERROR event, got {other:?}"),
    }
}

type Items = futures::stream::BoxStream<'static, Result<watcher::Event<Service>, watcher::Error>>;

async fn next(stream: &mut Items) -> Result<watcher::Event<Service>, watcher::Error> {
    tokio::time::timeout(Duration::from_secs(15), stream.next())
        .await
        .expect("a watcher item in time")
        .expect("the watcher goes on")
}

/// kube-runtime's watcher, resuming after its watch ended, meets 410 Expired (the history
/// moved past its resourceVersion) and lists afresh: a new Init..InitDone with what changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_relists_after_expired() {
    use k8s_openapi::api::core::v1::ConfigMap;

    let lab = Lab::start(ferry_apiserver::Config {
        history: 3,
        // No bookmark moves the watcher's resourceVersion forward in this test.
        bookmark_interval: Duration::from_secs(3600),
        ..Default::default()
    });
    let client = client(&lab).await;
    let svcs: Api<Service> = Api::namespaced(client.clone(), "default");
    svcs.create(&PostParams::default(), &service("first"))
        .await
        .expect("create");
    // The watcher's watch starts from its list's resourceVersion when polled after InitDone
    // (and each watch request ends after 1 s, to resume from the last resourceVersion seen).
    let mut stream: Items = watcher(svcs.clone(), watcher::Config::default().timeout(1)).boxed();
    loop {
        if let Ok(watcher::Event::InitDone) = next(&mut stream).await {
            break;
        }
    }
    // Writes to another resource push the history past the watcher's resourceVersion.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    for i in 0..5 {
        let cm =
            serde_json::from_value(json!({"metadata": {"name": format!("c{i}")}})).expect("cm");
        cms.create(&PostParams::default(), &cm)
            .await
            .expect("create a ConfigMap");
    }
    let mut seen = Vec::new();
    let mut expired = false;
    let relisted = loop {
        match next(&mut stream).await {
            Ok(watcher::Event::InitApply(s)) => seen.push(s.metadata.name.unwrap_or_default()),
            Ok(watcher::Event::InitDone) => break true,
            Ok(watcher::Event::Init) => seen.clear(),
            Ok(other) => panic!("expected a relist, got {other:?}"),
            // The 410 itself surfaces as an error item; the watcher then lists again.
            Err(e) => {
                assert!(e.to_string().contains("Expired"), "{e}");
                expired = true;
            }
        }
    };
    assert!(relisted && expired);
    assert_eq!(seen, ["first"]);
}
