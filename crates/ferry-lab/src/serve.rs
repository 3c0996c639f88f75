//! `ferry lab serve-pod`: what runs inside every lab pod. An HTTP/1.1 server on each TCP port
//! answering any request with 200 and body "<podname>\n", and a UDP responder on each UDP port
//! answering every datagram with "<podname>\n". Responses also carry the headers
//! `X-Ferry-Pod: <podname>`, `X-Client-Addr: <ip>:<port>` (the source the pod saw, for tests
//! of source NAT) and `X-Server-Addr: <ip>:<port>` (the pod's address that served: IPv4 or
//! IPv6, for tests of dual-stack Services). Sockets are bound to `[::]`, dual-stack (IPv4
//! peers are shown as IPv4 addresses); to 0.0.0.0 where IPv6 is off.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

/// Binds every port first (so a pod is ready once its TCP ports accept), then serves forever.
pub fn serve_pod(name: &str, tcp: &[u16], udp: &[u16]) -> Result<()> {
    let body: Arc<str> = Arc::from(format!("{name}\n"));
    let mut udp_sockets = Vec::new();
    for &port in udp {
        let s = UdpSocket::bind(("::", port))
            .or_else(|_| UdpSocket::bind(("0.0.0.0", port)))
            .with_context(|| format!("binding udp/{port}"))?;
        udp_sockets.push(s);
    }
    let mut listeners = Vec::new();
    for &port in tcp {
        let l = TcpListener::bind(("::", port))
            .or_else(|_| TcpListener::bind(("0.0.0.0", port)))
            .with_context(|| format!("binding tcp/{port}"))?;
        listeners.push(l);
    }
    println!("serve-pod {name}: tcp {tcp:?} udp {udp:?}");
    let mut threads = Vec::new();
    for sock in udp_sockets {
        let body = body.clone();
        threads.push(std::thread::spawn(move || udp_loop(sock, &body)));
    }
    for l in listeners {
        let body = body.clone();
        let pod = name.to_string();
        threads.push(std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(conn) = conn else { continue };
                let body = body.clone();
                let pod = pod.clone();
                std::thread::spawn(move || {
                    let _ = handle_http(conn, &pod, &body);
                });
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn udp_loop(sock: UdpSocket, body: &str) {
    let mut buf = [0u8; 65_536];
    loop {
        match sock.recv_from(&mut buf) {
            Ok((_, from)) => {
                let _ = sock.send_to(body.as_bytes(), from);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn handle_http(mut conn: TcpStream, pod: &str, body: &str) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    // IPv4 peers of the dual-stack socket arrive as ::ffff:a.b.c.d: shown as a.b.c.d.
    let canonical = |a: std::net::SocketAddr| {
        std::net::SocketAddr::new(a.ip().to_canonical(), a.port()).to_string()
    };
    let peer = conn.peer_addr().map(canonical).unwrap_or_default();
    let local = conn.local_addr().map(canonical).unwrap_or_default();
    // Read the request head (any method, any path); the answer does not depend on it.
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 65_536 {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => req.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Ferry-Pod: {pod}\r\nX-Client-Addr: {peer}\r\nX-Server-Addr: {local}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(resp.as_bytes())?;
    conn.flush()?;
    let _ = conn.shutdown(std::net::Shutdown::Write);
    Ok(())
}
