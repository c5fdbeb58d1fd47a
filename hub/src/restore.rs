//! Hub restart without losing the cluster (`parallax hub --restore`), the
//! sans-IO half: what the state file holds ([`EngineState`]), bringing the
//! previous hub's engines back into the core, and the requests that were in
//! flight when that hub died ("orphans").
//!
//! The driver reads and writes the file (`state_file.rs`); the core only
//! hands out its table ([`Hub::engine_state`], with a version that changes
//! whenever the table does) and takes one back ([`Hub::restore`]).
//!
//! Restored engines are registered at once with their ids, as if their
//! first heartbeat had just arrived: an engine that does not beat again
//! within `max_heartmonitor_misses` beats is unregistered as any other.
//!
//! Orphans: records the task database holds without a `completed` date.
//! They count as pending (so `get_result` waits for them) until the engine
//! that ran them replies — the reply is recorded and relayed to the client
//! whose session sent the request — or until `orphan_grace` has passed:
//! then the record is completed with a `HubRestartError` and the client,
//! if it is still connected, gets that error as the reply. Never a hang.

use std::collections::HashMap;

use bytes::Bytes;
use parallax_wire::content::ErrorContent;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tracing::{info, warn};

use crate::core::{Channel, Hub, Now, Timer};

/// The hub's engine table as the state file keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineState {
    /// Registered engines: id → uuid (JSON object keys are strings, as in
    /// ipcontroller's `engines<cluster>.json`).
    pub engines: std::collections::BTreeMap<String, String>,
    /// The next id a new engine gets (ids are never reused).
    pub next_id: i64,
}

impl EngineState {
    /// `(id, uuid)` pairs; entries whose key is not an integer are skipped.
    pub fn pairs(&self) -> Vec<(i64, String)> {
        self.engines
            .iter()
            .filter_map(|(k, u)| k.parse().ok().map(|id| (id, u.clone())))
            .collect()
    }
}

/// What [`Hub::restore`] brought back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restored {
    pub engines: usize,
    pub orphans: usize,
}

/// A request of the previous hub's life still without a reply.
#[derive(Debug, Clone)]
pub(crate) struct Orphan {
    /// The client session that sent it (its routing identity).
    client: String,
    /// `mux`, `task`, or a broadcast's queue.
    queue: String,
    header: Value,
    engine_uuid: Option<String>,
}

impl Hub {
    /// The engine table to save, and its version: the version changes
    /// whenever an engine registers or unregisters, so the driver writes
    /// the file only when it must.
    pub fn engine_state(&self) -> (u64, EngineState) {
        let engines = self
            .engines
            .values()
            .map(|e| (e.id.to_string(), e.uuid.clone()))
            .collect();
        (
            self.registry_version,
            EngineState {
                engines,
                next_id: self.id_counter,
            },
        )
    }

    /// The version part of [`Hub::engine_state`], without building the table.
    pub fn engine_state_version(&self) -> u64 {
        self.registry_version
    }

    /// Bring back the previous hub's engines and find its unfinished
    /// requests (see the module docs). Called once, before any input.
    pub fn restore(&mut self, state: &EngineState, now: Now) -> Restored {
        let mut out = Restored::default();
        for (id, uuid) in state.pairs() {
            if self.engines.contains_key(&id) || self.by_uuid.contains_key(&uuid) {
                warn!(engine = id, uuid = %uuid, "duplicate engine in the state file; skipped");
                continue;
            }
            self.restore_engine(id, &uuid, now);
            out.engines += 1;
        }
        self.id_counter = self
            .id_counter
            .max(state.next_id)
            .max(self.engines.keys().next_back().map_or(0, |m| m + 1));
        let keys: Vec<String> = ["msg_id", "client_uuid", "queue", "header", "engine_uuid"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        match self
            .db
            .find_records(&json!({"completed": null}), Some(&keys))
        {
            Ok(found) => {
                for rec in found {
                    let f = &rec.fields;
                    let Some(msg_id) = f.get("msg_id").and_then(Value::as_str) else {
                        continue;
                    };
                    let s = |k: &str| f.get(k).and_then(Value::as_str).map(str::to_owned);
                    self.pending.insert(msg_id.to_owned());
                    self.orphans.insert(
                        msg_id.to_owned(),
                        Orphan {
                            client: s("client_uuid").unwrap_or_default(),
                            queue: s("queue").unwrap_or_default(),
                            header: f.get("header").cloned().unwrap_or(Value::Null),
                            engine_uuid: s("engine_uuid"),
                        },
                    );
                }
            }
            // NoDB keeps nothing: no orphans to find.
            Err(e) => info!(error = %e, "no task records to restore"),
        }
        out.orphans = self.orphans.len();
        if out.orphans > 0 {
            let at = now.mono + self.cfg.orphan_grace;
            self.schedule(at, Timer::Orphans);
        }
        info!(
            engines = out.engines,
            orphans = out.orphans,
            next_id = self.id_counter,
            "restored the previous hub's state"
        );
        out
    }

    /// A reply to `msg_id` arrived: it is no orphan any more. Returns
    /// whether it was one.
    pub(crate) fn orphan_answered(&mut self, msg_id: &str) -> bool {
        if self.orphans.remove(msg_id).is_some() {
            self.pending.remove(msg_id);
            true
        } else {
            false
        }
    }

    /// `Timer::Orphans`: every orphan still unanswered fails.
    pub(crate) fn expire_orphans(&mut self, now: Now) {
        let orphans: HashMap<String, Orphan> = std::mem::take(&mut self.orphans);
        if orphans.is_empty() {
            return;
        }
        warn!(
            requests = orphans.len(),
            "requests in flight when the previous hub stopped got no reply; failing them"
        );
        for (msg_id, o) in orphans {
            self.pending.remove(&msg_id);
            let err = ErrorContent::new(
                "HubRestartError",
                format!(
                    "the hub restarted while request {msg_id:?} was in flight, and no reply \
                     arrived afterwards: its result is unknown"
                ),
            );
            let engine = o.engine_uuid.clone().unwrap_or_default();
            let engine_id = self.by_uuid.get(&engine).copied();
            let err = if engine.is_empty() {
                err
            } else {
                err.with_engine_info(&engine, engine_id, "apply")
            };
            let md = json!({"status": "error", "dependencies_met": true, "engine": engine});
            let mut f = Map::new();
            f.insert("result_metadata".into(), md.clone());
            self.record_failure(&msg_id, &err, &engine, now, f);
            let channel = match o.queue.as_str() {
                "mux" => Some(Channel::MuxClient),
                "task" => Some(Channel::TaskClient),
                _ => None,
            };
            if let Some(channel) = channel
                && !o.client.is_empty()
                && o.header.is_object()
            {
                let msg_type = o
                    .header
                    .get("msg_type")
                    .and_then(Value::as_str)
                    .unwrap_or("apply_request");
                let reply_type = match msg_type.strip_suffix("_request") {
                    Some(b) => format!("{b}_reply"),
                    None => format!("{msg_type}_reply"),
                };
                let mut idents = vec![Bytes::from(o.client.clone().into_bytes())];
                if !engine.is_empty() {
                    // [client, engine, …] as a relayed reply.
                    idents.push(Bytes::from(engine.clone().into_bytes()));
                }
                self.send_msg(
                    channel,
                    idents,
                    &reply_type,
                    &err.to_value(),
                    &o.header,
                    &md,
                    vec![],
                    now,
                );
            }
        }
    }

    /// Registers a restored engine at once (no registration request, no
    /// first heartbeat needed: its beats count from now).
    fn restore_engine(&mut self, id: i64, uuid: &str, now: Now) {
        self.insert_incoming(uuid, id);
        self.finish_registration(uuid, now);
    }
}
