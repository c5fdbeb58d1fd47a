//! `parallax cluster start|stop|list`: local clusters (one `parallax hub`
//! and N `parallax engine` processes), like `ipcluster`.
//!
//! State lives in `<profile_dir>/security/cluster-<cluster_id>.json` in
//! ipyparallel's cluster-file format (`Cluster.to_dict` with the `local`
//! controller and engine-set launchers), so `ipcluster list`,
//! `ipcluster stop` and `ipyparallel.Cluster.from_file()` understand the
//! clusters started here, and `parallax cluster list|stop` understand
//! clusters started by `ipcluster` with local launchers.
//!
//! `start` runs the hub, waits for its connection files, runs the engines,
//! and waits until the hub reports all of them registered (a signed
//! `connection_request` on the registration port). Without `--daemonize` it
//! then stays in the foreground and stops everything on SIGINT/SIGTERM/SIGHUP.
//! The processes run in their own sessions, so a terminal's Ctrl-C reaches
//! only `parallax cluster start`, which then stops them in order: engines
//! first (SIGTERM, SIGKILL after a grace period), then the hub.

use std::path::{Component, Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cluster_controller::Hub;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use parallax_launch::driver as ldriver;
use parallax_launch::{JobState, Launcher, LauncherKind, batch};
use parallax_wire::connection::{ClientConnectionInfo, connection_file_names, resolve_profile_dir};
use parallax_wire::{Authenticator, Limits, Message, RawMessage, Session, Signer, format_date};
use serde_json::{Value, json};
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// `println!` that ignores a closed stdout (`parallax … | head`) instead of
/// panicking halfway through a command.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `say!` for other modules.
pub(crate) fn say_line(line: &str) {
    say!("{line}");
}

/// The same for stderr.
macro_rules! esay {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Start a hub and N engines; wait until every engine is registered.
    Start(Box<StartArgs>),
    /// Add N engines to a running cluster (its hub), with any launcher the
    /// cluster already uses; returns once they are registered.
    Engines(Box<StartArgs>),
    /// Stop a cluster: engines, then the hub; remove its cluster file.
    Stop(StopArgs),
    /// List clusters (running ones; stale cluster files are removed).
    List(ListArgs),
    /// Send a signal to a cluster's engines (SIGINT interrupts what they
    /// run): local processes, batch jobs (scancel -s, qsig -s, bkill -s),
    /// ssh hosts.
    Signal(SignalArgs),
}

#[derive(Debug, Clone, Args)]
pub struct SignalArgs {
    #[command(flatten)]
    pub profile: ProfileArgs,
    /// Cluster id (default: $IPP_CLUSTER_ID, else "").
    #[arg(long = "cluster-id")]
    pub cluster_id: Option<String>,
    /// The signal: a name (INT, SIGTERM, usr1) or a number.
    #[arg(long = "signal", short = 's', default_value = "INT", value_parser = parse_signal)]
    pub signal: i32,
}

/// `INT`, `SIGINT`, `sigint`, `2` → 2.
fn parse_signal(s: &str) -> Result<i32, String> {
    if let Ok(n) = s.parse::<i32>() {
        return if (1..=64).contains(&n) {
            Ok(n)
        } else {
            Err(format!("{n} is not a signal number"))
        };
    }
    let up = s.to_ascii_uppercase();
    let name = up.strip_prefix("SIG").unwrap_or(&up);
    Ok(match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        _ => {
            return Err(format!(
                "unknown signal {s:?} (INT, TERM, KILL, HUP, QUIT, USR1, USR2, CONT, STOP or a number)"
            ));
        }
    })
}

/// Which profile directory, as ipcluster chooses it.
#[derive(Debug, Clone, Default, Args)]
pub struct ProfileArgs {
    /// IPython profile name (default: "default"): IPYTHONDIR/profile_NAME.
    #[arg(long)]
    pub profile: Option<String>,
    /// Profile directory (overrides --profile; env IPP_PROFILE_DIR).
    #[arg(long = "profile-dir")]
    pub profile_dir: Option<PathBuf>,
    /// IPython directory holding profiles (default $IPYTHONDIR or ~/.ipython).
    #[arg(long = "ipython-dir")]
    pub ipython_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct StartArgs {
    #[command(flatten)]
    pub profile: ProfileArgs,
    /// Cluster id (default: $IPP_CLUSTER_ID, else ""): names the connection
    /// and cluster files.
    #[arg(long = "cluster-id")]
    pub cluster_id: Option<String>,
    /// Number of engines (default: the number of CPUs).
    #[arg(short = 'n', long = "n")]
    pub n: Option<u32>,
    /// How the engines are launched: local, mpi, slurm, pbs, sge, lsf,
    /// htcondor, ssh or sshproxy (ipcluster's launcher names, any case).
    #[arg(long = "engines", visible_alias = "engine-launcher", default_value = "local", value_parser = parse_launcher)]
    pub engines: LauncherKind,
    /// The hub's listening address (default 127.0.0.1, reachable from this
    /// host only): 0.0.0.0 or an address engines on other hosts can reach.
    #[arg(long = "ip", visible_alias = "controller-ip", value_name = "ADDR")]
    pub ip: Option<String>,
    /// The hub's host as engines and clients elsewhere reach it (written in
    /// the connection files; default this host's name).
    #[arg(
        long = "location",
        visible_alias = "controller-location",
        value_name = "HOST"
    )]
    pub location: Option<String>,
    /// How the hub is launched: local, mpi, slurm, pbs, sge, lsf, htcondor
    /// or ssh (with --controller-host).
    #[arg(long = "controller", default_value = "local", value_parser = parse_launcher)]
    pub controller: LauncherKind,
    #[command(flatten)]
    pub ssh_controller: crate::cluster_ssh_controller::SshControllerArgs,
    /// mpi: the mpiexec command (split on whitespace), e.g. mpiexec.mpich.
    #[arg(long = "mpi-cmd", default_value = "mpiexec", value_name = "CMD")]
    pub mpi_cmd: String,
    /// mpi: extra arguments for mpiexec (split on whitespace; repeatable),
    /// e.g. --mpi-args='--hostfile hosts'.
    #[arg(long = "mpi-args", allow_hyphen_values = true, value_name = "ARGS")]
    pub mpi_args: Vec<String>,
    /// Batch: the queue (Slurm partition).
    #[arg(long)]
    pub queue: Option<String>,
    /// Batch: the account (LSF project) to charge.
    #[arg(long)]
    pub account: Option<String>,
    /// Batch: the time limit, in the scheduler's format (Slurm 1:00:00).
    #[arg(long = "time", visible_alias = "timelimit")]
    pub time: Option<String>,
    /// Batch: the quality of service (Slurm).
    #[arg(long)]
    pub qos: Option<String>,
    /// Batch: a directive line for the job script, e.g. --extra-directive=--mem=2G
    /// (the prefix such as #SBATCH is added if missing; repeatable).
    #[arg(
        long = "extra-directive",
        allow_hyphen_values = true,
        value_name = "LINE"
    )]
    pub extra_directive: Vec<String>,
    /// Batch: the job script template (ipyparallel's fields: {n}, {queue},
    /// {account}, {qos}, {timelimit}, {profile_dir}, {cluster_id},
    /// {output_file}, {program}, {program_args}, {program_and_args}).
    #[arg(long, value_name = "FILE")]
    pub template: Option<PathBuf>,
    /// Print the job script (batch) or command line (mpi, local) and exit
    /// without starting anything.
    #[arg(long = "print-script")]
    pub print_script: bool,
    /// Batch: engines per job; more engines are split over several jobs.
    #[arg(long = "engines-per-job", value_name = "K")]
    pub engines_per_job: Option<u32>,
    /// How engines get the connection info: file (the engine connection
    /// file's path) or env ($IPP_CONNECTION_INFO). Default: env for ssh
    /// (sent in the script on ssh's stdin: no shared file system needed),
    /// file for the others.
    #[arg(long = "connection-info", value_enum)]
    pub connection_info: Option<ConnectionInfo>,
    #[command(flatten)]
    pub ssh: crate::cluster_ssh::SshArgs,
    #[command(flatten)]
    pub ssh_proxy: crate::cluster_ssh_proxy::SshProxyArgs,
    /// Batch: seconds between job-state polls while engines register.
    #[arg(long = "poll-interval", default_value_t = 1.0)]
    pub poll_interval: f64,
    /// Return once the engines are registered and leave the cluster running.
    #[arg(long, visible_alias = "daemon")]
    pub daemonize: bool,
    /// Python engines fork their interpreters from a zygote (a template
    /// Python that imported IPython and ipyparallel once), so they share
    /// those pages and skip the imports: local engines from one started
    /// here, a launcher's engines from one per host, started by the first
    /// engine there (`parallax engine --host-zygote`); false starts one
    /// Python per engine.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub zygote: bool,
    /// Extra arguments for each `parallax engine` (split on whitespace;
    /// repeatable), e.g. --engine-args=--python=/venv/bin/python3.
    #[arg(long = "engine-args", allow_hyphen_values = true, value_name = "ARGS")]
    pub engine_args: Vec<String>,
    /// Extra arguments for `parallax hub` (split on whitespace; repeatable),
    /// e.g. --hub-args='--scheme=lru --hwm=0'.
    #[arg(
        long = "hub-args",
        visible_alias = "controller-args",
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    pub hub_args: Vec<String>,
    /// Seconds to wait for the hub and for the engines to register.
    #[arg(long, default_value_t = 60.0)]
    pub timeout: f64,
    /// Seconds between SIGTERM and SIGKILL when stopping (foreground mode).
    #[arg(long = "stop-timeout", default_value_t = 5.0)]
    pub stop_timeout: f64,
}

#[derive(Debug, Clone, Args)]
pub struct StopArgs {
    #[command(flatten)]
    pub profile: ProfileArgs,
    /// Cluster id (default: $IPP_CLUSTER_ID, else "").
    #[arg(long = "cluster-id")]
    pub cluster_id: Option<String>,
    /// Stop every cluster of the profile.
    #[arg(long, conflicts_with = "cluster_id")]
    pub all: bool,
    /// Seconds between SIGTERM and SIGKILL.
    #[arg(long = "stop-timeout", default_value_t = 5.0)]
    pub stop_timeout: f64,
}

/// How engines get the hub's connection info.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConnectionInfo {
    /// `--file=<profile>/security/ipcontroller-…-engine.json` (a shared file
    /// system; engines wait up to their --timeout for it to appear).
    File,
    /// `$IPP_CONNECTION_INFO` in the engines' environment, as ipyparallel ≥ 8
    /// passes it: no shared file system needed; the key is in the
    /// environment (never on a command line).
    Env,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Only this profile (default: every profile in the IPython directory).
    #[command(flatten)]
    pub profile: ProfileArgs,
    /// Output format: a table (text) or the cluster files' contents (json).
    #[arg(short = 'o', long = "output-format", value_enum, default_value_t = OutputFormat::Text)]
    pub output_format: OutputFormat,
}

pub fn run(cmd: ClusterCommand) -> Result<()> {
    match cmd {
        ClusterCommand::Start(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            rt.block_on(start(*args))
        }
        ClusterCommand::Engines(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            rt.block_on(add_engines(*args))
        }
        ClusterCommand::Stop(args) => stop(&args),
        ClusterCommand::List(args) => list(&args),
        ClusterCommand::Signal(args) => signal_engines(&args),
    }
}

// ----------------------------------------------------------------- paths

fn env_var(k: &str) -> Option<String> {
    std::env::var(k).ok()
}

/// `os.path.abspath`: absolute and lexically normalised (symlinks kept).
fn abspath(p: &Path) -> PathBuf {
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("/"))
            .join(p)
    };
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn ipython_dir(p: &ProfileArgs) -> PathBuf {
    p.ipython_dir
        .clone()
        .or_else(|| {
            env_var("IPYTHONDIR")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| {
            PathBuf::from(env_var("HOME").unwrap_or_else(|| ".".into())).join(".ipython")
        })
}

fn profile_dir(p: &ProfileArgs) -> PathBuf {
    abspath(&resolve_profile_dir(
        p.profile_dir.as_deref(),
        p.ipython_dir.as_deref(),
        p.profile.as_deref().unwrap_or("default"),
        env_var,
    ))
}

fn cluster_id(explicit: &Option<String>) -> String {
    explicit
        .clone()
        .or_else(|| env_var("IPP_CLUSTER_ID"))
        .unwrap_or_default()
}

/// `<profile_dir>/security/cluster-<id>.json`, as `Cluster.cluster_file`.
pub fn cluster_file_path(profile_dir: &Path, cluster_id: &str) -> PathBuf {
    profile_dir
        .join("security")
        .join(format!("cluster-{cluster_id}.json"))
}

/// ipyparallel's `abbreviate_profile_dir`: the profile name when the
/// directory is `IPYTHONDIR/profile_NAME`.
fn abbreviate_profile_dir(profile_dir: &Path, ipython_dir: &Path) -> String {
    let prefix = format!("{}/profile_", abspath(ipython_dir).display());
    let s = profile_dir.display().to_string();
    match s.strip_prefix(&prefix) {
        Some(name) => name.to_owned(),
        None => s,
    }
}

// ------------------------------------------------------------- processes

/// Is `pid` a live process (not a zombie)?
fn pid_alive(pid: i64) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for existence/permission.
    let r = unsafe { libc::kill(pid, 0) };
    if r != 0 {
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_none_or(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// Does `pid` look like a hub or engine (ours or ipyparallel's)? Guards
/// against signalling an unrelated process that reused a stale pid. Where
/// `/proc` is not available the answer is yes.
fn looks_like_cluster_process(pid: i64) -> bool {
    let Some(args) = cmdline(pid) else {
        return !Path::new("/proc/self/cmdline").exists();
    };
    cmdline_is_cluster_process(&args)
}

fn cmdline(pid: i64) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// The zygote sockets named by `engines`' `--zygote=` arguments.
fn zygote_sockets(engines: &[i64]) -> std::collections::BTreeSet<String> {
    engines
        .iter()
        .filter_map(|p| cmdline(*p))
        .flatten()
        .filter_map(|a| a.strip_prefix("--zygote=").map(str::to_owned))
        .collect()
}

/// The zygotes of a cluster: those serving `engines` (the `--zygote=SOCKET`
/// on their command lines) and those whose command line names the cluster
/// file as owner (found even with no engine left). Not recorded in the
/// cluster file: it holds ipyparallel's fields only (`Cluster.from_file`
/// loads it unchanged, `ipcluster list` rewrites it without ours).
fn zygotes_of(
    sockets: &std::collections::BTreeSet<String>,
    cluster_file: &Path,
) -> Vec<(i64, PathBuf)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i64>().ok())
        .filter_map(|pid| {
            let (socket, owner) = parallax_engine::zygote::parse_cmdline(&cmdline(pid)?)?;
            let ours = sockets.contains(&*socket.to_string_lossy())
                || owner.is_some_and(|o| o == cluster_file);
            ours.then_some((pid, socket))
        })
        .collect()
}

fn cmdline_is_cluster_process(args: &[String]) -> bool {
    let Some(argv0) = args.first() else {
        return false;
    };
    let base = |s: &str| {
        Path::new(s)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    if base(argv0).starts_with("parallax")
        && args.get(1).is_some_and(|a| a == "hub" || a == "engine")
    {
        return true;
    }
    if parallax_engine::zygote::is_zygote_cmdline(args) {
        return true;
    }
    // mpiexec (or mpirun, srun…) running `parallax engine`
    if args
        .windows(2)
        .skip(1)
        .any(|w| base(&w[0]).starts_with("parallax") && w[1] == "engine")
    {
        return true;
    }
    args.iter().any(|a| {
        let b = base(a);
        a.starts_with("ipyparallel.") || b.starts_with("ipcontroller") || b.starts_with("ipengine")
    })
}

/// A process of the cluster: our child (foreground start) or a pid from a
/// cluster file.
pub(crate) struct Proc {
    pub(crate) label: String,
    pub(crate) pid: i64,
    pub(crate) child: Option<Child>,
}

impl Proc {
    pub(crate) fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => pid_alive(self.pid),
        }
    }

    fn signal(&self, sig: i32) {
        if let Ok(pid) = i32::try_from(self.pid)
            && pid > 0
        {
            // SAFETY: plain kill(2) on a pid we checked belongs to the cluster.
            unsafe {
                libc::kill(pid, sig);
            }
        }
    }
}

/// SIGTERM every live process, wait up to `grace`, SIGKILL the rest and wait
/// for them. Returns the labels of the processes that needed SIGKILL.
fn terminate(procs: &mut [Proc], grace: Duration) -> Vec<String> {
    let mut killed = Vec::new();
    for p in procs.iter_mut() {
        if p.alive() {
            if p.child.is_none() && !looks_like_cluster_process(p.pid) {
                esay!(
                    "warning: pid {} ({}) is not a hub or engine process any more; not signalling it",
                    p.pid,
                    p.label
                );
                p.pid = -1;
                continue;
            }
            p.signal(libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    while procs.iter_mut().any(Proc::alive) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in procs.iter_mut() {
        if p.alive() {
            p.signal(libc::SIGKILL);
            killed.push(format!("{} (pid {})", p.label, p.pid));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while procs.iter_mut().any(Proc::alive) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    killed
}

fn log_file(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Spawn `exe args…` in a new session (so a terminal's signals do not reach
/// it), stdin from /dev/null, stdout and stderr appended to `log`.
fn spawn(exe: &Path, args: &[String], log: &Path) -> Result<Child> {
    use std::os::unix::process::CommandExt;
    let out = log_file(log)?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(exe);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: setsid is async-signal-safe; nothing else runs in the child
    // between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("starting {} {}", exe.display(), args.join(" ")))
}

/// The last lines of a log, for error messages.
fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    if tail.is_empty() {
        format!("(no output in {})", path.display())
    } else {
        format!("last lines of {}:\n{tail}", path.display())
    }
}

fn split_args(values: &[String]) -> Vec<String> {
    values
        .iter()
        .flat_map(|v| v.split_whitespace().map(str::to_owned))
        .collect()
}

// ----------------------------------------------------------- cluster file

/// A launched process as ipyparallel's `LocalProcessLauncher.to_dict`.
fn launcher_state(
    profile_dir: &Path,
    cluster_id: &str,
    pid: i64,
    output_file: &Path,
    n: Option<u32>,
) -> Value {
    parallax_launch::local::process_dict(
        &profile_dir.to_string_lossy(),
        cluster_id,
        pid,
        &output_file.to_string_lossy(),
        "running",
        n,
    )
}

/// What `start` launched, serialised as `Cluster.to_dict()` would.
struct ClusterState {
    profile_dir: PathBuf,
    cluster_id: String,
    n: u32,
    hub_args: Vec<String>,
    hub: (i64, PathBuf),
    controller_ip: String,
    controller_location: String,
    /// The engine launcher's entry-point name (`local`, `mpi`, `slurm`…).
    engine_class: &'static str,
    /// Engine sets by id, each its launcher's `to_dict()`.
    sets: serde_json::Map<String, Value>,
    /// A launched hub's class and `to_dict()` (a local one: pid and log).
    controller: Option<(&'static str, Value)>,
}

impl ClusterState {
    fn to_value(&self) -> Value {
        let pd = &self.profile_dir;
        let cid = self.cluster_id.as_str();
        json!({
            "cluster": {
                "cluster_id": cid,
                "controller_args": self.hub_args,
                "controller_ip": self.controller_ip,
                "controller_location": self.controller_location,
                "delay": 1.0,
                "n": self.n,
                "profile_dir": pd.to_string_lossy(),
                "class": "ipyparallel.cluster.cluster.Cluster",
            },
            "controller": match &self.controller {
                Some((class, state)) => json!({"class": class, "state": state}),
                None => json!({
                    "class": "local",
                    "state": launcher_state(pd, cid, self.hub.0, &self.hub.1, None),
                }),
            },
            "engines": {"class": self.engine_class, "sets": self.sets},
        })
    }
}

fn write_json_atomic(path: &Path, v: &Value) -> Result<()> {
    let tmp = path.with_extension(format!("json.tmp-{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec(v)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A cluster file as read back (ours or ipcluster's).
#[derive(Debug)]
struct LoadedCluster {
    file: PathBuf,
    raw: Value,
    profile_dir: PathBuf,
    cluster_id: String,
    hub_pid: Option<i64>,
    hub_log: Option<PathBuf>,
    /// A hub launched as a job: the controller's class and state.
    hub_job: Option<(String, Value)>,
    /// The hub runs elsewhere (an ssh proxy host's profile): assumed up
    /// (`cluster engines` asks it), never stopped from here.
    hub_external: bool,
    /// (label, pid, log) of every engine process recorded.
    engines: Vec<(String, i64, Option<PathBuf>)>,
    /// Engines in sets without per-process pids (batch launchers): n each.
    unverifiable_engines: u64,
    /// Sets of a batch launcher with a job id: (set id, launcher state).
    batch_sets: Vec<(String, Value)>,
    /// The hosts of ssh engine sets (`SshLauncher::to_dict` each).
    ssh_hosts: Vec<Value>,
    engine_class: String,
}

fn pid_of(v: &Value) -> Option<i64> {
    v.get("pid").and_then(Value::as_i64).filter(|p| *p > 0)
}

fn path_of(v: &Value) -> Option<PathBuf> {
    v.get("output_file")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
}

fn parse_cluster(file: &Path, raw: Value) -> Result<LoadedCluster> {
    let info = raw.get("cluster").context("no \"cluster\" section")?;
    let cluster_id = info
        .get("cluster_id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let profile_dir = info
        .get("profile_dir")
        .and_then(Value::as_str)
        .map(PathBuf::from)
        .or_else(|| file.parent()?.parent().map(Path::to_path_buf))
        .context("no profile_dir")?;
    let state = raw.get("controller").and_then(|c| c.get("state"));
    let hub_pid = state.and_then(pid_of);
    let hub_log = state.and_then(path_of);
    let hub_job = raw
        .get("controller")
        .and_then(|c| c.get("class"))
        .and_then(Value::as_str)
        .filter(|c| LauncherKind::parse(c).is_some_and(|k| k != LauncherKind::Local))
        .zip(state)
        .map(|(c, st)| (c.to_owned(), st.clone()));
    // a launched hub is stopped through its launcher, not by its pid
    let hub_pid = hub_pid.filter(|_| hub_job.is_none());
    // an ssh proxy host's cluster: the hub runs elsewhere, not ours to stop
    let hub_external = raw
        .get("controller")
        .and_then(|c| c.get("class"))
        .and_then(Value::as_str)
        == Some(parallax_launch::ssh_proxy::EXTERNAL_HUB_CLASS);
    let mut engines = Vec::new();
    let mut unverifiable_engines = 0;
    let mut batch_sets = Vec::new();
    let mut ssh_hosts = Vec::new();
    let engine_info = raw.get("engines");
    let engine_class = engine_info
        .and_then(|e| e.get("class"))
        .and_then(Value::as_str)
        .unwrap_or("local")
        .to_owned();
    if let Some(sets) = engine_info
        .and_then(|e| e.get("sets"))
        .and_then(Value::as_object)
    {
        for (set_id, set) in sets {
            // an ssh set also lists its remote engines under "engines"
            // (ipyparallel's SSHEngineLauncher entries): their pids are
            // on other hosts, so "hosts" comes first
            if let Some(hosts) = set.get("hosts").and_then(Value::as_array) {
                // engines on other hosts: their pids mean nothing here; the
                // local ssh processes do
                for h in hosts {
                    let location = h.get("location").and_then(Value::as_str).unwrap_or("?");
                    if h.get("proxy").and_then(Value::as_bool) == Some(true) {
                        // started by the host's own launcher: counted, not
                        // checkable from here (its ssh has ended)
                        unverifiable_engines += h.get("n").and_then(Value::as_u64).unwrap_or(0);
                    } else if let Some(pid) =
                        h.get("ssh_pid").and_then(Value::as_i64).filter(|p| *p > 0)
                    {
                        engines.push((format!("ssh {location}"), pid, path_of(h)));
                    }
                    ssh_hosts.push(h.clone());
                }
            } else if let Some(members) = set.get("engines").and_then(Value::as_object) {
                for (i, e) in members {
                    if let Some(pid) = pid_of(e) {
                        engines.push((format!("engine {set_id}/{i}"), pid, path_of(e)));
                    }
                }
            } else if let Some(pid) = pid_of(set) {
                engines.push((format!("engine set {set_id}"), pid, path_of(set)));
            } else {
                unverifiable_engines += set.get("n").and_then(Value::as_u64).unwrap_or(0);
                let has_job = set
                    .get("job_id")
                    .and_then(Value::as_str)
                    .is_some_and(|j| !j.is_empty());
                if has_job {
                    batch_sets.push((set_id.clone(), set.clone()));
                }
            }
        }
    }
    Ok(LoadedCluster {
        file: file.to_path_buf(),
        raw,
        profile_dir,
        cluster_id,
        hub_pid,
        hub_log,
        hub_job,
        hub_external,
        engines,
        unverifiable_engines,
        batch_sets,
        ssh_hosts,
        engine_class,
    })
}

fn load_cluster(file: &Path) -> Result<LoadedCluster> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let raw: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    parse_cluster(file, raw).with_context(|| format!("reading {}", file.display()))
}

/// The cluster file of cluster `cid` in the profile and what it holds;
/// `missing` words the error when there is none ("no running cluster …").
fn load_named_cluster(
    profile_dir: &Path,
    cid: &str,
    missing: &str,
) -> Result<(PathBuf, LoadedCluster)> {
    let file = cluster_file_path(profile_dir, cid);
    let c = load_cluster(&file).with_context(|| {
        format!(
            "no {missing} {cid:?} in {} (see parallax cluster list)",
            profile_dir.display()
        )
    })?;
    Ok((file, c))
}

impl LoadedCluster {
    fn hub_alive(&self) -> bool {
        if self.hub_external {
            return true;
        }
        if let Some((class, state)) = &self.hub_job {
            return crate::cluster_controller::restore(class, state, Duration::ZERO)
                .is_some_and(|mut l| crate::cluster_controller::restored_alive(l.as_mut()));
        }
        self.hub_pid.is_some_and(pid_alive)
    }

    fn engines_alive(&self) -> u64 {
        self.engines
            .iter()
            .filter(|(_, p, _)| pid_alive(*p))
            .count() as u64
    }

    /// Nothing recorded is running any more (and everything was checkable).
    fn is_stale(&self) -> bool {
        (self.hub_external || !self.hub_alive())
            && self.engines_alive() == 0
            && self.unverifiable_engines == 0
    }

    fn launcher_name(&self) -> String {
        launcher_display_name(&self.engine_class)
    }
}

/// ipcluster's LAUNCHER column: the engine-set launcher class without
/// `EngineSetLauncher`.
fn launcher_display_name(class: &str) -> String {
    let known = [
        ("local", "Local"),
        ("mpi", "MPI"),
        ("mpiexec", "MPI"),
        ("ssh", "SSH"),
        ("sshproxy", "SSHProxy"),
        ("slurm", "Slurm"),
        ("pbs", "PBS"),
        ("sge", "SGE"),
        ("lsf", "LSF"),
        ("htcondor", "HTCondor"),
        ("condor", "HTCondor"),
        ("windowshpc", "WindowsHPC"),
    ];
    if let Some((_, n)) = known.iter().find(|(k, _)| k.eq_ignore_ascii_case(class)) {
        return (*n).to_owned();
    }
    let last = class.rsplit(['.', ':']).next().unwrap_or(class);
    last.strip_suffix("EngineSetLauncher")
        .filter(|s| !s.is_empty())
        .unwrap_or(last)
        .to_owned()
}

// ------------------------------------------------------------ hub queries

/// A query connection to the hub's registration (query) ROUTER.
struct HubQuery {
    sock: DealerSocket,
    session: Session,
    auth: Authenticator,
    limits: Limits,
}

impl HubQuery {
    async fn connect(info: &ClientConnectionInfo, timeout: Duration) -> Result<HubQuery> {
        let interface =
            if info.interface.ends_with("://*") || info.interface.ends_with("://0.0.0.0") {
                format!("tcp://{}", info.location)
            } else {
                info.interface.clone()
            };
        let url = format!("{interface}:{}", info.registration);
        let mut sock = DealerSocket::new();
        tokio::time::timeout(timeout, sock.connect(&url))
            .await
            .map_err(|_| anyhow::anyhow!("could not reach the hub at {url}"))?
            .with_context(|| format!("connecting to the hub at {url}"))?;
        let signer = Signer::new(info.key.as_bytes());
        Ok(HubQuery {
            sock,
            session: Session::new(
                signer.clone(),
                uuid::Uuid::new_v4().to_string(),
                "parallax-cluster".into(),
                std::process::id(),
            ),
            auth: Authenticator::new(signer),
            limits: Limits::default(),
        })
    }

    /// The registered engines (`{id: uuid}`), or `None` if the hub did not
    /// answer within `wait`.
    async fn engines(&mut self, wait: Duration) -> Result<Option<serde_json::Map<String, Value>>> {
        let header = self
            .session
            .header("connection_request", &format_date(chrono::Utc::now()));
        let frames =
            self.session
                .serialize(vec![], &header, &json!({}), &json!({}), &json!({}), vec![]);
        self.sock
            .send(ZmqMessage::try_from(frames).expect("non-empty"))
            .await?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let Ok(reply) = tokio::time::timeout_at(deadline, self.sock.recv()).await else {
                return Ok(None);
            };
            let raw = RawMessage::from_frames(reply?.into_vec(), &self.limits)?;
            self.auth.check(&raw).context("hub reply")?;
            let msg = Message::decode(&raw)?;
            if msg.parent_msg_id() != Some(header.msg_id.as_str()) {
                continue; // a late reply to an earlier request
            }
            let engines = msg
                .content
                .get("engines")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            return Ok(Some(engines));
        }
    }
}

// ------------------------------------------------------------------ start

/// Stop signals for the foreground `start`.
struct StopSignals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn new() -> Result<StopSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}

/// One engine set: what one launcher started (a local set holds one
/// process launcher per engine, as ipyparallel's `LocalEngineSetLauncher`).
pub(crate) struct EngineSet {
    pub(crate) id: String,
    pub(crate) kind: LauncherKind,
    pub(crate) members: Vec<Box<dyn Launcher>>,
    pub(crate) logs: Vec<PathBuf>,
    /// A batch job's script, removed at stop.
    script: Option<PathBuf>,
    /// The last state seen, and when it was polled.
    pub(crate) last: Option<(JobState, Instant)>,
    /// Reported as gone already (foreground mode).
    pub(crate) reported: Vec<bool>,
}

impl EngineSet {
    /// The set as `Cluster.to_dict()` writes it.
    fn to_value(&self, profile_dir: &Path, cid: &str) -> Value {
        if matches!(self.kind, LauncherKind::Ssh | LauncherKind::SshProxy) {
            return crate::cluster_ssh::set_value(&self.members, profile_dir, cid);
        }
        if self.kind == LauncherKind::Local {
            let engines: serde_json::Map<String, Value> = self
                .members
                .iter()
                .enumerate()
                .map(|(i, m)| (i.to_string(), m.to_dict()))
                .collect();
            json!({
                "cluster_id": cid,
                "n": self.members.len(),
                "pid": -1,
                "profile_dir": profile_dir.to_string_lossy(),
                "state": "running",
                "engines": engines,
            })
        } else {
            let mut d = self.members[0].to_dict();
            if let Some(s) = &self.script {
                // not one of ipyparallel's fields (it ignores it): for stop
                d["batch_file"] = json!(s.to_string_lossy());
            }
            d
        }
    }

    fn is_batch(&self) -> bool {
        self.kind.batch_system().is_some()
    }

    /// Poll every member (batch jobs at most every `interval`, they run a
    /// command); the first one that is no longer active, with its state.
    pub(crate) fn poll(&mut self, interval: Duration) -> Option<(usize, JobState)> {
        if self.is_batch()
            && self
                .last
                .as_ref()
                .is_some_and(|(_, at)| at.elapsed() < interval)
        {
            return None;
        }
        let batch = self.is_batch();
        for (i, m) in self.members.iter_mut().enumerate() {
            match m.poll() {
                Ok(s) => {
                    let inactive = !s.is_active();
                    if batch {
                        self.last = Some((s.clone(), Instant::now()));
                    }
                    if inactive && !self.reported[i] {
                        return Some((i, s));
                    }
                }
                Err(e) => esay!("warning: could not poll {}: {e}", m.label()),
            }
        }
        None
    }

    /// Stop every member at once (one thread each: an ssh host's stop is a
    /// round trip plus its engines' grace, and hosts are independent).
    pub(crate) fn stop(&mut self) -> Vec<String> {
        let errors: Vec<String> = each_at_once(&mut self.members, |m| match m.stop() {
            Ok(()) => Vec::new(),
            Err(e) => vec![format!("{}: {e}", m.label())],
        });
        if let Some(s) = &self.script {
            let _ = std::fs::remove_file(s);
        }
        errors
    }
}

/// `f` on every item at once, one thread each (stops: a round trip and a
/// grace period per item, and items are independent); what they return,
/// in order, flattened. A panic becomes an error line.
pub(crate) fn each_at_once<T: Send>(
    items: &mut [T],
    f: impl Fn(&mut T) -> Vec<String> + Sync,
) -> Vec<String> {
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = items.iter_mut().map(|t| s.spawn(move || f(t))).collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .unwrap_or_else(|_| vec!["stopping panicked".into()])
            })
            .collect()
    })
}

/// The processes `start` launched, for cleanup.
struct Launched {
    zygote_log: Option<PathBuf>,
    hub: Option<Hub>,
    /// The zygote's process and socket (local Python engines).
    zygote: Option<(Proc, PathBuf)>,
    hub_log: PathBuf,
    sets: Vec<EngineSet>,
    cluster_file: PathBuf,
    grace: Duration,
    /// The connection files here (an ssh hub's are our copies: removed
    /// with it).
    connection_files: [PathBuf; 2],
}

impl Launched {
    /// Stop engines then hub; remove the cluster file if it is still ours.
    fn shutdown(&mut self, remove_logs: bool) {
        for set in &mut self.sets {
            for e in set.stop() {
                esay!("warning: stopping {e}");
            }
        }
        // the zygote after the engines: their interpreters are its children
        if let Some((z, socket)) = &mut self.zygote {
            for k in terminate(std::slice::from_mut(z), self.grace) {
                esay!("warning: {k} did not stop after SIGTERM; killed");
            }
            let _ = std::fs::remove_file(socket);
        }
        let mut hub_killed = Vec::new();
        match &mut self.hub {
            Some(Hub::Local(hub)) => {
                hub_killed = terminate(std::slice::from_mut(hub), self.grace);
            }
            Some(Hub::Launched(h)) => {
                if let Err(e) = h.launcher.stop() {
                    esay!("warning: stopping the hub ({}): {e}", h.launcher.label());
                }
                if h.kind == LauncherKind::Ssh {
                    for f in &self.connection_files {
                        let _ = std::fs::remove_file(f);
                    }
                }
            }
            None => {}
        }
        for k in &hub_killed {
            esay!("warning: {k} did not stop after SIGTERM; killed");
        }
        let ours = self.hub.as_ref().map(Hub::pid).filter(|p| *p > 0);
        if let Ok(c) = load_cluster(&self.cluster_file)
            && c.hub_pid == ours
        {
            let _ = std::fs::remove_file(&self.cluster_file);
        }
        if remove_logs {
            let logs = self.sets.iter().flat_map(|s| s.logs.iter());
            for log in logs.chain([&self.hub_log]).chain(self.zygote_log.iter()) {
                let _ = std::fs::remove_file(log);
            }
        }
    }

    fn engine_sets_value(&self, profile_dir: &Path, cid: &str) -> serde_json::Map<String, Value> {
        self.sets
            .iter()
            .map(|s| (s.id.clone(), s.to_value(profile_dir, cid)))
            .collect()
    }
}

/// `(device, inode)` of a file, if it exists: a connection file is "new"
/// when its identity changed (the hub writes a temp file and renames it).
fn file_identity(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

enum Interrupted {
    Signal(&'static str),
}

/// What the engine launchers need to know.
pub(crate) struct EnginePlan<'a> {
    pub(crate) args: &'a StartArgs,
    pub(crate) exe: &'a Path,
    pub(crate) engine_file: &'a Path,
    pub(crate) profile_dir: &'a Path,
    pub(crate) cid: &'a str,
    pub(crate) log_dir: &'a Path,
    pub(crate) id_part: &'a str,
    pub(crate) set_base: &'a str,
    pub(crate) n: u32,
    pub(crate) grace: Duration,
}

impl EnginePlan<'_> {
    fn connection_info(&self) -> ConnectionInfo {
        self.args
            .connection_info
            .unwrap_or(match self.args.engines {
                LauncherKind::Ssh => ConnectionInfo::Env,
                _ => ConnectionInfo::File,
            })
    }

    /// `parallax engine --file=… --n-engines=N [engine args]`.
    fn engine_argv(&self) -> Vec<String> {
        let mut v = vec![self.exe.to_string_lossy().into_owned(), "engine".to_owned()];
        if self.connection_info() == ConnectionInfo::File {
            v.push(format!("--file={}", self.engine_file.display()));
        }
        v.push(format!("--n-engines={}", self.n));
        v.extend(split_args(&self.args.engine_args));
        if host_zygote(self.args) {
            v.push("--host-zygote".to_owned());
        }
        v
    }

    fn batch_options(&self) -> Result<batch::BatchOptions> {
        let a = self.args;
        let template = match &a.template {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("reading the template {}", p.display()))?,
            ),
            None => None,
        };
        Ok(batch::BatchOptions {
            queue: a.queue.clone().unwrap_or_default(),
            account: a.account.clone().unwrap_or_default(),
            qos: a.qos.clone().unwrap_or_default(),
            timelimit: a.time.clone().unwrap_or_default(),
            extra_directives: a.extra_directive.clone(),
            template,
            namespace: Default::default(),
        })
    }

    /// The batch jobs: one, or one per `--engines-per-job` engines.
    fn batch_jobs(
        &self,
        system: &'static batch::BatchSystem,
    ) -> Result<Vec<(String, batch::BatchJob)>> {
        let per_job = self.args.engines_per_job.unwrap_or(self.n).clamp(1, self.n);
        let options = self.batch_options()?;
        let argv = self.engine_argv();
        let (program, program_args) = argv.split_at(2);
        let jobs = self.n.div_ceil(per_job);
        Ok((0..jobs)
            .map(|j| {
                let set_id = if jobs == 1 {
                    self.set_base.to_owned()
                } else {
                    format!("{}-{j}", self.set_base)
                };
                let output = self
                    .log_dir
                    .join(format!("parallax-engines{}-{set_id}.log", self.id_part));
                let job = batch::BatchJob {
                    system,
                    options: options.clone(),
                    n: per_job.min(self.n - j * per_job),
                    profile_dir: self.profile_dir.to_string_lossy().into_owned(),
                    cluster_id: self.cid.to_owned(),
                    output_file: output.to_string_lossy().into_owned(),
                    program: program.to_vec(),
                    program_args: program_args.to_vec(),
                };
                (set_id, job)
            })
            .collect())
    }

    fn mpi_command(&self) -> parallax_launch::mpi::MpiCommand {
        parallax_launch::mpi::MpiCommand {
            mpi_cmd: split_args(std::slice::from_ref(&self.args.mpi_cmd)),
            mpi_args: split_args(&self.args.mpi_args),
            n: self.n,
            program: self.engine_argv(),
        }
    }

    /// `--print-script`: what would be submitted or run.
    pub(crate) fn describe(&self) -> Result<String> {
        let kind = self.args.engines;
        Ok(match kind.batch_system() {
            Some(system) => {
                let mut out = String::new();
                for (set_id, job) in self.batch_jobs(system)? {
                    if self.n.div_ceil(job.n.max(1)) > 1 || set_id.contains('-') {
                        out.push_str(&format!(
                            "# --- job for engine set {set_id} ({} engines)\n",
                            job.n
                        ));
                    }
                    out.push_str(&job.script()?);
                }
                out
            }
            None if kind == LauncherKind::SshProxy => {
                crate::cluster_ssh_proxy::describe(self.args, self.n, self.exe, self.cid)?
            }
            None if kind == LauncherKind::Ssh => crate::cluster_ssh::describe(
                self.args,
                self.n,
                &self.engine_argv(),
                self.connection_info() == ConnectionInfo::Env,
            )?,
            None if kind == LauncherKind::Mpi => {
                parallax_launch::template::shell_join(&self.mpi_command().argv()) + "\n"
            }
            None => format!(
                "{} × {}\n",
                self.n,
                parallax_launch::template::shell_join(&self.engine_argv())
            ),
        })
    }

    /// The engines' extra environment: `$IPP_CONNECTION_INFO` in env mode.
    fn engine_env(&self) -> Result<Vec<(String, String)>> {
        Ok(match self.connection_info() {
            ConnectionInfo::File => Vec::new(),
            ConnectionInfo::Env => vec![(
                "IPP_CONNECTION_INFO".to_owned(),
                std::fs::read_to_string(self.engine_file)
                    .with_context(|| format!("reading {}", self.engine_file.display()))?,
            )],
        })
    }

    /// Start the engines; the sets are pushed as they start, so a failure
    /// halfway leaves the started ones to `shutdown`.
    pub(crate) fn start(&self, sets: &mut Vec<EngineSet>) -> Result<()> {
        let kind = self.args.engines;
        let env = self.engine_env()?;
        let new_set = |id: String, members: Vec<Box<dyn Launcher>>, logs, script| EngineSet {
            id,
            kind,
            reported: vec![false; members.len()],
            members,
            logs,
            script,
            last: None,
        };
        match kind {
            LauncherKind::Local => {
                sets.push(new_set(
                    self.set_base.to_owned(),
                    Vec::new(),
                    Vec::new(),
                    None,
                ));
                let set = sets.last_mut().expect("pushed");
                for i in 0..self.n {
                    let log = self.log_dir.join(format!(
                        "parallax-engine{}-{}-{i}.log",
                        self.id_part, self.set_base
                    ));
                    let mut l = ldriver::ProcessLauncher::new(
                        LauncherKind::Local,
                        self.engine_argv(),
                        &self.profile_dir.to_string_lossy(),
                        self.cid,
                        log.clone(),
                        self.grace,
                    );
                    l.env = env.clone();
                    l.start(1).with_context(|| format!("starting engine {i}"))?;
                    set.members.push(Box::new(l));
                    set.logs.push(log);
                    set.reported.push(false);
                }
            }
            LauncherKind::Mpi => {
                let log = self.log_dir.join(format!(
                    "parallax-mpi{}-{}.log",
                    self.id_part, self.set_base
                ));
                let mut l = ldriver::ProcessLauncher::new(
                    LauncherKind::Mpi,
                    self.mpi_command().argv(),
                    &self.profile_dir.to_string_lossy(),
                    self.cid,
                    log.clone(),
                    self.grace,
                );
                l.env = env.clone();
                l.start(self.n).context("starting mpiexec")?;
                sets.push(new_set(
                    self.set_base.to_owned(),
                    vec![Box::new(l)],
                    vec![log],
                    None,
                ));
            }
            LauncherKind::Ssh => {
                let hosts = crate::cluster_ssh::hosts_for(self.args, self.n)?;
                let mut launchers = Vec::new();
                let mut logs = Vec::new();
                for (i, host) in hosts.into_iter().enumerate() {
                    let log = self.log_dir.join(format!(
                        "parallax-ssh{}-{}-{i}.log",
                        self.id_part, self.set_base
                    ));
                    let n = host.engines;
                    let mut l = crate::cluster_ssh::launcher(
                        self.args,
                        host,
                        self.engine_argv(),
                        &self.profile_dir.to_string_lossy(),
                        self.cid,
                        log.clone(),
                        self.grace,
                    );
                    l.env = env.clone();
                    l.start(n)
                        .with_context(|| format!("starting {}", l.label()))?;
                    launchers.push(l);
                    logs.push(log);
                }
                // all connections open at once; then each reports its pids
                let waited: Result<()> = launchers.iter_mut().try_for_each(|l| {
                    l.wait_started(crate::cluster_ssh::START_TIMEOUT)
                        .map_err(anyhow::Error::from)
                });
                let members: Vec<Box<dyn Launcher>> = launchers
                    .into_iter()
                    .map(|l| Box::new(l) as Box<dyn Launcher>)
                    .collect();
                sets.push(new_set(self.set_base.to_owned(), members, logs, None));
                waited?;
            }
            LauncherKind::SshProxy => {
                let (client_name, _) = connection_file_names(self.cid);
                let client_file = self.engine_file.with_file_name(client_name);
                let log_for = |i: usize| {
                    self.log_dir.join(format!(
                        "parallax-sshproxy{}-{}-{i}.log",
                        self.id_part, self.set_base
                    ))
                };
                let launchers = crate::cluster_ssh_proxy::launchers(
                    self.args,
                    self.n,
                    self.exe,
                    &client_file,
                    self.engine_file,
                    self.profile_dir,
                    self.cid,
                    log_for,
                    self.grace,
                )?;
                let mut members: Vec<Box<dyn Launcher>> = Vec::new();
                let mut logs = Vec::new();
                let mut failed = None;
                for (i, mut l) in launchers.into_iter().enumerate() {
                    let n = l.host.engines;
                    if let Err(e) = l.start(n) {
                        failed =
                            Some(anyhow::Error::from(e).context(format!("starting {}", l.label())));
                        break;
                    }
                    logs.push(log_for(i));
                    members.push(Box::new(l));
                }
                sets.push(new_set(self.set_base.to_owned(), members, logs, None));
                if let Some(e) = failed {
                    return Err(e);
                }
            }
            _ => {
                let system = kind
                    .batch_system()
                    .with_context(|| format!("the {kind} launcher is not implemented yet"))?;
                for (set_id, job) in self.batch_jobs(system)? {
                    let script = self
                        .profile_dir
                        .join(format!("{}{}-{set_id}", system.script_name, self.id_part));
                    let log = PathBuf::from(&job.output_file);
                    let n = job.n;
                    let mut l = ldriver::BatchLauncher::new(job, script.clone());
                    l.grace = self.grace.max(Duration::from_secs(10));
                    l.env = env.clone();
                    l.start(n)
                        .with_context(|| format!("submitting the {} job", kind.display_name()))?;
                    let label = l.label();
                    sets.push(new_set(set_id, vec![Box::new(l)], vec![log], Some(script)));
                    say!("Submitted {label} ({n} engines)");
                }
            }
        }
        Ok(())
    }
}

/// Why a set that stopped before all engines registered failed, for the
/// error message: its state and the end of its output.
pub(crate) fn set_failure(set: &EngineSet, member: usize, state: &JobState) -> String {
    let what = set.members[member].label();
    let log = set.logs.get(member).or(set.logs.first());
    let detail = match (set.kind, log) {
        (LauncherKind::Mpi, Some(l)) => {
            let text = std::fs::read_to_string(l).unwrap_or_default();
            let lines = parallax_launch::mpi::error_lines(&text);
            if lines.is_empty() {
                log_tail(l, 20)
            } else {
                format!("mpiexec said:\n{lines}")
            }
        }
        // a job that never ran has no output to show
        (_, Some(l)) if std::fs::metadata(l).is_ok_and(|m| m.len() > 0) => log_tail(l, 20),
        _ => return format!("{what} {}", state.describe()),
    };
    format!("{what} {}; {detail}", state.describe())
}

fn parse_launcher(s: &str) -> Result<LauncherKind, String> {
    LauncherKind::parse(s).ok_or_else(|| {
        format!(
            "unknown launcher {s:?} (one of: {})",
            LauncherKind::ALL.map(LauncherKind::name).join(", ")
        )
    })
}

/// The zygote's log: named after its socket, so `stop` finds it from an
/// engine's `--zygote=` alone.
fn zygote_log_path(log_dir: &Path, id_part: &str, socket: &Path) -> PathBuf {
    let stem = socket
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    log_dir.join(format!("parallax-{stem}{id_part}.log"))
}

/// The Python the engines run (their `--python`, default python3) when
/// they may get a zygote from `cluster start`: None when they run Rust or
/// the engine arguments already name one (`--zygote`, `--host-zygote`).
fn zygote_python(engine_args: &[String]) -> Option<PathBuf> {
    let engine_args = split_args(engine_args);
    let mut python = PathBuf::from("python3");
    let mut it = engine_args.iter();
    while let Some(a) = it.next() {
        let value = |it: &mut std::slice::Iter<String>, name: &str| {
            a.strip_prefix(&format!("{name}="))
                .map(str::to_owned)
                .or_else(|| (a == name).then(|| it.next().cloned()).flatten())
        };
        if let Some(l) = value(&mut it, "--language") {
            if l != "python" {
                return None;
            }
        } else if let Some(p) = value(&mut it, "--python") {
            python = PathBuf::from(p);
        } else if ["--zygote", "--host-zygote"]
            .iter()
            .any(|f| a == f || a.starts_with(&format!("{f}=")))
        {
            return None; // the user chose
        }
    }
    Some(python)
}

/// The zygote for this start, if any: (python, socket). Only local Python
/// engines use one (`--zygote`, on by default); their `--python` (default
/// python3) is the zygote's interpreter.
fn zygote_plan(args: &StartArgs) -> Option<(PathBuf, PathBuf)> {
    if !args.zygote || args.engines != LauncherKind::Local {
        return None;
    }
    let python = zygote_python(&args.engine_args)?;
    let socket = parallax_engine::zygote::socket_path().ok()?;
    // engine arguments are split on whitespace
    if socket.to_string_lossy().contains(char::is_whitespace) {
        return None;
    }
    Some((python, socket))
}

/// Do the engines a launcher starts share their cluster's zygote on each
/// host (`parallax engine --host-zygote`)? Python engines of every launcher
/// but `sshproxy` (whose `cluster engines` on the other host decides for
/// its own launcher), unless `--zygote=false` or the engine arguments name
/// a zygote — as `start` does for local engines, which get the one it
/// runs (`cluster engines` and the kernel's `%cluster start --engines
/// local` add local engines without one: they share a host zygote).
fn host_zygote(args: &StartArgs) -> bool {
    args.zygote
        && args.engines != LauncherKind::SshProxy
        && zygote_python(&args.engine_args).is_some()
}

/// Start the zygote in its own session (like the hub), output to `log`,
/// and wait until its socket exists (engines may connect while it still
/// imports; they wait for their interpreter).
fn spawn_zygote(python: &Path, socket: &Path, owner: &Path, log: &Path) -> Result<Proc> {
    use std::os::unix::process::CommandExt;
    let out = log_file(log)?;
    let err = out.try_clone()?;
    let mut cmd = parallax_engine::zygote::command(python, socket, Some(owner))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting the zygote")?;
    let mut p = Proc {
        label: "zygote".into(),
        pid: child.id() as i64,
        child: Some(child),
    };
    if !parallax_engine::zygote::wait_for_socket(socket, Duration::from_secs(10)) || !p.alive() {
        terminate(std::slice::from_mut(&mut p), Duration::from_secs(1));
        bail!(
            "it did not create {}; {}",
            socket.display(),
            log_tail(log, 10)
        );
    }
    Ok(p)
}

async fn start(mut args: StartArgs) -> Result<()> {
    let t0 = Instant::now();
    let n = match args.n {
        Some(n) => n,
        None if matches!(args.engines, LauncherKind::Ssh | LauncherKind::SshProxy) => {
            crate::cluster_ssh::default_n(&args)?
        }
        None => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
    };
    if n == 0 {
        bail!("-n must be at least 1");
    }
    crate::cluster_controller::check(&args)?;
    crate::cluster_ssh_proxy::check(&args)?;
    if matches!(args.engines, LauncherKind::Ssh | LauncherKind::SshProxy) {
        crate::cluster_ssh::check_reachable(&args)?;
    }
    let timeout = Duration::from_secs_f64(args.timeout.max(0.0));
    let profile_dir = profile_dir(&args.profile);
    let cid = cluster_id(&args.cluster_id);
    let security = profile_dir.join("security");
    let log_dir = profile_dir.join("log");
    let (client_name, engine_name) = connection_file_names(&cid);
    let client_file = security.join(client_name);
    let engine_file = security.join(engine_name);
    let exe = std::env::current_exe().context("finding the parallax executable")?;
    let id_part = if cid.is_empty() {
        String::new()
    } else {
        format!("-{cid}")
    };
    let set_base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .to_string();
    let grace = Duration::from_secs_f64(args.stop_timeout.max(0.0));
    // the zygote's socket is named now so the engines' command line has it;
    // the zygote itself starts after the hub
    let zygote = zygote_plan(&args);
    if let Some((_, socket)) = &zygote {
        args.engine_args
            .push(format!("--zygote={}", socket.display()));
    }
    let args = args;
    let plan = EnginePlan {
        args: &args,
        exe: &exe,
        engine_file: &engine_file,
        profile_dir: &profile_dir,
        cid: &cid,
        log_dir: &log_dir,
        id_part: &id_part,
        set_base: &set_base,
        n,
        grace,
    };
    if args.print_script {
        print!("{}", plan.describe()?);
        return Ok(());
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&security)
            .with_context(|| format!("creating {}", security.display()))?;
        std::fs::create_dir_all(&log_dir)
            .with_context(|| format!("creating {}", log_dir.display()))?;
    }
    let cluster_file = cluster_file_path(&profile_dir, &cid);
    let stop_hint = stop_command(&profile_dir, &cid);
    if cluster_file.exists() {
        match load_cluster(&cluster_file) {
            Ok(c) if !c.is_stale() => bail!(
                "cluster {:?} is already running in {} (stop it with: {stop_hint})",
                cid,
                profile_dir.display()
            ),
            _ => {
                let _ = std::fs::remove_file(&cluster_file);
            }
        }
    }
    let before = (file_identity(&client_file), file_identity(&engine_file));

    let mut signals = StopSignals::new()?;
    let hub_log = log_dir.join(format!("parallax-hub{id_part}-{}.log", std::process::id()));
    let mut hub_cmd = vec![
        "hub".to_owned(),
        format!("--profile-dir={}", profile_dir.display()),
        format!("--cluster-id={cid}"),
    ];
    // a hub launched elsewhere (a job's node) listens on all interfaces
    // unless told otherwise, and names its own host as `location`
    let ip = args
        .ip
        .clone()
        .or_else(|| (args.controller != LauncherKind::Local).then(|| "0.0.0.0".to_owned()));
    if let Some(ip) = &ip {
        hub_cmd.push(format!("--ip={ip}"));
    }
    // an ssh hub is reached by the name ssh reaches its host with
    let location = args.location.clone().or_else(|| {
        (args.controller == LauncherKind::Ssh)
            .then(|| crate::cluster_ssh_controller::default_location(&args))
            .flatten()
    });
    if let Some(location) = &location {
        hub_cmd.push(format!("--location={location}"));
    }
    let hub_args = split_args(&args.hub_args);
    hub_cmd.extend(hub_args.iter().cloned());
    let hub = if args.controller == LauncherKind::Local {
        let hub_child = spawn(&exe, &hub_cmd, &hub_log)?;
        Hub::Local(Proc {
            label: "hub".into(),
            pid: hub_child.id() as i64,
            child: Some(hub_child),
        })
    } else {
        let mut argv = vec![exe.to_string_lossy().into_owned()];
        argv.extend(hub_cmd.iter().cloned());
        let h = crate::cluster_controller::start(
            &args,
            argv,
            &profile_dir,
            &cid,
            &id_part,
            &hub_log,
            grace,
            Duration::from_secs_f64(args.poll_interval.max(0.05)),
        )?;
        say!("Launched the hub: {}", h.launcher.label());
        Hub::Launched(h)
    };
    let zygote_log = zygote.as_ref().map_or_else(
        || log_dir.join("parallax-zygote.log"),
        |(_, socket)| zygote_log_path(&log_dir, &id_part, socket),
    );
    let zygote = match zygote {
        Some((python, socket)) => {
            match spawn_zygote(&python, &socket, &cluster_file, &zygote_log) {
                Ok(p) => Some((p, socket)),
                Err(e) => {
                    // the engines find no socket and start Python themselves
                    esay!("warning: no zygote ({e:#}); each engine starts its own Python");
                    None
                }
            }
        }
        None => None,
    };
    let mut launched = Launched {
        zygote_log: zygote.is_some().then(|| zygote_log.clone()),
        zygote,
        hub: Some(hub),
        hub_log: hub_log.clone(),
        sets: Vec::new(),
        cluster_file: cluster_file.clone(),
        grace,
        connection_files: [client_file.clone(), engine_file.clone()],
    };
    let mut state = ClusterState {
        profile_dir: profile_dir.clone(),
        cluster_id: cid.clone(),
        n,
        hub_args,
        hub: (launched.hub.as_ref().map_or(-1, Hub::pid), hub_log.clone()),
        controller: match &launched.hub {
            Some(Hub::Launched(h)) => Some(h.class_and_state()),
            _ => None,
        },
        controller_ip: ip.clone().unwrap_or_default(),
        controller_location: location.clone().unwrap_or_default(),
        engine_class: args.engines.name(),
        sets: Default::default(),
    };
    let poll_interval = Duration::from_secs_f64(args.poll_interval.max(0.05));

    let ready = async {
        // --- the hub: wait for fresh connection files
        let deadline = Instant::now() + timeout;
        let mut hub_note = String::new();
        loop {
            let hub = launched.hub.as_mut().expect("hub");
            if !hub.alive() {
                bail!(
                    "the hub exited ({}) before writing its connection files; {}",
                    hub.ended(),
                    log_tail(&hub_log, 20)
                );
            }
            if let Some(note) = hub.waiting_note()
                && note != hub_note
            {
                esay!("{note}");
                hub_note = note;
            }
            let now = (file_identity(&client_file), file_identity(&engine_file));
            let fresh =
                |old: Option<(u64, u64)>, new: Option<(u64, u64)>| new.is_some() && new != old;
            if fresh(before.0, now.0) && fresh(before.1, now.1) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the hub did not write {} within {:?}; {}",
                    client_file.display(),
                    timeout,
                    log_tail(&hub_log, 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // an ssh hub's pid and directory on its host: what stop needs
        if let Some(Hub::Launched(h)) = launched.hub.as_mut()
            && h.kind == LauncherKind::Ssh
        {
            let _ = h.launcher.poll();
            state.controller = Some(h.class_and_state());
        }
        write_json_atomic(&cluster_file, &state.to_value())?;
        let info: ClientConnectionInfo = serde_json::from_str(
            &std::fs::read_to_string(&client_file)
                .with_context(|| format!("reading {}", client_file.display()))?,
        )
        .with_context(|| format!("parsing {}", client_file.display()))?;

        // --- the engines
        let started = plan.start(&mut launched.sets);
        state.sets = launched.engine_sets_value(&profile_dir, &cid);
        write_json_atomic(&cluster_file, &state.to_value())?;
        started?;

        // --- wait for the registrations, watching the launchers
        let mut query = HubQuery::connect(&info, timeout).await?;
        let mut shown = String::new();
        loop {
            let hub = launched.hub.as_mut().expect("hub");
            if !hub.alive() {
                bail!(
                    "the hub exited ({}) while engines were registering; {}",
                    hub.ended(),
                    log_tail(&hub_log, 20)
                );
            }
            let registered = query
                .engines(Duration::from_millis(500))
                .await?
                .map_or(0, |e| e.len());
            if registered >= n as usize {
                return Ok(registered);
            }
            for set in &mut launched.sets {
                if let Some((member, st)) = set.poll(poll_interval) {
                    bail!(
                        "{registered} of {n} engines registered, but {}",
                        set_failure(set, member, &st)
                    );
                }
            }
            let jobs: Vec<String> = launched
                .sets
                .iter()
                .filter_map(|s| {
                    let (st, _) = s.last.as_ref()?;
                    Some(format!("{} {}", s.members[0].label(), st.describe()))
                })
                .collect();
            if !jobs.is_empty() {
                let line = format!("{registered}/{n} engines registered; {}", jobs.join(", "));
                if line != shown {
                    esay!("{line}");
                    shown = line;
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{registered} of {n} engines registered within {timeout:?}{}; engine logs are in {}",
                    if shown.is_empty() {
                        String::new()
                    } else {
                        format!(" ({shown})")
                    },
                    log_dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let outcome: Result<Result<usize>, Interrupted> = tokio::select! {
        r = ready => Ok(r),
        s = signals.recv() => Err(Interrupted::Signal(s)),
    };
    let registered = match outcome {
        Ok(Ok(r)) if args.engines == LauncherKind::SshProxy => {
            // what each proxy host reported (its profile there): for stop
            refresh_sets(&mut launched.sets);
            state.sets = launched.engine_sets_value(&profile_dir, &cid);
            write_json_atomic(&cluster_file, &state.to_value())?;
            r
        }
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            launched.shutdown(false);
            return Err(e.context("starting the cluster failed; everything started was stopped"));
        }
        Err(Interrupted::Signal(s)) => {
            esay!("{s} received before the cluster was ready: stopping it");
            launched.shutdown(true);
            bail!("interrupted by {s}");
        }
    };
    let elapsed = t0.elapsed();
    say!(
        "Cluster {} started in {:.2} s: hub {}, {registered} engines registered",
        if cid.is_empty() {
            "''".to_owned()
        } else {
            cid.clone()
        },
        elapsed.as_secs_f64(),
        match &launched.hub {
            Some(Hub::Launched(h)) => h.launcher.label(),
            _ => format!("pid {}", state.hub.0),
        },
    );
    say!("Client connection file: {}", client_file.display());
    say!("Cluster file: {}", cluster_file.display());
    if args.daemonize {
        say!("Stop it with: {stop_hint}");
        // The children run in their own sessions and outlive us.
        return Ok(());
    }
    say!("Press Ctrl-C to stop the cluster");

    // --- foreground: until a signal or the hub exits
    let reason = loop {
        tokio::select! {
            s = signals.recv() => break format!("{s} received"),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        let hub = launched.hub.as_mut().expect("hub");
        if !hub.alive() {
            break format!("the hub exited ({})", hub.ended());
        }
        for set in &mut launched.sets {
            let interval = poll_interval.max(Duration::from_secs(2));
            if let Some((i, st)) = set.poll(interval)
                && !set.reported[i]
            {
                set.reported[i] = true;
                esay!("warning: {} {}", set.members[i].label(), st.describe());
            }
        }
    };
    say!("{reason}: stopping the cluster");
    launched.shutdown(true);
    say!("Cluster stopped");
    Ok(())
}

/// Polls each member once, so their `to_dict` holds what they reported
/// since (an ssh proxy host's profile directory).
fn refresh_sets(sets: &mut [EngineSet]) {
    for set in sets {
        for m in &mut set.members {
            let _ = m.poll();
        }
    }
}

/// `parallax cluster engines`: one more engine set for a running cluster.
async fn add_engines(args: StartArgs) -> Result<()> {
    let t0 = Instant::now();
    let n = match args.n {
        Some(n) if n > 0 => n,
        Some(_) => bail!("-n must be at least 1"),
        None if matches!(args.engines, LauncherKind::Ssh | LauncherKind::SshProxy) => {
            crate::cluster_ssh::default_n(&args)?
        }
        None => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
    };
    crate::cluster_ssh_proxy::check(&args)?;
    let profile_dir = profile_dir(&args.profile);
    let cid = cluster_id(&args.cluster_id);
    let (cluster_file, c) = load_named_cluster(&profile_dir, &cid, "running cluster")?;
    if !c.hub_alive() {
        bail!("the hub of cluster {cid:?} is not running");
    }
    // ipyparallel's cluster file has one engine launcher class for all sets
    let existing = LauncherKind::parse(&c.engine_class);
    let has_sets = c.raw["engines"]["sets"]
        .as_object()
        .is_some_and(|m| !m.is_empty());
    if has_sets && existing != Some(args.engines) {
        bail!(
            "cluster {cid:?} runs {} engines; its cluster file (ipyparallel's format) holds one launcher, \
             so add engines with --engines {}",
            c.launcher_name(),
            existing.map_or(c.engine_class.clone(), |k| k.name().to_owned())
        );
    }
    if matches!(args.engines, LauncherKind::Ssh | LauncherKind::SshProxy) {
        crate::cluster_ssh::check_reachable_from(&args, &c.raw)?;
    }
    let security = profile_dir.join("security");
    let log_dir = profile_dir.join("log");
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let (client_name, engine_name) = connection_file_names(&cid);
    let client_file = security.join(client_name);
    let engine_file = security.join(engine_name);
    let exe = std::env::current_exe().context("finding the parallax executable")?;
    let id_part = if cid.is_empty() {
        String::new()
    } else {
        format!("-{cid}")
    };
    let mut set_base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .to_string();
    while c.raw["engines"]["sets"].get(&set_base).is_some() {
        set_base.push('x');
    }
    let grace = Duration::from_secs_f64(args.stop_timeout.max(0.0));
    let timeout = Duration::from_secs_f64(args.timeout.max(0.0));
    let plan = EnginePlan {
        args: &args,
        exe: &exe,
        engine_file: &engine_file,
        profile_dir: &profile_dir,
        cid: &cid,
        log_dir: &log_dir,
        id_part: &id_part,
        set_base: &set_base,
        n,
        grace,
    };
    if args.print_script {
        print!("{}", plan.describe()?);
        return Ok(());
    }
    let info: ClientConnectionInfo = serde_json::from_str(
        &std::fs::read_to_string(&client_file)
            .with_context(|| format!("reading {}", client_file.display()))?,
    )
    .with_context(|| format!("parsing {}", client_file.display()))?;
    let mut query = HubQuery::connect(&info, timeout).await?;
    let before = query
        .engines(Duration::from_secs(5))
        .await?
        .context("the hub did not answer")?
        .len();
    let target = before + n as usize;
    let mut sets = Vec::new();
    let write = |sets: &[EngineSet]| -> Result<()> {
        let mut raw = load_cluster(&cluster_file)?.raw;
        raw["engines"]["class"] = json!(args.engines.name());
        if !raw["engines"]["sets"].is_object() {
            raw["engines"]["sets"] = json!({});
        }
        for set in sets {
            raw["engines"]["sets"][&set.id] = set.to_value(&profile_dir, &cid);
        }
        // from the file as it was: written again after registration
        let total = c.raw["cluster"]["n"].as_u64().unwrap_or(0) + u64::from(n);
        raw["cluster"]["n"] = json!(total);
        write_json_atomic(&cluster_file, &raw)
    };
    let started = plan.start(&mut sets);
    let outcome: Result<usize> = async {
        started?;
        write(&sets)?;
        let poll_interval = Duration::from_secs_f64(args.poll_interval.max(0.05));
        let deadline = Instant::now() + timeout;
        loop {
            let registered = query
                .engines(Duration::from_millis(500))
                .await?
                .map_or(0, |e| e.len());
            if registered >= target {
                return Ok(registered);
            }
            for set in &mut sets {
                if let Some((member, st)) = set.poll(poll_interval) {
                    bail!(
                        "{} of {n} new engines registered, but {}",
                        registered.saturating_sub(before),
                        set_failure(set, member, &st)
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{} of {n} new engines registered within {timeout:?}",
                    registered.saturating_sub(before)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    .await;
    let outcome = match outcome {
        Ok(r) if args.engines == LauncherKind::SshProxy => {
            refresh_sets(&mut sets);
            write(&sets).map(|()| r)
        }
        other => other,
    };
    match outcome {
        Ok(registered) => {
            say!(
                "Added {n} engines to cluster {} in {:.2} s: {registered} registered",
                if cid.is_empty() {
                    "''".to_owned()
                } else {
                    cid.clone()
                },
                t0.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Err(e) => {
            for set in &mut sets {
                for err in set.stop() {
                    esay!("warning: stopping {err}");
                }
            }
            // put the cluster file back as it was
            let _ = write_json_atomic(&cluster_file, &c.raw);
            Err(e.context("adding engines failed; the new engines were stopped"))
        }
    }
}

fn system_delete_command(system: Option<&batch::BatchSystem>) -> String {
    system.map_or("the scheduler's delete command".into(), |s| {
        s.delete.join(" ")
    })
}

fn stop_command(profile_dir: &Path, cid: &str) -> String {
    let mut s = format!(
        "parallax cluster stop --profile-dir={}",
        profile_dir.display()
    );
    if !cid.is_empty() {
        s.push_str(&format!(" --cluster-id={cid}"));
    }
    s
}

// ------------------------------------------------------------------- stop

fn cluster_files_in(profile_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(profile_dir.join("security")) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .map(|f| f.to_string_lossy())
                .is_some_and(|f| f.starts_with("cluster-") && f.ends_with(".json"))
        })
        .collect();
    files.sort();
    files
}

fn stop(args: &StopArgs) -> Result<()> {
    let profile_dir = profile_dir(&args.profile);
    let files = if args.all {
        let files = cluster_files_in(&profile_dir);
        if files.is_empty() {
            say!("No clusters in {}", profile_dir.display());
        }
        files
    } else {
        let cid = cluster_id(&args.cluster_id);
        let file = cluster_file_path(&profile_dir, &cid);
        if !file.exists() {
            bail!(
                "no cluster {cid:?} in {} ({} does not exist; see parallax cluster list)",
                profile_dir.display(),
                file.display()
            );
        }
        vec![file]
    };
    let grace = Duration::from_secs_f64(args.stop_timeout.max(0.0));
    let mut failed = 0;
    for file in files {
        if let Err(e) = stop_cluster(&file, grace) {
            esay!("error: {e:#}");
            failed += 1;
        }
    }
    if failed > 0 {
        bail!("{failed} cluster(s) could not be stopped");
    }
    Ok(())
}

fn stop_cluster(file: &Path, grace: Duration) -> Result<()> {
    let c = load_cluster(file)?;
    let name = if c.cluster_id.is_empty() {
        "''".to_owned()
    } else {
        c.cluster_id.clone()
    };
    let mut engines: Vec<Proc> = c
        .engines
        .iter()
        .map(|(label, pid, _)| Proc {
            label: label.clone(),
            pid: *pid,
            child: None,
        })
        .collect();
    let live = engines.iter_mut().map(Proc::alive).filter(|a| *a).count();
    let hub_alive = c.hub_alive();
    say!(
        "Stopping cluster {name}: {live} engine(s){}",
        match (c.hub_pid, &c.hub_job, hub_alive) {
            (_, Some((class, st)), true) => format!(
                ", hub ({} {})",
                launcher_display_name(class),
                crate::cluster_controller::restore(class, st, grace)
                    .map_or_else(|| "launcher".to_owned(), |l| l.label())
            ),
            _ if c.hub_external => ", hub elsewhere (left running)".to_owned(),
            (Some(p), _, true) => format!(", hub (pid {p})"),
            _ => ", hub not running".to_owned(),
        }
    );
    let batch_system = LauncherKind::parse(&c.engine_class).and_then(LauncherKind::batch_system);
    let mut not_cancelled = Vec::new();
    if let Some(system) = batch_system {
        for (set_id, set) in &c.batch_sets {
            let Some(mut l) = ldriver::BatchLauncher::from_dict(system, set) else {
                continue;
            };
            l.grace = grace.max(Duration::from_secs(10));
            say!("Cancelling {} (engine set {set_id})", l.label());
            if let Err(e) = l.stop() {
                esay!("error: {e}");
                not_cancelled.push(l.label());
                continue;
            }
            for key in ["batch_file", "output_file"] {
                if let Some(f) = set.get(key).and_then(Value::as_str) {
                    let _ = std::fs::remove_file(f);
                }
            }
        }
    } else if !c.ssh_hosts.is_empty() {
        not_cancelled.extend(crate::cluster_ssh::stop_hosts(&c.ssh_hosts, grace));
        for e in &not_cancelled {
            esay!("error: {e}");
        }
    } else if c.unverifiable_engines > 0 {
        esay!(
            "warning: {} engine(s) of launcher {:?} have no pid here; stop them with their launcher",
            c.unverifiable_engines,
            c.engine_class
        );
    }
    // the zygote(s) the engines use, named on their command lines
    let sockets = zygote_sockets(
        &engines
            .iter()
            .filter(|p| pid_alive(p.pid) && looks_like_cluster_process(p.pid))
            .map(|p| p.pid)
            .collect::<Vec<_>>(),
    );
    let zygotes: Vec<(i64, PathBuf, PathBuf)> = zygotes_of(&sockets, &c.file)
        .into_iter()
        .map(|(pid, socket)| {
            let id_part = if c.cluster_id.is_empty() {
                String::new()
            } else {
                format!("-{}", c.cluster_id)
            };
            let log = zygote_log_path(&c.profile_dir.join("log"), &id_part, &socket);
            (pid, socket, log)
        })
        .collect();
    // what the engines started (an mpiexec's ranks, an engine's Python)
    // goes with them, even if they have to be killed
    // — but for a host zygote (an engine of the set started it), which
    // leaves on its own after the engines and is waited for
    let (host_zygotes, tree) = ldriver::split_host_zygotes(
        engines
            .iter()
            .filter(|p| pid_alive(p.pid) && looks_like_cluster_process(p.pid))
            .flat_map(|p| ldriver::descendants(p.pid))
            .collect(),
    );
    let tops: Vec<i64> = engines.iter().map(|p| p.pid).collect();
    ldriver::stop_engines_among(&tree, &tops, &mut || {});
    let mut killed = terminate(&mut engines, grace);
    let mut left: Vec<Proc> = tree
        .into_iter()
        .filter(|p| pid_alive(*p))
        .map(|pid| Proc {
            label: "engine descendant".into(),
            pid,
            child: None,
        })
        .collect();
    for p in &left {
        p.signal(libc::SIGKILL);
        killed.push(format!("{} (pid {})", p.label, p.pid));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while left.iter_mut().any(Proc::alive) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    ldriver::await_host_zygotes(&host_zygotes);
    for (pid, socket, log) in &zygotes {
        let mut z = [Proc {
            label: "zygote".into(),
            pid: *pid,
            child: None,
        }];
        killed.extend(terminate(&mut z, grace));
        for f in [socket, log] {
            let _ = std::fs::remove_file(f);
        }
    }
    // the socket of a zygote that was killed (it removes its own on SIGTERM)
    for s in &sockets {
        let _ = std::fs::remove_file(s);
    }
    if let Some(pid) = c.hub_pid {
        let mut hub = [Proc {
            label: "hub".into(),
            pid,
            child: None,
        }];
        let hub_killed = terminate(&mut hub, grace);
        if !hub_killed.is_empty() {
            // A killed hub leaves its connection files behind.
            let (client, engine) = connection_file_names(&c.cluster_id);
            for f in [client, engine] {
                let _ = std::fs::remove_file(c.profile_dir.join("security").join(f));
            }
        }
        killed.extend(hub_killed);
    }
    if let Some((class, state)) = &c.hub_job
        && let Some(mut l) = crate::cluster_controller::restore(class, state, grace)
    {
        say!("Cancelling the hub's {}", l.label());
        if let Err(e) = l.stop() {
            esay!("error: {e}");
            not_cancelled.push(format!("the hub's {}", l.label()));
        }
        // a hub whose job was cancelled may not have removed its files
        let (client, engine) = connection_file_names(&c.cluster_id);
        for f in [client, engine] {
            let _ = std::fs::remove_file(c.profile_dir.join("security").join(f));
        }
    }
    for k in &killed {
        esay!("warning: {k} did not stop after SIGTERM; killed");
    }
    if !not_cancelled.is_empty() {
        // the file is what still knows the jobs: keep it for another try
        bail!(
            "{} may still be running (see the error above); {} is kept, run stop again where {} works",
            not_cancelled.join(", "),
            c.file.display(),
            if c.ssh_hosts.is_empty() {
                system_delete_command(batch_system)
            } else {
                "ssh to the hosts".to_owned()
            }
        );
    }
    std::fs::remove_file(&c.file).or_else(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Ok(())
        } else {
            Err(e)
        }
    })?;
    for log in c
        .hub_log
        .iter()
        .chain(c.engines.iter().filter_map(|(_, _, l)| l.as_ref()))
    {
        let _ = std::fs::remove_file(log);
    }
    say!("Stopped cluster {name}");
    Ok(())
}

// ----------------------------------------------------------------- signal

/// `parallax cluster signal`: the signal to every engine set the cluster
/// file knows, each through its launcher.
fn signal_engines(args: &SignalArgs) -> Result<()> {
    let profile_dir = profile_dir(&args.profile);
    let cid = cluster_id(&args.cluster_id);
    let (_, c) = load_named_cluster(&profile_dir, &cid, "cluster")?;
    let sig = args.signal;
    let mut sent = Vec::new();
    let mut failed = Vec::new();
    for (label, pid, _) in &c.engines {
        // local engine processes (an mpiexec forwards it to its ranks); the
        // local ssh clients of ssh sets are signalled through their hosts
        if label.starts_with("ssh ") || !pid_alive(*pid) {
            continue;
        }
        if !looks_like_cluster_process(*pid) {
            esay!(
                "warning: pid {pid} ({label}) is not an engine process any more; not signalling it"
            );
            continue;
        }
        Proc {
            label: label.clone(),
            pid: *pid,
            child: None,
        }
        .signal(sig);
        sent.push(format!("{label} (pid {pid})"));
    }
    if let Some(system) = LauncherKind::parse(&c.engine_class).and_then(LauncherKind::batch_system)
    {
        for (_, set) in &c.batch_sets {
            if let Some(mut l) = ldriver::BatchLauncher::from_dict(system, set) {
                match l.signal(sig) {
                    Ok(()) => sent.push(l.label()),
                    Err(e) => failed.push(format!("{}: {e}", l.label())),
                }
            }
        }
    }
    for h in &c.ssh_hosts {
        if let Some(mut l) = crate::cluster_ssh::restore_host(h, Duration::from_secs(5)) {
            match l.signal(sig) {
                Ok(()) => sent.push(l.label()),
                Err(e) => failed.push(format!("{}: {e}", l.label())),
            }
        }
    }
    for f in &failed {
        esay!("error: {f}");
    }
    if sent.is_empty() {
        bail!(
            "no engine of cluster {cid:?} took signal {sig}{}",
            if failed.is_empty() {
                " (none is running)"
            } else {
                ""
            }
        );
    }
    say!("Sent signal {sig} to {}", sent.join(", "));
    if !failed.is_empty() {
        bail!("{} engine set(s) could not be signalled", failed.len());
    }
    Ok(())
}

// ------------------------------------------------------------------- list

fn list(args: &ListArgs) -> Result<()> {
    let ipy = ipython_dir(&args.profile);
    let profile_dirs: Vec<PathBuf> =
        if args.profile.profile_dir.is_some() || args.profile.profile.is_some() {
            vec![profile_dir(&args.profile)]
        } else {
            let mut dirs: Vec<PathBuf> = std::fs::read_dir(&ipy)
                .map(|entries| {
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .filter(|e| e.file_name().to_string_lossy().starts_with("profile_"))
                        .map(|e| abspath(&e.path()))
                        .collect()
                })
                .unwrap_or_default();
            if let Some(p) = env_var("IPP_PROFILE_DIR").filter(|p| !p.is_empty()) {
                dirs.push(abspath(Path::new(&p)));
            }
            dirs.sort();
            dirs.dedup();
            dirs
        };
    let mut clusters = Vec::new();
    for dir in &profile_dirs {
        for file in cluster_files_in(dir) {
            match load_cluster(&file) {
                Ok(c) if c.is_stale() => {
                    // Like ipyparallel: a cluster with nothing running is forgotten.
                    let _ = std::fs::remove_file(&file);
                }
                Ok(c) => clusters.push(c),
                Err(e) => esay!(
                    "warning: failed to load cluster from {}: {e:#}",
                    file.display()
                ),
            }
        }
    }
    clusters.sort_by(|a, b| (&a.profile_dir, &a.cluster_id).cmp(&(&b.profile_dir, &b.cluster_id)));
    match args.output_format {
        OutputFormat::Json => {
            let all: Vec<&Value> = clusters.iter().map(|c| &c.raw).collect();
            say!("{}", serde_json::to_string(&all)?);
        }
        OutputFormat::Text => {
            say!(
                "{:16} {:32} {:7} {:7} {:10} JOBS",
                "PROFILE",
                "CLUSTER ID",
                "RUNNING",
                "ENGINES",
                "LAUNCHER"
            );
            for c in &clusters {
                let profile = abbreviate_profile_dir(&c.profile_dir, &ipy);
                let id = if c.cluster_id.is_empty() {
                    "''".to_owned()
                } else {
                    c.cluster_id.clone()
                };
                let running = if c.hub_alive() { "True" } else { "False" };
                let engines = c.engines_alive() + c.unverifiable_engines;
                say!(
                    "{profile:16} {id:32} {running:7} {engines:7} {:10} {}",
                    c.launcher_name(),
                    job_states(c)
                );
            }
        }
    }
    Ok(())
}

/// `hub job 11 RUNNING, job 12 PENDING (Resources)`: the state of each
/// job the cluster file knows (hub and engine sets), `-` if none.
fn job_states(c: &LoadedCluster) -> String {
    let mut out = Vec::new();
    if let Some((class, state)) = &c.hub_job
        && let Some(mut l) = crate::cluster_controller::restore(class, state, Duration::ZERO)
        && class != "mpi"
    {
        let st = l
            .poll()
            .map_or_else(|e| format!("unknown ({e})"), |s| s.describe());
        out.push(format!("hub {} {st}", l.label()));
    }
    if let Some(system) = LauncherKind::parse(&c.engine_class).and_then(LauncherKind::batch_system)
    {
        for (_, set) in &c.batch_sets {
            if let Some(mut l) = ldriver::BatchLauncher::from_dict(system, set) {
                let st = l
                    .poll()
                    .map_or_else(|e| format!("unknown ({e})"), |s| s.describe());
                out.push(format!("{} {st}", l.label()));
            }
        }
    }
    if out.is_empty() {
        "-".into()
    } else {
        out.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(parse_signal("INT"), Ok(libc::SIGINT));
        assert_eq!(parse_signal("sigterm"), Ok(libc::SIGTERM));
        assert_eq!(parse_signal("SIGUSR1"), Ok(libc::SIGUSR1));
        assert_eq!(parse_signal("9"), Ok(9));
        assert!(parse_signal("0").is_err());
        assert!(
            parse_signal("SIGFOO")
                .unwrap_err()
                .contains("unknown signal")
        );
    }

    #[test]
    fn cluster_file_round_trip() {
        let state = ClusterState {
            profile_dir: "/p/profile_x".into(),
            cluster_id: "abc".into(),
            n: 2,
            hub_args: vec!["--scheme=lru".into()],
            hub: (100, "/p/profile_x/log/hub.log".into()),
            controller: None,
            controller_ip: String::new(),
            controller_location: String::new(),
            engine_class: "local",
            sets: [(
                "1700000000".to_owned(),
                json!({"cluster_id": "abc", "n": 2, "pid": -1, "profile_dir": "/p/profile_x",
                       "state": "running", "engines": {
                    "0": launcher_state(Path::new("/p/profile_x"), "abc", 101, Path::new("/l/e0.log"), Some(1)),
                    "1": launcher_state(Path::new("/p/profile_x"), "abc", 102, Path::new("/l/e1.log"), Some(1)),
                }}),
            )]
            .into_iter()
            .collect(),
        };
        let v = state.to_value();
        // The fields ipyparallel's Cluster.to_dict() writes, and no others.
        assert_eq!(v["cluster"]["class"], "ipyparallel.cluster.cluster.Cluster");
        assert_eq!(v["cluster"]["delay"], 1.0);
        assert_eq!(v["controller"]["class"], "local");
        assert_eq!(
            v["controller"]["state"],
            json!({"cluster_id": "abc", "output_file": "/p/profile_x/log/hub.log",
                   "pid": 100, "profile_dir": "/p/profile_x", "state": "running"})
        );
        let set = &v["engines"]["sets"]["1700000000"];
        assert_eq!(set["n"], 2);
        assert_eq!(set["pid"], -1);
        assert_eq!(set["engines"]["1"]["pid"], 102);
        assert_eq!(set["engines"]["1"]["n"], 1);

        let c = parse_cluster(Path::new("/p/profile_x/security/cluster-abc.json"), v).unwrap();
        assert_eq!(c.cluster_id, "abc");
        assert_eq!(c.hub_pid, Some(100));
        assert_eq!(c.engines.len(), 2);
        assert_eq!(c.engines[0].1, 101);
        assert_eq!(c.engines[1].2.as_deref(), Some(Path::new("/l/e1.log")));
        assert_eq!(c.launcher_name(), "Local");
    }

    #[test]
    fn zygote_plans() {
        let python = |argv: &[&str]| zygote_plan(&start_args(argv)).map(|(p, _)| p);
        assert_eq!(python(&["-n", "2"]), Some("python3".into()));
        assert_eq!(
            python(&["--engine-args=--python=/v/bin/python3 --id=3"]),
            Some("/v/bin/python3".into())
        );
        assert_eq!(
            python(&["--engine-args", "--python /v/bin/python3"]),
            Some("/v/bin/python3".into())
        );
        assert_eq!(python(&["--zygote=false"]), None);
        assert_eq!(python(&["--engine-args=--language=rust"]), None);
        assert_eq!(python(&["--engine-args=--zygote=/x.sock"]), None);
        assert_eq!(python(&["--engines=mpi"]), None);
        let (_, socket) = zygote_plan(&start_args(&[])).unwrap();
        assert!(socket.to_string_lossy().ends_with(".sock"));
        let log = zygote_log_path(Path::new("/p/log"), "-abc", &socket);
        let name = log.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with("parallax-zygote-") && name.ends_with("-abc.log"),
            "{name}"
        );
    }

    #[test]
    fn launched_engines_share_a_host_zygote() {
        let host = |argv: &[&str]| host_zygote(&start_args(argv));
        for kind in ["mpi", "slurm", "pbs", "sge", "lsf", "htcondor", "ssh"] {
            assert!(host(&["--engines", kind]), "{kind}");
        }
        // local engines added to a running cluster share a host zygote;
        // those `start` runs get its zygote instead (in their engine args);
        // sshproxy's remote `cluster engines` decides for its own launcher
        assert!(host(&["--engines=local"]));
        assert!(!host(&[
            "--engines=local",
            "--engine-args=--zygote=/z.sock"
        ]));
        assert!(!host(&["--engines=sshproxy"]));
        assert!(!host(&["--engines=mpi", "--zygote=false"]));
        assert!(!host(&["--engines=mpi", "--engine-args=--language=rust"]));
        assert!(!host(&[
            "--engines=mpi",
            "--engine-args=--host-zygote=false"
        ]));
        assert!(!host(&["--engines=mpi", "--engine-args=--zygote=/x.sock"]));
        assert!(host(&[
            "--engines=mpi",
            "--engine-args=--python=/v/bin/python3"
        ]));
    }

    #[test]
    fn batch_launcher_sets_are_unverifiable() {
        let v = json!({"cluster": {"cluster_id": "", "profile_dir": "/p"},
                       "controller": {"class": "slurm", "state": {"job_id": "9"}},
                       "engines": {"class": "slurm", "sets": {"1": {"n": 8, "job_id": "10"}}}});
        let c = parse_cluster(Path::new("/p/security/cluster-.json"), v).unwrap();
        assert_eq!(c.hub_pid, None);
        assert_eq!(c.unverifiable_engines, 8);
        assert_eq!(c.batch_sets.len(), 1);
        assert_eq!(c.batch_sets[0].1["job_id"], "10");
        assert!(!c.is_stale());
        assert_eq!(c.launcher_name(), "Slurm");
        assert_eq!(
            launcher_display_name("my.module:FancyEngineSetLauncher"),
            "Fancy"
        );
    }

    #[test]
    fn cluster_process_cmdlines() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(cmdline_is_cluster_process(&v(&[
            "/x/parallax",
            "hub",
            "--profile-dir=/p"
        ])));
        assert!(cmdline_is_cluster_process(&v(&[
            "parallax",
            "engine",
            "--file=/f"
        ])));
        assert!(cmdline_is_cluster_process(&v(&[
            "/v/bin/python",
            "-m",
            "ipyparallel.engine"
        ])));
        assert!(cmdline_is_cluster_process(&v(&[
            "/usr/bin/python3",
            "/v/bin/ipcontroller"
        ])));
        assert!(!cmdline_is_cluster_process(&v(&["/x/parallax", "kernel"])));
        assert!(cmdline_is_cluster_process(&v(&[
            "mpiexec",
            "-n",
            "4",
            "/x/parallax",
            "engine",
            "--file=/f"
        ])));
        assert!(!cmdline_is_cluster_process(&v(&[
            "mpiexec", "-n", "4", "python"
        ])));
        assert!(!cmdline_is_cluster_process(&v(&["sleep", "100"])));
        assert!(!cmdline_is_cluster_process(&[]));
    }

    #[test]
    fn paths() {
        assert_eq!(abspath(Path::new("/a/./b/../c")), Path::new("/a/c"));
        assert_eq!(
            cluster_file_path(Path::new("/p"), ""),
            Path::new("/p/security/cluster-.json")
        );
        assert_eq!(
            abbreviate_profile_dir(
                Path::new("/h/.ipython/profile_foo"),
                Path::new("/h/.ipython")
            ),
            "foo"
        );
        assert_eq!(
            abbreviate_profile_dir(Path::new("/tmp/prof"), Path::new("/h/.ipython")),
            "/tmp/prof"
        );
        assert_eq!(
            split_args(&["--a=1  --b".into(), "c".into()]),
            ["--a=1", "--b", "c"]
        );
    }

    fn start_args(argv: &[&str]) -> StartArgs {
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            a: StartArgs,
        }
        <T as clap::Parser>::try_parse_from(std::iter::once("start").chain(argv.iter().copied()))
            .unwrap()
            .a
    }

    #[test]
    fn engine_plans() {
        let args = start_args(&[
            "-n",
            "5",
            "--engines",
            "SLURM",
            "--engines-per-job",
            "2",
            "--queue",
            "q",
        ]);
        assert_eq!(args.engines, LauncherKind::Slurm);
        let plan = EnginePlan {
            args: &args,
            exe: Path::new("/bin/parallax"),
            engine_file: Path::new("/p/security/ipcontroller-engine.json"),
            profile_dir: Path::new("/p"),
            cid: "",
            log_dir: Path::new("/p/log"),
            id_part: "",
            set_base: "100",
            n: 5,
            grace: Duration::from_secs(1),
        };
        let jobs = plan.batch_jobs(&parallax_launch::slurm::SYSTEM).unwrap();
        let shape: Vec<(&str, u32)> = jobs.iter().map(|(id, j)| (id.as_str(), j.n)).collect();
        assert_eq!(shape, [("100-0", 2), ("100-1", 2), ("100-2", 1)]);
        assert_eq!(
            jobs[0].1.program_args,
            [
                "--file=/p/security/ipcontroller-engine.json",
                "--n-engines=5",
                "--host-zygote"
            ]
        );
        assert_eq!(jobs[2].1.output_file, "/p/log/parallax-engines-100-2.log");
        let text = plan.describe().unwrap();
        assert_eq!(text.matches("#SBATCH --partition=q").count(), 3);
        assert!(text.contains("# --- job for engine set 100-2 (1 engines)"));

        let args = start_args(&[
            "-n",
            "3",
            "--engines",
            "mpi",
            "--mpi-cmd",
            "mpiexec.mpich",
            "--mpi-args=-l",
        ]);
        let plan = EnginePlan {
            args: &args,
            n: 3,
            ..plan
        };
        assert_eq!(
            plan.describe().unwrap(),
            "mpiexec.mpich -n 3 -l /bin/parallax engine --file=/p/security/ipcontroller-engine.json --n-engines=3 --host-zygote\n"
        );
        assert!(parse_launcher("torque").unwrap_err().contains("slurm"));
    }

    #[test]
    fn own_pid_is_alive_and_bogus_pids_are_not() {
        assert!(pid_alive(std::process::id() as i64));
        assert!(!pid_alive(-1));
        assert!(!pid_alive(0));
        assert!(!pid_alive(i64::MAX));
    }
}
