//! The zygote: one Python process per cluster that imports what an engine's
//! interpreter needs (the shim, IPython, ipyparallel's serializer) once,
//! freezes those objects out of the garbage collector's reach
//! (`gc.freeze`), and forks one interpreter per engine on request, so N
//! interpreters share those pages copy-on-write instead of each importing
//! them (~30 MiB and ~0.4 s of CPU per engine).
//!
//! The zygote is the shim itself (`python -u shim.py --parallax-zygote
//! SOCKET`, [`command`]); `parallax cluster start` (local engines) and the
//! kernel's embedded cluster start one and give their engines `--zygote
//! SOCKET`. An engine then asks it for an interpreter ([`fork`]) instead of
//! spawning Python: it creates the four pipes itself and passes the child's
//! ends with `SCM_RIGHTS`, so the interpreter's stdio and protocol pipes are
//! exactly those of a spawned one. The zygote answers with the child's pid
//! (for SIGINT), reaps it and reports its exit status on the same
//! connection (the engine cannot `wait` for a process that is not its
//! child), and kills it if the connection closes first (the engine is gone).
//!
//! What stays the engine's job: a crashed interpreter is described and
//! replaced as before (by another fork); when the zygote is unreachable or
//! refuses (another Python, another `PYTHON*` environment), the engine logs
//! why and spawns Python itself.
//!
//! **Invariant:** the zygote never has a second thread (its imports run in
//! the main thread before it serves), so `fork` is safe there.

use std::ffi::OsString;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UnixStream;

/// The argument that makes the shim a zygote (also how `cluster stop`
/// recognizes one in `/proc/PID/cmdline`).
pub const ZYGOTE_FLAG: &str = "--parallax-zygote";

/// How long an engine waits for its interpreter: the zygote may still be
/// importing (it accepts connections from the start).
const FORK_PATIENCE: Duration = Duration::from_secs(60);

/// A fresh socket path in this user's private directory (short: Unix socket
/// paths are limited to ~107 bytes, profile directories can be longer).
pub fn socket_path() -> std::io::Result<PathBuf> {
    let dir = crate::python::private_dir()?;
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..12];
    Ok(dir.join(format!("zygote-{}-{tag}.sock", std::process::id())))
}

/// The interpreter as the zygote and its engines both name it: `python`
/// resolved on PATH and made absolute, so equal configurations compare
/// equal.
pub fn resolve_python(python: &Path) -> anyhow::Result<PathBuf> {
    let p = crate::python::find_executable(python)?;
    Ok(std::path::absolute(&p).unwrap_or(p))
}

/// The argument after which a zygote's command line names its owner (a
/// cluster file), so `cluster stop` finds it even with no engine left.
pub const OWNER_FLAG: &str = "--owner";

/// The zygote's command line: `python -u <shim> --parallax-zygote SOCKET
/// [--owner OWNER]`, with `PARALLAX_ZYGOTE_PYTHON` naming the interpreter
/// (an engine configured with another one is refused). Stdio and process
/// group are the caller's choice.
pub fn command(
    python: &Path,
    socket: &Path,
    owner: Option<&Path>,
) -> anyhow::Result<std::process::Command> {
    let python = resolve_python(python)?;
    let shim = crate::python::shim_path()?;
    let mut c = std::process::Command::new(&python);
    c.arg("-u")
        .arg(shim)
        .arg(ZYGOTE_FLAG)
        .arg(socket)
        .env("PARALLAX_ZYGOTE_PYTHON", &python);
    if let Some(owner) = owner {
        c.arg(OWNER_FLAG).arg(owner);
    }
    Ok(c)
}

/// Is this `/proc/PID/cmdline` a zygote's?
pub fn is_zygote_cmdline(args: &[String]) -> bool {
    args.iter().any(|a| a == ZYGOTE_FLAG)
}

/// A zygote's socket and owner, from its command line.
pub fn parse_cmdline(args: &[String]) -> Option<(PathBuf, Option<PathBuf>)> {
    let after = |flag: &str| {
        let i = args.iter().position(|a| a == flag)?;
        args.get(i + 1).map(PathBuf::from)
    };
    Some((after(ZYGOTE_FLAG)?, after(OWNER_FLAG)))
}

/// Wait (up to `timeout`) until the zygote's socket exists; false if it did
/// not appear (the caller then starts engines without it).
pub fn wait_for_socket(socket: &Path, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if socket.exists() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Which zygote an engine's interpreters come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Zygote {
    /// One started for the engine (`--zygote SOCKET`).
    Socket(PathBuf),
    /// Its cluster's zygote on this host, started by the first engine that
    /// needs it (`--host-zygote`).
    Host(crate::host_zygote::HostZygote),
}

impl Zygote {
    /// Its socket (for logs).
    pub fn socket(&self) -> &Path {
        match self {
            Zygote::Socket(s) => s,
            Zygote::Host(h) => &h.socket,
        }
    }

    /// A connection for one [`fork`]; a host zygote is started first when
    /// none runs. `python` is the resolved interpreter.
    pub async fn connect(&self, python: &Path) -> Result<StdUnixStream, ForkError> {
        match self {
            Zygote::Socket(s) => connect(s),
            Zygote::Host(h) => {
                let (h, python) = (h.clone(), python.to_path_buf());
                tokio::task::spawn_blocking(move || h.connect(&python))
                    .await
                    .map_err(|e| ForkError::Host(e.into()))?
                    .map_err(ForkError::Host)
            }
        }
    }
}

/// How a forked interpreter ended, as the zygote reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Exit(i32),
    Signal(i32),
    /// The zygote is gone: nobody can tell.
    Unknown,
}

/// An interpreter forked by the zygote. Dropping it closes the connection,
/// which makes the zygote kill the child if it is still running.
#[derive(Debug)]
pub struct Forked {
    pub pid: i32,
    lines: tokio::io::Lines<BufReader<UnixStream>>,
}

impl Forked {
    /// The child's end, once the zygote reports it (None after `timeout`).
    pub async fn ended(&mut self, timeout: Duration) -> Option<Ended> {
        let r = tokio::time::timeout(timeout, async {
            loop {
                match self.lines.next_line().await {
                    Ok(Some(line)) => {
                        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                        if let Some(s) = v.get("signal").and_then(Value::as_i64) {
                            return Ended::Signal(s as i32);
                        }
                        if let Some(c) = v.get("exit").and_then(Value::as_i64) {
                            return Ended::Exit(c as i32);
                        }
                    }
                    Ok(None) | Err(_) => return Ended::Unknown,
                }
            }
        })
        .await;
        r.ok()
    }
}

/// Why the zygote did not fork (the engine then spawns Python itself).
#[derive(Debug, thiserror::Error)]
pub enum ForkError {
    #[error("cannot reach the zygote at {0}: {1}")]
    Connect(PathBuf, std::io::Error),
    #[error("this host's zygote: {0:#}")]
    Host(anyhow::Error),
    #[error("a forked interpreter cannot have what this one needs: {0}")]
    Unsuitable(String),
    #[error("sending the request to the zygote failed: {0}")]
    Send(std::io::Error),
    #[error("the zygote refused: {0}")]
    Refused(String),
    #[error("the zygote did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the zygote closed the connection without forking")]
    Closed,
    #[error("the environment has a variable that is not UTF-8 ({0:?})")]
    Env(OsString),
}

/// A connection to the zygote at `socket`, for one [`fork`].
pub fn connect(socket: &Path) -> Result<StdUnixStream, ForkError> {
    StdUnixStream::connect(socket).map_err(|e| ForkError::Connect(socket.to_path_buf(), e))
}

/// Descriptors this process inherited that a process manager names in the
/// environment, so an interpreter needs them at the same numbers: `PMI_FD`
/// (MPICH's hydra and Slurm's PMI-2 hand each rank a connected socket). A
/// spawned interpreter inherits them; a forked one gets them passed along
/// ([`fork`]). Numbers below 5 would collide with the interpreter's own
/// stdio and pipes: an error, and the engine spawns Python itself.
pub fn inherited_fds() -> Result<Vec<RawFd>, ForkError> {
    let Some(v) = std::env::var_os("PMI_FD") else {
        return Ok(Vec::new());
    };
    let fd: RawFd = v
        .to_str()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| ForkError::Unsuitable(format!("PMI_FD is not a number ({v:?})")))?;
    // SAFETY: F_GETFD only reads the descriptor's flags.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        // named but not open here: a spawned Python would not have it either
        return Ok(Vec::new());
    }
    if fd < 5 {
        return Err(ForkError::Unsuitable(format!(
            "PMI_FD is {fd}, one of the interpreter's own descriptors"
        )));
    }
    Ok(vec![fd])
}

/// Ask the zygote on `conn` for an interpreter whose fds 1, 2, 3, 4 are
/// `fds` (stdout and stderr write ends, command pipe read end, event pipe
/// write end) and which has each of `keep` at its own number, with this
/// process's environment plus `env`, in this process's working directory.
pub async fn fork(
    mut conn: StdUnixStream,
    python: &Path,
    env: &[(String, String)],
    fds: [RawFd; 4],
    keep: &[RawFd],
) -> Result<Forked, ForkError> {
    let mut vars = serde_json::Map::new();
    for (k, v) in std::env::vars_os() {
        let (Some(k), Some(v)) = (k.to_str(), v.to_str()) else {
            return Err(ForkError::Env(k));
        };
        vars.insert(k.to_owned(), json!(v));
    }
    for (k, v) in env {
        vars.insert(k.clone(), json!(v));
    }
    let cwd = std::env::current_dir()
        .map(|d| d.to_string_lossy().into_owned())
        .unwrap_or_default();
    let req = serde_json::to_vec(&json!({
        "env": vars, "cwd": cwd, "python": python.to_string_lossy(), "keep_fds": keep,
    }))
    .expect("JSON serializes");
    let mut frame = (req.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&req);

    let all: Vec<RawFd> = fds.iter().chain(keep).copied().collect();
    send_with_fds(&conn, &frame[..1], &all).map_err(ForkError::Send)?;
    conn.write_all(&frame[1..]).map_err(ForkError::Send)?;
    conn.set_nonblocking(true).map_err(ForkError::Send)?;
    let conn = UnixStream::from_std(conn).map_err(ForkError::Send)?;
    let mut lines = BufReader::new(conn).lines();
    let first = tokio::time::timeout(FORK_PATIENCE, lines.next_line())
        .await
        .map_err(|_| ForkError::Timeout(FORK_PATIENCE))?;
    let line = match first {
        Ok(Some(l)) => l,
        _ => return Err(ForkError::Closed),
    };
    let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
    if let Some(pid) = v.get("pid").and_then(Value::as_i64) {
        return Ok(Forked {
            pid: pid as i32,
            lines,
        });
    }
    Err(ForkError::Refused(
        v.get("error")
            .and_then(Value::as_str)
            .unwrap_or("no reason given")
            .to_owned(),
    ))
}

/// One `sendmsg` of `data` with `fds` as `SCM_RIGHTS`.
fn send_with_fds(sock: &StdUnixStream, data: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let payload = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
    let mut cbuf = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` bytes, enough for one header
    // carrying `fds`; CMSG_FIRSTHDR/CMSG_DATA stay inside that buffer.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(payload) as _;
        std::ptr::copy_nonoverlapping(
            fds.as_ptr() as *const u8,
            libc::CMSG_DATA(c),
            payload as usize,
        );
    }
    loop {
        // SAFETY: msg and everything it points at live across the call.
        let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if r >= 0 {
            return if r as usize == data.len() {
                Ok(())
            } else {
                Err(std::io::Error::other("short sendmsg"))
            };
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zygote_cmdlines() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let z = args(&[
            "/v/bin/python3",
            "-u",
            "/tmp/parallax-1/parallax_engine_shim-ab.py",
            "--parallax-zygote",
            "/tmp/parallax-1/zygote-1-ab.sock",
            "--owner",
            "/p/security/cluster-x.json",
        ]);
        assert!(is_zygote_cmdline(&z));
        assert_eq!(
            parse_cmdline(&z),
            Some((
                "/tmp/parallax-1/zygote-1-ab.sock".into(),
                Some("/p/security/cluster-x.json".into())
            ))
        );
        assert_eq!(
            parse_cmdline(&z[..5]),
            Some(("/tmp/parallax-1/zygote-1-ab.sock".into(), None))
        );
        assert!(!is_zygote_cmdline(&args(&["/v/bin/python3", "-u", "x.py"])));
        assert_eq!(parse_cmdline(&args(&["/v/bin/python3"])), None);
    }
}
