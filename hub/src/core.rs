//! The hub as a state machine: no sockets, no clock.
//!
//! Inputs are `handle_frames(channel, frames, now)` and `handle_timeout(now)`;
//! outputs are polled with `poll_transmit`, `poll_timeout` and `poll_event`.
//! The driver (`driver.rs`) owns the sockets and feeds this. Everything the
//! controller does — registration, heartbeats, the MUX/control/iopub relays,
//! the load-balanced and broadcast schedulers, the task database — happens
//! here, so engine death, timeouts and retries are tested without sleeping.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use parallax_wire::content::{
    DbRequest, ErrorContent, PurgeRequest, QueueRequest, RegistrationRequest, ResubmitRequest,
    ResultRequest, UnregistrationRequest,
};
use parallax_wire::{Authenticator, Limits, Message, RawMessage, Session, Signer, format_date};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::{Map, Value, json};
use tracing::{debug, info, warn};

use crate::leaf::{FanOut, LeafReply};
use crate::records::{DbBackend, DbError, RecordStore, TaskDb, TaskRecord};
use crate::scheduler::Scheme;
use crate::tasks::TaskState;

/// The sockets of the controller, named after their role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// ROUTER: registration and queries (engines and clients).
    Query,
    /// PUB: registration/unregistration/shutdown notifications for clients.
    Notification,
    /// PUB: heartbeat pings to engines.
    HbPing,
    /// ROUTER: heartbeat pongs from engines.
    HbPong,
    /// ROUTER pair of the direct (MUX) queue.
    MuxClient,
    MuxEngine,
    /// ROUTER pair of the load-balanced task queue.
    TaskClient,
    TaskEngine,
    /// ROUTER pair of the control queue.
    ControlClient,
    ControlEngine,
    /// ROUTER pair of the broadcast scheduler.
    BroadcastClient,
    BroadcastEngine,
    /// SUB (bound): engines' iopub.
    IopubEngine,
    /// PUB: iopub relayed to clients.
    IopubClient,
}

impl Channel {
    pub fn name(self) -> &'static str {
        match self {
            Channel::Query => "registration",
            Channel::Notification => "notification",
            Channel::HbPing => "hb_ping",
            Channel::HbPong => "hb_pong",
            Channel::MuxClient => "mux(client)",
            Channel::MuxEngine => "mux(engine)",
            Channel::TaskClient => "task(client)",
            Channel::TaskEngine => "task(engine)",
            Channel::ControlClient => "control(client)",
            Channel::ControlEngine => "control(engine)",
            Channel::BroadcastClient => "broadcast(client)",
            Channel::BroadcastEngine => "broadcast(engine)",
            Channel::IopubEngine => "iopub(engine)",
            Channel::IopubClient => "iopub(client)",
        }
    }
}

/// The current time, as both a monotonic instant (timers) and a wall-clock
/// date (message headers and task records).
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub mono: Instant,
    pub wall: DateTime<Utc>,
}

impl Now {
    pub fn later(self, d: Duration) -> Now {
        Now {
            mono: self.mono + d,
            wall: self.wall + chrono::Duration::from_std(d).unwrap_or_default(),
        }
    }
}

/// Configuration of the core (the driver adds addresses and files).
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub key: Vec<u8>,
    pub session_id: String,
    pub pid: u32,
    pub hb_period: Duration,
    /// Beats an engine may miss before it is unregistered (ipyparallel's
    /// `max_heartmonitor_misses`).
    pub max_heartmonitor_misses: u32,
    /// Time a registration may wait for the engine's first heartbeat.
    pub registration_timeout: Duration,
    /// Delay before tasks stranded on a dead engine are failed, so results
    /// already in flight can still arrive.
    pub stranded_delay: Duration,
    /// Interval of extra pings while registrations are pending, so a new
    /// engine is registered in milliseconds rather than on the next beat.
    pub registration_ping: Duration,
    /// How long (un)registration notifications are held before they are
    /// published. A stock Client connects its notification SUB and at once
    /// asks for the engine table; a registration completed between the
    /// table's reply and the hub's first sight of that subscriber would be
    /// lost to it (the slow-joiner window of PUB/SUB), and it learns of
    /// engines from notifications alone. Held this long, the notification
    /// finds the subscriber. ipcontroller has the same window but registers
    /// on the next beat, seconds later, which hides it.
    pub notification_delay: Duration,
    pub scheme: Scheme,
    /// Maximum outstanding tasks per engine (0 = unlimited).
    pub hwm: u32,
    pub db: DbBackend,
    /// The engine connection info sent in `registration_reply`.
    pub engine_info: Value,
    pub limits: Limits,
    /// Seed for the random schemes.
    pub seed: u64,
    /// How many finished task ids are remembered for dependencies.
    pub dependency_history: usize,
    /// After [`Hub::restore`], how long requests of the previous hub's life
    /// may wait for their engine's reply before they fail.
    pub orphan_grace: Duration,
    /// Leaves of the broadcast tree (`2^--broadcast-scheduler-depth`): an
    /// engine with id `i` is reached through leaf `i % broadcast_leaves`.
    pub broadcast_leaves: usize,
}

impl CoreConfig {
    pub fn new(key: Vec<u8>) -> Self {
        CoreConfig {
            key,
            session_id: uuid::Uuid::new_v4().to_string(),
            pid: std::process::id(),
            hb_period: Duration::from_millis(3000),
            max_heartmonitor_misses: 10,
            registration_timeout: Duration::from_secs(30),
            stranded_delay: Duration::from_secs(1),
            registration_ping: Duration::from_millis(20),
            notification_delay: Duration::from_millis(100),
            scheme: Scheme::LeastLoad,
            hwm: 1,
            db: DbBackend::Dict(Default::default()),
            engine_info: json!({}),
            limits: Limits::default(),
            seed: 0x5eed,
            dependency_history: 32 * 1024,
            orphan_grace: Duration::from_secs(33),
            broadcast_leaves: 1,
        }
    }
}

/// A message to send on a socket.
#[derive(Debug, Clone, PartialEq)]
pub struct Transmit {
    pub channel: Channel,
    pub frames: Vec<Bytes>,
}

/// Something for the driver to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubEvent {
    /// A client asked the hub to shut down; the replies are queued already.
    Shutdown,
}

#[derive(Debug, Clone)]
pub(crate) enum Timer {
    Beat,
    RegistrationPing,
    StalledRegistration {
        uuid: String,
        id: i64,
    },
    StrandedMux {
        id: i64,
        uuid: String,
        msg_ids: Vec<String>,
    },
    StrandedTasks {
        uuid: String,
        id: i64,
    },
    TaskTimeout {
        msg_id: String,
        generation: u64,
    },
    /// Publish the held notifications that are due.
    Notifications,
    /// Fail the restored requests still without a reply (`restore.rs`).
    Orphans,
}

pub(crate) struct Engine {
    pub id: i64,
    pub uuid: String,
    /// Outstanding direct (MUX) requests, oldest first.
    pub queue: VecDeque<String>,
    /// Outstanding load-balanced tasks.
    pub tasks: VecDeque<String>,
    pub completed_count: u64,
    /// The most recent completions (bounded; `queue_status(verbose)`).
    pub completed: VecDeque<String>,
    pub last_pong: u64,
    pub misses: u32,
}

const COMPLETED_KEPT: usize = 1024;

struct Incoming {
    id: i64,
}

/// uuid → id of purged registrations, oldest forgotten first (bounded, so
/// engines that really are gone cost nothing for long).
#[derive(Default)]
struct StalledRegistrations {
    ids: HashMap<String, i64>,
    order: VecDeque<String>,
}

impl StalledRegistrations {
    const LIMIT: usize = 4096;

    fn insert(&mut self, uuid: String, id: i64) {
        if self.ids.insert(uuid.clone(), id).is_none() {
            self.order.push_back(uuid);
        }
        while self.order.len() > Self::LIMIT {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
    }

    fn take(&mut self, uuid: &str) -> Option<i64> {
        let id = self.ids.remove(uuid)?;
        self.order.retain(|u| u != uuid);
        Some(id)
    }
}

/// A broadcast waiting for its replies. Coalescing broadcasts also collect
/// the replies' buffers, to send them to the client as one reply.
struct Broadcast {
    client: Bytes,
    coalescing: bool,
    targets: Vec<(String, i64)>,
    /// Engines that replied (with their buffers when coalescing).
    replied: HashMap<String, Vec<Bytes>>,
    /// Targets that have not replied yet; the broadcast completes when it is
    /// empty. A set, so each reply costs O(1): checking every target on
    /// every reply was O(N²) per broadcast (1M lookups at 1,024 engines).
    waiting: HashSet<String>,
    last: Option<(Bytes, Bytes, Map<String, Value>, Bytes)>,
    any_error: bool,
}

/// Routing identity used for tasks the hub resubmits itself; replies to it
/// are recorded, not relayed.
pub(crate) const RESUBMIT_CLIENT: &[u8] = b"\x00parallax-hub-resubmit";

pub struct Hub {
    pub(crate) cfg: CoreConfig,
    pub(crate) session: Session,
    auth: Authenticator,
    out: VecDeque<Transmit>,
    events: VecDeque<HubEvent>,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    timer_kinds: HashMap<u64, Timer>,
    timer_seq: u64,
    pub(crate) engines: BTreeMap<i64, Engine>,
    pub(crate) by_uuid: HashMap<String, i64>,
    incoming: HashMap<String, Incoming>,
    pub(crate) id_counter: i64,
    /// Bumped whenever `engines` changes (the state file is rewritten).
    pub(crate) registry_version: u64,
    /// Requests of a previous hub's life without a reply (`restore.rs`).
    pub(crate) orphans: HashMap<String, crate::restore::Orphan>,
    beat: u64,
    reg_ping_armed: bool,
    /// Notifications waiting for `notification_delay` (due time, type,
    /// content), oldest first; published in this order.
    held_notifications: VecDeque<(Instant, String, Value)>,
    /// Registrations purged for want of a first heartbeat, remembered so a
    /// slow engine's late heartbeat (or repeated request) still completes
    /// its registration.
    stalled: StalledRegistrations,
    /// In-flight msg_ids of every queue.
    pub(crate) pending: HashSet<String>,
    /// Load-balanced tasks not yet given to an engine.
    pub(crate) unassigned: HashSet<String>,
    /// The task database: in memory (DictDB/NoDB) or a store on disk.
    pub(crate) db: Box<dyn TaskDb>,
    pub(crate) tasks: TaskState,
    pub(crate) rng: StdRng,
    bcast: HashMap<String, Broadcast>,
    /// Broadcasts split by leaf, for the driver's leaf tasks.
    fanouts: VecDeque<FanOut>,
}

pub(crate) fn peer(idents: &[Bytes]) -> String {
    match idents.first() {
        None => "<no identity>".into(),
        Some(id) => match std::str::from_utf8(id) {
            Ok(s) if s.chars().all(|c| !c.is_control()) => s.to_owned(),
            _ => format!("0x{}", hex_encode(id)),
        },
    }
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn reply_type(request: &str) -> String {
    match request.strip_suffix("_request") {
        Some(base) => format!("{base}_reply"),
        None => format!("{request}_reply"),
    }
}

/// A copy of a received frame that owns its memory. Frames from zmq.rs are
/// slices of the socket's read buffer; keeping one alive (in a task record or
/// a queued task) would pin that whole buffer.
pub(crate) fn owned(b: &Bytes) -> Bytes {
    Bytes::copy_from_slice(b)
}

pub(crate) fn json_bytes(v: &impl serde::Serialize) -> Bytes {
    Bytes::from(serde_json::to_vec(v).expect("JSON values serialize"))
}

impl Hub {
    /// A hub with the in-memory task database `cfg.db` names.
    pub fn new(cfg: CoreConfig, now: Now) -> Hub {
        let db = Box::new(RecordStore::new(cfg.db.clone()));
        Hub::with_store(cfg, db, now)
    }

    /// A hub keeping its task records in `db` (`cfg.db` is not used).
    pub fn with_store(cfg: CoreConfig, db: Box<dyn TaskDb>, now: Now) -> Hub {
        let signer = Signer::new(&cfg.key);
        let session = Session::new(
            signer.clone(),
            cfg.session_id.clone(),
            "parallax-hub".into(),
            cfg.pid,
        );
        let rng = StdRng::seed_from_u64(cfg.seed);
        let tasks = TaskState::new(cfg.dependency_history);
        let mut hub = Hub {
            cfg,
            session,
            auth: Authenticator::new(signer),
            out: VecDeque::new(),
            events: VecDeque::new(),
            timers: BinaryHeap::new(),
            timer_kinds: HashMap::new(),
            timer_seq: 0,
            engines: BTreeMap::new(),
            by_uuid: HashMap::new(),
            incoming: HashMap::new(),
            id_counter: 0,
            registry_version: 0,
            orphans: HashMap::new(),
            beat: 0,
            reg_ping_armed: false,
            held_notifications: VecDeque::new(),
            stalled: StalledRegistrations::default(),
            pending: HashSet::new(),
            unassigned: HashSet::new(),
            db,
            tasks,
            rng,
            bcast: HashMap::new(),
            fanouts: VecDeque::new(),
        };
        let first = now.mono + hub.cfg.hb_period;
        hub.schedule(first, Timer::Beat);
        hub
    }

    // ----------------------------------------------------------------- outputs

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    /// A leaf's share of a broadcast: the leaf signs and sends a copy to
    /// each of its engines (`leaf.rs`).
    pub fn poll_fanout(&mut self) -> Option<FanOut> {
        self.fanouts.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<HubEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((t, _))| *t)
    }

    /// Engine ids currently registered.
    pub fn engine_ids(&self) -> Vec<i64> {
        self.engines.keys().copied().collect()
    }

    pub fn engine_uuid(&self, id: i64) -> Option<&str> {
        self.engines.get(&id).map(|e| e.uuid.as_str())
    }

    pub fn record_count(&self) -> usize {
        self.db.len()
    }

    pub(crate) fn schedule(&mut self, at: Instant, t: Timer) {
        self.timer_seq += 1;
        self.timers.push(Reverse((at, self.timer_seq)));
        self.timer_kinds.insert(self.timer_seq, t);
    }

    pub(crate) fn send(&mut self, channel: Channel, frames: Vec<Bytes>) {
        self.out.push_back(Transmit { channel, frames });
    }

    /// Build, sign and queue a message from the hub's own session.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn send_msg(
        &mut self,
        channel: Channel,
        idents: Vec<Bytes>,
        msg_type: &str,
        content: &Value,
        parent: &Value,
        metadata: &Value,
        buffers: Vec<Bytes>,
        now: Now,
    ) -> String {
        let header = self.session.header(msg_type, &format_date(now.wall));
        let frames = self
            .session
            .serialize(idents, &header, parent, metadata, content, buffers);
        self.send(channel, frames);
        header.msg_id
    }

    fn reply_query(
        &mut self,
        ident: &Bytes,
        msg_type: &str,
        content: Value,
        parent: &Message,
        buffers: Vec<Bytes>,
        now: Now,
    ) {
        let parent = serde_json::to_value(&parent.header).unwrap_or_else(|_| json!({}));
        self.send_msg(
            Channel::Query,
            vec![ident.clone()],
            msg_type,
            &content,
            &parent,
            &json!({}),
            buffers,
            now,
        );
    }

    fn hub_error(&mut self, ident: &Bytes, parent: &Message, err: ErrorContent, now: Now) {
        warn!(peer = %peer(std::slice::from_ref(ident)), msg_type = %parent.header.msg_type, ename = %err.ename, evalue = %err.evalue, "query failed");
        self.reply_query(ident, "hub_error", err.to_value(), parent, vec![], now);
    }

    fn notify(&mut self, msg_type: &str, content: Value, now: Now) {
        let delay = self.cfg.notification_delay;
        if !delay.is_zero() {
            let due = now.mono + delay;
            if self.held_notifications.is_empty() {
                self.schedule(due, Timer::Notifications);
            }
            self.held_notifications
                .push_back((due, msg_type.to_owned(), content));
            return;
        }
        self.publish_notification(msg_type, content, now);
    }

    /// Publish every held notification due at `now`, in order; re-arm for
    /// the next one.
    fn release_notifications(&mut self, now: Now) {
        while let Some((due, _, _)) = self.held_notifications.front() {
            if *due > now.mono {
                let at = *due;
                self.schedule(at, Timer::Notifications);
                return;
            }
            let (_, msg_type, content) = self.held_notifications.pop_front().expect("front exists");
            self.publish_notification(&msg_type, content, now);
        }
    }

    fn publish_notification(&mut self, msg_type: &str, content: Value, now: Now) {
        self.send_msg(
            Channel::Notification,
            vec![],
            msg_type,
            &content,
            &json!({}),
            &json!({}),
            vec![],
            now,
        );
    }

    // ------------------------------------------------------------------ inputs

    /// A multipart message arrived on `channel`.
    pub fn handle_frames(&mut self, channel: Channel, frames: Vec<Bytes>, now: Now) {
        match channel {
            Channel::HbPong => {
                // A first pong registers an engine: queued tasks may run.
                self.handle_pong(frames, now);
                return self.drain_graph_work(now);
            }
            Channel::Notification | Channel::HbPing | Channel::IopubClient => {
                debug!(
                    channel = channel.name(),
                    "ignoring input on a publishing socket"
                );
                return;
            }
            _ => {}
        }
        let raw = match RawMessage::from_frames(frames, &self.cfg.limits) {
            Ok(raw) => raw,
            Err(e) => {
                warn!(channel = channel.name(), reason = %e, "dropping malformed message");
                return;
            }
        };
        if let Err(e) = self.auth.check(&raw) {
            warn!(channel = channel.name(), peer = %peer(&raw.idents), reason = %e, "dropping message that failed authentication");
            return;
        }
        if channel == Channel::BroadcastEngine {
            // What a leaf task does (`leaf.rs`), for frames fed here.
            match LeafReply::decode(raw) {
                Ok(r) => self.broadcast_reply(r, now),
                Err(e) => {
                    warn!(channel = channel.name(), reason = %e, "dropping undecodable message")
                }
            }
            return self.drain_graph_work(now);
        }
        let msg = match Message::decode(&raw) {
            Ok(m) => m,
            Err(e) => {
                warn!(channel = channel.name(), peer = %peer(&raw.idents), reason = %e, "dropping undecodable message");
                return;
            }
        };
        match channel {
            Channel::Query => self.handle_query(msg, now),
            Channel::MuxClient => self.mux_request(raw, msg, now),
            Channel::MuxEngine => self.mux_reply(raw, msg, now),
            Channel::TaskClient => self.task_request(raw, msg, now),
            Channel::TaskEngine => self.task_reply(raw, msg, now),
            Channel::ControlClient => self.control_request(raw, msg, now),
            Channel::ControlEngine => self.control_reply(raw, msg),
            Channel::BroadcastClient => self.broadcast_request(raw, msg, now),
            Channel::BroadcastEngine => unreachable!("decoded above"),
            Channel::IopubEngine => self.iopub(raw, msg, now),
            Channel::HbPong | Channel::Notification | Channel::HbPing | Channel::IopubClient => {
                unreachable!("handled above")
            }
        }
        self.drain_graph_work(now);
    }

    /// Fire every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Now) {
        while let Some(Reverse((at, seq))) = self.timers.peek().copied() {
            if at > now.mono {
                break;
            }
            self.timers.pop();
            let Some(kind) = self.timer_kinds.remove(&seq) else {
                continue;
            };
            match kind {
                Timer::Beat => self.beat(now, at),
                Timer::RegistrationPing => {
                    self.reg_ping_armed = false;
                    if !self.incoming.is_empty() {
                        self.ping();
                        self.arm_registration_ping(now);
                    }
                }
                Timer::StalledRegistration { uuid, id } => {
                    // Only the registration this timer was armed for: the
                    // uuid may have registered, left and come back since.
                    if self.incoming.get(&uuid).is_some_and(|inc| inc.id == id) {
                        self.incoming.remove(&uuid);
                        warn!(engine = id, uuid = %uuid, "purging stalled registration: no heartbeat arrived");
                        self.stalled.insert(uuid, id);
                    }
                }
                Timer::StrandedMux { id, uuid, msg_ids } => {
                    self.stranded_mux(id, &uuid, msg_ids, now)
                }
                Timer::StrandedTasks { uuid, id } => self.stranded_tasks(&uuid, id, now),
                Timer::TaskTimeout { msg_id, generation } => {
                    self.task_timeout(&msg_id, generation, now)
                }
                Timer::Notifications => self.release_notifications(now),
                Timer::Orphans => self.expire_orphans(now),
            }
            self.drain_graph_work(now);
        }
    }

    /// Give back the capacity a burst left behind (hash tables never shrink
    /// on their own), so resident memory returns to its steady state.
    pub fn compact(&mut self) {
        fn shrink_set(s: &mut HashSet<String>) {
            if s.capacity() > 1024 && s.capacity() > 4 * s.len() {
                s.shrink_to_fit();
            }
        }
        shrink_set(&mut self.pending);
        shrink_set(&mut self.unassigned);
        self.tasks.compact();
    }

    // --------------------------------------------------------------- heartbeat

    fn ping(&mut self) {
        let payload = Bytes::from(self.beat.to_string());
        self.send(Channel::HbPing, vec![payload]);
    }

    fn arm_registration_ping(&mut self, now: Now) {
        if !self.reg_ping_armed {
            self.reg_ping_armed = true;
            let at = now.mono + self.registration_ping_interval();
            self.schedule(at, Timer::RegistrationPing);
        }
    }

    /// Every ping goes to every engine and comes back as one pong each: at
    /// a fixed 20 ms, a registration storm of thousands of engines made the
    /// hub relay hundreds of thousands of pongs a second (the storm slowed
    /// itself down). The interval grows with the engines pinged — one more
    /// `registration_ping` per 64 engines — and never exceeds the beat.
    /// Parallax engines do not need these pings at all (each sends a first
    /// pong as soon as its heartbeat socket is connected); ipengine does.
    fn registration_ping_interval(&self) -> Duration {
        let pinged = (self.engines.len() + self.incoming.len()) as u32;
        (self.cfg.registration_ping * (1 + pinged / 64)).min(self.cfg.hb_period)
    }

    fn beat(&mut self, now: Now, due: Instant) {
        self.compact();
        self.beat += 1;
        let beat = self.beat;
        let max = self.cfg.max_heartmonitor_misses;
        let mut dead = Vec::new();
        for e in self.engines.values_mut() {
            if e.last_pong + 1 >= beat {
                e.misses = 0;
            } else {
                e.misses += 1;
                if e.misses > max {
                    dead.push(e.id);
                } else {
                    info!(engine = e.id, misses = e.misses, "heartbeat missed");
                }
            }
        }
        for id in dead {
            warn!(
                engine = id,
                "engine stopped answering heartbeats; unregistering"
            );
            self.unregister_engine(id, now);
        }
        self.ping();
        // Keep the beat on its grid unless the hub fell far behind.
        let mut next = due + self.cfg.hb_period;
        if next <= now.mono {
            next = now.mono + self.cfg.hb_period;
        }
        self.schedule(next, Timer::Beat);
    }

    fn handle_pong(&mut self, frames: Vec<Bytes>, now: Now) {
        if frames.len() != 2 {
            warn!(frames = frames.len(), peer = %peer(&frames), "dropping malformed heartbeat");
            return;
        }
        let uuid = String::from_utf8_lossy(&frames[0]).into_owned();
        let n: Option<u64> = std::str::from_utf8(&frames[1])
            .ok()
            .and_then(|s| s.parse().ok());
        let Some(n) = n else {
            warn!(peer = %uuid, "dropping heartbeat with a bad payload");
            return;
        };
        if self.incoming.contains_key(&uuid) {
            self.finish_registration(&uuid, now);
            return;
        }
        if let Some(id) = self.stalled.take(&uuid) {
            // A heartbeat after the registration was purged: the engine is
            // alive after all (it was slow, not gone), so register it with
            // the id it was given if that is still free, rather than leave
            // it answering beats that count for nothing.
            let taken =
                self.engines.contains_key(&id) || self.incoming.values().any(|i| i.id == id);
            if taken {
                warn!(engine = id, uuid = %uuid, "late heartbeat from a purged registration whose id is taken since; ignored");
            } else {
                info!(engine = id, uuid = %uuid, "late first heartbeat: completing a purged registration");
                self.incoming.insert(uuid.clone(), Incoming { id });
                self.finish_registration(&uuid, now);
            }
            return;
        }
        if let Some(&id) = self.by_uuid.get(&uuid) {
            let beat = self.beat;
            let e = self
                .engines
                .get_mut(&id)
                .expect("by_uuid and engines agree");
            if n + 1 >= beat {
                e.last_pong = e.last_pong.max(n);
            } else {
                debug!(engine = id, pong = n, beat, "stale heartbeat");
            }
        }
    }

    // ------------------------------------------------------------ registration

    fn new_engine_id(&mut self, requested: Option<i64>) -> i64 {
        if let Some(r) = requested {
            let taken = self.engines.contains_key(&r) || self.incoming.values().any(|i| i.id == r);
            if r >= 0 && !taken {
                self.id_counter = self.id_counter.max(r + 1);
                return r;
            }
            warn!(requested = r, "requested engine id is not available");
        }
        let id = self.id_counter;
        self.id_counter += 1;
        id
    }

    fn register_engine(&mut self, ident: &Bytes, msg: &Message, now: Now) {
        let req: RegistrationRequest = match serde_json::from_value(msg.content.clone()) {
            Ok(r) => r,
            Err(e) => {
                return self.hub_error(
                    ident,
                    msg,
                    ErrorContent::new("ValueError", format!("bad registration_request: {e}")),
                    now,
                );
            }
        };
        let uuid = req.uuid;
        // The same uuid again is the same engine asking again (its first
        // reply was late or lost): answer with the id it already has. A uuid
        // is a random 128-bit value chosen by the engine, and every request
        // is signed with the cluster's key, so it cannot be someone else's.
        let known = self
            .incoming
            .get(&uuid)
            .map(|i| i.id)
            .or_else(|| self.by_uuid.get(&uuid).copied());
        let content = if let Some(id) = known {
            info!(engine = id, uuid = %uuid, "repeated registration_request: same id");
            self.registration_reply_content(id)
        } else if let Some(id) = self.stalled.take(&uuid) {
            // Purged for want of a heartbeat, now back: keep its id if free.
            self.accept_registration(&uuid, req.id.or(Some(id)), now)
        } else {
            self.accept_registration(&uuid, req.id, now)
        };
        // ipyparallel sends registration_reply without a parent header.
        self.send_msg(
            Channel::Query,
            vec![ident.clone()],
            "registration_reply",
            &content,
            &json!({}),
            &json!({}),
            vec![],
            now,
        );
    }

    /// Give `uuid` an id (the requested one if free) and wait for its first
    /// heartbeat; returns the reply's content.
    fn accept_registration(&mut self, uuid: &str, requested: Option<i64>, now: Now) -> Value {
        let id = self.new_engine_id(requested);
        info!(engine = id, uuid = %uuid, "accepting registration");
        self.incoming.insert(uuid.to_owned(), Incoming { id });
        let at = now.mono + self.cfg.registration_timeout;
        self.schedule(
            at,
            Timer::StalledRegistration {
                uuid: uuid.to_owned(),
                id,
            },
        );
        self.arm_registration_ping(now);
        self.registration_reply_content(id)
    }

    fn registration_reply_content(&self, id: i64) -> Value {
        json!({
            "id": id,
            "status": "ok",
            "hb_period": self.cfg.hb_period.as_millis() as u64,
            "connection_info": self.cfg.engine_info,
        })
    }

    /// A registration accepted with `id`, waiting for its first heartbeat.
    pub(crate) fn insert_incoming(&mut self, uuid: &str, id: i64) {
        self.incoming.insert(uuid.to_owned(), Incoming { id });
    }

    pub(crate) fn finish_registration(&mut self, uuid: &str, now: Now) {
        let Some(inc) = self.incoming.remove(uuid) else {
            return;
        };
        let id = inc.id;
        self.registry_version += 1;
        self.engines.insert(
            id,
            Engine {
                id,
                uuid: uuid.to_owned(),
                queue: VecDeque::new(),
                tasks: VecDeque::new(),
                completed_count: 0,
                completed: VecDeque::new(),
                last_pong: self.beat,
                misses: 0,
            },
        );
        self.by_uuid.insert(uuid.to_owned(), id);
        info!(engine = id, uuid = %uuid, "engine registered");
        self.notify(
            "registration_notification",
            json!({"id": id, "uuid": uuid}),
            now,
        );
        self.lb_register(uuid);
    }

    pub(crate) fn unregister_engine(&mut self, id: i64, now: Now) {
        let Some(engine) = self.engines.remove(&id) else {
            if let Some(uuid) = self
                .incoming
                .iter()
                .find(|(_, i)| i.id == id)
                .map(|(u, _)| u.clone())
            {
                info!(engine = id, "cancelling pending registration");
                self.incoming.remove(&uuid);
            } else {
                debug!(engine = id, "already unregistered");
            }
            return;
        };
        self.by_uuid.remove(&engine.uuid);
        self.registry_version += 1;
        info!(engine = id, uuid = %engine.uuid, "engine unregistered");
        self.notify(
            "unregistration_notification",
            json!({"id": id, "uuid": engine.uuid}),
            now,
        );
        if !engine.queue.is_empty() {
            let at = now.mono + self.cfg.stranded_delay;
            self.schedule(
                at,
                Timer::StrandedMux {
                    id,
                    uuid: engine.uuid.clone(),
                    msg_ids: engine.queue.into_iter().collect(),
                },
            );
        }
        // Broadcasts still waiting for this engine can never complete: the
        // client fails them itself on the unregistration notification; the
        // hub records them as failed.
        let uuid = engine.uuid.clone();
        let doomed: Vec<String> = self
            .bcast
            .iter()
            .filter(|(_, b)| b.waiting.contains(&uuid))
            .map(|(m, _)| m.clone())
            .collect();
        for original in doomed {
            self.bcast.remove(&original);
            let err = ErrorContent::new(
                "EngineError",
                format!("Engine {id} died while running broadcast {original:?}"),
            )
            .with_engine_info(&uuid, Some(id), "apply");
            self.pending.remove(&original);
            self.record_failure(&original, &err, &uuid, now, Map::new());
        }
        self.lb_unregister(&engine.uuid, id, now);
    }

    fn stranded_mux(&mut self, id: i64, uuid: &str, msg_ids: Vec<String>, now: Now) {
        for msg_id in msg_ids {
            if !self.pending.remove(&msg_id) {
                continue;
            }
            let err = ErrorContent::new(
                "EngineError",
                format!("Engine {id} died while running task {msg_id:?}"),
            )
            .with_engine_info(uuid, Some(id), "apply");
            let mut f = Map::new();
            f.insert("engine_uuid".into(), json!(uuid));
            self.record_failure(&msg_id, &err, uuid, now, f);
        }
    }

    /// Records `msg_id` as failed with `err` on `engine` (result header and
    /// completion time now, plus the fields already in `f`) and counts it
    /// done.
    pub(crate) fn record_failure(
        &mut self,
        msg_id: &str,
        err: &ErrorContent,
        engine: &str,
        now: Now,
        mut f: Map<String, Value>,
    ) {
        let date = format_date(now.wall);
        f.insert("result_content".into(), err.to_value());
        f.insert(
            "result_header".into(),
            json!({"engine": engine, "date": date}),
        );
        f.insert("completed".into(), json!(date));
        self.db_update(msg_id, f, Some(vec![]));
        self.tasks.record_done(msg_id, false, engine);
    }

    // ------------------------------------------------------------------ query

    fn handle_query(&mut self, msg: Message, now: Now) {
        let Some(ident) = msg.idents.first().cloned() else {
            warn!("query without a routing identity");
            return;
        };
        debug!(peer = %peer(&msg.idents), msg_type = %msg.header.msg_type, "query");
        match msg.header.msg_type.as_str() {
            "registration_request" => self.register_engine(&ident, &msg, now),
            "unregistration_request" => {
                match serde_json::from_value::<UnregistrationRequest>(msg.content.clone()) {
                    Ok(UnregistrationRequest { id: Some(id) }) => self.unregister_engine(id, now),
                    _ => warn!(peer = %peer(&msg.idents), "bad unregistration_request"),
                }
            }
            "connection_request" => {
                let engines: Map<String, Value> = self
                    .engines
                    .values()
                    .map(|e| (e.id.to_string(), json!(e.uuid)))
                    .collect();
                self.reply_query(
                    &ident,
                    "connection_reply",
                    json!({"status": "ok", "engines": engines}),
                    &msg,
                    vec![],
                    now,
                );
            }
            "queue_request" => self.queue_status(&ident, &msg, now),
            "load_request" => self.check_load(&ident, &msg, now),
            "result_request" => self.get_results(&ident, &msg, now),
            "history_request" => match self.db.get_history() {
                Ok(h) => self.reply_query(
                    &ident,
                    "history_reply",
                    json!({"status": "ok", "history": h}),
                    &msg,
                    vec![],
                    now,
                ),
                Err(e) => {
                    let err = db_error(&e);
                    self.reply_query(&ident, "history_reply", err.to_value(), &msg, vec![], now)
                }
            },
            "db_request" => self.db_query(&ident, &msg, now),
            "purge_request" => self.purge_results(&ident, &msg, now),
            "resubmit_request" => self.resubmit(&ident, &msg, now),
            "shutdown_request" => {
                info!(peer = %peer(&msg.idents), "shutdown requested");
                self.reply_query(
                    &ident,
                    "shutdown_reply",
                    json!({"status": "ok"}),
                    &msg,
                    vec![],
                    now,
                );
                let parent = serde_json::to_value(&msg.header).unwrap_or_default();
                self.send_msg(
                    Channel::Notification,
                    vec![],
                    "shutdown_notification",
                    &json!({"status": "ok"}),
                    &parent,
                    &json!({}),
                    vec![],
                    now,
                );
                self.events.push_back(HubEvent::Shutdown);
            }
            "become_dask_request" | "stop_distributed_request" => self.hub_error(
                &ident,
                &msg,
                ErrorContent::new(
                    "NotImplementedError",
                    "dask.distributed integration is not available in the Parallax hub",
                ),
                now,
            ),
            other => {
                let err = ErrorContent::new("KeyError", format!("Bad Message Type: {other:?}"));
                self.hub_error(&ident, &msg, err, now)
            }
        }
    }

    /// ipyparallel's `_validate_targets`: None → all, int/uuid → one, list.
    fn validate_targets(&self, targets: &Value) -> Result<Vec<i64>, ErrorContent> {
        let list: Vec<Value> = match targets {
            // None means every engine, even when there are none (ipyparallel).
            Value::Null => return Ok(self.engine_ids()),
            Value::Array(a) => a.clone(),
            other => vec![other.clone()],
        };
        let mut ids = Vec::new();
        let mut bad = Vec::new();
        for t in list {
            let id = match &t {
                Value::Number(n) => n.as_i64(),
                Value::String(s) => self.by_uuid.get(s).copied(),
                _ => None,
            };
            match id {
                Some(id) if self.engines.contains_key(&id) => ids.push(id),
                _ => bad.push(t.to_string()),
            }
        }
        if !bad.is_empty() {
            return Err(ErrorContent::new(
                "IndexError",
                format!("No Such Engine: [{}]", bad.join(", ")),
            ));
        }
        if ids.is_empty() {
            return Err(ErrorContent::new("IndexError", "No Engines Registered"));
        }
        Ok(ids)
    }

    fn queue_status(&mut self, ident: &Bytes, msg: &Message, now: Now) {
        let req: QueueRequest = match serde_json::from_value(msg.content.clone()) {
            Ok(r) => r,
            Err(e) => {
                return self.hub_error(
                    ident,
                    msg,
                    ErrorContent::new("ValueError", e.to_string()),
                    now,
                );
            }
        };
        let ids = match self.validate_targets(&req.targets) {
            Ok(ids) => ids,
            Err(e) => return self.hub_error(ident, msg, e, now),
        };
        let mut content = Map::new();
        content.insert("status".into(), json!("ok"));
        for id in ids {
            let e = &self.engines[&id];
            let v = if req.verbose {
                json!({"queue": e.queue, "completed": e.completed, "tasks": e.tasks})
            } else {
                json!({"queue": e.queue.len(), "completed": e.completed_count, "tasks": e.tasks.len()})
            };
            content.insert(id.to_string(), v);
        }
        let unassigned = if req.verbose {
            json!(self.unassigned.iter().collect::<Vec<_>>())
        } else {
            json!(self.unassigned.len())
        };
        content.insert("unassigned".into(), unassigned);
        self.reply_query(
            ident,
            "queue_reply",
            Value::Object(content),
            msg,
            vec![],
            now,
        );
    }

    fn check_load(&mut self, ident: &Bytes, msg: &Message, now: Now) {
        let targets = msg.content.get("targets").cloned().unwrap_or(Value::Null);
        let ids = match self.validate_targets(&targets) {
            Ok(ids) => ids,
            Err(e) => return self.hub_error(ident, msg, e, now),
        };
        let mut content = Map::new();
        content.insert("status".into(), json!("ok"));
        for id in ids {
            let e = &self.engines[&id];
            content.insert(id.to_string(), json!(e.queue.len() + e.tasks.len()));
        }
        self.reply_query(
            ident,
            "load_reply",
            Value::Object(content),
            msg,
            vec![],
            now,
        );
    }

    fn extract_record(rec: &TaskRecord) -> (Value, Vec<Bytes>) {
        let g = |k: &str| rec.fields.get(k).cloned().unwrap_or(Value::Null);
        let io = json!({
            "execute_input": g("execute_input"),
            "execute_result": g("execute_result"),
            "error": g("error"),
            "stdout": g("stdout"),
            "stderr": g("stderr"),
        });
        let content = json!({
            "header": g("header"),
            "metadata": g("metadata"),
            "result_metadata": g("result_metadata"),
            "result_header": g("result_header"),
            "result_content": g("result_content"),
            "received": g("received"),
            "io": io,
        });
        (content, rec.result_buffers.clone())
    }

    fn get_results(&mut self, ident: &Bytes, msg: &Message, now: Now) {
        let req: ResultRequest = match serde_json::from_value(msg.content.clone()) {
            Ok(r) => r,
            Err(e) => {
                return self.hub_error(
                    ident,
                    msg,
                    ErrorContent::new("ValueError", e.to_string()),
                    now,
                );
            }
        };
        let mut ids = req.msg_ids;
        ids.sort();
        ids.dedup();
        let mut pending = Vec::new();
        let mut completed = Vec::new();
        let mut content = Map::new();
        let mut buffers = Vec::new();
        let mut error = None;
        for id in ids {
            if self.pending.contains(&id) {
                pending.push(id);
                continue;
            }
            match self.db.get_record(&id) {
                Ok(rec) => {
                    let done = !rec
                        .fields
                        .get("completed")
                        .unwrap_or(&Value::Null)
                        .is_null();
                    if done {
                        if !req.status_only {
                            let (c, b) = Self::extract_record(&rec);
                            content.insert(id.clone(), c);
                            buffers.extend(b);
                        }
                        completed.push(id);
                    } else {
                        pending.push(id);
                    }
                }
                Err(DbError::NoData(_)) if req.status_only && self.tasks.is_done(&id) => {
                    completed.push(id)
                }
                Err(e) => {
                    error = Some(match e {
                        DbError::NoData(_) => db_error(&e),
                        _ => ErrorContent::new("KeyError", format!("No such message: {id}")),
                    });
                    break;
                }
            }
        }
        let reply = match error {
            Some(err) => {
                buffers.clear();
                err.to_value()
            }
            None => {
                content.insert("status".into(), json!("ok"));
                content.insert("pending".into(), json!(pending));
                content.insert("completed".into(), json!(completed));
                Value::Object(content)
            }
        };
        self.reply_query(ident, "result_reply", reply, msg, buffers, now);
    }

    fn db_query(&mut self, ident: &Bytes, msg: &Message, now: Now) {
        let req: DbRequest = match serde_json::from_value(msg.content.clone()) {
            Ok(r) => r,
            Err(e) => {
                return self.hub_error(
                    ident,
                    msg,
                    ErrorContent::new("ValueError", e.to_string()),
                    now,
                );
            }
        };
        let keys = req.keys.as_deref();
        let (content, buffers) = match self.db.find_records(&req.query, keys) {
            Err(e) => (db_error(&e).to_value(), vec![]),
            Ok(found) => {
                let want_bufs = keys.is_some_and(|k| k.iter().any(|x| x == "buffers"));
                let want_rbufs = keys.is_some_and(|k| k.iter().any(|x| x == "result_buffers"));
                let mut buffer_lens = Vec::new();
                let mut result_buffer_lens = Vec::new();
                let mut buffers = Vec::new();
                let mut records = Vec::with_capacity(found.len());
                for rec in found {
                    if want_bufs {
                        let b = rec.buffers.unwrap_or_default();
                        buffer_lens.push(b.len());
                        buffers.extend(b);
                    }
                    if want_rbufs {
                        let b = rec.result_buffers.unwrap_or_default();
                        result_buffer_lens.push(b.len());
                        buffers.extend(b);
                    }
                    records.push(Value::Object(rec.fields));
                }
                let content = json!({
                    "status": "ok",
                    "records": records,
                    "buffer_lens": if want_bufs { json!(buffer_lens) } else { Value::Null },
                    "result_buffer_lens": if want_rbufs { json!(result_buffer_lens) } else { Value::Null },
                });
                (content, buffers)
            }
        };
        self.reply_query(ident, "db_reply", content, msg, buffers, now);
    }

    fn purge_results(&mut self, ident: &Bytes, msg: &Message, now: Now) {
        let req: PurgeRequest = match serde_json::from_value(msg.content.clone()) {
            Ok(r) => r,
            Err(e) => {
                return self.hub_error(
                    ident,
                    msg,
                    ErrorContent::new("ValueError", e.to_string()),
                    now,
                );
            }
        };
        let mut reply = json!({"status": "ok"});
        if req.msg_ids == json!("all") {
            if let Err(e) = self
                .db
                .drop_matching_records(&json!({"completed": {"$ne": null}}))
            {
                reply = db_error(&e).to_value();
            }
        } else {
            let ids: Vec<String> = match &req.msg_ids {
                Value::Null => vec![],
                Value::Array(a) => a
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect(),
                Value::String(s) => vec![s.clone()],
                other => {
                    let err = ErrorContent::new(
                        "TypeError",
                        format!("msg_ids must be a list or 'all', not {other}"),
                    );
                    return self.reply_query(
                        ident,
                        "purge_reply",
                        err.to_value(),
                        msg,
                        vec![],
                        now,
                    );
                }
            };
            if let Some(p) = ids.iter().find(|m| self.pending.contains(*m)) {
                reply = ErrorContent::new("IndexError", format!("msg pending: {p:?}")).to_value();
            } else if !ids.is_empty()
                && let Err(e) = self
                    .db
                    .drop_matching_records(&json!({"msg_id": {"$in": ids}}))
            {
                reply = db_error(&e).to_value();
            }
            if reply["status"] == "ok" {
                for eid in &req.engine_ids {
                    let Some(e) = self.engines.get(eid) else {
                        reply = ErrorContent::new("IndexError", format!("No such engine: {eid}"))
                            .to_value();
                        break;
                    };
                    let q = json!({"engine_uuid": e.uuid, "completed": {"$ne": null}});
                    if let Err(e) = self.db.drop_matching_records(&q) {
                        reply = db_error(&e).to_value();
                        break;
                    }
                }
            }
        }
        self.reply_query(ident, "purge_reply", reply, msg, vec![], now);
    }

    fn resubmit(&mut self, ident: &Bytes, msg: &Message, now: Now) {
        let req: ResubmitRequest = match serde_json::from_value(msg.content.clone()) {
            Ok(r) => r,
            Err(e) => {
                return self.hub_error(
                    ident,
                    msg,
                    ErrorContent::new("ValueError", e.to_string()),
                    now,
                );
            }
        };
        let keys = ["header".to_string(), "content".into(), "buffers".into()];
        let found = match self
            .db
            .find_records(&json!({"msg_id": {"$in": req.msg_ids}}), Some(&keys))
        {
            Ok(f) => f,
            Err(e) => {
                return self.reply_query(
                    ident,
                    "resubmit_reply",
                    db_error(&e).to_value(),
                    msg,
                    vec![],
                    now,
                );
            }
        };
        let found_ids: Vec<String> = found
            .iter()
            .filter_map(|r| {
                r.fields
                    .get("msg_id")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .collect();
        let missing: Vec<&String> = req
            .msg_ids
            .iter()
            .filter(|m| !found_ids.contains(m))
            .collect();
        if !missing.is_empty() {
            let err = ErrorContent::new("KeyError", format!("No such msg(s): {missing:?}"));
            return self.reply_query(ident, "resubmit_reply", err.to_value(), msg, vec![], now);
        }
        let mut resubmitted = Map::new();
        let mut jobs = Vec::new();
        for rec in found {
            let old_id = rec.fields["msg_id"].as_str().unwrap_or_default().to_owned();
            let Some(Value::Object(mut header)) = rec.fields.get("header").cloned() else {
                let err = ErrorContent::new(
                    "KeyError",
                    format!("record {old_id:?} has no request header to resubmit"),
                );
                return self.reply_query(ident, "resubmit_reply", err.to_value(), msg, vec![], now);
            };
            let parent = Value::Object(header.clone());
            let new_id = self.session.new_msg_id();
            header.insert("msg_id".into(), json!(new_id));
            header.insert("date".into(), json!(format_date(now.wall)));
            let content = match rec.fields.get("content") {
                Some(c @ Value::Object(_)) => c.clone(),
                // A broadcast engine's copy records no content of its own.
                _ => {
                    let err = ErrorContent::new(
                        "KeyError",
                        format!(
                            "record {old_id:?} has no request content to resubmit (one engine's copy of a broadcast: resubmit the broadcast's msg_id)"
                        ),
                    );
                    return self.reply_query(
                        ident,
                        "resubmit_reply",
                        err.to_value(),
                        msg,
                        vec![],
                        now,
                    );
                }
            };
            let frames = self.session.serialize_frames(
                vec![Bytes::from_static(RESUBMIT_CLIENT)],
                json_bytes(&header),
                json_bytes(&parent),
                Bytes::from_static(b"{}"),
                json_bytes(&content),
                rec.buffers.unwrap_or_default(),
            );
            resubmitted.insert(old_id.clone(), json!(new_id));
            jobs.push((old_id, new_id, frames));
        }
        self.reply_query(
            ident,
            "resubmit_reply",
            json!({"status": "ok", "resubmitted": resubmitted}),
            msg,
            vec![],
            now,
        );
        for (old_id, new_id, frames) in jobs {
            let mut f = Map::new();
            f.insert("resubmitted".into(), json!(new_id));
            self.db_update(&old_id, f, None);
            let raw = RawMessage::from_frames(frames, &self.cfg.limits)
                .expect("own frames are well formed");
            let m = Message::decode(&raw).expect("own frames decode");
            self.task_request(raw, m, now);
        }
    }

    // ------------------------------------------------------------------ records

    pub(crate) fn new_record(&mut self, msg: &Message, queue: &str, engine_uuid: Option<&str>) {
        self.new_record_owned(msg.clone(), queue, engine_uuid);
    }

    /// [`Self::new_record`] for a request the caller is done with: its
    /// content and metadata move into the record instead of being copied.
    pub(crate) fn new_record_owned(
        &mut self,
        msg: Message,
        queue: &str,
        engine_uuid: Option<&str>,
    ) {
        let rec = Self::request_record(msg, queue, engine_uuid);
        let msg_id = rec.fields["msg_id"].as_str().unwrap_or_default().to_owned();
        // A repeated msg_id merges with what is recorded (`add_request`).
        if let Err(e) = self.db.add_request(&msg_id, rec) {
            debug!(msg_id = %msg_id, error = %e, "record not stored");
        }
    }

    fn request_record(msg: Message, queue: &str, engine_uuid: Option<&str>) -> TaskRecord {
        let Message {
            header,
            metadata,
            content,
            buffers,
            ..
        } = msg;
        let mut rec = RecordStore::empty_record(&header.msg_id);
        let f = &mut rec.fields;
        f.insert("submitted".into(), Value::String(header.date.clone()));
        f.insert("client_uuid".into(), Value::String(header.session.clone()));
        f.insert(
            "header".into(),
            serde_json::to_value(header).unwrap_or_default(),
        );
        f.insert("content".into(), content);
        f.insert(
            "label".into(),
            metadata.get("label").cloned().unwrap_or(Value::Null),
        );
        f.insert("metadata".into(), Value::Object(metadata));
        f.insert("queue".into(), Value::String(queue.to_owned()));
        if let Some(u) = engine_uuid {
            f.insert("engine_uuid".into(), Value::String(u.to_owned()));
        }
        rec.buffers = buffers.iter().map(owned).collect();
        rec
    }

    pub(crate) fn db_update(
        &mut self,
        msg_id: &str,
        fields: Map<String, Value>,
        result_buffers: Option<Vec<Bytes>>,
    ) {
        if let Err(e) = self.db.update_record(msg_id, fields, result_buffers) {
            debug!(msg_id = %msg_id, error = %e, "record not updated");
        }
    }

    /// Store a reply in the request's record. Takes the message: its
    /// metadata and content move into the record (a reply is recorded last,
    /// and copying them was a measurable share of a fan-out to 1,000
    /// engines).
    pub(crate) fn record_result(&mut self, msg: Message, engine_uuid: &str, now: Now) {
        let Some(parent_id) = msg.parent_msg_id().map(str::to_owned) else {
            return;
        };
        let Message {
            header,
            metadata,
            content,
            buffers,
            ..
        } = msg;
        let mut f = Map::new();
        f.insert(
            "started".into(),
            metadata.get("started").cloned().unwrap_or(Value::Null),
        );
        f.insert("completed".into(), Value::String(header.date.clone()));
        f.insert(
            "result_header".into(),
            serde_json::to_value(header).unwrap_or_default(),
        );
        f.insert("result_metadata".into(), Value::Object(metadata));
        f.insert("result_content".into(), content);
        f.insert("received".into(), Value::String(format_date(now.wall)));
        f.insert("engine_uuid".into(), Value::String(engine_uuid.to_owned()));
        self.db_update(&parent_id, f, Some(buffers.iter().map(owned).collect()));
    }

    // -------------------------------------------------------------------- mux

    /// A reply with an error, parented to `msg`, for a request the hub
    /// cannot deliver.
    pub(crate) fn undeliverable(
        &mut self,
        channel: Channel,
        idents: Vec<Bytes>,
        msg: &Message,
        err: ErrorContent,
        now: Now,
    ) {
        warn!(channel = channel.name(), peer = %peer(&idents), msg_id = %msg.header.msg_id, ename = %err.ename, evalue = %err.evalue, "request not delivered");
        let parent = serde_json::to_value(&msg.header).unwrap_or_default();
        let md = json!({"status": "error", "dependencies_met": true});
        self.send_msg(
            channel,
            idents,
            &reply_type(&msg.header.msg_type),
            &err.to_value(),
            &parent,
            &md,
            vec![],
            now,
        );
    }

    fn unknown_engine_error(&self, uuid: &str) -> ErrorContent {
        let ids = self.engine_ids();
        ErrorContent::new(
            "EngineError",
            format!("no engine with uuid {uuid:?} is registered (registered engine ids: {ids:?})"),
        )
    }

    fn mux_request(&mut self, raw: RawMessage, msg: Message, now: Now) {
        let Some(client) = raw.idents.first().cloned() else {
            warn!("direct request without a client identity");
            return;
        };
        let Some(target) = raw.idents.get(1).cloned() else {
            let err = ErrorContent::new("ValueError", "direct request without a target engine");
            return self.undeliverable(Channel::MuxClient, vec![client], &msg, err, now);
        };
        let uuid = String::from_utf8_lossy(&target).into_owned();
        let Some(&id) = self.by_uuid.get(&uuid) else {
            let err = self.unknown_engine_error(&uuid);
            return self.undeliverable(Channel::MuxClient, vec![client, target], &msg, err, now);
        };
        let mut frames = raw.into_frames();
        frames.swap(0, 1);
        self.send(Channel::MuxEngine, frames);
        let msg_id = msg.header.msg_id.clone();
        self.new_record_owned(msg, "mux", Some(&uuid));
        self.pending.insert(msg_id.clone());
        if let Some(e) = self.engines.get_mut(&id) {
            e.queue.push_back(msg_id);
        }
    }

    fn mux_reply(&mut self, raw: RawMessage, msg: Message, now: Now) {
        if raw.idents.len() < 2 {
            warn!(peer = %peer(&raw.idents), "engine reply without a client identity");
            return;
        }
        let uuid = String::from_utf8_lossy(&raw.idents[0]).into_owned();
        let mut frames = raw.into_frames();
        frames.swap(0, 1);
        self.send(Channel::MuxClient, frames);
        let Some(parent_id) = msg.parent_msg_id().map(str::to_owned) else {
            return;
        };
        let success = msg.content.get("status").and_then(Value::as_str) == Some("ok");
        self.orphan_answered(&parent_id);
        if self.pending.remove(&parent_id) {
            if let Some(e) = self
                .by_uuid
                .get(&uuid)
                .and_then(|id| self.engines.get_mut(id))
            {
                if let Some(pos) = e.queue.iter().position(|m| *m == parent_id) {
                    e.queue.remove(pos);
                }
                push_completed(e, &parent_id);
            }
        } else if !self.tasks.is_done(&parent_id) {
            debug!(msg_id = %parent_id, "reply to an unknown direct request");
        }
        self.tasks.record_done(&parent_id, success, &uuid);
        self.record_result(msg, &uuid, now);
    }

    // ---------------------------------------------------------------- control

    fn control_request(&mut self, raw: RawMessage, msg: Message, now: Now) {
        let Some(client) = raw.idents.first().cloned() else {
            warn!("control request without a client identity");
            return;
        };
        let Some(target) = raw.idents.get(1).cloned() else {
            let err = ErrorContent::new("ValueError", "control request without a target engine");
            return self.undeliverable(Channel::ControlClient, vec![client], &msg, err, now);
        };
        let uuid = String::from_utf8_lossy(&target).into_owned();
        if !self.by_uuid.contains_key(&uuid) {
            let err = self.unknown_engine_error(&uuid);
            return self.undeliverable(
                Channel::ControlClient,
                vec![client, target],
                &msg,
                err,
                now,
            );
        }
        let mut frames = raw.into_frames();
        frames.swap(0, 1);
        self.send(Channel::ControlEngine, frames);
    }

    fn control_reply(&mut self, raw: RawMessage, _msg: Message) {
        if raw.idents.len() < 2 {
            warn!(peer = %peer(&raw.idents), "control reply without a client identity");
            return;
        }
        let mut frames = raw.into_frames();
        frames.swap(0, 1);
        self.send(Channel::ControlClient, frames);
    }

    // ------------------------------------------------------------------ iopub

    fn iopub(&mut self, raw: RawMessage, msg: Message, now: Now) {
        self.send(Channel::IopubClient, raw.into_frames());
        let msg_type = msg.header.msg_type.as_str();
        match msg_type {
            "status" => return,
            "shutdown_reply" => {
                if let Some(&id) = self.by_uuid.get(&msg.header.session) {
                    info!(engine = id, "engine shut down");
                    self.unregister_engine(id, now);
                }
                return;
            }
            _ => {}
        }
        let Some(parent_id) = msg.parent_msg_id().map(str::to_owned) else {
            return;
        };
        // Every request is recorded before it reaches an engine, so output
        // for an unknown parent belongs to a culled or purged record (or to
        // none of ours): the store drops it rather than recreate the record
        // (it would lack `submitted`, which culling goes by).
        let c = &msg.content;
        let mut f = Map::new();
        match msg_type {
            "stream" => {
                let name = c.get("name").and_then(Value::as_str).unwrap_or("stdout");
                let text = c.get("text").and_then(Value::as_str).unwrap_or("");
                if name == "stdout" || name == "stderr" {
                    self.db.append_output(&parent_id, name, text);
                }
                return;
            }
            "error" => {
                f.insert("error".into(), c.clone());
            }
            "execute_input" => {
                f.insert(
                    "execute_input".into(),
                    c.get("code").cloned().unwrap_or(Value::Null),
                );
            }
            "display_data" | "execute_result" => {
                f.insert(msg_type.to_owned(), c.clone());
            }
            _ => return,
        }
        self.db_update(&parent_id, f, None);
    }

    // -------------------------------------------------------------- broadcast

    fn broadcast_request(&mut self, raw: RawMessage, msg: Message, now: Now) {
        let Some(client) = raw.idents.first().cloned() else {
            warn!("broadcast request without a client identity");
            return;
        };
        let targets: Vec<(String, i64)> = match msg.metadata.get("targets") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|t| {
                    let pair = t.as_array()?;
                    Some((pair.first()?.as_str()?.to_owned(), pair.get(1)?.as_i64()?))
                })
                .collect(),
            _ => vec![],
        };
        let coalescing = msg
            .metadata
            .get("is_coalescing")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let original = msg
            .metadata
            .get("original_msg_id")
            .and_then(Value::as_str)
            .unwrap_or(&msg.header.msg_id)
            .to_owned();
        let mut md = msg.metadata.clone();
        md.insert("original_msg_id".into(), json!(original));
        if targets.is_empty() {
            let err = ErrorContent::new("ValueError", "broadcast without targets");
            return self.undeliverable(Channel::BroadcastClient, vec![client], &msg, err, now);
        }
        let unknown: Vec<&(String, i64)> = targets
            .iter()
            .filter(|(u, _)| !self.by_uuid.contains_key(u))
            .collect();
        if !unknown.is_empty() {
            let names: Vec<String> = unknown.iter().map(|(u, i)| format!("{i} ({u})")).collect();
            let err = ErrorContent::new(
                "EngineError",
                format!(
                    "broadcast to engines that are not registered: {}",
                    names.join(", ")
                ),
            );
            warn!(msg_id = %original, evalue = %err.evalue, "broadcast not delivered");
            let parent = serde_json::to_value(&msg.header).unwrap_or_default();
            let mut rmd = md.clone();
            rmd.insert("status".into(), json!("error"));
            if coalescing {
                let bt: Vec<Value> = targets.iter().map(|(u, i)| json!([u, i])).collect();
                rmd.insert("broadcast_targets".into(), json!(bt));
                self.send_msg(
                    Channel::BroadcastClient,
                    vec![client],
                    &reply_type(&msg.header.msg_type),
                    &err.to_value(),
                    &parent,
                    &Value::Object(rmd),
                    vec![],
                    now,
                );
            } else {
                for (u, _) in &targets {
                    let mut p = parent.clone();
                    p["msg_id"] = json!(format!("{original}_{u}"));
                    let mut m = rmd.clone();
                    m.insert("engine".into(), json!(u));
                    self.send_msg(
                        Channel::BroadcastClient,
                        vec![client.clone()],
                        &reply_type(&msg.header.msg_type),
                        &err.to_value(),
                        &p,
                        &Value::Object(m),
                        vec![],
                        now,
                    );
                }
            }
            return;
        }
        // One FanOut per leaf (engine id % leaves, the leaf each engine
        // connected to): the leaf signs and sends each engine's copy
        // (`leaf.rs`). The copies' metadata is shared: the flags and
        // `original_msg_id`, no `targets` (engines read only the flags).
        md.remove("targets");
        let metadata = json_bytes(&md);
        let leaves = self.cfg.broadcast_leaves.max(1);
        let mut per_leaf: Vec<Vec<String>> = vec![Vec::new(); leaves];
        // Each engine's copy gets a record of its own (results, output and
        // status per engine, as for a direct request), kept small: what
        // identifies the copy (msg_id, header, client, engine, dates) and
        // what its reply adds. The request's content, metadata and buffers
        // are recorded once, in the broadcast's own record (`original`):
        // full records cost ~150 allocations per engine per broadcast to
        // build and cull, the largest share of the hub's CPU in a fan-out.
        let header = serde_json::to_value(&msg.header).unwrap_or_default();
        for (uuid, _) in &targets {
            // The hub's id for the engine, not the client's: it picks the
            // leaf the engine connected to (a stale id would pick another
            // leaf, where the engine cannot be reached).
            let id = self.by_uuid[uuid];
            let sub_id = FanOut::sub_msg_id(&original, uuid);
            let mut h = header.clone();
            h["msg_id"] = Value::String(sub_id.clone());
            let mut f = Map::new();
            f.insert("msg_id".into(), Value::String(sub_id.clone()));
            f.insert("header".into(), h);
            f.insert("submitted".into(), Value::String(msg.header.date.clone()));
            f.insert(
                "client_uuid".into(),
                Value::String(msg.header.session.clone()),
            );
            f.insert("queue".into(), Value::String("broadcast".into()));
            f.insert("engine_uuid".into(), Value::String(uuid.clone()));
            f.insert("stdout".into(), Value::String(String::new()));
            f.insert("stderr".into(), Value::String(String::new()));
            let rec = TaskRecord {
                fields: f,
                ..TaskRecord::default()
            };
            if let Err(e) = self.db.add_request(&sub_id, rec) {
                debug!(msg_id = %sub_id, error = %e, "record not stored");
            }
            // Tracked in the engine's queue like a direct request, so an
            // engine death records EngineError for it (stranded_mux).
            if let Some(e) = self.engines.get_mut(&id) {
                e.queue.push_back(sub_id.clone());
            }
            self.pending.insert(sub_id);
            per_leaf[id.rem_euclid(leaves as i64) as usize].push(uuid.clone());
        }
        // The client's buffers as received: they are only in flight (the
        // recorded copy is the original record's own).
        let buffers: Vec<Bytes> = raw.buffers.clone();
        for (leaf, uuids) in per_leaf.into_iter().enumerate() {
            if uuids.is_empty() {
                continue;
            }
            self.fanouts.push_back(FanOut {
                leaf,
                client: client.clone(),
                header: msg.header.clone(),
                original: original.clone(),
                parent: raw.parent.clone(),
                metadata: metadata.clone(),
                content: raw.content.clone(),
                buffers: buffers.clone(),
                targets: uuids,
            });
        }
        // The request as the client sent it is recorded too, and completes
        // when every engine has replied.
        self.new_record(&msg, "broadcast", None);
        self.pending.insert(original.clone());
        let waiting = targets.iter().map(|(u, _)| u.clone()).collect();
        self.bcast.insert(
            original,
            Broadcast {
                client,
                coalescing,
                waiting,
                targets,
                replied: HashMap::new(),
                last: None,
                any_error: false,
            },
        );
    }

    /// Replies verified and decoded by a broadcast leaf (`leaf.rs`), in the
    /// order they arrived there.
    pub fn handle_leaf_replies(&mut self, replies: Vec<LeafReply>, now: Now) {
        for r in replies {
            self.broadcast_reply(r, now);
        }
        self.drain_graph_work(now);
    }

    /// One engine's reply to its copy of a broadcast: recorded under the
    /// copy's msg_id, relayed at once (non-coalescing) or kept for the one
    /// coalesced reply; the client's request completes with the last one.
    fn broadcast_reply(&mut self, reply: LeafReply, now: Now) {
        if reply.raw.idents.len() < 2 {
            warn!(peer = %peer(&reply.raw.idents), "broadcast reply without a client identity");
            return;
        }
        let uuid = reply.engine();
        let coalescing = reply.is_coalescing;
        let original = reply.original_msg_id.clone();
        let success = reply.status_ok();
        if let Some(pid) = reply.parent_msg_id.as_deref() {
            if self.pending.remove(pid)
                && let Some(e) = self
                    .by_uuid
                    .get(&uuid)
                    .and_then(|id| self.engines.get_mut(id))
            {
                if let Some(pos) = e.queue.iter().position(|m| m == pid) {
                    e.queue.remove(pos);
                }
                push_completed(e, pid);
            }
            self.tasks.record_done(pid, success, &uuid);
        }
        let state = original.as_ref().and_then(|o| self.bcast.get_mut(o));
        let Some(state) = state else {
            if coalescing {
                debug!(msg_id = ?original, "reply to an unknown or abandoned broadcast");
            } else {
                let mut frames = reply.raw.clone().into_frames();
                frames.remove(0);
                self.send(Channel::BroadcastClient, frames);
            }
            self.record_leaf_reply(reply, &uuid, now);
            return;
        };
        state.any_error |= !success;
        state.waiting.remove(&uuid);
        let done = state.waiting.is_empty();
        if coalescing {
            state
                .replied
                .insert(uuid.clone(), reply.raw.buffers.clone());
            if done {
                state.last = Some((
                    reply.raw.header.clone(),
                    reply.raw.parent.clone(),
                    reply.metadata(),
                    reply.raw.content.clone(),
                ));
            }
        } else {
            let mut frames = reply.raw.clone().into_frames();
            frames.remove(0);
            self.send(Channel::BroadcastClient, frames);
        }
        if !done {
            self.record_leaf_reply(reply, &uuid, now);
            return;
        }
        let original = original.expect("state found by it");
        let state = self.bcast.remove(&original).expect("present");
        let bt: Vec<Value> = state.targets.iter().map(|(u, i)| json!([u, i])).collect();
        let mut result_md = reply.metadata();
        if state.coalescing {
            let (header, parent, mut md, content) = state.last.expect("the last reply");
            md.insert("broadcast_targets".into(), json!(bt));
            result_md = md.clone();
            let mut buffers = Vec::new();
            let mut per = state.replied;
            for (u, _) in &state.targets {
                buffers.extend(per.remove(u).unwrap_or_default());
            }
            let frames = self.session.serialize_frames(
                vec![state.client],
                header,
                parent,
                json_bytes(&md),
                content,
                buffers,
            );
            self.send(Channel::BroadcastClient, frames);
        } else {
            result_md.insert("broadcast_targets".into(), json!(bt));
        }
        let (header, content) = reply.header_and_content();
        let mut f = Map::new();
        f.insert("result_header".into(), header);
        f.insert("result_metadata".into(), Value::Object(result_md));
        f.insert("result_content".into(), content);
        f.insert("received".into(), json!(format_date(now.wall)));
        f.insert("completed".into(), reply.date.clone());
        self.record_leaf_reply(reply, &uuid, now);
        self.db_update(&original, f, None);
        self.pending.remove(&original);
        self.tasks.record_done(&original, !state.any_error, "");
    }

    /// [`Self::record_result`] for a reply a leaf decoded: its values move
    /// into the record.
    fn record_leaf_reply(&mut self, reply: LeafReply, engine_uuid: &str, now: Now) {
        let Some(parent_id) = reply.parent_msg_id.as_deref() else {
            return;
        };
        let raw = reply.raw_result();
        let mut f = Map::new();
        f.insert("started".into(), reply.started.clone());
        f.insert("completed".into(), reply.date.clone());
        f.insert("received".into(), Value::String(format_date(now.wall)));
        f.insert("engine_uuid".into(), Value::String(engine_uuid.to_owned()));
        let buffers = reply.raw.buffers.iter().map(owned).collect();
        if let Err(e) = self.db.update_record_raw(parent_id, f, raw, Some(buffers)) {
            debug!(msg_id = %parent_id, error = %e, "record not updated");
        }
    }
}

pub(crate) fn push_completed(e: &mut Engine, msg_id: &str) {
    e.completed_count += 1;
    if e.completed.len() >= COMPLETED_KEPT {
        e.completed.pop_front();
    }
    e.completed.push_back(msg_id.to_owned());
}

fn db_error(e: &DbError) -> ErrorContent {
    ErrorContent::new(e.ename(), e.to_string())
}
