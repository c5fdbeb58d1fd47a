//! The persistent Python subprocess behind the [`Interpreter`] trait.
//!
//! The engine starts `python -u parallax_engine_shim.py` with stdout and
//! stderr on pipes (so output is captured at the file-descriptor level:
//! `print`, `os.write(1, …)`, C extensions, child processes) and two more
//! pipes for commands (fd 3) and events (fd 4), which user code cannot
//! corrupt by printing. Frames on fds 3/4: `u32` LE JSON length, the JSON,
//! `u32` LE buffer count, then per buffer `u64` LE length and the bytes.
//!
//! At the end of each request the shim writes `\x1e<token>\n` to fds 1 and 2
//! and sends its `reply` with that token, so the engine knows it has read all
//! of the request's output before it replies. If the process dies, the
//! running request gets an error naming what happened and a fresh process is
//! started (the engine stays registered).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::interpreter::{
    InputHandle, Interpreter, Output, OutputSink, Reply, Request, SignalHandle, Stdin,
};

/// The Python side, embedded so the binary is self-contained.
pub const SHIM_SOURCE: &str = include_str!("../python/parallax_engine_shim.py");

const CMD_FD: RawFd = 3;
const EVT_FD: RawFd = 4;
const MARK: u8 = 0x1e;

/// How to start the Python subprocess.
#[derive(Debug, Clone)]
pub struct PythonConfig {
    pub python: PathBuf,
    pub env: Vec<(String, String)>,
    /// Start a fresh process after a crash (the default); when false a
    /// crash leaves the interpreter dead (`is_dead`) and the engine exits.
    pub restart_on_crash: bool,
    /// A zygote ([`crate::zygote`]): interpreters are forked by it;
    /// Python is spawned directly when it cannot (logged).
    pub zygote: Option<crate::zygote::Zygote>,
}

/// Resolve `python` as `execvp` would (a path, or a name searched on
/// PATH) and check that it is an executable file.
pub fn find_executable(python: &std::path::Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let ok = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if python.components().count() > 1 || python.is_absolute() {
        if ok(python) {
            return Ok(python.to_path_buf());
        }
        anyhow::bail!(
            "cannot start Python ({}): not an executable file",
            python.display()
        );
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(python);
        if ok(&p) {
            return Ok(p);
        }
    }
    anyhow::bail!(
        "cannot start Python ({}): not found on PATH",
        python.display()
    )
}

fn describe_signal(sig: i32) -> String {
    let name = match sig {
        libc::SIGKILL => "SIGKILL (killed, e.g. by the OOM killer)",
        libc::SIGSEGV => "SIGSEGV (segmentation fault)",
        libc::SIGABRT => "SIGABRT (aborted)",
        libc::SIGBUS => "SIGBUS",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    };
    format!("the Python process was terminated by signal {sig}: {name}")
}

fn kill(pid: i32, sig: i32) {
    if pid > 0 {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Something read from the subprocess.
#[derive(Debug)]
enum Event {
    /// A JSON event with its buffers, from fd 4.
    Msg(Map<String, Value>, Vec<Bytes>),
    /// Output text from fd 1 or 2.
    Text(&'static str, String),
    /// An end-of-request marker line on fd 1 or 2.
    Mark(&'static str, String),
    /// A pipe reached EOF (the process is gone or going).
    Eof(&'static str),
}

/// The interpreter process: our child, or the zygote's.
enum Handle {
    Spawned(Child),
    Forked(crate::zygote::Forked),
}

type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
/// A started process: handle, pid, stdout, stderr, command pipe (our
/// end), event pipe (our end).
type Started = (Handle, i32, BoxRead, BoxRead, OwnedFd, OwnedFd);

struct Proc {
    handle: Handle,
    pid: i32,
    /// Our end of the command pipe, driven by epoll (not tokio::fs, which
    /// would hand every write to the blocking thread pool).
    cmd: tokio::net::unix::pipe::Sender,
    events: mpsc::UnboundedReceiver<Event>,
    startup: Duration,
    /// A request reached this interpreter: its shutdown runs the user's
    /// atexit handlers. Before that it holds nothing of the user's and is
    /// killed at once (64 engines stopped right after they registered
    /// waited out their Pythons' start-up imports on 2 cores: 2 s).
    used: bool,
}

pub struct PythonInterpreter {
    cfg: PythonConfig,
    shim_path: PathBuf,
    proc: Option<Proc>,
    next_id: u64,
    python_version: String,
    signals: SignalHandle,
    /// The process crashed and `restart_on_crash` is off.
    dead: bool,
    /// `input_reply` values from the driver (the sender is its
    /// [`InputHandle`]); read only while a request runs.
    input_tx: InputHandle,
    input_rx: mpsc::UnboundedReceiver<String>,
}

/// This user's private (0700) directory for the shim and zygote sockets.
pub(crate) fn private_dir() -> std::io::Result<PathBuf> {
    let uid = unsafe_uid();
    let dir = std::env::temp_dir().join(format!("parallax-{uid}"));
    std::fs::create_dir_all(&dir)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(dir)
}

/// The shim's file: one copy per shim version, in the private directory.
pub fn shim_path() -> std::io::Result<PathBuf> {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in SHIM_SOURCE.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    let dir = private_dir()?;
    let path = dir.join(format!("parallax_engine_shim-{h:016x}.py"));
    if !path.exists() {
        let tmp = dir.join(format!(".shim-{}.tmp", std::process::id()));
        std::fs::write(&tmp, SHIM_SOURCE)?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(path)
}

fn unsafe_uid() -> u32 {
    // SAFETY: getuid cannot fail and has no side effects.
    unsafe { libc::getuid() }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds is a valid array of two ints; O_CLOEXEC keeps the ends out
    // of other children; the child gets its ends via dup2 in pre_exec.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two fresh descriptors that we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

async fn read_frames<R: tokio::io::AsyncRead + Unpin>(r: R, tx: mpsc::UnboundedSender<Event>) {
    // Buffered: a frame is several small reads; one syscall usually gets all.
    let mut r = tokio::io::BufReader::with_capacity(64 * 1024, r);
    loop {
        let mut len = [0u8; 4];
        if r.read_exact(&mut len).await.is_err() {
            let _ = tx.send(Event::Eof("events"));
            return;
        }
        let mut json = vec![0u8; u32::from_le_bytes(len) as usize];
        if r.read_exact(&mut json).await.is_err() {
            let _ = tx.send(Event::Eof("events"));
            return;
        }
        let mut nbuf = [0u8; 4];
        if r.read_exact(&mut nbuf).await.is_err() {
            let _ = tx.send(Event::Eof("events"));
            return;
        }
        let mut bufs = Vec::new();
        for _ in 0..u32::from_le_bytes(nbuf) {
            let mut l = [0u8; 8];
            if r.read_exact(&mut l).await.is_err() {
                let _ = tx.send(Event::Eof("events"));
                return;
            }
            let mut b = vec![0u8; u64::from_le_bytes(l) as usize];
            if r.read_exact(&mut b).await.is_err() {
                let _ = tx.send(Event::Eof("events"));
                return;
            }
            bufs.push(Bytes::from(b));
        }
        match serde_json::from_slice::<Value>(&json) {
            Ok(Value::Object(m)) => {
                let _ = tx.send(Event::Msg(m, bufs));
            }
            _ => warn!("undecodable event from the Python subprocess"),
        }
    }
}

/// The marker prefix the shim announces in `ready` (random per process);
/// empty until then.
type MarkerPrefix = Arc<OnceLock<Vec<u8>>>;

/// Forward output, splitting out end-of-request markers (`\x1e<prefix><n>\n`,
/// which may directly follow output without a trailing newline). Text is
/// sent as soon as it is read so output streams live.
async fn read_stream<R: AsyncRead + Unpin>(
    mut r: R,
    name: &'static str,
    tx: mpsc::UnboundedSender<Event>,
    prefix: MarkerPrefix,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => {
                if !pending.is_empty() {
                    let _ = tx.send(Event::Text(
                        name,
                        String::from_utf8_lossy(&pending).into_owned(),
                    ));
                }
                let _ = tx.send(Event::Eof(name));
                return;
            }
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        let mut out: Vec<u8> = Vec::new();
        let mut i = 0;
        'scan: while i < pending.len() {
            if pending[i] == MARK
                && let Some(p) = prefix.get()
            {
                let rest = &pending[i + 1..];
                let k = rest.len().min(p.len());
                if rest[..k] == p[..k] {
                    if rest.len() < p.len() {
                        break 'scan; // maybe a marker: wait for more bytes
                    }
                    match rest.iter().position(|&c| c == b'\n') {
                        Some(end) => {
                            if !out.is_empty() {
                                let _ = tx.send(Event::Text(
                                    name,
                                    String::from_utf8_lossy(&out).into_owned(),
                                ));
                                out.clear();
                            }
                            let token = String::from_utf8_lossy(&rest[..end]).into_owned();
                            let _ = tx.send(Event::Mark(name, token));
                            i += end + 2;
                            continue;
                        }
                        None if rest.len() < 256 => break 'scan,
                        None => {}
                    }
                }
            }
            out.push(pending[i]);
            i += 1;
        }
        pending.drain(..i);
        // Keep incomplete UTF-8 sequences for the next read.
        let cut = match std::str::from_utf8(&out) {
            Ok(_) => out.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => out.len(),
        };
        if cut < out.len() {
            let rest = out.split_off(cut);
            let mut p = rest;
            p.extend_from_slice(&pending);
            pending = p;
        }
        if !out.is_empty() {
            let _ = tx.send(Event::Text(
                name,
                String::from_utf8_lossy(&out).into_owned(),
            ));
        }
    }
}

impl PythonInterpreter {
    pub async fn start(cfg: PythonConfig) -> anyhow::Result<PythonInterpreter> {
        let shim_path = shim_path()?;
        let (input_tx, input_rx) = mpsc::unbounded_channel();
        let mut me = PythonInterpreter {
            cfg,
            shim_path,
            proc: None,
            next_id: 0,
            python_version: String::new(),
            signals: SignalHandle::default(),
            dead: false,
            input_tx,
            input_rx,
        };
        me.spawn().await?;
        Ok(me)
    }

    /// Ask the zygote for an interpreter; None (logged) when there is no
    /// zygote or it cannot fork one.
    async fn fork(&mut self) -> Option<Started> {
        let zygote = self.cfg.zygote.clone()?;
        let python = match crate::zygote::resolve_python(&self.cfg.python) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "not using the zygote");
                return None;
            }
        };
        let r: anyhow::Result<Started> = async {
            let (out_r, out_w) = pipe()?;
            let (err_r, err_w) = pipe()?;
            let (cmd_r, cmd_w) = pipe()?;
            let (evt_r, evt_w) = pipe()?;
            let mut env = self.cfg.env.clone();
            env.push(("PARALLAX_CMD_FD".into(), CMD_FD.to_string()));
            env.push(("PARALLAX_EVT_FD".into(), EVT_FD.to_string()));
            let fds = [
                out_w.as_raw_fd(),
                err_w.as_raw_fd(),
                cmd_r.as_raw_fd(),
                evt_w.as_raw_fd(),
            ];
            let keep = crate::zygote::inherited_fds()?;
            let conn = zygote.connect(&python).await?;
            let forked = crate::zygote::fork(conn, &python, &env, fds, &keep).await?;
            // the child has its copies; ours would hide its EOFs
            drop((out_w, err_w, cmd_r, evt_w));
            let pid = forked.pid;
            Ok((
                Handle::Forked(forked),
                pid,
                Box::new(tokio::net::unix::pipe::Receiver::from_owned_fd(out_r)?) as BoxRead,
                Box::new(tokio::net::unix::pipe::Receiver::from_owned_fd(err_r)?) as BoxRead,
                cmd_w,
                evt_r,
            ))
        }
        .await;
        match r {
            Ok(started) => Some(started),
            Err(e) => {
                warn!(error = %format!("{e:#}"), zygote = %zygote.socket().display(), "the zygote did not fork an interpreter; starting Python directly");
                None
            }
        }
    }

    fn spawn_direct(&mut self) -> anyhow::Result<Started> {
        let (cmd_r, cmd_w) = pipe()?;
        let (evt_r, evt_w) = pipe()?;
        let mut command = Command::new(&self.cfg.python);
        command
            .arg("-u")
            .arg(&self.shim_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("PARALLAX_CMD_FD", CMD_FD.to_string())
            .env("PARALLAX_EVT_FD", EVT_FD.to_string())
            .kill_on_drop(true);
        for (k, v) in &self.cfg.env {
            command.env(k, v);
        }
        let (cr, ew) = (cmd_r.as_raw_fd(), evt_w.as_raw_fd());
        // SAFETY: only async-signal-safe calls (dup2, setpgid) between fork
        // and exec.
        unsafe {
            command.pre_exec(move || {
                // Move both ends above the target numbers first, so neither
                // dup2 can clobber the other; dup2'd descriptors lose CLOEXEC.
                let a = libc::fcntl(cr, libc::F_DUPFD_CLOEXEC, 10);
                let b = libc::fcntl(ew, libc::F_DUPFD_CLOEXEC, 10);
                if a < 0 || b < 0 || libc::dup2(a, CMD_FD) < 0 || libc::dup2(b, EVT_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Own process group: a terminal's Ctrl-C to the engine must
                // not hit the interpreter; the engine forwards signals.
                libc::setpgid(0, 0);
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|e| {
            anyhow::anyhow!("cannot start Python ({}): {e}", self.cfg.python.display())
        })?;
        drop(cmd_r);
        drop(evt_w);
        let pid = child.id().unwrap_or(0) as i32;
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        Ok((
            Handle::Spawned(child),
            pid,
            Box::new(stdout) as BoxRead,
            Box::new(stderr) as BoxRead,
            cmd_w,
            evt_r,
        ))
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let t0 = Instant::now();
        let (handle, pid, stdout, stderr, cmd_w, evt_r) = match self.fork().await {
            Some(forked) => forked,
            None => self.spawn_direct()?,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let prefix: MarkerPrefix = Arc::new(OnceLock::new());
        tokio::spawn(read_stream(stdout, "stdout", tx.clone(), prefix.clone()));
        tokio::spawn(read_stream(stderr, "stderr", tx.clone(), prefix.clone()));
        let events = tokio::net::unix::pipe::Receiver::from_owned_fd(evt_r)?;
        tokio::spawn(read_frames(events, tx));
        let cmd = tokio::net::unix::pipe::Sender::from_owned_fd(cmd_w)?;
        let mut proc = Proc {
            handle,
            pid,
            cmd,
            events: rx,
            startup: Duration::ZERO,
            used: false,
        };
        // Wait for `ready`.
        let ready = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match proc.events.recv().await {
                    Some(Event::Msg(m, _))
                        if m.get("ev").and_then(Value::as_str) == Some("ready") =>
                    {
                        return Ok(m);
                    }
                    Some(Event::Text(_, t)) => {
                        debug!(text = %t.trim_end(), "python start-up output")
                    }
                    Some(Event::Eof(_)) | None => {
                        return Err(anyhow::anyhow!(
                            "the Python subprocess exited during start-up"
                        ));
                    }
                    Some(_) => {}
                }
            }
        })
        .await
        .map_err(|_| anyhow::anyhow!("the Python subprocess did not start within 30 s"))??;
        proc.startup = t0.elapsed();
        if let Some(p) = ready.get("end_prefix").and_then(Value::as_str) {
            let _ = prefix.set(p.as_bytes().to_vec());
        }
        self.python_version = ready
            .get("python")
            .and_then(Value::as_str)
            .unwrap_or("3")
            .to_owned();
        let forked = matches!(proc.handle, Handle::Forked(_));
        info!(pid, forked, startup_ms = proc.startup.as_secs_f64() * 1e3, python = %self.python_version, "Python subprocess ready");
        self.signals
            .pid
            .store(pid, std::sync::atomic::Ordering::SeqCst);
        self.proc = Some(proc);
        Ok(())
    }

    pub fn pid(&self) -> Option<i32> {
        self.proc.as_ref().map(|p| p.pid)
    }

    pub fn startup_time(&self) -> Option<Duration> {
        self.proc.as_ref().map(|p| p.startup)
    }

    async fn send_cmd(proc: &mut Proc, cmd: &Value, buffers: &[Bytes]) -> std::io::Result<()> {
        let json = serde_json::to_vec(cmd).expect("JSON serializes");
        let mut frame = Vec::with_capacity(json.len() + 8);
        frame.extend_from_slice(&(json.len() as u32).to_le_bytes());
        frame.extend_from_slice(&json);
        frame.extend_from_slice(&(buffers.len() as u32).to_le_bytes());
        // Small buffers go in the same write; large ones are written as they are.
        for b in buffers {
            frame.extend_from_slice(&(b.len() as u64).to_le_bytes());
            if b.len() <= 64 * 1024 {
                frame.extend_from_slice(b);
            } else {
                proc.cmd.write_all(&frame).await?;
                frame.clear();
                proc.cmd.write_all(b).await?;
            }
        }
        proc.cmd.write_all(&frame).await?;
        proc.cmd.flush().await
    }

    /// Describe how the process ended, for the error reply.
    async fn death(proc: &mut Proc) -> String {
        let child = match &mut proc.handle {
            Handle::Spawned(child) => child,
            Handle::Forked(f) => {
                return match f.ended(Duration::from_secs(2)).await {
                    Some(crate::zygote::Ended::Signal(sig)) => describe_signal(sig),
                    Some(crate::zygote::Ended::Exit(code)) => {
                        format!("the Python process exited with code {code}")
                    }
                    Some(crate::zygote::Ended::Unknown) => {
                        "the Python process ended (how is unknown: the zygote that forked it is gone)"
                            .to_owned()
                    }
                    None => {
                        kill(proc.pid, libc::SIGKILL);
                        "the Python process stopped responding and was killed".to_owned()
                    }
                };
            }
        };
        let status = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
        match status {
            Ok(Ok(s)) => {
                use std::os::unix::process::ExitStatusExt;
                if let Some(sig) = s.signal() {
                    describe_signal(sig)
                } else {
                    format!(
                        "the Python process exited with code {}",
                        s.code().unwrap_or(-1)
                    )
                }
            }
            _ => {
                let _ = child.start_kill();
                "the Python process stopped responding and was killed".to_owned()
            }
        }
    }

    /// After a crash: a fresh process, or (`restart_on_crash` off) none,
    /// and the words for the error reply.
    async fn after_crash(&mut self) -> String {
        if !self.cfg.restart_on_crash {
            self.dead = true;
            self.signals
                .pid
                .store(0, std::sync::atomic::Ordering::SeqCst);
            return "the engine exits (--restart-on-crash=false)".to_owned();
        }
        match self.spawn().await {
            Ok(()) => "it was restarted with a fresh namespace".to_owned(),
            Err(e) => format!("restarting it failed: {e}"),
        }
    }

    async fn run_inner(&mut self, req: Request, out: OutputSink) -> Reply {
        if self.dead {
            return Reply::error("EngineError", "the Python process is gone");
        }
        if self.proc.is_none()
            && let Err(e) = self.spawn().await
        {
            return Reply::error("EngineError", format!("cannot start Python: {e}"));
        }
        if let Some(p) = self.proc.as_mut() {
            p.used = true;
        }
        self.next_id += 1;
        let id = self.next_id;
        let (cmd, buffers) = match req {
            Request::Execute {
                code,
                silent,
                store_history,
                user_expressions,
                execution_count,
                stdin,
            } => {
                let mut cmd = json!({"op": "execute", "id": id, "code": code, "silent": silent,
                       "store_history": store_history, "user_expressions": user_expressions,
                       "execution_count": execution_count});
                match stdin {
                    Stdin::Forward => cmd["stdin"] = json!(true),
                    Stdin::Refuse(Some(why)) => cmd["stdin_refused"] = json!(why),
                    Stdin::Refuse(None) => {}
                }
                (cmd, vec![])
            }
            Request::Apply { buffers } => (json!({"op": "apply", "id": id}), buffers),
            Request::Complete { code, cursor_pos } => (
                json!({"op": "complete", "id": id, "code": code, "cursor_pos": cursor_pos}),
                vec![],
            ),
            Request::Inspect {
                code,
                cursor_pos,
                detail_level,
            } => (
                json!({"op": "inspect", "id": id, "code": code, "cursor_pos": cursor_pos,
                       "detail_level": detail_level}),
                vec![],
            ),
            Request::IsComplete { code } => {
                (json!({"op": "is_complete", "id": id, "code": code}), vec![])
            }
            Request::Clear => (json!({"op": "clear", "id": id}), vec![]),
        };
        // Values for an earlier request's input() (answered after it ended).
        while self.input_rx.try_recv().is_ok() {}
        let proc = self.proc.as_mut().expect("spawned above");
        if let Err(e) = Self::send_cmd(proc, &cmd, &buffers).await {
            let why = Self::death(proc).await;
            self.proc = None;
            warn!(error = %e, %why, "Python subprocess lost");
            let next = self.after_crash().await;
            return Reply::error("EngineError", format!("{why}; {next}"));
        }
        let mut reply: Option<Reply> = None;
        let mut end_token: Option<String> = None;
        let mut marks: Vec<(&'static str, String)> = Vec::new();
        let mut eof = false;
        // The shim's sequence number of the input() waiting for an answer.
        let mut awaiting_input: Option<u64> = None;
        loop {
            if let (Some(_), Some(tok)) = (&reply, &end_token) {
                let seen = |n: &str| marks.iter().any(|(s, t)| *s == n && t == tok);
                if seen("stdout") && seen("stderr") {
                    break;
                }
            }
            let ev = tokio::select! {
                ev = proc.events.recv() => Ok(ev),
                Some(value) = self.input_rx.recv() => Err(value),
            };
            let ev = match ev {
                Ok(ev) => ev,
                Err(value) => {
                    // One answer per input_request; a second (or one after
                    // the input() was interrupted) is dropped.
                    if let Some(seq) = awaiting_input.take() {
                        let cmd = json!({"op": "input_reply", "seq": seq, "value": value});
                        if let Err(e) = Self::send_cmd(proc, &cmd, &[]).await {
                            debug!(error = %e, "input_reply not delivered");
                        }
                    }
                    continue;
                }
            };
            let ev = match ev {
                Some(ev) => ev,
                None => {
                    eof = true;
                    break;
                }
            };
            match ev {
                Event::Text(name, text) => {
                    let _ = out.send(Output::Stream {
                        name: name.to_owned(),
                        text,
                    });
                }
                Event::Mark(name, token) => {
                    if end_token.as_ref().is_some_and(|t| *t == token) || reply.is_none() {
                        marks.push((name, token));
                    } else {
                        // not ours: it was user output after all
                        let _ = out.send(Output::Stream {
                            name: name.to_owned(),
                            text: format!("\x1e{token}\n"),
                        });
                    }
                }
                Event::Eof(pipe) => {
                    debug!(pipe, "Python subprocess pipe closed");
                    eof = true;
                    break;
                }
                Event::Msg(m, bufs) => {
                    let ev_type = m.get("ev").and_then(Value::as_str).unwrap_or("");
                    match ev_type {
                        "display_data" => {
                            let _ = out.send(Output::DisplayData {
                                data: m.get("data").cloned().unwrap_or(json!({})),
                                metadata: m.get("metadata").cloned().unwrap_or(json!({})),
                                transient: m.get("transient").cloned().unwrap_or(json!({})),
                                update: m.get("update").and_then(Value::as_bool).unwrap_or(false),
                            });
                        }
                        "clear_output" => {
                            let wait = m.get("wait").and_then(Value::as_bool).unwrap_or(false);
                            let _ = out.send(Output::ClearOutput { wait });
                        }
                        "execute_result" => {
                            let _ = out.send(Output::ExecuteResult {
                                execution_count: m
                                    .get("execution_count")
                                    .and_then(Value::as_i64)
                                    .unwrap_or(0),
                                data: m.get("data").cloned().unwrap_or(json!({})),
                                metadata: m.get("metadata").cloned().unwrap_or(json!({})),
                            });
                        }
                        "error" => {
                            let tb = m
                                .get("traceback")
                                .and_then(Value::as_array)
                                .map(|a| {
                                    a.iter()
                                        .filter_map(|x| x.as_str().map(str::to_owned))
                                        .collect()
                                })
                                .unwrap_or_default();
                            let _ = out.send(Output::Error {
                                ename: m
                                    .get("ename")
                                    .and_then(Value::as_str)
                                    .unwrap_or("Error")
                                    .to_owned(),
                                evalue: m
                                    .get("evalue")
                                    .and_then(Value::as_str)
                                    .unwrap_or("")
                                    .to_owned(),
                                traceback: tb,
                            });
                        }
                        "input_request" => {
                            awaiting_input = m.get("seq").and_then(Value::as_u64);
                            let _ = out.send(Output::InputRequest {
                                prompt: m
                                    .get("prompt")
                                    .and_then(Value::as_str)
                                    .unwrap_or("")
                                    .to_owned(),
                                password: m
                                    .get("password")
                                    .and_then(Value::as_bool)
                                    .unwrap_or(false),
                            });
                        }
                        "data_pub" => {
                            let _ = out.send(Output::DataMessage {
                                keys: m.get("keys").cloned().unwrap_or(json!([])),
                                buffers: bufs,
                            });
                        }
                        "reply" => {
                            awaiting_input = None;
                            let mut content = match m.get("content") {
                                Some(Value::Object(c)) => c.clone(),
                                _ => Map::new(),
                            };
                            let metadata = match content.remove("__parallax_metadata") {
                                Some(Value::Object(md)) => md,
                                _ => Map::new(),
                            };
                            end_token = m.get("end").and_then(Value::as_str).map(str::to_owned);
                            if end_token.is_none() {
                                // No marker protocol for this reply: done.
                                reply = Some(Reply {
                                    content,
                                    buffers: bufs,
                                    metadata,
                                });
                                break;
                            }
                            reply = Some(Reply {
                                content,
                                buffers: bufs,
                                metadata,
                            });
                        }
                        other => debug!(event = other, "ignoring event from the Python subprocess"),
                    }
                }
            }
        }
        if eof {
            // Drain whatever output made it out before the process died.
            while let Ok(ev) = proc.events.try_recv() {
                if let Event::Text(name, text) = ev {
                    let _ = out.send(Output::Stream {
                        name: name.to_owned(),
                        text,
                    });
                }
            }
            let why = Self::death(proc).await;
            self.proc = None;
            warn!(%why, "Python subprocess died");
            let restart = self.after_crash().await;
            let mut r = Reply::error("EngineError", format!("{why}; {restart}"));
            if let Some(prev) = reply {
                // the reply arrived but the process died right after
                return prev;
            }
            let _ = out.send(Output::Error {
                ename: "EngineError".into(),
                evalue: format!("{why}; {restart}"),
                traceback: vec![format!("EngineError: {why}; {restart}")],
            });
            if !self.dead {
                r.content.insert("engine_restarted".into(), json!(true));
            }
            return r;
        }
        reply.unwrap_or_else(|| Reply::error("EngineError", "no reply from the Python process"))
    }
}

impl Interpreter for PythonInterpreter {
    async fn run(&mut self, req: Request, out: OutputSink) -> Reply {
        self.run_inner(req, out).await
    }

    fn signal_handle(&self) -> SignalHandle {
        self.signals.clone()
    }

    fn input_handle(&self) -> Option<InputHandle> {
        Some(self.input_tx.clone())
    }

    fn is_dead(&self) -> bool {
        self.dead
    }

    async fn shutdown(&mut self) {
        if let Some(mut p) = self.proc.take() {
            if !p.used {
                match &mut p.handle {
                    Handle::Spawned(child) => {
                        let _ = child.kill().await;
                    }
                    // dropping the connection makes the zygote kill it
                    Handle::Forked(_) => {}
                }
                return;
            }
            self.next_id += 1;
            let _ =
                Self::send_cmd(&mut p, &json!({"op": "shutdown", "id": self.next_id}), &[]).await;
            match &mut p.handle {
                Handle::Spawned(child) => {
                    if tokio::time::timeout(Duration::from_secs(2), child.wait())
                        .await
                        .is_err()
                    {
                        let _ = child.kill().await;
                    }
                }
                // not ended in time: dropping the connection makes the
                // zygote kill it
                Handle::Forked(f) => {
                    let _ = f.ended(Duration::from_secs(2)).await;
                }
            }
        }
    }

    fn language_info(&self) -> Value {
        json!({
            "name": "python",
            "version": self.python_version,
            "mimetype": "text/x-python",
            "file_extension": ".py",
            "codemirror_mode": {"name": "ipython", "version": 3},
            "pygments_lexer": "ipython3",
            "nbconvert_exporter": "python",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `chunks` through `read_stream` and collect what it reports.
    async fn stream_events(chunks: &[&[u8]]) -> Vec<String> {
        let (mut w, r) = tokio::io::duplex(1 << 20);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let prefix: MarkerPrefix = Arc::new(OnceLock::new());
        prefix.set(b"pxe-ab12-".to_vec()).unwrap();
        let reader = tokio::spawn(read_stream(r, "stdout", tx, prefix));
        for c in chunks {
            w.write_all(c).await.unwrap();
            w.flush().await.unwrap();
            tokio::task::yield_now().await;
        }
        drop(w);
        reader.await.unwrap();
        let mut out = Vec::new();
        let mut text = String::new();
        while let Ok(ev) = rx.try_recv() {
            match ev {
                Event::Text(_, t) => text.push_str(&t),
                Event::Mark(_, tok) => {
                    if !text.is_empty() {
                        out.push(format!("text:{text}"));
                        text.clear();
                    }
                    out.push(format!("mark:{tok}"));
                }
                Event::Eof(_) => {
                    if !text.is_empty() {
                        out.push(format!("text:{text}"));
                        text.clear();
                    }
                    out.push("eof".into());
                }
                Event::Msg(..) => unreachable!(),
            }
        }
        out
    }

    #[tokio::test]
    async fn markers_are_split_from_output() {
        let got =
            stream_events(&[b"hello\n\x1epxe-ab12-1\nworld", b" again\n\x1epxe-ab12-2\n"]).await;
        assert_eq!(
            got,
            vec![
                "text:hello\n",
                "mark:pxe-ab12-1",
                "text:world again\n",
                "mark:pxe-ab12-2",
                "eof"
            ]
        );
    }

    #[tokio::test]
    async fn a_marker_split_across_reads_is_still_found() {
        let got = stream_events(&[b"out\n\x1epxe-a", b"b12-7\nmore"]).await;
        assert_eq!(
            got,
            vec!["text:out\n", "mark:pxe-ab12-7", "text:more", "eof"]
        );
    }

    #[tokio::test]
    async fn a_marker_right_after_output_without_newline_is_found() {
        let got = stream_events(&[b"partial\x1epxe-ab12-3\n"]).await;
        assert_eq!(got, vec!["text:partial", "mark:pxe-ab12-3", "eof"]);
    }

    #[tokio::test]
    async fn record_separator_inside_a_line_is_text() {
        let got = stream_events(&[b"a\x1eb\n\x1epxe-zz\n"]).await;
        assert_eq!(got, vec!["text:a\x1eb\n\x1epxe-zz\n", "eof"]);
    }

    #[tokio::test]
    async fn utf8_split_across_reads_is_not_mangled() {
        let s = "ünï ✓ 🚀\n".as_bytes();
        let (a, b) = s.split_at(2); // inside 'ü'
        let got = stream_events(&[a, b]).await;
        assert_eq!(got, vec!["text:ünï ✓ 🚀\n", "eof"]);
    }

    #[tokio::test]
    async fn frames_decode_with_buffers() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let path = std::env::temp_dir().join(format!("plx-frames-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        // write one frame into a file, then read it back through read_frames
        let json = br#"{"ev":"reply","id":1}"#;
        let mut f = Vec::new();
        f.extend_from_slice(&(json.len() as u32).to_le_bytes());
        f.extend_from_slice(json);
        f.extend_from_slice(&2u32.to_le_bytes());
        for b in [&b"abc"[..], &b""[..]] {
            f.extend_from_slice(&(b.len() as u64).to_le_bytes());
            f.extend_from_slice(b);
        }
        std::fs::write(&path, &f).unwrap();
        let file = tokio::fs::File::open(&path).await.unwrap();
        read_frames(file, tx).await;
        let _ = std::fs::remove_file(&path);
        match rx.try_recv().unwrap() {
            Event::Msg(m, bufs) => {
                assert_eq!(m["ev"], "reply");
                assert_eq!(bufs, vec![Bytes::from_static(b"abc"), Bytes::new()]);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(rx.try_recv().unwrap(), Event::Eof("events")));
    }
}
