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
use zeromq::{DealerSocket, Socket, SocketOptions, SocketRecv, SocketSend, ZmqMessage};

use crate::cli::EngineArgs;
use crate::cli::Language;
use crate::host_zygote::HostZygote;
use crate::interpreter::{Interpreter, Output, Reply, Request, SignalHandle, Stdin};
use crate::link::Route;
use crate::python::{PythonConfig, PythonInterpreter};
#[cfg(feature = "rust-engine")]
use crate::rust::RustInterpreter;
use crate::zygote::Zygote;

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

    fn input_handle(&self) -> Option<crate::interpreter::InputHandle> {
        match self {
            AnyInterpreter::Python(i) => i.input_handle(),
            #[cfg(feature = "rust-engine")]
            AnyInterpreter::Rust(i) => i.input_handle(),
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
    /// The hub socket it came on; the reply goes back on it.
    route: Route,
    idents: Vec<Bytes>,
    msg: Message,
}

struct Shared {
    queue: Mutex<VecDeque<Queued>>,
    notify: Notify,
    aborted: Mutex<HashSet<String>>,
    /// The msg_id of the `input_request` the running request waits on: set
    /// by the executor when it publishes one, taken by the control task
    /// when the `input_reply` parented to it arrives, cleared after the
    /// request. Replies to anything else (stale, forged) are dropped.
    pending_input: Mutex<Option<String>>,
    /// A request runs in the interpreter (SIGINT then interrupts it instead
    /// of stopping the engine).
    busy: std::sync::atomic::AtomicBool,
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

    // --- the link: every socket facing the hub, rebuilt if the hub goes
    // away and comes back (see link.rs)
    drop(reg);
    let leaves = &info.broadcast;
    let endpoints = crate::link::Endpoints {
        registration: url(info.registration),
        mux: url(info.mux),
        task: url(info.task),
        broadcast: (!leaves.is_empty()).then(|| url(leaves[(id.max(0) as usize) % leaves.len()])),
        control: url(info.control),
        iopub: url(info.iopub),
        hb_ping: url(info.hb_ping),
        hb_pong: url(info.hb_pong),
    };
    let stop = shutdown.child_token();
    let last_ping = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let session = Arc::new(Mutex::new(session));
    let registration_request = {
        let session = session.clone();
        let content = json!({"uuid": uuid, "id": id});
        Box::new(move || {
            let mut s = session.lock().expect("session lock");
            let h = s.header("registration_request", &now_str());
            s.serialize(vec![], &h, &json!({}), &json!({}), &content, vec![])
        })
    };
    let (shell_in_tx, mut shell_in) = mpsc::unbounded_channel::<(Route, Vec<Bytes>)>();
    let (control_in_tx, mut control_in) = mpsc::unbounded_channel::<Vec<Bytes>>();
    let (reg_in_tx, mut reg_in) = mpsc::unbounded_channel::<Vec<Bytes>>();
    let link = crate::link::start(
        crate::link::LinkConfig {
            uuid: uuid.clone(),
            endpoints,
            last_ping: last_ping.clone(),
            started,
            stop: stop.clone(),
            registration_request,
        },
        crate::link::Inbound {
            shell: shell_in_tx,
            control: control_in_tx,
            registration: reg_in_tx,
        },
    )
    .await?;
    let link_task = link.task;
    // Registration replies after a reconnection: the hub confirms the id.
    {
        let mut auth = auth.clone();
        tokio::spawn(async move {
            while let Some(m) = reg_in.recv().await {
                let Some((_, reply)) = accept(m, &limits, &mut auth, "registration") else {
                    continue;
                };
                match reply.content.get("id").and_then(Value::as_i64) {
                    Some(got) if got == id => info!(engine = id, "the hub knows this engine again"),
                    got => warn!(
                        engine = id,
                        reply = ?got,
                        status = ?reply.content.get("status"),
                        "the hub answered the re-registration with another id; requests keep \
                         reaching this engine by its uuid"
                    ),
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

    let shared = Arc::new(Shared {
        queue: Mutex::new(VecDeque::new()),
        notify: Notify::new(),
        aborted: Mutex::new(HashSet::new()),
        pending_input: Mutex::new(None),
        busy: std::sync::atomic::AtomicBool::new(false),
    });
    // shell receive: verify and queue
    {
        let shared = shared.clone();
        let stop = stop.clone();
        let mut auth = auth.clone();
        tokio::spawn(async move {
            loop {
                let m = tokio::select! {
                    _ = stop.cancelled() => return,
                    m = shell_in.recv() => m,
                };
                let Some((route, m)) = m else { return };
                let Some((raw, msg)) = accept(m, &limits, &mut auth, "shell") else {
                    continue;
                };
                shared.queue.lock().expect("queue lock").push_back(Queued {
                    route,
                    idents: raw.idents,
                    msg,
                });
                shared.notify.notify_one();
            }
        });
    }

    let ctx = Ctx {
        session,
        uuid: uuid.clone(),
        id,
        iopub: link.iopub,
        out: link.out,
    };

    // control: answered while requests run
    let (sig_tx, mut sig_rx) = mpsc::unbounded_channel::<ControlAction>();
    let int_tx = sig_tx.clone();
    {
        let ctx = ctx.clone();
        let shared = shared.clone();
        let stop = stop.clone();
        let mut auth = auth.clone();
        tokio::spawn(async move {
            loop {
                let m = tokio::select! {
                    _ = stop.cancelled() => return,
                    m = control_in.recv() => m,
                };
                let Some(m) = m else { return };
                let Some((raw, msg)) = accept(m, &limits, &mut auth, "control") else {
                    continue;
                };
                let idents = raw.idents.clone();
                if msg.header.msg_type == "input_reply" {
                    // The answer to input() (see `stdin_policy`): a reply,
                    // so nothing is sent back.
                    let mut pending = shared.pending_input.lock().expect("input lock");
                    if pending.is_some() && pending.as_deref() == msg.parent_msg_id() {
                        *pending = None;
                        let value = msg
                            .content
                            .get("value")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_owned();
                        let _ = sig_tx.send(ControlAction::Input(value));
                    } else {
                        debug!(parent = ?msg.parent_msg_id(), "input_reply for no pending input_request dropped");
                    }
                    continue;
                }
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
                            Route::Control,
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
                    Route::Control,
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

    // Signals to the engine process: SIGTERM leaves the hub cleanly;
    // SIGINT interrupts the running request as ipengine's does (what
    // `parallax cluster signal` and an mpiexec forwarding Ctrl-C send). An
    // idle engine ignores it, as ipengine does, so a signal to a whole
    // cluster never stops the engines that had finished — except when the
    // engine runs in a terminal, where Ctrl-C is how a person stops it.
    {
        let stop = stop.clone();
        let shared = shared.clone();
        let sig_tx = int_tx;
        let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
        tokio::spawn(async move {
            use std::sync::atomic::Ordering;
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
            loop {
                tokio::select! {
                    _ = term.recv() => { info!("SIGTERM: shutting down"); break }
                    _ = int.recv() => {
                        if shared.busy.load(Ordering::SeqCst) {
                            info!("SIGINT: interrupting the running request");
                            let _ = sig_tx.send(ControlAction::Signal(libc::SIGINT));
                        } else if interactive {
                            info!("SIGINT while idle in a terminal: shutting down");
                            break;
                        } else {
                            info!("SIGINT while idle: nothing to interrupt (SIGTERM stops the engine)");
                        }
                    }
                    _ = stop.cancelled() => break,
                }
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
    let zygote = match (&args.zygote, args.host_zygote) {
        (Some(socket), _) => Some(Zygote::Socket(socket.clone())),
        (None, true) => {
            let host = crate::zygote::resolve_python(&args.python).and_then(|python| {
                Ok(HostZygote::for_cluster(
                    &info.key,
                    &url(info.registration),
                    &python,
                )?)
            });
            match host {
                Ok(h) => Some(Zygote::Host(h)),
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "no host zygote: starting Python directly");
                    None
                }
            }
        }
        (None, false) => None,
    };
    let started_interp = match args.language {
        // A stop while Python starts (64 engines stopped right after they
        // registered, their Pythons still importing on 2 cores) does not
        // wait for it: the half-started process is dropped, which kills it
        // (kill_on_drop; a forked one is killed by its zygote when the
        // connection closes).
        Language::Python => tokio::select! {
            started = PythonInterpreter::start(PythonConfig {
                python: args.python.clone(),
                env,
                restart_on_crash: args.restart_on_crash,
                zygote,
            }) => started.map(AnyInterpreter::Python),
            _ = stop.cancelled() => {
                info!(engine = id, "stopped while Python started");
                unregister(&ctx, id);
                drop(ctx);
                let _ = tokio::time::timeout(Duration::from_millis(1000), link_task).await;
                return Ok(());
            }
        },
        #[cfg(feature = "rust-engine")]
        Language::Rust => Ok(AnyInterpreter::Rust(RustInterpreter::start(env))),
        #[cfg(not(feature = "rust-engine"))]
        Language::Rust => Err(anyhow::anyhow!(crate::RUST_ENGINE_MISSING)),
    };
    let mut interp = match started_interp {
        Ok(i) => i,
        Err(e) => {
            unregister(&ctx, id);
            stop.cancel();
            return Err(e);
        }
    };

    // --- executor
    let mut execution_count: i64 = 0;
    let signals = interp.signal_handle();
    let inputs = interp.input_handle();
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
                item.route,
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
                    stdin: stdin_policy(c),
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
                shared.busy.store(true, std::sync::atomic::Ordering::SeqCst);
                let fut = interp.run(req, tx);
                tokio::pin!(fut);
                let reply = loop {
                    tokio::select! {
                        r = &mut fut => break r,
                        Some(o) = rx.recv() => {
                            if let Some(input_id) = ctx.publish_output(o, msg) {
                                *shared.pending_input.lock().expect("input lock") = Some(input_id);
                            }
                        }
                        Some(a) = sig_rx.recv() => {
                            match a {
                                ControlAction::Signal(s) => {
                                    if let Err(e) = signals.send(s) {
                                        warn!(error = %e, "signal not delivered");
                                    }
                                }
                                ControlAction::Input(v) => {
                                    if let Some(h) = &inputs {
                                        let _ = h.send(v);
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
                *shared.pending_input.lock().expect("input lock") = None;
                shared
                    .busy
                    .store(false, std::sync::atomic::Ordering::SeqCst);
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
            item.route,
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
    let leaving = std::time::Instant::now();
    unregister(&ctx, id);
    interp.shutdown().await;
    let interp_ms = leaving.elapsed().as_millis() as u64;
    stop.cancel();
    drop(ctx);
    // The link sends what is queued once every sender is gone.
    let flushed = tokio::time::timeout(Duration::from_millis(1000), link_task)
        .await
        .is_ok();
    info!(
        engine = id,
        interpreter_ms = interp_ms,
        total_ms = leaving.elapsed().as_millis() as u64,
        flushed,
        "left"
    );
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
    /// The value of an `input_reply` matched to the pending input_request.
    Input(String),
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
        // the request that asked has ended: nobody waits for it
        ControlAction::Input(_) => {}
    }
}

/// What `input()` does in an execute_request: forwarded to the client when
/// it set `allow_stdin` (a Parallax kernel does so only for a blocking cell
/// with one target; ipykernel's default is false, and ipyparallel's Client
/// never sets it), else refused with the client's `stdin_refused` reason.
///
/// The path of a forwarded input(): the shim sends an `input_request` event;
/// the engine publishes it on iopub parented to the execute_request (an
/// engine has no stdin channel through the hub, and the client is already
/// subscribed there for that parent); the client answers with an
/// `input_reply` on the hub's control channel to this engine, parented to
/// the input_request; the control task matches it to `pending_input` and
/// the executor hands the value to the interpreter's `InputHandle`.
fn stdin_policy(content: &Value) -> Stdin {
    if content.get("allow_stdin").and_then(Value::as_bool) == Some(true) {
        Stdin::Forward
    } else {
        Stdin::Refuse(
            content
                .get("stdin_refused")
                .and_then(Value::as_str)
                .map(str::to_owned),
        )
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

#[derive(Clone)]
struct Ctx {
    session: Arc<Mutex<Session>>,
    uuid: String,
    id: i64,
    iopub: mpsc::UnboundedSender<Vec<Bytes>>,
    /// Replies and the unregistration, through the link.
    out: mpsc::UnboundedSender<(Route, Vec<Bytes>)>,
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
    ) -> String {
        let (msg_id, frames) = {
            let mut s = self.session.lock().expect("session lock");
            let h = s.header(msg_type, &now_str());
            let topic = Bytes::from(format!("engine.{}.{topic}", self.id));
            let frames = s.serialize(
                vec![topic],
                &h,
                &Self::parent(parent),
                &json!({"engine": self.uuid}),
                content,
                buffers,
            );
            (h.msg_id, frames)
        };
        let _ = self.iopub.send(frames);
        msg_id
    }

    /// Publish one output; returns the msg_id of an `input_request` (the
    /// `input_reply` on control must name it as its parent).
    fn publish_output(&self, o: Output, parent: &Message) -> Option<String> {
        let _msg_id = match o {
            Output::InputRequest { prompt, password } => {
                return Some(self.publish(
                    "input_request",
                    "input_request",
                    &json!({"prompt": prompt, "password": password}),
                    parent,
                    vec![],
                ));
            }
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
        };
        None
    }

    #[allow(clippy::too_many_arguments)]
    async fn send_to(
        &self,
        route: Route,
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
        if self.out.send((route, frames)).is_err() {
            warn!(msg_type, "reply not sent: the link to the hub is closed");
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
fn unregister(ctx: &Ctx, id: i64) {
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
    let _ = ctx.out.send((Route::Registration, frames));
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
