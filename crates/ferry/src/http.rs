//! The agent's HTTP endpoint (`--metrics-addr`): `/healthz`, `/readyz` and `/metrics`.
//!
//! - `/healthz`: 200 `ok` while every loop that calls [`Metrics::heartbeat`] keeps doing so;
//!   503 naming the stale loops otherwise.
//! - `/readyz`: 200 `ok` once [`Metrics::set_ready`] was called (the first full sync is in the
//!   kernel), 503 before.
//! - `/metrics`: the Prometheus text format 0.0.4, or OpenMetrics 1.0 when the scraper's
//!   `Accept` prefers it (Prometheus does).
//! - anything else: 404; methods other than GET and HEAD: 405.
//!
//! HTTP/1.1 by hyper on tokio. Connections beyond [`MAX_CONNECTIONS`] are closed at once, and a
//! client gets [`HEADER_TIMEOUT`] to send its request head, so a slow or broken client takes
//! neither the endpoint nor the agent down.

use std::convert::Infallible;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ACCEPT, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::metrics::{Metrics, OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE};

/// Connections served at once; more are closed as they come.
pub const MAX_CONNECTIONS: usize = 32;
/// Time a client has to send a request's head (also the keep-alive idle limit).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

const PLAIN: &str = "text/plain; charset=utf-8";

/// Serves `/healthz`, `/readyz` and `/metrics` on `listener` until the task is dropped.
/// Failed accepts (out of file descriptors, a connection reset before it was taken) are logged
/// and retried after a pause; the only error returned is one that no retry can cure (the
/// listener itself is unusable).
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(e) if fatal_accept_error(&e) => return Err(e),
            Err(e) => {
                log!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let response = respond(&metrics, &req);
                async move { Ok::<_, Infallible>(response) }
            });
            // A client that goes away or sends garbage ends its own connection (hyper answers
            // 400 where it can): nothing to report.
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(permit);
        });
    }
}

/// Parses `--metrics-addr`: `IP:PORT` (`127.0.0.1:10249`, `[::1]:10249`, `0.0.0.0:10249` for
/// every address), `localhost:PORT`, or a bare `PORT` (on 127.0.0.1). Fits clap's
/// `value_parser`.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    let bad =
        |why: &str| format!("--metrics-addr {s:?}: {why} (want IP:PORT, localhost:PORT or PORT)");
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
    if let Some(port) = s.strip_prefix("localhost:") {
        let port = port.parse::<u16>().map_err(|_| bad("bad port"))?;
        return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
    s.parse::<SocketAddr>().map_err(|_| bad("not an address"))
}

/// Listens on `addr` for [`serve`]; the error names the flag and the address.
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("--metrics-addr {addr}: {e}")))
}

fn fatal_accept_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP)
    )
}

/// The answer to one request (the body is never read: no route takes one).
fn respond<B>(metrics: &Metrics, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "method not allowed\n",
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/healthz" => {
            let stale = metrics.stale_loops();
            if stale.is_empty() {
                reply(StatusCode::OK, PLAIN, "ok\n")
            } else {
                let list: Vec<String> = stale
                    .iter()
                    .map(|(name, age)| format!("{name} ({:.1}s ago)", age.as_secs_f64()))
                    .collect();
                let body = format!("stale: no heartbeat from {}\n", list.join(", "));
                reply(StatusCode::SERVICE_UNAVAILABLE, PLAIN, body)
            }
        }
        "/readyz" => {
            if metrics.is_ready() {
                reply(StatusCode::OK, PLAIN, "ok\n")
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    PLAIN,
                    "not ready: the first full sync is not in the kernel yet\n",
                )
            }
        }
        "/metrics" => {
            let accept = req
                .headers()
                .get_all(ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect::<Vec<_>>()
                .join(",");
            if prefers_openmetrics(&accept) {
                reply(
                    StatusCode::OK,
                    OPENMETRICS_CONTENT_TYPE,
                    metrics.encode_openmetrics(),
                )
            } else {
                reply(StatusCode::OK, TEXT_CONTENT_TYPE, metrics.encode())
            }
        }
        _ => reply(StatusCode::NOT_FOUND, PLAIN, "not found\n"),
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// Whether an `Accept` header ranks `application/openmetrics-text` above the text format
/// (`text/plain`, or `*/*`); a tie or no header goes to the text format.
fn prefers_openmetrics(accept: &str) -> bool {
    let mut openmetrics = 0.0_f64;
    let mut text = 0.0_f64;
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .and_then(|(_, v)| v.trim().parse::<f64>().ok())
            .filter(|q| (0.0..=1.0).contains(q))
            .unwrap_or(1.0);
        match media.as_str() {
            "application/openmetrics-text" => openmetrics = openmetrics.max(q),
            "text/plain" | "text/*" | "*/*" => text = text.max(q),
            _ => {}
        }
    }
    openmetrics > text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// A served endpoint on 127.0.0.1 (port chosen by the kernel).
    async fn start(metrics: Arc<Metrics>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, metrics));
        addr
    }

    struct Reply {
        status: u16,
        head: String,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
            })
        }
    }

    /// Sends `raw` as is and reads until the server closes; `None` if it closed saying nothing.
    async fn try_exchange(addr: SocketAddr, raw: &[u8]) -> Option<Reply> {
        let mut s = TcpStream::connect(addr).await.unwrap();
        // The server may close a refused connection before the request is written.
        let _ = s.write_all(raw).await;
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
            .await
            .expect("the server answers and closes")
            .ok()?;
        let text = String::from_utf8(buf).unwrap();
        if text.is_empty() {
            return None;
        }
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {text:?}"));
        Some(Reply {
            status,
            head: head.to_string(),
            body: body.to_string(),
        })
    }

    async fn exchange(addr: SocketAddr, raw: &[u8]) -> Reply {
        try_exchange(addr, raw)
            .await
            .expect("an answer, not a closed connection")
    }

    async fn get(addr: SocketAddr, path: &str, extra: &str) -> Reply {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n");
        exchange(addr, req.as_bytes()).await
    }

    /// Metrics with a value in every family, as a running agent has them.
    fn populated() -> Arc<Metrics> {
        let m = Metrics::new("node-1");
        m.observe_sync(Duration::from_millis(7), true);
        m.observe_sync(Duration::from_millis(70), false);
        m.add_changes(3, 9);
        m.observe_network_programming(Duration::from_millis(800));
        m.set_programmed(4, 10);
        m.set_pools([("default", 3, 16), ("v6", 1, 1 << 40)]);
        m.set_announced(vec![
            ("192.0.2.10".parse().unwrap(), "default/web".to_string()),
            ("2001:db8::10".parse().unwrap(), "default/web".to_string()),
        ]);
        m.set_membership(3, 3, true);
        m.inc_takeover();
        m.set_member_stats(ferry_member::Stats {
            datagrams_in: 12,
            datagrams_out: 14,
            heartbeats_in: 5,
            ..Default::default()
        });
        m.set_responder_counters(
            "eth0",
            ferry_l2::Counters {
                frames: 20,
                requests: 8,
                requests_owned: 4,
                replies: 4,
                announcements: 6,
                ..Default::default()
            },
        );
        m.set_ready();
        m.heartbeat("sync");
        Arc::new(m)
    }

    #[tokio::test]
    async fn routes_and_status_codes() {
        let m = Arc::new(Metrics::new("n1"));
        let addr = start(m.clone()).await;

        let r = get(addr, "/healthz", "").await;
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));

        let r = get(addr, "/readyz", "").await;
        assert_eq!(r.status, 503, "{}", r.body);
        assert!(r.body.contains("not ready"), "{}", r.body);
        m.set_ready();
        let r = get(addr, "/readyz", "").await;
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));

        let r = get(addr, "/nope", "").await;
        assert_eq!(r.status, 404);
        let r = get(addr, "/metrics/extra", "").await;
        assert_eq!(r.status, 404);
        // A query string does not change the route.
        let r = get(addr, "/healthz?verbose=1", "").await;
        assert_eq!(r.status, 200);

        let r = exchange(
            addr,
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
        )
        .await;
        assert_eq!(r.status, 405);
        assert_eq!(r.header("allow"), Some("GET, HEAD"));

        let r = exchange(
            addr,
            b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "", "HEAD has no body");
    }

    #[tokio::test]
    async fn healthz_fails_when_a_loop_stops() {
        let m = Arc::new(Metrics::with_liveness_timeout(
            "n1",
            Duration::from_millis(100),
        ));
        let addr = start(m.clone()).await;
        m.heartbeat("sync");
        assert_eq!(get(addr, "/healthz", "").await.status, 200);
        tokio::time::sleep(Duration::from_millis(700)).await;
        let r = get(addr, "/healthz", "").await;
        assert_eq!(r.status, 503);
        assert!(r.body.contains("sync"), "{}", r.body);
        m.heartbeat("sync");
        assert_eq!(get(addr, "/healthz", "").await.status, 200);
    }

    #[tokio::test]
    async fn metrics_in_both_formats() {
        let m = populated();
        let addr = start(m.clone()).await;

        let r = get(addr, "/metrics", "").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some(TEXT_CONTENT_TYPE));
        assert!(
            r.body.contains("\nmetallb_speaker_announced{ip=\"192.0.2.10\",node=\"node-1\",protocol=\"layer2\",service=\"default/web\"} 1\n"),
            "{}",
            r.body
        );
        assert!(r.body.contains("\nferry_l2_takeovers_total 1\n"));
        assert!(!r.body.contains("# EOF"));

        // What Prometheus 2.x sends.
        let prom = "Accept: application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1\r\n";
        let r = get(addr, "/metrics", prom).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some(OPENMETRICS_CONTENT_TYPE));
        assert!(r.body.ends_with("# EOF\n"), "{}", r.body);

        let r = get(
            addr,
            "/metrics",
            "Accept: text/plain;q=0.9, application/openmetrics-text;q=0.5\r\n",
        )
        .await;
        assert_eq!(r.header("content-type"), Some(TEXT_CONTENT_TYPE));
    }

    #[test]
    fn metrics_addr_forms() {
        let ok = |s: &str| parse_addr(s).unwrap().to_string();
        assert_eq!(ok("10249"), "127.0.0.1:10249");
        assert_eq!(ok("localhost:7472"), "127.0.0.1:7472");
        assert_eq!(ok("0.0.0.0:10249"), "0.0.0.0:10249");
        assert_eq!(ok("[::1]:10249"), "[::1]:10249");
        assert_eq!(ok(" 192.0.2.1:80 "), "192.0.2.1:80");
        for bad in [
            "",
            "localhost",
            "localhost:x",
            "1.2.3.4",
            "1.2.3.4:70000",
            "::1:80",
            "host:80",
        ] {
            let e = parse_addr(bad).unwrap_err();
            assert!(e.starts_with("--metrics-addr"), "{bad:?}: {e}");
        }
    }

    #[tokio::test]
    async fn bind_error_names_the_flag() {
        let taken = bind(parse_addr("127.0.0.1:0").unwrap()).await.unwrap();
        let addr = taken.local_addr().unwrap();
        let e = bind(addr).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert!(
            e.to_string().contains(&format!("--metrics-addr {addr}")),
            "{e}"
        );
    }

    #[test]
    fn accept_negotiation() {
        assert!(!prefers_openmetrics(""));
        assert!(!prefers_openmetrics("text/plain"));
        assert!(!prefers_openmetrics("*/*"));
        assert!(prefers_openmetrics("application/openmetrics-text"));
        assert!(prefers_openmetrics(
            "application/openmetrics-text; version=1.0.0, text/plain;q=0.5"
        ));
        assert!(!prefers_openmetrics(
            "application/openmetrics-text;q=0.2, text/plain;q=0.5"
        ));
        assert!(!prefers_openmetrics("application/openmetrics-text, */*"));
        // Nonsense q values count as 1.
        assert!(prefers_openmetrics(
            "application/openmetrics-text;q=x, text/plain;q=0.5"
        ));
        assert!(!prefers_openmetrics(";;;,,,=;q="));
    }

    #[tokio::test]
    async fn bad_requests_get_an_answer_and_the_server_goes_on() {
        let m = Arc::new(Metrics::new("n1"));
        let addr = start(m).await;
        for raw in [
            &b"garbage\r\n\r\n"[..],
            b"GET /healthz HTTP/9.9\r\n\r\n",
            b"GET \xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nBad Header\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        ] {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(raw).await.unwrap();
            let mut buf = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
                .await
                .expect("the server closes a bad request's connection")
                .ok();
            let text = String::from_utf8_lossy(&buf);
            assert!(
                text.is_empty() || text.starts_with("HTTP/1.1 4") || text.starts_with("HTTP/1.1 5"),
                "{raw:?} -> {text:?}"
            );
        }
        // A client that connects and says nothing, and one that hangs up mid-request.
        let idle = TcpStream::connect(addr).await.unwrap();
        let mut half = TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET /metr").await.unwrap();
        drop(half);
        assert_eq!(get(addr, "/healthz", "").await.status, 200);
        drop(idle);
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_not_queued() {
        let m = Arc::new(Metrics::new("n1"));
        let addr = start(m).await;
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        // Let the server take them all.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut extra = TcpStream::connect(addr).await.unwrap();
        let _ = extra
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), extra.read_to_end(&mut buf))
            .await
            .expect("closed at once");
        assert!(buf.is_empty(), "{}", String::from_utf8_lossy(&buf));
        drop(held);
        // Served again once the server has seen those connections close.
        let healthz = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(r) = try_exchange(addr, healthz).await {
                assert_eq!(r.status, 200);
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "never served again");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `promtool check metrics` (Debian package `prometheus`) on a scrape of the endpoint.
    /// Skipped without promtool, unless `CI` is set.
    #[tokio::test]
    async fn promtool_accepts_the_scrape() {
        if Command::new("promtool").arg("--version").output().is_err() {
            ferry_lab::skip(
                "promtool_accepts_the_scrape",
                "promtool is missing (apt-get install prometheus; scripts/install-deps.sh)",
            );
            return;
        }
        let addr = start(populated()).await;
        let scrape = get(addr, "/metrics", "").await;
        assert_eq!(scrape.status, 200);
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(scrape.body.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        // Exit 0: clean; 3: lint problems only (1: unparsable). The only problems allowed are
        // MetalLB's two gauges whose names end in `_total`, kept for MetalLB's dashboards.
        let allowed = [
            "metallb_allocator_addresses_in_use_total non-counter metrics should not have \"_total\" suffix",
            "metallb_allocator_addresses_total non-counter metrics should not have \"_total\" suffix",
        ];
        let problems: Vec<&str> = stderr
            .lines()
            .chain(stdout.lines())
            .map(str::trim)
            .filter(|l| !l.is_empty() && !allowed.contains(l))
            .collect();
        assert!(
            matches!(out.status.code(), Some(0 | 3)) && problems.is_empty(),
            "promtool: {:?}\n{problems:#?}\n{}",
            out.status,
            scrape.body
        );
    }
}
