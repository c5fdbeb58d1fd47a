//! The kernel client's sockets to its hub, rebuilt when the hub goes away
//! (the client side of `engine/src/link.rs`).
//!
//! zmq.rs does not reconnect DEALER sockets, so a hub restarted with
//! `parallax hub --restore` (same ports and key, engines kept) would find
//! the kernel deaf. One supervisor task owns every socket of the current
//! *generation*: it sends what the client queues, spawns a receiver per
//! socket, and when a DEALER's monitor reports its peer gone it drops the
//! generation, waits until the hub's registration port accepts
//! connections, connects a new one with the same identity (the session id:
//! the restored hub routes replies to requests that were in flight — their
//! `HubRestartError` — by it) and refreshes the engine table. What the
//! client sends meanwhile waits in the queue, and a message the dead
//! socket handed back is sent again first: nothing is lost, nothing hangs
//! the kernel (requests have their own timeouts).
//!
//! The supervisor ends when the last [`crate::client::HubClient`] clone
//! is dropped (the queue closes).

use std::collections::VecDeque;
use std::sync::Weak;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use parallax_wire::Signer;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use zeromq::{
    DealerSocket, Socket, SocketEvent, SocketOptions, SocketSend, SubSocket, ZmqError, ZmqMessage,
};

use crate::client::{Chan, HubClient, Inner, receiver};
use parallax_engine::link::peer_lost;

/// How long one socket may take to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an absent hub's registration port is tried.
const PROBE_INTERVAL: Duration = Duration::from_millis(200);

/// Where the hub is and who we are.
#[derive(Debug, Clone)]
pub(crate) struct Endpoints {
    pub host: String,
    pub session_id: String,
    pub registration: u16,
    pub mux: u16,
    pub control: u16,
    pub task: u16,
    pub broadcast: u16,
    pub iopub: u16,
    pub notification: u16,
}

impl Endpoints {
    fn url(&self, port: u16) -> String {
        format!("tcp://{}:{port}", self.host)
    }
}

/// The sockets of one generation.
pub(crate) struct Generation {
    dealers: Vec<(Chan, DealerSocket)>,
    subs: Vec<(Chan, SubSocket)>,
    lost: Vec<futures::channel::mpsc::Receiver<SocketEvent>>,
}

/// Connect every socket (an error names the one that failed).
pub(crate) async fn connect(ep: &Endpoints) -> Result<Generation> {
    let connect_dealer = |port: u16, what: &'static str| {
        let u = ep.url(port);
        let mut o = SocketOptions::default();
        o.peer_identity(
            zeromq::util::PeerIdentity::try_from(ep.session_id.as_bytes().to_vec())
                .expect("uuid is a valid identity"),
        );
        async move {
            let mut s = DealerSocket::with_options(o);
            let mon = s.monitor();
            tokio::time::timeout(CONNECT_TIMEOUT, s.connect(&u))
                .await
                .map_err(|_| anyhow!("timed out connecting to the hub's {what} socket at {u}"))?
                .with_context(|| format!("connecting to the hub's {what} socket at {u}"))?;
            Ok::<_, anyhow::Error>((s, mon))
        }
    };
    let connect_sub = |port: u16, what: &'static str| {
        let u = ep.url(port);
        async move {
            let mut s = SubSocket::new();
            s.subscribe("").await?;
            tokio::time::timeout(CONNECT_TIMEOUT, s.connect(&u))
                .await
                .map_err(|_| anyhow!("timed out connecting to the hub's {what} socket at {u}"))?
                .with_context(|| format!("connecting to the hub's {what} socket at {u}"))?;
            Ok::<_, anyhow::Error>(s)
        }
    };
    let (query, mux, control, task, bcast, iopub, notif) = tokio::try_join!(
        connect_dealer(ep.registration, "query"),
        connect_dealer(ep.mux, "mux"),
        connect_dealer(ep.control, "control"),
        connect_dealer(ep.task, "task"),
        connect_dealer(ep.broadcast, "broadcast"),
        connect_sub(ep.iopub, "iopub"),
        connect_sub(ep.notification, "notification"),
    )?;
    let mut dealers = Vec::new();
    let mut lost = Vec::new();
    for (ch, (s, mon)) in [
        (Chan::Query, query),
        (Chan::Mux, mux),
        (Chan::Control, control),
        (Chan::Task, task),
        (Chan::Broadcast, bcast),
    ] {
        dealers.push((ch, s));
        lost.push(mon);
    }
    Ok(Generation {
        dealers,
        subs: vec![(Chan::Iopub, iopub), (Chan::Notification, notif)],
        lost,
    })
}

/// Waits until the registration port accepts a TCP connection.
async fn reachable(ep: &Endpoints) {
    let addr = format!("{}:{}", ep.host, ep.registration);
    loop {
        if tokio::net::TcpStream::connect(&addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

/// The supervisor: serves generation after generation until the client is
/// dropped.
pub(crate) async fn supervise(
    ep: Endpoints,
    inner: Weak<Inner>,
    signer: Signer,
    mut queue: mpsc::UnboundedReceiver<(Chan, Vec<Bytes>)>,
    first: Generation,
) {
    // a message a dead socket handed back, sent first on the next generation
    let mut held: VecDeque<(Chan, ZmqMessage)> = VecDeque::new();
    let mut next = Some(first);
    loop {
        let generation = match next.take() {
            Some(g) => g,
            None => {
                let lost_at = Instant::now();
                let back = async {
                    loop {
                        reachable(&ep).await;
                        match connect(&ep).await {
                            Ok(g) => return g,
                            Err(e) => {
                                debug!(error = %e, "hub not ready yet");
                                tokio::time::sleep(PROBE_INTERVAL).await;
                            }
                        }
                    }
                };
                // the client may be dropped while the hub is away
                let closed = async {
                    loop {
                        if inner.strong_count() == 0 {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                };
                let g = tokio::select! {
                    g = back => g,
                    _ = closed => return,
                };
                info!(
                    after_ms = lost_at.elapsed().as_millis() as u64,
                    "reconnected to the hub"
                );
                g
            }
        };
        let Generation {
            dealers,
            subs,
            mut lost,
        } = generation;
        let stop = CancellationToken::new();
        let mut sends = Vec::new();
        for (ch, s) in dealers {
            let (send_half, recv_half) = s.split();
            sends.push((ch, send_half));
            spawn_receiver(ch, recv_half, &inner, &signer, &stop);
        }
        for (ch, s) in subs {
            spawn_receiver(ch, s, &inner, &signer, &stop);
        }
        if let Some(i) = inner.upgrade() {
            i.set_connected(true);
            if i.generation_bump() > 0 {
                // engines registered or left while we were away
                let client = HubClient::detached(i);
                tokio::spawn(async move {
                    if let Err(e) = client.refresh_engines().await {
                        warn!(error = %e, "refreshing the engine table after reconnecting");
                    }
                });
            }
        }
        let mut is_lost = false;
        while let Some((ch, m)) = held.pop_front() {
            if let Err(back) = send(&mut sends, ch, m).await {
                held.push_front((ch, back));
                is_lost = true;
                break;
            }
        }
        while !is_lost {
            tokio::select! {
                m = queue.recv() => {
                    let Some((ch, frames)) = m else {
                        stop.cancel();
                        // zmq.rs has no linger: give the last messages a moment
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        return;
                    };
                    let Ok(msg) = ZmqMessage::try_from(frames) else { continue };
                    if let Err(back) = send(&mut sends, ch, msg).await {
                        held.push_back((ch, back));
                        is_lost = true;
                    }
                }
                _ = peer_lost(&mut lost) => is_lost = true,
            }
        }
        stop.cancel();
        if let Some(i) = inner.upgrade() {
            i.set_connected(false);
            if i.is_closing() {
                debug!("the hub stopped as the client asked; the link ends");
                return;
            }
        }
        warn!("lost the connection to the hub; reconnecting when it is back");
    }
}

fn spawn_receiver<S: zeromq::SocketRecv + Send + 'static>(
    ch: Chan,
    s: S,
    inner: &Weak<Inner>,
    signer: &Signer,
    stop: &CancellationToken,
) {
    let (inner, signer, stop) = (inner.clone(), signer.clone(), stop.clone());
    tokio::spawn(async move {
        tokio::select! {
            _ = receiver(ch, s, inner, signer) => {}
            _ = stop.cancelled() => {}
        }
    });
}

/// Send on `ch`'s socket; a message the socket could not deliver (no peer)
/// comes back to be sent on the next generation.
async fn send(
    sends: &mut [(Chan, zeromq::DealerSendHalf)],
    ch: Chan,
    msg: ZmqMessage,
) -> Result<(), ZmqMessage> {
    let Some((_, s)) = sends.iter_mut().find(|(c, _)| *c == ch) else {
        warn!(channel = ?ch, "no socket for this channel");
        return Ok(());
    };
    let copy = msg.clone();
    match tokio::time::timeout(CONNECT_TIMEOUT, s.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(ZmqError::ReturnToSender { message, .. })) => Err(message),
        Ok(Err(e)) => {
            warn!(channel = ?ch, error = %e, "send to the hub failed");
            Err(copy)
        }
        Err(_) => Err(copy),
    }
}
