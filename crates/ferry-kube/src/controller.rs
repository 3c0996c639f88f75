//! The load-balancer controller: addresses from the pools into `status.loadBalancer.ingress`.
//!
//! One agent runs it at a time (the [`crate::lease`] holder). What it writes is decided by
//! [`plan`] (pure) from a snapshot: the addresses Services already carry in their status are
//! read back first, as the allocator's kept state, so they stay put (a cluster moving from
//! MetalLB, or from one ferry leader to the next, keeps every address); new Services get
//! addresses with ferry's IPAM ([`ferry_model::lbipam`], MetalLB's rules). Services of another
//! `loadBalancerClass` are never touched. [`run`] does the writes: a PUT to the status
//! subresource with the resourceVersion the plan was made from (a Service changed meanwhile
//! gives 409 and is planned again), changes that free addresses before those that take them,
//! and Events on the Service as MetalLB records them (`IPAllocated`, `AllocationFailed`,
//! `ClearAssignment`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ferry_model::lbipam::{self, LbEntry, LbState};
use ferry_model::pools::PoolConfig;
use ferry_model::{Namespace, ObjectRef, Service, ServiceType};
use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, Service as K8sService};
use kube::api::{Api, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};
use tokio::sync::watch;

use crate::lease::Leadership;
use crate::source::ApiSource;

/// One status write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub service: ObjectRef,
    /// The resourceVersion the decision was made from.
    pub resource_version: Option<String>,
    /// The addresses to write (empty: clear).
    pub ips: Vec<IpAddr>,
    /// What the Service had.
    pub old: Vec<IpAddr>,
    /// Why the Service gets no address (when `ips` is empty because of the pools).
    pub pending: Option<String>,
}

impl Write {
    /// Whether this write gives addresses up (done before writes that take addresses).
    pub fn frees(&self) -> bool {
        self.old.iter().any(|ip| !self.ips.contains(ip))
    }
}

/// What the controller should do for one snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Status writes, those that free addresses first.
    pub writes: Vec<Write>,
    /// Services that stay pending, with why (for an `AllocationFailed` Event).
    pub pending: BTreeMap<ObjectRef, String>,
}

fn sorted(ips: &[IpAddr]) -> Vec<IpAddr> {
    let mut v = ips.to_vec();
    v.sort_by_key(|ip| (ip.is_ipv6(), *ip));
    v.dedup();
    v
}

/// Decides every status write for one snapshot. `our_class` is the loadBalancerClass ferry
/// also serves (Services without a class are always ours).
///
/// `previous` holds addresses from before the API was the source (manifest mode's state):
/// a Service without an address in its status gets its previous one back when nobody's
/// status holds it.
pub fn plan(
    services: &[Service],
    namespaces: &[Namespace],
    pools: &PoolConfig,
    our_class: Option<&str>,
    previous: &LbState,
    now_ms: u64,
) -> Plan {
    // The addresses in status are the state the allocator keeps.
    let mut kept = LbState::default();
    for svc in services
        .iter()
        .filter(|s| lbipam::is_ours(s, our_class) && !s.extra.load_balancer_ingress.is_empty())
    {
        let r = svc.meta.object_ref();
        let ips = sorted(&svc.extra.load_balancer_ingress);
        let pool = ips
            .iter()
            .find_map(|ip| pools.pool_of(*ip))
            .map(|p| p.name.clone())
            .unwrap_or_default();
        kept.services.insert(
            format!("{}/{}", r.namespace, r.name),
            LbEntry {
                ips,
                pool,
                sharing: lbipam::sharing_of(svc),
                updated_ms: 0,
                gone_since_ms: None,
            },
        );
    }
    let held: std::collections::BTreeSet<IpAddr> = kept
        .services
        .values()
        .flat_map(|e| e.ips.iter().copied())
        .collect();
    for svc in services.iter().filter(|s| lbipam::is_ours(s, our_class)) {
        let r = svc.meta.object_ref();
        let key = format!("{}/{}", r.namespace, r.name);
        if kept.services.contains_key(&key) {
            continue;
        }
        if let Some(e) = previous.services.get(&key) {
            if !e.ips.is_empty() && e.ips.iter().all(|ip| !held.contains(ip)) {
                kept.services.insert(
                    key,
                    LbEntry {
                        updated_ms: 0,
                        ..e.clone()
                    },
                );
            }
        }
    }
    let (_, results) = lbipam::allocate(
        &kept, services, namespaces, pools, our_class, now_ms, now_ms,
    );
    let mut out = Plan::default();
    for svc in services {
        let r = svc.meta.object_ref();
        let old = sorted(&svc.extra.load_balancer_ingress);
        let (ips, pending) = match results.get(&r) {
            Some(Ok(a)) => (sorted(&a.ips), None),
            Some(Err(p)) => (Vec::new(), Some(p.reason.clone())),
            // Not a LoadBalancer of ours. One that was (its type changed) loses its address.
            None if svc.type_ != ServiceType::LoadBalancer
                && svc.extra.load_balancer_class.is_none()
                && !old.is_empty() =>
            {
                (Vec::new(), None)
            }
            None => continue,
        };
        if let Some(p) = &pending {
            out.pending.insert(r.clone(), p.clone());
        }
        if ips != old {
            out.writes.push(Write {
                service: r,
                resource_version: svc.meta.extra.resource_version.clone(),
                ips,
                old,
                pending,
            });
        }
    }
    out.writes.sort_by_key(|w| !w.frees());
    out
}

/// Settings of the controller loop.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// The loadBalancerClass served besides "none".
    pub our_class: Option<String>,
    /// The Events' reporting controller and instance (the node).
    pub reporter: Reporter,
    /// Re-plan this often even without changes (retries of failed writes).
    pub resync: Duration,
    /// Addresses from before the API was the source (see [`plan`]).
    pub previous: LbState,
    /// Pools overlapping these are not used (cluster IPs come from there).
    pub service_cidrs: Vec<ferry_model::cidr::Cidr>,
}

/// Runs the controller: whenever this agent leads and the source is ready, plan and write.
/// `changed` fires on every source change.
pub async fn run(
    client: Client,
    source: ApiSource,
    mut leadership: Leadership,
    mut changed: watch::Receiver<()>,
    cfg: ControllerConfig,
    log: impl Fn(String),
) {
    let recorder = Recorder::new(client.clone(), cfg.reporter.clone());
    // What was last said per Service, so an Event is recorded once per change of mind.
    let mut said: BTreeMap<ObjectRef, String> = BTreeMap::new();
    let mut leading = false;
    let previous = std::sync::Arc::new(cfg.previous.clone());
    loop {
        let until = *leadership.borrow_and_update();
        let now_leading = until.is_some_and(|u| u > Instant::now());
        if now_leading != leading {
            leading = now_leading;
            if leading {
                said.clear();
            }
        }
        if leading && source.ready() {
            // Snapshot and plan off the event loop (thousands of Services take a while).
            let (src, class, previous, cidrs) = (
                source.clone(),
                cfg.our_class.clone(),
                std::sync::Arc::clone(&previous),
                cfg.service_cidrs.clone(),
            );
            let Ok((snap, p)) = tokio::task::spawn_blocking(move || {
                let snap = src.snapshot();
                let (pools, _) = ferry_model::pools::load(
                    &snap.config_maps,
                    &snap.ip_pools,
                    &snap.l2_advertisements,
                );
                let (pools, _) = ferry_model::pools::without_service_cidrs(pools, &cidrs);
                // A node's own address is never a Service's.
                let nodes: Vec<IpAddr> = snap.nodes.iter().flat_map(|n| n.internal_ips()).collect();
                let (pools, _) = ferry_model::pools::without_addresses(pools, &nodes);
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let p = plan(
                    &snap.services,
                    &snap.namespaces,
                    &pools,
                    class.as_deref(),
                    &previous,
                    now_ms,
                );
                (snap, p)
            })
            .await
            else {
                return;
            };
            for w in &p.writes {
                // Only while the lease is ours.
                if !leadership.borrow().is_some_and(|u| u > Instant::now()) {
                    break;
                }
                match write_status(&client, w).await {
                    Ok(Some(obj)) => {
                        let events = events_for(w);
                        for (type_, reason, note) in events {
                            said.insert(w.service.clone(), format!("{reason}: {note}"));
                            publish(&recorder, &obj, type_, reason, note, &log).await;
                        }
                        if w.ips.is_empty() {
                            log(format!(
                                "Service {}: address {} released",
                                w.service,
                                show(&w.old)
                            ));
                        } else {
                            log(format!("Service {}: assigned {}", w.service, show(&w.ips)));
                        }
                    }
                    Ok(None) => {} // changed meanwhile: planned again on its event
                    Err(e) => log(format!(
                        "Service {}: writing status: {}",
                        w.service,
                        crate::describe(&e)
                    )),
                }
            }
            for (r, reason) in &p.pending {
                let text = format!("AllocationFailed: {reason}");
                if said.get(r) == Some(&text) || p.writes.iter().any(|w| &w.service == r) {
                    continue;
                }
                said.insert(r.clone(), text);
                let api: Api<K8sService> = Api::namespaced(client.clone(), &r.namespace);
                if let Ok(Some(obj)) = api.get_opt(&r.name).await {
                    log(format!("Service {r} pending: {reason}"));
                    let note = format!("Failed to allocate IP for \"{r}\": {reason}");
                    publish(
                        &recorder,
                        &obj,
                        EventType::Warning,
                        "AllocationFailed",
                        note,
                        &log,
                    )
                    .await;
                }
            }
            said.retain(|r, _| snap.services.iter().any(|s| &s.meta.object_ref() == r));
        }
        tokio::select! {
            r = leadership.changed() => if r.is_err() { return },
            r = changed.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(cfg.resync) => {}
        }
    }
}

fn show(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// MetalLB's Events for one write.
fn events_for(w: &Write) -> Vec<(EventType, &'static str, String)> {
    let mut out = Vec::new();
    if !w.old.is_empty() && w.frees() {
        out.push((
            EventType::Normal,
            "ClearAssignment",
            match &w.pending {
                Some(p) => format!("current IP {} not allowed by config: {p}", show(&w.old)),
                None if w.ips.is_empty() => {
                    format!(
                        "released {}: not a LoadBalancer of ours any more",
                        show(&w.old)
                    )
                }
                None => format!("current IP {} not allowed by config", show(&w.old)),
            },
        ));
    }
    if !w.ips.is_empty() {
        let quoted: Vec<String> = w.ips.iter().map(|i| format!("\"{i}\"")).collect();
        out.push((
            EventType::Normal,
            "IPAllocated",
            format!("Assigned IP [{}]", quoted.join(" ")),
        ));
    } else if let Some(p) = &w.pending {
        out.push((
            EventType::Warning,
            "AllocationFailed",
            format!("Failed to allocate IP for \"{}\": {p}", w.service),
        ));
    }
    out
}

async fn publish(
    recorder: &Recorder,
    obj: &K8sService,
    type_: EventType,
    reason: &str,
    note: String,
    log: &impl Fn(String),
) {
    let ev = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: "Allocate".to_string(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&ev, &obj.object_ref(&())).await {
        log(format!("recording event {reason}: {}", crate::describe(&e)));
    }
}

/// PUTs the status of one Service; `None` when it changed since the plan (409, or a newer
/// resourceVersion, or gone).
async fn write_status(client: &Client, w: &Write) -> Result<Option<K8sService>, kube::Error> {
    let api: Api<K8sService> = Api::namespaced(client.clone(), &w.service.namespace);
    let Some(mut svc) = api.get_opt(&w.service.name).await? else {
        return Ok(None);
    };
    if w.resource_version.is_some() && svc.metadata.resource_version != w.resource_version {
        return Ok(None);
    }
    let status = svc.status.get_or_insert_with(Default::default);
    status.load_balancer = Some(LoadBalancerStatus {
        ingress: (!w.ips.is_empty()).then(|| {
            w.ips
                .iter()
                .map(|ip| LoadBalancerIngress {
                    ip: Some(ip.to_string()),
                    ip_mode: Some("VIP".to_string()),
                    ..LoadBalancerIngress::default()
                })
                .collect()
        }),
    });
    match api
        .replace_status(&w.service.name, &PostParams::default(), &svc)
        .await
    {
        Ok(s) => Ok(Some(s)),
        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::{ClusterIpSpec, ConfigMap, Meta};

    fn pools(text: &str) -> PoolConfig {
        let cm = ConfigMap {
            meta: Meta {
                name: "config".into(),
                namespace: "metallb-system".into(),
                ..Meta::default()
            },
            data: [("config".to_string(), text.to_string())].into(),
        };
        let (p, errs) = ferry_model::pools::load(&[cm], &[], &[]);
        assert!(errs.is_empty(), "{errs:?}");
        p
    }

    fn lb(name: &str, created: &str, ingress: &[&str]) -> Service {
        Service {
            meta: Meta {
                name: name.into(),
                namespace: "default".into(),
                extra: ferry_model::MetaExtra {
                    creation_timestamp: Some(created.into()),
                    resource_version: Some("7".into()),
                    ..Default::default()
                }
                .into(),
                ..Meta::default()
            },
            type_: ServiceType::LoadBalancer,
            cluster_ip: ClusterIpSpec::Ip("10.43.0.9".parse().unwrap()),
            extra: ferry_model::ServiceExtra {
                load_balancer_ingress: ingress.iter().map(|s| s.parse().unwrap()).collect(),
                ..Default::default()
            }
            .into(),
            ..Service::default()
        }
    }

    const TWO: &str = "address-pools:\n- name: lan\n  protocol: layer2\n  addresses:\n  - 192.168.2.200-192.168.2.201\n";

    #[test]
    fn addresses_in_status_are_kept_and_new_ones_assigned() {
        // "new" is older (by creation) than "old", so without the read-back it would win .200.
        let svcs = [
            lb("new", "2026-01-01T00:00:00Z", &[]),
            lb("old", "2026-02-01T00:00:00Z", &["192.168.2.200"]),
        ];
        let p = plan(&svcs, &[], &pools(TWO), None, &LbState::default(), 1);
        assert_eq!(p.writes.len(), 1, "{p:?}");
        let w = &p.writes[0];
        assert_eq!(w.service.name, "new");
        assert_eq!(w.ips, vec!["192.168.2.201".parse::<IpAddr>().unwrap()]);
        assert_eq!(w.resource_version.as_deref(), Some("7"));
    }

    #[test]
    fn nothing_to_write_when_status_is_right() {
        let svcs = [
            lb("a", "2026-01-01T00:00:00Z", &["192.168.2.201"]),
            lb("b", "2026-01-02T00:00:00Z", &["192.168.2.200"]),
        ];
        assert_eq!(
            plan(&svcs, &[], &pools(TWO), None, &LbState::default(), 1),
            Plan::default()
        );
    }

    #[test]
    fn full_pool_leaves_pending_with_a_reason() {
        let svcs = [
            lb("a", "2026-01-01T00:00:00Z", &["192.168.2.201"]),
            lb("b", "2026-01-02T00:00:00Z", &["192.168.2.200"]),
            lb("c", "2026-01-03T00:00:00Z", &[]),
        ];
        let p = plan(&svcs, &[], &pools(TWO), None, &LbState::default(), 1);
        assert!(p.writes.is_empty());
        let why = &p.pending[&ObjectRef::new("default", "c")];
        assert!(
            why.contains("no available IPs") || why.contains("lan"),
            "{why}"
        );
    }

    #[test]
    fn addresses_outside_the_pools_are_cleared_first_then_reassigned() {
        let mut other = lb("other", "2026-01-01T00:00:00Z", &["10.9.9.9"]);
        other.extra.load_balancer_class = Some("someone-else".into());
        let svcs = [
            lb("stray", "2026-01-01T00:00:00Z", &["192.168.5.5"]),
            lb("fresh", "2026-01-02T00:00:00Z", &[]),
            other,
        ];
        let p = plan(&svcs, &[], &pools(TWO), None, &LbState::default(), 1);
        assert!(
            p.writes.iter().all(|w| w.service.name != "other"),
            "other classes untouched"
        );
        assert_eq!(p.writes.len(), 2);
        assert_eq!(p.writes[0].service.name, "stray", "frees first");
        assert!(p.writes[0].frees());
        let ev = events_for(&p.writes[0]);
        assert_eq!(ev[0].1, "ClearAssignment");
        assert_eq!(ev[1].1, "IPAllocated");
    }

    #[test]
    fn addresses_from_manifest_mode_come_back_unless_taken() {
        let svcs = [
            lb("a", "2026-01-01T00:00:00Z", &[]),
            lb("b", "2026-01-02T00:00:00Z", &[]),
            lb("c", "2026-01-03T00:00:00Z", &["192.168.2.200"]),
        ];
        let mut previous = LbState::default();
        for (k, ip) in [
            ("default/b", "192.168.2.201"),
            ("default/a", "192.168.2.200"),
        ] {
            previous.services.insert(
                k.into(),
                LbEntry {
                    ips: vec![ip.parse().unwrap()],
                    pool: "lan".into(),
                    sharing: None,
                    updated_ms: 5,
                    gone_since_ms: None,
                },
            );
        }
        let p = plan(&svcs, &[], &pools(TWO), None, &previous, 1);
        let got: Vec<(&str, Vec<IpAddr>)> = p
            .writes
            .iter()
            .map(|w| (w.service.name.as_str(), w.ips.clone()))
            .collect();
        // b gets its old address back; a's was taken by c's status: a waits.
        assert_eq!(got, vec![("b", vec!["192.168.2.201".parse().unwrap()])]);
        assert!(p.pending.contains_key(&ObjectRef::new("default", "a")));
    }

    #[test]
    fn a_service_that_is_no_longer_a_load_balancer_is_cleared() {
        let mut s = lb("was", "2026-01-01T00:00:00Z", &["192.168.2.200"]);
        s.type_ = ServiceType::ClusterIP;
        let p = plan(&[s], &[], &pools(TWO), None, &LbState::default(), 1);
        assert_eq!(p.writes.len(), 1);
        assert!(p.writes[0].ips.is_empty());
    }
}
