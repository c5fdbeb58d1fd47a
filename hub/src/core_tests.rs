//! Deterministic tests of the hub core: a virtual clock, in-memory peers, no
//! sockets and no sleeping (quinn-proto style).
//!
//! [`Sim`] owns a [`Hub`], the virtual [`Now`], a client [`Peer`] and fake
//! engines that answer like ipengine does. Everything the hub transmits goes
//! to an outbox that tests drain per channel and decode with the wire crate
//! (signatures are verified on every decoded output). Heartbeat pings are
//! answered automatically by engines whose `heart` is on, so time can be
//! advanced across many beats; `advance` fires every timer in order.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{TimeZone, Utc};
use parallax_wire::{DELIMITER, Limits, Message, RawMessage, Session, Signer, format_date};
use serde_json::{Value, json};

use crate::core::{Channel, CoreConfig, Hub, HubEvent, Now, Transmit};
use crate::leaf::{FanOut, LeafCodec, LeafReply};
use crate::records::{DbBackend, DbLimits};
use crate::scheduler::Scheme;

const KEY: &[u8] = b"parallax-core-tests-key";
const CLIENT: &str = "client-ident-0";

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn base_config() -> CoreConfig {
    let mut cfg = CoreConfig::new(KEY.to_vec());
    cfg.session_id = "hub-session".into();
    cfg.pid = 4242;
    cfg.hb_period = Duration::from_millis(1000);
    cfg.max_heartmonitor_misses = 3;
    cfg.registration_timeout = Duration::from_secs(5);
    cfg.stranded_delay = Duration::from_secs(2);
    cfg.registration_ping = Duration::from_millis(20);
    // published at once here; `notifications_are_held_for_late_subscribers`
    // tests the delay
    cfg.notification_delay = Duration::ZERO;
    cfg.scheme = Scheme::LeastLoad;
    cfg.hwm = 1;
    cfg.seed = 7;
    cfg.engine_info = json!({"mux": 1234});
    cfg
}

fn cfg_with(f: impl FnOnce(&mut CoreConfig)) -> CoreConfig {
    let mut cfg = base_config();
    f(&mut cfg);
    cfg
}

// ------------------------------------------------------------------ outputs

/// One decoded transmit of the hub.
#[derive(Debug, Clone)]
struct Out {
    frames: Vec<Bytes>,
    idents: Vec<Bytes>,
    msg: Message,
}

impl Out {
    fn ident(&self, i: usize) -> String {
        String::from_utf8(self.idents[i].to_vec()).expect("utf-8 identity")
    }
    fn msg_type(&self) -> &str {
        &self.msg.header.msg_type
    }
    fn msg_id(&self) -> &str {
        &self.msg.header.msg_id
    }
    fn content(&self) -> &Value {
        &self.msg.content
    }
    fn parent_id(&self) -> &str {
        self.msg.parent_msg_id().unwrap_or("")
    }
    fn md(&self, key: &str) -> &Value {
        self.msg.metadata.get(key).unwrap_or(&Value::Null)
    }
    fn ename(&self) -> &str {
        self.content()["ename"].as_str().unwrap_or("")
    }
}

/// Split, verify (with the shared key) and decode frames.
fn decode(frames: &[Bytes]) -> Out {
    let raw =
        RawMessage::from_frames(frames.to_vec(), &Limits::default()).expect("well-formed frames");
    let digest = Signer::new(KEY).verify(&raw).expect("correctly signed");
    assert!(digest.is_some(), "signing is on");
    let msg = Message::decode(&raw).expect("decodable");
    Out {
        frames: frames.to_vec(),
        idents: raw.idents.clone(),
        msg,
    }
}

// -------------------------------------------------------------------- peers

/// A client or engine: a routing identity and a jupyter session.
struct Peer {
    ident: Bytes,
    session: Session,
}

impl Peer {
    fn new(ident: &str, session_id: &str) -> Peer {
        Peer {
            ident: b(ident),
            session: Session::new(Signer::new(KEY), session_id.into(), "tester".into(), 99),
        }
    }

    /// Signed frames `idents ++ [<IDS|MSG>, sig, header, parent, metadata, content] ++ buffers`.
    #[allow(clippy::too_many_arguments)]
    fn frames(
        &mut self,
        idents: Vec<Bytes>,
        msg_type: &str,
        parent: &Value,
        metadata: &Value,
        content: &Value,
        buffers: Vec<Bytes>,
        now: Now,
    ) -> (String, Vec<Bytes>) {
        let header = self.session.header(msg_type, &format_date(now.wall));
        let frames = self
            .session
            .serialize(idents, &header, parent, metadata, content, buffers);
        (header.msg_id, frames)
    }
}

struct FakeEngine {
    uuid: String,
    id: i64,
    /// Identity and session id are both the engine's uuid, as in ipengine.
    peer: Peer,
    /// Answer heartbeat pings.
    heart: bool,
}

fn reply_type(request: &str) -> String {
    match request.strip_suffix("_request") {
        Some(base) => format!("{base}_reply"),
        None => format!("{request}_reply"),
    }
}

// ---------------------------------------------------------------------- sim

struct Sim {
    hub: Hub,
    start: Now,
    now: Now,
    client: Peer,
    engines: Vec<FakeEngine>,
    outbox: VecDeque<Transmit>,
    /// Heartbeat pings as (time, payload); answered, not kept in the outbox.
    pings: Vec<(Instant, String)>,
}

impl Sim {
    fn new(cfg: CoreConfig) -> Sim {
        let start = Now {
            mono: Instant::now(),
            wall: Utc.with_ymd_and_hms(2026, 11, 22, 8, 0, 0).unwrap(),
        };
        Sim {
            hub: Hub::new(cfg, start),
            start,
            now: start,
            client: Peer::new(CLIENT, "client-session"),
            engines: Vec::new(),
            outbox: VecDeque::new(),
            pings: Vec::new(),
        }
    }

    /// A hub with `n` registered engines `e0`, `e1`, … (ids 0, 1, …) and an
    /// empty outbox.
    fn with_engines(cfg: CoreConfig, n: usize) -> Sim {
        let mut sim = Sim::new(cfg);
        for i in 0..n {
            let id = sim.add_engine(&format!("e{i}"));
            assert_eq!(id, i as i64);
        }
        sim.outbox.clear();
        sim
    }

    fn at(&self, t: Instant) -> Now {
        self.start.later(t - self.start.mono)
    }

    /// Move everything the hub queued into the outbox, answering pings.
    fn pump(&mut self) {
        while let Some(t) = self.hub.poll_transmit() {
            if t.channel == Channel::HbPing {
                assert_eq!(t.frames.len(), 1, "a ping is one frame");
                let payload = String::from_utf8(t.frames[0].to_vec()).unwrap();
                assert!(
                    payload.parse::<u64>().is_ok(),
                    "ping payload is a beat number: {payload:?}"
                );
                self.pings.push((self.now.mono, payload.clone()));
                let hearts: Vec<String> = self
                    .engines
                    .iter()
                    .filter(|e| e.heart)
                    .map(|e| e.uuid.clone())
                    .collect();
                for uuid in hearts {
                    self.hub
                        .handle_frames(Channel::HbPong, vec![b(&uuid), b(&payload)], self.now);
                }
            } else {
                self.outbox.push_back(t);
            }
        }
        // The broadcast leaves' share, as the leaf tasks send it.
        while let Some(f) = self.hub.poll_fanout() {
            let codec = LeafCodec::new(KEY, Limits::default());
            for frames in codec.frames(&f) {
                self.outbox.push_back(Transmit {
                    channel: Channel::BroadcastEngine,
                    frames,
                });
            }
        }
    }

    fn feed(&mut self, channel: Channel, frames: Vec<Bytes>) {
        self.hub.handle_frames(channel, frames, self.now);
        // under cfg(test) this checks the running-task count kept in step
        let _ = self.hub.task_counts();
        self.pump();
    }

    /// Advance the virtual clock by `d`, firing every timer due on the way at
    /// its own time.
    fn advance(&mut self, d: Duration) {
        let target = self.now.mono + d;
        let mut fired = 0;
        while let Some(t) = self.hub.poll_timeout() {
            if t > target {
                break;
            }
            fired += 1;
            assert!(fired < 1_000_000, "timer storm");
            if t > self.now.mono {
                self.now = self.at(t);
            }
            self.hub.handle_timeout(self.now);
            let _ = self.hub.task_counts();
            self.pump();
        }
        self.now = self.at(target);
        self.hub.handle_timeout(self.now);
        self.pump();
    }

    fn take_raw(&mut self, channel: Channel) -> Vec<Transmit> {
        let (mine, rest): (Vec<Transmit>, Vec<Transmit>) =
            self.outbox.drain(..).partition(|t| t.channel == channel);
        self.outbox = rest.into();
        mine
    }

    fn take(&mut self, channel: Channel) -> Vec<Out> {
        self.take_raw(channel)
            .iter()
            .map(|t| decode(&t.frames))
            .collect()
    }

    fn take_one(&mut self, channel: Channel) -> Out {
        let mut v = self.take(channel);
        assert_eq!(
            v.len(),
            1,
            "expected exactly one message on {channel:?}, got {v:#?}"
        );
        v.pop().unwrap()
    }

    #[track_caller]
    fn assert_quiet(&mut self) {
        let channels: Vec<Channel> = self.outbox.iter().map(|t| t.channel).collect();
        assert!(channels.is_empty(), "unexpected transmits on {channels:?}");
    }

    // ------------------------------------------------------------ client side

    /// Send a client message on `channel` (`extra` idents follow the client's).
    fn client_send(
        &mut self,
        channel: Channel,
        extra: Vec<Bytes>,
        msg_type: &str,
        content: Value,
        metadata: Value,
        buffers: Vec<Bytes>,
    ) -> String {
        let (id, frames) = self.client_frames(extra, msg_type, content, metadata, buffers);
        self.feed(channel, frames);
        id
    }

    fn client_frames(
        &mut self,
        extra: Vec<Bytes>,
        msg_type: &str,
        content: Value,
        metadata: Value,
        buffers: Vec<Bytes>,
    ) -> (String, Vec<Bytes>) {
        let mut idents = vec![self.client.ident.clone()];
        idents.extend(extra);
        let now = self.now;
        self.client.frames(
            idents,
            msg_type,
            &json!({}),
            &metadata,
            &content,
            buffers,
            now,
        )
    }

    /// A query and its one reply on the query socket.
    fn query(&mut self, msg_type: &str, content: Value) -> Out {
        let id = self.client_send(Channel::Query, vec![], msg_type, content, json!({}), vec![]);
        let reply = self.take_one(Channel::Query);
        assert_eq!(reply.ident(0), CLIENT, "query replies go back to the asker");
        assert_eq!(
            reply.parent_id(),
            id,
            "query replies are parented to the request"
        );
        reply
    }

    /// Submit a load-balanced `apply_request` with `metadata`.
    fn submit(&mut self, metadata: Value) -> String {
        let bufs = vec![b("pickled-f"), b("pickled-args")];
        self.client_send(
            Channel::TaskClient,
            vec![],
            "apply_request",
            json!({}),
            metadata,
            bufs,
        )
    }

    /// Direct (MUX) `apply_request` to engine `uuid`.
    fn submit_direct(&mut self, uuid: &str) -> String {
        self.client_send(
            Channel::MuxClient,
            vec![b(uuid)],
            "apply_request",
            json!({}),
            json!({}),
            vec![b("f")],
        )
    }

    fn queue_status(&mut self, verbose: bool) -> Value {
        let r = self.query(
            "queue_request",
            json!({"targets": null, "verbose": verbose}),
        );
        assert_eq!(r.msg_type(), "queue_reply");
        r.content().clone()
    }

    fn result_request(&mut self, ids: &[&str]) -> Out {
        let r = self.query(
            "result_request",
            json!({"msg_ids": ids, "status_only": false}),
        );
        assert_eq!(r.msg_type(), "result_reply");
        r
    }

    fn connected_engines(&mut self) -> Value {
        let r = self.query("connection_request", json!({}));
        assert_eq!(r.msg_type(), "connection_reply");
        assert_eq!(r.content()["status"], "ok");
        r.content()["engines"].clone()
    }

    // ------------------------------------------------------------ engine side

    fn engine(&mut self, uuid: &str) -> &mut FakeEngine {
        self.engines
            .iter_mut()
            .find(|e| e.uuid == uuid)
            .unwrap_or_else(|| panic!("no fake engine {uuid}"))
    }

    /// Send a `registration_request`; returns the reply. The fake engine is
    /// created (heart off) if it does not exist yet.
    fn register(&mut self, uuid: &str, requested: Option<i64>) -> Out {
        if !self.engines.iter().any(|e| e.uuid == uuid) {
            self.engines.push(FakeEngine {
                uuid: uuid.into(),
                id: -1,
                peer: Peer::new(uuid, uuid),
                heart: false,
            });
        }
        let mut content = json!({"uuid": uuid});
        if let Some(id) = requested {
            content["id"] = json!(id);
        }
        let now = self.now;
        let e = self.engine(uuid);
        let ident = e.peer.ident.clone();
        let (_, frames) = e.peer.frames(
            vec![ident],
            "registration_request",
            &json!({}),
            &json!({}),
            &content,
            vec![],
            now,
        );
        self.feed(Channel::Query, frames);
        let reply = self.take_one(Channel::Query);
        assert_eq!(reply.ident(0), uuid);
        assert_eq!(reply.msg_type(), "registration_reply");
        if reply.content()["status"] == "ok" {
            let id = reply.content()["id"].as_i64().unwrap();
            self.engine(uuid).id = id;
        }
        reply
    }

    fn pong(&mut self, uuid: &str, beat: &str) {
        self.feed(Channel::HbPong, vec![b(uuid), b(beat)]);
    }

    /// Register an engine completely (request, first pong) and keep its heart
    /// beating. Returns its id.
    fn add_engine(&mut self, uuid: &str) -> i64 {
        let reply = self.register(uuid, None);
        assert_eq!(reply.content()["status"], "ok", "{:?}", reply.content());
        self.pong(uuid, "0");
        let note = self.take_one(Channel::Notification);
        assert_eq!(note.msg_type(), "registration_notification");
        assert_eq!(note.content()["uuid"], uuid);
        self.engine(uuid).heart = true;
        note.content()["id"].as_i64().unwrap()
    }

    fn unregister_request(&mut self, uuid: &str) {
        let now = self.now;
        let e = self.engine(uuid);
        let id = e.id;
        let ident = e.peer.ident.clone();
        let (_, frames) = e.peer.frames(
            vec![ident],
            "unregistration_request",
            &json!({}),
            &json!({}),
            &json!({"id": id}),
            vec![],
            now,
        );
        self.feed(Channel::Query, frames);
    }

    /// The frames of an engine's reply to `req`, a request it received on
    /// the engine side of a queue (`[engine_uuid, client, <IDS|MSG>, …]`).
    fn reply_frames(
        &mut self,
        req: &Out,
        status: &str,
        md_extra: Value,
        buffers: Vec<Bytes>,
    ) -> Vec<Bytes> {
        let uuid = req.ident(0);
        let client = req.idents[1].clone();
        let now = self.now;
        let parent = serde_json::to_value(&req.msg.header).unwrap();
        let mut md = json!({
            "status": status,
            "engine": uuid,
            "started": format_date(now.wall),
            "dependencies_met": true,
        });
        // ipengine's init_metadata copies the broadcast flags.
        for k in ["is_broadcast", "is_coalescing", "original_msg_id"] {
            if let Some(v) = req.msg.metadata.get(k) {
                md[k] = v.clone();
            }
        }
        if let Value::Object(extra) = md_extra {
            for (k, v) in extra {
                md[k] = v;
            }
        }
        let content = if status == "ok" {
            json!({"status": "ok"})
        } else {
            json!({"status": status, "ename": "RuntimeError", "evalue": "boom", "traceback": [],
                   "engine_info": {"engine_uuid": uuid}})
        };
        let rtype = reply_type(req.msg_type());
        let e = self.engine(&uuid);
        e.peer
            .frames(
                vec![b(&uuid), client],
                &rtype,
                &parent,
                &md,
                &content,
                buffers,
                now,
            )
            .1
    }

    /// The engine that received `req` on `channel` answers it.
    fn reply(&mut self, channel: Channel, req: &Out, status: &str) -> Vec<Bytes> {
        self.reply_with(channel, req, status, json!({}), vec![b("result")])
    }

    fn reply_with(
        &mut self,
        channel: Channel,
        req: &Out,
        status: &str,
        md: Value,
        buffers: Vec<Bytes>,
    ) -> Vec<Bytes> {
        let frames = self.reply_frames(req, status, md, buffers);
        self.feed(channel, frames.clone());
        frames
    }

    /// An iopub message from engine `uuid` (topic frame first, as a PUB sends).
    fn iopub(&mut self, uuid: &str, msg_type: &str, content: Value, parent: &Out) -> Vec<Bytes> {
        let now = self.now;
        let e = self.engine(uuid);
        let topic = b(&format!("engine.{}.{msg_type}", e.id));
        let parent = serde_json::to_value(&parent.msg.header).unwrap();
        let md = json!({"engine": uuid});
        let frames = e
            .peer
            .frames(vec![topic], msg_type, &parent, &md, &content, vec![], now)
            .1;
        self.feed(Channel::IopubEngine, frames.clone());
        frames
    }

    /// Load-balanced tasks handed to engines since the last call.
    fn tasks_sent(&mut self) -> Vec<Out> {
        let v = self.take(Channel::TaskEngine);
        for t in &v {
            assert_eq!(t.ident(1), CLIENT, "tasks carry the client identity");
        }
        v
    }

    fn task_sent(&mut self) -> Out {
        let mut v = self.tasks_sent();
        assert_eq!(v.len(), 1, "expected one task sent, got {}", v.len());
        v.pop().unwrap()
    }

    /// Results relayed to the client on the task socket.
    fn task_results(&mut self) -> Vec<Out> {
        let v = self.take(Channel::TaskClient);
        for r in &v {
            assert_eq!(r.ident(0), CLIENT);
        }
        v
    }

    fn task_result(&mut self) -> Out {
        let mut v = self.task_results();
        assert_eq!(v.len(), 1, "expected one result, got {v:#?}");
        v.pop().unwrap()
    }
}

// ============================================================ 1. registration

#[test]
fn registration_assigns_increasing_ids_and_never_reuses_them() {
    let mut sim = Sim::new(base_config());
    assert_eq!(sim.add_engine("e0"), 0);
    assert_eq!(sim.add_engine("e1"), 1);

    let reply = sim.register("e5", Some(5));
    let c = reply.content();
    assert_eq!(c["status"], "ok");
    assert_eq!(c["id"], 5, "a free requested id is honoured");
    assert_eq!(c["hb_period"], 1000, "hb_period in ms");
    assert_eq!(c["connection_info"], json!({"mux": 1234}));
    assert_eq!(
        reply.msg.parent_header,
        json!({}),
        "registration_reply has no parent, as in ipyparallel"
    );
    sim.pong("e5", "0");
    assert_eq!(
        sim.take_one(Channel::Notification).content(),
        &json!({"id": 5, "uuid": "e5"})
    );
    sim.engine("e5").heart = true;

    assert_eq!(
        sim.add_engine("e6"),
        6,
        "the counter continues after a requested id"
    );
    let r = sim.register("e7", Some(1));
    assert_eq!(r.content()["id"], 7, "a taken requested id is not honoured");
    sim.pong("e7", "0");
    sim.take_one(Channel::Notification);

    sim.unregister_request("e0");
    let note = sim.take_one(Channel::Notification);
    assert_eq!(note.msg_type(), "unregistration_notification");
    assert_eq!(note.content(), &json!({"id": 0, "uuid": "e0"}));
    assert_eq!(
        sim.add_engine("e8"),
        8,
        "ids of unregistered engines are not reused"
    );
    assert_eq!(sim.hub.engine_ids(), vec![1, 5, 6, 7, 8]);
    assert_eq!(sim.hub.engine_uuid(8), Some("e8"));
    assert_eq!(sim.hub.engine_uuid(0), None);

    // A restarted engine (e.g. an MPI rank) may ask for its old, now free id,
    // as ipyparallel allows.
    let r = sim.register("e0-again", Some(0));
    assert_eq!(r.content()["id"], 0);
    // But an unrequested id still never goes back.
    let r = sim.register("e9", None);
    assert_eq!(r.content()["id"], 9);
    // While a requested id is pending registration, it is taken.
    let r = sim.register("e10", Some(0));
    assert_eq!(r.content()["id"], 10);
    sim.assert_quiet();
}

#[test]
fn repeated_registration_request_gets_the_same_id() {
    // An engine whose reply was late or lost asks again with its uuid: the
    // hub answers with the id it already gave, and nothing else changes.
    let mut sim = Sim::new(base_config());
    assert_eq!(sim.add_engine("done"), 0);
    let r = sim.register("done", None);
    assert_eq!(r.content()["status"], "ok");
    assert_eq!(r.content()["id"], 0, "registered already: same id");
    assert!(
        sim.take(Channel::Notification).is_empty(),
        "no second notification"
    );
    // Registration pending (no pong yet), asked three times.
    assert_eq!(sim.register("pending", Some(7)).content()["id"], 7);
    for _ in 0..2 {
        let r = sim.register("pending", Some(7));
        assert_eq!(r.content()["status"], "ok");
        assert_eq!(r.content()["id"], 7);
    }
    sim.assert_quiet();
    assert_eq!(sim.connected_engines(), json!({"0": "done"}));
    sim.pong("pending", "0");
    assert_eq!(
        sim.take_one(Channel::Notification).content(),
        &json!({"id": 7, "uuid": "pending"})
    );
    assert_eq!(
        sim.connected_engines(),
        json!({"0": "done", "7": "pending"})
    );
    // The id counter moved once, not once per request.
    assert_eq!(sim.add_engine("next"), 8);
}

#[test]
fn registration_completes_on_first_pong_without_waiting_for_a_beat() {
    let mut sim = Sim::new(base_config());
    let r = sim.register("fast", None);
    assert_eq!(r.content()["id"], 0);
    assert_eq!(
        sim.connected_engines(),
        json!({}),
        "not connected before the first pong"
    );
    assert!(sim.take(Channel::Notification).is_empty());

    // The hub pings at once (registration_ping), long before the next beat.
    sim.advance(Duration::from_millis(25));
    assert_eq!(sim.pings.len(), 1, "registration ping after 20 ms");
    assert_eq!(sim.pings[0].1, "0");
    assert!(sim.hub.engine_ids().is_empty());

    // Any pong completes the registration immediately.
    sim.pong("fast", "0");
    let note = sim.take_one(Channel::Notification);
    assert_eq!(note.msg_type(), "registration_notification");
    assert_eq!(note.content(), &json!({"id": 0, "uuid": "fast"}));
    assert_eq!(note.msg.header.session, "hub-session");
    assert_eq!(sim.hub.engine_ids(), vec![0]);
    assert_eq!(sim.connected_engines(), json!({"0": "fast"}));

    // No more registration pings once nothing is pending.
    let before = sim.pings.len();
    sim.advance(Duration::from_millis(500));
    assert_eq!(sim.pings.len(), before);
    sim.assert_quiet();
}

#[test]
fn notifications_are_held_for_late_subscribers() {
    let mut sim = Sim::new(cfg_with(|c| {
        c.notification_delay = Duration::from_millis(100)
    }));
    sim.register("a", None);
    sim.pong("a", "0");
    // registered at once (the table says so) but not yet announced
    assert_eq!(sim.connected_engines(), json!({"0": "a"}));
    assert!(sim.take(Channel::Notification).is_empty());
    sim.advance(Duration::from_millis(60));
    sim.register("b", None);
    sim.pong("b", "0");
    sim.advance(Duration::from_millis(50)); // a is due, b is not
    let n = sim.take(Channel::Notification);
    assert_eq!(n.len(), 1);
    assert_eq!(n[0].content(), &json!({"id": 0, "uuid": "a"}));
    sim.unregister_request("b");
    sim.advance(Duration::from_millis(200));
    let n = sim.take(Channel::Notification);
    let seen: Vec<(String, Value)> = n
        .iter()
        .map(|o| (o.msg_type().to_owned(), o.content().clone()))
        .collect();
    assert_eq!(
        seen,
        vec![
            (
                "registration_notification".into(),
                json!({"id": 1, "uuid": "b"})
            ),
            (
                "unregistration_notification".into(),
                json!({"id": 1, "uuid": "b"})
            ),
        ],
        "in order"
    );
}

#[test]
fn connection_request_lists_engines_by_id() {
    let mut sim = Sim::with_engines(base_config(), 3);
    assert_eq!(
        sim.connected_engines(),
        json!({"0": "e0", "1": "e1", "2": "e2"})
    );
    sim.unregister_request("e1");
    sim.take_one(Channel::Notification);
    assert_eq!(sim.connected_engines(), json!({"0": "e0", "2": "e2"}));
}

#[test]
fn stalled_registration_is_purged_after_registration_timeout() {
    let mut sim = Sim::new(base_config());
    assert_eq!(sim.register("slow", None).content()["id"], 0);
    sim.advance(Duration::from_millis(4_900));
    assert!(!sim.pings.is_empty(), "the hub keeps pinging the newcomer");
    sim.advance(Duration::from_millis(200)); // past the 5 s registration_timeout
    let pings = sim.pings.len();
    sim.advance(Duration::from_millis(500));
    assert_eq!(
        sim.pings.len(),
        pings,
        "registration pings stop with the purge (no beat due yet)"
    );
    assert!(sim.hub.engine_ids().is_empty());
    assert_eq!(sim.connected_engines(), json!({}));

    // A late first pong: the engine was slow, not gone. It is registered
    // with the id it was given.
    sim.pong("slow", "5");
    assert_eq!(
        sim.take_one(Channel::Notification).content(),
        &json!({"id": 0, "uuid": "slow"})
    );
    assert_eq!(sim.connected_engines(), json!({"0": "slow"}));
}

#[test]
fn purged_registration_asked_again_keeps_its_id_unless_taken() {
    let mut sim = Sim::new(base_config());
    assert_eq!(sim.register("a", None).content()["id"], 0);
    assert_eq!(sim.register("b", Some(5)).content()["id"], 5);
    sim.advance(Duration::from_millis(5_200)); // both purged
    assert!(sim.hub.engine_ids().is_empty());

    // "a" asks again: same id, registration pending again.
    let r = sim.register("a", None);
    assert_eq!(r.content()["id"], 0);
    sim.pong("a", "5");
    assert_eq!(
        sim.take_one(Channel::Notification).content(),
        &json!({"id": 0, "uuid": "a"})
    );
    sim.engine("a").heart = true;

    // Id 5 is taken by a newcomer meanwhile: "b"'s late pong is ignored,
    // and its repeated request gets a fresh id.
    assert_eq!(sim.register("c", Some(5)).content()["id"], 5);
    sim.pong("c", "5");
    sim.take_one(Channel::Notification);
    sim.engine("c").heart = true;
    sim.pong("b", "5");
    assert!(sim.take(Channel::Notification).is_empty());
    assert_eq!(sim.connected_engines(), json!({"0": "a", "5": "c"}));
    let r = sim.register("b", Some(5));
    assert_eq!(
        r.content()["id"],
        6,
        "the requested id is taken: a fresh one"
    );
    sim.pong("b", "6");
    assert_eq!(
        sim.take_one(Channel::Notification).content(),
        &json!({"id": 6, "uuid": "b"})
    );
}

// =============================================================== 2. heartbeat

#[test]
fn heartbeat_keeps_live_engines_and_unregisters_silent_ones() {
    let mut sim = Sim::with_engines(base_config(), 2);
    let max = 3; // base_config's max_heartmonitor_misses
    // Both answer for a while.
    for _ in 0..10 {
        sim.advance(Duration::from_secs(1));
    }
    assert_eq!(sim.hub.engine_ids(), vec![0, 1]);
    sim.assert_quiet();
    let beats: Vec<u64> = sim.pings.iter().map(|(_, p)| p.parse().unwrap()).collect();
    assert_eq!(
        beats,
        (1..=10).collect::<Vec<_>>(),
        "one ping per beat, numbered"
    );

    // e1 stops answering. The beat after its last pong still counts; then it
    // may miss `max` beats; the next miss unregisters it.
    sim.engine("e1").heart = false;
    for beat in 0..(max + 1) {
        sim.advance(Duration::from_secs(1));
        assert_eq!(
            sim.hub.engine_ids(),
            vec![0, 1],
            "still registered after {} beats",
            beat + 1
        );
        assert!(sim.take(Channel::Notification).is_empty());
    }
    sim.advance(Duration::from_secs(1));
    let note = sim.take_one(Channel::Notification);
    assert_eq!(note.msg_type(), "unregistration_notification");
    assert_eq!(note.content(), &json!({"id": 1, "uuid": "e1"}));
    assert_eq!(sim.hub.engine_ids(), vec![0]);

    // A late pong from the dead engine is ignored; e0 lives on.
    sim.pong("e1", "15");
    for _ in 0..20 {
        sim.advance(Duration::from_secs(1));
    }
    assert_eq!(sim.hub.engine_ids(), vec![0]);
    sim.assert_quiet();
}

#[test]
fn heartbeat_misses_reset_when_pongs_resume() {
    let mut sim = Sim::with_engines(base_config(), 1);
    for _ in 0..50 {
        sim.engine("e0").heart = false;
        for _ in 0..3 {
            sim.advance(Duration::from_secs(1));
        }
        sim.engine("e0").heart = true;
        sim.advance(Duration::from_secs(1));
    }
    assert_eq!(
        sim.hub.engine_ids(),
        vec![0],
        "intermittent misses below the limit are forgiven"
    );
    // Stale pongs (older than the previous beat) do not count.
    sim.engine("e0").heart = false;
    for _ in 0..6 {
        sim.pong("e0", "1");
        sim.advance(Duration::from_secs(1));
    }
    assert!(sim.hub.engine_ids().is_empty());
}

#[test]
fn explicit_unregistration_request() {
    let mut sim = Sim::with_engines(base_config(), 2);
    sim.unregister_request("e0");
    let note = sim.take_one(Channel::Notification);
    assert_eq!(note.msg_type(), "unregistration_notification");
    assert_eq!(note.content(), &json!({"id": 0, "uuid": "e0"}));
    assert_eq!(sim.hub.engine_ids(), vec![1]);
    // Twice, or for an unknown id: nothing happens.
    sim.unregister_request("e0");
    sim.client_send(
        Channel::Query,
        vec![],
        "unregistration_request",
        json!({"id": 77}),
        json!({}),
        vec![],
    );
    sim.client_send(
        Channel::Query,
        vec![],
        "unregistration_request",
        json!({"id": "x"}),
        json!({}),
        vec![],
    );
    sim.assert_quiet();
    assert_eq!(sim.hub.engine_ids(), vec![1]);
    // Unregistering a pending registration cancels it.
    sim.register("p", None);
    sim.unregister_request("p");
    sim.pong("p", "0");
    sim.assert_quiet();
    assert_eq!(sim.hub.engine_ids(), vec![1]);
}

// ========================================================== 3. load balancing

#[test]
fn load_balancing_with_hwm_1_spreads_and_queues() {
    let mut sim = Sim::with_engines(base_config(), 2);
    let (t1, f1) = sim.client_frames(
        vec![],
        "apply_request",
        json!({}),
        json!({}),
        vec![b("fn"), b("args")],
    );
    sim.feed(Channel::TaskClient, f1.clone());
    let t2 = sim.submit(json!({}));
    let t3 = sim.submit(json!({}));

    let sent = sim.tasks_sent();
    assert_eq!(sent.len(), 2, "hwm=1: one task per engine, the third waits");
    // New engines go to the front of the LRU list, so e1 gets the first task.
    assert_eq!(
        (sent[0].msg_id(), sent[0].ident(0).as_str()),
        (t1.as_str(), "e1")
    );
    assert_eq!(
        (sent[1].msg_id(), sent[1].ident(0).as_str()),
        (t2.as_str(), "e0")
    );
    // The request is relayed unchanged behind [engine, client].
    assert_eq!(&sent[0].frames[1..], &f1[..]);
    assert_eq!(sent[0].msg.buffers, vec![b("fn"), b("args")]);

    let q = sim.queue_status(false);
    assert_eq!(q["status"], "ok");
    assert_eq!(q["0"], json!({"queue": 0, "completed": 0, "tasks": 1}));
    assert_eq!(q["1"], json!({"queue": 0, "completed": 0, "tasks": 1}));
    assert_eq!(q["unassigned"], 1);
    let q = sim.queue_status(true);
    assert_eq!(q["1"], json!({"queue": [], "completed": [], "tasks": [t1]}));
    assert_eq!(q["0"], json!({"queue": [], "completed": [], "tasks": [t2]}));
    assert_eq!(q["unassigned"], json!([t3]));
    let load = sim.query("load_request", json!({"targets": null}));
    assert_eq!(load.content(), &json!({"status": "ok", "0": 1, "1": 1}));

    // A reply frees e1: the result goes to the client as [client, engine, …]
    // unchanged, and the waiting task goes to e1.
    let reply = sim.reply(Channel::TaskEngine, &sent[0], "ok");
    let res = sim.task_result();
    assert_eq!(res.ident(1), "e1");
    assert_eq!(res.frames[0], b(CLIENT));
    assert_eq!(&res.frames[2..], &reply[2..], "relayed unchanged");
    assert_eq!(res.msg_type(), "apply_reply");
    assert_eq!(res.parent_id(), t1);
    let next = sim.task_sent();
    assert_eq!((next.msg_id(), next.ident(0).as_str()), (t3.as_str(), "e1"));

    let q = sim.queue_status(true);
    assert_eq!(
        q["1"],
        json!({"queue": [], "completed": [t1], "tasks": [t3]})
    );
    assert_eq!(q["unassigned"], json!([]));

    sim.reply(Channel::TaskEngine, &sent[1], "ok");
    sim.reply(Channel::TaskEngine, &next, "ok");
    let results = sim.task_results();
    assert_eq!(
        results
            .iter()
            .map(|r| r.parent_id().to_owned())
            .collect::<Vec<_>>(),
        vec![t2.clone(), t3.clone()]
    );
    let q = sim.queue_status(false);
    assert_eq!(q["0"], json!({"queue": 0, "completed": 1, "tasks": 0}));
    assert_eq!(q["1"], json!({"queue": 0, "completed": 2, "tasks": 0}));
    assert_eq!(q["unassigned"], 0);
    assert_eq!(sim.hub.task_counts(), (0, 0));
    assert!(sim.hub.pending.is_empty());

    // queue_request for one engine, and for a bad target.
    let one = sim.query("queue_request", json!({"targets": [1], "verbose": false}));
    assert!(one.content().get("0").is_none());
    assert_eq!(one.content()["1"]["completed"], 2);
    let bad = sim.query("queue_request", json!({"targets": [9], "verbose": false}));
    assert_eq!(bad.msg_type(), "hub_error");
    assert_eq!(bad.ename(), "IndexError");
}

#[test]
fn tasks_wait_for_the_first_engine() {
    let mut sim = Sim::new(base_config());
    let t1 = sim.submit(json!({}));
    let t2 = sim.submit(json!({}));
    assert!(sim.tasks_sent().is_empty());
    assert_eq!(sim.queue_status_without_engines(), 2);
    sim.add_engine("late");
    let sent = sim.task_sent();
    assert_eq!(sent.msg_id(), t1);
    sim.reply(Channel::TaskEngine, &sent, "ok");
    assert_eq!(sim.task_result().parent_id(), t1);
    assert_eq!(sim.task_sent().msg_id(), t2);
}

impl Sim {
    fn queue_status_without_engines(&mut self) -> usize {
        // targets=None means "all engines", which may be none (ipyparallel).
        let r = self.query("queue_request", json!({"targets": null, "verbose": false}));
        assert_eq!(r.msg_type(), "queue_reply");
        assert_eq!(r.content()["status"], "ok");
        let unassigned = r.content()["unassigned"].as_u64().unwrap() as usize;
        assert_eq!(unassigned, self.hub.unassigned.len());
        unassigned
    }
}

// ================================================================= 4. schemes

/// Three engines, unlimited hwm; submit three tasks, finish the one on e0,
/// then see where the fourth goes.
fn fourth_task_engine(scheme: Scheme) -> (Vec<String>, String) {
    let mut sim = Sim::with_engines(
        cfg_with(|c| {
            c.scheme = scheme;
            c.hwm = 0;
        }),
        3,
    );
    let mut first = Vec::new();
    for _ in 0..3 {
        sim.submit(json!({}));
    }
    let sent = sim.tasks_sent();
    for t in &sent {
        first.push(t.ident(0));
    }
    let on_e0 = sent.iter().find(|t| t.ident(0) == "e0").unwrap().clone();
    sim.reply(Channel::TaskEngine, &on_e0, "ok");
    sim.task_result();
    sim.submit(json!({}));
    (first, sim.task_sent().ident(0))
}

#[test]
fn leastload_and_lru_choices() {
    // Ties go to the least recently used; new engines are at the LRU front.
    let (first, fourth) = fourth_task_engine(Scheme::LeastLoad);
    assert_eq!(first, ["e2", "e1", "e0"]);
    assert_eq!(fourth, "e0", "leastload: the only idle engine");
    let (first, fourth) = fourth_task_engine(Scheme::Lru);
    assert_eq!(first, ["e2", "e1", "e0"]);
    assert_eq!(
        fourth, "e2",
        "lru: the least recently used engine, whatever its load"
    );
}

#[test]
fn leastload_prefers_lower_load_over_lru() {
    let mut sim = Sim::with_engines(cfg_with(|c| c.hwm = 0), 2);
    for _ in 0..4 {
        sim.submit(json!({}));
    }
    let sent = sim.tasks_sent();
    let engines: Vec<String> = sent.iter().map(|t| t.ident(0)).collect();
    assert_eq!(engines, ["e1", "e0", "e1", "e0"]);
    // e1 finishes both of its tasks: it has the lower load.
    sim.reply(Channel::TaskEngine, &sent[0], "ok");
    sim.reply(Channel::TaskEngine, &sent[2], "ok");
    sim.task_results();
    let ids: Vec<String> = (0..2).map(|_| sim.submit(json!({}))).collect();
    let next: Vec<String> = sim.tasks_sent().iter().map(|t| t.ident(0)).collect();
    assert_eq!(
        next,
        ["e1", "e1"],
        "loads [e1:0, e0:2]: e1 twice (then a tie at 2 would go to the LRU)"
    );
    assert_eq!(ids.len(), 2);
}

#[test]
fn pure_is_round_robin_ignoring_hwm_and_dependencies() {
    let mut sim = Sim::with_engines(
        cfg_with(|c| {
            c.scheme = Scheme::Pure;
            c.hwm = 1;
        }),
        3,
    );
    for _ in 0..9 {
        sim.submit(json!({}));
    }
    // Dependencies, targets, timeouts and retries mean nothing to pure.
    let dep = sim.submit(json!({"after": ["no-such-task"], "follow": ["nor-this"], "targets": ["e9"], "timeout": 0.001}));
    let sent = sim.tasks_sent();
    assert_eq!(sent.len(), 10, "no hwm: every task is sent at once");
    assert_eq!(sent[9].msg_id(), dep);
    let order: Vec<String> = sent.iter().map(|t| t.ident(0)).collect();
    // The LRU front first: the newest engine, then the older ones in turn.
    assert_eq!(
        order,
        ["e2", "e1", "e0", "e2", "e1", "e0", "e2", "e1", "e0", "e2"]
    );
    for w in order.windows(3) {
        let distinct: HashSet<&String> = w.iter().collect();
        assert_eq!(
            distinct.len(),
            3,
            "round-robin: every 3 consecutive tasks hit 3 engines: {order:?}"
        );
    }
    sim.advance(Duration::from_millis(10));
    assert!(sim.task_results().is_empty(), "no TaskTimeout under pure");
}

/// Where `n` tasks go under a random scheme with hwm 2 and 3 engines,
/// replying in a fixed pattern; asserts the hwm and `targets` are honoured.
fn random_scheme_run(scheme: Scheme, seed: u64, targets: Option<&[&str]>, n: usize) -> Vec<String> {
    let mut sim = Sim::with_engines(
        cfg_with(|c| {
            c.scheme = scheme;
            c.hwm = 2;
            c.seed = seed;
        }),
        3,
    );
    let allowed: Vec<String> = match targets {
        Some(t) => t.iter().map(|s| s.to_string()).collect(),
        None => vec!["e0".into(), "e1".into(), "e2".into()],
    };
    let md = match targets {
        Some(t) => json!({"targets": t}),
        None => json!({}),
    };
    let mut running: HashMap<String, VecDeque<Out>> = HashMap::new();
    let mut order = Vec::new();
    for i in 0..n {
        sim.submit(md.clone());
        for t in sim.tasks_sent() {
            let e = t.ident(0);
            assert!(
                allowed.contains(&e),
                "{scheme}: task sent to {e}, not in {allowed:?}"
            );
            order.push(e.clone());
            let q = running.entry(e.clone()).or_default();
            q.push_back(t);
            assert!(q.len() <= 2, "{scheme}: hwm 2 exceeded on {e}");
        }
        // Finish something on a rotating engine to keep the queue moving.
        let e = &allowed[i % allowed.len()];
        if let Some(t) = running.get_mut(e).and_then(VecDeque::pop_front) {
            sim.reply(Channel::TaskEngine, &t, "ok");
        }
        sim.task_results();
    }
    order
}

#[test]
fn random_schemes_pick_valid_engines_and_use_them_all() {
    for scheme in [Scheme::PlainRandom, Scheme::TwoBin, Scheme::Weighted] {
        let order = random_scheme_run(scheme, 11, None, 300);
        assert!(
            order.len() > 250,
            "{scheme}: tasks flowed ({})",
            order.len()
        );
        for e in ["e0", "e1", "e2"] {
            let n = order.iter().filter(|x| *x == e).count();
            assert!(
                n >= 10,
                "{scheme}: {e} used only {n} times: the rng should spread tasks"
            );
        }
        // Same seed, same choices.
        assert_eq!(
            order,
            random_scheme_run(scheme, 11, None, 300),
            "{scheme} is deterministic per seed"
        );

        let order = random_scheme_run(scheme, 12, Some(&["e0", "e2"]), 200);
        assert!(order.iter().any(|e| e == "e0") && order.iter().any(|e| e == "e2"));
    }
    // PlainRandom with different seeds differs (not a fixed order in disguise).
    assert_ne!(
        random_scheme_run(Scheme::PlainRandom, 1, None, 100),
        random_scheme_run(Scheme::PlainRandom, 2, None, 100)
    );
}

// ================================================================= 5. retries

#[test]
fn retry_goes_to_another_engine_never_back() {
    let mut sim = Sim::with_engines(base_config(), 2);
    let t1 = sim.submit(json!({"retries": 1}));
    let t2 = sim.submit(json!({}));
    let sent = sim.tasks_sent();
    let (a, b_task) = (&sent[0], &sent[1]);
    assert_eq!((a.msg_id(), b_task.msg_id()), (t1.as_str(), t2.as_str()));
    let (ea, eb) = (a.ident(0), b_task.ident(0));
    assert_ne!(ea, eb);

    // t1 fails on A. A is free, but t1 may not go back there; B is busy.
    sim.reply(Channel::TaskEngine, a, "error");
    assert!(
        sim.task_results().is_empty(),
        "a failure with retries left is not relayed"
    );
    assert!(
        sim.tasks_sent().is_empty(),
        "t1 waits for B rather than going back to A"
    );
    assert_eq!(sim.queue_status(false)["unassigned"], 1);

    // A new task may use A.
    let t3 = sim.submit(json!({}));
    let s3 = sim.task_sent();
    assert_eq!((s3.msg_id(), s3.ident(0)), (t3.as_str(), ea.clone()));

    // B finishes t2: t1 goes to B, unchanged.
    sim.reply(Channel::TaskEngine, b_task, "ok");
    assert_eq!(sim.task_result().parent_id(), t2);
    let retry = sim.task_sent();
    assert_eq!((retry.msg_id(), retry.ident(0)), (t1.as_str(), eb.clone()));
    assert_eq!(
        retry.frames[1..],
        a.frames[1..],
        "the same request is re-sent"
    );

    sim.reply(Channel::TaskEngine, &retry, "ok");
    let res = sim.task_result();
    assert_eq!((res.parent_id(), res.ident(1)), (t1.as_str(), eb.clone()));
    assert_eq!(
        res.content()["status"],
        "ok",
        "the client only sees B's reply"
    );
    let rec = sim.result_request(&[&t1]);
    assert_eq!(rec.content()["completed"], json!([t1]));
    assert_eq!(rec.content()[&t1]["result_header"]["session"], eb);
    assert_eq!(rec.content()[&t1]["result_content"]["status"], "ok");
}

#[test]
fn failure_without_retries_is_relayed() {
    let mut sim = Sim::with_engines(base_config(), 2);
    let t1 = sim.submit(json!({"retries": 0}));
    let sent = sim.task_sent();
    let reply = sim.reply(Channel::TaskEngine, &sent, "error");
    let res = sim.task_result();
    assert_eq!(res.parent_id(), t1);
    assert_eq!(res.content()["status"], "error");
    assert_eq!(res.ename(), "RuntimeError");
    assert_eq!(res.ident(1), sent.ident(0));
    assert_eq!(&res.frames[2..], &reply[2..]);
    assert!(sim.tasks_sent().is_empty(), "no retry");

    // Retries run out: two engines, retries=1, both fail.
    let t2 = sim.submit(json!({"retries": 1}));
    let first = sim.task_sent();
    sim.reply(Channel::TaskEngine, &first, "error");
    let second = sim.task_sent();
    assert_ne!(first.ident(0), second.ident(0));
    assert!(sim.task_results().is_empty());
    sim.reply(Channel::TaskEngine, &second, "error");
    let res = sim.task_result();
    assert_eq!(
        (res.parent_id(), res.ident(1)),
        (t2.as_str(), second.ident(0))
    );
    assert_eq!(res.content()["status"], "error");
}

#[test]
fn unmet_dependencies_on_the_engine_replace_the_task() {
    let mut sim = Sim::with_engines(base_config(), 2);
    let t1 = sim.submit(json!({}));
    let first = sim.task_sent();
    sim.reply_with(
        Channel::TaskEngine,
        &first,
        "error",
        json!({"dependencies_met": false}),
        vec![],
    );
    assert!(
        sim.task_results().is_empty(),
        "UnmetDependency is not relayed"
    );
    let second = sim.task_sent();
    assert_eq!(second.msg_id(), t1);
    assert_ne!(
        second.ident(0),
        first.ident(0),
        "re-placed on another engine"
    );
    sim.reply(Channel::TaskEngine, &second, "ok");
    assert_eq!(sim.task_result().ident(1), second.ident(0));
}

// ============================================================ 6. engine death

#[test]
fn task_on_a_dead_engine_fails_with_engine_error_after_stranded_delay() {
    let mut sim = Sim::with_engines(base_config(), 2);
    let t1 = sim.submit(json!({}));
    let sent = sim.task_sent();
    let dead = sent.ident(0);
    sim.engine(&dead).heart = false;
    // Unregistered after 5 silent beats (max 3).
    let mut unregistered_at = None;
    for _ in 0..6 {
        sim.advance(Duration::from_secs(1));
        if unregistered_at.is_none() && !sim.take(Channel::Notification).is_empty() {
            unregistered_at = Some(sim.now.mono);
        }
    }
    assert!(
        unregistered_at.is_some(),
        "heartbeat failure unregisters the engine"
    );
    let since = sim.now.mono - unregistered_at.unwrap();
    assert!(since < Duration::from_secs(2));
    assert!(
        sim.task_results().is_empty(),
        "results may still arrive during stranded_delay"
    );
    sim.advance(Duration::from_secs(2) - since);
    let res = sim.task_result();
    assert_eq!(res.msg_type(), "apply_reply");
    assert_eq!(res.parent_id(), t1);
    assert_eq!(res.ident(1), dead, "[client, engine] like a real reply");
    assert_eq!(res.ename(), "EngineError");
    assert!(res.content()["evalue"].as_str().unwrap().contains(&t1));
    assert_eq!(res.content()["engine_info"]["engine_uuid"], dead);
    // The client has forgotten the dead engine: the id must be in the error.
    assert!(res.content()["engine_info"]["engine_id"].is_i64());
    assert_eq!(res.md("status"), "error");
    assert_eq!(*res.md("engine"), json!(dead));
    let rec = sim.result_request(&[&t1]);
    assert_eq!(rec.content()["completed"], json!([t1]));
    assert_eq!(rec.content()[&t1]["result_content"]["ename"], "EngineError");

    // The survivor takes new work.
    let t2 = sim.submit(json!({}));
    let s2 = sim.task_sent();
    assert_ne!(s2.ident(0), dead);
    assert_eq!(s2.msg_id(), t2);
}

#[test]
fn result_arriving_during_stranded_delay_is_relayed_not_failed() {
    let mut sim = Sim::with_engines(base_config(), 2);
    let t1 = sim.submit(json!({}));
    let sent = sim.task_sent();
    let dying = sent.ident(0);
    sim.unregister_request(&dying);
    sim.take_one(Channel::Notification);
    sim.advance(Duration::from_millis(500));
    sim.reply(Channel::TaskEngine, &sent, "ok");
    let res = sim.task_result();
    assert_eq!(
        (res.parent_id(), res.content()["status"].as_str()),
        (t1.as_str(), Some("ok"))
    );
    sim.advance(Duration::from_secs(5));
    assert!(
        sim.task_results().is_empty(),
        "no EngineError after a real result"
    );
}

#[test]
fn task_on_a_dead_engine_is_retried_elsewhere() {
    let mut sim = Sim::with_engines(base_config(), 2);
    let t1 = sim.submit(json!({"retries": 1}));
    let sent = sim.task_sent();
    let dead = sent.ident(0);
    sim.unregister_request(&dead);
    assert_eq!(
        sim.take_one(Channel::Notification).msg_type(),
        "unregistration_notification"
    );
    sim.advance(Duration::from_millis(1_999));
    assert!(sim.tasks_sent().is_empty());
    sim.advance(Duration::from_millis(1));
    let again = sim.task_sent();
    assert_eq!(again.msg_id(), t1);
    assert_ne!(again.ident(0), dead);
    assert!(
        sim.task_results().is_empty(),
        "no EngineError: the task was retried"
    );
    sim.reply(Channel::TaskEngine, &again, "ok");
    let res = sim.task_result();
    assert_eq!(
        (res.parent_id(), res.content()["status"].as_str()),
        (t1.as_str(), Some("ok"))
    );
}

#[test]
fn direct_requests_stranded_on_a_dead_engine_are_recorded_as_engine_error() {
    let mut sim = Sim::with_engines(base_config(), 2);
    let m1 = sim.submit_direct("e0");
    let m2 = sim.submit_direct("e0");
    let m3 = sim.submit_direct("e1");
    let fwd = sim.take(Channel::MuxEngine);
    assert_eq!(fwd.len(), 3);
    assert_eq!(
        (fwd[0].ident(0).as_str(), fwd[0].ident(1).as_str()),
        ("e0", CLIENT),
        "identities swapped"
    );
    assert_eq!(
        sim.queue_status(false)["0"],
        json!({"queue": 2, "completed": 0, "tasks": 0})
    );

    // e0 answers m1, then dies with m2 outstanding.
    let reply = sim.reply(Channel::MuxEngine, &fwd[0], "ok");
    let relayed = sim.take_one(Channel::MuxClient);
    assert_eq!(
        (relayed.ident(0).as_str(), relayed.ident(1).as_str()),
        (CLIENT, "e0")
    );
    assert_eq!(&relayed.frames[2..], &reply[2..]);
    sim.unregister_request("e0");
    sim.take_one(Channel::Notification);
    let r = sim.result_request(&[&m1, &m2]);
    assert_eq!(r.content()["completed"], json!([m1]));
    assert_eq!(r.content()["pending"], json!([m2]));

    sim.advance(Duration::from_secs(2));
    let r = sim.result_request(&[&m2]);
    assert_eq!(r.content()["completed"], json!([m2]));
    assert_eq!(r.content()["pending"], json!([]));
    let rc = &r.content()[&m2]["result_content"];
    assert_eq!(rc["ename"], "EngineError");
    assert_eq!(rc["engine_info"]["engine_id"], 0);
    assert_eq!(r.content()[&m2]["result_header"]["engine"], "e0");
    let db = sim.query(
        "db_request",
        json!({"query": {"msg_id": m2}, "keys": ["engine_uuid", "completed"]}),
    );
    assert_eq!(db.content()["records"][0]["engine_uuid"], "e0");
    assert!(db.content()["records"][0]["completed"].is_string());
    // Nothing is sent to the client for direct requests (it fails them itself
    // on the unregistration notification), and e1's request is unaffected.
    assert!(sim.take(Channel::MuxClient).is_empty());
    assert_eq!(sim.result_request(&[&m3]).content()["pending"], json!([m3]));
}

// ============================================================ 7. dependencies

fn dep_sim() -> Sim {
    // Unlimited hwm so that waiting always means "dependency not met".
    Sim::with_engines(cfg_with(|c| c.hwm = 0), 2)
}

#[test]
fn after_waits_for_the_dependency_then_runs() {
    let mut sim = dep_sim();
    let t1 = sim.submit(json!({}));
    let s1 = sim.task_sent();
    let t2 = sim.submit(json!({"after": [t1]}));
    assert!(sim.tasks_sent().is_empty(), "t2 waits for t1");
    assert_eq!(sim.queue_status(true)["unassigned"], json!([t2]));
    sim.reply(Channel::TaskEngine, &s1, "ok");
    assert_eq!(sim.task_result().parent_id(), t1);
    let s2 = sim.task_sent();
    assert_eq!(s2.msg_id(), t2);
    // A dependency that is already done is met at once.
    let t3 = sim.submit(
        json!({"after": {"dependencies": [t1], "all": true, "success": true, "failure": false}}),
    );
    assert_eq!(sim.task_sent().msg_id(), t3);
}

#[test]
fn failed_dependency_makes_the_task_impossible() {
    let mut sim = dep_sim();
    let t1 = sim.submit(json!({}));
    let s1 = sim.task_sent();
    let t2 = sim.submit(json!({"after": [t1]}));
    let t3 = sim.submit(json!({"after": [t2]}));
    sim.reply(Channel::TaskEngine, &s1, "error");
    let results = sim.task_results();
    let by_parent: HashMap<String, &Out> = results
        .iter()
        .map(|r| (r.parent_id().to_owned(), r))
        .collect();
    assert_eq!(
        results.len(),
        3,
        "t1's failure, then t2 and t3 fail in cascade"
    );
    let r2 = by_parent[&t2];
    assert_eq!(r2.msg_type(), "apply_reply");
    assert_eq!(r2.ename(), "ImpossibleDependency");
    assert_eq!(
        r2.idents.len(),
        1,
        "scheduler failures have no engine identity"
    );
    assert_eq!(by_parent[&t3].ename(), "ImpossibleDependency");
    assert!(sim.tasks_sent().is_empty());
    let rec = sim.result_request(&[&t2]);
    assert_eq!(
        rec.content()[&t2]["result_content"]["ename"],
        "ImpossibleDependency"
    );
    // Depending on a task already known to have failed fails at once.
    let t4 = sim.submit(json!({"after": [t1]}));
    let r4 = sim.task_result();
    assert_eq!(
        (r4.parent_id(), r4.ename()),
        (t4.as_str(), "ImpossibleDependency")
    );
}

#[test]
fn failure_flag_runs_after_a_failed_dependency() {
    let mut sim = dep_sim();
    let t1 = sim.submit(json!({}));
    let s1 = sim.task_sent();
    let t2 = sim.submit(json!({"after": {"dependencies": [t1], "failure": true}}));
    let t3 =
        sim.submit(json!({"after": {"dependencies": [t1], "success": false, "failure": true}}));
    assert!(sim.tasks_sent().is_empty());
    sim.reply(Channel::TaskEngine, &s1, "error");
    assert_eq!(sim.task_result().parent_id(), t1);
    let ids: HashSet<String> = sim
        .tasks_sent()
        .iter()
        .map(|t| t.msg_id().to_owned())
        .collect();
    assert_eq!(ids, HashSet::from([t2, t3]));

    // success=false, failure=true: a successful dependency makes it impossible.
    let t4 = sim.submit(json!({}));
    let s4 = sim.task_sent();
    let t5 =
        sim.submit(json!({"after": {"dependencies": [t4], "success": false, "failure": true}}));
    sim.reply(Channel::TaskEngine, &s4, "ok");
    let res = sim.task_results();
    let r5 = res.iter().find(|r| r.parent_id() == t5).expect("t5 failed");
    assert_eq!(r5.ename(), "ImpossibleDependency");
}

#[test]
fn any_dependency_with_all_false() {
    let mut sim = dep_sim();
    let t1 = sim.submit(json!({}));
    let t2 = sim.submit(json!({}));
    let sent = sim.tasks_sent();
    let t3 = sim.submit(json!({"after": {"dependencies": [t1, t2], "all": false}}));
    assert!(sim.tasks_sent().is_empty());
    sim.reply(Channel::TaskEngine, &sent[0], "error");
    sim.task_results();
    assert!(
        sim.tasks_sent().is_empty(),
        "one failure is not enough; t2 may still succeed"
    );
    sim.reply(Channel::TaskEngine, &sent[1], "ok");
    sim.task_results();
    assert_eq!(sim.task_sent().msg_id(), t3);

    // Both fail: impossible.
    let a = sim.submit(json!({}));
    let c = sim.submit(json!({}));
    let sent = sim.tasks_sent();
    let t4 = sim.submit(json!({"after": {"dependencies": [a, c], "all": false}}));
    sim.reply(Channel::TaskEngine, &sent[0], "error");
    sim.reply(Channel::TaskEngine, &sent[1], "error");
    let r = sim.task_results();
    assert_eq!(r.len(), 3);
    assert_eq!(r[2].parent_id(), t4);
    assert_eq!(r[2].ename(), "ImpossibleDependency");
}

#[test]
fn unknown_dependency_is_invalid() {
    let mut sim = dep_sim();
    let t1 = sim.submit(json!({"after": ["never-submitted"]}));
    let r = sim.task_result();
    assert_eq!(
        (r.parent_id(), r.ename()),
        (t1.as_str(), "InvalidDependency")
    );
    assert!(
        r.content()["evalue"]
            .as_str()
            .unwrap()
            .contains("never-submitted")
    );
    let t2 = sim.submit(json!({"follow": ["nope"]}));
    assert_eq!(sim.task_result().ename(), "InvalidDependency");
    // Malformed metadata is invalid too.
    let t3 = sim.submit(json!({"after": [1, 2]}));
    let r3 = sim.task_result();
    assert_eq!(
        (r3.parent_id(), r3.ename()),
        (t3.as_str(), "InvalidDependency")
    );
    assert!(sim.tasks_sent().is_empty());
    let st = sim.result_request(&[&t1, &t2, &t3]);
    assert_eq!(st.content()["completed"].as_array().unwrap().len(), 3);
}

#[test]
fn follow_runs_on_the_engine_of_the_dependency() {
    let mut sim = dep_sim();
    let t1 = sim.submit(json!({}));
    let s1 = sim.task_sent();
    let home = s1.ident(0);
    sim.reply(Channel::TaskEngine, &s1, "ok");
    sim.task_result();
    // Without follow the next task would go to the other (LRU) engine.
    for _ in 0..3 {
        let t = sim.submit(json!({"follow": [t1]}));
        let s = sim.task_sent();
        assert_eq!((s.msg_id(), s.ident(0)), (t.as_str(), home.clone()));
        sim.reply(Channel::TaskEngine, &s, "ok");
        sim.task_result();
    }
    let other = sim.submit(json!({}));
    assert_ne!(sim.task_sent().ident(0), home, "{other} goes elsewhere");

    // Following a running task waits for it, then goes to its engine.
    let t5 = sim.submit(json!({}));
    let s5 = sim.task_sent();
    let t6 = sim.submit(json!({"follow": [t5]}));
    assert!(sim.tasks_sent().is_empty());
    sim.reply(Channel::TaskEngine, &s5, "ok");
    sim.task_result();
    let s6 = sim.task_sent();
    assert_eq!((s6.msg_id(), s6.ident(0)), (t6.as_str(), s5.ident(0)));
}

#[test]
fn timeout_while_waiting_fails_with_task_timeout() {
    let mut sim = dep_sim();
    let t1 = sim.submit(json!({}));
    let s1 = sim.task_sent();
    let t2 = sim.submit(json!({"after": [t1], "timeout": 0.5}));
    sim.advance(Duration::from_millis(499));
    assert!(sim.task_results().is_empty());
    sim.advance(Duration::from_millis(2));
    let r = sim.task_result();
    assert_eq!((r.parent_id(), r.ename()), (t2.as_str(), "TaskTimeout"));
    assert_eq!(sim.queue_status(false)["unassigned"], 0);
    // t1 finishing later does not run t2.
    sim.reply(Channel::TaskEngine, &s1, "ok");
    assert_eq!(sim.task_result().parent_id(), t1);
    assert!(sim.tasks_sent().is_empty());
    // A timeout on a task that runs at once has no effect.
    let t3 = sim.submit(json!({"timeout": 0.1}));
    let s3 = sim.task_sent();
    sim.advance(Duration::from_secs(1));
    assert!(sim.task_results().is_empty());
    sim.reply(Channel::TaskEngine, &s3, "ok");
    assert_eq!(sim.task_result().parent_id(), t3);
}

#[test]
fn targets_naming_an_unregistered_engine_are_impossible() {
    let mut sim = dep_sim();
    let t1 = sim.submit(json!({"targets": ["ghost"]}));
    let r = sim.task_result();
    assert_eq!(
        (r.parent_id(), r.ename()),
        (t1.as_str(), "ImpossibleDependency")
    );
    // A registered target is honoured.
    for _ in 0..3 {
        sim.submit(json!({"targets": ["e0"]}));
        let s = sim.task_sent();
        assert_eq!(s.ident(0), "e0");
    }
    // After e1 is gone, targeting it is impossible too.
    sim.unregister_request("e1");
    sim.take_one(Channel::Notification);
    let t2 = sim.submit(json!({"targets": ["e1"]}));
    let r = sim.task_result();
    assert_eq!(
        (r.parent_id(), r.ename()),
        (t2.as_str(), "ImpossibleDependency")
    );
}

// ================================================================ 8. bad input

/// Frames `[client, <IDS|MSG>, sig, header, parent, metadata, content]`
/// correctly signed with the shared key, whatever the JSON frames hold.
fn signed(header: &[u8], parent: &[u8], md: &[u8], content: &[u8]) -> Vec<Bytes> {
    let s = Signer::new(KEY);
    vec![
        b(CLIENT),
        Bytes::from_static(DELIMITER),
        b(&s.sign(header, parent, md, content)),
        Bytes::copy_from_slice(header),
        Bytes::copy_from_slice(parent),
        Bytes::copy_from_slice(md),
        Bytes::copy_from_slice(content),
    ]
}

type Garbage = Box<dyn Fn(&mut Sim, usize) -> Vec<Bytes>>;

/// Malformed inputs; each call makes fresh frames (`n` varies the signed
/// part) so that no case is rejected merely as a replay.
fn garbage() -> Vec<(&'static str, Garbage)> {
    // Index of the signature: [client, <IDS|MSG>, sig, header, parent, md, content].
    const SIG: usize = 2;
    let valid = |sim: &mut Sim| {
        sim.client_frames(vec![], "connection_request", json!({}), json!({}), vec![])
            .1
    };
    let header = |n: usize| {
        format!(
            r#"{{"msg_id":"x{n}","msg_type":"connection_request","session":"s","username":"u","date":"","version":"5.4"}}"#
        )
    };
    vec![
        (
            "unsigned",
            Box::new(move |sim: &mut Sim, _| {
                let mut f = valid(sim);
                f[SIG] = Bytes::new();
                f
            }),
        ),
        (
            "signed with another key",
            Box::new(move |sim: &mut Sim, _| {
                let mut f = valid(sim);
                f[SIG] = b(&Signer::new(b"wrong key").sign(&f[3], &f[4], &f[5], &f[6]));
                f
            }),
        ),
        (
            "malformed signature",
            Box::new(move |sim: &mut Sim, _| {
                let mut f = valid(sim);
                f[SIG] = b("not-hex");
                f
            }),
        ),
        (
            "content changed after signing",
            Box::new(move |sim: &mut Sim, _| {
                let mut f = valid(sim);
                f[6] = b("{\"tampered\": true}");
                f
            }),
        ),
        (
            "truncated: 4 frames after the delimiter",
            Box::new(move |sim: &mut Sim, _| {
                let mut f = valid(sim);
                f.truncate(6);
                f
            }),
        ),
        (
            "only a delimiter",
            Box::new(|_: &mut Sim, _| vec![b(CLIENT), Bytes::from_static(DELIMITER)]),
        ),
        (
            "no delimiter",
            Box::new(move |sim: &mut Sim, _| {
                let mut f = valid(sim);
                f.remove(1);
                f
            }),
        ),
        ("no frames", Box::new(|_: &mut Sim, _| vec![])),
        (
            "too many identities",
            Box::new(move |sim: &mut Sim, _| {
                let mut f: Vec<Bytes> = (0..10).map(|i| b(&format!("id{i}"))).collect();
                f.extend(valid(sim));
                f
            }),
        ),
        (
            "non-UTF-8 header",
            Box::new(|_: &mut Sim, n| {
                let h = format!(
                    "{{\"msg_id\":\"{n}\u{1}\",\"msg_type\":\"connection_request\",\"x\":\""
                );
                let mut h = h.into_bytes();
                h.extend_from_slice(b"\xff\xfe\"}");
                signed(&h, b"{}", b"{}", b"{}")
            }),
        ),
        (
            "non-UTF-8 content",
            Box::new(move |_: &mut Sim, n| {
                signed(header(n).as_bytes(), b"{}", b"{}", b"{\"a\":\"\xc3\x28\"}")
            }),
        ),
        (
            "header is a list",
            Box::new(|_: &mut Sim, n| signed(format!("[{n}]").as_bytes(), b"{}", b"{}", b"{}")),
        ),
        (
            "parent is a string",
            Box::new(move |_: &mut Sim, n| signed(header(n).as_bytes(), b"\"p\"", b"{}", b"{}")),
        ),
        (
            "metadata is a list",
            Box::new(move |_: &mut Sim, n| signed(header(n).as_bytes(), b"{}", b"[]", b"{}")),
        ),
        (
            "header without msg_type",
            Box::new(|_: &mut Sim, n| {
                signed(
                    format!(r#"{{"msg_id":"x{n}"}}"#).as_bytes(),
                    b"{}",
                    b"{}",
                    b"{}",
                )
            }),
        ),
        (
            "content not JSON",
            Box::new(move |_: &mut Sim, n| {
                signed(header(n).as_bytes(), b"{}", b"{}", b"{not json")
            }),
        ),
        (
            "oversized JSON frame",
            Box::new(|sim: &mut Sim, _| {
                let md = json!({"pad": "x".repeat(5000)});
                sim.client_frames(vec![], "connection_request", json!({}), md, vec![])
                    .1
            }),
        ),
        (
            "oversized total",
            Box::new(|sim: &mut Sim, _| {
                let bufs = vec![Bytes::from(vec![0u8; 70_000])];
                sim.client_frames(vec![], "connection_request", json!({}), json!({}), bufs)
                    .1
            }),
        ),
    ]
}

const ALL_CHANNELS: [Channel; 14] = [
    Channel::Query,
    Channel::MuxClient,
    Channel::MuxEngine,
    Channel::TaskClient,
    Channel::TaskEngine,
    Channel::ControlClient,
    Channel::ControlEngine,
    Channel::BroadcastClient,
    Channel::BroadcastEngine,
    Channel::IopubEngine,
    Channel::HbPong,
    Channel::HbPing,
    Channel::Notification,
    Channel::IopubClient,
];

#[test]
fn bad_input_is_dropped_without_panicking() {
    let mut sim = Sim::with_engines(
        cfg_with(|c| {
            c.limits = Limits {
                max_json_frame: 4096,
                max_total: 64 * 1024,
                max_idents: 4,
            };
        }),
        1,
    );
    let mut n = 0;
    for (what, make) in garbage() {
        for ch in ALL_CHANNELS {
            n += 1;
            let frames = make(&mut sim, n);
            sim.hub.handle_frames(ch, frames, sim.now);
            sim.pump();
            let out: Vec<Channel> = sim.outbox.drain(..).map(|t| t.channel).collect();
            assert!(out.is_empty(), "{what} on {ch:?} produced {out:?}");
            assert!(sim.hub.poll_event().is_none(), "{what} on {ch:?}");
        }
    }

    // Replays: the same frames twice are accepted once.
    let t1_frames = sim
        .client_frames(vec![], "apply_request", json!({}), json!({}), vec![])
        .1;
    sim.feed(Channel::TaskClient, t1_frames.clone());
    let sent = sim.task_sent();
    sim.feed(Channel::TaskClient, t1_frames.clone());
    sim.assert_quiet();
    let q = sim
        .client_frames(vec![], "connection_request", json!({}), json!({}), vec![])
        .1;
    sim.feed(Channel::Query, q.clone());
    assert_eq!(sim.take_one(Channel::Query).msg_type(), "connection_reply");
    sim.feed(Channel::Query, q);
    sim.assert_quiet();
    // A replayed engine reply is not relayed twice.
    let reply = sim.reply(Channel::TaskEngine, &sent, "ok");
    sim.task_result();
    sim.feed(Channel::TaskEngine, reply);
    sim.assert_quiet();
    assert_eq!(sim.queue_status(false)["0"]["completed"], 1);

    // Malformed heartbeats.
    for hb in [
        vec![],
        vec![b("e0")],
        vec![b("e0"), b("x")],
        vec![b("e0"), b("1"), b("2")],
        vec![Bytes::from_static(b"\xff"), b("-1")],
        vec![Bytes::from_static(b"\xff"), b("1")],
    ] {
        sim.feed(Channel::HbPong, hb);
        sim.assert_quiet();
    }

    // Messages without the identities a queue needs.
    for ch in ALL_CHANNELS {
        let now = sim.now;
        let (_, f) = sim.client.frames(
            vec![],
            "apply_request",
            &json!({}),
            &json!({}),
            &json!({}),
            vec![],
            now,
        );
        sim.feed(ch, f);
        let out: Vec<Channel> = sim.outbox.drain(..).map(|t| t.channel).collect();
        if ch == Channel::IopubEngine {
            assert_eq!(
                out,
                vec![Channel::IopubClient],
                "iopub needs no identity: relayed"
            );
        } else {
            assert_eq!(out, vec![], "{ch:?} without identities");
        }
        let (_, f) = sim.client.frames(
            vec![b("only-one")],
            "apply_reply",
            &json!({}),
            &json!({}),
            &json!({}),
            vec![],
            now,
        );
        sim.feed(ch, f);
        let out: Vec<Transmit> = sim.outbox.drain(..).collect();
        let channels: Vec<Channel> = out.iter().map(|t| t.channel).collect();
        match ch {
            // A client-side request without a target engine gets an error.
            Channel::MuxClient | Channel::ControlClient | Channel::BroadcastClient => {
                assert_eq!(channels, vec![ch], "{ch:?}");
                let r = decode(&out[0].frames);
                assert_eq!(
                    (r.ident(0).as_str(), r.content()["status"].as_str()),
                    ("only-one", Some("error"))
                );
            }
            // Unknown msg_type on the query socket.
            Channel::Query => assert_eq!(channels, vec![Channel::Query]),
            // Any message is a task: it runs (and its engine answers).
            Channel::TaskClient => {
                assert_eq!(channels, vec![Channel::TaskEngine]);
                let task = decode(&out[0].frames);
                sim.reply(Channel::TaskEngine, &task, "ok");
                assert_eq!(
                    decode(&sim.take_raw(Channel::TaskClient)[0].frames).ident(0),
                    "only-one"
                );
            }
            Channel::IopubEngine => assert_eq!(channels, vec![Channel::IopubClient]),
            _ => assert_eq!(channels, vec![], "{ch:?}"),
        }
    }
    // Valid JSON of the wrong shape in query contents.
    for (t, c) in [
        ("registration_request", json!({"id": 3})),
        ("unregistration_request", json!({"id": null})),
        ("queue_request", json!({"verbose": "yes"})),
        ("result_request", json!({"msg_ids": "notalist"})),
        ("db_request", json!({"query": {"a": {"$bogus": 1}}})),
        ("db_request", json!({"query": 7})),
        ("purge_request", json!({"msg_ids": 5})),
        ("resubmit_request", json!({})),
        ("load_request", json!({"targets": "ghost"})),
        ("queue_request", json!({"targets": [{"a": 1}]})),
    ] {
        let id = sim.client_send(Channel::Query, vec![], t, c.clone(), json!({}), vec![]);
        let replies = sim.take(Channel::Query);
        if t == "unregistration_request" {
            assert!(replies.is_empty());
            continue;
        }
        assert_eq!(replies.len(), 1, "{t}");
        assert_eq!(replies[0].parent_id(), id);
        assert_eq!(
            replies[0].content()["status"],
            "error",
            "{t} {c}: {:?}",
            replies[0].content()
        );
    }
    // Content that is not an object.
    for t in [
        "queue_request",
        "result_request",
        "db_request",
        "purge_request",
        "resubmit_request",
        "registration_request",
    ] {
        let r = sim.query(t, json!([1, 2]));
        assert_eq!(r.content()["status"], "error", "{t}");
    }
    sim.assert_quiet();

    // And the hub still works.
    assert_eq!(sim.connected_engines(), json!({"0": "e0"}));
    let t = sim.submit(json!({}));
    let s = sim.task_sent();
    sim.reply(Channel::TaskEngine, &s, "ok");
    assert_eq!(sim.task_result().parent_id(), t);
    assert_eq!(sim.hub.engine_ids(), vec![0]);
}

#[test]
fn unknown_query_type_gets_hub_error() {
    let mut sim = Sim::with_engines(base_config(), 1);
    let r = sim.query("frobnicate_request", json!({}));
    assert_eq!(r.msg_type(), "hub_error");
    assert_eq!(r.content()["status"], "error");
    assert_eq!(r.ename(), "KeyError");
    assert!(
        r.content()["evalue"]
            .as_str()
            .unwrap()
            .contains("frobnicate_request")
    );
    let r = sim.query("become_dask_request", json!({}));
    assert_eq!(
        (r.msg_type(), r.ename()),
        ("hub_error", "NotImplementedError")
    );
    assert_eq!(sim.connected_engines(), json!({"0": "e0"}));
}

#[test]
fn direct_request_to_an_unknown_engine_gets_an_error_reply() {
    let mut sim = Sim::with_engines(base_config(), 1);
    let m = sim.submit_direct("no-such-engine");
    let r = sim.take_one(Channel::MuxClient);
    assert_eq!(
        (r.ident(0).as_str(), r.ident(1).as_str()),
        (CLIENT, "no-such-engine")
    );
    assert_eq!(r.msg_type(), "apply_reply");
    assert_eq!(r.parent_id(), m);
    assert_eq!(r.ename(), "EngineError");
    assert!(
        r.content()["evalue"]
            .as_str()
            .unwrap()
            .contains("no-such-engine")
    );
    assert_eq!(r.md("status"), "error");
    assert!(sim.take(Channel::MuxEngine).is_empty());
    // Same for control.
    let c = sim.client_send(
        Channel::ControlClient,
        vec![b("ghost")],
        "clear_request",
        json!({}),
        json!({}),
        vec![],
    );
    let r = sim.take_one(Channel::ControlClient);
    assert_eq!(
        (r.msg_type(), r.parent_id(), r.ename()),
        ("clear_reply", c.as_str(), "EngineError")
    );
    // Known engines still work on both.
    let m2 = sim.submit_direct("e0");
    let fwd = sim.take_one(Channel::MuxEngine);
    assert_eq!(fwd.msg_id(), m2);
    sim.client_send(
        Channel::ControlClient,
        vec![b("e0")],
        "clear_request",
        json!({}),
        json!({}),
        vec![],
    );
    let ctl = sim.take_one(Channel::ControlEngine);
    assert_eq!(
        (ctl.ident(0).as_str(), ctl.ident(1).as_str()),
        ("e0", CLIENT)
    );
    sim.reply(Channel::ControlEngine, &ctl, "ok");
    let back = sim.take_one(Channel::ControlClient);
    assert_eq!(
        (
            back.ident(0).as_str(),
            back.ident(1).as_str(),
            back.msg_type()
        ),
        (CLIENT, "e0", "clear_reply")
    );
}

// ================================================================ 9. broadcast

#[test]
fn non_coalescing_broadcast_fans_out_and_relays_each_reply() {
    let mut sim = Sim::with_engines(base_config(), 2);
    let md =
        json!({"targets": [["e0", 0], ["e1", 1]], "is_broadcast": true, "is_coalescing": false});
    let orig = sim.client_send(
        Channel::BroadcastClient,
        vec![],
        "apply_request",
        json!({"x": 1}),
        md,
        vec![b("f")],
    );
    let fan = sim.take(Channel::BroadcastEngine);
    assert_eq!(fan.len(), 2);
    for (out, uuid) in fan.iter().zip(["e0", "e1"]) {
        assert_eq!(
            (out.ident(0).as_str(), out.ident(1).as_str()),
            (uuid, CLIENT)
        );
        assert_eq!(out.msg_id(), format!("{orig}_{uuid}"));
        assert_eq!(*out.md("original_msg_id"), json!(orig));
        assert_eq!(out.md("is_coalescing"), false);
        // The copies share one metadata frame with no target list (the
        // whole list in every copy made a broadcast to N engines O(N²) in
        // bytes; engines read only the flags).
        assert_eq!(*out.md("targets"), Value::Null);
        assert_eq!(out.content(), &json!({"x": 1}));
        assert_eq!(out.msg.buffers, vec![b("f")]);
        assert_eq!(
            out.msg.header.session, "client-session",
            "the client's header, new msg_id"
        );
    }
    // Replies arrive out of order and are relayed one by one, without the
    // engine's identity.
    for out in [&fan[1], &fan[0]] {
        let reply = sim.reply(Channel::BroadcastEngine, out, "ok");
        let r = sim.take_one(Channel::BroadcastClient);
        assert_eq!(r.idents, vec![b(CLIENT)]);
        assert_eq!(r.parent_id(), out.msg_id());
        assert_eq!(&r.frames[1..], &reply[2..], "relayed unchanged");
    }
    // They are recorded.
    let sub = format!("{orig}_e1");
    let rec = sim.result_request(&[&sub]);
    assert_eq!(rec.content()["completed"], json!([sub]));
    assert!(sim.hub.pending.is_empty());
}

#[test]
fn coalescing_broadcast_replies_once_with_buffers_in_target_order() {
    let mut sim = Sim::with_engines(base_config(), 3);
    let md = json!({"targets": [["e2", 2], ["e0", 0], ["e1", 1]], "is_broadcast": true, "is_coalescing": true});
    let orig = sim.client_send(
        Channel::BroadcastClient,
        vec![],
        "apply_request",
        json!({}),
        md,
        vec![],
    );
    let fan = sim.take(Channel::BroadcastEngine);
    let by_engine: HashMap<String, Out> = fan.into_iter().map(|o| (o.ident(0), o)).collect();
    assert_eq!(by_engine.len(), 3);
    let bufs = |e: &str| -> Vec<Bytes> {
        match e {
            "e0" => vec![b("e0-a"), b("e0-b")],
            "e1" => vec![],
            _ => vec![b("e2-a")],
        }
    };
    for e in ["e0", "e1"] {
        sim.reply_with(
            Channel::BroadcastEngine,
            &by_engine[e],
            "ok",
            json!({}),
            bufs(e),
        );
        assert!(
            sim.take(Channel::BroadcastClient).is_empty(),
            "waits for every target"
        );
    }
    sim.reply_with(
        Channel::BroadcastEngine,
        &by_engine["e2"],
        "ok",
        json!({}),
        bufs("e2"),
    );
    let r = sim.take_one(Channel::BroadcastClient);
    assert_eq!(r.idents, vec![b(CLIENT)]);
    assert_eq!(r.msg_type(), "apply_reply");
    assert_eq!(
        *r.md("broadcast_targets"),
        json!([["e2", 2], ["e0", 0], ["e1", 1]])
    );
    assert_eq!(*r.md("original_msg_id"), json!(orig));
    assert_eq!(
        r.msg.buffers,
        vec![b("e2-a"), b("e0-a"), b("e0-b")],
        "concatenated in target order"
    );
    sim.assert_quiet();
}

#[test]
fn broadcast_to_unknown_engines_is_refused() {
    let mut sim = Sim::with_engines(base_config(), 1);
    let md = json!({"targets": [["e0", 0], ["gone", 4]], "is_coalescing": false});
    let orig = sim.client_send(
        Channel::BroadcastClient,
        vec![],
        "apply_request",
        json!({}),
        md,
        vec![],
    );
    assert!(sim.take(Channel::BroadcastEngine).is_empty());
    let r = sim.take(Channel::BroadcastClient);
    assert_eq!(r.len(), 2, "one error per target so every future resolves");
    assert_eq!(r[1].parent_id(), format!("{orig}_gone"));
    assert_eq!(r[1].ename(), "EngineError");
    let md = json!({"targets": [["e0", 0], ["gone", 4]], "is_coalescing": true});
    sim.client_send(
        Channel::BroadcastClient,
        vec![],
        "apply_request",
        json!({}),
        md,
        vec![],
    );
    let r = sim.take_one(Channel::BroadcastClient);
    assert_eq!(*r.md("broadcast_targets"), json!([["e0", 0], ["gone", 4]]));
}

/// A hub with `leaves` broadcast leaves and `n` engines; a broadcast to all
/// of them, taken as the leaves' `FanOut`s (not expanded to frames).
fn tree_broadcast(leaves: usize, n: usize, coalescing: bool) -> (Sim, String, Vec<FanOut>) {
    let mut sim = Sim::with_engines(cfg_with(|c| c.broadcast_leaves = leaves), n);
    let targets: Vec<Value> = (0..n).map(|i| json!([format!("e{i}"), i])).collect();
    let md = json!({"targets": targets, "is_broadcast": true, "is_coalescing": coalescing});
    let (orig, frames) = sim.client_frames(
        vec![],
        "execute_request",
        json!({"code": "a=1"}),
        md,
        vec![],
    );
    sim.hub
        .handle_frames(Channel::BroadcastClient, frames, sim.now);
    let mut fans = Vec::new();
    while let Some(f) = sim.hub.poll_fanout() {
        fans.push(f);
    }
    (sim, orig, fans)
}

#[test]
fn broadcast_tree_splits_targets_by_engine_id_modulo_leaves() {
    let (_, orig, fans) = tree_broadcast(4, 10, false);
    let split: Vec<(usize, Vec<String>)> =
        fans.iter().map(|f| (f.leaf, f.targets.clone())).collect();
    let names = |ids: &[usize]| ids.iter().map(|i| format!("e{i}")).collect::<Vec<_>>();
    assert_eq!(
        split,
        vec![
            (0, names(&[0, 4, 8])),
            (1, names(&[1, 5, 9])),
            (2, names(&[2, 6])),
            (3, names(&[3, 7])),
        ],
        "engine i on leaf i % 4 (where ipengine connects), in target order"
    );
    for f in &fans {
        assert_eq!(f.original, orig);
        assert_eq!(f.client, b(CLIENT));
        // one metadata frame for every copy, with no target list
        let md: Value = serde_json::from_slice(&f.metadata).unwrap();
        assert_eq!(md["targets"], Value::Null);
        assert_eq!(md["original_msg_id"], json!(orig));
        assert_eq!(md["is_broadcast"], json!(true));
    }
    // A leaf with no engine among the targets gets nothing.
    let (_, _, fans) = tree_broadcast(8, 3, false);
    assert_eq!(
        fans.iter().map(|f| f.leaf).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
}

#[test]
fn broadcast_tree_routes_by_the_hubs_engine_id_not_the_clients() {
    let mut sim = Sim::with_engines(cfg_with(|c| c.broadcast_leaves = 2), 2);
    // A client with a stale table names e1 with id 4 (even): the copy must
    // still go to leaf 1, the only one e1 is connected to.
    let md = json!({"targets": [["e1", 4]], "is_broadcast": true, "is_coalescing": false});
    let (_, frames) = sim.client_frames(vec![], "execute_request", json!({}), md, vec![]);
    sim.hub
        .handle_frames(Channel::BroadcastClient, frames, sim.now);
    let f = sim.hub.poll_fanout().expect("a fan-out");
    assert_eq!((f.leaf, f.targets.clone()), (1, vec!["e1".to_string()]));
    assert!(sim.hub.poll_fanout().is_none());
}

#[test]
fn leaf_copies_share_their_frames_and_each_verifies() {
    let (_, orig, fans) = tree_broadcast(2, 4, false);
    let codec = LeafCodec::new(KEY, Limits::default());
    let copies = codec.frames(&fans[1]);
    assert_eq!(copies.len(), 2);
    let auth = Signer::new(KEY);
    for (frames, uuid) in copies.iter().zip(["e1", "e3"]) {
        let out = decode(frames);
        assert_eq!(out.idents, vec![b(uuid), b(CLIENT)]);
        assert_eq!(out.msg_id(), format!("{orig}_{uuid}"));
        assert_eq!(
            out.msg.header.session, "client-session",
            "the client's header"
        );
        assert_eq!(out.msg_type(), "execute_request");
        let raw = RawMessage::from_frames(frames.clone(), &Limits::default()).unwrap();
        assert!(auth.verify(&raw).unwrap().is_some(), "signed per copy");
    }
    // parent, metadata and content are the same bytes (not copies)
    for (a, b) in copies[0][5..8].iter().zip(&copies[1][5..8]) {
        assert_eq!(a.as_ptr(), b.as_ptr());
    }
}

#[test]
fn leaf_batches_complete_a_broadcast_across_leaves() {
    let (mut sim, orig, fans) = tree_broadcast(2, 4, true);
    let mut codec = LeafCodec::new(KEY, Limits::default());
    let mut batches: Vec<Vec<LeafReply>> = Vec::new();
    for f in &fans {
        let mut batch = Vec::new();
        for frames in codec.frames(f) {
            let req = decode(&frames);
            let id: usize = req.ident(0)[1..].parse().unwrap();
            let reply = sim.reply_frames(&req, "ok", json!({}), vec![b(&format!("r{id}"))]);
            batch.push(codec.reply(reply).expect("verifies"));
        }
        batches.push(batch);
    }
    // A forged or replayed reply is dropped by the leaf.
    let replayed = batches[0][0].raw.clone().into_frames();
    assert!(codec.reply(replayed).is_none(), "replay rejected");
    let mut forged = batches[0][0].raw.clone();
    forged.signature = b(&"0".repeat(64));
    assert!(
        codec.reply(forged.into_frames()).is_none(),
        "bad signature rejected"
    );

    let second = batches.pop().unwrap();
    sim.hub.handle_leaf_replies(batches.pop().unwrap(), sim.now);
    sim.pump();
    assert!(
        sim.take(Channel::BroadcastClient).is_empty(),
        "one leaf is not all"
    );
    sim.hub.handle_leaf_replies(second, sim.now);
    sim.pump();
    let r = sim.take_one(Channel::BroadcastClient);
    assert_eq!(*r.md("original_msg_id"), json!(orig));
    assert_eq!(
        *r.md("broadcast_targets"),
        json!([["e0", 0], ["e1", 1], ["e2", 2], ["e3", 3]])
    );
    assert_eq!(
        r.msg.buffers,
        vec![b("r0"), b("r1"), b("r2"), b("r3")],
        "buffers in target order, whatever the leaves' order"
    );
    assert!(sim.hub.pending.is_empty());
    let sub = format!("{orig}_e3");
    let rec = sim.result_request(&[&sub, &orig]);
    assert_eq!(rec.content()["pending"], json!([]));
}

#[test]
fn engine_death_mid_broadcast_fails_it_and_later_replies_are_harmless() {
    for coalescing in [false, true] {
        let (mut sim, orig, fans) = tree_broadcast(2, 4, coalescing);
        let signer = LeafCodec::new(KEY, Limits::default());
        let mut codec = signer.clone();
        // Leaf 0's engines (e0, e2) answer; e1 dies; e3 answers afterwards.
        let mut reply = |sim: &mut Sim, frames: Vec<Bytes>| {
            let req = decode(&frames);
            let r = sim.reply_frames(&req, "ok", json!({}), vec![]);
            codec.reply(r).unwrap()
        };
        let leaf0: Vec<LeafReply> = signer
            .frames(&fans[0])
            .into_iter()
            .map(|f| reply(&mut sim, f))
            .collect();
        sim.hub.handle_leaf_replies(leaf0, sim.now);
        sim.pump();
        let relayed = sim.take(Channel::BroadcastClient).len();
        assert_eq!(relayed, if coalescing { 0 } else { 2 });
        let leaf1 = signer.frames(&fans[1]);
        sim.unregister_request("e1");
        sim.advance(Duration::from_secs(5));
        assert!(!sim.hub.pending.contains(&orig), "the broadcast is settled");
        let sub = format!("{orig}_e1");
        let rec = sim.result_request(&[&sub]);
        assert_eq!(rec.content()["completed"], json!([sub]));
        assert_eq!(
            rec.content()[&sub]["result_content"]["ename"],
            json!("EngineError")
        );
        let late = reply(&mut sim, leaf1[1].clone());
        sim.hub.handle_leaf_replies(vec![late], sim.now);
        sim.pump();
        // A late non-coalescing reply is still relayed (its future is the
        // client's own); a coalescing one has nothing left to join.
        let relayed = sim.take(Channel::BroadcastClient).len();
        assert_eq!(relayed, if coalescing { 0 } else { 1 });
        assert!(sim.hub.pending.is_empty(), "{:?}", sim.hub.pending);
    }
}

// ================================================================== 10. queries

/// Run one task to completion on engine `e0` with result buffers `bufs`.
fn run_task(sim: &mut Sim, bufs: Vec<Bytes>) -> String {
    let t = sim.submit(json!({"label": "lbl"}));
    let s = sim.task_sent();
    sim.reply_with(Channel::TaskEngine, &s, "ok", json!({}), bufs);
    assert_eq!(sim.task_result().parent_id(), t);
    t
}

#[test]
fn result_request_pending_and_completed() {
    let mut sim = Sim::with_engines(base_config(), 1);
    let done = run_task(&mut sim, vec![b("r1"), b("r2")]);
    let running = sim.submit(json!({}));
    let s = sim.task_sent();

    let r = sim.result_request(&[&done, &running]);
    let c = r.content();
    assert_eq!(c["status"], "ok");
    assert_eq!(c["pending"], json!([running]));
    assert_eq!(c["completed"], json!([done]));
    let rec = &c[&done];
    assert_eq!(rec["header"]["msg_id"], json!(done));
    assert_eq!(rec["header"]["msg_type"], "apply_request");
    assert_eq!(rec["metadata"]["label"], "lbl");
    assert_eq!(rec["result_header"]["msg_type"], "apply_reply");
    assert_eq!(rec["result_content"], json!({"status": "ok"}));
    assert_eq!(rec["result_metadata"]["engine"], "e0");
    assert!(rec["received"].is_string());
    assert!(rec["io"].is_object());
    assert!(
        c.get(&running).is_none(),
        "no record content for pending ids"
    );
    assert_eq!(r.msg.buffers, vec![b("r1"), b("r2")]);

    let st = sim.query(
        "result_request",
        json!({"msg_ids": [done], "status_only": true}),
    );
    assert_eq!(st.content()["completed"], json!([done]));
    assert!(st.content().get(&done).is_none());
    assert!(st.msg.buffers.is_empty());

    let missing = sim.result_request(&["nope"]);
    assert_eq!(missing.content()["status"], "error");
    assert_eq!(missing.ename(), "KeyError");

    sim.reply(Channel::TaskEngine, &s, "ok");
    sim.task_result();
    assert_eq!(
        sim.result_request(&[&running]).content()["completed"],
        json!([running])
    );
}

#[test]
fn db_request_queries_and_buffers() {
    let mut sim = Sim::with_engines(base_config(), 1);
    let a = run_task(&mut sim, vec![b("ra")]);
    let b_id = run_task(&mut sim, vec![b("rb1"), b("rb2")]);
    let pending = sim.submit(json!({}));
    let _s = sim.task_sent();

    let r = sim.query(
        "db_request",
        json!({"query": {"msg_id": {"$in": [a, b_id, "zz"]}}, "keys": ["msg_id", "buffers", "completed"]}),
    );
    let c = r.content();
    assert_eq!(c["status"], "ok");
    let recs = c["records"].as_array().unwrap();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0]["msg_id"], json!(a));
    assert_eq!(recs[1]["msg_id"], json!(b_id));
    assert!(recs[0].get("header").is_none(), "projected onto the keys");
    assert_eq!(c["buffer_lens"], json!([2, 2]), "request buffers");
    assert_eq!(c["result_buffer_lens"], Value::Null);
    assert_eq!(
        r.msg.buffers,
        vec![
            b("pickled-f"),
            b("pickled-args"),
            b("pickled-f"),
            b("pickled-args")
        ]
    );

    let r = sim.query(
        "db_request",
        json!({"query": {"completed": {"$ne": null}}, "keys": ["result_buffers"]}),
    );
    let ids: Vec<&Value> = r.content()["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["msg_id"])
        .collect();
    assert_eq!(
        ids,
        vec![&json!(a), &json!(b_id)],
        "pending tasks are not completed"
    );
    assert_eq!(r.content()["result_buffer_lens"], json!([1, 2]));
    assert_eq!(r.content()["buffer_lens"], Value::Null);
    assert_eq!(r.msg.buffers, vec![b("ra"), b("rb1"), b("rb2")]);

    let r = sim.query(
        "db_request",
        json!({"query": {"completed": null}, "keys": ["msg_id"]}),
    );
    assert_eq!(r.content()["records"], json!([{"msg_id": pending}]));

    let r = sim.query(
        "db_request",
        json!({"query": {"msg_id": a}, "keys": ["nonexistent_key"]}),
    );
    assert_eq!(r.content()["status"], "error");
}

#[test]
fn purge_request_all_ids_and_pending() {
    let mut sim = Sim::with_engines(base_config(), 1);
    let a = run_task(&mut sim, vec![]);
    let b_id = run_task(&mut sim, vec![]);
    let c = run_task(&mut sim, vec![]);
    let pending = sim.submit(json!({}));
    let s = sim.task_sent();

    let r = sim.query("purge_request", json!({"msg_ids": [a, pending]}));
    assert_eq!(r.msg_type(), "purge_reply");
    assert_eq!(r.content()["status"], "error");
    assert_eq!(r.ename(), "IndexError");
    assert!(r.content()["evalue"].as_str().unwrap().contains(&pending));
    assert_eq!(
        sim.result_request(&[&a]).content()["completed"],
        json!([a]),
        "nothing purged"
    );

    let r = sim.query("purge_request", json!({"msg_ids": [a]}));
    assert_eq!(r.content(), &json!({"status": "ok"}));
    assert_eq!(sim.result_request(&[&a]).ename(), "KeyError");
    assert_eq!(
        sim.result_request(&[&b_id]).content()["completed"],
        json!([b_id])
    );

    let r = sim.query("purge_request", json!({"msg_ids": "all"}));
    assert_eq!(r.content(), &json!({"status": "ok"}));
    assert_eq!(sim.result_request(&[&c]).ename(), "KeyError");
    let h = sim.query("history_request", json!({}));
    assert_eq!(
        h.content()["history"],
        json!([pending]),
        "the pending task survives 'all'"
    );

    sim.reply(Channel::TaskEngine, &s, "ok");
    sim.task_result();
    let r = sim.query("purge_request", json!({"msg_ids": [], "engine_ids": [0]}));
    assert_eq!(r.content()["status"], "ok");
    assert_eq!(
        sim.query("history_request", json!({})).content()["history"],
        json!([])
    );
    let r = sim.query("purge_request", json!({"engine_ids": [42]}));
    assert_eq!(r.ename(), "IndexError");
}

#[test]
fn resubmit_request_reruns_under_a_new_id() {
    let mut sim = Sim::with_engines(base_config(), 1);
    let old = run_task(&mut sim, vec![b("first-result")]);
    let r = sim.query("resubmit_request", json!({"msg_ids": [old]}));
    assert_eq!(r.msg_type(), "resubmit_reply");
    assert_eq!(r.content()["status"], "ok");
    let new = r.content()["resubmitted"][&old]
        .as_str()
        .expect("old → new")
        .to_owned();
    assert_ne!(new, old);
    assert!(
        new.starts_with("hub-session_4242_"),
        "the hub's session names the new id: {new}"
    );

    let s = sim.task_sent_any_client();
    assert_eq!(s.msg_id(), new);
    assert_eq!(s.ident(0), "e0");
    assert_eq!(s.msg_type(), "apply_request");
    assert_eq!(
        s.msg.header.session, "client-session",
        "the original header is kept"
    );
    assert_eq!(s.msg.parent_msg_id(), Some(old.as_str()));
    assert_eq!(s.msg.buffers, vec![b("pickled-f"), b("pickled-args")]);

    let rec = sim.query(
        "db_request",
        json!({"query": {"msg_id": old}, "keys": ["resubmitted"]}),
    );
    assert_eq!(rec.content()["records"][0]["resubmitted"], json!(new));
    assert_eq!(
        sim.result_request(&[&new]).content()["pending"],
        json!([new])
    );

    // The engine's reply is recorded, not relayed to anyone.
    sim.reply_with(
        Channel::TaskEngine,
        &s,
        "ok",
        json!({}),
        vec![b("second-result")],
    );
    assert!(sim.take(Channel::TaskClient).is_empty());
    let r = sim.result_request(&[&new]);
    assert_eq!(r.content()["completed"], json!([new]));
    assert_eq!(r.msg.buffers, vec![b("second-result")]);

    let r = sim.query("resubmit_request", json!({"msg_ids": ["unknown"]}));
    assert_eq!(
        (r.content()["status"].as_str(), r.ename()),
        (Some("error"), "KeyError")
    );
}

impl Sim {
    /// A task sent to an engine by anyone (the hub resubmits as itself).
    fn task_sent_any_client(&mut self) -> Out {
        let mut v = self.take(Channel::TaskEngine);
        assert_eq!(v.len(), 1);
        v.pop().unwrap()
    }
}

#[test]
fn history_request_lists_submissions_in_order() {
    let mut sim = Sim::with_engines(base_config(), 1);
    let a = run_task(&mut sim, vec![]);
    sim.advance(Duration::from_millis(10));
    let b_id = run_task(&mut sim, vec![]);
    sim.advance(Duration::from_millis(10));
    let d = sim.submit_direct("e0");
    let h = sim.query("history_request", json!({}));
    assert_eq!(h.msg_type(), "history_reply");
    assert_eq!(
        h.content(),
        &json!({"status": "ok", "history": [a, b_id, d]})
    );
}

#[test]
fn shutdown_request_replies_notifies_and_raises_the_event() {
    let mut sim = Sim::with_engines(base_config(), 1);
    assert_eq!(sim.hub.poll_event(), None);
    let r = sim.query("shutdown_request", json!({}));
    assert_eq!(r.msg_type(), "shutdown_reply");
    assert_eq!(r.content(), &json!({"status": "ok"}));
    let n = sim.take_one(Channel::Notification);
    assert_eq!(n.msg_type(), "shutdown_notification");
    assert!(n.idents.is_empty(), "PUB messages have no routing identity");
    assert_eq!(sim.hub.poll_event(), Some(HubEvent::Shutdown));
    assert_eq!(sim.hub.poll_event(), None);
}

// ==================================================================== 11. iopub

#[test]
fn iopub_is_relayed_unchanged_and_recorded() {
    let mut sim = Sim::with_engines(base_config(), 1);
    let t = sim.submit(json!({}));
    let s = sim.task_sent();
    let mut sent = Vec::new();
    sent.push(sim.iopub("e0", "status", json!({"execution_state": "busy"}), &s));
    sent.push(sim.iopub(
        "e0",
        "execute_input",
        json!({"code": "print('hi')", "execution_count": 1}),
        &s,
    ));
    sent.push(sim.iopub(
        "e0",
        "stream",
        json!({"name": "stdout", "text": "hello "}),
        &s,
    ));
    sent.push(sim.iopub(
        "e0",
        "stream",
        json!({"name": "stderr", "text": "oops\n"}),
        &s,
    ));
    sent.push(sim.iopub(
        "e0",
        "stream",
        json!({"name": "stdout", "text": "world\n"}),
        &s,
    ));
    let err = json!({"ename": "ValueError", "evalue": "bad", "traceback": ["tb"]});
    sent.push(sim.iopub("e0", "error", err.clone(), &s));
    sent.push(sim.iopub(
        "e0",
        "display_data",
        json!({"data": {"text/plain": "x"}, "metadata": {}}),
        &s,
    ));
    sent.push(sim.iopub("e0", "status", json!({"execution_state": "idle"}), &s));
    let relayed = sim.take_raw(Channel::IopubClient);
    assert_eq!(
        relayed.iter().map(|t| t.frames.clone()).collect::<Vec<_>>(),
        sent,
        "unchanged, in order"
    );

    // Recorded while pending and after completion.
    let db = sim.query(
        "db_request",
        json!({"query": {"msg_id": t}, "keys": ["stdout", "stderr", "execute_input", "error"]}),
    );
    let rec = &db.content()["records"][0];
    assert_eq!(rec["stdout"], "hello world\n");
    assert_eq!(rec["stderr"], "oops\n");
    assert_eq!(rec["execute_input"], "print('hi')");
    assert_eq!(rec["error"], err);
    sim.reply(Channel::TaskEngine, &s, "ok");
    sim.task_result();
    let r = sim.result_request(&[&t]);
    let io = &r.content()[&t]["io"];
    assert_eq!(io["stdout"], "hello world\n");
    assert_eq!(io["stderr"], "oops\n");
    assert_eq!(io["execute_input"], "print('hi')");
    assert_eq!(io["error"], err);
}

#[test]
fn iopub_shutdown_reply_unregisters_the_engine() {
    let mut sim = Sim::with_engines(base_config(), 2);
    let t = sim.submit(json!({}));
    let s = sim.task_sent();
    let engine = s.ident(0);
    sim.iopub(
        &engine,
        "shutdown_reply",
        json!({"status": "ok", "restart": false}),
        &s,
    );
    assert_eq!(sim.take(Channel::IopubClient).len(), 1, "relayed too");
    let n = sim.take_one(Channel::Notification);
    assert_eq!(n.msg_type(), "unregistration_notification");
    assert_eq!(n.content()["uuid"], json!(engine));
    assert_eq!(sim.hub.engine_ids().len(), 1);
    // Its task is stranded like any other.
    sim.advance(Duration::from_secs(2));
    let r = sim.task_result();
    assert_eq!((r.parent_id(), r.ename()), (t.as_str(), "EngineError"));
}

// ============================================================ 12. memory bound

impl Sim {
    /// Bulk fast path: submit a task without decoding anything.
    fn quick_submit(&mut self, metadata: &Value) -> String {
        let now = self.now;
        let header = self
            .client
            .session
            .header("apply_request", &format_date(now.wall));
        let frames = self.client.session.serialize_frames(
            vec![self.client.ident.clone()],
            Bytes::from(serde_json::to_vec(&header).unwrap()),
            Bytes::from_static(b"{}"),
            Bytes::from(serde_json::to_vec(metadata).unwrap()),
            Bytes::from_static(b"{}"),
            vec![],
        );
        self.feed(Channel::TaskClient, frames);
        header.msg_id
    }

    /// Bulk fast path: the engine that got the raw task `req` answers "ok",
    /// using the request's header frame as the reply's parent.
    fn quick_reply(&mut self, req: &Transmit) {
        let f = &req.frames;
        let delim = f
            .iter()
            .position(|x| x.as_ref() == DELIMITER)
            .expect("delimiter");
        let uuid = String::from_utf8(f[0].to_vec()).unwrap();
        let now = self.now;
        let e = self.engine(&uuid);
        let header = e.peer.session.header("apply_reply", &format_date(now.wall));
        let md = json!({"status": "ok", "engine": uuid, "dependencies_met": true});
        let frames = e.peer.session.serialize_frames(
            vec![f[0].clone(), f[1].clone()],
            Bytes::from(serde_json::to_vec(&header).unwrap()),
            f[delim + 2].clone(),
            Bytes::from(serde_json::to_vec(&md).unwrap()),
            Bytes::from_static(br#"{"status":"ok"}"#),
            vec![],
        );
        self.feed(Channel::TaskEngine, frames);
    }

    fn quick_result_count(&mut self) -> usize {
        let r = self.take_raw(Channel::TaskClient);
        assert!(r.iter().all(|t| t.frames[0] == b(CLIENT)));
        r.len()
    }

    /// Everything that must not grow with the number of tasks run.
    #[track_caller]
    fn assert_bounded(&self, record_limit: usize, dependency_history: usize) {
        let hub = &self.hub;
        assert!(
            hub.record_count() <= record_limit,
            "records: {}",
            hub.record_count()
        );
        assert!(
            hub.pending.len() <= 2 && hub.unassigned.len() <= 2,
            "pending {}",
            hub.pending.len()
        );
        let (waiting, running) = hub.task_counts();
        assert!(
            waiting <= 2 && running <= 2,
            "waiting {waiting} running {running}"
        );
        let [queue, graph, done, work] = hub.tasks.footprint();
        assert!(
            queue <= 2 * waiting + 65,
            "stale entries pile up in the waiting queue: {queue}"
        );
        assert!(graph <= 2, "graph {graph}");
        assert!(done <= dependency_history, "done {done}");
        assert_eq!(work, 0);
        for e in hub.engines.values() {
            assert!(e.completed.len() <= 1024);
            assert!(e.queue.len() + e.tasks.len() <= 2);
        }
        assert!(self.outbox.is_empty());
    }
}

#[test]
fn memory_stays_bounded_over_50k_tasks() {
    let (limit, history) = (200, 500);
    let mut sim = Sim::with_engines(
        cfg_with(|c| {
            c.db = DbBackend::Dict(DbLimits {
                record_limit: limit,
                ..DbLimits::default()
            });
            c.dependency_history = history;
        }),
        1,
    );
    let mut first = None;
    let mut prev: Option<String> = None;
    for i in 0..50_000u32 {
        // Every tenth task depends on the one before (already done).
        let md = match (&prev, i % 10) {
            (Some(p), 0) => json!({"after": [p], "timeout": 10.0}),
            _ => json!({}),
        };
        let t = sim.quick_submit(&md);
        first.get_or_insert_with(|| t.clone());
        let sent = sim.take_raw(Channel::TaskEngine);
        assert_eq!(sent.len(), 1);
        if i % 5 == 0 {
            let s = decode(&sent[0].frames);
            sim.iopub("e0", "stream", json!({"name": "stdout", "text": "x"}), &s);
            sim.take_raw(Channel::IopubClient);
        }
        sim.quick_reply(&sent[0]);
        assert_eq!(sim.quick_result_count(), 1);
        prev = Some(t);
        if i % 1000 == 999 {
            sim.advance(Duration::from_secs(1)); // heartbeats keep going
            sim.assert_bounded(limit, history);
        }
    }
    assert_eq!(sim.hub.engines[&0].completed_count, 50_000);
    assert!(
        !sim.hub.tasks.is_done(&first.unwrap()),
        "the dependency history forgets old tasks"
    );
    assert!(sim.hub.db.size_bytes() < 10 * 1024 * 1024);
    let last = prev.unwrap();
    let r = sim.result_request(&[&last]);
    assert_eq!(r.content()["completed"], json!([last]));
}

#[test]
fn memory_stays_bounded_with_waiting_tasks_and_no_hwm() {
    // Each task waits for the previous one, still running: every task goes
    // through the waiting queue and the dependency graph.
    let (limit, history) = (100, 300);
    let mut sim = Sim::with_engines(
        cfg_with(|c| {
            c.db = DbBackend::Dict(DbLimits {
                record_limit: limit,
                ..DbLimits::default()
            });
            c.dependency_history = history;
            c.hwm = 0;
        }),
        2,
    );
    let mut prev = sim.quick_submit(&json!({}));
    let mut running = sim.take_raw(Channel::TaskEngine);
    for i in 0..20_000u32 {
        let t = sim.quick_submit(&json!({"after": [prev]}));
        assert!(
            sim.take_raw(Channel::TaskEngine).is_empty(),
            "waits for its dependency"
        );
        sim.quick_reply(&running[0]);
        assert_eq!(sim.quick_result_count(), 1);
        running = sim.take_raw(Channel::TaskEngine);
        assert_eq!(running.len(), 1, "runs once the dependency is done");
        prev = t;
        if i % 1000 == 999 {
            sim.advance(Duration::from_secs(1));
            sim.assert_bounded(limit, history);
        }
    }
}

#[test]
fn memory_stays_bounded_when_submissions_outrun_the_record_limit() {
    // With no hwm, a big map is submitted (and culled from the DB) before
    // the engine prints anything for its first tasks: output for culled
    // tasks must not resurrect their records outside the limit.
    let limit = 100;
    let mut sim = Sim::with_engines(
        cfg_with(|c| {
            c.db = DbBackend::Dict(DbLimits {
                record_limit: limit,
                ..DbLimits::default()
            });
            c.hwm = 0;
        }),
        1,
    );
    for _ in 0..1000 {
        sim.submit(json!({}));
    }
    let sent = sim.tasks_sent();
    assert_eq!(sent.len(), 1000);
    assert!(sim.hub.record_count() <= limit);
    for s in &sent {
        sim.iopub("e0", "execute_input", json!({"code": "f()"}), s);
        sim.iopub("e0", "stream", json!({"name": "stdout", "text": "out"}), s);
        sim.iopub(
            "e0",
            "error",
            json!({"ename": "E", "evalue": "", "traceback": []}),
            s,
        );
        sim.reply(Channel::TaskEngine, s, "ok");
        sim.take_raw(Channel::IopubClient);
        sim.task_result();
        assert!(
            sim.hub.record_count() <= limit,
            "records: {}",
            sim.hub.record_count()
        );
    }
    // The most recent tasks are fully recorded.
    let last = sent.last().unwrap().msg_id();
    let r = sim.result_request(&[last]);
    assert_eq!(r.content()[last]["io"]["stdout"], "out");
    assert_eq!(r.content()[last]["io"]["execute_input"], "f()");
}

#[test]
fn broadcasts_stranded_on_a_dead_engine_are_recorded_as_engine_error() {
    let mut sim = Sim::with_engines(base_config(), 2);
    let md =
        json!({"targets": [["e0", 0], ["e1", 1]], "is_broadcast": true, "is_coalescing": false});
    let orig = sim.client_send(
        Channel::BroadcastClient,
        vec![],
        "apply_request",
        json!({}),
        md,
        vec![],
    );
    let fan = sim.take(Channel::BroadcastEngine);
    assert_eq!(fan.len(), 2);
    // Broadcast sub-requests count in the engines' queues while outstanding.
    assert_eq!(sim.queue_status(false)["0"]["queue"], 1);
    sim.reply(Channel::BroadcastEngine, &fan[1], "ok");
    sim.take_one(Channel::BroadcastClient);
    assert_eq!(sim.queue_status(false)["1"]["queue"], 0);
    sim.unregister_request("e0");
    sim.take_one(Channel::Notification);
    sim.advance(Duration::from_secs(2));
    let sub = format!("{orig}_e0");
    let r = sim.result_request(&[&sub]);
    assert_eq!(r.content()["completed"], json!([sub]));
    assert_eq!(r.content()[&sub]["result_content"]["ename"], "EngineError");
    // Purging it is allowed now that it is no longer pending.
    let p = sim.query("purge_request", json!({"msg_ids": [sub]}));
    assert_eq!(p.content()["status"], "ok");
}

#[test]
fn broadcast_request_is_recorded_and_completes_with_the_last_reply() {
    for coalescing in [false, true] {
        let mut sim = Sim::with_engines(base_config(), 2);
        let md = json!({"targets": [["e0", 0], ["e1", 1]], "is_broadcast": true,
                        "is_coalescing": coalescing});
        let orig = sim.client_send(
            Channel::BroadcastClient,
            vec![],
            "apply_request",
            json!({}),
            md,
            vec![],
        );
        let fan = sim.take(Channel::BroadcastEngine);
        let r = sim.result_request(&[&orig]);
        assert_eq!(
            r.content()["pending"],
            json!([orig]),
            "coalescing={coalescing}"
        );
        sim.reply(Channel::BroadcastEngine, &fan[0], "ok");
        assert_eq!(
            sim.result_request(&[&orig]).content()["pending"],
            json!([orig])
        );
        sim.reply(Channel::BroadcastEngine, &fan[1], "ok");
        let r = sim.result_request(&[&orig]);
        assert_eq!(
            r.content()["completed"],
            json!([orig]),
            "coalescing={coalescing}"
        );
        assert_eq!(r.content()[&orig]["header"]["msg_type"], "apply_request");
        assert_eq!(
            r.content()[&orig]["result_metadata"]["broadcast_targets"],
            json!([["e0", 0], ["e1", 1]])
        );
        let hist = sim.query("history_request", json!({}));
        assert!(
            hist.content()["history"]
                .as_array()
                .unwrap()
                .contains(&json!(orig))
        );
    }
}

// ======================================================= 13. restart (restore)

/// The hub dies with one task done, one task and one direct request on
/// engines, and one task still queued; a new hub restores the engine table
/// on the same task database.
#[test]
fn restore_brings_back_engines_and_settles_orphans() {
    let cfg = cfg_with(|c| c.orphan_grace = Duration::from_secs(10));
    let mut sim = Sim::with_engines(cfg.clone(), 2);
    let (v0, _) = sim.hub.engine_state();
    let done = sim.submit(json!({}));
    let t_done = sim.task_sent();
    sim.reply(Channel::TaskEngine, &t_done, "ok");
    sim.task_result();
    let running = sim.submit(json!({}));
    let t_running = sim.task_sent();
    let lost = sim.submit(json!({}));
    let t_lost = sim.task_sent();
    assert_ne!(t_running.ident(0), t_lost.ident(0), "one task per engine");
    let direct = sim.submit_direct("e1");
    let d_req = sim.take_one(Channel::MuxEngine);
    let queued = sim.submit(json!({}));
    assert!(sim.tasks_sent().is_empty(), "hwm 1: the fourth task waits");
    let (v1, state) = sim.hub.engine_state();
    assert_eq!(v1, v0, "no engine came or went");
    assert_eq!(state.pairs(), vec![(0, "e0".into()), (1, "e1".into())]);
    assert_eq!(state.next_id, 2);

    // kill: the records stay (the store outlives the hub), the rest is gone
    let db = std::mem::replace(
        &mut sim.hub.db,
        Box::new(crate::records::RecordStore::new(DbBackend::None)),
    );
    let now = sim.now;
    sim.hub = Hub::with_store(cfg, db, now);
    sim.outbox.clear();
    let restored = sim.hub.restore(&state, now);
    assert_eq!(restored.engines, 2);
    assert_eq!(restored.orphans, 4, "running, lost, direct and queued");
    sim.pump();
    assert_eq!(sim.take(Channel::Notification).len(), 2);
    assert_eq!(sim.connected_engines(), json!({"0": "e0", "1": "e1"}));
    assert_eq!(sim.hub.engine_state().1, state, "the table is the same");

    // completed before the kill: served from the database
    let r = sim.result_request(&[&done]);
    assert_eq!(r.content()["completed"], json!([done]));
    // in flight: pending until answered or expired
    let r = sim.result_request(&[&running, &lost, &direct, &queued]);
    assert_eq!(r.content()["pending"].as_array().unwrap().len(), 4);

    // the engine finished a task while the hub was away: relayed, recorded
    sim.reply(Channel::TaskEngine, &t_running, "ok");
    let res = sim.task_result();
    assert_eq!(res.parent_id(), running);
    sim.reply(Channel::MuxEngine, &d_req, "ok");
    assert_eq!(sim.take_one(Channel::MuxClient).parent_id(), direct);
    let r = sim.result_request(&[&running, &direct]);
    assert_eq!(r.content()["completed"].as_array().unwrap().len(), 2);

    // new work runs on the restored engines; a new engine gets a new id
    let fresh = sim.submit(json!({}));
    let t_fresh = sim.task_sent();
    assert_eq!(t_fresh.parent_id(), "");
    sim.reply(Channel::TaskEngine, &t_fresh, "ok");
    assert_eq!(sim.task_result().parent_id(), fresh);
    assert_eq!(sim.add_engine("e2"), 2, "ids are never reused");
    assert_ne!(
        sim.hub.engine_state().0,
        v1,
        "a registration changes the table"
    );

    // the rest fail after the grace period, with a reply to the client's
    // session (a client whose routing identity is its session id, as the
    // kernel's, gets it)
    sim.advance(Duration::from_secs(11));
    let mut failed: Vec<String> = sim
        .take(Channel::TaskClient)
        .iter()
        .map(|o| {
            assert_eq!(o.ident(0), "client-session");
            assert_eq!(o.ename(), "HubRestartError");
            assert_eq!(o.md("status"), "error");
            o.parent_id().to_owned()
        })
        .collect();
    failed.sort();
    let mut want = vec![lost.clone(), queued.clone()];
    want.sort();
    assert_eq!(failed, want);
    let r = sim.result_request(&[&lost, &queued]);
    assert_eq!(r.content()["completed"].as_array().unwrap().len(), 2);
    assert_eq!(
        r.content()[&lost]["result_content"]["ename"],
        "HubRestartError",
        "{r:#?}"
    );
    // a late reply to a failed orphan does not disturb the hub
    sim.reply(Channel::TaskEngine, &t_lost, "ok");
    assert_eq!(sim.connected_engines().as_object().unwrap().len(), 3);
}

/// Restored engines that never beat again are unregistered like any other.
#[test]
fn restored_engines_that_stay_silent_are_unregistered() {
    let mut sim = Sim::new(base_config());
    let mut state = crate::restore::EngineState {
        next_id: 5,
        ..Default::default()
    };
    state.engines.insert("3".into(), "gone".into());
    let now = sim.now;
    sim.hub.restore(&state, now);
    sim.pump();
    assert_eq!(sim.connected_engines(), json!({"3": "gone"}));
    sim.advance(Duration::from_secs(6));
    let notes = sim.take(Channel::Notification);
    assert!(
        notes
            .iter()
            .any(|n| n.msg_type() == "unregistration_notification" && n.content()["id"] == 3),
        "{notes:#?}"
    );
    assert_eq!(sim.connected_engines(), json!({}));
    assert_eq!(sim.add_engine("new"), 5);
}
