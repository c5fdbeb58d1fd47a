//! The kernel's interpreter: a cell becomes items ([`crate::magics`]); code
//! items are sent to the selected engines through the hub and their outputs
//! merged live ([`crate::merge`]); magics run here.
//!
//! Every `%px` execution is kept as a [`Pending`] result (the last one for
//! `%pxresult`, named ones for `--out NAME`); non-blocking ones keep
//! collecting in a background task.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::client::{Chan, ClientEvent, HubClient};
use crate::cluster::{EmbeddedCluster, EngineSpec, wait_for_engines};
use crate::cluster_cmd::StartArgs;
use crate::cluster_jobs::{self, HubPlace, Launched, parse_start};
use crate::frontend::Publisher;
use crate::kernelspec::Language;
use crate::local::LocalPython;
use crate::magics::{
    ClusterCommand, GroupBy, Item, PxConfig, PxOptions, Targets, parse_cell_with, signal_number,
};
use crate::merge::{
    CellError, EngineEvent, MERGE_MIN_TARGETS, Out, RemoteError, Results, Streamer,
    already_displayed_error, display_outputs, results_composite_error,
};
use crate::stdin::FrontendStdin;

const NO_LAST_RESULT: &str = "%pxresult recalls last %px result, which has not yet been used.";
/// How long to wait for an engine's `idle` after its reply (ipyparallel's
/// `wait_for_output(1)`).
const OUTPUT_GRACE: Duration = Duration::from_secs(1);
/// How long engines get to return after an interrupt before the cell ends.
const INTERRUPT_GRACE: Duration = Duration::from_secs(3);

pub struct SessionConfig {
    pub engines: usize,
    pub cluster_file: Option<PathBuf>,
    pub python: PathBuf,
    pub language: Language,
    pub exe: PathBuf,
    pub engine_timeout: Duration,
    /// The embedded hub's `--ip` and `--location` (default loopback).
    pub hub_ip: Option<String>,
    pub hub_location: Option<String>,
    /// Engines launched at start instead of local ones: `%cluster start`
    /// words (`-n N --engines KIND …`), from `--launcher`.
    pub launch: Option<Vec<String>>,
    /// Where the session publishes its [`Assist`] (at start and after each
    /// cell: `%pxconfig` and `%cluster connect` change it).
    pub assist: watch::Sender<Option<Assist>>,
}

/// How a cell ended.
#[derive(Debug)]
pub enum CellOutcome {
    /// `result` is the cell's own execute_result (e.g. a pending AsyncResult).
    Ok {
        result: Option<Value>,
    },
    Error(CellError),
}

impl CellOutcome {
    pub fn error(ename: &str, evalue: &str) -> CellOutcome {
        CellOutcome::Error(CellError {
            ename: ename.into(),
            evalue: evalue.into(),
            traceback: evalue.lines().map(|l| l.to_owned()).collect(),
        })
    }
    fn usage(msg: &str) -> CellOutcome {
        let msg = msg.strip_prefix("UsageError: ").unwrap_or(msg);
        CellOutcome::Error(CellError {
            ename: "UsageError".into(),
            evalue: msg.into(),
            traceback: vec![format!("UsageError: {msg}")],
        })
    }
}

/// The results of one `%px` execution, filled in as messages arrive.
pub struct Pending {
    results: Mutex<Results>,
    done: watch::Sender<bool>,
    started: Instant,
    /// From how many targets identical streams are shown once: a help
    /// cell (`?obj`, `obj??`) from 2, other cells from [`MERGE_MIN_TARGETS`].
    merge_min: usize,
}

impl Pending {
    fn is_done(&self) -> bool {
        *self.done.borrow()
    }
}

/// Turns hub messages into [`Results`] updates.
struct Collector {
    idx_of: HashMap<String, usize>,
    reply_at: Vec<Option<Instant>>,
    /// The uuid of each target engine (ids can be reused after a restart).
    uuids: Vec<String>,
}

impl Collector {
    fn new(results: &Results, uuids: Vec<String>) -> Collector {
        Collector {
            idx_of: results
                .engines
                .iter()
                .enumerate()
                .map(|(i, e)| (e.msg_id.clone(), i))
                .collect(),
            reply_at: vec![None; results.engines.len()],
            uuids,
        }
    }

    /// Requests to engines that are no longer registered will never be
    /// answered: fail them with EngineError, as ipyparallel's Client does
    /// for stranded messages (the hub only records the failure). Returns the
    /// indices newly failed.
    fn strand(&mut self, results: &mut Results, alive: &BTreeMap<i64, String>) -> Vec<usize> {
        let mut failed = Vec::new();
        for (i, e) in results.engines.iter().enumerate() {
            if e.reply.is_none() && alive.get(&e.engine_id) != Some(&self.uuids[i]) {
                failed.push(i);
            }
        }
        for &i in &failed {
            let id = results.engines[i].engine_id;
            let msg_id = results.engines[i].msg_id.clone();
            let evalue = format!("Engine {id} died while running task {msg_id:?}");
            results.apply_reply(
                i,
                &json!({"status": "error", "ename": "EngineError", "evalue": evalue,
                        "traceback": [format!("EngineError: {evalue}")],
                        "engine_info": {"engine_id": id, "engine_uuid": self.uuids[i], "method": "execute"}}),
            );
            self.reply_at[i] = Some(Instant::now());
        }
        failed
    }

    /// Record a message; returns the engine index and the output event, if any.
    fn handle(
        &mut self,
        results: &mut Results,
        ev: ClientEvent,
    ) -> Option<(usize, Option<EngineEvent>)> {
        let (m, is_reply) = match ev {
            ClientEvent::Reply(Chan::Mux, m) => (m, true),
            ClientEvent::Reply(_, _) => return None,
            ClientEvent::Iopub(m) => (m, false),
        };
        let idx = *self.idx_of.get(m.parent_msg_id()?)?;
        let eid = results.engines[idx].engine_id;
        if is_reply {
            if results.engines[idx].reply.is_some() {
                // Already failed as stranded; a late reply changes nothing.
                return None;
            }
            results.apply_reply(idx, &m.content);
            self.reply_at[idx] = Some(Instant::now());
            return Some((idx, None));
        }
        let c = &m.content;
        let ev = match m.msg_type() {
            "stream" => EngineEvent::Stream {
                name: c
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("stdout")
                    .to_owned(),
                text: c
                    .get("text")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
            },
            "display_data" => EngineEvent::Display(c.clone()),
            "update_display_data" => EngineEvent::UpdateDisplay(c.clone()),
            "clear_output" => EngineEvent::ClearOutput {
                wait: c.get("wait").and_then(Value::as_bool).unwrap_or(false),
            },
            "execute_result" => EngineEvent::Result {
                execution_count: c
                    .get("execution_count")
                    .and_then(Value::as_i64)
                    .unwrap_or(0),
                data: c.get("data").cloned().unwrap_or(json!({})),
                metadata: c.get("metadata").cloned().unwrap_or(json!({})),
            },
            "error" => EngineEvent::Error(RemoteError::from_content(c, eid)),
            "status" => {
                if c.get("execution_state").and_then(Value::as_str) == Some("idle") {
                    results.engines[idx].output_done = true;
                }
                return Some((idx, None));
            }
            _ => return None,
        };
        results.apply(idx, &ev);
        Some((idx, Some(ev)))
    }

    /// Engines whose reply came long ago but whose `idle` never did.
    fn expire(&self, results: &mut Results) {
        for (i, t) in self.reply_at.iter().enumerate() {
            if let Some(t) = t
                && t.elapsed() >= OUTPUT_GRACE
            {
                results.engines[i].output_done = true;
            }
        }
    }
}

pub struct Session {
    client: HubClient,
    cluster: Option<EmbeddedCluster>,
    config: PxConfig,
    autopx: bool,
    last: Option<Arc<Pending>>,
    named: HashMap<String, Arc<Pending>>,
    color: bool,
    spec: EngineSpec,
    engine_timeout: Duration,
    /// Engines (uuids) running the current blocking cell.
    running: Vec<String>,
    /// The last "k of n engines registered" note a cell showed (shown again
    /// only when the count changes).
    noted_registered: Option<usize>,
    /// Per engine uuid: whether it is a Parallax engine (which forwards
    /// `input()`; a stock ipengine would send its input_request to a stdin
    /// socket nobody connects to, and wait until interrupted).
    forwards_input: HashMap<String, bool>,
    assist: watch::Sender<Option<Assist>>,
    /// Engines launched through a launcher (`%cluster start`, `--launcher`).
    launched: Launched,
    /// Where they find the hub.
    hub_place: Option<HubPlace>,
    /// The Python kernel's local interpreter (started on first use).
    local: Arc<tokio::sync::Mutex<LocalPython>>,
    /// The hub client's reconnections the local client was bound after.
    local_links: u64,
}

const RUST_NO_LOCAL: &str = "%%local is not available in the Rust kernel: it has no local interpreter yet (every cell runs on the engines). Use the Parallax Python kernel for local cells.";

impl Session {
    /// Start the embedded cluster (or connect to `cluster_file`) and wait for
    /// the engines.
    pub async fn start(cfg: SessionConfig) -> Result<Session> {
        let t0 = Instant::now();
        // engines started from this binary (local or through a launcher)
        // run Rust cells only if it was built with the Rust engine
        if cfg.cluster_file.is_none()
            && cfg.language == Language::Rust
            && !parallax_engine::RUST_ENGINE_BUILT
        {
            bail!(parallax_engine::RUST_ENGINE_MISSING);
        }
        let spec = EngineSpec {
            exe: cfg.exe.clone(),
            python: cfg.python.clone(),
            language: cfg.language,
        };
        let (client, cluster) = match &cfg.cluster_file {
            Some(f) => (HubClient::connect_file(f).await?, None),
            None => {
                let local = if cfg.launch.is_some() { 0 } else { cfg.engines };
                let mut c = EmbeddedCluster::start(
                    local,
                    spec.clone(),
                    cfg.hub_ip.as_deref(),
                    cfg.hub_location.as_deref(),
                )
                .await?;
                let client = HubClient::connect(c.bound.client.clone()).await?;
                wait_for_engines(&client, local, cfg.engine_timeout, Some(&mut c)).await?;
                (client, Some(c))
            }
        };
        let client_file = match (&cluster, &cfg.cluster_file) {
            (Some(c), _) => Some(c.client_file().to_path_buf()),
            (None, f) => f.clone(),
        };
        let local = Arc::new(tokio::sync::Mutex::new(LocalPython::new(
            cfg.python.clone(),
            client_file,
        )));
        let hub_place = cluster.as_ref().map(|c| HubPlace {
            engine_file: c.bound.engine_file.clone(),
            profile_dir: c.profile_dir().to_path_buf(),
            log_dir: HubPlace::job_log_dir(),
            ip: cfg.hub_ip.clone().unwrap_or_else(|| "127.0.0.1".into()),
            language_args: spec.language_args(),
        });
        info!(
            engines = client.engines().len(),
            elapsed_ms = t0.elapsed().as_millis() as u64,
            "cluster ready"
        );
        let mut s = Session {
            client,
            cluster,
            config: PxConfig::default(),
            autopx: true,
            last: None,
            named: HashMap::new(),
            color: std::env::var_os("NO_COLOR").is_none(),
            spec,
            engine_timeout: cfg.engine_timeout,
            running: Vec::new(),
            noted_registered: None,
            forwards_input: HashMap::new(),
            assist: cfg.assist,
            launched: Launched::default(),
            hub_place,
            local,
            local_links: 0,
        };
        s.publish_assist();
        if let Some(words) = &cfg.launch {
            // the kernel answers at once; the engines join as they register
            let args = parse_start(words).map_err(|e| anyhow::anyhow!("--launcher: {e}"))?;
            let started = s.launch_sets(args).await?;
            info!(sets = started, "engines launched");
        }
        Ok(s)
    }

    /// Between cells: unregister engines whose processes exited.
    pub async fn idle_housekeeping(&mut self) {
        match self.cluster.as_mut() {
            Some(c) => {
                if let Some((id, pid, how)) = c.exits.recv().await {
                    self.engine_exited(id, pid, &how);
                }
            }
            None => std::future::pending().await,
        }
    }

    fn engine_exited(&mut self, id: i64, pid: u32, how: &str) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        let was_ours = c.pid(id) == Some(pid);
        c.reaped(id, pid);
        if !was_ours {
            return;
        }
        warn!(engine = id, pid, how, "engine process exited");
        // The hub would notice only after heartbeats lapse; tell it now so
        // the engine's running requests fail with EngineError at once.
        if self.client.engines().contains_key(&id) {
            let _ = self.client.send(
                Chan::Query,
                None,
                "unregistration_request",
                json!({"id": id}),
                json!({}),
            );
        }
    }

    /// A cell is abandoned (the kernel shuts down): interrupt the engines
    /// still running it, so an external cluster's engines do not run on.
    pub fn interrupt_running(&mut self) {
        let uuids = std::mem::take(&mut self.running);
        if !uuids.is_empty() {
            let _ = self.client.signal(&uuids, libc::SIGINT);
        }
    }

    pub async fn shutdown(&mut self) {
        // jobs first (cancelled and waited for), while the hub still runs
        let mut sets = std::mem::take(&mut self.launched.sets);
        if !sets.is_empty() {
            let errors = tokio::task::spawn_blocking(move || cluster_jobs::stop_all(&mut sets))
                .await
                .unwrap_or_else(|e| vec![format!("stopping launched engines panicked: {e}")]);
            for e in errors {
                warn!("stopping launched engines: {e}");
            }
        }
        if let Some(h) = &self.hub_place {
            let _ = std::fs::remove_dir_all(&h.log_dir);
        }
        if let Some(mut c) = self.cluster.take() {
            self.client.close();
            c.shutdown().await;
        }
        self.local.lock().await.shutdown().await;
    }

    /// Launch engine sets for the hub (blocking launcher calls on the
    /// blocking pool); returns how many sets started.
    async fn launch_sets(&mut self, args: StartArgs) -> Result<usize> {
        let hub = self.hub_place.clone().ok_or_else(|| {
            anyhow::anyhow!(
                "launching engines needs the embedded cluster's hub; with an external cluster, use `parallax cluster engines`"
            )
        })?;
        let sets = tokio::task::spawn_blocking(move || cluster_jobs::launch(&args, &hub))
            .await
            .map_err(|e| anyhow::anyhow!("launching panicked: {e}"))??;
        let k = sets.len();
        self.launched.sets.extend(sets);
        Ok(k)
    }

    /// Poll the launched sets (batch jobs at most every `interval`): why
    /// each set that ended since did.
    async fn poll_launched(&mut self, interval: Duration) -> Vec<String> {
        if self.launched.expected() == 0 {
            return Vec::new();
        }
        let mut sets = std::mem::take(&mut self.launched.sets);
        let (sets, ended) = tokio::task::spawn_blocking(move || {
            let ended = cluster_jobs::poll(&mut sets, interval);
            (sets, ended)
        })
        .await
        .unwrap_or_else(|_| {
            (
                Vec::new(),
                vec!["polling the launched engines panicked".into()],
            )
        });
        self.launched.sets = sets;
        ended
    }

    /// `%cluster start …`: launch, then wait (up to `--timeout`) for the
    /// engines, with progress; a set that fails meanwhile fails the cell
    /// with the scheduler's reason; engines still pending at the timeout
    /// join later.
    async fn cluster_start(&mut self, words: Vec<String>, p: &Publisher) -> CellOutcome {
        let args = match parse_start(&words) {
            Ok(a) => a,
            Err(e) => return CellOutcome::usage(&format!("%cluster start: {e}")),
        };
        let wait = cluster_jobs::default_wait(&args);
        let interval = Duration::from_secs_f64(args.poll_interval.max(0.05));
        let before = self.client.ids().len();
        let first = self.launched.sets.len();
        if let Err(e) = self.launch_sets(args).await {
            return CellOutcome::error("ClusterError", &format!("{e:#}"));
        }
        let n: usize = self.launched.sets[first..]
            .iter()
            .map(|s| s.n as usize)
            .sum();
        let labels: Vec<String> = self.launched.sets[first..]
            .iter()
            .flat_map(|s| s.set.members.iter().map(|m| m.label()))
            .collect();
        p.stream(
            "stdout",
            format!("Launched {n} engines: {}\n", labels.join(", ")),
        );
        let deadline = tokio::time::Instant::now() + wait;
        let mut shown = String::new();
        let mut changes = self.client.watch_engines();
        loop {
            let have = self.client.ids().len();
            let registered = have.saturating_sub(before).min(n);
            if registered >= n {
                p.stream(
                    "stdout",
                    format!("{n} engines registered; now {have} engines\n"),
                );
                return CellOutcome::Ok { result: None };
            }
            let ended = self.poll_launched(interval).await;
            if !ended.is_empty() {
                return CellOutcome::error(
                    "ClusterError",
                    &format!(
                        "{registered} of {n} engines registered, but {}",
                        ended.join("; ")
                    ),
                );
            }
            let line = format!(
                "{registered}/{n} engines registered; {}",
                self.launched.states()
            );
            if line != shown {
                p.stream("stdout", format!("{line}\n"));
                shown = line;
            }
            if tokio::time::Instant::now() >= deadline {
                p.stream(
                    "stdout",
                    format!(
                        "{registered}/{n} engines registered after {:.0} s; the others join as they register (see %cluster)\n",
                        wait.as_secs_f64()
                    ),
                );
                return CellOutcome::Ok { result: None };
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    /// Run one cell.
    pub async fn execute(
        &mut self,
        code: &str,
        count: i64,
        p: &Publisher,
        stdin: &FrontendStdin,
        interrupts: &mut watch::Receiver<u64>,
    ) -> CellOutcome {
        let o = self.run_items(code, count, p, stdin, interrupts).await;
        self.publish_assist();
        o
    }

    async fn run_items(
        &mut self,
        code: &str,
        count: i64,
        p: &Publisher,
        stdin: &FrontendStdin,
        interrupts: &mut watch::Receiver<u64>,
    ) -> CellOutcome {
        // The Python engines' IPython takes `%timeit`, `%%bash`, …; evcxr has
        // no `%` magics, so the Rust kernel keeps every `%` for Parallax.
        let items = match parse_cell_with(code, self.spec.language == Language::Python) {
            Ok(i) => i,
            Err(e) => return CellOutcome::usage(&e.0),
        };
        let mut result = None;
        for item in items {
            let o = match item {
                Item::Code(code) if !self.autopx => {
                    if self.spec.language == Language::Rust {
                        CellOutcome::usage(
                            "%autopx is disabled, so this cell ran nowhere: the Rust kernel has no local interpreter. Use %%px / %px, or %autopx to fan unmarked cells out again.",
                        )
                    } else {
                        self.run_local(&code, count, p, stdin, interrupts).await
                    }
                }
                Item::Code(code) => {
                    self.px(&code, &PxOptions::default(), p, stdin, interrupts)
                        .await
                }
                Item::Local(code) => self.run_local(&code, count, p, stdin, interrupts).await,
                Item::Px { code, options } if options.local => {
                    self.px_local(&code, &options, count, p, stdin, interrupts)
                        .await
                }
                Item::Px { code, options } => {
                    let o = self.px(&code, &options, p, stdin, interrupts).await;
                    match &options.out {
                        Some(name) if self.spec.language == Language::Python => {
                            let bound = self.bind_out(name, p, stdin, interrupts).await;
                            match (&o, bound) {
                                (CellOutcome::Ok { .. }, CellOutcome::Error(e)) => {
                                    CellOutcome::Error(e)
                                }
                                _ => o,
                            }
                        }
                        _ => o,
                    }
                }
                Item::PxConfig(o) => self.pxconfig(&o, p),
                Item::PxResult { group_by, name } => {
                    self.pxresult(group_by, name, p, interrupts).await
                }
                Item::Autopx => {
                    self.autopx = !self.autopx;
                    p.stream(
                        "stdout",
                        if self.autopx {
                            "%autopx enabled\n"
                        } else {
                            "%autopx disabled\n"
                        },
                    );
                    CellOutcome::Ok { result: None }
                }
                Item::Engines => self.engines(p).await,
                Item::Cluster(c) => self.cluster_magic(c, p).await,
            };
            match o {
                CellOutcome::Error(_) => return o,
                CellOutcome::Ok { result: r } => {
                    if r.is_some() {
                        result = r;
                    }
                }
            }
        }
        CellOutcome::Ok { result }
    }

    /// Run code in the kernel's local interpreter (crate::local).
    async fn run_local(
        &mut self,
        code: &str,
        count: i64,
        p: &Publisher,
        stdin: &FrontendStdin,
        interrupts: &mut watch::Receiver<u64>,
    ) -> CellOutcome {
        if self.spec.language == Language::Rust {
            return CellOutcome::usage(RUST_NO_LOCAL);
        }
        let local = self.local.clone();
        let mut l = local.lock().await;
        self.rebind_after_reconnect(&mut l);
        l.run(code, count, p, stdin, interrupts).await
    }

    /// After the hub client reconnected to a restarted hub, the local
    /// namespace's client is connected again too.
    fn rebind_after_reconnect(&mut self, l: &mut LocalPython) {
        let n = self.client.reconnects();
        if n != self.local_links {
            self.local_links = n;
            l.rebind();
        }
    }

    /// `%%px --local`, as ipyparallel runs it: the cell goes to the engines
    /// without waiting, runs locally, then (when blocking) the engines'
    /// results are waited for and shown.
    async fn px_local(
        &mut self,
        code: &str,
        options: &PxOptions,
        count: i64,
        p: &Publisher,
        stdin: &FrontendStdin,
        interrupts: &mut watch::Receiver<u64>,
    ) -> CellOutcome {
        if self.spec.language == Language::Rust {
            return CellOutcome::usage(RUST_NO_LOCAL);
        }
        let block = self.config.with(options).block;
        let remote = PxOptions {
            block: Some(false),
            ..options.clone()
        };
        let sent = self.px(code, &remote, p, stdin, interrupts).await;
        if let CellOutcome::Error(_) = sent {
            return sent;
        }
        if let Some(name) = &options.out
            && let CellOutcome::Error(e) = self.bind_out(name, p, stdin, interrupts).await
        {
            return CellOutcome::Error(e);
        }
        let local = self.run_local(code, count, p, stdin, interrupts).await;
        if !block {
            return match local {
                CellOutcome::Error(_) => local,
                CellOutcome::Ok { .. } => sent,
            };
        }
        let remote = self.pxresult(None, None, p, interrupts).await;
        match (local, remote) {
            (CellOutcome::Error(e), _) | (_, CellOutcome::Error(e)) => CellOutcome::Error(e),
            _ => CellOutcome::Ok { result: None },
        }
    }

    /// `--out NAME`: the last %px execution's AsyncResult (the stock
    /// client's, fetched from the hub by msg_id) bound to NAME in the local
    /// namespace, as ipyparallel stores it in the user's namespace.
    async fn bind_out(
        &mut self,
        name: &str,
        p: &Publisher,
        stdin: &FrontendStdin,
        interrupts: &mut watch::Receiver<u64>,
    ) -> CellOutcome {
        let Some(pending) = self.last.clone() else {
            return CellOutcome::Ok { result: None };
        };
        let ids: Vec<String> = pending
            .results
            .lock()
            .expect("results")
            .engines
            .iter()
            .map(|e| e.msg_id.clone())
            .collect();
        let code = format!(
            "{name} = (_parallax_rc.get_result({ids}, block=False, owner=False) if _parallax_rc is not None else rc)",
            ids = serde_json::to_string(&ids).expect("ids"),
        );
        let mut quiet = p.clone();
        quiet.silent = true;
        let local = self.local.clone();
        let mut l = local.lock().await;
        self.rebind_after_reconnect(&mut l);
        match l.run(&code, 0, &quiet, stdin, interrupts).await {
            CellOutcome::Ok { .. } => CellOutcome::Ok { result: None },
            CellOutcome::Error(e) => CellOutcome::error(
                "LocalInterpreterError",
                &format!(
                    "--out {name}: binding the result locally failed: {}: {}",
                    e.ename, e.evalue
                ),
            ),
        }
    }

    fn targets(&self, spec: &Targets) -> Result<Vec<(i64, String)>, String> {
        let engines = self.client.engines();
        if engines.is_empty() {
            let pending = self.launched.expected();
            if pending > 0 {
                return Err(format!(
                    "no engines are registered yet: {pending} launched engines are pending ({}); see %cluster",
                    self.launched.states()
                ));
            }
            return Err("no engines are registered (see %engines, %cluster add N)".into());
        }
        let ids: Vec<i64> = engines.keys().copied().collect();
        let chosen = spec.resolve(&ids)?;
        Ok(chosen
            .into_iter()
            .map(|id| (id, engines[&id].clone()))
            .collect())
    }

    async fn px(
        &mut self,
        code: &str,
        o: &PxOptions,
        p: &Publisher,
        stdin: &FrontendStdin,
        interrupts: &mut watch::Receiver<u64>,
    ) -> CellOutcome {
        let cfg = self.config.with(o);
        let targets = match self.targets(&cfg.targets) {
            Ok(t) => t,
            Err(e) if self.client.engines().is_empty() => {
                return CellOutcome::Error(CellError {
                    ename: "NoEnginesRegistered".into(),
                    evalue: e.clone(),
                    traceback: vec![e],
                });
            }
            Err(e) => return CellOutcome::usage(&e),
        };
        let uuids: Vec<String> = targets.iter().map(|t| t.1.clone()).collect();
        if let Some(note) = self.starting_note() {
            p.stream("stderr", note);
        }
        if cfg.verbose {
            let ids: Vec<i64> = targets.iter().map(|t| t.0).collect();
            let base = if cfg.block {
                "Parallel"
            } else {
                "Async parallel"
            };
            p.stream(
                "stdout",
                format!("{base} execution on engine(s): {}\n", fmt_ids(&ids)),
            );
        }
        let mut refused = stdin_refused(stdin.allowed, cfg.block, &targets);
        if refused.is_none() && !self.forwards_input(&targets[0].1).await {
            refused = Some(format!(
                "{STDIN_ONLY} by Parallax engines; engine {} is not one (an ipengine has no stdin channel through the hub)",
                targets[0].0
            ));
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut sent = Vec::new();
        for (id, uuid) in &targets {
            let mut content = json!({"code": code, "silent": false, "store_history": true,
                                 "user_expressions": {}, "allow_stdin": refused.is_none(),
                                 "stop_on_error": true});
            if let Some(why) = &refused {
                content["stdin_refused"] = json!(why);
            }
            match self
                .client
                .send_to(Chan::Mux, Some(uuid), "execute_request", content, &tx)
            {
                Ok(msg_id) => sent.push((*id, msg_id)),
                Err(e) => {
                    for (_, m) in &sent {
                        self.client.forget(m);
                    }
                    return CellOutcome::error("HubError", &format!("{e:#}"));
                }
            }
        }
        drop(tx);
        let results = Results::new(&sent, cfg.targets.is_single());
        let (done_tx, _) = watch::channel(false);
        let pending = Arc::new(Pending {
            results: Mutex::new(results),
            done: done_tx,
            started: Instant::now(),
            merge_min: if crate::magics::is_help_cell(code) {
                2
            } else {
                MERGE_MIN_TARGETS
            },
        });
        self.last = Some(pending.clone());
        if let Some(name) = &o.out {
            self.named.insert(name.clone(), pending.clone());
        }
        if !cfg.block {
            let client = self.client.clone();
            let pend = pending.clone();
            let mut engines = self.client.watch_engines();
            tokio::spawn(async move {
                let mut col = Collector::new(&pend.results.lock().expect("results"), uuids);
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                loop {
                    tokio::select! {
                        ev = rx.recv() => match ev {
                            Some(ev) => { col.handle(&mut pend.results.lock().expect("results"), ev); }
                            None => break,
                        },
                        _ = engines.changed() => {
                            col.strand(&mut pend.results.lock().expect("results"), &client.engines());
                        }
                        _ = tick.tick() => col.expire(&mut pend.results.lock().expect("results")),
                    }
                    if pend.results.lock().expect("results").done() {
                        break;
                    }
                }
                for m in col.idx_of.keys() {
                    client.forget(m);
                }
                pend.done.send_replace(true);
            });
            return CellOutcome::Ok {
                result: Some(json!({"text/plain": "<AsyncResult(%px): pending>"})),
            };
        }
        self.running = targets.iter().map(|t| t.1.clone()).collect();
        let outcome = self
            .wait_blocking(&pending, &mut rx, uuids, &cfg, p, stdin, interrupts)
            .await;
        self.running.clear();
        let ids: Vec<String> = pending
            .results
            .lock()
            .expect("results")
            .engines
            .iter()
            .map(|e| e.msg_id.clone())
            .collect();
        for m in &ids {
            self.client.forget(m);
        }
        pending.done.send_replace(true);
        outcome
    }

    #[allow(clippy::too_many_arguments)]
    async fn wait_blocking(
        &mut self,
        pending: &Pending,
        rx: &mut mpsc::UnboundedReceiver<ClientEvent>,
        uuids: Vec<String>,
        cfg: &PxConfig,
        p: &Publisher,
        stdin: &FrontendStdin,
        interrupts: &mut watch::Receiver<u64>,
    ) -> CellOutcome {
        // The engine's open input(), relayed to the frontend (crate::stdin);
        // withdrawn when the cell ends however it ends.
        let mut asking: Option<AbortOnDrop> = None;
        let mut col = Collector::new(&pending.results.lock().expect("results"), uuids);
        let mut engines = self.client.watch_engines();
        let mut hub_link = self.client.watch_connected();
        let mut streamer = Streamer::new(self.color);
        let n_targets = pending.results.lock().expect("results").engines.len();
        let merge = cfg.merge && n_targets >= pending.merge_min;
        streamer.merge = merge;
        let stream = cfg.stream;
        let progress_id = format!(
            "{}-progress",
            pending.results.lock().expect("results").engines[0].msg_id
        );
        let mut progress_shown = false;
        let mut last_progress: Option<(usize, Instant)> = None;
        let show_progress_at = (cfg.progress_after >= 0.0)
            .then(|| pending.started + Duration::from_secs_f64(cfg.progress_after));
        let mut interrupted: Option<Instant> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let publish = |outs: Vec<Out>| {
            for o in outs {
                p.publish(o.msg_type, o.content);
            }
        };
        loop {
            {
                let r = pending.results.lock().expect("results");
                if r.done() {
                    break;
                }
            }
            if let Some(t) = interrupted
                && t.elapsed() >= INTERRUPT_GRACE
            {
                break;
            }
            tokio::select! {
                ev = rx.recv() => {
                    let Some(ev) = ev else { break };
                    if let ClientEvent::Iopub(m) = &ev
                        && m.msg_type() == "input_request"
                    {
                        asking = self.relay_input(m, &col, stdin).or(asking);
                        continue;
                    }
                    let mut r = pending.results.lock().expect("results");
                    if let Some((idx, ev)) = col.handle(&mut r, ev)
                        && stream {
                            if let Some(ev) = ev {
                                publish(streamer.on_event(&mut r, idx, &ev));
                            }
                            // An error that will not come on iopub (a dead
                            // engine): show it from the reply.
                            if r.engines[idx].done() {
                                publish(streamer.show_error(&mut r, idx));
                            }
                        }
                }
                r = interrupts.changed() => {
                    if r.is_err() { continue; }
                    if interrupted.is_none() {
                        interrupted = Some(Instant::now());
                        let sig = signal_number(&cfg.signal_on_interrupt).unwrap_or(2);
                        let running: Vec<(i64, String)> = {
                            let r = pending.results.lock().expect("results");
                            let engines = self.client.engines();
                            r.engines.iter().filter(|e| e.reply.is_none())
                                .filter_map(|e| engines.get(&e.engine_id).map(|u| (e.engine_id, u.clone())))
                                .collect()
                        };
                        p.stream("stderr", format!("Received Keyboard Interrupt. Sending signal {} to engines...\n", cfg.signal_on_interrupt));
                        let uuids: Vec<String> = running.iter().map(|r| r.1.clone()).collect();
                        if let Err(e) = self.client.signal(&uuids, sig) {
                            p.stream("stderr", format!("could not signal the engines: {e:#}\n"));
                        }
                    }
                }
                r = hub_link.changed() => {
                    if r.is_ok() {
                        let up = *hub_link.borrow_and_update();
                        p.stream("stderr", if up {
                            "[hub] reconnected to the hub\n"
                        } else {
                            "[hub] lost the connection to the hub; waiting for it to come back (the engines keep their work; interrupt to stop waiting)\n"
                        });
                    }
                }
                r = engines.changed() => {
                    if r.is_ok() {
                        let alive = self.client.engines();
                        let mut r = pending.results.lock().expect("results");
                        for idx in col.strand(&mut r, &alive) {
                            if stream {
                                publish(streamer.show_error(&mut r, idx));
                            }
                        }
                    }
                }
                exit = async {
                    match self.cluster.as_mut() {
                        Some(c) => c.exits.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some((id, pid, how)) = exit {
                        self.engine_exited(id, pid, &how);
                    }
                }
                _ = tick.tick() => {
                    let mut r = pending.results.lock().expect("results");
                    col.expire(&mut r);
                    if stream {
                        for i in 0..r.engines.len() {
                            if r.engines[i].done() {
                                publish(streamer.show_error(&mut r, i));
                            }
                        }
                    }
                    if let Some(at) = show_progress_at {
                        let now = Instant::now();
                        let n = r.finished();
                        let due = last_progress.is_none_or(|(k, t)| k != n || now - t >= Duration::from_millis(500));
                        if now >= at && due && !r.done() {
                            let text = progress_text(n, r.engines.len(), pending.started.elapsed());
                            p.publish(if progress_shown { "update_display_data" } else { "display_data" },
                                json!({"data": {"text/plain": text}, "metadata": {}, "transient": {"display_id": progress_id}}));
                            progress_shown = true;
                            last_progress = Some((n, now));
                        }
                    }
                }
            }
        }
        drop(asking);
        if progress_shown {
            p.publish(
                "update_display_data",
                json!({"data": {"text/plain": ""}, "metadata": {}, "transient": {"display_id": progress_id}}),
            );
        }
        let mut r = pending.results.lock().expect("results");
        if stream {
            for i in 0..r.engines.len() {
                if r.engines[i].reply.is_some() {
                    publish(streamer.show_error(&mut r, i));
                }
            }
            // CompileErrors held back for a shared display (not all targets
            // finished, e.g. interrupted): show them now.
            publish(streamer.finish(&mut r));
        } else {
            publish(display_outputs(&r, cfg.group_by, false, self.color, merge));
        }
        if interrupted.is_some() {
            let waiting: Vec<i64> = r
                .engines
                .iter()
                .filter(|e| e.reply.is_none())
                .map(|e| e.engine_id)
                .collect();
            let mut msg = format!(
                "interrupted: sent {} to the engines running the cell",
                cfg.signal_on_interrupt
            );
            if !waiting.is_empty() {
                msg.push_str(&format!(
                    "; engines {} did not return within {} s (their results will be dropped)",
                    fmt_ids(&waiting),
                    INTERRUPT_GRACE.as_secs()
                ));
            }
            return CellOutcome::Error(CellError {
                ename: "KeyboardInterrupt".into(),
                evalue: msg.clone(),
                traceback: vec![format!("KeyboardInterrupt: {msg}")],
            });
        }
        let errors = r.errors();
        if errors.is_empty() {
            return CellOutcome::Ok { result: None };
        }
        if stream {
            CellOutcome::Error(already_displayed_error(errors.len()))
        } else {
            CellOutcome::Error(results_composite_error(&r).expect("errors"))
        }
    }

    /// Whether the engine `uuid` forwards `input()`: its kernel_info (on
    /// control, answered at once even while it runs a cell) names
    /// `parallax-engine`. Asked once per engine, only for cells that would
    /// forward; no answer within 2 s counts as no (not remembered).
    async fn forwards_input(&mut self, uuid: &str) -> bool {
        if let Some(&yes) = self.forwards_input.get(uuid) {
            return yes;
        }
        let asked =
            self.client
                .request(Chan::Control, "kernel_info_request", json!({}), Some(uuid));
        match tokio::time::timeout(Duration::from_secs(2), asked).await {
            Ok(Ok(m)) => {
                let yes = m.content.get("implementation").and_then(Value::as_str)
                    == Some("parallax-engine");
                self.forwards_input.insert(uuid.to_owned(), yes);
                yes
            }
            _ => false,
        }
    }

    /// An engine's `input_request`: ask the frontend on a task of its own
    /// (the cell keeps streaming output and reacting to interrupts), then
    /// send the answer to the engine. Only for a cell that forwards stdin
    /// (the engine asks only then); the task is aborted with the returned
    /// guard.
    fn relay_input(
        &self,
        m: &parallax_wire::Message,
        col: &Collector,
        stdin: &FrontendStdin,
    ) -> Option<AbortOnDrop> {
        let idx = *col.idx_of.get(m.parent_msg_id()?)?;
        if !stdin.allowed {
            return None;
        }
        let uuid = col.uuids[idx].clone();
        let prompt = m
            .content
            .get("prompt")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let password = m
            .content
            .get("password")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let (client, stdin, request) = (self.client.clone(), stdin.clone(), m.clone());
        Some(AbortOnDrop(tokio::spawn(async move {
            if let Some(value) = stdin.ask(&prompt, password).await
                && let Err(e) = client.input_reply(&uuid, &value, &request)
            {
                warn!(error = %e, "input_reply not sent to the engine");
            }
        })))
    }

    fn pxconfig(&mut self, o: &PxOptions, p: &Publisher) -> CellOutcome {
        if *o == PxOptions::default() {
            let c = &self.config;
            p.stream(
                "stdout",
                format!(
                    "targets: {}\nblock: {}\nstream: {}\ngroup-outputs: {}\nprogress-after: {}\nverbose: {}\nsignal-on-interrupt: {}\nmerge: {}\nautopx: {}\n",
                    c.targets, c.block, c.stream, c.group_by.name(), c.progress_after, c.verbose,
                    c.signal_on_interrupt, c.merge, self.autopx
                ),
            );
            return CellOutcome::Ok { result: None };
        }
        if let Some(t) = &o.targets {
            // Check the spec now, so a typo fails here, not in a later cell.
            if let Err(e) = t.resolve(&self.client.ids()) {
                return CellOutcome::usage(&e);
            }
        }
        self.config = self.config.with(o);
        CellOutcome::Ok { result: None }
    }

    async fn pxresult(
        &mut self,
        group_by: Option<GroupBy>,
        name: Option<String>,
        p: &Publisher,
        interrupts: &mut watch::Receiver<u64>,
    ) -> CellOutcome {
        let pending = match &name {
            Some(n) => match self.named.get(n) {
                Some(x) => x.clone(),
                None => {
                    let mut names: Vec<&String> = self.named.keys().collect();
                    names.sort();
                    return CellOutcome::usage(&format!(
                        "no %px result named {n:?} (saved with --out: {names:?})"
                    ));
                }
            },
            None => match &self.last {
                Some(x) => x.clone(),
                None => return CellOutcome::usage(NO_LAST_RESULT),
            },
        };
        let mut done = pending.done.subscribe();
        interrupts.borrow_and_update();
        while !pending.is_done() {
            tokio::select! {
                _ = done.changed() => {}
                _ = interrupts.changed() => {
                    return CellOutcome::error("KeyboardInterrupt", "interrupted while waiting for the result (the engines keep running; %pxresult again later)");
                }
            }
        }
        let r = pending.results.lock().expect("results");
        let outs = display_outputs(
            &r,
            group_by.unwrap_or(self.config.group_by),
            false,
            self.color,
            self.config.merge && r.engines.len() >= pending.merge_min,
        );
        for o in outs {
            p.publish(o.msg_type, o.content);
        }
        match results_composite_error(&r) {
            Some(e) => CellOutcome::Error(e),
            None => CellOutcome::Ok { result: None },
        }
    }

    async fn engines(&mut self, p: &Publisher) -> CellOutcome {
        let status = match self.client.queue_status().await {
            Ok(s) => s,
            Err(e) => return CellOutcome::error("HubError", &format!("{e:#}")),
        };
        let engines = self.client.engines();
        let mut out = format!(
            "{:<4} {:<10} {:<7} {:>5} {:>5} {:>9} {:>8}\n",
            "ID", "UUID", "STATUS", "QUEUE", "TASKS", "COMPLETED", "PID"
        );
        for (id, uuid) in &engines {
            let s = status.get(id.to_string()).cloned().unwrap_or(json!({}));
            let n = |k: &str| s.get(k).and_then(Value::as_i64).unwrap_or(0);
            let queue = n("queue");
            let pid = self
                .cluster
                .as_ref()
                .and_then(|c| c.pid(*id))
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into());
            out.push_str(&format!(
                "{:<4} {:<10} {:<7} {:>5} {:>5} {:>9} {:>8}\n",
                id,
                &uuid[..uuid.len().min(8)],
                if queue > 0 { "busy" } else { "idle" },
                queue,
                n("tasks"),
                n("completed"),
                pid
            ));
        }
        out.push_str(&format!(
            "{} engine{} registered; {}\n",
            engines.len(),
            if engines.len() == 1 { "" } else { "s" },
            self.where_()
        ));
        let missing = self.unregistered_engines();
        if !missing.is_empty() {
            out.push_str(&format!(
                "{} more started but not registered yet: engines {}\n",
                missing.len(),
                fmt_ids(&missing)
            ));
        }
        p.stream("stdout", out);
        CellOutcome::Ok { result: None }
    }

    /// Engines of the embedded cluster whose processes run but which have
    /// not registered (yet).
    fn unregistered_engines(&self) -> Vec<i64> {
        let Some(c) = &self.cluster else {
            return Vec::new();
        };
        let have = self.client.engines();
        c.engine_ids()
            .into_iter()
            .filter(|id| !have.contains_key(id))
            .collect()
    }

    /// A note for the cell's output while some of the embedded cluster's
    /// engines have not registered: once per change of the count.
    fn starting_note(&mut self) -> Option<String> {
        let missing = self.unregistered_engines();
        let registered = self.client.engines().len();
        let embedded = self.cluster.as_ref().map_or(0, |c| c.engine_ids().len());
        let launched_registered = registered.saturating_sub(embedded - missing.len());
        let launched_pending = self.launched.expected().saturating_sub(launched_registered);
        if missing.is_empty() && launched_pending == 0 {
            self.noted_registered = None;
            return None;
        }
        if self.noted_registered == Some(registered) {
            return None;
        }
        self.noted_registered = Some(registered);
        if launched_pending > 0 {
            return Some(format!(
                "[parallax] {registered} engines registered; running on those. {launched_pending} launched engines are pending ({}) and join when they register (%cluster shows them).\n",
                self.launched.states()
            ));
        }
        Some(format!(
            "[parallax] {registered} of {} engines registered; running on those. Engines {} are still starting and join when they register (%engines shows them).\n",
            registered + missing.len(),
            fmt_ids(&missing)
        ))
    }

    fn where_(&self) -> String {
        match &self.cluster {
            Some(c) => format!(
                "embedded cluster (hub in the kernel, client file {})",
                c.client_file().display()
            ),
            None => format!(
                "connected to the hub at {}:{}",
                self.client.info().interface,
                self.client.info().registration
            ),
        }
    }

    async fn wait_registered(&self, ids: &[i64]) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.engine_timeout;
        let mut w = self.client.watch_engines();
        loop {
            let have = self.client.engines();
            if ids.iter().all(|i| have.contains_key(i)) {
                return Ok(());
            }
            tokio::select! {
                r = w.changed() => { r.map_err(|_| anyhow!("hub connection closed"))?; }
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(anyhow!("engines {} did not register within {:?}", fmt_ids(ids), self.engine_timeout));
                }
            }
        }
    }

    async fn wait_unregistered(&self, ids: &[i64], timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut w = self.client.watch_engines();
        loop {
            let have = self.client.engines();
            if ids.iter().all(|i| !have.contains_key(i)) {
                return;
            }
            tokio::select! {
                r = w.changed() => if r.is_err() { return },
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    async fn cluster_magic(&mut self, cmd: ClusterCommand, p: &Publisher) -> CellOutcome {
        match cmd {
            ClusterCommand::Show => {
                let ids = self.client.ids();
                let mut s = format!("{}\nengines: {}\n", self.where_(), fmt_ids(&ids));
                if let Some(c) = &self.cluster {
                    s.push_str(&format!(
                        "engine processes: {}\n",
                        c.engine_ids()
                            .iter()
                            .map(|i| format!("{i} (pid {})", c.pid(*i).unwrap_or(0)))
                            .collect::<Vec<_>>()
                            .join(", "),
                    ));
                    match self.spec.language {
                        Language::Python => {
                            s.push_str(&format!("engine python: {}\n", self.spec.python.display()))
                        }
                        Language::Rust => s.push_str("engine language: rust (evcxr)\n"),
                    }
                }
                // the launched sets' current states
                let _ = self.poll_launched(Duration::ZERO).await;
                s.push_str(&self.launched.show());
                p.stream("stdout", s);
                CellOutcome::Ok { result: None }
            }
            ClusterCommand::Start(words) => self.cluster_start(words, p).await,
            ClusterCommand::Add(n) => {
                let Some(c) = self.cluster.as_mut() else {
                    return CellOutcome::usage(
                        "%cluster add works on the embedded cluster; add engines to an external cluster with `parallax cluster` / `ipcluster engines` or `parallax engine --file=…`",
                    );
                };
                let ids = match c.add_engines(n) {
                    Ok(ids) => ids,
                    Err(e) => return CellOutcome::error("ClusterError", &format!("{e:#}")),
                };
                if let Err(e) = self.wait_registered(&ids).await {
                    return CellOutcome::error("ClusterError", &format!("{e:#}"));
                }
                p.stream(
                    "stdout",
                    format!(
                        "Started engines {}; now {} engines\n",
                        fmt_ids(&ids),
                        self.client.ids().len()
                    ),
                );
                CellOutcome::Ok { result: None }
            }
            ClusterCommand::Stop(ids) => {
                let all = self.client.ids();
                let ids = ids.unwrap_or_else(|| all.clone());
                if let Some(bad) = ids.iter().find(|i| !all.contains(i)) {
                    return CellOutcome::usage(&format!(
                        "no engine with id {bad}: engines are {}",
                        fmt_ids(&all)
                    ));
                }
                let (ours, theirs): (Vec<i64>, Vec<i64>) = ids
                    .iter()
                    .partition(|i| self.cluster.as_ref().is_some_and(|c| c.owns(**i)));
                if let Some(c) = self.cluster.as_mut() {
                    c.stop_engines(&ours, Duration::from_secs(3)).await;
                }
                let engines = self.client.engines();
                for id in &theirs {
                    if let Some(u) = engines.get(id) {
                        let _ = self.client.send(
                            Chan::Control,
                            Some(u),
                            "shutdown_request",
                            json!({"restart": false}),
                            json!({}),
                        );
                    }
                }
                self.wait_unregistered(&ids, Duration::from_secs(5)).await;
                p.stream(
                    "stdout",
                    format!(
                        "Stopped engines {}; {} engines left\n",
                        fmt_ids(&ids),
                        self.client.ids().len()
                    ),
                );
                CellOutcome::Ok { result: None }
            }
            ClusterCommand::Restart(ids) => {
                let Some(c) = self.cluster.as_mut() else {
                    return CellOutcome::usage(
                        "%cluster restart works on the embedded cluster's engines; this kernel is connected to an external cluster",
                    );
                };
                let owned = c.engine_ids();
                let ids = ids.unwrap_or_else(|| owned.clone());
                if let Some(bad) = ids.iter().find(|i| !owned.contains(i)) {
                    return CellOutcome::usage(&format!(
                        "engine {bad} is not an engine of this kernel's cluster (engines: {})",
                        fmt_ids(&owned)
                    ));
                }
                if let Err(e) = c.restart_engines(&ids).await {
                    return CellOutcome::error("ClusterError", &format!("{e:#}"));
                }
                // The old registrations go first; then the same ids come back.
                tokio::time::sleep(Duration::from_millis(50)).await;
                if let Err(e) = self.wait_registered(&ids).await {
                    return CellOutcome::error("ClusterError", &format!("{e:#}"));
                }
                p.stream(
                    "stdout",
                    format!("Restarted engines {} (fresh namespaces)\n", fmt_ids(&ids)),
                );
                CellOutcome::Ok { result: None }
            }
            ClusterCommand::Connect(file) => {
                let client = match HubClient::connect_file(std::path::Path::new(&file)).await {
                    Ok(c) => c,
                    Err(e) => return CellOutcome::error("ClusterError", &format!("{e:#}")),
                };
                if let Some(mut c) = self.cluster.take() {
                    self.client.close();
                    c.shutdown().await;
                }
                self.client = client;
                self.local_links = 0;
                self.last = None;
                self.named.clear();
                self.config.targets = Targets::All;
                self.local
                    .lock()
                    .await
                    .set_client_file(Some(std::path::PathBuf::from(&file)));
                p.stream(
                    "stdout",
                    format!(
                        "Connected to {file}: engines {}\n",
                        fmt_ids(&self.client.ids())
                    ),
                );
                CellOutcome::Ok { result: None }
            }
        }
    }

    /// Hand the frontend what complete/inspect need (the hub client and the
    /// current targets), so they never wait for the shell worker.
    fn publish_assist(&self) {
        self.assist.send_replace(Some(Assist {
            client: self.client.clone(),
            targets: self.config.targets.clone(),
            local: (self.spec.language == Language::Python).then(|| self.local.clone()),
            autopx: self.autopx,
        }));
    }
}

/// complete/inspect for the frontend: forwarded to the first target engine
/// of the session's current targets. A copy of the session's hub client, so
/// a request goes out while a cell runs or the worker waits; the engine
/// answers it between its own requests.
#[derive(Clone)]
pub struct Assist {
    client: HubClient,
    targets: Targets,
    /// The Python kernel's local interpreter, for local cells.
    local: Option<Arc<tokio::sync::Mutex<LocalPython>>>,
    autopx: bool,
}

impl Assist {
    /// The engine's reply content, or None if there is no engine to ask or
    /// it failed. The caller bounds the wait.
    pub async fn forward(&self, msg_type: &str, content: &Value) -> Option<Value> {
        if let Some(local) = &self.local {
            let code = content.get("code").and_then(Value::as_str).unwrap_or("");
            if crate::magics::is_local_cell(code, self.autopx) {
                // a local cell running holds the interpreter: no answer then
                let mut l = local.try_lock().ok()?;
                return l.assist(msg_type, content).await;
            }
        }
        let engines = self.client.engines();
        let ids: Vec<i64> = engines.keys().copied().collect();
        let id = *self.targets.resolve(&ids).ok()?.first()?;
        let uuid = engines.get(&id)?;
        match self
            .client
            .request(Chan::Mux, msg_type, content.clone(), Some(uuid))
            .await
        {
            Ok(m) => {
                let mut c = m.content;
                if let Some(o) = c.as_object_mut() {
                    o.remove("engine_info");
                }
                Some(c)
            }
            Err(e) => {
                warn!(engine = id, error = %e, msg_type, "forwarded request failed");
                None
            }
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why `input()` on the engines of a cell is not forwarded to the frontend
/// (the end of the engine's StdinNotImplementedError sentence, after
/// "input() "), or `None` when it is: a blocking cell with one target
/// whose execute_request allowed stdin.
const STDIN_ONLY: &str = "is forwarded to the notebook only";

fn stdin_refused(allowed: bool, block: bool, targets: &[(i64, String)]) -> Option<String> {
    const WHERE: &str = STDIN_ONLY;
    if !allowed {
        Some(format!(
            "{WHERE} when the frontend accepts input; this execute_request has allow_stdin false"
        ))
    } else if !block {
        Some(format!(
            "{WHERE} when a cell blocks; this cell runs with --noblock"
        ))
    } else if targets.len() != 1 {
        let first = targets.first().map(|t| t.0).unwrap_or(0);
        Some(format!(
            "{WHERE} when a cell targets one engine; this cell targets {} engines (use %%px --targets {first})",
            targets.len()
        ))
    } else {
        None
    }
}

fn fmt_ids(ids: &[i64]) -> String {
    let s: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    format!("[{}]", s.join(", "))
}

/// tqdm's text bar: `%px:  50%|#####     | 2/4 [00:03<00:03,  0.66tasks/s]`.
pub fn progress_text(n: usize, total: usize, elapsed: Duration) -> String {
    let frac = if total == 0 {
        1.0
    } else {
        n as f64 / total as f64
    };
    let width = 10;
    let filled = ((frac * width as f64).floor() as usize).min(width);
    let bar: String = "█".repeat(filled) + &" ".repeat(width - filled);
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { n as f64 / secs } else { 0.0 };
    let remaining = if n > 0 && rate > 0.0 {
        fmt_mmss((total - n) as f64 / rate)
    } else {
        "?".into()
    };
    format!(
        "%px: {:>3.0}%|{bar}| {n}/{total} [{}<{remaining}, {rate:>5.2}tasks/s]",
        frac * 100.0,
        fmt_mmss(secs)
    )
}

fn fmt_mmss(s: f64) -> String {
    let s = s.round() as u64;
    format!("{:02}:{:02}", s / 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdin_is_forwarded_only_for_one_blocking_target_that_allows_it() {
        let one = [(2, "u2".to_owned())];
        let four: Vec<(i64, String)> = (0..4).map(|i| (i, format!("u{i}"))).collect();
        assert_eq!(stdin_refused(true, true, &one), None);
        assert_eq!(
            stdin_refused(true, true, &four).as_deref(),
            Some(
                "is forwarded to the notebook only when a cell targets one engine; this cell targets 4 engines (use %%px --targets 0)"
            )
        );
        assert_eq!(
            stdin_refused(true, false, &one).as_deref(),
            Some(
                "is forwarded to the notebook only when a cell blocks; this cell runs with --noblock"
            )
        );
        // the frontend's refusal is named first: it is the one to fix
        assert_eq!(
            stdin_refused(false, true, &four).as_deref(),
            Some(
                "is forwarded to the notebook only when the frontend accepts input; this execute_request has allow_stdin false"
            )
        );
    }

    #[test]
    fn progress_bar_text() {
        assert_eq!(
            progress_text(2, 4, Duration::from_secs(3)),
            "%px:  50%|█████     | 2/4 [00:03<00:03,  0.67tasks/s]"
        );
        assert_eq!(
            progress_text(0, 4, Duration::from_secs(2)),
            "%px:   0%|          | 0/4 [00:02<?,  0.00tasks/s]"
        );
    }
}
