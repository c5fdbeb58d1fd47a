//! The engine's I/O: registration, heartbeat, shell/control/iopub, and the
//! request loop that feeds the interpreter.
//!
//! Tasks and who owns what:
//! * heartbeat task — owns the ping SUB and pong DEALER; echoes every ping
//!   at once (never waits for Python) and stamps `last_ping`;
//! * shell receive task — owns the shell ROUTER's receive half; verifies
//!   messages and queues them for the executor;
//! * control task — owns the control ROUTER; answers abort/clear/signal/
//!   shutdown while a request runs;
//! * iopub task — owns the iopub XPUB (reads subscriptions, publishes);
//! * executor (this function's loop) — owns the interpreter and the shell
//!   ROUTER's send half; runs one request at a time.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use chrono::Utc;
use parallax_wire::connection::{EngineConnectionInfo, connection_file_names};
use parallax_wire::{Authenticator, Limits, Message, RawMessage, Session, Signer, format_date};
use serde_json::{Map, Value, json};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use zeromq::{
    DealerSocket, RouterSocket, Socket, SocketOptions, SocketRecv, SocketSend, SubSocket,
    XPubSocket, ZmqMessage,
};

use crate::cli::EngineArgs;
use crate::cli::Language;
use crate::interpreter::{Interpreter, Output, Reply, Request, SignalHandle};
use crate::python::{PythonConfig, PythonInterpreter};
#[cfg(feature = "rust-engine")]
use crate::rust::RustInterpreter;

/// The engine's language runtime, chosen by `--language` (one per engine,
/// so the size difference does not matter).
#[allow(clippy::large_enum_variant)]
enum AnyInterpreter {
    Python(PythonInterpreter),
    #[cfg(feature = "rust-engine")]
    Rust(RustInterpreter),
}

impl Interpreter for AnyInterpreter {
    async fn run(&mut self, req: Request, out: crate::interpreter::OutputSink) -> Reply {
        match self {
            AnyInterpreter::Python(i) => i.run(req, out).await,
            #[cfg(feature = "rust-engine")]
            AnyInterpreter::Rust(i) => i.run(req, out).await,
        }
    }

    fn signal_handle(&self) -> SignalHandle {
        match self {
            AnyInterpreter::Python(i) => i.signal_handle(),
            #[cfg(feature = "rust-engine")]
            AnyInterpreter::Rust(i) => i.signal_handle(),
        }
    }

    async fn shutdown(&mut self) {
        match self {
            AnyInterpreter::Python(i) => i.shutdown().await,
            #[cfg(feature = "rust-engine")]
            AnyInterpreter::Rust(i) => i.shutdown().await,
        }
    }

    fn language_info(&self) -> Value {
        match self {
            AnyInterpreter::Python(i) => i.language_info(),
            #[cfg(feature = "rust-engine")]
            AnyInterpreter::Rust(i) => i.language_info(),
        }
    }

    fn is_dead(&self) -> bool {
        match self {
            AnyInterpreter::Python(i) => i.is_dead(),
            #[cfg(feature = "rust-engine")]
            AnyInterpreter::Rust(i) => i.is_dead(),
        }
    }
}

fn now_str() -> String {
    format_date(Utc::now())
}

fn profile_dir(args: &EngineArgs) -> PathBuf {
    parallax_wire::connection::resolve_profile_dir(
        args.profile_dir.as_deref(),
        args.ipython_dir.as_deref(),
        &args.profile,
        |k| std::env::var(k).ok(),
    )
}

/// The engine connection info: `$IPP_CONNECTION_INFO`, `--file`, or the
/// profile's security dir (waiting up to `--timeout` for it to appear).
async fn connection_info(args: &EngineArgs) -> Result<EngineConnectionInfo> {
    if let Ok(s) = std::env::var("IPP_CONNECTION_INFO")
        && !s.is_empty()
    {
        return serde_json::from_str(&s).context("parsing $IPP_CONNECTION_INFO");
    }
    let path = match &args.file {
        Some(f) => f.clone(),
        None => {
            let cluster_id = args
                .cluster_id
                .clone()
                .or_else(|| std::env::var("IPP_CLUSTER_ID").ok())
                .unwrap_or_default();
            profile_dir(args)
                .join("security")
                .join(connection_file_names(&cluster_id).1)
        }
    };
    let wait = args.wait_for_url_file.unwrap_or(args.timeout);
    let deadline = Instant::now() + Duration::from_secs_f64(wait.max(0.0));
    loop {
        match std::fs::read_to_string(&path) {
            Ok(s) => match serde_json::from_str(&s) {
                Ok(info) => return Ok(info),
                Err(e) if Instant::now() >= deadline => {
                    bail!(
                        "{} is not a valid engine connection file: {e}",
                        path.display()
                    )
                }
                Err(_) => {}
            },
            Err(e) if Instant::now() >= deadline => {
                bail!("engine connection file {}: {e}", path.display())
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn identity_opts(uuid: &str) -> SocketOptions {
    let mut o = SocketOptions::default();
    o.peer_identity(
        zeromq::util::PeerIdentity::try_from(uuid.as_bytes().to_vec())
            .expect("uuid is a valid identity"),
    );
    o
}

/// A shell request waiting to run.
struct Queued {
    idents: Vec<Bytes>,
    msg: Message,
}

struct Shared {
    queue: Mutex<VecDeque<Queued>>,
    notify: Notify,
    aborted: Mutex<HashSet<String>>,
}

pub async fn run(args: EngineArgs, shutdown: CancellationToken) -> Result<()> {
    let mut info = connection_info(&args).await?;
    // ipengine's --Session.key / --Session.keyfile override the file's key
    if let Some(f) = &args.session_keyfile {
        info.key = std::fs::read_to_string(f)
            .with_context(|| format!("reading the session key file {}", f.display()))?
            .trim()
            .to_owned();
    }
    if let Some(k) = &args.session_key {
        info.key = k.clone();
    }
    let interface = match (&args.url, &args.controller_ip) {
        (Some(u), _) => u.trim_end_matches('/').to_owned(),
        (None, Some(ip)) => format!("tcp://{ip}"),
        (None, None) => {
            // A hub bound on all interfaces is reached at its location.
            let i = info.interface.clone();
            if i.ends_with("://*") || i.ends_with("://0.0.0.0") {
                format!("tcp://{}", info.location)
            } else {
                let here = crate::reach::hostname();
                if let Some(e) = crate::reach::loopback_elsewhere(&i, &info.location, &here) {
                    bail!(e);
                }
                i
            }
        }
    };
    let url = |port: u16| format!("{interface}:{port}");
    let uuid = uuid::Uuid::new_v4().to_string();
    let signer = Signer::new(info.key.as_bytes());
    let mut session = Session::new(
        signer.clone(),
        uuid.clone(),
        "parallax-engine".into(),
        std::process::id(),
    );
    let mut auth = Authenticator::new(signer.clone());
    let limits = Limits::default();

    // The interpreter starts after registration (below); a Python that
    // cannot be found is reported now, before the hub counts this engine.
    match args.language {
        Language::Python => {
            crate::python::find_executable(&args.python)?;
        }
        Language::Rust if !crate::RUST_ENGINE_BUILT => bail!(crate::RUST_ENGINE_MISSING),
        Language::Rust => {}
    }

    // --- registration
    let mut reg = DealerSocket::with_options(identity_opts(&uuid));
    let total = Duration::from_secs_f64(args.timeout.max(0.0));
    tokio::time::timeout(total, reg.connect(&url(info.registration)))
        .await
        .map_err(|_| anyhow::anyhow!("could not reach the hub at {}", url(info.registration)))?
        .context("connecting to the hub")?;
    // an explicit --id, else the MPI/srun rank (so engine id == rank)
    let want_id = args
        .id
        .or_else(|| crate::rank::rank_from_env(|k| std::env::var(k).ok()));
    let reply = register(&mut reg, &mut session, &mut auth, &uuid, want_id, total).await?;
    let id = reply
        .content
        .get("id")
        .and_then(Value::as_i64)
        .context("registration reply without id")?;
    let hb_period = Duration::from_millis(
        reply
            .content
            .get("hb_period")
            .and_then(Value::as_u64)
            .unwrap_or(3000),
    );
    info!(engine = id, %uuid, "registered");

    // --- sockets
    let mut shell = RouterSocket::with_options(identity_opts(&uuid));
    let leaves = &info.broadcast;
    let mut shell_urls = vec![url(info.mux), url(info.task)];
    if !leaves.is_empty() {
        shell_urls.push(url(leaves[(id.max(0) as usize) % leaves.len()]));
    }
    for u in &shell_urls {
        shell
            .connect(u)
            .await
            .with_context(|| format!("connecting shell to {u}"))?;
    }
    let mut control = RouterSocket::with_options(identity_opts(&uuid));
    control
        .connect(&url(info.control))
        .await
        .context("connecting control")?;
    let mut iopub = XPubSocket::new();
    iopub
        .connect(&url(info.iopub))
        .await
        .context("connecting iopub")?;
    let mut ping = SubSocket::new();
    ping.subscribe("").await?;
    ping.connect(&url(info.hb_ping))
        .await
        .context("connecting heartbeat")?;
    let mut pong = DealerSocket::with_options(identity_opts(&uuid));
    pong.connect(&url(info.hb_pong))
        .await
        .context("connecting heartbeat")?;
    // A first pong at once: the hub completes a registration on any pong
    // of that uuid, so this one needs no ping (which every engine would
    // answer); for an engine already registered it is a harmless stale beat.
    first_pong(&mut pong).await;

    let stop = shutdown.child_token();
    let last_ping = Arc::new(AtomicU64::new(0));
    let started = Instant::now();

    // heartbeat: echo every ping from Rust
    {
        let last_ping = last_ping.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
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
    // heartbeat monitor: a controller that stops pinging makes us leave
    {
        let last_ping = last_ping.clone();
        let stop = stop.clone();
        let max = args.max_heartbeat_misses;
        let period = hb_period + Duration::from_millis(500);
        tokio::spawn(async move {
            let mut misses = 0;
            let mut seen = 0;
            let mut tick = tokio::time::interval(period);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let lp = last_ping.load(Ordering::Relaxed);
                if lp == seen {
                    misses += 1;
                    warn!(misses, "no heartbeat from the controller");
                    if max > 0 && misses >= max {
                        warn!("the controller stopped sending heartbeats; shutting down");
                        stop.cancel();
                        return;
                    }
                } else {
                    misses = 0;
                    seen = lp;
                }
            }
        });
    }

    // iopub publisher
    let (iopub_tx, mut iopub_rx) = mpsc::unbounded_channel::<Vec<Bytes>>();
    let iopub_task = tokio::spawn(async move {
        loop {
            tokio::select! {
                f = iopub_rx.recv() => {
                    let Some(f) = f else { return };
                    if let Ok(m) = ZmqMessage::try_from(f) {
                        let _ = iopub.send(m).await;
                    }
                }
                _ = iopub.recv() => {}
            }
        }
    });

    let shared = Arc::new(Shared {
        queue: Mutex::new(VecDeque::new()),
        notify: Notify::new(),
        aborted: Mutex::new(HashSet::new()),
    });
    let (shell_send, mut shell_recv) = shell.split();

    // shell receive: verify and queue
    {
        let shared = shared.clone();
        let stop = stop.clone();
        let mut auth = auth.clone();
        tokio::spawn(async move {
            loop {
                let m = tokio::select! {
                    _ = stop.cancelled() => return,
                    m = shell_recv.recv() => m,
                };
                let Ok(m) = m else { continue };
                let Some((raw, msg)) = accept(m.into_vec(), &limits, &mut auth, "shell") else {
                    continue;
                };
                shared.queue.lock().expect("queue lock").push_back(Queued {
                    idents: raw.idents,
                    msg,
                });
                shared.notify.notify_one();
            }
        });
    }

    let ctx = Ctx {
        session: Arc::new(Mutex::new(session)),
        uuid: uuid.clone(),
        id,
        iopub: iopub_tx.clone(),
    };

    // control: answered while requests run
    let (sig_tx, mut sig_rx) = mpsc::unbounded_channel::<ControlAction>();
    {
        let ctx = ctx.clone();
        let shared = shared.clone();
        let stop = stop.clone();
        let mut auth = auth.clone();
        tokio::spawn(async move {
            loop {
                let m = tokio::select! {
                    _ = stop.cancelled() => return,
                    m = control.recv() => m,
                };
                let Ok(m) = m else { continue };
                let Some((raw, msg)) = accept(m.into_vec(), &limits, &mut auth, "control") else {
                    continue;
                };
                let idents = raw.idents.clone();
                let (reply_type, content) = match msg.header.msg_type.as_str() {
                    "abort_request" => {
                        let ids: Vec<String> = match msg.content.get("msg_ids") {
                            Some(Value::Array(a)) => a
                                .iter()
                                .filter_map(|v| v.as_str().map(str::to_owned))
                                .collect(),
                            Some(Value::String(s)) => vec![s.clone()],
                            _ => vec![],
                        };
                        if ids.is_empty() {
                            // abort everything queued now
                            let q: Vec<Queued> =
                                shared.queue.lock().expect("queue lock").drain(..).collect();
                            for item in q {
                                shared
                                    .aborted
                                    .lock()
                                    .expect("aborted lock")
                                    .insert(item.msg.header.msg_id.clone());
                                shared.queue.lock().expect("queue lock").push_back(item);
                            }
                            shared.notify.notify_one();
                        } else {
                            shared.aborted.lock().expect("aborted lock").extend(ids);
                        }
                        ("abort_reply", json!({"status": "ok"}))
                    }
                    "clear_request" => {
                        let _ = sig_tx.send(ControlAction::Clear);
                        ("clear_reply", json!({"status": "ok"}))
                    }
                    "signal_request" | "interrupt_request" => {
                        let sig = match msg.content.get("sig") {
                            Some(Value::Number(n)) => {
                                n.as_i64().unwrap_or(libc::SIGINT as i64) as i32
                            }
                            Some(Value::String(s)) => signal_number(s).unwrap_or(-1),
                            _ => libc::SIGINT,
                        };
                        if sig < 0 {
                            (
                                "signal_reply",
                                json!({"status": "error", "ename": "ValueError", "evalue": "unknown signal", "traceback": []}),
                            )
                        } else {
                            let _ = sig_tx.send(ControlAction::Signal(sig));
                            (
                                if msg.header.msg_type == "signal_request" {
                                    "signal_reply"
                                } else {
                                    "interrupt_reply"
                                },
                                json!({"status": "ok"}),
                            )
                        }
                    }
                    "shutdown_request" => {
                        let restart = msg
                            .content
                            .get("restart")
                            .and_then(Value::as_bool)
                            .unwrap_or(false);
                        let content = json!({"status": "ok", "restart": restart});
                        ctx.publish("shutdown_reply", "shutdown_reply", &content, &msg, vec![]);
                        ctx.send_to(
                            &mut ControlSender::Router(&mut control),
                            idents,
                            "shutdown_reply",
                            &content,
                            &msg,
                            Map::new(),
                            vec![],
                        )
                        .await;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        stop.cancel();
                        return;
                    }
                    "kernel_info_request" => ("kernel_info_reply", kernel_info()),
                    other => {
                        warn!(msg_type = other, "unknown control request");
                        (
                            "error_reply",
                            json!({"status": "error", "ename": "ValueError", "evalue": format!("unknown control request {other:?}"), "traceback": []}),
                        )
                    }
                };
                ctx.send_to(
                    &mut ControlSender::Router(&mut control),
                    idents,
                    reply_type,
                    &content,
                    &msg,
                    Map::new(),
                    vec![],
                )
                .await;
            }
        });
    }

    // Signals to the engine process: leave the hub cleanly.
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
            tokio::select! {
                _ = term.recv() => info!("SIGTERM: shutting down"),
                _ = int.recv() => info!("SIGINT: shutting down"),
                _ = stop.cancelled() => {}
            }
            stop.cancel();
        });
    }

    // --- interpreter: started only now, with heartbeats already answered,
    // so the hub completes the registration without waiting for Python (or
    // evcxr) to start; requests that arrive meanwhile wait in the queue.
    let mut env = vec![
        ("PARALLAX_ENGINE_ID".to_owned(), id.to_string()),
        ("PARALLAX_ENGINE_UUID".to_owned(), uuid.clone()),
    ];
    if let Some(n) = args.n_engines {
        env.push(("PARALLAX_N_ENGINES".to_owned(), n.to_string()));
    }
    if !args.warm_imports {
        env.push(("PARALLAX_WARMUP".to_owned(), "0".to_owned()));
    }
    let started_interp = match args.language {
        Language::Python => PythonInterpreter::start(PythonConfig {
            python: args.python.clone(),
            env,
            restart_on_crash: args.restart_on_crash,
        })
        .await
        .map(AnyInterpreter::Python),
        #[cfg(feature = "rust-engine")]
        Language::Rust => Ok(AnyInterpreter::Rust(RustInterpreter::start(env))),
        #[cfg(not(feature = "rust-engine"))]
        Language::Rust => Err(anyhow::anyhow!(crate::RUST_ENGINE_MISSING)),
    };
    let mut interp = match started_interp {
        Ok(i) => i,
        Err(e) => {
            unregister(&mut reg, &ctx, id).await;
            stop.cancel();
            return Err(e);
        }
    };

    // --- executor
    let mut shell_send = shell_send;
    let mut execution_count: i64 = 0;
    let signals = interp.signal_handle();
    loop {
        // control actions first
        while let Ok(a) = sig_rx.try_recv() {
            apply_control(a, &signals, &mut interp).await;
        }
        let next = shared.queue.lock().expect("queue lock").pop_front();
        let Some(item) = next else {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = shared.notify.notified() => continue,
                a = sig_rx.recv() => {
                    if let Some(a) = a {
                        apply_control(a, &signals, &mut interp).await;
                    }
                    continue;
                }
            }
        };
        let msg = &item.msg;
        let msg_id = msg.header.msg_id.clone();
        let mut md = init_metadata(msg, &uuid);
        if shared.aborted.lock().expect("aborted lock").remove(&msg_id) {
            // busy, reply, idle: as ipykernel answers an aborted request
            ctx.publish(
                "status",
                "status",
                &json!({"execution_state": "busy"}),
                msg,
                vec![],
            );
            md.insert("status".into(), json!("aborted"));
            let content =
                json!({"status": "aborted", "engine_info": {"engine_uuid": uuid, "engine_id": id}});
            let rt = reply_type(&msg.header.msg_type);
            ctx.send_to(
                &mut ControlSender::Shell(&mut shell_send),
                item.idents.clone(),
                &rt,
                &content,
                msg,
                md,
                vec![],
            )
            .await;
            ctx.publish(
                "status",
                "status",
                &json!({"execution_state": "idle"}),
                msg,
                vec![],
            );
            continue;
        }
        let req = match msg.header.msg_type.as_str() {
            "execute_request" => {
                let c = &msg.content;
                let silent = c.get("silent").and_then(Value::as_bool).unwrap_or(false);
                let store = c
                    .get("store_history")
                    .and_then(Value::as_bool)
                    .unwrap_or(!silent);
                if !silent && store {
                    execution_count += 1;
                }
                let code = c
                    .get("code")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                Some(Request::Execute {
                    code,
                    silent,
                    store_history: store,
                    user_expressions: c.get("user_expressions").cloned().unwrap_or(json!({})),
                    execution_count,
                })
            }
            "apply_request" => Some(Request::Apply {
                buffers: msg.buffers.clone(),
            }),
            "complete_request" => Some(Request::Complete {
                code: msg
                    .content
                    .get("code")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                cursor_pos: msg
                    .content
                    .get("cursor_pos")
                    .and_then(Value::as_i64)
                    .unwrap_or(0),
            }),
            "inspect_request" => Some(Request::Inspect {
                code: msg
                    .content
                    .get("code")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                cursor_pos: msg
                    .content
                    .get("cursor_pos")
                    .and_then(Value::as_i64)
                    .unwrap_or(0),
                detail_level: msg
                    .content
                    .get("detail_level")
                    .and_then(Value::as_i64)
                    .unwrap_or(0),
            }),
            "is_complete_request" => Some(Request::IsComplete {
                code: msg
                    .content
                    .get("code")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
            }),
            _ => None,
        };
        ctx.publish(
            "status",
            "status",
            &json!({"execution_state": "busy"}),
            msg,
            vec![],
        );
        let reply = match req {
            None if msg.header.msg_type == "kernel_info_request" => Reply {
                content: kernel_info_with(interp.language_info()),
                ..Reply::default()
            },
            None => {
                warn!(msg_type = %msg.header.msg_type, "unknown shell request");
                Reply::error(
                    "ValueError",
                    format!("unknown request type {:?}", msg.header.msg_type),
                )
            }
            Some(req) => {
                if let Request::Execute {
                    code,
                    execution_count,
                    ..
                } = &req
                {
                    ctx.publish(
                        "execute_input",
                        "execute_input",
                        &json!({"code": code, "execution_count": execution_count}),
                        msg,
                        vec![],
                    );
                }
                let (tx, mut rx) = mpsc::unbounded_channel::<Output>();
                let fut = interp.run(req, tx);
                tokio::pin!(fut);
                let reply = loop {
                    tokio::select! {
                        r = &mut fut => break r,
                        Some(o) = rx.recv() => ctx.publish_output(o, msg),
                        Some(a) = sig_rx.recv() => {
                            match a {
                                ControlAction::Signal(s) => {
                                    if let Err(e) = signals.send(s) {
                                        warn!(error = %e, "signal not delivered");
                                    }
                                }
                                ControlAction::Clear => {}
                            }
                        }
                    }
                };
                while let Ok(o) = rx.try_recv() {
                    ctx.publish_output(o, msg);
                }
                reply
            }
        };
        let mut content = reply.content;
        let status = content
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("error")
            .to_owned();
        if msg.header.msg_type == "execute_request" {
            content
                .entry("execution_count")
                .or_insert(json!(execution_count));
            content.entry("user_expressions").or_insert(json!({}));
            content.entry("payload").or_insert(json!([]));
        }
        if status == "error" {
            let method = if msg.header.msg_type == "apply_request" {
                "apply"
            } else {
                "execute"
            };
            content
                .entry("engine_info")
                .or_insert(json!({"engine_uuid": uuid, "engine_id": id, "method": method}));
            md.insert(
                "engine_info".into(),
                json!({"engine_uuid": uuid, "engine_id": id}),
            );
            if content.get("ename").and_then(Value::as_str) == Some("UnmetDependency") {
                md.insert("dependencies_met".into(), json!(false));
            }
        }
        md.insert("status".into(), json!(status));
        for (k, v) in reply.metadata {
            md.insert(k, v);
        }
        let rt = reply_type(&msg.header.msg_type);
        ctx.send_to(
            &mut ControlSender::Shell(&mut shell_send),
            item.idents.clone(),
            &rt,
            &Value::Object(content),
            msg,
            md,
            reply.buffers,
        )
        .await;
        ctx.publish(
            "status",
            "status",
            &json!({"execution_state": "idle"}),
            msg,
            vec![],
        );
        if status == "error" && stops_on_error(msg) {
            abort_queued_executes(&shared).await;
        }
        if interp.is_dead() {
            warn!(
                engine = id,
                "the interpreter crashed (--restart-on-crash=false): leaving"
            );
            break;
        }
    }

    // --- leave: unregister, stop Python
    info!(engine = id, "unregistering");
    unregister(&mut reg, &ctx, id).await;
    interp.shutdown().await;
    drop(iopub_tx);
    drop(ctx);
    let _ = tokio::time::timeout(Duration::from_millis(500), iopub_task).await;
    // zmq.rs has no linger: give queued messages a moment to leave.
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}

/// ipykernel 7's stop_on_error: a failed, non-silent execute_request whose
/// `stop_on_error` is not false aborts the execute_requests queued behind it.
/// apply_requests never do (ipyparallel's `apply_request` does not abort).
fn stops_on_error(msg: &Message) -> bool {
    let c = &msg.content;
    msg.header.msg_type == "execute_request"
        && !c.get("silent").and_then(Value::as_bool).unwrap_or(false)
        && c.get("stop_on_error")
            .and_then(Value::as_bool)
            .unwrap_or(true)
}

/// Mark every execute_request already queued as aborted (they get
/// `status: aborted` replies when their turn comes; other requests run).
/// The window is ipykernel's with `stop_on_error_timeout = 0`: what has
/// arrived by now; the yield lets the shell task queue what the socket holds.
async fn abort_queued_executes(shared: &Shared) {
    tokio::task::yield_now().await;
    let q = shared.queue.lock().expect("queue lock");
    let mut aborted = shared.aborted.lock().expect("aborted lock");
    for item in q.iter() {
        if item.msg.header.msg_type == "execute_request" {
            debug!(msg_id = %item.msg.header.msg_id, "aborting after an error");
            aborted.insert(item.msg.header.msg_id.clone());
        }
    }
}

enum ControlAction {
    Signal(i32),
    Clear,
}

/// Carry out a control action between requests (a clear during a request
/// waits for it; a signal is delivered at once through the handle).
async fn apply_control<I: Interpreter>(a: ControlAction, signals: &SignalHandle, interp: &mut I) {
    match a {
        ControlAction::Signal(s) => {
            if let Err(e) = signals.send(s) {
                warn!(error = %e, "signal not delivered");
            }
        }
        ControlAction::Clear => {
            let (tx, _rx) = mpsc::unbounded_channel();
            interp.run(Request::Clear, tx).await;
        }
    }
}

fn signal_number(s: &str) -> Option<i32> {
    if let Ok(n) = s.parse() {
        return Some(n);
    }
    let s = s.trim_start_matches("SIG");
    Some(match s {
        "INT" => libc::SIGINT,
        "TERM" => libc::SIGTERM,
        "KILL" => libc::SIGKILL,
        "HUP" => libc::SIGHUP,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "QUIT" => libc::SIGQUIT,
        _ => return None,
    })
}

fn reply_type(request: &str) -> String {
    match request.strip_suffix("_request") {
        Some(b) => format!("{b}_reply"),
        None => format!("{request}_reply"),
    }
}

pub fn init_metadata(msg: &Message, uuid: &str) -> Map<String, Value> {
    let pm = &msg.metadata;
    let mut md = Map::new();
    md.insert("started".into(), json!(now_str()));
    md.insert("dependencies_met".into(), json!(true));
    md.insert("engine".into(), json!(uuid));
    md.insert(
        "is_broadcast".into(),
        pm.get("is_broadcast").cloned().unwrap_or(json!(false)),
    );
    md.insert(
        "is_coalescing".into(),
        pm.get("is_coalescing").cloned().unwrap_or(json!(false)),
    );
    md.insert(
        "original_msg_id".into(),
        pm.get("original_msg_id").cloned().unwrap_or(json!("")),
    );
    md.insert(
        "label".into(),
        pm.get("label").cloned().unwrap_or(Value::Null),
    );
    md
}

fn kernel_info() -> Value {
    Value::Object(kernel_info_with(
        json!({"name": "python", "file_extension": ".py", "mimetype": "text/x-python"}),
    ))
}

fn kernel_info_with(language_info: Value) -> Map<String, Value> {
    let v = json!({
        "status": "ok",
        "protocol_version": "5.4",
        "implementation": "parallax-engine",
        "implementation_version": env!("CARGO_PKG_VERSION"),
        "language_info": language_info,
        "banner": "Parallax engine",
        "help_links": [],
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

enum ControlSender<'a> {
    Router(&'a mut RouterSocket),
    Shell(&'a mut zeromq::RouterSendHalf),
}

#[derive(Clone)]
struct Ctx {
    session: Arc<Mutex<Session>>,
    uuid: String,
    id: i64,
    iopub: mpsc::UnboundedSender<Vec<Bytes>>,
}

impl Ctx {
    fn parent(msg: &Message) -> Value {
        serde_json::to_value(&msg.header).unwrap_or_default()
    }

    /// Publish on iopub with ipyparallel's topic and the engine uuid in metadata.
    fn publish(
        &self,
        topic: &str,
        msg_type: &str,
        content: &Value,
        parent: &Message,
        buffers: Vec<Bytes>,
    ) {
        let frames = {
            let mut s = self.session.lock().expect("session lock");
            let h = s.header(msg_type, &now_str());
            let topic = Bytes::from(format!("engine.{}.{topic}", self.id));
            s.serialize(
                vec![topic],
                &h,
                &Self::parent(parent),
                &json!({"engine": self.uuid}),
                content,
                buffers,
            )
        };
        let _ = self.iopub.send(frames);
    }

    fn publish_output(&self, o: Output, parent: &Message) {
        match o {
            Output::Stream { name, text } => self.publish(
                &name.clone(),
                "stream",
                &json!({"name": name, "text": text}),
                parent,
                vec![],
            ),
            Output::DisplayData {
                data,
                metadata,
                transient,
                update,
            } => self.publish(
                "displaypub",
                if update {
                    "update_display_data"
                } else {
                    "display_data"
                },
                &json!({"data": data, "metadata": metadata, "transient": transient}),
                parent,
                vec![],
            ),
            Output::ClearOutput { wait } => self.publish(
                "displaypub",
                "clear_output",
                &json!({"wait": wait}),
                parent,
                vec![],
            ),
            Output::ExecuteResult {
                execution_count,
                data,
                metadata,
            } => self.publish(
                "execute_result",
                "execute_result",
                &json!({"execution_count": execution_count, "data": data, "metadata": metadata}),
                parent,
                vec![],
            ),
            Output::Error {
                ename,
                evalue,
                traceback,
            } => self.publish(
                "error",
                "error",
                &json!({"ename": ename, "evalue": evalue, "traceback": traceback}),
                parent,
                vec![],
            ),
            Output::DataMessage { keys, buffers } => self.publish(
                "datapub",
                "data_message",
                &json!({"keys": keys}),
                parent,
                buffers,
            ),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn send_to(
        &self,
        sock: &mut ControlSender<'_>,
        idents: Vec<Bytes>,
        msg_type: &str,
        content: &Value,
        parent: &Message,
        metadata: Map<String, Value>,
        buffers: Vec<Bytes>,
    ) {
        let frames = {
            let mut s = self.session.lock().expect("session lock");
            let h = s.header(msg_type, &now_str());
            let mut md = metadata;
            md.entry("engine").or_insert(json!(self.uuid));
            s.serialize(
                idents,
                &h,
                &Self::parent(parent),
                &Value::Object(md),
                content,
                buffers,
            )
        };
        let Ok(m) = ZmqMessage::try_from(frames) else {
            return;
        };
        let r = match sock {
            ControlSender::Router(r) => r.send(m).await,
            ControlSender::Shell(r) => r.send(m).await,
        };
        if let Err(e) = r {
            warn!(error = %e, msg_type, "reply not sent");
        }
    }
}

/// How long to wait for a registration reply before asking again. A hub
/// under a registration storm, or one still binding, may lose or delay a
/// request; asking again is safe because the hub answers a repeated
/// request for the same uuid with the same id.
const REGISTRATION_RETRY: Duration = Duration::from_secs(3);

/// Send `registration_request`s until one is answered or `total` has
/// passed; returns the (verified) `ok` reply.
pub async fn register(
    reg: &mut DealerSocket,
    session: &mut Session,
    auth: &mut Authenticator,
    uuid: &str,
    id: Option<i64>,
    total: Duration,
) -> Result<Message> {
    let limits = Limits::default();
    let deadline = tokio::time::Instant::now() + total;
    let mut content = json!({"uuid": uuid});
    if let Some(id) = id {
        content["id"] = json!(id);
    }
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        // A fresh header each time: the hub rejects a replayed signature.
        let h = session.header("registration_request", &now_str());
        let frames = session.serialize(vec![], &h, &json!({}), &json!({}), &content, vec![]);
        reg.send(ZmqMessage::try_from(frames).expect("non-empty"))
            .await
            .context("sending registration_request")?;
        let wait = (tokio::time::Instant::now() + REGISTRATION_RETRY).min(deadline);
        loop {
            let reply = match tokio::time::timeout_at(wait, reg.recv()).await {
                Err(_) => break,
                Ok(r) => r.context("registration socket")?,
            };
            let Some((_, reply)) = accept(reply.into_vec(), &limits, auth, "registration") else {
                continue;
            };
            if reply.header.msg_type != "registration_reply" {
                debug!(msg_type = %reply.header.msg_type, "ignoring a message on the registration socket");
                continue;
            }
            if reply.content.get("status").and_then(Value::as_str) != Some("ok") {
                let field = |k: &str| {
                    reply
                        .content
                        .get(k)
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned()
                };
                bail!(
                    "registration refused: {} {}",
                    field("ename"),
                    field("evalue")
                );
            }
            if attempt > 1 {
                info!(attempt, "registration answered after a retry");
            }
            return Ok(reply);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "registration timed out after {:.0} s ({attempt} requests unanswered)",
                total.as_secs_f64()
            );
        }
        warn!(attempt, "no registration reply yet; asking again");
    }
}

/// Tell the hub this engine is leaving.
async fn unregister(reg: &mut DealerSocket, ctx: &Ctx, id: i64) {
    let frames = {
        let mut s = ctx.session.lock().expect("session lock");
        let h = s.header("unregistration_request", &now_str());
        s.serialize(
            vec![],
            &h,
            &json!({}),
            &json!({}),
            &json!({"id": id}),
            vec![],
        )
    };
    let _ = reg
        .send(ZmqMessage::try_from(frames).expect("non-empty"))
        .await;
}

/// The unsolicited first heartbeat reply that completes the registration.
pub async fn first_pong(pong: &mut DealerSocket) {
    if pong
        .send(ZmqMessage::from(Bytes::from_static(b"0")))
        .await
        .is_err()
    {
        debug!("first heartbeat reply failed; the hub's pings will do");
    }
}

/// Split, verify (signature, then replay) and decode one incoming message
/// — in that order, before any JSON is parsed; a bad one is logged with the
/// socket it came on and dropped.
fn accept(
    frames: Vec<Bytes>,
    limits: &Limits,
    auth: &mut Authenticator,
    socket: &str,
) -> Option<(RawMessage, Message)> {
    let raw = match RawMessage::from_frames(frames, limits) {
        Ok(r) => r,
        Err(e) => {
            warn!(reason = %e, socket, "dropping a malformed message");
            return None;
        }
    };
    if let Err(e) = auth.check(&raw) {
        warn!(reason = %e, socket, "dropping a message that failed authentication");
        return None;
    }
    match Message::decode(&raw) {
        Ok(m) => Some((raw, m)),
        Err(e) => {
            warn!(reason = %e, socket, "dropping an undecodable message");
            None
        }
    }
}
