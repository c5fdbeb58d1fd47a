//! The client side of the hub's protocol (what ipyparallel's `Client` does):
//! query (registration), mux, control, iopub and notification sockets.
//!
//! One receive task per socket verifies every message on the raw frames,
//! decodes it and routes it by its parent's msg_id to whoever registered
//! interest ([`HubClient::listen`]); one send task per DEALER drains a queue.
//! Registration notifications keep the engine table current. Nothing here
//! knows about cells or output formats.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use chrono::Utc;
use parallax_wire::connection::ClientConnectionInfo;
use parallax_wire::{Authenticator, Limits, Message, RawMessage, Session, Signer, format_date};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, warn};
use zeromq::SocketRecv;

/// The hub channels a client talks on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Chan {
    Query,
    Mux,
    Control,
    /// The task (load-balancing) scheduler.
    Task,
    /// The broadcast scheduler: one request, fanned out by the hub.
    Broadcast,
    Iopub,
    Notification,
}

/// A message routed to a listener.
#[derive(Debug)]
pub enum ClientEvent {
    /// A reply on query, mux or control.
    Reply(Chan, Message),
    /// An iopub message whose parent is the listened-for request.
    Iopub(Message),
}

pub(crate) struct Inner {
    session: Mutex<Session>,
    /// To the link's supervisor ([`crate::client_link`]), which sends on the
    /// current generation's sockets.
    send: mpsc::UnboundedSender<(Chan, Vec<Bytes>)>,
    /// parent msg_id → listener. Entries are removed by `forget` (or when
    /// the listener's receiver is dropped and a message finds it closed).
    listeners: Mutex<HashMap<String, mpsc::UnboundedSender<ClientEvent>>>,
    engines: Mutex<BTreeMap<i64, String>>,
    /// Notifications received while a `connection_request` is in flight,
    /// replayed over its reply: the reply and the notifications travel on
    /// different sockets, so a registration notified after the hub built the
    /// reply may be read before it — and a reply that simply replaced the
    /// table would lose that engine for good. `None`: no refresh running.
    /// Lock order: `engines`, then `journal`.
    journal: Mutex<Option<Vec<EngineChange>>>,
    /// One refresh at a time (each owns the journal while it runs).
    refreshing: tokio::sync::Mutex<()>,
    changes: watch::Sender<u64>,
    /// Whether the hub is connected (false while the link reconnects).
    connected: watch::Sender<bool>,
    /// How many times the link connected (1 after the first).
    generation: std::sync::atomic::AtomicU64,
    /// The hub is being stopped on purpose ([`HubClient::close`]): losing it
    /// ends the link quietly instead of warning and waiting for it.
    closing: std::sync::atomic::AtomicBool,
    info: ClientConnectionInfo,
}

impl Inner {
    pub(crate) fn set_connected(&self, yes: bool) {
        self.connected
            .send_if_modified(|v| std::mem::replace(v, yes) != yes);
    }

    /// Whether [`HubClient::close`] was called.
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Count a new generation; returns how many there were before.
    pub(crate) fn generation_bump(&self) -> u64 {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    }
}

/// Forgets a request's listener when dropped.
struct Forget<'a>(&'a HubClient, &'a str);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.forget(self.1);
    }
}

/// A connection to a hub. Cheap to clone; the sockets close when the last
/// clone is dropped (the tasks end when their queues close).
#[derive(Clone)]
pub struct HubClient {
    inner: Arc<Inner>,
    /// Aborts the socket tasks when the last clone goes.
    _tasks: Arc<Tasks>,
}

struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

fn now_str() -> String {
    format_date(Utc::now())
}

impl HubClient {
    /// Connect using a client connection file (`ipcontroller-client.json`).
    pub async fn connect_file(path: &Path) -> Result<HubClient> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading connection file {}", path.display()))?;
        let info: ClientConnectionInfo = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a client connection file (ipcontroller-client.json)",
                path.display()
            )
        })?;
        Self::connect(info).await
    }

    pub async fn connect(info: ClientConnectionInfo) -> Result<HubClient> {
        let session_id = uuid::Uuid::new_v4().to_string();
        let signer = Signer::new(info.key.as_bytes());
        let session = Session::new(
            signer.clone(),
            session_id.clone(),
            std::env::var("USER").unwrap_or_else(|_| "parallax".into()),
            std::process::id(),
        );
        let host = info
            .interface
            .strip_prefix("tcp://")
            .unwrap_or(&info.interface)
            .to_owned();
        // A client bound to 0.0.0.0/* connects through loopback.
        let host = if host == "*" || host == "0.0.0.0" {
            "127.0.0.1".to_owned()
        } else {
            host
        };
        let ep = crate::client_link::Endpoints {
            host,
            session_id: session_id.clone(),
            registration: info.registration,
            mux: info.mux,
            control: info.control,
            task: info.task,
            broadcast: info.broadcast,
            iopub: info.iopub,
            notification: info.notification,
        };
        let first = crate::client_link::connect(&ep).await?;
        let (changes, _) = watch::channel(0u64);
        let (connected, _) = watch::channel(true);
        let (send, queue) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            session: Mutex::new(session),
            send,
            listeners: Mutex::new(HashMap::new()),
            engines: Mutex::new(BTreeMap::new()),
            journal: Mutex::new(None),
            refreshing: tokio::sync::Mutex::new(()),
            changes,
            connected,
            generation: std::sync::atomic::AtomicU64::new(0),
            closing: std::sync::atomic::AtomicBool::new(false),
            info,
        });
        let handles = vec![tokio::spawn(crate::client_link::supervise(
            ep,
            Arc::downgrade(&inner),
            signer,
            queue,
            first,
        ))];
        let client = HubClient {
            inner,
            _tasks: Arc::new(Tasks(handles)),
        };
        client.refresh_engines().await?;
        Ok(client)
    }

    pub fn info(&self) -> &ClientConnectionInfo {
        &self.inner.info
    }

    /// Say that the hub is about to be stopped on purpose (the kernel's own
    /// cluster at shutdown, or when `%cluster connect` replaces it): when
    /// its sockets go, the link ends without the "lost the connection"
    /// warning and without waiting for the hub to come back.
    pub fn close(&self) {
        self.inner
            .closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// A handle on `inner` that does not own the link task (for the link's
    /// own refresh after reconnecting).
    pub(crate) fn detached(inner: Arc<Inner>) -> HubClient {
        HubClient {
            inner,
            _tasks: Arc::new(Tasks(Vec::new())),
        }
    }

    /// Whether the hub is connected now; changes when the link loses it or
    /// reconnects ([`crate::client_link`]).
    pub fn watch_connected(&self) -> watch::Receiver<bool> {
        self.inner.connected.subscribe()
    }

    /// How many times the link has reconnected to the hub since it started.
    pub fn reconnects(&self) -> u64 {
        self.inner
            .generation
            .load(std::sync::atomic::Ordering::SeqCst)
            .saturating_sub(1)
    }

    /// Registered engines: id → uuid, sorted by id.
    pub fn engines(&self) -> BTreeMap<i64, String> {
        self.inner.engines.lock().expect("engines").clone()
    }

    pub fn ids(&self) -> Vec<i64> {
        self.inner
            .engines
            .lock()
            .expect("engines")
            .keys()
            .copied()
            .collect()
    }

    /// A receiver that changes whenever an engine registers or unregisters.
    pub fn watch_engines(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Ask the hub for the engine table (`connection_request`).
    /// Notifications that arrive meanwhile are replayed over the reply, so
    /// no registration is lost to the race between the two sockets.
    pub async fn refresh_engines(&self) -> Result<()> {
        let _one = self.inner.refreshing.lock().await;
        *self.inner.journal.lock().expect("journal") = Some(Vec::new());
        let reply = self
            .request(Chan::Query, "connection_request", json!({}), None)
            .await;
        let mut engines = self.inner.engines.lock().expect("engines");
        let journal = self.inner.journal.lock().expect("journal").take();
        let reply = reply?;
        let mut table = BTreeMap::new();
        if let Some(m) = reply.content.get("engines").and_then(Value::as_object) {
            for (k, v) in m {
                if let (Ok(id), Some(uuid)) = (k.parse::<i64>(), v.as_str()) {
                    table.insert(id, uuid.to_owned());
                }
            }
        }
        for change in journal.unwrap_or_default() {
            change.apply(&mut table);
        }
        *engines = table;
        drop(engines);
        self.inner.changes.send_modify(|v| *v += 1);
        Ok(())
    }

    /// Build, sign and queue a message; returns its msg_id. `listen` first
    /// (with [`HubClient::listen`]) if you want what comes back.
    pub fn send(
        &self,
        ch: Chan,
        ident: Option<&str>,
        msg_type: &str,
        content: Value,
        metadata: Value,
    ) -> Result<String> {
        let (msg_id, frames) = self.build(ident, msg_type, content, metadata);
        self.send_frames(ch, frames)?;
        Ok(msg_id)
    }

    fn build(
        &self,
        ident: Option<&str>,
        msg_type: &str,
        content: Value,
        metadata: Value,
    ) -> (String, Vec<Bytes>) {
        let mut s = self.inner.session.lock().expect("session");
        let h = s.header(msg_type, &now_str());
        let idents = ident
            .map(|i| vec![Bytes::copy_from_slice(i.as_bytes())])
            .unwrap_or_default();
        let frames = s.serialize(idents, &h, &json!({}), &metadata, &content, vec![]);
        (h.msg_id, frames)
    }

    fn send_frames(&self, ch: Chan, frames: Vec<Bytes>) -> Result<()> {
        if matches!(ch, Chan::Iopub | Chan::Notification) {
            bail!("cannot send on {ch:?}");
        }
        self.inner
            .send
            .send((ch, frames))
            .map_err(|_| anyhow!("the connection to the hub is closed"))
    }

    /// Send a message and route everything whose parent is it to the
    /// returned receiver, until [`HubClient::forget`].
    pub fn send_and_listen(
        &self,
        ch: Chan,
        ident: Option<&str>,
        msg_type: &str,
        content: Value,
        metadata: Value,
    ) -> Result<(String, mpsc::UnboundedReceiver<ClientEvent>)> {
        let (msg_id, frames) = self.build(ident, msg_type, content, metadata);
        let (tx, rx) = mpsc::unbounded_channel();
        self.listen(&msg_id, tx);
        self.send_frames(ch, frames)?;
        Ok((msg_id, rx))
    }

    /// Like [`HubClient::send_to`], with request metadata (the task
    /// scheduler reads `targets`, `after`, `retries` … from it).
    pub fn send_with(
        &self,
        ch: Chan,
        ident: Option<&str>,
        msg_type: &str,
        content: Value,
        metadata: Value,
        tx: &mpsc::UnboundedSender<ClientEvent>,
    ) -> Result<String> {
        let (msg_id, frames) = self.build(ident, msg_type, content, metadata);
        self.listen(&msg_id, tx.clone());
        self.send_frames(ch, frames)?;
        Ok(msg_id)
    }

    /// Send a message whose replies and iopub go to an existing listener.
    pub fn send_to(
        &self,
        ch: Chan,
        ident: Option<&str>,
        msg_type: &str,
        content: Value,
        tx: &mpsc::UnboundedSender<ClientEvent>,
    ) -> Result<String> {
        let (msg_id, frames) = self.build(ident, msg_type, content, json!({}));
        self.listen(&msg_id, tx.clone());
        self.send_frames(ch, frames)?;
        Ok(msg_id)
    }

    /// One request to `targets` (uuid, id) through the hub's broadcast
    /// scheduler, as ipyparallel's `BroadcastView` sends it (not
    /// coalescing: one reply per engine). The engines see it as
    /// `{msg_id}_{uuid}`, so replies and iopub are routed to `tx` by those
    /// ids; returns them in `targets`' order (`forget` each when done).
    pub fn broadcast_to(
        &self,
        targets: &[(String, i64)],
        msg_type: &str,
        content: Value,
        tx: &mpsc::UnboundedSender<ClientEvent>,
    ) -> Result<Vec<String>> {
        let md = json!({
            "targets": targets.iter().map(|(u, i)| json!([u, i])).collect::<Vec<_>>(),
            "is_broadcast": true,
            "is_coalescing": false,
        });
        let (msg_id, frames) = self.build(None, msg_type, content, md);
        let subs: Vec<String> = targets
            .iter()
            .map(|(u, _)| format!("{msg_id}_{u}"))
            .collect();
        for sub in &subs {
            self.listen(sub, tx.clone());
        }
        self.send_frames(Chan::Broadcast, frames)?;
        Ok(subs)
    }

    pub fn listen(&self, msg_id: &str, tx: mpsc::UnboundedSender<ClientEvent>) {
        self.inner
            .listeners
            .lock()
            .expect("listeners")
            .insert(msg_id.to_owned(), tx);
    }

    pub fn forget(&self, msg_id: &str) {
        self.inner
            .listeners
            .lock()
            .expect("listeners")
            .remove(msg_id);
    }

    /// A request/reply round trip on query, mux or control.
    pub async fn request(
        &self,
        ch: Chan,
        msg_type: &str,
        content: Value,
        ident: Option<&str>,
    ) -> Result<Message> {
        let (msg_id, mut rx) = self.send_and_listen(ch, ident, msg_type, content, json!({}))?;
        // The listener goes however this future ends: a caller's own
        // timeout (complete/inspect) drops it before the reply.
        let _forget = Forget(self, &msg_id);
        let r = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(ev) = rx.recv().await {
                if let ClientEvent::Reply(_, m) = ev {
                    return Ok(m);
                }
            }
            bail!("the connection to the hub closed")
        })
        .await;
        match r {
            Ok(r) => r,
            Err(_) => bail!("the hub did not answer {msg_type} within 10 s"),
        }
    }

    /// Send a signal to engines through the hub's control channel.
    pub fn signal(&self, uuids: &[String], sig: i32) -> Result<()> {
        for u in uuids {
            self.send(
                Chan::Control,
                Some(u),
                "signal_request",
                json!({"sig": sig}),
                json!({}),
            )?;
        }
        Ok(())
    }

    /// Answer an engine's `input_request` ([`crate::stdin`]): on control to
    /// that engine, parented to the request (the engine matches it).
    pub fn input_reply(&self, uuid: &str, value: &str, request: &Message) -> Result<()> {
        let frames = {
            let mut s = self.inner.session.lock().expect("session");
            let h = s.header("input_reply", &now_str());
            let parent = serde_json::to_value(&request.header).unwrap_or_else(|_| json!({}));
            s.serialize(
                vec![Bytes::copy_from_slice(uuid.as_bytes())],
                &h,
                &parent,
                &json!({}),
                &json!({"value": value}),
                vec![],
            )
        };
        self.send_frames(Chan::Control, frames)
    }

    /// `queue_request`: per-engine queue, completed and tasks counts.
    pub async fn queue_status(&self) -> Result<Value> {
        let m = self
            .request(
                Chan::Query,
                "queue_request",
                json!({"targets": null, "verbose": false}),
                None,
            )
            .await?;
        if m.content.get("status").and_then(Value::as_str) != Some("ok") {
            bail!("queue_request failed: {}", m.content);
        }
        Ok(m.content)
    }
}

pub(crate) async fn receiver<S: SocketRecv>(
    ch: Chan,
    mut s: S,
    inner: std::sync::Weak<Inner>,
    signer: Signer,
) {
    let limits = Limits::default();
    let mut auth = Authenticator::new(signer);
    loop {
        let msg = match s.recv().await {
            Ok(m) => m,
            Err(e) => {
                debug!(channel = ?ch, error = %e, "hub socket closed");
                return;
            }
        };
        let Some(inner) = inner.upgrade() else { return };
        let frames: Vec<Bytes> = msg.into_vec();
        // Verify on the raw frames before parsing any JSON; a bad message is
        // dropped and the loop goes on.
        let raw = match RawMessage::from_frames(frames, &limits) {
            Ok(r) => r,
            Err(e) => {
                warn!(channel = ?ch, error = %e, "malformed message from the hub dropped");
                continue;
            }
        };
        if let Err(e) = auth.check(&raw) {
            warn!(channel = ?ch, error = %e, "message with a bad signature dropped");
            continue;
        }
        let m = match Message::decode(&raw) {
            Ok(m) => m,
            Err(e) => {
                warn!(channel = ?ch, error = %e, "undecodable message dropped");
                continue;
            }
        };
        if ch == Chan::Notification {
            handle_notification(&inner, &m);
            continue;
        }
        let Some(parent) = m.parent_msg_id().map(str::to_owned) else {
            continue;
        };
        let tx = inner
            .listeners
            .lock()
            .expect("listeners")
            .get(&parent)
            .cloned();
        if let Some(tx) = tx {
            let ev = if ch == Chan::Iopub {
                ClientEvent::Iopub(m)
            } else {
                ClientEvent::Reply(ch, m)
            };
            if tx.send(ev).is_err() {
                inner.listeners.lock().expect("listeners").remove(&parent);
            }
        }
    }
}

fn handle_notification(inner: &Inner, m: &Message) {
    let id = m.content.get("id").and_then(Value::as_i64);
    let uuid = m.content.get("uuid").and_then(Value::as_str);
    let change = match (m.msg_type(), id, uuid) {
        ("registration_notification", Some(id), Some(u)) => {
            EngineChange::Registered(id, u.to_owned())
        }
        ("unregistration_notification", Some(id), _) => EngineChange::Unregistered(id),
        _ => return,
    };
    let mut engines = inner.engines.lock().expect("engines");
    change.apply(&mut engines);
    if let Some(j) = inner.journal.lock().expect("journal").as_mut() {
        j.push(change);
    }
    drop(engines);
    inner.changes.send_modify(|v| *v += 1);
}

/// A change of the engine table, as notified by the hub.
#[derive(Debug, Clone, PartialEq)]
enum EngineChange {
    Registered(i64, String),
    Unregistered(i64),
}

impl EngineChange {
    fn apply(&self, table: &mut BTreeMap<i64, String>) {
        match self {
            EngineChange::Registered(id, uuid) => {
                table.insert(*id, uuid.clone());
            }
            EngineChange::Unregistered(id) => {
                table.remove(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The race that lost engines: the hub builds a connection_reply
    /// without engine 2, then registers 2 and notifies; the notification
    /// is read first. Replaying the journal over the reply keeps engine 2,
    /// and an unregistration seen meanwhile stays applied too.
    #[test]
    fn notifications_during_a_refresh_survive_its_reply() {
        let reply: BTreeMap<i64, String> = [(0, "a".to_owned()), (1, "b".to_owned())].into();
        let journal = [
            EngineChange::Registered(2, "c".into()),
            EngineChange::Unregistered(1),
            EngineChange::Registered(0, "a".into()), // already in the reply
        ];
        let mut table = reply;
        for c in &journal {
            c.apply(&mut table);
        }
        assert_eq!(table, [(0, "a".to_owned()), (2, "c".to_owned())].into());
    }
}
