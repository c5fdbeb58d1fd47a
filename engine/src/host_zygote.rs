//! The host zygote: one [zygote](crate::zygote) per cluster and host, shared
//! by the engines a launcher starts there (`mpiexec`, `srun`, a batch job's
//! script, an ssh host), which have no `parallax cluster start` beside them
//! to start one.
//!
//! The first engine of the cluster on a host starts it, the others find
//! it. "The cluster" is the hub's key and registration address (hashed:
//! the key is a secret) and the engines' interpreter; "the host" is this machine's name and network
//! namespace (engines in different namespaces of one machine may reach
//! different services on 127.0.0.1, e.g. their own PMIx server, so they do
//! not share interpreters). Everything lives in this user's private
//! directory: `hz-TAG.sock` (the zygote's socket), `hz-TAG.lock` and
//! `hz-TAG.log` (its output).
//!
//! **Protocol** (the lock makes "is there a zygote?" and "connect" one
//! step): an engine takes an exclusive `flock` on the lock file, connects
//! to the socket — or, when nobody listens there, removes the stale file,
//! starts a zygote (in a session of its own, so a signal to the starting
//! engine's process group does not take the other engines' interpreters
//! with it) and connects once it listens —, then releases the lock and
//! sends its fork request on that connection.
//!
//! The zygote ends itself when no engine has been connected for half a
//! second (`--host-lock`, see the shim): it takes the lock without
//! waiting, checks that no connection is pending, removes its socket, log
//! and lock file and exits (an engine that was waiting on the removed
//! lock file sees that and locks the path anew). So a job that ends (scancel, mpiexec's end, an ssh host's
//! engines stopped) leaves no zygote behind, whatever the batch system
//! tracks, and an engine never connects to a zygote that is going away.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// How long the engine that starts the zygote waits for its socket.
const START_PATIENCE: Duration = Duration::from_secs(10);

/// The shim's flag naming the lock file (a host zygote: it exits when idle).
pub const HOST_LOCK_FLAG: &str = "--host-lock";

/// One cluster's zygote on this host: its socket, lock and log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostZygote {
    pub socket: PathBuf,
    pub lock: PathBuf,
    pub log: PathBuf,
}

/// The tag naming a cluster's zygote on a host (pure): 16 hex digits of
/// SHA-256 over the cluster's key, its registration address, the engines'
/// interpreter (engines of one cluster with two Pythons get two zygotes),
/// the host's name and its network namespace.
pub fn tag(key: &str, registration: &str, python: &str, host: &str, netns: &str) -> String {
    let mut h = Sha256::new();
    for part in [key, registration, python, host, netns] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(&h.finalize()[..8])
}

/// This host as the tag sees it: (host name, network namespace).
fn this_host() -> (String, String) {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let netns = std::fs::read_link("/proc/self/ns/net")
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    (host, netns)
}

impl HostZygote {
    /// The zygote of the cluster whose key and registration address these
    /// are, for engines running `python` (resolved), on this host.
    pub fn for_cluster(key: &str, registration: &str, python: &Path) -> std::io::Result<Self> {
        let (host, netns) = this_host();
        let t = tag(key, registration, &python.to_string_lossy(), &host, &netns);
        let dir = crate::python::private_dir()?;
        Ok(HostZygote {
            socket: dir.join(format!("hz-{t}.sock")),
            lock: dir.join(format!("hz-{t}.lock")),
            log: dir.join(format!("hz-{t}.log")),
        })
    }

    /// A connection to the zygote, started first if none listens (blocking:
    /// call it off the async runtime). `python` is the interpreter a
    /// started zygote runs.
    pub fn connect(&self, python: &Path) -> Result<UnixStream> {
        let _lock = self.lock()?;
        // the lock is released when `_lock` is closed, on every path out
        if let Ok(c) = UnixStream::connect(&self.socket) {
            return Ok(c);
        }
        match std::fs::remove_file(&self.socket) {
            Ok(()) => {
                tracing::info!(socket = %self.socket.display(), "removed a dead zygote's socket")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", self.socket.display())),
        }
        let mut child = self.spawn(python)?;
        let pid = child.id();
        let deadline = Instant::now() + START_PATIENCE;
        let listening = loop {
            if let Ok(c) = UnixStream::connect(&self.socket) {
                break Some(c);
            }
            if Instant::now() > deadline || !matches!(child.try_wait(), Ok(None)) {
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        // it outlives this engine's interest in it: a thread reaps it
        std::thread::Builder::new()
            .name("zygote-reaper".into())
            .spawn(move || child.wait())
            .context("starting the zygote's reaper")?;
        match listening {
            Some(c) => {
                tracing::info!(pid, socket = %self.socket.display(), "started this host's zygote");
                Ok(c)
            }
            None => bail!(
                "the zygote (pid {pid}) did not listen on {} within {START_PATIENCE:?}{}",
                self.socket.display(),
                log_tail(&self.log)
            ),
        }
    }

    /// The lock file, opened and locked. A zygote that leaves removes the
    /// file while it holds the lock, so a lock taken on a file that is no
    /// longer the one at the path is stale: open the path again.
    fn lock(&self) -> Result<std::fs::File> {
        use std::os::unix::fs::MetadataExt;
        loop {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&self.lock)
                .with_context(|| format!("opening {}", self.lock.display()))?;
            flock(&f, libc::LOCK_EX).with_context(|| format!("locking {}", self.lock.display()))?;
            let held = f.metadata()?;
            match std::fs::metadata(&self.lock) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => return Ok(f),
                _ => continue,
            }
        }
    }

    /// Start the zygote in a session of its own, its output appended to
    /// the log.
    fn spawn(&self, python: &Path) -> Result<std::process::Child> {
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut cmd = crate::zygote::command(python, &self.socket, None)?;
        cmd.arg(HOST_LOCK_FLAG)
            .arg(&self.lock)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: setsid and close_range are async-signal-safe syscalls.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                // nothing this engine inherited beyond stdio reaches the
                // zygote, which outlives it: not a process manager's socket
                // (PMI_FD), not a batch system's pipes. Marked close-on-exec
                // rather than closed: std reports a failed exec through a
                // descriptor of its own.
                libc::syscall(
                    libc::SYS_close_range,
                    3 as libc::c_uint,
                    libc::c_uint::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                );
                Ok(())
            });
        }
        cmd.spawn().context("starting this host's zygote")
    }
}

fn flock(f: &std::fs::File, op: libc::c_int) -> std::io::Result<()> {
    loop {
        // SAFETY: a valid open descriptor; flock has no memory arguments.
        if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// ": LAST LINES" of the zygote's log (empty when there is none).
fn log_tail(log: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(log) {
        let _ = f.read_to_string(&mut s);
    }
    let lines: Vec<&str> = s.lines().rev().take(5).collect();
    if lines.is_empty() {
        return String::new();
    }
    let tail: Vec<&str> = lines.into_iter().rev().collect();
    format!("; its log ({}) ends: {}", log.display(), tail.join(" | "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_separate_clusters_and_hosts() {
        let py = "/usr/bin/python3";
        let t = tag("k", "tcp://127.0.0.1:5000", py, "node1", "net:[1]");
        assert_eq!(t.len(), 16);
        assert!(t.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(t, tag("k", "tcp://127.0.0.1:5000", py, "node1", "net:[1]"));
        assert_ne!(t, tag("k2", "tcp://127.0.0.1:5000", py, "node1", "net:[1]"));
        assert_ne!(t, tag("k", "tcp://127.0.0.1:5001", py, "node1", "net:[1]"));
        assert_ne!(
            t,
            tag(
                "k",
                "tcp://127.0.0.1:5000",
                "/v/bin/python3",
                "node1",
                "net:[1]"
            )
        );
        assert_ne!(t, tag("k", "tcp://127.0.0.1:5000", py, "node2", "net:[1]"));
        assert_ne!(t, tag("k", "tcp://127.0.0.1:5000", py, "node1", "net:[2]"));
        // parts are length-prefixed: moving a boundary changes the tag
        assert_ne!(tag("ab", "c", "", "", ""), tag("a", "bc", "", "", ""));
        // the key never appears in the name
        assert!(!tag("secretkey", "r", py, "h", "n").contains("secret"));
    }

    #[test]
    fn paths_live_in_the_private_dir() {
        let z = HostZygote::for_cluster("k", "tcp://127.0.0.1:1", Path::new("/usr/bin/python3"))
            .unwrap();
        let dir = crate::python::private_dir().unwrap();
        for p in [&z.socket, &z.lock, &z.log] {
            assert_eq!(p.parent(), Some(dir.as_path()));
        }
        assert!(z.socket.to_string_lossy().ends_with(".sock"));
        // short enough for a Unix socket address
        assert!(z.socket.as_os_str().len() < 100);
    }
}
