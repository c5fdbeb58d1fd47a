//! The load-balanced task scheduler (ipyparallel's `TaskScheduler`), as part
//! of the hub state machine.
//!
//! Engines are kept in LRU order with their loads; a task runs when its
//! `after` dependencies are met, on an engine allowed by its `targets`,
//! `follow` dependencies, blacklist (engines it already failed on) and the
//! HWM. Waiting tasks sit in a queue and a dependency graph; they are
//! re-examined when a task they depend on finishes, when an engine drops
//! below the HWM, and when engines register.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parallax_wire::content::{Dependency, ErrorContent, TaskMetadata};
use parallax_wire::{Message, RawMessage, format_date};
use serde_json::{Map, Value, json};
use tracing::{debug, info, warn};

use crate::core::{Channel, Hub, Now, RESUBMIT_CLIENT, Timer, owned, peer, push_completed};
use crate::scheduler::{DoneSet, Outcome, Scheme, choose, dep_met, dep_unreachable};

pub(crate) struct Job {
    msg_id: String,
    client: Bytes,
    /// The request frames from the delimiter on, relayed unchanged.
    body: Vec<Bytes>,
    targets: Vec<String>,
    after: Dependency,
    follow: Dependency,
    retries: u32,
    timeout: Option<f64>,
    blacklist: HashSet<String>,
    /// Bumped every time the job enters the waiting queue; stale queue
    /// entries and timers carry an older value and are ignored.
    generation: u64,
    seq: u64,
}

impl Job {
    /// The request's header, for replies the scheduler makes itself. Parsed
    /// from the stored frames on demand: waiting tasks keep only their frames.
    fn parent_header(&self) -> Value {
        // body = [<IDS|MSG>, signature, header, parent, metadata, content, …]
        self.body
            .get(2)
            .and_then(|h| serde_json::from_slice(h).ok())
            .unwrap_or_else(|| json!({"msg_id": self.msg_id}))
    }
}

struct LbEngine {
    uuid: String,
    load: u32,
}

pub(crate) struct TaskState {
    /// Engines in LRU order (least recently used first).
    engines: Vec<LbEngine>,
    waiting: HashMap<String, Job>,
    queue: VecDeque<(String, u64)>,
    /// dependency msg_id → waiting tasks that depend on it.
    graph: HashMap<String, HashSet<String>>,
    /// engine uuid → tasks running there.
    running: HashMap<String, HashMap<String, Job>>,
    /// Sum of the `running` maps' lengths, kept in step: the driver asks
    /// after every batch of input, and summing over thousands of engines
    /// there made every heartbeat and reply cost O(engines).
    running_total: usize,
    /// Finished tasks (bounded, oldest forgotten first).
    done: DoneSet,
    /// Engine uuids shared by the outcomes in `done`.
    engine_names: HashMap<String, Arc<str>>,
    /// Tasks whose completion must be propagated through the graph.
    work: VecDeque<String>,
    rescan: bool,
    seq: u64,
}

impl TaskState {
    pub(crate) fn new(done_cap: usize) -> Self {
        TaskState {
            engines: Vec::new(),
            waiting: HashMap::new(),
            queue: VecDeque::new(),
            graph: HashMap::new(),
            running: HashMap::new(),
            running_total: 0,
            done: DoneSet::new(done_cap),
            engine_names: HashMap::new(),
            work: VecDeque::new(),
            rescan: false,
            seq: 0,
        }
    }

    pub(crate) fn record_done(&mut self, msg_id: &str, success: bool, engine: &str) {
        let engine = match self.engine_names.get(engine) {
            Some(name) => name.clone(),
            None => {
                let name: Arc<str> = Arc::from(engine);
                self.engine_names.insert(engine.to_owned(), name.clone());
                name
            }
        };
        self.done.insert(msg_id, Outcome { success, engine });
    }

    pub(crate) fn compact(&mut self) {
        fn big(cap: usize, len: usize) -> bool {
            cap > 1024 && cap > 4 * len
        }
        if big(self.waiting.capacity(), self.waiting.len()) {
            self.waiting.shrink_to_fit();
        }
        if big(self.queue.capacity(), self.queue.len()) {
            self.queue.shrink_to_fit();
        }
        if big(self.graph.capacity(), self.graph.len()) {
            self.graph.shrink_to_fit();
        }
        for r in self.running.values_mut() {
            if big(r.capacity(), r.len()) {
                r.shrink_to_fit();
            }
        }
    }

    pub(crate) fn is_done(&self, msg_id: &str) -> bool {
        self.done.contains_key(msg_id)
    }

    fn is_known(&self, msg_id: &str) -> bool {
        self.done.contains_key(msg_id)
            || self.waiting.contains_key(msg_id)
            || self.running.values().any(|r| r.contains_key(msg_id))
    }

    /// Number of waiting and running tasks (for tests and status).
    pub(crate) fn outstanding(&self) -> (usize, usize) {
        #[cfg(test)]
        assert_eq!(
            self.running_total,
            self.running.values().map(HashMap::len).sum::<usize>(),
            "running_total out of step"
        );
        (self.waiting.len(), self.running_total)
    }

    /// Lengths of the waiting queue, the dependency graph, the finished-task
    /// memory and the pending graph work (memory-bound tests).
    #[cfg(test)]
    pub(crate) fn footprint(&self) -> [usize; 4] {
        [
            self.queue.len(),
            self.graph.len(),
            self.done.len(),
            self.work.len(),
        ]
    }
}

#[allow(clippy::large_enum_variant)] // a short-lived return value; boxing would cost an allocation per task
enum Placement {
    Ran,
    Failed,
    Wait(Job),
}

impl Hub {
    // ------------------------------------------------------------- engines

    pub(crate) fn lb_register(&mut self, uuid: &str) {
        let t = &mut self.tasks;
        t.engines.insert(
            0,
            LbEngine {
                uuid: uuid.to_owned(),
                load: 0,
            },
        );
        t.running.entry(uuid.to_owned()).or_default();
        t.rescan = true;
    }

    pub(crate) fn lb_unregister(&mut self, uuid: &str, id: i64, now: Now) {
        let t = &mut self.tasks;
        t.engines.retain(|e| e.uuid != uuid);
        if t.running.get(uuid).is_some_and(|r| !r.is_empty()) {
            let at = now.mono + self.cfg.stranded_delay;
            self.schedule(
                at,
                Timer::StrandedTasks {
                    uuid: uuid.to_owned(),
                    id,
                },
            );
        } else {
            self.tasks.running.remove(uuid);
        }
    }

    /// Fail (or retry elsewhere) every task still on a dead engine.
    /// `id` is the dead engine's id: the client has already forgotten the
    /// engine, so the error must name it (ipyparallel's client looks up
    /// `engine_info.engine_uuid` otherwise, and fails).
    pub(crate) fn stranded_tasks(&mut self, uuid: &str, id: i64, now: Now) {
        let Some(lost) = self.tasks.running.remove(uuid) else {
            return;
        };
        self.tasks.running_total -= lost.len();
        let mut lost: Vec<Job> = lost.into_values().collect();
        lost.sort_by_key(|j| j.seq);
        for mut job in lost {
            warn!(msg_id = %job.msg_id, engine = id, "task stranded on a dead engine");
            if job.retries > 0 {
                job.retries -= 1;
                self.retry_elsewhere(job, uuid, now);
                continue;
            }
            let evalue = format!("Engine {id} died while running task {:?}", job.msg_id);
            let err =
                ErrorContent::new("EngineError", evalue).with_engine_info(uuid, Some(id), "apply");
            let md = json!({"status": "error", "engine": uuid, "date": format_date(now.wall), "dependencies_met": true});
            self.fail_job(job, err, md, Some(uuid), now);
        }
    }

    // ---------------------------------------------------------- submission

    pub(crate) fn task_request(&mut self, raw: RawMessage, msg: Message, now: Now) {
        let Some(client) = raw.idents.first().cloned() else {
            warn!("task request without a client identity");
            return;
        };
        let msg_id = msg.header.msg_id.clone();
        self.new_record(&msg, "task", None);
        self.pending.insert(msg_id.clone());
        self.unassigned.insert(msg_id.clone());
        let n_idents = raw.idents.len();
        let mut frames = raw.into_frames();
        let body: Vec<Bytes> = frames.split_off(n_idents).iter().map(owned).collect();
        let client = owned(&client);
        self.tasks.seq += 1;
        let md = TaskMetadata::from_metadata(&msg.metadata);
        let (md, bad) = match md {
            Ok(md) => (md, None),
            Err(e) => (TaskMetadata::default(), Some(e)),
        };
        let mut job = Job {
            msg_id: msg_id.clone(),
            client,
            body,
            targets: md.targets,
            after: md.after,
            follow: md.follow,
            retries: md.retries,
            timeout: md.timeout,
            blacklist: HashSet::new(),
            generation: 0,
            seq: self.tasks.seq,
        };
        if let Some(e) = bad {
            let err = ErrorContent::new("InvalidDependency", format!("invalid task metadata: {e}"));
            return self.fail_job(job, err, json!({}), None, now);
        }
        if self.cfg.scheme == Scheme::Pure {
            // The pure scheduler knows nothing of dependencies or targets.
            job.after = Dependency::default();
            job.follow = Dependency::default();
            job.targets.clear();
            job.retries = 0;
            job.timeout = None;
        }
        if dep_met(&job.after, &self.tasks.done, None) {
            job.after = Dependency::default();
        }
        let mut verdict = None;
        for dep in [&job.after, &job.follow] {
            if dep.is_empty() {
                continue;
            }
            if dep
                .ids
                .iter()
                .any(|d| *d == msg_id || !self.tasks.is_known(d))
            {
                let unknown: Vec<&String> =
                    dep.ids.iter().filter(|d| !self.tasks.is_known(d)).collect();
                verdict = Some(ErrorContent::new(
                    "InvalidDependency",
                    format!("dependencies on unknown or own task ids: {unknown:?}"),
                ));
                break;
            }
            if dep_unreachable(dep, &self.tasks.done) {
                verdict = Some(ErrorContent::new("ImpossibleDependency", ""));
                break;
            }
        }
        if let Some(err) = verdict {
            return self.fail_job(job, err, json!({}), None, now);
        }
        if dep_met(&job.after, &self.tasks.done, None) {
            match self.maybe_run(job, now) {
                Placement::Wait(job) => self.save_unmet(job, now),
                Placement::Ran | Placement::Failed => {}
            }
        } else {
            self.save_unmet(job, now);
        }
    }

    /// Run `job` now if an engine may take it.
    fn maybe_run(&mut self, mut job: Job, now: Now) -> Placement {
        let hwm = if self.cfg.scheme == Scheme::Pure {
            0
        } else {
            self.cfg.hwm
        };
        let t = &self.tasks;
        let available: Vec<usize> = (0..t.engines.len())
            .filter(|&i| hwm == 0 || t.engines[i].load < hwm)
            .collect();
        if available.is_empty() {
            return Placement::Wait(job);
        }
        let filtered =
            !job.follow.is_empty() || !job.targets.is_empty() || !job.blacklist.is_empty();
        let indices: Vec<usize> = if filtered {
            available
                .into_iter()
                .filter(|&i| {
                    let u = &t.engines[i].uuid;
                    !job.blacklist.contains(u)
                        && (job.targets.is_empty() || job.targets.contains(u))
                        && dep_met(&job.follow, &t.done, Some(u))
                })
                .collect()
        } else {
            available
        };
        if indices.is_empty() {
            if job.follow.all && !job.follow.is_empty() {
                let dests: HashSet<&str> = job
                    .follow
                    .ids
                    .iter()
                    .filter_map(|m| t.done.get(m))
                    .filter(|o| {
                        (job.follow.success && o.success) || (job.follow.failure && !o.success)
                    })
                    .map(|o| &*o.engine)
                    .collect();
                if dests.len() > 1 {
                    let err = ErrorContent::new(
                        "ImpossibleDependency",
                        "follow dependencies ran on different engines",
                    );
                    self.fail_job(job, err, json!({}), None, now);
                    return Placement::Failed;
                }
            }
            if !job.targets.is_empty() {
                let bl = job.blacklist.clone();
                job.targets.retain(|u| !bl.contains(u));
                let reachable = job
                    .targets
                    .iter()
                    .any(|u| t.engines.iter().any(|e| e.uuid == *u));
                if !reachable {
                    let err = ErrorContent::new(
                        "ImpossibleDependency",
                        "none of the task's target engines is registered (or all of them failed it)",
                    );
                    self.fail_job(job, err, json!({}), None, now);
                    return Placement::Failed;
                }
            }
            return Placement::Wait(job);
        }
        self.submit_task(job, &indices);
        Placement::Ran
    }

    fn submit_task(&mut self, job: Job, indices: &[usize]) {
        let t = &mut self.tasks;
        let k = if self.cfg.scheme == Scheme::Pure {
            // Engines are in LRU order and the chosen one moves to the back,
            // so taking the front is round-robin.
            0
        } else {
            let loads: Vec<u32> = indices.iter().map(|&i| t.engines[i].load).collect();
            choose(self.cfg.scheme, &loads, &mut self.rng)
        };
        let idx = indices[k];
        let mut e = t.engines.remove(idx);
        e.load += 1;
        let uuid = e.uuid.clone();
        t.engines.push(e);
        let mut frames = Vec::with_capacity(job.body.len() + 2);
        frames.push(Bytes::copy_from_slice(uuid.as_bytes()));
        frames.push(job.client.clone());
        frames.extend(job.body.iter().cloned());
        debug!(msg_id = %job.msg_id, engine = %uuid, "task assigned");
        let msg_id = job.msg_id.clone();
        if t.running
            .entry(uuid.clone())
            .or_default()
            .insert(msg_id.clone(), job)
            .is_none()
        {
            t.running_total += 1;
        }
        self.send(Channel::TaskEngine, frames);
        self.unassigned.remove(&msg_id);
        if let Some(e) = self
            .by_uuid
            .get(&uuid)
            .and_then(|id| self.engines.get_mut(id))
        {
            e.tasks.push_back(msg_id.clone());
        }
        let mut f = Map::new();
        f.insert("engine_uuid".into(), json!(uuid));
        self.db_update(&msg_id, f, None);
    }

    fn save_unmet(&mut self, mut job: Job, now: Now) {
        job.generation += 1;
        let t = &mut self.tasks;
        for d in job.after.ids.iter().chain(job.follow.ids.iter()) {
            if !t.done.contains_key(d) {
                t.graph
                    .entry(d.clone())
                    .or_default()
                    .insert(job.msg_id.clone());
            }
        }
        t.queue.push_back((job.msg_id.clone(), job.generation));
        if let Some(secs) = job.timeout {
            let at = now.mono + Duration::from_secs_f64(secs.min(1e9));
            let timer = Timer::TaskTimeout {
                msg_id: job.msg_id.clone(),
                generation: job.generation,
            };
            self.schedule(at, timer);
        }
        self.tasks.waiting.insert(job.msg_id.clone(), job);
        // Jobs that leave through the graph or a timeout keep their queue
        // entry until a scan walks past it, and without an HWM no scan ever
        // does: sweep stale entries once they outnumber the waiting jobs.
        let t = &mut self.tasks;
        if t.queue.len() > 2 * t.waiting.len() + 64 {
            let waiting = &t.waiting;
            t.queue
                .retain(|(m, g)| waiting.get(m).is_some_and(|j| j.generation == *g));
        }
    }

    pub(crate) fn task_timeout(&mut self, msg_id: &str, generation: u64, now: Now) {
        let current = self
            .tasks
            .waiting
            .get(msg_id)
            .is_some_and(|j| j.generation == generation);
        if current {
            let job = self.tasks.waiting.remove(msg_id).expect("checked");
            debug!(msg_id = %msg_id, "task timed out waiting for its dependencies or an engine");
            self.fail_job(
                job,
                ErrorContent::new("TaskTimeout", ""),
                json!({}),
                None,
                now,
            );
        }
    }

    /// Reply to the client with an error for `job` and record it as failed.
    fn fail_job(
        &mut self,
        job: Job,
        err: ErrorContent,
        metadata: Value,
        engine: Option<&str>,
        now: Now,
    ) {
        let t = &mut self.tasks;
        for d in job.after.ids.iter().chain(job.follow.ids.iter()) {
            if let Some(s) = t.graph.get_mut(d) {
                s.remove(&job.msg_id);
                if s.is_empty() {
                    t.graph.remove(d);
                }
            }
        }
        let engine_uuid = engine.unwrap_or("").to_owned();
        t.record_done(&job.msg_id, false, &engine_uuid);
        t.work.push_back(job.msg_id.clone());
        debug!(msg_id = %job.msg_id, ename = %err.ename, "task failed in the scheduler");
        let content = err.to_value();
        let header = self.session.header("apply_reply", &format_date(now.wall));
        if job.client.as_ref() != RESUBMIT_CLIENT {
            let mut idents = vec![job.client.clone()];
            if let Some(u) = engine {
                idents.push(Bytes::copy_from_slice(u.as_bytes()));
            }
            let frames = self.session.serialize(
                idents,
                &header,
                &job.parent_header(),
                &metadata,
                &content,
                vec![],
            );
            self.send(Channel::TaskClient, frames);
        }
        self.pending.remove(&job.msg_id);
        self.unassigned.remove(&job.msg_id);
        let mut f = Map::new();
        f.insert(
            "result_header".into(),
            serde_json::to_value(&header).unwrap_or_default(),
        );
        f.insert("result_metadata".into(), metadata);
        f.insert("result_content".into(), content);
        f.insert("received".into(), json!(format_date(now.wall)));
        f.insert("completed".into(), json!(header.date));
        if engine.is_some() {
            f.insert("engine_uuid".into(), json!(engine_uuid));
        }
        self.db_update(&job.msg_id, f, Some(vec![]));
    }

    // -------------------------------------------------------------- results

    pub(crate) fn task_reply(&mut self, raw: RawMessage, msg: Message, now: Now) {
        if raw.idents.len() < 2 {
            warn!(peer = %peer(&raw.idents), "task reply without a client identity");
            return;
        }
        let uuid = String::from_utf8_lossy(&raw.idents[0]).into_owned();
        if let Some(e) = self.tasks.engines.iter_mut().find(|e| e.uuid == uuid) {
            e.load = e.load.saturating_sub(1);
            if self.cfg.hwm > 0 && e.load + 1 == self.cfg.hwm {
                self.tasks.rescan = true;
            }
        }
        let Some(msg_id) = msg.parent_msg_id().map(str::to_owned) else {
            warn!(peer = %uuid, "task reply without a parent header");
            return;
        };
        let Some(mut job) = self
            .tasks
            .running
            .get_mut(&uuid)
            .and_then(|r| r.remove(&msg_id))
        else {
            // A task of a previous hub's life (`--restore`), or one whose
            // record that hub did not write before it died: the client may
            // still be waiting, so relay and record the reply.
            if self.orphan_answered(&msg_id) || !self.tasks.is_done(&msg_id) {
                info!(msg_id = %msg_id, engine = %uuid, "reply to a request of the previous hub's life");
                let mut frames = raw.into_frames();
                frames.swap(0, 1);
                self.send(Channel::TaskClient, frames);
                let success = msg.metadata.get("status").and_then(Value::as_str) == Some("ok");
                self.tasks.record_done(&msg_id, success, &uuid);
                self.tasks.work.push_back(msg_id);
                self.record_result(msg, &uuid, now);
            } else {
                debug!(msg_id = %msg_id, engine = %uuid, "reply for a task the scheduler no longer tracks");
            }
            return;
        };
        self.tasks.running_total -= 1;
        if let Some(e) = self
            .by_uuid
            .get(&uuid)
            .and_then(|id| self.engines.get_mut(id))
        {
            e.tasks.retain(|m| *m != msg_id);
        }
        let deps_met = msg
            .metadata
            .get("dependencies_met")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let status = msg
            .metadata
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("");
        let success = status == "ok";
        if !deps_met || (!success && job.retries > 0) {
            if deps_met {
                job.retries -= 1;
            }
            self.retry_elsewhere(job, &uuid, now);
            return;
        }
        // Relay the result: [client, engine, <IDS|MSG>, …].
        if job.client.as_ref() != RESUBMIT_CLIENT {
            let mut frames = raw.into_frames();
            frames.swap(0, 1);
            self.send(Channel::TaskClient, frames);
        }
        self.pending.remove(&msg_id);
        self.unassigned.remove(&msg_id);
        if status != "aborted"
            && let Some(e) = self
                .by_uuid
                .get(&uuid)
                .and_then(|id| self.engines.get_mut(id))
        {
            push_completed(e, &msg_id);
        }
        self.tasks.record_done(&msg_id, success, &uuid);
        self.tasks.work.push_back(msg_id);
        self.record_result(msg, &uuid, now);
    }

    /// The task failed (or its dependencies were unmet) on `engine`: place it
    /// elsewhere, never on an engine it already failed on.
    fn retry_elsewhere(&mut self, mut job: Job, engine: &str, now: Now) {
        job.blacklist.insert(engine.to_owned());
        self.unassigned.insert(job.msg_id.clone());
        let all_targets_failed =
            !job.targets.is_empty() && job.targets.iter().all(|t| job.blacklist.contains(t));
        if all_targets_failed {
            let err = ErrorContent::new(
                "ImpossibleDependency",
                "the task failed on every engine it may run on",
            );
            return self.fail_job(job, err, json!({}), None, now);
        }
        match self.maybe_run(job, now) {
            Placement::Wait(job) => self.save_unmet(job, now),
            Placement::Ran | Placement::Failed => {}
        }
    }

    // ---------------------------------------------------------------- graph

    /// Propagate finished tasks through the dependency graph and re-place
    /// waiting tasks after engines became available. Runs after every input,
    /// iteratively (failing a task may unblock or doom its dependents).
    pub(crate) fn drain_graph_work(&mut self, now: Now) {
        loop {
            if std::mem::take(&mut self.tasks.rescan) {
                self.scan_queue(now);
                continue;
            }
            let Some(dep_id) = self.tasks.work.pop_front() else {
                break;
            };
            let dependents = self.tasks.graph.remove(&dep_id).unwrap_or_default();
            let hwm = self.cfg.hwm;
            let engine_freed = hwm > 0 && self.tasks.engines.iter().any(|e| e.load + 1 == hwm);
            if engine_freed {
                self.scan_queue(now);
            }
            if dependents.is_empty() {
                continue;
            }
            let mut jobs: Vec<(u64, String)> = dependents
                .into_iter()
                .filter_map(|m| self.tasks.waiting.get(&m).map(|j| (j.seq, m)))
                .collect();
            jobs.sort();
            for (_, m) in jobs {
                if let Some(job) = self.tasks.waiting.remove(&m)
                    && let Some(job) = self.reconsider(job, now)
                {
                    self.tasks.waiting.insert(m, job);
                }
            }
        }
    }

    /// Walk the waiting queue in submission order, placing what can run.
    fn scan_queue(&mut self, now: Now) {
        let mut keep = VecDeque::new();
        while let Some((m, generation)) = self.tasks.queue.pop_front() {
            let current = self
                .tasks
                .waiting
                .get(&m)
                .is_some_and(|j| j.generation == generation);
            if !current {
                continue; // ran, failed or re-queued since
            }
            let job = self.tasks.waiting.remove(&m).expect("checked");
            match self.reconsider(job, now) {
                Some(job) => {
                    self.tasks.waiting.insert(m.clone(), job);
                    keep.push_back((m, generation));
                }
                None => {
                    let hwm = if self.cfg.scheme == Scheme::Pure {
                        0
                    } else {
                        self.cfg.hwm
                    };
                    let any_free = hwm == 0 || self.tasks.engines.iter().any(|e| e.load < hwm);
                    if !any_free {
                        break;
                    }
                }
            }
        }
        while let Some(x) = keep.pop_back() {
            self.tasks.queue.push_front(x);
        }
    }

    /// Re-examine a waiting job; `Some(job)` if it must keep waiting.
    fn reconsider(&mut self, job: Job, now: Now) -> Option<Job> {
        let done = &self.tasks.done;
        if dep_unreachable(&job.after, done) || dep_unreachable(&job.follow, done) {
            self.fail_job(
                job,
                ErrorContent::new("ImpossibleDependency", ""),
                json!({}),
                None,
                now,
            );
            return None;
        }
        if !dep_met(&job.after, done, None) {
            return Some(job);
        }
        let generation = job.generation;
        match self.maybe_run(job, now) {
            Placement::Ran | Placement::Failed => None,
            Placement::Wait(mut job) => {
                job.generation = generation;
                Some(job)
            }
        }
    }

    /// Relay-side view for status and tests.
    pub fn task_counts(&self) -> (usize, usize) {
        self.tasks.outstanding()
    }
}
