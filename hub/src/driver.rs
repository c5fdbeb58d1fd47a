//! The I/O driver: binds the controller's zeromq sockets, writes the
//! connection files, and feeds the [`Hub`] state machine.
//!
//! One task per socket direction: receive tasks push `(channel, frames)` into
//! one bounded channel read by the core task; the core task pushes outgoing
//! frames into one unbounded queue per socket, drained by that socket's send
//! task. The core task is the only owner of the `Hub`. The broadcast leaves
//! (`2^--broadcast-scheduler-depth` engine-facing ROUTERs) each have one task
//! that both sends (the core's `FanOut`s, signed there) and receives (replies
//! verified and decoded there, handed to the core in batches).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use chrono::Utc;
use parallax_wire::connection::{
    ClientConnectionInfo, EngineConnectionInfo, connection_file_names,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use zeromq::{
    PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, SubSocket, XPubSocket, ZmqMessage,
};

use crate::cli::{DbKind, HubArgs};
use crate::core::{Channel, CoreConfig, Hub, HubEvent, Now, Transmit};
use crate::leaf::{FanOut, LeafCodec, LeafReply};
use crate::listen;
use crate::records::{DbBackend, DbLimits, TaskDb};
use crate::restore::EngineState;
use crate::sqlite_db::{Durability, SqliteConfig, SqliteDb};

/// Where the connection files are and what they contain.
#[derive(Debug, Clone)]
pub struct Bound {
    pub client_file: PathBuf,
    pub engine_file: PathBuf,
    pub client: ClientConnectionInfo,
    pub engine: EngineConnectionInfo,
}

fn now() -> Now {
    Now {
        mono: std::time::Instant::now(),
        wall: Utc::now(),
    }
}

/// The profile directory the options select (see
/// [`parallax_wire::connection::resolve_profile_dir`]).
pub fn profile_dir(args: &HubArgs) -> PathBuf {
    parallax_wire::connection::resolve_profile_dir(
        args.profile_dir.as_deref(),
        args.ipython_dir.as_deref(),
        &args.profile,
        |k| std::env::var(k).ok(),
    )
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// A fresh key in jupyter_client's `new_id` shape: 8 hex digits, a dash, 24.
fn new_key() -> String {
    let h = uuid::Uuid::new_v4().simple().to_string();
    format!("{}-{}", &h[..8], &h[8..])
}

/// Writes `contents` to `path` with mode 0600 through a rename, so readers
/// never see a half-written file. `fsync`: flush to disk first (connection
/// files, written once); the engine state file, rewritten on every
/// registration, only has to survive the hub's death, which the page cache
/// does.
pub(crate) fn write_private(path: &Path, contents: &str, fsync: bool) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(contents.as_bytes())?;
    if fsync {
        f.sync_all().ok();
    }
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Order in which `--ports` are consumed, as ipcontroller does.
const PORT_ORDER: [Channel; 13] = [
    Channel::Query,
    Channel::ControlEngine,
    Channel::MuxEngine,
    Channel::TaskEngine,
    Channel::IopubEngine,
    Channel::HbPing,
    Channel::HbPong,
    Channel::BroadcastEngine,
    Channel::ControlClient,
    Channel::MuxClient,
    Channel::TaskClient,
    Channel::IopubClient,
    Channel::Notification,
];
// BroadcastClient is the 14th.

/// What the socket tasks hand the core task (one bounded channel).
enum Input {
    /// A multipart message from a socket the core reads itself.
    Frames(Channel, Vec<Bytes>),
    /// A broadcast leaf's replies, verified and decoded, in arrival order.
    Leaf(Vec<LeafReply>),
}

enum Sock {
    XPub(XPubSocket),
    Router(RouterSocket),
    Pub(PubSocket),
    Sub(SubSocket),
}

/// Binds `sock` on a TCP listener of our own (listen.rs) at `at`: the
/// `--ip` as given (for messages), the address it resolved to, and the port
/// wanted (0: any). Returns the port bound; `what` names the socket in errors.
async fn bind_tcp<S: Socket + Send>(
    sock: &mut S,
    (ip_arg, ip, port): (&str, IpAddr, u16),
    what: &str,
) -> Result<u16> {
    let context = || format!("binding {what} on tcp://{ip_arg}:{port}");
    let listener = listen::tcp_listener(SocketAddr::new(ip, port)).with_context(context)?;
    let ep = sock.bind_listener(listener).await.with_context(context)?;
    endpoint_port(&ep)
}

fn endpoint_port(ep: &zeromq::Endpoint) -> Result<u16> {
    match ep {
        zeromq::Endpoint::Tcp(_, port) => Ok(*port),
        other => bail!("unexpected endpoint {other}"),
    }
}

/// The SQLite file: `--sqlitedb-file`, else ipcontroller's
/// `SQLiteDB.location` (default: the profile directory) joined with
/// `SQLiteDB.filename` (default `tasks.db`).
fn sqlite_path(args: &HubArgs, profile: &Path) -> PathBuf {
    if let Some(f) = &args.sqlitedb_file {
        return f.clone();
    }
    let dir = args
        .sqlitedb_location
        .clone()
        .unwrap_or_else(|| profile.to_path_buf());
    dir.join(args.sqlitedb_filename.as_deref().unwrap_or("tasks.db"))
}

/// Run the hub until a `shutdown_request`, or until `shutdown` is cancelled.
pub async fn run(args: HubArgs, shutdown: CancellationToken) -> Result<()> {
    run_notify(args, shutdown, None).await
}

/// [`run`], telling `ready` where the hub listens once its sockets are bound
/// and the connection files written (an embedding kernel waits on it).
pub async fn run_notify(
    args: HubArgs,
    shutdown: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<Bound>>,
) -> Result<()> {
    if args.transport != "tcp" {
        bail!("--transport={}: only tcp is supported", args.transport);
    }
    if let Some(w) = &args.work_dir {
        std::env::set_current_dir(w).with_context(|| format!("--work-dir {}", w.display()))?;
    }
    let cluster_id = args
        .cluster_id
        .clone()
        .or_else(|| std::env::var("IPP_CLUSTER_ID").ok())
        .unwrap_or_default();
    let profile = profile_dir(&args);
    let security = profile.join("security");
    std::fs::create_dir_all(&security)
        .with_context(|| format!("creating {}", security.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&security, std::fs::Permissions::from_mode(0o700));
    }
    let (client_name, engine_name) = connection_file_names(&cluster_id);
    let client_file = security.join(client_name);
    let engine_file = security.join(engine_name);
    let state_path = crate::state_file::path(&security, &cluster_id);
    // ipcontroller's --restore implies --reuse: the engines of the previous
    // hub are connected to its ports and sign with its key.
    let reuse = args.reuse || args.restore;
    let restore = if args.restore {
        match crate::state_file::load(&state_path)? {
            Some(s) => Some(s),
            None => {
                warn!(file = %state_path.display(), "--restore: no state file; starting with no engines");
                None
            }
        }
    } else {
        None
    };

    // Ports and key: reused from existing files with --reuse.
    let mut wanted: HashMap<Channel, u16> = HashMap::new();
    let mut leaves = 1usize << args.broadcast_scheduler_depth.min(6);
    // Ports of the broadcast leaves (--reuse: the engine file's list; else
    // only the first may be given, as --ports' eighth).
    let mut wanted_leaves: Vec<u16> = Vec::new();
    let mut key = args
        .session_key
        .clone()
        .or_else(|| std::env::var("IPP_SESSION_KEY").ok())
        .filter(|k| !k.is_empty());
    if reuse && client_file.exists() && engine_file.exists() {
        let c: ClientConnectionInfo = serde_json::from_str(&std::fs::read_to_string(&client_file)?)
            .with_context(|| format!("reading {}", client_file.display()))?;
        let e: EngineConnectionInfo = serde_json::from_str(&std::fs::read_to_string(&engine_file)?)
            .with_context(|| format!("reading {}", engine_file.display()))?;
        for (ch, p) in [
            (Channel::Query, c.registration),
            (Channel::ControlClient, c.control),
            (Channel::MuxClient, c.mux),
            (Channel::TaskClient, c.task),
            (Channel::IopubClient, c.iopub),
            (Channel::Notification, c.notification),
            (Channel::BroadcastClient, c.broadcast),
            (Channel::ControlEngine, e.control),
            (Channel::MuxEngine, e.mux),
            (Channel::TaskEngine, e.task),
            (Channel::IopubEngine, e.iopub),
            (Channel::HbPing, e.hb_ping),
            (Channel::HbPong, e.hb_pong),
            (
                Channel::BroadcastEngine,
                e.broadcast.first().copied().unwrap_or(0),
            ),
        ] {
            wanted.insert(ch, p);
        }
        // The engines of the previous hub are connected to the leaves the
        // file names (engine id mod their number): keep that tree.
        if e.broadcast.len() != leaves && e.broadcast.len().is_power_of_two() {
            warn!(
                file = %engine_file.display(),
                leaves = e.broadcast.len(),
                "--reuse: keeping the engine file's broadcast leaves (--broadcast-scheduler-depth ignored)"
            );
            leaves = e.broadcast.len();
        }
        if e.broadcast.len() == leaves {
            wanted_leaves = e.broadcast.clone();
        }
        key = Some(c.key);
        info!(file = %client_file.display(), "reusing connection files");
    } else {
        for (i, &p) in args.ports.iter().enumerate() {
            if let Some(&ch) = PORT_ORDER.get(i) {
                wanted.insert(ch, p);
            } else if i == PORT_ORDER.len() {
                wanted.insert(Channel::BroadcastClient, p);
            }
        }
        if let Some(p) = args.port {
            wanted.insert(Channel::Query, p);
        }
    }
    let key = key.unwrap_or_else(new_key);

    // The task database. A store on disk is opened here, before any socket
    // is bound, so a bad file is an error at start.
    let limits = DbLimits {
        record_limit: args.record_limit.max(1),
        ..DbLimits::default()
    };
    let mut durability = None;
    let (db, store): (DbBackend, Option<Box<dyn TaskDb>>) = match args.db_kind() {
        DbKind::Dict => (DbBackend::Dict(limits), None),
        DbKind::None => (DbBackend::None, None),
        DbKind::Mongo => bail!(
            "--mongodb: the Parallax hub has no MongoDB task database; use --sqlitedb for \
             records that outlive the hub (or --dictdb, the default, to keep them in memory)"
        ),
        DbKind::Sqlite => {
            let path = sqlite_path(&args, &profile);
            let mut cfg = SqliteConfig::new(path);
            cfg.table = args.table.clone();
            cfg.cache_records = limits.record_limit;
            let store = SqliteDb::open(&cfg).map_err(anyhow::Error::new)?;
            durability = Some(store.durability());
            (DbBackend::Dict(limits), Some(Box::new(store)))
        }
    };

    // Bind every socket, each on a listener of our own (listen.rs: the
    // accept backlog a registration storm needs).
    let ip = listen::resolve(&args.ip)
        .with_context(|| format!("--ip={}: not an address of this host", args.ip))?;
    let all = [
        Channel::Query,
        Channel::Notification,
        Channel::HbPing,
        Channel::HbPong,
        Channel::MuxClient,
        Channel::MuxEngine,
        Channel::TaskClient,
        Channel::TaskEngine,
        Channel::ControlClient,
        Channel::ControlEngine,
        Channel::BroadcastClient,
        Channel::IopubEngine,
        Channel::IopubClient,
    ];
    let mut sockets = Vec::new();
    let mut ports = HashMap::new();
    for ch in all {
        let want = wanted.get(&ch).copied().unwrap_or(0);
        let at = (args.ip.as_str(), ip, want);
        let (sock, port) = match ch {
            // zmq.rs's PUB preallocates a 100k-slot fan-out queue (4 MB of
            // resident memory per socket). The low-volume publishers use
            // XPUB, which writes straight to the subscribers; iopub, whose
            // subscribers may fall behind, keeps PUB's queue-and-drop.
            Channel::Notification | Channel::HbPing => {
                let mut s = XPubSocket::new();
                let port = bind_tcp(&mut s, at, ch.name()).await?;
                (Sock::XPub(s), port)
            }
            Channel::IopubClient => {
                let mut s = PubSocket::new();
                let port = bind_tcp(&mut s, at, ch.name()).await?;
                (Sock::Pub(s), port)
            }
            Channel::IopubEngine => {
                let mut s = SubSocket::new();
                let port = bind_tcp(&mut s, at, ch.name()).await?;
                s.subscribe("").await?;
                (Sock::Sub(s), port)
            }
            _ => {
                let mut s = RouterSocket::new();
                let port = bind_tcp(&mut s, at, ch.name()).await?;
                (Sock::Router(s), port)
            }
        };
        ports.insert(ch, port);
        sockets.push((ch, sock));
    }
    // The broadcast leaves: one engine-facing ROUTER each.
    let mut leaf_sockets = Vec::with_capacity(leaves);
    let mut leaf_ports = Vec::with_capacity(leaves);
    for leaf in 0..leaves {
        let want = match wanted_leaves.get(leaf) {
            Some(&p) => p,
            None if leaf == 0 => wanted.get(&Channel::BroadcastEngine).copied().unwrap_or(0),
            None => 0,
        };
        let mut s = RouterSocket::new();
        let at = (args.ip.as_str(), ip, want);
        leaf_ports.push(bind_tcp(&mut s, at, &format!("broadcast leaf {leaf}")).await?);
        leaf_sockets.push(s);
    }

    let location = args.location.clone().unwrap_or_else(hostname);
    let interface = format!("tcp://{}", args.ip);
    let engine = EngineConnectionInfo {
        ssh: args.enginessh.clone(),
        interface: interface.clone(),
        registration: ports[&Channel::Query],
        control: ports[&Channel::ControlEngine],
        mux: ports[&Channel::MuxEngine],
        task: ports[&Channel::TaskEngine],
        iopub: ports[&Channel::IopubEngine],
        hb_ping: ports[&Channel::HbPing],
        hb_pong: ports[&Channel::HbPong],
        broadcast: leaf_ports.clone(),
        key: key.clone(),
        curve_serverkey: None,
        location: location.clone(),
        pack: "json".into(),
        unpack: "json".into(),
        signature_scheme: "hmac-sha256".into(),
    };
    let client = ClientConnectionInfo {
        ssh: args.ssh.clone(),
        interface,
        registration: ports[&Channel::Query],
        control: ports[&Channel::ControlClient],
        mux: ports[&Channel::MuxClient],
        task: ports[&Channel::TaskClient],
        task_scheme: args.scheme.name().into(),
        iopub: ports[&Channel::IopubClient],
        notification: ports[&Channel::Notification],
        broadcast: ports[&Channel::BroadcastClient],
        key: key.clone(),
        curve_serverkey: None,
        location,
        pack: "json".into(),
        unpack: "json".into(),
        signature_scheme: "hmac-sha256".into(),
    };

    let mut core = CoreConfig::new(key.into_bytes());
    core.hb_period = Duration::from_millis(args.ping.max(10));
    core.max_heartmonitor_misses = args.max_heartbeat_misses;
    core.scheme = args.scheme;
    core.hwm = args.hwm;
    core.db = db;
    core.engine_info = serde_json::to_value(&engine)?;
    core.limits.max_total = args.max_message_size.max(1024);
    core.limits.max_json_frame = core.limits.max_json_frame.min(core.limits.max_total);
    core.seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    // ipyparallel: registration_timeout = max(30 s, 10 heartbeats)
    core.registration_timeout = Duration::from_secs(30).max(core.hb_period * 10);
    // Restored engines are unregistered after this many silent beats; a
    // request of the previous hub's life waits as long for its reply.
    core.orphan_grace = core.hb_period * (core.max_heartmonitor_misses + 2);
    core.broadcast_leaves = leaves;
    let leaf_codec = LeafCodec::new(&core.key, core.limits);

    // Spawn the socket tasks.
    let (in_tx, in_rx) = mpsc::channel::<Input>(8192);
    let mut out_tx: HashMap<Channel, mpsc::UnboundedSender<Vec<Bytes>>> = HashMap::new();
    let mut send_tasks: Vec<JoinHandle<()>> = Vec::new();
    let mut recv_tasks: Vec<JoinHandle<()>> = Vec::new();
    for (ch, sock) in sockets {
        let (tx, rx) = mpsc::unbounded_channel::<Vec<Bytes>>();
        match sock {
            Sock::Router(s) => {
                let (send_half, recv_half) = s.split();
                out_tx.insert(ch, tx);
                send_tasks.push(tokio::spawn(router_sender(ch, send_half, rx)));
                recv_tasks.push(tokio::spawn(receiver(ch, recv_half, in_tx.clone())));
            }
            Sock::Pub(s) => {
                out_tx.insert(ch, tx);
                send_tasks.push(tokio::spawn(pub_sender(ch, s, rx)));
            }
            Sock::XPub(s) => {
                out_tx.insert(ch, tx);
                send_tasks.push(tokio::spawn(xpub_sender(ch, s, rx)));
            }
            Sock::Sub(s) => {
                drop((tx, rx));
                recv_tasks.push(tokio::spawn(receiver(ch, s, in_tx.clone())));
            }
        }
    }
    let mut leaf_tx: Vec<mpsc::UnboundedSender<FanOut>> = Vec::with_capacity(leaves);
    for (leaf, sock) in leaf_sockets.into_iter().enumerate() {
        let (tx, rx) = mpsc::unbounded_channel::<FanOut>();
        leaf_tx.push(tx);
        // Ends when the core drops its senders (after its queues drained).
        send_tasks.push(tokio::spawn(leaf_task(
            leaf,
            sock,
            leaf_codec.clone(),
            rx,
            in_tx.clone(),
        )));
    }
    drop(in_tx);

    // Connection files last: their presence means the hub is ready.
    write_private(&client_file, &serde_json::to_string_pretty(&client)?, true)?;
    write_private(&engine_file, &serde_json::to_string_pretty(&engine)?, true)?;
    info!(
        client = %client_file.display(),
        engine = %engine_file.display(),
        registration = ports[&Channel::Query],
        scheme = %args.scheme,
        hwm = args.hwm,
        ping_ms = args.ping,
        broadcast_leaves = leaves,
        "hub ready"
    );

    let bound = Bound {
        client_file,
        engine_file,
        client,
        engine,
    };
    if let Some(ready) = ready {
        let _ = ready.send(bound.clone());
    }
    let persist = Persist {
        state_path: state_path.clone(),
        restore,
        durability,
    };
    let outputs = Outputs {
        sockets: out_tx,
        leaves: leaf_tx,
    };
    let result = core_loop(core, store, persist, in_rx, &outputs, shutdown).await;

    // Let queued replies (e.g. shutdown_reply) go out: close the queues and
    // wait for the send tasks to drain them, then give the socket writers a
    // moment (zmq.rs has no linger).
    drop(outputs);
    let drain = async {
        for t in send_tasks {
            let _ = t.await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    for t in recv_tasks {
        t.abort();
    }
    if !reuse {
        for f in [&bound.client_file, &bound.engine_file, &state_path] {
            if let Err(e) = std::fs::remove_file(f) {
                debug!(file = %f.display(), error = %e, "could not remove connection file");
            }
        }
    }
    info!("hub stopped");
    result
}

/// Where the core task's outputs go: one send queue per socket, one per
/// broadcast leaf. Dropping it closes them all (the send tasks drain and end).
struct Outputs {
    sockets: HashMap<Channel, mpsc::UnboundedSender<Vec<Bytes>>>,
    leaves: Vec<mpsc::UnboundedSender<FanOut>>,
}

/// What the core loop keeps across hub restarts.
struct Persist {
    /// The engine table, rewritten whenever it changes.
    state_path: PathBuf,
    /// `--restore`: the previous hub's table.
    restore: Option<EngineState>,
    /// With a store on disk: results reach clients only once recorded.
    durability: Option<Durability>,
}

/// Channels whose messages carry results: with a durable store they are
/// held until the records they complete are committed.
fn carries_results(ch: Channel) -> bool {
    matches!(
        ch,
        Channel::MuxClient | Channel::TaskClient | Channel::BroadcastClient
    )
}

/// Results held for their records' commit, in order: (sequence number the
/// store must have committed, message).
#[derive(Default)]
struct Held(VecDeque<(u64, Transmit)>);

impl Held {
    /// Sends `t` now, or holds it behind the writes queued so far.
    fn route(
        &mut self,
        t: Transmit,
        durability: Option<&Durability>,
        out_tx: &HashMap<Channel, mpsc::UnboundedSender<Vec<Bytes>>>,
    ) {
        if let Some(d) = durability
            && carries_results(t.channel)
        {
            let need = d.queued();
            if !self.0.is_empty() || need > d.durable() {
                self.0.push_back((need, t));
                return;
            }
        }
        if let Some(tx) = out_tx.get(&t.channel) {
            let _ = tx.send(t.frames);
        }
    }

    /// At exit: closes the store (which commits everything queued), then
    /// sends what was held.
    fn flush(&mut self, hub: Hub, out_tx: &HashMap<Channel, mpsc::UnboundedSender<Vec<Bytes>>>) {
        drop(hub);
        for (_, t) in self.0.drain(..) {
            if let Some(tx) = out_tx.get(&t.channel) {
                let _ = tx.send(t.frames);
            }
        }
    }

    /// Sends the held messages whose writes are committed.
    fn release(
        &mut self,
        d: &Durability,
        out_tx: &HashMap<Channel, mpsc::UnboundedSender<Vec<Bytes>>>,
    ) {
        let durable = d.durable();
        while self.0.front().is_some_and(|(need, _)| *need <= durable) {
            let (_, t) = self.0.pop_front().expect("front exists");
            if let Some(tx) = out_tx.get(&t.channel) {
                let _ = tx.send(t.frames);
            }
        }
    }
}

async fn committed(d: Option<&Durability>) {
    match d {
        Some(d) => d.committed().await,
        None => std::future::pending().await,
    }
}

async fn core_loop(
    cfg: CoreConfig,
    store: Option<Box<dyn TaskDb>>,
    persist: Persist,
    mut in_rx: mpsc::Receiver<Input>,
    outputs: &Outputs,
    shutdown: CancellationToken,
) -> Result<()> {
    let out_tx = &outputs.sockets;
    let handle = |hub: &mut Hub, input: Input| match input {
        Input::Frames(ch, frames) => hub.handle_frames(ch, frames, now()),
        Input::Leaf(replies) => hub.handle_leaf_replies(replies, now()),
    };
    let mut hub = match store {
        Some(db) => Hub::with_store(cfg, db, now()),
        None => Hub::new(cfg, now()),
    };
    // Without --restore the table starts empty, but the records a previous
    // hub left unfinished are settled all the same (never pending forever).
    hub.restore(&persist.restore.clone().unwrap_or_default(), now());
    let durability = persist.durability.as_ref();
    let mut held = Held::default();
    // Written at start too: a hub that is restarted before any engine
    // registers still finds (an empty) table.
    let mut saved_version = None;
    let mut trim = tokio::time::interval(Duration::from_secs(2));
    trim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut busy_since_trim = false;
    let mut peak_backlog = 0usize;
    loop {
        let deadline = hub.poll_timeout();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                info!("shutting down on signal");
                held.flush(hub, out_tx);
                return Ok(());
            }
            input = in_rx.recv() => {
                let Some(input) = input else { bail!("all sockets closed") };
                handle(&mut hub, input);
                // Take whatever else is ready before flushing, to batch work.
                // Each message gets its own time: one taken before the batch
                // would date a reply that arrived during it before the
                // engine's `completed` stamp.
                for _ in 0..256 {
                    match in_rx.try_recv() {
                        Ok(input) => handle(&mut hub, input),
                        Err(_) => break,
                    }
                }
                hub.handle_timeout(now());
                busy_since_trim = true;
            }
            _ = trim.tick() => {
                if std::mem::take(&mut busy_since_trim) {
                    release_free_memory();
                }
            }
            _ = sleep_until(deadline) => {
                hub.handle_timeout(now());
            }
            _ = committed(durability), if !held.0.is_empty() => {}
        }
        // When a burst of queued tasks has drained, give its memory back now
        // rather than at the next periodic trim.
        let (waiting, running) = hub.task_counts();
        let backlog = waiting + running;
        if peak_backlog >= 1000 && backlog == 0 {
            hub.compact();
            release_free_memory();
            peak_backlog = 0;
        } else {
            peak_backlog = peak_backlog.max(backlog);
        }
        if let Some(d) = durability {
            held.release(d, out_tx);
        }
        while let Some(t) = hub.poll_transmit() {
            held.route(t, durability, out_tx);
        }
        while let Some(f) = hub.poll_fanout() {
            if let Some(tx) = outputs.leaves.get(f.leaf) {
                let _ = tx.send(f);
            }
        }
        if saved_version != Some(hub.engine_state_version()) {
            let (version, state) = hub.engine_state();
            if let Err(e) = crate::state_file::save(&persist.state_path, &state) {
                warn!(error = %e, "could not write the hub state file");
            }
            saved_version = Some(version);
        }
        if let Some(HubEvent::Shutdown) = hub.poll_event() {
            info!("shutting down on request");
            held.flush(hub, out_tx);
            return Ok(());
        }
    }
}

/// The hub holds up to eight connections per engine (one per socket a real
/// engine opens; a load generator's fake engines hold fewer): raise the
/// soft limit on open files to `want`, as servers expecting many peers do —
/// within the hard limit, or beyond it where the process may raise that
/// (root). Returns the soft limit in force.
// rlim_t is u64 on 64-bit Linux but not everywhere: the casts stay.
#[allow(clippy::unnecessary_cast)]
pub fn raise_fd_limit(want: u64) -> u64 {
    // SAFETY: getrlimit/setrlimit on local structs.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        let want = want as libc::rlim_t;
        if r.rlim_cur >= want {
            return r.rlim_cur as u64;
        }
        if r.rlim_max < want {
            let both = libc::rlimit {
                rlim_cur: want,
                rlim_max: want,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &both) == 0 {
                return want as u64;
            }
        }
        let soft = libc::rlimit {
            rlim_cur: want.min(r.rlim_max),
            rlim_max: r.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &soft) == 0 {
            soft.rlim_cur as u64
        } else {
            r.rlim_cur as u64
        }
    }
}

/// glibc malloc's tuning (one arena; see [`release_free_memory`]). The
/// `parallax` binary allocates with mimalloc, so this bounds what C code in
/// the process (SQLite) allocates with glibc; an embedder that keeps glibc
/// malloc gets the hub's bounded memory from it.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator parameters; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe and only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

async fn receiver<S: SocketRecv + Send>(ch: Channel, mut sock: S, tx: mpsc::Sender<Input>) {
    loop {
        // Outside tokio's cooperative budget (see `recv_unbudgeted`); the
        // send below still spends it, so the task yields every ~128
        // messages all the same.
        match recv_unbudgeted(&mut sock).await {
            Ok(m) => {
                if tx.send(Input::Frames(ch, m.into_vec())).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                debug!(channel = ch.name(), error = %e, "receive error");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

/// `sock.recv()` exempt from tokio's cooperative budget.
///
/// zmq.rs's fair queue answers one `recv` by polling the peers that are
/// ready in turn until one yields a message. Once the task's budget is
/// spent, tokio makes every I/O poll return Pending and wake itself, so each
/// ready peer is polled, re-queued, and the whole ready set swept without a
/// message — once per ~128 messages. In a burst from N peers (a round of
/// replies, or the heartbeat's pongs) that is O(N²) work: the idle hub's
/// heartbeat cost 29 % of a core at 10,000 engines against 2.4 % at 3,000.
/// Exempt, a `recv` takes the first ready peer's message; the budget still
/// bounds the task through the channel sends that follow each message.
async fn recv_unbudgeted<S: SocketRecv + Send>(sock: &mut S) -> zeromq::ZmqResult<ZmqMessage> {
    tokio::task::unconstrained(sock.recv()).await
}

/// A peer we route to may not have finished connecting yet (an engine whose
/// registration just completed); retry for a while before giving up.
const ROUTE_RETRIES: u32 = 200;
const ROUTE_RETRY_DELAY: Duration = Duration::from_millis(10);

async fn router_sender(
    ch: Channel,
    mut sock: zeromq::RouterSendHalf,
    mut rx: mpsc::UnboundedReceiver<Vec<Bytes>>,
) {
    while let Some(frames) = rx.recv().await {
        route(ch.name(), &mut sock, frames).await;
    }
}

/// Sends `frames` to the peer its first frame names; one that is not
/// connected (yet) is retried on a task of its own, so the queue goes on.
async fn route(ch: &'static str, sock: &mut zeromq::RouterSendHalf, frames: Vec<Bytes>) {
    let Ok(msg) = ZmqMessage::try_from(frames) else {
        return;
    };
    // The retry needs the message after a failed send consumed it: keep a
    // copy (the frames are refcounted) only until the send succeeded.
    if let Err(e) = sock.send(msg.clone()).await {
        let mut retry = sock.clone();
        tokio::spawn(async move {
            let mut last = e;
            for _ in 0..ROUTE_RETRIES {
                tokio::time::sleep(ROUTE_RETRY_DELAY).await;
                match retry.send(msg.clone()).await {
                    Ok(()) => return,
                    Err(e) => last = e,
                }
            }
            let peer = msg
                .get(0)
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            warn!(channel = ch, peer = %peer, error = %last, "message dropped: peer unreachable");
        });
    }
}

/// Polls `f` once: its output if it is ready now.
fn now_or_never<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// Most replies a leaf hands the core in one batch.
const LEAF_BATCH: usize = 1024;

/// One broadcast leaf: sends each engine its signed copy of the core's
/// `FanOut`s, and hands the core the replies that are ready, verified and
/// decoded, as one batch (one wake-up of the core per batch, not per
/// engine). Ends when the core drops its sender.
async fn leaf_task(
    leaf: usize,
    sock: RouterSocket,
    mut codec: LeafCodec,
    mut jobs: mpsc::UnboundedReceiver<FanOut>,
    tx: mpsc::Sender<Input>,
) {
    let (mut send, mut recv) = sock.split();
    loop {
        tokio::select! {
            job = jobs.recv() => {
                let Some(job) = job else { return };
                debug!(leaf, msg_id = %job.original, engines = job.targets.len(), "broadcast fan-out");
                for frames in codec.frames(&job) {
                    route("broadcast(engine)", &mut send, frames).await;
                }
            }
            m = recv_unbudgeted(&mut recv) => {
                let m = match m {
                    Ok(m) => m,
                    Err(e) => {
                        debug!(leaf, error = %e, "receive error");
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                };
                let mut batch = Vec::new();
                batch.extend(codec.reply(m.into_vec()));
                // What else is ready, without waiting.
                while batch.len() < LEAF_BATCH {
                    match now_or_never(recv_unbudgeted(&mut recv)) {
                        Some(Ok(m)) => batch.extend(codec.reply(m.into_vec())),
                        _ => break,
                    }
                }
                if !batch.is_empty() && tx.send(Input::Leaf(batch)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// XPUB only learns of subscriptions when it is read, so one task both reads
/// (and discards) subscription messages and publishes.
async fn xpub_sender(
    ch: Channel,
    mut sock: XPubSocket,
    mut rx: mpsc::UnboundedReceiver<Vec<Bytes>>,
) {
    loop {
        tokio::select! {
            // Subscriptions first: a client subscribes to notifications and
            // then asks for the engine table; if a registration completes in
            // between, its notification must find the new subscriber (the
            // stock Client learns of engines from notifications alone).
            // Unbiased, the publish could win the race half of the time.
            biased;
            sub = sock.recv() => {
                if let Err(e) = sub {
                    debug!(channel = ch.name(), error = %e, "subscriber error");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            frames = rx.recv() => {
                let Some(frames) = frames else { return };
                let Ok(msg) = ZmqMessage::try_from(frames) else { continue };
                if let Err(e) = sock.send(msg).await {
                    debug!(channel = ch.name(), error = %e, "publish failed");
                }
            }
        }
    }
}

async fn pub_sender(ch: Channel, mut sock: PubSocket, mut rx: mpsc::UnboundedReceiver<Vec<Bytes>>) {
    while let Some(frames) = rx.recv().await {
        let Ok(msg) = ZmqMessage::try_from(frames) else {
            continue;
        };
        if let Err(e) = sock.send(msg).await {
            debug!(channel = ch.name(), error = %e, "publish failed");
        }
    }
}
