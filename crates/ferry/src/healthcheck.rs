//! The health-check node ports of `type: LoadBalancer` Services with
//! `externalTrafficPolicy: Local` (`spec.healthCheckNodePort`), served as kube-proxy serves
//! them, so external load balancers and routers send traffic only to nodes that have a local
//! endpoint:
//!
//! - one HTTP server per Service, on its port, on every address of the node;
//! - any request gets `200` when this node has ready endpoints of the Service and the agent is
//!   healthy (its loops alive, as `/healthz` says), `503` otherwise;
//! - the body is JSON, `{"service":{"namespace":"ns","name":"n"},"localEndpoints":N,
//!   "serviceProxyHealthy":true}`, with `Content-Type: application/json` and
//!   `X-Content-Type-Options: nosniff`. N counts this node's ready endpoints (distinct address
//!   and port) over all the Service's ports, as kube-proxy counts them.
//!
//! Which ports and counts is pure ([`wanted`], from the resolved model of a sync); the servers
//! follow it ([`HealthChecks::update`], after each sync, on the agent's event loop): a port no
//! longer wanted is closed, a new one opened (a port that cannot be bound is reported and tried
//! again at the next update), a count changed in place. HTTP/1.1 by hyper, with the same
//! limits as the metrics endpoint (connections at once, time to send a request head).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ferry_model::view::ResolvedService;
use ferry_model::ObjectRef;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::http::{HEADER_TIMEOUT, MAX_CONNECTIONS};
use crate::metrics::Metrics;

/// One Service's health check on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub service: ObjectRef,
    pub port: u16,
    /// This node's ready endpoints of the Service (distinct address and port).
    pub local_endpoints: usize,
}

/// The health checks this node serves: every Service with a health-check node port (the
/// allocation gives one to LoadBalancer Services with externalTrafficPolicy Local only), by
/// port; a port asked for twice goes to the first Service by namespace/name.
pub fn wanted(services: &[ResolvedService], node: &str) -> Vec<Check> {
    let mut by_port: BTreeMap<u16, Check> = BTreeMap::new();
    let mut sorted: Vec<&ResolvedService> = services.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    for s in sorted {
        let Some(port) = s.health_check_node_port else {
            continue;
        };
        let local: std::collections::BTreeSet<_> = s
            .ports
            .iter()
            .flat_map(|p| p.endpoints.iter())
            .filter(|e| e.ready && e.node.as_deref() == Some(node))
            // A dual-stack pod is one endpoint (of the primary family), as kube-proxy counts.
            .filter(|e| s.cluster_ip.is_none_or(|c| c.is_ipv4() == e.addr.is_ipv4()))
            .map(|e| (e.addr, e.port))
            .collect();
        by_port.entry(port).or_insert(Check {
            service: s.id.clone(),
            port,
            local_endpoints: local.len(),
        });
    }
    by_port.into_values().collect()
}

/// The answer to any request on a Service's health-check port.
pub fn answer(service: &ObjectRef, local_endpoints: usize, proxy_healthy: bool) -> (u16, String) {
    let status = if local_endpoints > 0 && proxy_healthy {
        200
    } else {
        503
    };
    let body = serde_json::json!({
        "service": {"namespace": service.namespace, "name": service.name},
        "localEndpoints": local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    });
    (status, body.to_string())
}

/// What one open port serves; the count changes in place.
struct Slot {
    service: ObjectRef,
    endpoints: AtomicUsize,
}

struct Open {
    slot: Arc<Slot>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Open {
    fn drop(&mut self) {
        // Ending the accept loops drops their listeners: the port closes.
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The servers of this node's health-check ports.
pub struct HealthChecks {
    metrics: Arc<Metrics>,
    open: BTreeMap<u16, Open>,
}

impl HealthChecks {
    pub fn new(metrics: Arc<Metrics>) -> HealthChecks {
        HealthChecks {
            metrics,
            open: BTreeMap::new(),
        }
    }

    /// The ports open now.
    #[cfg(test)]
    pub fn ports(&self) -> Vec<u16> {
        self.open.keys().copied().collect()
    }

    /// Serves exactly `checks` from now on. Must run inside the tokio runtime.
    pub fn update(&mut self, checks: Vec<Check>) {
        let want: BTreeMap<u16, Check> = checks.into_iter().map(|c| (c.port, c)).collect();
        self.open.retain(|port, o| {
            let keep = want.get(port).is_some_and(|c| c.service == o.slot.service);
            if !keep {
                log!(
                    "health check of Service {} on port {port} closed",
                    o.slot.service
                );
            }
            keep
        });
        for (port, c) in want {
            if let Some(o) = self.open.get(&port) {
                o.slot.endpoints.store(c.local_endpoints, Ordering::Relaxed);
                continue;
            }
            let slot = Arc::new(Slot {
                service: c.service.clone(),
                endpoints: AtomicUsize::new(c.local_endpoints),
            });
            match listen(port) {
                Ok(listeners) => {
                    log!("health check of Service {} on port {port}", c.service);
                    let tasks = listeners
                        .into_iter()
                        .map(|l| tokio::spawn(serve(l, Arc::clone(&slot), self.metrics.clone())))
                        .collect();
                    self.open.insert(port, Open { slot, tasks });
                }
                Err(e) => log!(
                    "warning: health check of Service {} cannot listen on port {port}: {e} \
                     (tried again at the next sync)",
                    c.service
                ),
            }
        }
    }
}

/// Listeners on every address of the node: `[::]` (IPv4 too, as Linux maps it), or
/// `0.0.0.0` where IPv6 is off.
fn listen(port: u16) -> std::io::Result<Vec<TcpListener>> {
    let bind = |addr: SocketAddr| -> std::io::Result<TcpListener> {
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        TcpListener::from_std(l)
    };
    match bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))) {
        Ok(l) => Ok(vec![l]),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(e),
        Err(_) => Ok(vec![bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?]),
    }
}

async fn serve(listener: TcpListener, slot: Arc<Slot>, metrics: Arc<Metrics>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                log!(
                    "health check of Service {}: accept failed: {e}",
                    slot.service
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let (slot, metrics) = (slot.clone(), metrics.clone());
        tokio::spawn(async move {
            let service = service_fn(move |_req: Request<Incoming>| {
                let healthy = metrics.stale_loops().is_empty();
                let (status, body) = answer(
                    &slot.service,
                    slot.endpoints.load(Ordering::Relaxed),
                    healthy,
                );
                let mut r = Response::new(Full::new(Bytes::from(body)));
                *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
                let h = r.headers_mut();
                h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                h.insert(
                    "x-content-type-options",
                    HeaderValue::from_static("nosniff"),
                );
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::view::{ResolvedEndpoint, ResolvedPort};
    use ferry_model::{Protocol, ServiceType, TrafficPolicy};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn ep(addr: &str, port: u16, node: &str, ready: bool) -> ResolvedEndpoint {
        ResolvedEndpoint {
            addr: addr.parse().unwrap(),
            port,
            node: Some(node.into()),
            ready,
            serving: ready,
            terminating: false,
            zone_hints: None,
        }
    }

    fn svc(name: &str, hc: Option<u16>, ports: Vec<Vec<ResolvedEndpoint>>) -> ResolvedService {
        ResolvedService {
            id: ObjectRef::new("shop", name),
            type_: ServiceType::LoadBalancer,
            cluster_ip: Some("10.43.0.5".parse().unwrap()),
            secondary_cluster_ip: None,
            external_ips: vec![],
            load_balancer_ips: vec![],
            external_traffic_policy: TrafficPolicy::Local,
            internal_traffic_policy: TrafficPolicy::Cluster,
            ports: ports
                .into_iter()
                .enumerate()
                .map(|(i, endpoints)| ResolvedPort {
                    name: format!("p{i}"),
                    protocol: Protocol::Tcp,
                    port: 80 + i as u16,
                    node_port: Some(30000 + i as u16),
                    endpoints,
                })
                .collect(),
            affinity_timeout: None,
            load_balancer_source_ranges: vec![],
            health_check_node_port: hc,
        }
    }

    #[test]
    fn counts_this_nodes_ready_endpoints_once_over_all_ports() {
        let web = svc(
            "web",
            Some(32000),
            vec![
                vec![
                    ep("10.42.0.5", 8080, "n1", true),
                    ep("10.42.0.6", 8080, "n1", false),
                    ep("10.42.1.5", 8080, "n2", true),
                ],
                vec![
                    ep("10.42.0.5", 8080, "n1", true),
                    ep("10.42.0.5", 9090, "n1", true),
                ],
            ],
        );
        let plain = svc("plain", None, vec![vec![ep("10.42.0.7", 80, "n1", true)]]);
        let w = wanted(&[plain, web.clone()], "n1");
        assert_eq!(
            w,
            vec![Check {
                service: ObjectRef::new("shop", "web"),
                port: 32000,
                local_endpoints: 2,
            }]
        );
        assert_eq!(
            wanted(std::slice::from_ref(&web), "n2")[0].local_endpoints,
            1
        );
        assert_eq!(wanted(&[web], "n3")[0].local_endpoints, 0);
    }

    #[test]
    fn answers_as_kube_proxy() {
        let s = ObjectRef::new("ns", "n");
        let (status, body) = answer(&s, 2, true);
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"service": {"namespace": "ns", "name": "n"},
                               "localEndpoints": 2, "serviceProxyHealthy": true})
        );
        assert_eq!(answer(&s, 0, true).0, 503);
        assert_eq!(
            answer(&s, 3, false).0,
            503,
            "an unhealthy agent fails its checks"
        );
    }

    async fn get(port: u16) -> String {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.unwrap();
        buf
    }

    #[tokio::test]
    async fn servers_follow_the_updates() {
        // A port the kernel says is free now (loopback only is used by the test).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut hc = HealthChecks::new(Arc::new(Metrics::new("n1")));
        let check = |n| Check {
            service: ObjectRef::new("ns", "web"),
            port,
            local_endpoints: n,
        };
        hc.update(vec![check(1)]);
        assert_eq!(hc.ports(), vec![port]);
        let r = get(port).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("content-type: application/json"), "{r}");
        assert!(r.contains("x-content-type-options: nosniff"), "{r}");
        assert!(r.contains("\"localEndpoints\":1"), "{r}");
        hc.update(vec![check(0)]);
        let r = get(port).await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert!(r.contains("\"localEndpoints\":0"), "{r}");
        hc.update(vec![]);
        assert!(hc.ports().is_empty());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err(),
            "closed"
        );
    }
}
