//! Two [`Speaker`]s in one process over real TCP on 127.0.0.1 (no root needed): one connects,
//! the other listens (passive). Sessions come up, a Stop reaches the other side as a Cease, TCP
//! MD5 with the same key works and with different keys does not.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::time::Duration;

use ferry_bgp::packet::{CeaseSubcode, ErrorKind};
use ferry_bgp::{Config, DownReason, PeerConfig, PeerEvent, Route, Speaker, State};
use tokio::sync::mpsc::UnboundedReceiver;

const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The active side (AS 64601) and the passive one (AS 64600, listening on `port`).
fn peers(port: u16, pw: (Option<&str>, Option<&str>)) -> (PeerConfig, PeerConfig) {
    let mut a = Config::new(64601, 64600, Ipv4Addr::new(10, 0, 0, 2));
    a.hold_time = 9;
    a.connect_retry = Duration::from_millis(200);
    let mut active = PeerConfig::new(LO, a);
    active.port = port;
    active.password = pw.0.map(str::to_string);
    let mut b = Config::new(64600, 64601, Ipv4Addr::new(10, 0, 0, 1));
    b.passive = true;
    b.connect_retry = Duration::from_millis(200);
    let mut passive = PeerConfig::new(LO, b);
    passive.password = pw.1.map(str::to_string);
    (active, passive)
}

async fn until(
    rx: &mut UnboundedReceiver<PeerEvent>,
    limit: Duration,
    mut f: impl FnMut(&PeerEvent) -> bool,
) -> Option<PeerEvent> {
    tokio::time::timeout(limit, async {
        while let Some(e) = rx.recv().await {
            if f(&e) {
                return Some(e);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

#[tokio::test]
async fn sessions_come_up_and_cease_on_stop() {
    let port = free_port();
    let (a, b) = peers(port, (None, None));
    let (mut sb, mut eb) = Speaker::new(Some(SocketAddr::new(LO, port))).unwrap();
    sb.set_peers(vec![b]).await;
    sb.set_routes(LO, vec![]);
    let (mut sa, mut ea) = Speaker::new(None).unwrap();
    sa.set_peers(vec![a]).await;
    sa.set_routes(LO, vec![Route::new("10.96.200.1/32".parse().unwrap())]);
    let up = |e: &PeerEvent| e.state == State::Established;
    assert!(until(&mut ea, Duration::from_secs(5), up).await.is_some());
    assert!(until(&mut eb, Duration::from_secs(5), up).await.is_some());
    sa.shutdown().await;
    let down = until(&mut eb, Duration::from_secs(5), |e| e.down.is_some())
        .await
        .expect("the passive side sees the session end");
    assert_eq!(
        down.down,
        Some(DownReason::NotificationReceived(
            ferry_bgp::packet::Notification::new(ErrorKind::Cease(
                CeaseSubcode::AdministrativeShutdown
            ))
        ))
    );
    sb.shutdown().await;
}

#[tokio::test]
async fn md5_same_key_up_different_key_not() {
    let port = free_port();
    let (a, b) = peers(port, (Some("k-96"), Some("k-96")));
    let (mut sb, mut eb) = Speaker::new(Some(SocketAddr::new(LO, port))).unwrap();
    sb.set_peers(vec![b]).await;
    sb.set_routes(LO, vec![]);
    let (mut sa, mut ea) = Speaker::new(None).unwrap();
    sa.set_peers(vec![a]).await;
    sa.set_routes(LO, vec![]);
    let up = |e: &PeerEvent| e.state == State::Established;
    assert!(until(&mut ea, Duration::from_secs(5), up).await.is_some());
    assert!(until(&mut eb, Duration::from_secs(5), up).await.is_some());
    sa.shutdown().await;
    sb.shutdown().await;

    let port = free_port();
    let (a, b) = peers(port, (Some("k-96"), Some("other")));
    let (mut sb, mut eb) = Speaker::new(Some(SocketAddr::new(LO, port))).unwrap();
    sb.set_peers(vec![b]).await;
    sb.set_routes(LO, vec![]);
    let (mut sa, mut ea) = Speaker::new(None).unwrap();
    sa.set_peers(vec![a]).await;
    sa.set_routes(LO, vec![]);
    let up = |e: &PeerEvent| e.state == State::Established;
    assert!(until(&mut ea, Duration::from_secs(2), up).await.is_none());
    assert!(until(&mut eb, Duration::from_millis(100), up)
        .await
        .is_none());
    sa.shutdown().await;
    sb.shutdown().await;
}

#[tokio::test]
async fn md5_on_a_dual_stack_listener() {
    // The passive side listens on [::]: the IPv4 peer's key goes in as ::ffff:127.0.0.1.
    let port = free_port();
    let (a, b) = peers(port, (Some("k-96"), Some("k-96")));
    let any6 = SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), port);
    let (mut sb, mut eb) = Speaker::new(Some(any6)).unwrap();
    sb.set_peers(vec![b]).await;
    sb.set_routes(LO, vec![]);
    let (mut sa, mut ea) = Speaker::new(None).unwrap();
    sa.set_peers(vec![a]).await;
    sa.set_routes(LO, vec![]);
    let up = |e: &PeerEvent| e.state == State::Established;
    assert!(until(&mut ea, Duration::from_secs(5), up).await.is_some());
    assert!(until(&mut eb, Duration::from_secs(5), up).await.is_some());
    sa.shutdown().await;
    sb.shutdown().await;
}

#[tokio::test]
async fn dropping_the_speaker_still_sends_cease() {
    let port = free_port();
    let (a, b) = peers(port, (None, None));
    let (mut sb, mut eb) = Speaker::new(Some(SocketAddr::new(LO, port))).unwrap();
    sb.set_peers(vec![b]).await;
    sb.set_routes(LO, vec![]);
    let (mut sa, mut ea) = Speaker::new(None).unwrap();
    sa.set_peers(vec![a]).await;
    sa.set_routes(LO, vec![]);
    let up = |e: &PeerEvent| e.state == State::Established;
    assert!(until(&mut ea, Duration::from_secs(5), up).await.is_some());
    assert!(until(&mut eb, Duration::from_secs(5), up).await.is_some());
    drop(sa);
    let down = until(&mut eb, Duration::from_secs(5), |e| e.down.is_some())
        .await
        .expect("the session ends");
    assert!(
        matches!(down.down, Some(DownReason::NotificationReceived(ref n))
            if n.error == ErrorKind::Cease(CeaseSubcode::AdministrativeShutdown)),
        "{down:?}"
    );
    sb.shutdown().await;
}
