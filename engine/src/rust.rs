//! Rust cells in evcxr behind the [`Interpreter`] trait.
//!
//! Each Rust engine owns an evcxr `CommandContext` on a worker thread of its
//! own (evcxr blocks). evcxr compiles every cell into a shared library with
//! cargo and runs it in a *runtime* process: this same binary re-executed
//! with `EVCXR_IS_RUNTIME=1`, which [`runtime_hook`] turns into evcxr's
//! runtime loop. Variables live in that process; functions, types and `use`
//! items live in the context and survive it.
//!
//! **Output.** evcxr reads the runtime's stdout line by line and its own
//! protocol lines travel on the same pipe, so in the runtime process
//! [`runtime_hook`] puts a small relay between the user's fds 1/2 and the
//! pipes evcxr reads ([`Relay`]): it ends a partial last line before evcxr's
//! end-of-cell marker (evcxr would otherwise wait for it forever), and it
//! moves stderr onto stdout as `\x1eE` lines, so that everything a cell
//! printed reaches the engine, in order, before evcxr reports the cell
//! done. A panic adds a `\x1eP` line before evcxr's panic notification
//! (which evcxr keeps to itself), so the engine can report the panic.
//!
//! **Compilation** is shared between the engines of one machine through
//! [`crate::rustc_cache`]. **Interrupt**: a running cell can only be stopped
//! by ending the runtime process, which loses the variables; during
//! compilation only cargo is stopped and nothing is lost. Either way the
//! error says which.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Select, TryRecvError};
use serde_json::{Map, Value, json};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::interpreter::{Interpreter, Output, OutputSink, Reply, Request, SignalHandle};
use crate::rust_syntax::rustc_version;
use crate::rustc_cache;

/// Lines the relay adds to the runtime's stdout (evcxr passes them on as
/// output lines): stderr text, a panic, and an escaped user line that
/// started with the marker byte.
const RELAY_STDERR: &str = "\x1eE";
const RELAY_PANIC: &str = "\x1eP";
const RELAY_ESCAPED: &str = "\x1eO";
const EVCXR_DONE: &[u8] = b"EVCXR_EXECUTION_COMPLETE";
const EVCXR_PANIC: &[u8] = b"EVCXR_PANIC_NOTIFICATION";

/// Must be the first call in `main` of the binary evcxr re-executes: in the
/// runtime process and in the rustc wrapper it never returns.
pub fn runtime_hook() {
    if std::env::var_os("EVCXR_IS_RUNTIME").is_some() {
        // SAFETY: the runtime process is still single-threaded here.
        unsafe {
            // Die with the engine even while a cell runs (evcxr spawns the
            // runtime from the engine's evcxr thread, which lives as long
            // as the engine).
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // evcxr sets RUST_BACKTRACE=1; a backtrace through a stripped
            // cell library is noise, so it is opt-in.
            let bt = std::env::var("PARALLAX_RUST_BACKTRACE").unwrap_or_else(|_| "0".into());
            std::env::set_var("RUST_BACKTRACE", bt);
        }
        if let Err(e) = Relay::install() {
            eprintln!("parallax: output relay not installed: {e}");
        }
    } else if std::env::var_os("EVCXR_RUSTC_WRAPPER").is_none() {
        rustc_cache::wrapper_hook();
    }
    evcxr::runtime_hook();
}

/// Prepare the environment of a Rust engine process: cargo runs rustc
/// through this binary with the shared cache (unless `PARALLAX_RUSTC_CACHE`
/// is already set, or `off`). Call before any thread starts.
pub fn prepare_process_env() {
    let dir = match std::env::var_os(rustc_cache::CACHE_ENV) {
        Some(d) => d,
        None => match rustc_cache::default_dir() {
            Some(d) => d.into_os_string(),
            None => return,
        },
    };
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    // SAFETY: called from main before the runtime (or any thread) starts.
    unsafe {
        std::env::set_var(rustc_cache::CACHE_ENV, &dir);
        if dir != "off" {
            std::env::set_var("RUSTC_WRAPPER", exe);
        }
    }
}

// ---------------------------------------------------------------- relay

/// The runtime process's output relay (see the module docs).
struct Relay {
    out: File,
    /// To and from the flusher thread the setup cell starts in the runtime
    /// ([`FLUSHER_SETUP`]): user code's stdout buffer lives in the shared
    /// libstd the cells link, out of this binary's reach.
    flush_req: File,
    flush_ack: File,
    flusher_ready: bool,
    out_r: File,
    err_r: File,
    out_pending: Vec<u8>,
    err_pending: Vec<u8>,
    err_lines: VecDeque<Vec<u8>>,
    in_content: bool,
}

fn pipe_cloexec() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two fresh descriptors that we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn read_some(f: &File, buf: &mut [u8], nonblocking: bool) -> std::io::Result<usize> {
    if nonblocking {
        let mut p = libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, 0) } <= 0 {
            return Ok(0);
        }
    }
    // SAFETY: buf is valid for buf.len() bytes.
    let n = unsafe { libc::read(f.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl Relay {
    /// Point fds 1 and 2 at pipes and relay them to the original stdout on a
    /// thread.
    fn install() -> std::io::Result<()> {
        // SAFETY: dup of our own stdout; the new descriptor is owned below.
        let real_out = unsafe { libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 10) };
        if real_out < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: real_out is a fresh descriptor we own.
        let out = unsafe { File::from_raw_fd(real_out) };
        let (out_r, out_w) = pipe_cloexec()?;
        let (err_r, err_w) = pipe_cloexec()?;
        // SAFETY: dup2 onto the standard descriptors; the pipe ends stay
        // owned by the OwnedFds, which close their originals on drop.
        unsafe {
            if libc::dup2(out_w.as_raw_fd(), 1) < 0 || libc::dup2(err_w.as_raw_fd(), 2) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        drop((out_w, err_w));
        let (req_r, req_w) = pipe_cloexec()?;
        let (ack_r, ack_w) = pipe_cloexec()?;
        // SAFETY: still single-threaded (the relay thread starts below).
        unsafe {
            std::env::set_var(
                FLUSH_FDS_ENV,
                format!("{},{}", req_r.as_raw_fd(), ack_w.as_raw_fd()),
            );
        }
        // The flusher owns these two ends from now on.
        std::mem::forget((req_r, ack_w));
        let mut relay = Relay {
            out,
            flush_req: File::from(req_w),
            flush_ack: File::from(ack_r),
            flusher_ready: false,
            out_r: File::from(out_r),
            err_r: File::from(err_r),
            out_pending: Vec::new(),
            err_pending: Vec::new(),
            err_lines: VecDeque::new(),
            in_content: false,
        };
        std::thread::Builder::new()
            .name("parallax-relay".into())
            .spawn(move || relay.run())?;
        Ok(())
    }

    fn run(&mut self) {
        let mut buf = vec![0u8; 64 * 1024];
        let mut err_buf = vec![0u8; 64 * 1024];
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.err_r.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.out_r.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds.
            if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
                continue;
            }
            // stderr first: what a cell wrote to stderr before stdout must
            // come out before it.
            if fds[0].revents != 0 {
                self.drain_err(&mut err_buf);
            }
            if fds[1].revents != 0 {
                match read_some(&self.out_r, &mut buf, false) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        self.drain_err(&mut err_buf);
                        self.out_pending.extend_from_slice(&buf[..n]);
                        self.process_out();
                    }
                }
            }
        }
    }

    fn drain_err(&mut self, buf: &mut [u8]) {
        while let Ok(n) = read_some(&self.err_r, buf, true) {
            if n == 0 {
                break;
            }
            self.err_pending.extend_from_slice(&buf[..n]);
            while let Some(i) = self.err_pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.err_pending.drain(..=i).collect();
                let line = line[..line.len() - 1].to_vec();
                // The panic hook starts with a blank line: drop it.
                if line.starts_with(b"thread '")
                    && find(&line, b" panicked at ").is_some()
                    && self.err_lines.back().is_some_and(|l| l.is_empty())
                {
                    self.err_lines.pop_back();
                }
                self.err_lines.push_back(line);
            }
        }
        if self.out_pending.is_empty() && !self.in_content {
            self.flush_err(false);
        }
    }

    /// Write held stderr lines (and, at the end of a cell, a partial one).
    fn flush_err(&mut self, with_partial: bool) {
        if with_partial && !self.err_pending.is_empty() {
            let line = std::mem::take(&mut self.err_pending);
            self.err_lines.push_back(line);
        }
        let mut out = Vec::new();
        // A blank last line waits (it may start a panic message), except at
        // the end of a cell.
        let keep =
            usize::from(!with_partial && self.err_lines.back().is_some_and(|l| l.is_empty()));
        while self.err_lines.len() > keep {
            let l = self.err_lines.pop_front().expect("len checked");
            out.extend_from_slice(RELAY_STDERR.as_bytes());
            out.extend_from_slice(&l);
            out.push(b'\n');
        }
        self.write(&out);
    }

    fn write(&mut self, bytes: &[u8]) {
        if !bytes.is_empty() {
            let _ = self.out.write_all(bytes);
        }
    }

    fn process_out(&mut self) {
        while let Some(i) = self.out_pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.out_pending.drain(..=i).collect();
            self.line(&line[..line.len() - 1]);
        }
        if self.out_pending.is_empty() && !self.in_content {
            self.flush_err(false);
        }
    }

    fn line(&mut self, line: &[u8]) {
        if self.in_content {
            self.write(line);
            self.write(b"\n");
            if line == b"EVCXR_END_CONTENT" {
                self.in_content = false;
            }
            return;
        }
        for (marker, is_done) in [(EVCXR_DONE, true), (EVCXR_PANIC, false)] {
            if line.ends_with(marker) {
                // A cell's last text without a newline comes first, as a
                // line of its own.
                let text = &line[..line.len() - marker.len()];
                if !text.is_empty() {
                    self.user_line(text);
                }
                if is_done {
                    self.flush_user_stdout();
                }
                self.flush_err(is_done);
                if !is_done {
                    self.write(RELAY_PANIC.as_bytes());
                    self.write(b"\n");
                }
                self.write(marker);
                self.write(b"\n");
                return;
            }
        }
        if let Some(at) = find(line, b"EVCXR_BEGIN_CONTENT ") {
            if at > 0 {
                self.user_line(&line[..at]);
            }
            let line = &line[at..];
            self.flush_err(false);
            self.in_content = true;
            self.write(line);
            self.write(b"\n");
            return;
        }
        self.user_line(line);
    }

    /// At the end of a cell, have the flusher flush user code's stdout and
    /// relay what that wrote (text the cell printed without a newline).
    fn flush_user_stdout(&mut self) {
        let mut b = [0u8; 16];
        if !self.flusher_ready {
            match read_some(&self.flush_ack, &mut b, true) {
                Ok(n) if n > 0 => self.flusher_ready = true,
                _ => return,
            }
        }
        if self.flush_req.write_all(b"f").is_err() {
            self.flusher_ready = false;
            return;
        }
        let mut p = libc::pollfd {
            fd: self.flush_ack.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, 500) } <= 0 {
            return;
        }
        let _ = read_some(&self.flush_ack, &mut b, true);
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = read_some(&self.out_r, &mut buf, true) {
            if n == 0 {
                break;
            }
            self.out_pending.extend_from_slice(&buf[..n]);
        }
        let rest = std::mem::take(&mut self.out_pending);
        for l in rest.split(|&c| c == b'\n') {
            if !l.is_empty() {
                self.user_line(l);
            }
        }
    }

    fn user_line(&mut self, line: &[u8]) {
        if line.first() == Some(&0x1e) {
            self.write(RELAY_ESCAPED.as_bytes());
        }
        self.write(line);
        self.write(b"\n");
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Names the runtime's flush pipes (request read end, ack write end).
const FLUSH_FDS_ENV: &str = "PARALLAX_FLUSH_FDS";

/// Run in each new runtime process: a thread in user code's libstd that
/// flushes stdout when the relay asks (after every cell).
const FLUSHER_SETUP: &str = r#"{
    use std::io::{Read, Write};
    use std::os::fd::FromRawFd;
    let fds = std::env::var("PARALLAX_FLUSH_FDS").ok().and_then(|v| {
        let (r, w) = v.split_once(',')?;
        Some((r.parse::<i32>().ok()?, w.parse::<i32>().ok()?))
    });
    if let Some((r, w)) = fds {
        std::thread::spawn(move || {
            let mut r = unsafe { std::fs::File::from_raw_fd(r) };
            let mut w = unsafe { std::fs::File::from_raw_fd(w) };
            let _ = w.write_all(b"h");
            let mut b = [0u8; 1];
            while r.read_exact(&mut b).is_ok() {
                let _ = std::io::stdout().flush();
                if w.write_all(b"a").is_err() {
                    break;
                }
            }
        });
    }
}"#;

/// Warms evcxr's rust-analyzer (its first type inference loads the
/// standard library, seconds of CPU) and the display path, before the
/// first user cell; `:clear` then forgets the variable.
const WARMUP: &str =
    "let parallax_warmup: Vec<String> = vec![String::new()];\nparallax_warmup.len()";

// ------------------------------------------------------------ the engine

/// Output of the running cell, shared by the evcxr thread and the threads
/// that drain evcxr's stdout and stderr channels.
#[derive(Default)]
struct CellState {
    sink: Option<OutputSink>,
    stdout: String,
    stderr: String,
    panicked: bool,
    /// stderr lines of a panic message, from `thread '…' panicked at`.
    panic_lines: Option<Vec<String>>,
}

impl CellState {
    fn flush(&mut self) {
        for (name, text) in [("stdout", &mut self.stdout), ("stderr", &mut self.stderr)] {
            if text.is_empty() {
                continue;
            }
            let text = std::mem::take(text);
            if let Some(s) = &self.sink {
                let _ = s.send(Output::Stream {
                    name: name.into(),
                    text,
                });
            }
        }
    }

    fn push(&mut self, stderr: bool, text: &str) {
        // Keep the two streams' order: flush the other one first.
        if stderr && !self.stdout.is_empty() || !stderr && !self.stderr.is_empty() {
            self.flush();
        }
        let buf = if stderr {
            &mut self.stderr
        } else {
            &mut self.stdout
        };
        buf.push_str(text);
        buf.push('\n');
    }

    fn line(&mut self, line: &str) {
        if let Some(err) = line.strip_prefix(RELAY_STDERR) {
            self.stderr_line(err);
        } else if line == RELAY_PANIC {
            self.panicked = true;
        } else if let Some(text) = line.strip_prefix(RELAY_ESCAPED) {
            self.push(false, text);
        } else {
            self.push(false, line);
        }
    }

    fn stderr_line(&mut self, line: &str) {
        if line.starts_with("thread '") && line.contains(" panicked at ") {
            self.end_panic_capture();
            self.panic_lines = Some(vec![line.to_owned()]);
        } else if let Some(lines) = &mut self.panic_lines {
            if !line.starts_with("note: run with `RUST_BACKTRACE=1`") {
                lines.push(line.to_owned());
            }
        } else {
            self.push(true, line);
        }
    }

    /// A panic message that no panic notification claimed (a panic in a
    /// thread the cell spawned) is ordinary stderr.
    fn end_panic_capture(&mut self) {
        if let Some(lines) = self.panic_lines.take() {
            for l in lines {
                self.push(true, &l);
            }
        }
    }
}

/// Drain one of evcxr's output channels. A message is taken off the channel
/// and handled under the state lock, so once evcxr sees its stdout channel
/// empty (it waits for that before returning from a cell) and the evcxr
/// thread takes the lock, every line of the cell has been handled.
fn drain(rx: Receiver<String>, state: Arc<Mutex<CellState>>, relayed: bool) {
    loop {
        let mut sel = Select::new();
        sel.recv(&rx);
        sel.ready();
        let mut st = state.lock().expect("cell state");
        loop {
            match rx.try_recv() {
                Ok(line) if relayed => st.line(&line),
                // evcxr's own stderr channel: messages from the runtime
                // that did not pass through the relay.
                Ok(line) => st.push(true, &line),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    st.flush();
                    return;
                }
            }
        }
        st.flush();
    }
}

struct Job {
    req: Request,
    out: OutputSink,
    reply: oneshot::Sender<Reply>,
}

/// What an interrupt stopped, for the error it turns into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopped {
    Nothing = 0,
    Compilation = 1,
    Runtime = 2,
}

struct Control {
    /// The runtime process (evcxr swaps a new one into the same handle
    /// after it dies).
    child: Mutex<Option<Arc<Mutex<std::process::Child>>>>,
    /// A cell is being handled (shared with the interrupt's watcher).
    busy_flag: Arc<AtomicBool>,
    stopped: AtomicI32,
}

impl Control {
    /// The current runtime process (evcxr swaps a new one into the handle
    /// after the old one died); 0 while evcxr is still starting.
    fn runtime_pid(&self) -> i32 {
        let child = self.child.lock().expect("child").clone();
        child.map_or(0, |c| c.lock().map(|c| c.id() as i32).unwrap_or(0))
    }

    fn interrupt(&self, sig: i32) -> Result<(), String> {
        if sig != libc::SIGINT {
            let pid = self.runtime_pid();
            if pid <= 0 {
                return Err("no Rust runtime process is running".into());
            }
            // SAFETY: kill has no memory-safety preconditions.
            return match unsafe { libc::kill(pid, sig) } {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error().to_string()),
            };
        }
        if !self.busy_flag.load(Ordering::SeqCst) {
            return Ok(());
        }
        // Compiling: stop cargo (and its rustc processes); the runtime and
        // its variables are untouched.
        if kill_compilers() {
            self.stopped
                .store(Stopped::Compilation as i32, Ordering::SeqCst);
            return Ok(());
        }
        // Running (or about to compile): evcxr can only stop a cell by
        // ending its process. A compilation that starts later in this cell
        // is stopped too, so the cell ends now rather than after it.
        self.stopped
            .store(Stopped::Runtime as i32, Ordering::SeqCst);
        let busy = self.busy_flag.clone();
        std::thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs(30);
            while busy.load(Ordering::SeqCst) && Instant::now() < until {
                kill_compilers();
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let child = self.child.lock().expect("child").clone();
        match child {
            Some(c) => c
                .lock()
                .expect("runtime child")
                .kill()
                .map_err(|e| e.to_string()),
            None => Err("the Rust runtime is still starting".into()),
        }
    }
}

/// SIGKILL every cargo this engine started, with its rustc (and rustc
/// wrapper) processes; whether there was one.
fn kill_compilers() -> bool {
    let cargo: Vec<i32> = descendants(std::process::id() as i32)
        .into_iter()
        .filter(|(_, comm)| comm == "cargo")
        .map(|(pid, _)| pid)
        .collect();
    for &pid in &cargo {
        for (p, _) in descendants(pid) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    !cargo.is_empty()
}

/// All descendants of `pid` (pid, command name), from /proc.
fn descendants(pid: i32) -> Vec<(i32, String)> {
    let mut procs = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            // pid (comm) state ppid …; comm may contain spaces and parens.
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let comm = stat[open + 1..close].to_owned();
            let ppid = stat[close + 1..]
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse::<i32>().ok())
                .unwrap_or(0);
            procs.push((p, ppid, comm));
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for (p, pp, comm) in &procs {
            if *pp == parent {
                out.push((*p, comm.clone()));
                frontier.push(*p);
            }
        }
    }
    out
}

pub struct RustInterpreter {
    jobs: Option<std::sync::mpsc::Sender<Job>>,
    worker: Option<std::thread::JoinHandle<()>>,
    control: Arc<Control>,
    signals: SignalHandle,
    language_info: Arc<Mutex<Value>>,
}

impl RustInterpreter {
    /// Start the evcxr thread, which creates (warms) the context at once:
    /// the first cell then only waits for whatever is left of that.
    pub fn start(env: Vec<(String, String)>) -> RustInterpreter {
        let control = Arc::new(Control {
            child: Mutex::new(None),
            busy_flag: Arc::new(AtomicBool::new(false)),
            stopped: AtomicI32::new(0),
        });
        let language_info = Arc::new(Mutex::new(json!({
            "name": "rust",
            "version": "",
            "mimetype": "text/rust",
            "file_extension": ".rs",
            "codemirror_mode": "rust",
            "pygments_lexer": "rust",
        })));
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let worker = {
            let control = control.clone();
            let language_info = language_info.clone();
            std::thread::Builder::new()
                .name("parallax-evcxr".into())
                .spawn(move || worker(rx, env, control, language_info))
                .expect("spawning the evcxr thread")
        };
        let handler = {
            let control = control.clone();
            Arc::new(move |sig: i32| control.interrupt(sig))
        };
        RustInterpreter {
            jobs: Some(tx),
            worker: Some(worker),
            signals: SignalHandle {
                pid: Arc::new(AtomicI32::new(0)),
                handler: Some(handler),
            },
            control,
            language_info,
        }
    }
}

impl Interpreter for RustInterpreter {
    async fn run(&mut self, req: Request, out: OutputSink) -> Reply {
        let (tx, rx) = oneshot::channel();
        let sent = self.jobs.as_ref().is_some_and(|j| {
            j.send(Job {
                req,
                out,
                reply: tx,
            })
            .is_ok()
        });
        if !sent {
            return Reply::error("EngineError", "the Rust engine has stopped");
        }
        rx.await.unwrap_or_else(|_| {
            Reply::error("EngineError", "the Rust engine's evcxr thread stopped")
        })
    }

    fn signal_handle(&self) -> SignalHandle {
        self.signals.clone()
    }

    async fn shutdown(&mut self) {
        // A cell still running would keep the evcxr thread busy: end it.
        let _ = self.control.interrupt(libc::SIGINT);
        self.jobs = None;
        if let Some(w) = self.worker.take() {
            let joined = tokio::task::spawn_blocking(move || w.join());
            if tokio::time::timeout(Duration::from_secs(10), joined)
                .await
                .is_err()
            {
                warn!("the evcxr thread did not stop within 10 s");
            }
        }
    }

    fn language_info(&self) -> Value {
        self.language_info.lock().expect("language_info").clone()
    }
}

struct Worker {
    ctx: evcxr::CommandContext,
    state: Arc<Mutex<CellState>>,
    control: Arc<Control>,
    /// The runtime process [`FLUSHER_SETUP`] last ran in.
    setup_pid: i32,
}

fn probe_rustc_version() -> Option<String> {
    let out = std::process::Command::new("rustc")
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    rustc_version(&String::from_utf8_lossy(&out.stdout))
}

fn create_context(
    env: &[(String, String)],
    state: &Arc<Mutex<CellState>>,
) -> Result<evcxr::CommandContext, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = std::process::Command::new(exe);
    // The runtime runs user code: it gets the engine's id and count, not
    // the compiler wrapper.
    cmd.env_remove("RUSTC_WRAPPER")
        .env_remove(rustc_cache::CACHE_ENV)
        .envs(env.iter().map(|(k, v)| (k, v)));
    let (eval, outputs) =
        evcxr::EvalContext::with_subprocess_command(cmd).map_err(|e| e.to_string())?;
    for (rx, relayed, name) in [
        (outputs.stdout, true, "parallax-evcxr-out"),
        (outputs.stderr, false, "parallax-evcxr-err"),
    ] {
        let state = state.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || drain(rx, state, relayed))
            .map_err(|e| e.to_string())?;
    }
    Ok(evcxr::CommandContext::with_eval_context(eval))
}

fn worker(
    jobs: std::sync::mpsc::Receiver<Job>,
    env: Vec<(String, String)>,
    control: Arc<Control>,
    language_info: Arc<Mutex<Value>>,
) {
    if let Some(v) = probe_rustc_version() {
        language_info.lock().expect("language_info")["version"] = v.into();
    }
    let state = Arc::new(Mutex::new(CellState::default()));
    let t0 = Instant::now();
    let ctx = create_context(&env, &state);
    let mut w = match ctx {
        Ok(ctx) => {
            info!(seconds = t0.elapsed().as_secs_f64(), "evcxr context ready");
            let mut w = Worker {
                ctx,
                state,
                control,
                setup_pid: 0,
            };
            // evcxr keeps this handle valid across runtime restarts
            *w.control.child.lock().expect("child") = Some(w.ctx.process_handle());
            let t1 = Instant::now();
            for cell in [WARMUP, ":clear"] {
                if let Err(e) = w.ctx.execute(cell) {
                    warn!(error = %e, "evcxr warm-up cell failed");
                }
            }
            w.setup_runtime();
            info!(seconds = t1.elapsed().as_secs_f64(), "evcxr warmed up");
            w
        }
        Err(e) => {
            warn!(error = %e, "evcxr could not start");
            let why = format!("the Rust runtime (evcxr) could not start: {e}");
            for job in jobs {
                let _ = job.reply.send(Reply::error("EngineError", why.clone()));
            }
            return;
        }
    };
    for job in jobs {
        let reply = w.handle(job.req, &job.out);
        drop(job.out);
        let _ = job.reply.send(reply);
    }
    debug!("evcxr thread done");
}

fn ok_reply(fields: Value) -> Reply {
    let mut content = Map::new();
    content.insert("status".into(), "ok".into());
    if let Value::Object(m) = fields {
        content.extend(m);
    }
    Reply {
        content,
        ..Reply::default()
    }
}

/// Character offset (Jupyter's cursor_pos) to byte offset in `s`.
fn byte_offset(s: &str, chars: i64) -> usize {
    s.char_indices()
        .nth(chars.max(0) as usize)
        .map_or(s.len(), |(i, _)| i)
}

fn char_offset(s: &str, bytes: usize) -> usize {
    s[..bytes.min(s.len())].chars().count()
}

impl Worker {
    /// Start the flusher in the current runtime process (once per process:
    /// evcxr starts a new one after an interrupt, a crash or `:clear`).
    fn setup_runtime(&mut self) {
        let pid = self.control.runtime_pid();
        if pid == self.setup_pid {
            return;
        }
        match self.ctx.execute(FLUSHER_SETUP) {
            Ok(_) => {}
            Err(e) => warn!(error = %e, "runtime setup cell failed"),
        }
        self.setup_pid = self.control.runtime_pid();
    }

    fn handle(&mut self, req: Request, out: &OutputSink) -> Reply {
        match req {
            Request::Execute {
                code,
                silent,
                execution_count,
                ..
            } => self.execute(&code, silent, execution_count, out),
            Request::Apply { .. } => Reply::error(
                "NotImplementedError",
                "apply (remote Python functions) needs a Python engine; this engine runs Rust",
            ),
            Request::Complete { code, cursor_pos } => {
                let pos = byte_offset(&code, cursor_pos);
                match self.ctx.completions(&code, pos) {
                    Ok(c) => ok_reply(json!({
                        "matches": c.completions.iter().map(|m| m.code.clone()).collect::<Vec<_>>(),
                        "cursor_start": char_offset(&code, c.start_offset),
                        "cursor_end": char_offset(&code, c.end_offset),
                        "metadata": {},
                    })),
                    Err(_) => ok_reply(json!({
                        "matches": [], "cursor_start": cursor_pos, "cursor_end": cursor_pos, "metadata": {},
                    })),
                }
            }
            Request::Inspect {
                code, cursor_pos, ..
            } => {
                let pos = byte_offset(&code, cursor_pos);
                match self.ctx.hover_at(&code, pos) {
                    Ok((text, html)) if !text.is_empty() => ok_reply(json!({
                        "found": true,
                        "data": {"text/plain": text, "text/html": html},
                        "metadata": {},
                    })),
                    _ => ok_reply(json!({"found": false, "data": {}, "metadata": {}})),
                }
            }
            Request::IsComplete { code } => {
                let (status, indent) = crate::rust_syntax::is_complete(&code);
                let mut r = json!({"status": status});
                if status == "incomplete" {
                    r["indent"] = indent.into();
                }
                Reply {
                    content: r.as_object().cloned().unwrap_or_default(),
                    ..Reply::default()
                }
            }
            Request::Clear => match self.ctx.execute(":clear") {
                Ok(_) => ok_reply(json!({})),
                Err(e) => Reply::error("EvcxrError", e.to_string()),
            },
        }
    }

    fn execute(&mut self, code: &str, silent: bool, count: i64, out: &OutputSink) -> Reply {
        let vars_before: Vec<String> = self
            .ctx
            .variables_and_types()
            .map(|(n, _)| n.to_owned())
            .collect();
        {
            let mut st = self.state.lock().expect("cell state");
            *st = CellState {
                sink: Some(out.clone()),
                ..CellState::default()
            };
        }
        self.control.stopped.store(0, Ordering::SeqCst);
        self.control.busy_flag.store(true, Ordering::SeqCst);
        self.setup_runtime();
        let result = self.ctx.execute(code);
        self.control.busy_flag.store(false, Ordering::SeqCst);
        let stopped = match self.control.stopped.swap(0, Ordering::SeqCst) {
            1 => Stopped::Compilation,
            2 => Stopped::Runtime,
            _ => Stopped::Nothing,
        };
        // Everything the cell printed has been drained (see `drain`).
        let (panicked, panic_lines) = {
            let mut st = self.state.lock().expect("cell state");
            if !st.panicked {
                st.end_panic_capture();
            }
            let lines = st.panic_lines.take();
            st.flush();
            st.sink = None;
            (st.panicked, lines)
        };
        let error = |ename: &str, evalue: String, traceback: Vec<String>| {
            let _ = out.send(Output::Error {
                ename: ename.into(),
                evalue: evalue.clone(),
                traceback: traceback.clone(),
            });
            let mut r = Reply::error(ename, evalue);
            r.content.insert("traceback".into(), json!(traceback));
            r
        };
        let runtime_lost = |ename: &str, what: &str| {
            let evalue = format!(
                "{what}; {}. Functions, types and `use` items are kept; the next cell starts a fresh runtime.",
                lost_text(&vars_before)
            );
            error(ename, evalue.clone(), vec![format!("{ename}: {evalue}")])
        };
        match result {
            _ if stopped == Stopped::Compilation => error(
                "KeyboardInterrupt",
                "interrupted while compiling; nothing ran and no variables were lost".into(),
                vec!["KeyboardInterrupt: interrupted while compiling the cell; nothing ran and no variables were lost".into()],
            ),
            Err(_) if stopped == Stopped::Runtime => {
                // Ended by the interrupt, whether the runtime was running
                // the cell or evcxr was still preparing it.
                runtime_lost(
                    "KeyboardInterrupt",
                    "interrupted: the Rust runtime process was stopped to end the cell",
                )
            }
            Err(evcxr::Error::SubprocessTerminated(msg)) => runtime_lost(
                "RuntimeDied",
                &format!("the Rust runtime process ended ({})", msg.trim()),
            ),
            Ok(_) if panicked => {
                let lines = panic_lines.unwrap_or_default();
                let message = if lines.len() > 1 {
                    lines[1..].join("\n")
                } else {
                    "the cell panicked".to_owned()
                };
                let mut tb = lines.clone();
                if tb.is_empty() {
                    tb.push("panic".into());
                }
                tb.push(
                    "(variables defined by this cell were dropped; earlier ones are kept)".into(),
                );
                error("Panic", message, tb)
            }
            Ok(outputs) => {
                debug!(mimes = ?outputs.content_by_mime_type.keys().collect::<Vec<_>>(), "cell done");
                if let Some(t) = outputs.timing {
                    // `:timing`: the total and evcxr's phases, as its REPL
                    let mut text = format!("Took {}ms\n", t.as_millis());
                    for p in &outputs.phases {
                        text.push_str(&format!("  {}: {}ms\n", p.name, p.duration.as_millis()));
                    }
                    let _ = out.send(Output::Stream {
                        name: "stdout".into(),
                        text,
                    });
                }
                if !silent && !outputs.content_by_mime_type.is_empty() {
                    let data: Map<String, Value> = outputs
                        .content_by_mime_type
                        .into_iter()
                        .map(|(mime, text)| {
                            let v = if mime.ends_with("json") {
                                serde_json::from_str(&text).unwrap_or(Value::String(text))
                            } else {
                                Value::String(text)
                            };
                            (mime, v)
                        })
                        .collect();
                    let _ = out.send(if data.contains_key("text/plain") {
                        Output::ExecuteResult {
                            execution_count: count,
                            data: Value::Object(data),
                            metadata: json!({}),
                        }
                    } else {
                        Output::DisplayData {
                            data: Value::Object(data),
                            metadata: json!({}),
                            transient: json!({}),
                            update: false,
                        }
                    });
                }
                ok_reply(json!({"execution_count": count, "user_expressions": {}, "payload": []}))
            }
            Err(evcxr::Error::CompilationErrors(errors)) => {
                let (evalue, tb) = render_compile_errors(code, &errors);
                error("CompileError", evalue, tb)
            }
            Err(evcxr::Error::TypeRedefinedVariablesLost(vars)) => {
                let evalue = format!(
                    "variables whose type was redefined were lost: {}",
                    vars.join(", ")
                );
                error(
                    "TypeRedefinedVariablesLost",
                    evalue.clone(),
                    vec![format!("TypeRedefinedVariablesLost: {evalue}")],
                )
            }
            Err(e) => {
                let evalue = e.to_string();
                let tb = evalue.lines().map(str::to_owned).collect();
                error("EvcxrError", evalue.lines().next().unwrap_or("").to_owned(), tb)
            }
        }
    }
}

fn lost_text(vars: &[String]) -> String {
    if vars.is_empty() {
        "no variables were defined".to_owned()
    } else {
        format!("variables lost: {}", vars.join(", "))
    }
}

/// `evalue`: the first error's headline; traceback: every diagnostic as
/// rustc renders it, with the span in the cell's own code.
fn render_compile_errors(code: &str, errors: &[evcxr::CompilationError]) -> (String, Vec<String>) {
    let mut lines = Vec::new();
    let mut headline = String::new();
    for e in errors {
        let head = match e.code() {
            Some(c) => format!("{}[{c}]: {}", e.level(), e.message()),
            None => format!("{}: {}", e.level(), e.message()),
        };
        if headline.is_empty() {
            headline = head.clone();
        }
        let mut text = Vec::new();
        let report = e.build_report("cell".into(), code.to_owned(), evcxr::Theme::Light);
        let rendered = report
            .and_then(|r| {
                r.write(("cell".to_owned(), ariadne::Source::from(code)), &mut text)
                    .ok()
            })
            .map(|_| String::from_utf8_lossy(&text).into_owned());
        match rendered {
            Some(r) => lines.extend(r.lines().map(str::to_owned)),
            None => {
                lines.extend(e.rendered().lines().map(str::to_owned));
            }
        }
        for h in e.help() {
            let h = format!("help: {h}");
            if !lines.contains(&h) {
                lines.push(h);
            }
        }
    }
    if headline.is_empty() {
        headline = "compilation failed".into();
    }
    (headline, lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cell_state_claims_panic_messages_and_keeps_stream_order() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut st = CellState {
            sink: Some(tx),
            ..CellState::default()
        };
        st.line("before");
        st.line("\x1eEwarning: x");
        st.line("\x1eEthread '<unnamed>' panicked at src/lib.rs:3:1:");
        st.line("\x1eEboom");
        st.line(
            "\x1eEnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace",
        );
        st.line(RELAY_PANIC);
        st.line("\x1eO\x1eodd");
        st.flush();
        assert!(st.panicked);
        assert_eq!(
            st.panic_lines.as_deref().unwrap(),
            ["thread '<unnamed>' panicked at src/lib.rs:3:1:", "boom"]
        );
        let mut got = Vec::new();
        while let Ok(Output::Stream { name, text }) = rx.try_recv() {
            got.push(format!("{name}:{text}"));
        }
        assert_eq!(
            got,
            ["stdout:before\n", "stderr:warning: x\n", "stdout:\x1eodd\n"]
        );
    }

    #[test]
    fn cursor_offsets_convert_between_chars_and_bytes() {
        let s = "let é = 1;";
        assert_eq!(byte_offset(s, 6), 7);
        assert_eq!(char_offset(s, 7), 6);
        assert_eq!(byte_offset(s, 100), s.len());
    }
}
