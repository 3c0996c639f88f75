//! The HTTP surface without any client library (HTTP/1.0 over a TcpStream): status codes,
//! Status bodies, the status subresource, patches, and watch semantics.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::Lab;
use ferry_apiserver::Config;
use serde_json::{json, Value};

fn send(addr: SocketAddr, method: &str, path: &str, ct: &str, body: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: x\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    s
}

/// (status code, JSON body).
fn call(addr: SocketAddr, method: &str, path: &str, ct: &str, body: &Value) -> (u16, Value) {
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let mut s = send(addr, method, path, ct, &body);
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    (code, serde_json::from_str(body).unwrap_or(Value::Null))
}

const JSON: &str = "application/json";
const SVCS: &str = "/api/v1/namespaces/default/services";

/// A watch response being read: the status code, then one JSON event per line.
struct Watch {
    code: u16,
    r: BufReader<TcpStream>,
}

impl Watch {
    fn open(stream: TcpStream) -> Watch {
        let mut r = BufReader::new(stream);
        let mut line = String::new();
        r.read_line(&mut line).expect("status line");
        let code = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("code");
        loop {
            line.clear();
            r.read_line(&mut line).expect("header");
            if line.trim().is_empty() {
                break;
            }
        }
        Watch { code, r }
    }

    /// The next event, or None when the server ended the stream.
    fn next(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.r.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(serde_json::from_str(line.trim()).expect("a JSON event")),
            Err(e) => panic!("reading the watch: {e}"),
        }
    }
}

/// Reads up to `n` events: (status code, events, whether the stream ended).
fn events(stream: TcpStream, n: usize) -> (u16, Vec<Value>, bool) {
    let mut w = Watch::open(stream);
    let mut out = Vec::new();
    while out.len() < n {
        match w.next() {
            Some(e) => out.push(e),
            None => return (w.code, out, true),
        }
    }
    (w.code, out, false)
}

fn svc(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels}, "spec": {"ports": [{"port": 80}]}})
}

#[test]
fn verbs_codes_and_status_objects() {
    let lab = Lab::quick();
    let a = lab.server.addr();
    let (code, created) = call(a, "POST", SVCS, JSON, &svc("web", json!({"app": "web"})));
    assert_eq!(code, 201);
    let (code, st) = call(a, "POST", SVCS, JSON, &svc("web", json!({})));
    assert_eq!(code, 409);
    assert_eq!(
        (
            st["kind"].as_str(),
            st["reason"].as_str(),
            st["code"].as_u64()
        ),
        (Some("Status"), Some("AlreadyExists"), Some(409))
    );
    assert_eq!(st["details"]["name"], "web");
    let (code, st) = call(a, "GET", &format!("{SVCS}/nope"), JSON, &Value::Null);
    assert_eq!((code, st["reason"].as_str()), (404, Some("NotFound")));
    let (code, _) = call(
        a,
        "GET",
        "/api/v1/namespaces/default/widgets",
        JSON,
        &Value::Null,
    );
    assert_eq!(code, 404);
    let (code, st) = call(a, "POST", SVCS, JSON, &json!("not an object"));
    assert_eq!((code, st["reason"].as_str()), (400, Some("BadRequest")));

    // PUT with the current resourceVersion works once; the old one then conflicts.
    let mut v2 = created.clone();
    v2["spec"]["type"] = json!("NodePort");
    let (code, updated) = call(a, "PUT", &format!("{SVCS}/web"), JSON, &v2);
    assert_eq!(code, 200);
    let (code, st) = call(a, "PUT", &format!("{SVCS}/web"), JSON, &v2);
    assert_eq!((code, st["reason"].as_str()), (409, Some("Conflict")));

    // Status subresource: PUT changes only status; a main PUT ignores status.
    let mut st_body = updated.clone();
    st_body["status"] = json!({"loadBalancer": {"ingress": [{"ip": "192.0.2.7"}]}});
    st_body["spec"]["type"] = json!("ExternalName");
    let (code, after) = call(a, "PUT", &format!("{SVCS}/web/status"), JSON, &st_body);
    assert_eq!(code, 200);
    assert_eq!(after["spec"]["type"], "NodePort");
    assert_eq!(
        after["status"]["loadBalancer"]["ingress"][0]["ip"],
        "192.0.2.7"
    );
    let (code, _) = call(
        a,
        "GET",
        "/api/v1/namespaces/default/configmaps/x/status",
        JSON,
        &Value::Null,
    );
    assert_eq!(code, 404, "configmaps have no status subresource");

    // JSON patch with a failing test op changes nothing; a good one applies.
    let (code, st) = call(
        a,
        "PATCH",
        &format!("{SVCS}/web"),
        "application/json-patch+json",
        &json!([{"op": "test", "path": "/spec/type", "value": "ClusterIP"}]),
    );
    assert_eq!((code, st["reason"].as_str()), (422, Some("Invalid")));
    let (code, p) = call(
        a,
        "PATCH",
        &format!("{SVCS}/web"),
        "application/json-patch+json",
        &json!([{"op": "add", "path": "/metadata/labels/x", "value": "y"}]),
    );
    assert_eq!(code, 200);
    assert_eq!(p["metadata"]["labels"], json!({"app": "web", "x": "y"}));
    let (code, _) = call(a, "PATCH", &format!("{SVCS}/web"), "text/plain", &json!({}));
    assert_eq!(code, 415);
    // A merge patch carrying a stale resourceVersion conflicts.
    let (code, _) = call(
        a,
        "PATCH",
        &format!("{SVCS}/web"),
        "application/merge-patch+json",
        &json!({"metadata": {"resourceVersion": "2"}}),
    );
    assert_eq!(code, 409);

    // List: resourceVersion and selectors.
    call(a, "POST", SVCS, JSON, &svc("db", json!({"app": "db"})));
    let (code, list) = call(
        a,
        "GET",
        &format!("{SVCS}?labelSelector=app%20in%20(db,x)"),
        JSON,
        &Value::Null,
    );
    assert_eq!(code, 200);
    assert_eq!(list["kind"], "ServiceList");
    assert!(list["metadata"]["resourceVersion"]
        .as_str()
        .is_some_and(|r| !r.is_empty()));
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(list["items"][0]["metadata"]["name"], "db");
    let (_, all) = call(
        a,
        "GET",
        "/api/v1/services?fieldSelector=metadata.namespace%3Ddefault,metadata.name!%3Ddb",
        JSON,
        &Value::Null,
    );
    assert_eq!(all["items"].as_array().map(Vec::len), Some(1));
    let (code, _) = call(
        a,
        "GET",
        &format!("{SVCS}?labelSelector=a%20in%20b"),
        JSON,
        &Value::Null,
    );
    assert_eq!(code, 400);

    // Delete returns the object; a second delete is 404.
    let (code, d) = call(a, "DELETE", &format!("{SVCS}/web"), JSON, &Value::Null);
    assert_eq!((code, d["metadata"]["name"].as_str()), (200, Some("web")));
    assert_eq!(
        call(a, "DELETE", &format!("{SVCS}/web"), JSON, &Value::Null).0,
        404
    );

    // Discovery.
    let (_, groups) = call(a, "GET", "/apis", JSON, &Value::Null);
    assert!(groups["groups"]
        .as_array()
        .is_some_and(|g| g.iter().any(|g| g["name"] == "coordination.k8s.io")));
    let (_, rl) = call(a, "GET", "/apis/metallb.io/v1beta2", JSON, &Value::Null);
    assert_eq!(rl["resources"][0]["name"], "bgppeers");
}

#[test]
fn watch_semantics() {
    let lab = Lab::start(Config {
        history: 5,
        bookmark_interval: Duration::from_millis(200),
        ..Config::default()
    });
    let a = lab.server.addr();
    call(a, "POST", SVCS, JSON, &svc("a", json!({"app": "x"})));
    call(a, "POST", SVCS, JSON, &svc("b", json!({"app": "y"})));

    // resourceVersion=0: synthetic ADDED for what exists (selector applied), then live events;
    // leaving the selector is a DELETED, entering it an ADDED.
    let w = send(
        a,
        "GET",
        &format!("{SVCS}?watch=true&resourceVersion=0&labelSelector=app%3Dx&timeoutSeconds=5"),
        JSON,
        "",
    );
    // The first event (the synthetic ADDED) shows the watch is in place before the writes.
    let mut w = Watch::open(w);
    assert_eq!(w.code, 200);
    let mut evs = vec![w.next().expect("the synthetic ADDED")];
    call(
        a,
        "PATCH",
        &format!("{SVCS}/a"),
        "application/merge-patch+json",
        &json!({"metadata": {"labels": {"app": "z"}}}),
    );
    call(
        a,
        "PATCH",
        &format!("{SVCS}/b"),
        "application/merge-patch+json",
        &json!({"metadata": {"labels": {"app": "x"}}}),
    );
    evs.extend((0..2).map(|_| w.next().expect("an event")));
    let seen: Vec<(String, String)> = evs
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or_default().to_string(),
                e["object"]["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    let want = [("ADDED", "a"), ("DELETED", "a"), ("ADDED", "b")];
    assert_eq!(
        seen,
        want.map(|(t, n)| (t.to_string(), n.to_string())),
        "{evs:?}"
    );

    // Bookmarks, and the stream closes at timeoutSeconds.
    let start = Instant::now();
    let (_, list) = call(a, "GET", SVCS, JSON, &Value::Null);
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .expect("rv")
        .to_string();
    let w = send(
        a,
        "GET",
        &format!("{SVCS}?watch=1&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=1"),
        JSON,
        "",
    );
    let (_, evs, ended) = events(w, 100);
    assert!(ended);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(
        !evs.is_empty() && evs.iter().all(|e| e["type"] == "BOOKMARK"),
        "{evs:?}"
    );
    assert_eq!(evs[0]["object"]["metadata"]["resourceVersion"], json!(rv));
    assert_eq!(evs[0]["object"]["kind"], "Service");

    // Push the history past `rv`: resuming from it is HTTP 200 with one ERROR 410 event.
    for i in 0..6 {
        call(a, "POST", SVCS, JSON, &svc(&format!("n{i}"), json!({})));
    }
    let w = send(
        a,
        "GET",
        &format!("{SVCS}?watch=true&resourceVersion={rv}"),
        JSON,
        "",
    );
    let (code, evs, ended) = events(w, 2);
    assert_eq!(code, 200);
    assert!(ended);
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0]["type"], "ERROR");
    assert_eq!(evs[0]["object"]["code"], 410);
    assert_eq!(evs[0]["object"]["reason"], "Expired");
    let (code, _) = call(
        a,
        "GET",
        &format!("{SVCS}?watch=true&resourceVersion=abc"),
        JSON,
        &Value::Null,
    );
    assert_eq!(code, 400);
}
