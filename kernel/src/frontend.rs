//! The Jupyter side: the five sockets a frontend connects to, and the kernel
//! core (xeus's split): routing, execution counter, busy/idle,
//! `execute_input`, abort-on-error, history. The cells themselves go to the
//! [`Session`], the kernel's one "interpreter".
//!
//! Tasks: heartbeat (REP echo), iopub (owns the PUB socket, drains a queue),
//! control (interrupt, shutdown, kernel_info — never waits behind a cell),
//! a shell reader that verifies, answers kernel_info and is_complete itself
//! (from the text: [`crate::syntax`]) and complete/inspect on a task of their
//! own (an engine's answer within [`ASSIST_PATIENCE`], else an empty reply),
//! and queues the rest for the shell worker that runs requests one at a
//! time. So nothing a console asks while the user types waits behind a cell
//! or a starting cluster. A SIGINT to the kernel is an interrupt; a SIGTERM
//! a shutdown.
//!
//! Every message is verified on its raw frames before any JSON is parsed; a
//! bad one is logged and dropped, and the loop goes on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use chrono::Utc;
use jupyter_protocol::{
    CodeMirrorMode, ConnectionInfo, ExecuteRequest, HelpLink, KernelInfoReply, LanguageInfo,
    ReplyStatus,
};
use parallax_wire::{Authenticator, Limits, Message, RawMessage, Session, Signer, format_date};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use zeromq::{RepSocket, RouterSocket, Socket, SocketRecv, SocketSend, XPubSocket, ZmqMessage};

use crate::cli::{KernelArgs, Language};
use crate::session::{Assist, CellOutcome, Session as PxSession, SessionConfig};
use crate::stdin::StdinChannel;

pub const PROTOCOL_VERSION: &str = "5.3";

/// The longest a complete/inspect request waits (for the cluster to start,
/// then for the engine): a frontend asks while the user types, and a late
/// reply is worse than an empty one (jupyter console reads the next shell
/// message as the answer to whatever it asked last).
const ASSIST_PATIENCE: Duration = Duration::from_secs(1);

/// Publishes iopub messages parented to one request.
#[derive(Clone)]
pub struct Publisher {
    session: Arc<Mutex<Session>>,
    tx: mpsc::UnboundedSender<Vec<Bytes>>,
    parent: Value,
    /// `silent` executions publish nothing but status.
    pub silent: bool,
}

impl Publisher {
    pub fn publish(&self, msg_type: &str, content: Value) {
        if self.silent && msg_type != "status" {
            return;
        }
        let frames = {
            let mut s = self.session.lock().expect("session");
            let h = s.header(msg_type, &format_date(Utc::now()));
            let topic = Bytes::from(format!("kernel.{}.{msg_type}", h.session));
            s.serialize(vec![topic], &h, &self.parent, &json!({}), &content, vec![])
        };
        let _ = self.tx.send(frames);
    }

    pub fn stream(&self, name: &str, text: impl Into<String>) {
        self.publish("stream", json!({"name": name, "text": text.into()}));
    }

    fn status(&self, state: &str) {
        self.publish("status", json!({"execution_state": state}));
    }
}

struct Shared {
    session: Arc<Mutex<Session>>,
    iopub: mpsc::UnboundedSender<Vec<Bytes>>,
    /// The version is filled in once the engines' Python (or rustc) has
    /// told it.
    language_info: Mutex<LanguageInfo>,
    banner: String,
    help_links: Vec<HelpLink>,
    language: Language,
    /// Set while the shell worker handles a request (a cell). The shell
    /// reader's answers then publish no busy/idle of their own: JupyterLab
    /// shows the kernel's state from any status message, and an idle
    /// parented to a completion would show the kernel idle while the cell
    /// runs.
    worker_busy: AtomicBool,
}

impl Shared {
    fn publisher(&self, parent: &Message) -> Publisher {
        Publisher {
            session: self.session.clone(),
            tx: self.iopub.clone(),
            parent: header_value(parent),
            silent: false,
        }
    }

    fn reply(&self, req: &Message, msg_type: &str, content: Value) -> Vec<Bytes> {
        let mut s = self.session.lock().expect("session");
        let h = s.header(msg_type, &format_date(Utc::now()));
        s.serialize(
            req.idents.clone(),
            &h,
            &header_value(req),
            &json!({}),
            &content,
            vec![],
        )
    }

    fn kernel_info(&self) -> Value {
        let reply = KernelInfoReply {
            status: ReplyStatus::Ok,
            protocol_version: PROTOCOL_VERSION.into(),
            implementation: "parallax".into(),
            implementation_version: env!("CARGO_PKG_VERSION").into(),
            language_info: self.language_info.lock().expect("language_info").clone(),
            banner: self.banner.clone(),
            help_links: self.help_links.clone(),
            debugger: false,
            error: None,
        };
        serde_json::to_value(reply).expect("kernel_info serializes")
    }
}

fn header_value(m: &Message) -> Value {
    serde_json::to_value(&m.header).unwrap_or_else(|_| json!({}))
}

fn python_language_info() -> LanguageInfo {
    LanguageInfo {
        name: "python".into(),
        // "3" until the engines' interpreter has told its exact version.
        version: "3".into(),
        mimetype: Some("text/x-python".into()),
        file_extension: Some(".py".into()),
        pygments_lexer: Some("ipython3".into()),
        codemirror_mode: Some(CodeMirrorMode::CustomMode {
            name: "ipython".into(),
            version: 3,
        }),
        nbconvert_exporter: Some("python".into()),
    }
}

fn rust_language_info() -> LanguageInfo {
    LanguageInfo {
        name: "rust".into(),
        // Empty until rustc has told its version (evcxr_jupyter sends "").
        version: String::new(),
        mimetype: Some("text/rust".into()),
        file_extension: Some(".rs".into()),
        pygments_lexer: Some("rust".into()),
        codemirror_mode: Some(CodeMirrorMode::Simple("rust".into())),
        nbconvert_exporter: None,
    }
}

fn language_info(language: Language) -> LanguageInfo {
    match language {
        Language::Python => python_language_info(),
        Language::Rust => rust_language_info(),
    }
}

fn help_links(language: Language) -> Vec<HelpLink> {
    let mut links = vec![HelpLink {
        text: "ipyparallel magics".into(),
        url: "https://ipyparallel.readthedocs.io/en/latest/tutorial/magics.html".into(),
    }];
    if language == Language::Rust {
        links.push(HelpLink {
            text: "evcxr commands (:dep, :vars, …)".into(),
            url: "https://github.com/evcxr/evcxr/blob/main/COMMON.md".into(),
        });
        links.push(HelpLink {
            text: "Rust standard library".into(),
            url: "https://doc.rust-lang.org/std/".into(),
        });
    }
    links
}

fn banner(language: Language, cluster: Option<&std::path::Path>, n: usize) -> String {
    let place = match cluster {
        Some(f) => format!("connected to {}", f.display()),
        None => format!("embedded, {n} engines"),
    };
    let (runs_in, extra) = match language {
        Language::Python => ("", ""),
        Language::Rust => (
            ", each running Rust in evcxr",
            "\nevcxr commands (:dep, :vars, :opt, …) go to the engines.",
        ),
    };
    format!(
        "Parallax {}: every cell runs on the engines of a parallel cluster ({place}{runs_in}), \
         outputs merged as ipyparallel's %%px shows them.\n\
         Magics: %%px, %px, %pxconfig, %pxresult, %autopx, %engines, %cluster.{extra}",
        language.title()
    )
}

/// Ask the engines' language for its version (runs while the cluster
/// starts): the Python interpreter's `sys.version_info`, or the version of
/// `rustc` on PATH (what evcxr compiles with).
async fn probe_language_version(
    language: Language,
    python: std::path::PathBuf,
    shared: Arc<Shared>,
) {
    let (program, args): (std::path::PathBuf, &[&str]) = match language {
        Language::Python => (
            python,
            &["-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
        ),
        Language::Rust => ("rustc".into(), &["--version"]),
    };
    let out = tokio::process::Command::new(&program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(10), out).await {
        Ok(Ok(o)) if o.status.success() => {
            let out = String::from_utf8_lossy(&o.stdout);
            let version = match language {
                Language::Python => Some(out.trim().to_owned()).filter(|v| !v.is_empty()),
                Language::Rust => parallax_engine::rust_syntax::rustc_version(&out),
            };
            if let Some(v) = version {
                shared.language_info.lock().expect("language_info").version = v;
            }
        }
        _ => {
            debug!(program = %program.display(), %language, "could not ask the engines' language for its version")
        }
    }
}

pub(crate) fn verify(
    frames: Vec<Bytes>,
    auth: &mut Authenticator,
    limits: &Limits,
    what: &str,
) -> Option<Message> {
    let raw = match RawMessage::from_frames(frames, limits) {
        Ok(r) => r,
        Err(e) => {
            warn!(channel = what, error = %e, "malformed message dropped");
            return None;
        }
    };
    if let Err(e) = auth.check(&raw) {
        warn!(channel = what, error = %e, "message with a bad signature dropped");
        return None;
    }
    match Message::decode(&raw) {
        Ok(m) => Some(m),
        Err(e) => {
            warn!(channel = what, error = %e, "undecodable message dropped");
            None
        }
    }
}

async fn bind<S: Socket>(mut s: S, url: &str, what: &str) -> Result<S> {
    s.bind(url)
        .await
        .with_context(|| format!("binding the {what} socket on {url}"))?;
    Ok(s)
}

/// Run the kernel until a shutdown_request or SIGTERM.
pub async fn run(args: KernelArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.connection_file)
        .with_context(|| format!("reading {}", args.connection_file.display()))?;
    let conn: ConnectionInfo = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a Jupyter connection file",
            args.connection_file.display()
        )
    })?;
    if conn.signature_scheme != "hmac-sha256" && !conn.key.is_empty() {
        bail!(
            "signature scheme {:?} is not supported (use hmac-sha256)",
            conn.signature_scheme
        );
    }
    let n = args.engine_count()?;
    let signer = Signer::new(conn.key.as_bytes());
    let session = Arc::new(Mutex::new(Session::new(
        signer.clone(),
        uuid::Uuid::new_v4().to_string(),
        "kernel".into(),
        std::process::id(),
    )));

    let shell = bind(RouterSocket::new(), &conn.shell_url(), "shell").await?;
    let control = bind(RouterSocket::new(), &conn.control_url(), "control").await?;
    let stdin = bind(RouterSocket::new(), &conn.stdin_url(), "stdin").await?;
    // XPUB, so that each new subscriber can be greeted (JEP 65).
    let iopub = bind(XPubSocket::new(), &conn.iopub_url(), "iopub").await?;
    let hb = bind(RepSocket::new(), &conn.hb_url(), "heartbeat").await?;
    info!(shell = %conn.shell_url(), "kernel sockets bound");

    let shutdown = CancellationToken::new();
    let (iopub_tx, iopub_rx) = mpsc::unbounded_channel::<Vec<Bytes>>();
    let iopub_task = tokio::spawn(iopub_sender(iopub, iopub_rx, session.clone()));
    tokio::spawn(heartbeat(hb, shutdown.clone()));
    // stdin: an engine's input() asks the frontend here (crate::stdin).
    let stdin = StdinChannel::spawn(stdin, Authenticator::new(signer.clone()), session.clone());

    let shared = Arc::new(Shared {
        session: session.clone(),
        iopub: iopub_tx.clone(),
        language_info: Mutex::new(language_info(args.language)),
        banner: banner(args.language, args.cluster.as_deref(), n),
        help_links: help_links(args.language),
        language: args.language,
        worker_busy: AtomicBool::new(false),
    });
    tokio::spawn(probe_language_version(
        args.language,
        args.python(),
        shared.clone(),
    ));

    // Interrupts: a counter bumped by interrupt_request and SIGINT; a cell
    // reacts to changes made while it runs.
    let (interrupt_tx, interrupt_rx) = watch::channel(0u64);
    let interrupt_tx = Arc::new(interrupt_tx);

    // Start the cluster in the background: kernel_info and is_complete are
    // answered at once; the first execute waits for the engines.
    let (assist_tx, assist_rx) = watch::channel(None);
    let cfg = SessionConfig {
        engines: n,
        cluster_file: args.cluster.clone(),
        python: args.python(),
        language: args.language,
        exe: std::env::current_exe().context("locating the parallax binary")?,
        engine_timeout: Duration::from_secs_f64(args.engine_timeout.max(1.0)),
        hub_ip: args.ip.clone(),
        hub_location: args.location.clone(),
        launch: args.launch_words()?,
        assist: assist_tx,
    };
    let starting = tokio::spawn(PxSession::start(cfg));

    // Shell: a reader that verifies, answers what needs no cell (kernel_info,
    // is_complete, complete/inspect) and queues the rest for the worker.
    let (shell_send, shell_recv) = shell.split();
    let shell_send = Arc::new(tokio::sync::Mutex::new(shell_send));
    let (queue_tx, queue_rx) = mpsc::unbounded_channel::<Message>();
    let reader = tokio::spawn(shell_reader(
        shell_recv,
        Authenticator::new(signer.clone()),
        queue_tx,
        FastPath {
            shared: shared.clone(),
            sock: shell_send.clone(),
            assist: assist_rx,
        },
    ));
    let worker = tokio::spawn(shell_worker(
        shared.clone(),
        shell_send.clone(),
        queue_rx,
        starting,
        interrupt_rx,
        stdin,
        shutdown.clone(),
    ));

    let control_task = tokio::spawn(control_loop(
        shared.clone(),
        control,
        Authenticator::new(signer.clone()),
        interrupt_tx.clone(),
        shutdown.clone(),
    ));

    // Like ipykernel's ParentPollerUnix: when the process that started us
    // dies, shut down (and stop the engines) rather than run on as an
    // orphan. Cancel first, log after: the log may go to a terminal that is
    // gone.
    if let Some(watch) = crate::parent::ParentWatch::from_env() {
        let sd = shutdown.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = t.tick() => {}
                    _ = sd.cancelled() => return,
                }
                if let Some(why) = watch.check() {
                    sd.cancel();
                    warn!(reason = %why, "the process that started the kernel is gone; shutting down");
                    return;
                }
            }
        });
    }

    // Signals.
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let it = interrupt_tx.clone();
        let sd = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = int.recv() => {
                        info!("SIGINT: interrupting the running cell");
                        it.send_modify(|v| *v += 1);
                    }
                    _ = term.recv() => {
                        info!("SIGTERM: shutting down");
                        sd.cancel();
                        return;
                    }
                }
            }
        });
    }

    shutdown.cancelled().await;
    // The worker stops its cell, shuts the cluster down and returns.
    match tokio::time::timeout(Duration::from_secs(10), worker).await {
        Ok(_) => {}
        Err(_) => warn!("the cluster did not stop within 10 s"),
    }
    reader.abort();
    control_task.abort();
    drop(shared);
    drop(iopub_tx);
    let _ = tokio::time::timeout(Duration::from_secs(1), iopub_task).await;
    // zmq.rs has no linger: give the last replies a moment to leave.
    tokio::time::sleep(Duration::from_millis(100)).await;
    info!("kernel stopped");
    Ok(())
}

/// Owns the iopub socket: publishes what the kernel queues and greets each
/// new subscription with `iopub_welcome` (JEP 65, as ipykernel 7 does), so
/// a frontend knows its subscription is live and `wait_for_ready` succeeds
/// at its first try. zmq.rs's XPUB registers subscribers only while
/// someone reads it: this task does.
async fn iopub_sender(
    mut s: XPubSocket,
    mut rx: mpsc::UnboundedReceiver<Vec<Bytes>>,
    session: Arc<Mutex<Session>>,
) {
    loop {
        tokio::select! {
            frames = rx.recv() => {
                let Some(frames) = frames else { return };
                if let Ok(m) = ZmqMessage::try_from(frames)
                    && let Err(e) = s.send(m).await
                {
                    warn!(error = %e, "iopub send failed");
                }
            }
            sub = s.recv() => match sub {
                Ok(m) => {
                    let Some(first) = m.get(0) else { continue };
                    if first.first() != Some(&1) {
                        continue;
                    }
                    let topic = first.slice(1..);
                    let frames = {
                        let mut sess = session.lock().expect("session");
                        let h = sess.header("iopub_welcome", &format_date(Utc::now()));
                        let sub = String::from_utf8_lossy(&topic).into_owned();
                        sess.serialize(vec![topic], &h, &json!({}), &json!({}),
                                       &json!({"subscription": sub}), vec![])
                    };
                    if let Ok(m) = ZmqMessage::try_from(frames)
                        && let Err(e) = s.send(m).await
                    {
                        debug!(error = %e, "iopub_welcome not sent");
                    }
                }
                Err(e) => {
                    debug!(error = %e, "iopub subscriber error");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            },
        }
    }
}

async fn heartbeat(mut s: RepSocket, shutdown: CancellationToken) {
    loop {
        let m = tokio::select! {
            m = s.recv() => m,
            _ = shutdown.cancelled() => return,
        };
        match m {
            Ok(m) => {
                if s.send(m).await.is_err() {
                    debug!("heartbeat reply failed");
                }
            }
            Err(e) => {
                debug!(error = %e, "heartbeat socket error");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// What the shell reader needs to answer requests itself.
struct FastPath {
    shared: Arc<Shared>,
    sock: ShellSend,
    /// The session's complete/inspect handle; None until the cluster is up.
    assist: watch::Receiver<Option<Assist>>,
}

impl FastPath {
    /// Answer `msg` here if it needs no cell and no worker: kernel_info and
    /// is_complete at once, complete/inspect on a task of their own within
    /// [`ASSIST_PATIENCE`]. Returns the message back otherwise.
    async fn handle(&self, msg: Message) -> Option<Message> {
        let msg_type = msg.msg_type().to_owned();
        match msg_type.as_str() {
            "kernel_info_request" => {
                let c = self.shared.kernel_info();
                answer(&self.shared, &self.sock, &msg, "kernel_info_reply", c).await;
            }
            "is_complete_request" => {
                let code = msg
                    .content
                    .get("code")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let c = crate::syntax::is_complete_reply(code, self.shared.language);
                answer(&self.shared, &self.sock, &msg, "is_complete_reply", c).await;
            }
            "complete_request" | "inspect_request" => {
                let (shared, sock) = (self.shared.clone(), self.sock.clone());
                let mut assist = self.assist.clone();
                tokio::spawn(async move {
                    let status = !shared.worker_busy.load(Ordering::Relaxed);
                    let pubr = shared.publisher(&msg);
                    if status {
                        pubr.status("busy");
                    }
                    let asked = async {
                        let a = assist.wait_for(Option::is_some).await.ok()?.clone()?;
                        a.forward(&msg_type, &msg.content).await
                    };
                    let c = match tokio::time::timeout(ASSIST_PATIENCE, asked).await {
                        Ok(Some(c)) => c,
                        Ok(None) => empty_reply(&msg_type, &msg.content),
                        Err(_) => {
                            debug!(msg_type, "no answer from an engine in time: empty reply");
                            empty_reply(&msg_type, &msg.content)
                        }
                    };
                    let rt = msg_type.replace("_request", "_reply");
                    send_frames(&sock, shared.reply(&msg, &rt, c)).await;
                    if status {
                        pubr.status("idle");
                    }
                });
            }
            _ => return Some(msg),
        }
        None
    }
}

/// Reply to `req` with busy/idle around it, unless the worker is busy.
async fn answer(
    shared: &Shared,
    sock: &ShellSend,
    req: &Message,
    reply_type: &str,
    content: Value,
) {
    let status = !shared.worker_busy.load(Ordering::Relaxed);
    let pubr = shared.publisher(req);
    if status {
        pubr.status("busy");
    }
    send_frames(sock, shared.reply(req, reply_type, content)).await;
    if status {
        pubr.status("idle");
    }
}

async fn shell_reader(
    mut recv: zeromq::RouterRecvHalf,
    mut auth: Authenticator,
    queue: mpsc::UnboundedSender<Message>,
    fast: FastPath,
) {
    let limits = Limits::default();
    loop {
        let frames = match recv.recv().await {
            Ok(m) => m.into_vec(),
            Err(e) => {
                debug!(error = %e, "shell socket error");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Some(m) = verify(frames, &mut auth, &limits, "shell") else {
            continue;
        };
        if let Some(m) = fast.handle(m).await
            && queue.send(m).is_err()
        {
            return;
        }
    }
}

type ShellSend = Arc<tokio::sync::Mutex<zeromq::RouterSendHalf>>;

async fn send_frames(sock: &ShellSend, frames: Vec<Bytes>) {
    if let Ok(m) = ZmqMessage::try_from(frames)
        && let Err(e) = sock.lock().await.send(m).await
    {
        warn!(error = %e, "reply not sent");
    }
}

/// Cell history of this kernel session: (line number, input).
#[derive(Default)]
struct History {
    entries: Vec<(usize, String)>,
}

impl History {
    fn reply(&self, c: &Value) -> Value {
        let kind = c
            .get("hist_access_type")
            .and_then(Value::as_str)
            .unwrap_or("tail");
        let n = c.get("n").and_then(Value::as_i64).unwrap_or(10).max(0) as usize;
        // Outputs are not kept: with output=True each entry is
        // [session, line, [input, null]], as IPython's history gives when it
        // has no stored output.
        let output = c.get("output").and_then(Value::as_bool).unwrap_or(false);
        let entry = |(line, input): &(usize, String)| {
            if output {
                json!([0, line, [input, null]])
            } else {
                json!([0, line, input])
            }
        };
        let items: Vec<Value> = match kind {
            "tail" => {
                let skip = self.entries.len().saturating_sub(n);
                self.entries[skip..].iter().map(entry).collect()
            }
            "range" => {
                let start = c.get("start").and_then(Value::as_i64).unwrap_or(0);
                let stop = c.get("stop").and_then(Value::as_i64);
                self.entries
                    .iter()
                    .filter(|(l, _)| {
                        (*l as i64) >= start && stop.is_none_or(|s| s <= 0 || (*l as i64) < s)
                    })
                    .map(entry)
                    .collect()
            }
            "search" => {
                let pattern = c.get("pattern").and_then(Value::as_str).unwrap_or("*");
                let unique = c.get("unique").and_then(Value::as_bool).unwrap_or(false);
                let mut seen = std::collections::HashSet::new();
                let mut v: Vec<Value> = self
                    .entries
                    .iter()
                    .filter(|(_, i)| glob_match(pattern, i))
                    .filter(|(_, i)| !unique || seen.insert(i.clone()))
                    .map(entry)
                    .collect();
                if n > 0 && v.len() > n {
                    v.drain(..v.len() - n);
                }
                v
            }
            _ => vec![],
        };
        json!({"status": "ok", "history": items})
    }
}

/// fnmatch-style `*` and `?` (history search patterns).
fn glob_match(p: &str, s: &str) -> bool {
    let p: Vec<char> = p.chars().collect();
    let s: Vec<char> = s.chars().collect();
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

async fn shell_worker(
    shared: Arc<Shared>,
    sock: ShellSend,
    mut queue: mpsc::UnboundedReceiver<Message>,
    starting: tokio::task::JoinHandle<Result<PxSession>>,
    mut interrupts: watch::Receiver<u64>,
    stdin: StdinChannel,
    shutdown: CancellationToken,
) {
    let mut execution_count: i64 = 0;
    let mut history = History::default();
    let mut starting = Some(starting);
    let mut session: Option<PxSession> = None;
    let mut start_error: Option<String> = None;
    // requests taken off the queue while aborting that were not aborted
    // (only execute_requests are, as in ipykernel 7); they run next, in order
    let mut kept: std::collections::VecDeque<Message> = std::collections::VecDeque::new();
    loop {
        shared.worker_busy.store(false, Ordering::Relaxed);
        let msg = if let Some(m) = kept.pop_front() {
            m
        } else {
            tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            m = queue.recv() => match m { Some(m) => m, None => break },
            // Between cells: notice engines that exit, so the hub forgets
            // them at once.
            _ = async {
                match session.as_mut() {
                    Some(s) => s.idle_housekeeping().await,
                    None => std::future::pending().await,
                }
            } => continue,
            }
        };
        shared.worker_busy.store(true, Ordering::Relaxed);
        let pubr = shared.publisher(&msg);
        let msg_type = msg.msg_type().to_owned();
        pubr.status("busy");
        let (reply_type, content): (&str, Value) = match msg_type.as_str() {
            "execute_request" => {
                let req: ExecuteRequest = match serde_json::from_value(fill_execute(&msg.content)) {
                    Ok(r) => r,
                    Err(e) => {
                        let c = error_content("ValueError", &format!("bad execute_request: {e}"));
                        finish(
                            &shared,
                            &sock,
                            &msg,
                            "execute_reply",
                            with_count(c, execution_count),
                            &pubr,
                        )
                        .await;
                        continue;
                    }
                };
                let silent = req.silent;
                // An empty cell is a no-op: no count, no history (IPython).
                let store = req.store_history && !silent && !req.code.trim().is_empty();
                if store {
                    execution_count += 1;
                    history
                        .entries
                        .push((execution_count as usize, req.code.clone()));
                }
                if !silent {
                    pubr.publish(
                        "execute_input",
                        json!({"code": req.code, "execution_count": execution_count}),
                    );
                }
                // The cluster must be up before the first cell runs.
                ensure_started(&mut session, &mut starting, &mut start_error).await;
                let mut p = pubr.clone();
                p.silent = silent;
                interrupts.borrow_and_update();
                let frontend_stdin =
                    stdin.for_request(msg.idents.clone(), header_value(&msg), req.allow_stdin);
                let outcome = match (&mut session, &start_error) {
                    (Some(s), _) => {
                        tokio::select! {
                            o = s.execute(&req.code, execution_count, &p, &frontend_stdin, &mut interrupts) => o,
                            _ = shutdown.cancelled() => {
                                s.interrupt_running();
                                CellOutcome::error("KernelShutdown", "the kernel is shutting down")
                            }
                        }
                    }
                    (None, Some(e)) => {
                        let text = format!("The Parallax cluster could not start: {e}\n");
                        p.stream("stderr", text.clone());
                        CellOutcome::error("ClusterError", &text)
                    }
                    (None, None) => CellOutcome::error("ClusterError", "no cluster"),
                };
                let mut content = json!({"status": "ok", "execution_count": execution_count,
                                         "payload": [], "user_expressions": {}});
                let failed = if let CellOutcome::Error(e) = &outcome {
                    if !silent {
                        p.publish("error", e.content());
                    }
                    content = json!({"status": "error", "execution_count": execution_count,
                                     "ename": e.ename, "evalue": e.evalue, "traceback": e.traceback,
                                     "payload": [], "user_expressions": {}});
                    true
                } else {
                    false
                };
                if let CellOutcome::Ok { result: Some(data) } = &outcome
                    && !silent
                {
                    p.publish(
                        "execute_result",
                        json!({"execution_count": execution_count, "data": data, "metadata": {}}),
                    );
                }
                // execute_requests queued behind a failed cell are aborted
                // (ipykernel 7's stop_on_error, not for silent cells), so "run
                // all" stops at the first error. Only those already here: take
                // them before the reply goes out. Other requests (complete,
                // inspect, …) are answered as usual, in order.
                let mut to_abort = Vec::new();
                if failed && req.stop_on_error && !silent {
                    while let Ok(m) = queue.try_recv() {
                        if m.msg_type() == "execute_request" {
                            to_abort.push(m);
                        } else {
                            kept.push_back(m);
                        }
                    }
                }
                finish(&shared, &sock, &msg, "execute_reply", content, &pubr).await;
                abort(&shared, &sock, to_abort, execution_count).await;
                continue;
            }
            "history_request" => ("history_reply", history.reply(&msg.content)),
            "comm_info_request" => ("comm_info_reply", json!({"status": "ok", "comms": {}})),
            "comm_open" => {
                // No kernel-side comm targets: close it so the frontend knows.
                if let Some(id) = msg.content.get("comm_id") {
                    pubr.publish("comm_close", json!({"comm_id": id, "data": {}}));
                }
                pubr.status("idle");
                continue;
            }
            "comm_msg" | "comm_close" => {
                pubr.status("idle");
                continue;
            }
            "shutdown_request" => {
                shutdown_reply(&shared, &sock, &msg, &pubr, &shutdown).await;
                break;
            }
            other => {
                warn!(msg_type = other, "unknown shell request ignored");
                pubr.status("idle");
                continue;
            }
        };
        finish(&shared, &sock, &msg, reply_type, content, &pubr).await;
    }
    // Stop what we started.
    if session.is_none()
        && let Some(h) = starting.take()
        && let Ok(Ok(s)) = h.await
    {
        session = Some(s);
    }
    if let Some(mut s) = session {
        s.shutdown().await;
    }
}

/// Wait for the background cluster start, once; its error is kept.
async fn ensure_started(
    session: &mut Option<PxSession>,
    starting: &mut Option<tokio::task::JoinHandle<Result<PxSession>>>,
    start_error: &mut Option<String>,
) {
    if session.is_some() || start_error.is_some() {
        return;
    }
    if let Some(h) = starting.take() {
        match h.await {
            Ok(Ok(s)) => *session = Some(s),
            Ok(Err(e)) => *start_error = Some(format!("{e:#}")),
            Err(e) => *start_error = Some(format!("cluster start panicked: {e}")),
        }
    }
}

fn fill_execute(c: &Value) -> Value {
    let mut c = c.clone();
    if let Some(m) = c.as_object_mut() {
        m.entry("silent").or_insert(json!(false));
        m.entry("store_history").or_insert(json!(true));
        m.entry("allow_stdin").or_insert(json!(false));
        m.entry("stop_on_error").or_insert(json!(true));
        m.entry("user_expressions").or_insert(json!({}));
    }
    c
}

fn with_count(mut c: Value, n: i64) -> Value {
    c["execution_count"] = json!(n);
    c
}

fn error_content(ename: &str, evalue: &str) -> Value {
    json!({"status": "error", "ename": ename, "evalue": evalue, "traceback": [format!("{ename}: {evalue}")]})
}

fn empty_reply(msg_type: &str, c: &Value) -> Value {
    let pos = c.get("cursor_pos").and_then(Value::as_i64).unwrap_or(0);
    if msg_type == "complete_request" {
        json!({"status": "ok", "matches": [], "cursor_start": pos, "cursor_end": pos, "metadata": {}})
    } else {
        json!({"status": "ok", "found": false, "data": {}, "metadata": {}})
    }
}

async fn finish(
    shared: &Shared,
    sock: &ShellSend,
    req: &Message,
    reply_type: &str,
    content: Value,
    pubr: &Publisher,
) {
    let frames = shared.reply(req, reply_type, content);
    send_frames(sock, frames).await;
    pubr.status("idle");
}

/// Answer a shutdown_request (on shell or control) and start the shutdown;
/// a restart is the frontend's business (it starts a new kernel).
async fn shutdown_reply(
    shared: &Shared,
    sock: &ShellSend,
    msg: &Message,
    pubr: &Publisher,
    shutdown: &CancellationToken,
) {
    let restart = msg
        .content
        .get("restart")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let c = json!({"status": "ok", "restart": restart});
    finish(shared, sock, msg, "shutdown_reply", c, pubr).await;
    shutdown.cancel();
}

async fn abort(shared: &Shared, sock: &ShellSend, msgs: Vec<Message>, count: i64) {
    for m in msgs {
        let pubr = shared.publisher(&m);
        pubr.status("busy");
        let rt = m.msg_type().replace("_request", "_reply");
        let c = if m.msg_type() == "execute_request" {
            json!({"status": "aborted", "execution_count": count})
        } else {
            json!({"status": "aborted"})
        };
        finish(shared, sock, &m, &rt, c, &pubr).await;
    }
}

async fn control_loop(
    shared: Arc<Shared>,
    sock: RouterSocket,
    mut auth: Authenticator,
    interrupt: Arc<watch::Sender<u64>>,
    shutdown: CancellationToken,
) {
    let limits = Limits::default();
    let (send, mut recv) = sock.split();
    let send: ShellSend = Arc::new(tokio::sync::Mutex::new(send));
    loop {
        let frames = tokio::select! {
            m = recv.recv() => match m {
                Ok(m) => m.into_vec(),
                Err(e) => {
                    debug!(error = %e, "control socket error");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let Some(msg) = verify(frames, &mut auth, &limits, "control") else {
            continue;
        };
        let pubr = shared.publisher(&msg);
        pubr.status("busy");
        let (rt, c) = match msg.msg_type() {
            "kernel_info_request" => ("kernel_info_reply", shared.kernel_info()),
            "interrupt_request" => {
                interrupt.send_modify(|v| *v += 1);
                ("interrupt_reply", json!({"status": "ok"}))
            }
            "shutdown_request" => {
                shutdown_reply(&shared, &send, &msg, &pubr, &shutdown).await;
                return;
            }
            "debug_request" => (
                "debug_reply",
                json!({"status": "error", "ename": "NotImplemented", "evalue": "the Parallax kernel has no debugger", "traceback": []}),
            ),
            other => {
                warn!(msg_type = other, "unknown control request ignored");
                pubr.status("idle");
                continue;
            }
        };
        finish(&shared, &send, &msg, rt, c, &pubr).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_kernel_info() {
        let info = serde_json::to_value(language_info(Language::Rust)).unwrap();
        assert_eq!(
            info,
            json!({"name": "rust", "version": "", "mimetype": "text/rust",
                   "file_extension": ".rs", "codemirror_mode": "rust", "pygments_lexer": "rust"})
        );
        let links = help_links(Language::Rust);
        assert!(
            links
                .iter()
                .any(|l| l.url == "https://github.com/evcxr/evcxr/blob/main/COMMON.md")
        );
        assert_eq!(help_links(Language::Python).len(), 1);
        let b = banner(Language::Rust, None, 4);
        assert!(
            b.starts_with("Parallax Rust: ")
                && b.contains("embedded, 4 engines")
                && b.contains(":dep"),
            "{b}"
        );
        let b = banner(Language::Python, None, 2);
        assert_eq!(
            b,
            "Parallax Python: every cell runs on the engines of a parallel cluster (embedded, 2 engines), \
             outputs merged as ipyparallel's %%px shows them.\n\
             Magics: %%px, %px, %pxconfig, %pxresult, %autopx, %engines, %cluster."
        );
    }

    #[test]
    fn glob() {
        assert!(glob_match("*", "anything"));
        assert!(glob_match("a*b", "a123b"));
        assert!(glob_match("print(?)", "print(1)"));
        assert!(!glob_match("a*c", "abd"));
    }

    #[test]
    fn history() {
        let h = History {
            entries: vec![
                (1, "a = 1".into()),
                (2, "print(a)".into()),
                (3, "a = 1".into()),
            ],
        };
        let r = h.reply(&json!({"hist_access_type": "tail", "n": 2}));
        assert_eq!(r["history"], json!([[0, 2, "print(a)"], [0, 3, "a = 1"]]));
        let r = h.reply(&json!({"hist_access_type": "search", "pattern": "a*", "unique": true}));
        assert_eq!(r["history"], json!([[0, 1, "a = 1"]]));
        let r = h.reply(&json!({"hist_access_type": "range", "start": 2, "stop": 3}));
        assert_eq!(r["history"], json!([[0, 2, "print(a)"]]));
    }
}
