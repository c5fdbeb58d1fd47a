//! The engine's connection to its hub, rebuilt when the hub goes away.
//!
//! zmq.rs reconnects SUB sockets by itself but not DEALER, ROUTER or XPUB
//! ones, so a hub that is restarted (`parallax hub --restore`, or
//! ipcontroller's) would find the engine deaf. The link owns every socket
//! facing the hub and, when one of them reports its peer gone, drops them
//! all, waits until the hub's registration port accepts connections again
//! and connects a new set (a *generation*), so the interpreter and its
//! namespace never notice. On each reconnection it asks the hub to register
//! it again with its uuid and id: a restored hub answers with the same id, a
//! hub that forgot the engine (restarted without `--restore`, same ports and
//! key) gives the id back if it is free.
//!
//! One DEALER per hub endpoint (mux, task, broadcast, control): a request
//! arrives as `[client, <IDS|MSG>, …]` tagged with its [`Route`], and the
//! reply goes out on the same route's socket of the *current* generation,
//! so a reply to a request received before the hub went away reaches the
//! new hub (a ROUTER would name the hub's new connection differently).
//! Replies and iopub messages sent while no hub is connected are queued and
//! sent after reconnecting.
//!
//! Who holds what: the link task owns the sockets of the current generation
//! (the heartbeat pair belongs to a per-generation task, so a beat never
//! waits behind a large reply). It ends when every sender of [`Link::out`]
//! is dropped (the engine is leaving), after sending what is queued.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use zeromq::{
    DealerSocket, Socket, SocketEvent, SocketRecv, SocketSend, SubSocket, XPubSocket, ZmqMessage,
};

use crate::driver::identity_opts;

/// Which hub socket a message came from or goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Registration,
    Mux,
    Task,
    Broadcast,
    Control,
}

/// The hub's endpoints (`tcp://host:port`).
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub registration: String,
    pub mux: String,
    pub task: String,
    pub broadcast: Option<String>,
    pub control: String,
    pub iopub: String,
    pub hb_ping: String,
    pub hb_pong: String,
}

/// What the rest of the engine holds of the link.
pub struct Link {
    /// Messages to the hub: replies on their request's route, the
    /// unregistration on `Route::Registration`.
    pub out: mpsc::UnboundedSender<(Route, Vec<Bytes>)>,
    /// iopub messages.
    pub iopub: mpsc::UnboundedSender<Vec<Bytes>>,
    pub task: JoinHandle<()>,
}

/// Where the link delivers what the hub sends.
pub struct Inbound {
    /// Requests (mux, task, broadcast), tagged with their route.
    pub shell: mpsc::UnboundedSender<(Route, Vec<Bytes>)>,
    pub control: mpsc::UnboundedSender<Vec<Bytes>>,
    /// Registration replies after a reconnection.
    pub registration: mpsc::UnboundedSender<Vec<Bytes>>,
}

/// How the link behaves.
pub struct LinkConfig {
    pub uuid: String,
    pub endpoints: Endpoints,
    /// Stamped (ms since `started`, +1) on every ping.
    pub last_ping: Arc<AtomicU64>,
    pub started: Instant,
    /// Cancelled when the engine stops: heartbeats stop answering.
    pub stop: CancellationToken,
    /// A fresh, signed `registration_request` (uuid and id) for reconnecting.
    pub registration_request: Box<dyn Fn() -> Vec<Bytes> + Send + Sync>,
}

/// The sockets of one generation (the heartbeat pair goes to its task).
struct Sockets {
    reg: DealerSocket,
    mux: DealerSocket,
    task: DealerSocket,
    broadcast: Option<DealerSocket>,
    control: DealerSocket,
    iopub: XPubSocket,
    lost: Vec<futures::channel::mpsc::Receiver<SocketEvent>>,
}

async fn dealer(
    uuid: &str,
    url: &str,
    lost: &mut Vec<futures::channel::mpsc::Receiver<SocketEvent>>,
) -> Result<DealerSocket> {
    let mut s = DealerSocket::with_options(identity_opts(uuid));
    lost.push(s.monitor());
    tokio::time::timeout(CONNECT_TIMEOUT, s.connect(url))
        .await
        .map_err(|_| anyhow::anyhow!("timed out connecting to {url}"))?
        .with_context(|| format!("connecting to {url}"))?;
    Ok(s)
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an absent hub's registration port is tried.
const PROBE_INTERVAL: Duration = Duration::from_millis(200);

async fn connect(uuid: &str, ep: &Endpoints) -> Result<(Sockets, SubSocket, DealerSocket)> {
    let mut lost = Vec::new();
    let reg = dealer(uuid, &ep.registration, &mut lost).await?;
    let mux = dealer(uuid, &ep.mux, &mut lost).await?;
    let task = dealer(uuid, &ep.task, &mut lost).await?;
    let broadcast = match &ep.broadcast {
        Some(u) => Some(dealer(uuid, u, &mut lost).await?),
        None => None,
    };
    let control = dealer(uuid, &ep.control, &mut lost).await?;
    let mut iopub = XPubSocket::new();
    tokio::time::timeout(CONNECT_TIMEOUT, iopub.connect(&ep.iopub))
        .await
        .map_err(|_| anyhow::anyhow!("timed out connecting iopub"))?
        .context("connecting iopub")?;
    let mut ping = SubSocket::new();
    ping.subscribe("").await?;
    tokio::time::timeout(CONNECT_TIMEOUT, ping.connect(&ep.hb_ping))
        .await
        .map_err(|_| anyhow::anyhow!("timed out connecting the heartbeat"))?
        .context("connecting heartbeat")?;
    let pong = dealer(uuid, &ep.hb_pong, &mut lost).await?;
    Ok((
        Sockets {
            reg,
            mux,
            task,
            broadcast,
            control,
            iopub,
            lost,
        },
        ping,
        pong,
    ))
}

/// Connects the first generation (an error if the hub cannot be reached)
/// and starts the link task.
pub async fn start(cfg: LinkConfig, inbound: Inbound) -> Result<Link> {
    let first = connect(&cfg.uuid, &cfg.endpoints).await?;
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let (iopub_tx, iopub_rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(run(cfg, inbound, first, out_rx, iopub_rx));
    Ok(Link {
        out: out_tx,
        iopub: iopub_tx,
        task,
    })
}

/// Echo every ping at once (never waiting for Python), stamping `last_ping`.
fn spawn_heartbeat(
    mut ping: SubSocket,
    mut pong: DealerSocket,
    last_ping: Arc<AtomicU64>,
    started: Instant,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        crate::driver::first_pong(&mut pong).await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                m = ping.recv() => match m {
                    Ok(m) => {
                        last_ping.store(started.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
                        if pong.send(m).await.is_err() {
                            debug!("heartbeat reply failed");
                        }
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }
    });
}

async fn recv_opt(s: &mut Option<DealerSocket>) -> zeromq::ZmqResult<ZmqMessage> {
    match s {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// Resolves when any monitored socket reports its peer gone (also the
/// kernel client's link, `parallax_kernel::client_link`).
pub async fn peer_lost(mons: &mut [futures::channel::mpsc::Receiver<SocketEvent>]) {
    loop {
        if mons.is_empty() {
            return std::future::pending().await;
        }
        let next = futures::future::select_all(mons.iter_mut().map(|m| m.next()));
        match next.await.0 {
            Some(SocketEvent::Disconnected(_)) => return,
            Some(_) => {}
            // A closed monitor means nothing; wait on the others.
            None => return std::future::pending().await,
        }
    }
}

/// Waits until the registration port accepts a TCP connection.
async fn reachable(url: &str) {
    let addr = url.trim_start_matches("tcp://").to_owned();
    loop {
        if tokio::net::TcpStream::connect(&addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

enum End {
    /// The engine is leaving (every sender of `out` dropped).
    Closed,
    /// The hub went away.
    Lost,
}

async fn run(
    cfg: LinkConfig,
    inbound: Inbound,
    first: (Sockets, SubSocket, DealerSocket),
    mut out_rx: mpsc::UnboundedReceiver<(Route, Vec<Bytes>)>,
    mut iopub_rx: mpsc::UnboundedReceiver<Vec<Bytes>>,
) {
    let mut pending: VecDeque<(Route, Vec<Bytes>)> = VecDeque::new();
    let mut pending_iopub: VecDeque<Vec<Bytes>> = VecDeque::new();
    let mut next = Some(first);
    let mut generation = 0u64;
    loop {
        let (mut socks, ping, pong) = match next.take() {
            Some(s) => s,
            None => {
                // Between generations: queue what the engine sends until the
                // hub is back (or the engine leaves).
                let lost_at = Instant::now();
                let back = async {
                    loop {
                        reachable(&cfg.endpoints.registration).await;
                        match connect(&cfg.uuid, &cfg.endpoints).await {
                            Ok(s) => return s,
                            Err(e) => {
                                debug!(error = %e, "hub not ready yet");
                                tokio::time::sleep(PROBE_INTERVAL).await;
                            }
                        }
                    }
                };
                tokio::pin!(back);
                let s = loop {
                    tokio::select! {
                        s = &mut back => break Some(s),
                        m = out_rx.recv() => match m {
                            Some(m) => pending.push_back(m),
                            None => break None,
                        },
                        m = iopub_rx.recv() => if let Some(m) = m { pending_iopub.push_back(m) },
                    }
                };
                let Some(s) = s else { return };
                info!(
                    generation,
                    after_ms = lost_at.elapsed().as_millis() as u64,
                    "reconnected to the hub"
                );
                s
            }
        };
        let gen_stop = cfg.stop.child_token();
        spawn_heartbeat(
            ping,
            pong,
            cfg.last_ping.clone(),
            cfg.started,
            gen_stop.clone(),
        );
        if generation > 0 {
            let req = (cfg.registration_request)();
            if let Ok(m) = ZmqMessage::try_from(req) {
                let _ = socks.reg.send(m).await;
            }
        }
        let end = serve(
            &mut socks,
            &inbound,
            &mut out_rx,
            &mut iopub_rx,
            &mut pending,
            &mut pending_iopub,
        )
        .await;
        gen_stop.cancel();
        match end {
            End::Closed => {
                // zmq.rs has no linger: give the last messages a moment.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return;
            }
            End::Lost => {
                warn!("lost the connection to the hub; reconnecting (the engine keeps its state)");
                generation += 1;
            }
        }
    }
}

async fn send_on(socks: &mut Sockets, route: Route, frames: Vec<Bytes>) -> bool {
    let Ok(m) = ZmqMessage::try_from(frames) else {
        return true;
    };
    let s = match route {
        Route::Registration => &mut socks.reg,
        Route::Mux => &mut socks.mux,
        Route::Task => &mut socks.task,
        Route::Control => &mut socks.control,
        Route::Broadcast => match &mut socks.broadcast {
            Some(b) => b,
            None => &mut socks.task,
        },
    };
    match s.send(m).await {
        Ok(()) => true,
        Err(e) => {
            warn!(error = %e, ?route, "message to the hub not sent");
            false
        }
    }
}

async fn serve(
    socks: &mut Sockets,
    inbound: &Inbound,
    out_rx: &mut mpsc::UnboundedReceiver<(Route, Vec<Bytes>)>,
    iopub_rx: &mut mpsc::UnboundedReceiver<Vec<Bytes>>,
    pending: &mut VecDeque<(Route, Vec<Bytes>)>,
    pending_iopub: &mut VecDeque<Vec<Bytes>>,
) -> End {
    while let Some(m) = pending_iopub.pop_front() {
        if let Ok(m) = ZmqMessage::try_from(m) {
            let _ = socks.iopub.send(m).await;
        }
    }
    while let Some((route, m)) = pending.pop_front() {
        send_on(socks, route, m).await;
    }
    let mut lost = std::mem::take(&mut socks.lost);
    loop {
        tokio::select! {
            _ = peer_lost(&mut lost) => return End::Lost,
            m = out_rx.recv() => match m {
                Some((route, m)) => { send_on(socks, route, m).await; }
                None => return End::Closed,
            },
            m = iopub_rx.recv() => {
                if let Some(m) = m && let Ok(m) = ZmqMessage::try_from(m) {
                    let _ = socks.iopub.send(m).await;
                }
            }
            _ = socks.iopub.recv() => {}
            m = socks.mux.recv() => if let Ok(m) = m { let _ = inbound.shell.send((Route::Mux, m.into_vec())); },
            m = socks.task.recv() => if let Ok(m) = m { let _ = inbound.shell.send((Route::Task, m.into_vec())); },
            m = recv_opt(&mut socks.broadcast) => if let Ok(m) = m { let _ = inbound.shell.send((Route::Broadcast, m.into_vec())); },
            m = socks.control.recv() => if let Ok(m) = m { let _ = inbound.control.send(m.into_vec()); },
            m = socks.reg.recv() => if let Ok(m) = m { let _ = inbound.registration.send(m.into_vec()); },
        }
    }
}
