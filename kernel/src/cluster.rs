//! The embedded cluster: the hub as a task in the kernel process and N local
//! engine processes (`parallax engine`, this same binary).
//!
//! Invariants:
//! * Engines run in their own process group, so a SIGINT that jupyter_client
//!   sends to the kernel's group never reaches them (the kernel forwards
//!   interrupts through the hub), and they get SIGTERM if the kernel dies
//!   (`PR_SET_PDEATHSIG`; engines are spawned from runtime worker threads,
//!   which live as long as the kernel).
//! * Each engine asks for its id (`--id`), so the kernel knows which process
//!   is which engine; when one exits, the kernel unregisters it at once, so
//!   its running requests fail with EngineError instead of waiting for
//!   heartbeats to lapse.
//! * Python engines fork their interpreters from one zygote
//!   ([`parallax_engine::zygote`]), started here in its own process group
//!   with `PR_SET_PDEATHSIG` like the engines (`PARALLAX_ZYGOTE=0` in the
//!   kernel's environment: every engine starts its own Python).
//! * Everything started here is stopped by [`EmbeddedCluster::shutdown`]
//!   (SIGTERM, then SIGKILL after a deadline; the zygote after the engines,
//!   whose interpreters are its children) and the profile directory with
//!   the connection files is removed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use parallax_hub::HubArgs;
use parallax_hub::driver::Bound;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::client::HubClient;
use crate::kernelspec::Language;

/// How to start engines.
#[derive(Debug, Clone)]
pub struct EngineSpec {
    pub exe: PathBuf,
    /// The interpreter of Python engines (unused for Rust engines).
    pub python: PathBuf,
    pub language: Language,
}

impl EngineSpec {
    /// The language arguments of `parallax engine`: Python engines get
    /// `--python` (python is the engine's default language); Rust engines
    /// `--language=rust` (evcxr finds rustc and cargo on PATH).
    pub fn language_args(&self) -> Vec<String> {
        match self.language {
            Language::Python => vec![format!("--python={}", self.python.display())],
            Language::Rust => vec!["--language=rust".into()],
        }
    }
}

/// An engine process this kernel started.
#[derive(Debug)]
struct EngineProc {
    pid: u32,
    /// The child's reaper task; it reports the exit on `exits`.
    reaper: JoinHandle<()>,
}

#[derive(Parser)]
struct HubCli {
    #[command(flatten)]
    args: HubArgs,
}

pub struct EmbeddedCluster {
    pub bound: Bound,
    /// The zygote (killed on drop) and its socket, for Python engines.
    zygote: Option<(tokio::process::Child, PathBuf)>,
    profile_dir: PathBuf,
    hub_stop: CancellationToken,
    hub_task: Option<JoinHandle<Result<()>>>,
    spec: EngineSpec,
    engines: BTreeMap<i64, EngineProc>,
    next_id: i64,
    exit_tx: mpsc::UnboundedSender<(i64, u32, String)>,
    /// (engine id, pid, how it ended) of engine processes that exited.
    pub exits: mpsc::UnboundedReceiver<(i64, u32, String)>,
    pub started: Instant,
}

fn private_dir() -> Result<PathBuf> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!(
        "parallax-kernel-{}-{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(dir)
}

impl EmbeddedCluster {
    /// Start the hub task and `n` engines; returns once the hub is bound
    /// (engines register in the background: see [`wait_for_engines`]).
    /// `ip`/`location`: the hub's `--ip`/`--location` (default loopback),
    /// for engines launched on other hosts.
    pub async fn start(
        n: usize,
        spec: EngineSpec,
        ip: Option<&str>,
        location: Option<&str>,
    ) -> Result<EmbeddedCluster> {
        let started = Instant::now();
        let profile_dir = private_dir()?;
        let mut argv = vec![
            "hub".to_owned(),
            format!("--profile-dir={}", profile_dir.display()),
            format!("--ip={}", ip.unwrap_or("127.0.0.1")),
            // Local engines: a dead one is normally seen at once (its
            // process exits); heartbeats are the fallback.
            "--ping=1000".into(),
            "--max-heartbeat-misses=10".into(),
        ];
        if let Some(l) = location {
            argv.push(format!("--location={l}"));
        }
        let hub_args = HubCli::try_parse_from(argv)
            .map_err(|e| anyhow!("hub options: {e}"))?
            .args;
        let hub_stop = CancellationToken::new();
        let (ready_tx, ready_rx) = oneshot::channel();
        let hub_task = tokio::spawn(parallax_hub::driver::run_notify(
            hub_args,
            hub_stop.clone(),
            Some(ready_tx),
        ));
        let bound = match ready_rx.await {
            Ok(b) => b,
            Err(_) => {
                let r = hub_task.await;
                let _ = std::fs::remove_dir_all(&profile_dir);
                return Err(match r {
                    Ok(Err(e)) => e.context("the embedded hub failed to start"),
                    _ => anyhow!("the embedded hub failed to start"),
                });
            }
        };
        let zygote = if spec.language == Language::Python
            && std::env::var("PARALLAX_ZYGOTE").as_deref() != Ok("0")
        {
            match start_zygote(&spec.python).await {
                Ok(z) => Some(z),
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "no zygote: each engine starts its own Python");
                    None
                }
            }
        } else {
            None
        };
        let (exit_tx, exits) = mpsc::unbounded_channel();
        let mut c = EmbeddedCluster {
            zygote,
            bound,
            profile_dir,
            hub_stop,
            hub_task: Some(hub_task),
            spec,
            engines: BTreeMap::new(),
            next_id: 0,
            exit_tx,
            exits,
            started,
        };
        c.add_engines(n)?;
        Ok(c)
    }

    /// The private profile directory (connection files, job scripts).
    pub fn profile_dir(&self) -> &Path {
        &self.profile_dir
    }

    pub fn client_file(&self) -> &Path {
        &self.bound.client_file
    }

    pub fn engine_ids(&self) -> Vec<i64> {
        self.engines.keys().copied().collect()
    }

    pub fn owns(&self, id: i64) -> bool {
        self.engines.contains_key(&id)
    }

    pub fn pid(&self, id: i64) -> Option<u32> {
        self.engines.get(&id).map(|e| e.pid)
    }

    /// Start `n` more engines with fresh ids.
    pub fn add_engines(&mut self, n: usize) -> Result<Vec<i64>> {
        // PARALLAX_N_ENGINES: how many engines the cluster has once these run.
        let total = self.engines.len() + n;
        let mut ids = Vec::new();
        for _ in 0..n {
            let id = self.next_id;
            self.next_id += 1;
            self.spawn_engine(id, total)?;
            ids.push(id);
        }
        Ok(ids)
    }

    pub(crate) fn spawn_engine(&mut self, id: i64, total: usize) -> Result<()> {
        let mut cmd = tokio::process::Command::new(&self.spec.exe);
        cmd.arg("engine")
            .arg(format!("--file={}", self.bound.engine_file.display()))
            .arg(format!("--id={id}"))
            .arg(format!("--n-engines={total}"))
            .args(self.spec.language_args())
            .args(
                self.zygote
                    .as_ref()
                    .map(|(_, socket)| format!("--zygote={}", socket.display())),
            )
            .arg("--log-level=WARN")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        own_group_ending_with_kernel(&mut cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting engine {id} ({})", self.spec.exe.display()))?;
        let pid = child.id().unwrap_or(0);
        let tx = self.exit_tx.clone();
        let reaper = tokio::spawn(async move {
            let how = match child.wait().await {
                Ok(s) => describe_exit(s),
                Err(e) => format!("could not be waited for: {e}"),
            };
            let _ = tx.send((id, pid, how));
        });
        info!(engine = id, pid, "engine started");
        self.engines.insert(id, EngineProc { pid, reaper });
        Ok(())
    }

    /// Forget an engine whose process exited (its reaper reported it).
    pub fn reaped(&mut self, id: i64, pid: u32) {
        if self.engines.get(&id).map(|e| e.pid) == Some(pid) {
            self.engines.remove(&id);
        }
    }

    /// Stop engines (SIGTERM, SIGKILL after `grace`); waits for them to exit.
    pub async fn stop_engines(&mut self, ids: &[i64], grace: Duration) {
        let procs: Vec<(i64, EngineProc)> = ids
            .iter()
            .filter_map(|id| self.engines.remove(id).map(|p| (*id, p)))
            .collect();
        for (_, p) in &procs {
            signal(p.pid, libc::SIGTERM);
        }
        let deadline = tokio::time::Instant::now() + grace;
        for (id, p) in procs {
            let mut reaper = p.reaper;
            if tokio::time::timeout_at(deadline, &mut reaper)
                .await
                .is_err()
            {
                warn!(
                    engine = id,
                    pid = p.pid,
                    "engine ignored SIGTERM; killing it"
                );
                signal(p.pid, libc::SIGKILL);
                let _ = tokio::time::timeout(Duration::from_secs(2), reaper).await;
            }
        }
    }

    /// Restart engines in place: stop them, start them again with the same ids.
    pub async fn restart_engines(&mut self, ids: &[i64]) -> Result<()> {
        self.stop_engines(ids, Duration::from_secs(3)).await;
        let total = self.engines.len() + ids.len();
        for &id in ids {
            self.spawn_engine(id, total)?;
        }
        Ok(())
    }

    /// Stop everything this cluster started.
    pub async fn shutdown(&mut self) {
        let ids = self.engine_ids();
        self.stop_engines(&ids, Duration::from_secs(3)).await;
        if let Some((mut z, socket)) = self.zygote.take() {
            if let Some(pid) = z.id() {
                signal(pid, libc::SIGTERM);
            }
            if tokio::time::timeout(Duration::from_secs(3), z.wait())
                .await
                .is_err()
            {
                let _ = z.kill().await;
            }
            let _ = std::fs::remove_file(socket);
        }
        self.hub_stop.cancel();
        if let Some(t) = self.hub_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(3), t).await;
        }
        let _ = std::fs::remove_dir_all(&self.profile_dir);
    }
}

impl Drop for EmbeddedCluster {
    fn drop(&mut self) {
        // Last resort (e.g. a panic): no engine may outlive the kernel.
        for p in self.engines.values() {
            signal(p.pid, libc::SIGKILL);
        }
        self.hub_stop.cancel();
        let _ = std::fs::remove_dir_all(&self.profile_dir);
        // the zygote itself is killed by its kill_on_drop
        if let Some((_, socket)) = &self.zygote {
            let _ = std::fs::remove_file(socket);
        }
    }
}

/// Start the zygote for `python` and wait (10 s at most) until its socket
/// exists; engines connecting while it imports wait for their interpreter.
async fn start_zygote(python: &Path) -> Result<(tokio::process::Child, PathBuf)> {
    let socket = parallax_engine::zygote::socket_path()?;
    let mut cmd =
        tokio::process::Command::from(parallax_engine::zygote::command(python, &socket, None)?);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true);
    own_group_ending_with_kernel(&mut cmd);
    let mut child = cmd.spawn().context("starting the zygote")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if let Ok(Some(s)) = child.try_wait() {
            bail!("the zygote exited ({})", describe_exit(s));
        }
        if Instant::now() > deadline {
            bail!("the zygote did not create {} within 10 s", socket.display());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    info!(pid = child.id(), socket = %socket.display(), "zygote started");
    Ok((child, socket))
}

fn signal(pid: u32, sig: i32) {
    if pid > 0 {
        // SAFETY: plain kill(2) on a child we started and have not reaped.
        unsafe {
            libc::kill(pid as i32, sig);
        }
    }
}

fn describe_exit(s: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => "exited".into(),
    }
}

/// How many times an engine that exits before it registers is started again
/// while the cluster starts.
const START_RETRIES: u32 = 2;

/// With some engines registered, how long to wait for the next one before
/// starting without the stragglers (they join when they register).
const STRAGGLER_PATIENCE: Duration = Duration::from_secs(15);

/// Wait until the hub has `n` engines registered. Engines of `cluster` that
/// exit before registering are started again (up to [`START_RETRIES`]
/// times each). If some engines are registered but not all, this returns
/// once `timeout` has passed, or [`STRAGGLER_PATIENCE`] has passed without a
/// new registration: a working cluster is never discarded because a few
/// engines are late. Fails only if no engine registered at all. Returns the
/// number registered.
pub async fn wait_for_engines(
    client: &HubClient,
    n: usize,
    timeout: Duration,
    mut cluster: Option<&mut EmbeddedCluster>,
) -> Result<usize> {
    let start = tokio::time::Instant::now();
    let deadline = start + timeout;
    let mut changes = client.watch_engines();
    let mut retries: BTreeMap<i64, u32> = BTreeMap::new();
    let mut failures: Vec<String> = Vec::new();
    let mut last_count = client.engines().len();
    let mut last_progress = start;
    let mut last_refresh = start;
    loop {
        let have = client.engines();
        if have.len() >= n {
            return Ok(have.len());
        }
        if have.len() != last_count {
            last_count = have.len();
            last_progress = tokio::time::Instant::now();
        }
        if let Some(c) = cluster.as_deref_mut() {
            while let Ok((id, pid, how)) = c.exits.try_recv() {
                let ours = c.pid(id) == Some(pid);
                c.reaped(id, pid);
                if !ours || have.contains_key(&id) {
                    continue;
                }
                let tries = retries.entry(id).or_default();
                if *tries < START_RETRIES {
                    *tries += 1;
                    warn!(
                        engine = id,
                        pid,
                        how,
                        attempt = *tries,
                        "engine exited before it registered; starting it again"
                    );
                    c.spawn_engine(id, n)?;
                } else {
                    warn!(
                        engine = id,
                        pid, how, "engine exited before it registered; giving up on it"
                    );
                    failures.push(format!("engine {id} (pid {pid}) {how}"));
                }
            }
            if have.is_empty() && !failures.is_empty() && c.engines.is_empty() {
                bail!(
                    "no engine could start: {}; see the kernel's log",
                    failures.join("; ")
                );
            }
        }
        let now = tokio::time::Instant::now();
        if !have.is_empty() && (now >= deadline || now >= last_progress + STRAGGLER_PATIENCE) {
            warn!(
                registered = have.len(),
                expected = n,
                "starting with the engines registered so far; the others join when they register"
            );
            return Ok(have.len());
        }
        if now >= deadline {
            let why = if failures.is_empty() {
                String::new()
            } else {
                format!(" ({})", failures.join("; "))
            };
            bail!("no engine registered within {timeout:?}{why}; see the kernel's log");
        }
        // A notification published before the hub saw our subscription is
        // lost to us; ask for the table now and then while waiting.
        if now >= last_refresh + Duration::from_secs(2) {
            last_refresh = now;
            if let Err(e) = client.refresh_engines().await {
                warn!(error = %e, "refreshing the engine table failed");
            }
            continue;
        }
        tokio::select! {
            r = changes.changed() => { r.map_err(|_| anyhow!("hub connection closed"))?; }
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

/// The child leads its own process group (the kernel's interrupt and a
/// terminal's signals do not reach it) and gets SIGTERM if the kernel dies
/// without stopping it: the embedded engines and their zygote.
fn own_group_ending_with_kernel(cmd: &mut tokio::process::Command) {
    // SAFETY: setpgid and prctl are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setpgid(0, 0);
            #[cfg(target_os = "linux")]
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_language_args() {
        let spec = |language| EngineSpec {
            exe: "/bin/parallax".into(),
            python: "/venv/bin/python3".into(),
            language,
        };
        assert_eq!(
            spec(Language::Python).language_args(),
            ["--python=/venv/bin/python3"]
        );
        assert_eq!(spec(Language::Rust).language_args(), ["--language=rust"]);
    }
}
