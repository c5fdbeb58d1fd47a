//! The I/O side: running scheduler commands with timeouts, spawning and
//! stopping processes, and [`Launcher`] for a process (`local`, `mpi`) and
//! a batch job. Everything that decides (command lines, scripts, parsing)
//! is in the pure modules.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::batch::BatchJob;
use crate::ssh::SshHost;
use crate::template::shell_join;
use crate::{JobState, LaunchError, Launcher, LauncherKind};

pub mod ssh_hub;
pub mod ssh_proxy;

/// What a command printed.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `argv` (stdin from `input`, or /dev/null), waits at most `timeout`
/// (then kills it). A command that cannot start is an error; a non-zero
/// exit is not (the caller reads `success`).
pub fn run_command(
    argv: &[String],
    input: Option<&str>,
    timeout: Duration,
) -> Result<CommandOutput, LaunchError> {
    run_command_with_env(argv, input, timeout, &[])
}

/// [`run_command`] with variables added to its environment (never the
/// command line: they may hold a key).
pub fn run_command_with_env(
    argv: &[String],
    input: Option<&str>,
    timeout: Duration,
    env: &[(String, String)],
) -> Result<CommandOutput, LaunchError> {
    let command = shell_join(argv);
    let (exe, args) = argv
        .split_first()
        .ok_or_else(|| LaunchError::Other("empty command".into()))?;
    let mut child = Command::new(exe)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| LaunchError::Command {
            command: command.clone(),
            detail: e.to_string(),
        })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        let text = text.to_owned();
        std::thread::spawn(move || {
            let _ = stdin.write_all(text.as_bytes());
        });
    }
    let reader = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut s);
            }
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = reader(child.stdout.take().map(|s| Box::new(s) as _));
    let err = reader(child.stderr.take().map(|s| Box::new(s) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(LaunchError::Timeout {
                command,
                seconds: timeout.as_secs_f64(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(CommandOutput {
        success: status.success(),
        code: status.code(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Is `pid` a live process (not a zombie)?
pub fn pid_alive(pid: i64) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence/permission.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_none_or(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// Every live descendant of `pid` (from /proc; empty where there is none).
pub fn descendants(pid: i64) -> Vec<i64> {
    let mut parent_of: Vec<(i64, i64)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i64>().ok()) else {
                continue;
            };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat"))
                && let Some((_, rest)) = stat.rsplit_once(')')
                && let Some(ppid) = rest.split_whitespace().nth(1).and_then(|s| s.parse().ok())
            {
                parent_of.push((p, ppid));
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(q) = frontier.pop() {
        for &(p, pp) in &parent_of {
            if pp == q && !out.contains(&p) {
                out.push(p);
                frontier.push(p);
            }
        }
    }
    out
}

fn kill(pid: i64, sig: i32) {
    if let Ok(p) = i32::try_from(pid)
        && p > 0
    {
        // SAFETY: plain kill(2).
        unsafe {
            libc::kill(p, sig);
        }
    }
}

/// SIGTERM `pid` (which forwards it, as mpiexec does, or exits), wait up to
/// `grace` for it and every descendant it had, SIGKILL what is left and
/// wait again. `reap` collects our own child. Returns whether SIGKILL was
/// needed.
///
/// A host zygote among the descendants (an engine started it, see
/// `parallax_engine::host_zygote`) and the interpreters it forked are never
/// signalled: engines of another set of the cluster on this host may still
/// use them. The zygote kills our engines' interpreters when they leave
/// and exits on its own after the last; that is waited for (at most
/// [`HOST_ZYGOTE_PATIENCE`]).
pub fn terminate_tree(pid: i64, grace: Duration, mut reap: impl FnMut()) -> bool {
    let (zygotes, mut tree) = split_host_zygotes(descendants(pid));
    stop_engines_among(&tree, &[pid], &mut reap);
    tree.push(pid);
    kill(pid, libc::SIGTERM);
    let all_gone = |tree: &[i64], reap: &mut dyn FnMut()| {
        reap();
        tree.iter().all(|p| !pid_alive(*p))
    };
    let deadline = Instant::now() + grace;
    while !all_gone(&tree, &mut reap) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed = !all_gone(&tree, &mut reap);
    if killed {
        // what the process started since (or reparented) is gone with it
        tree.extend(descendants(pid).into_iter().filter(|p| !is_host_zygote(*p)));
        for p in &tree {
            kill(*p, libc::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !all_gone(&tree, &mut reap) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    await_host_zygotes(&zygotes);
    killed
}

/// How long a stop waits for a host zygote to leave after its engines.
pub const HOST_ZYGOTE_PATIENCE: Duration = Duration::from_secs(2);

/// `pids` split into (host zygotes and the interpreters they forked, the
/// rest): a stop signals only the rest.
pub fn split_host_zygotes(pids: Vec<i64>) -> (Vec<i64>, Vec<i64>) {
    pids.into_iter().partition(|p| is_host_zygote(*p))
}

/// Wait (at most [`HOST_ZYGOTE_PATIENCE`]) for host zygotes whose engines
/// were stopped to leave on their own; one that stays serves engines of
/// another set and is left to them.
pub fn await_host_zygotes(zygotes: &[i64]) {
    let deadline = Instant::now() + HOST_ZYGOTE_PATIENCE;
    while zygotes.iter().any(|p| pid_alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `/proc/PID/cmdline` is a host zygote's (or an interpreter it forked,
/// which keeps its command line): `… --parallax-zygote SOCKET --host-lock
/// LOCK`.
pub fn is_host_zygote(pid: i64) -> bool {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
    args.contains(&b"--parallax-zygote".as_slice()) && args.contains(&b"--host-lock".as_slice())
}

/// Stops the Parallax engines among `tree` (a launcher's local ranks)
/// before their launchers (`tops`) are signalled: SIGTERM to each engine,
/// at most a second for them to leave their hub, then at most half a
/// second for the launchers to end on their own. Through the launcher
/// alone they waited for it to pass the signal on, and an mpiexec whose
/// ranks were ending as its own SIGTERM came took 2 s more to exit
/// (OpenMPI 4.1, 64 ranks: `cluster stop` 2.1 s; ipcluster's 2.3 s). Engines
/// still running past the second (a long cell) get the launcher's signal
/// as before.
pub fn stop_engines_among(tree: &[i64], tops: &[i64], reap: &mut dyn FnMut()) {
    let engines: Vec<i64> = tree
        .iter()
        .copied()
        .filter(|p| is_parallax_engine(*p))
        .collect();
    if engines.is_empty() {
        return;
    }
    for p in &engines {
        kill(*p, libc::SIGTERM);
    }
    let wait = |pids: &[i64], limit: Duration, reap: &mut dyn FnMut()| {
        let deadline = Instant::now() + limit;
        loop {
            reap();
            if !pids.iter().any(|p| pid_alive(*p)) || Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait(&engines, Duration::from_secs(1), reap);
    wait(tops, Duration::from_millis(500), reap);
}

/// `/proc/PID/cmdline` is `…/parallax… engine …`.
pub fn is_parallax_engine(pid: i64) -> bool {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut args = raw.split(|b| *b == 0);
    let argv0 = args.next().unwrap_or_default();
    let base = argv0.rsplit(|b| *b == b'/').next().unwrap_or_default();
    base.starts_with(b"parallax") && args.next() == Some(b"engine".as_slice())
}

/// Runs `argv` (an ssh command line) in its own session — no terminal, so
/// ssh can never stop to ask for a password, and a terminal's signals do
/// not reach it — with `script` on its stdin, written from a thread (a short
/// script fits the pipe; an ssh that died early shows in its exit). Its
/// stderr, and its stdout unless `capture_stdout` (then the caller reads
/// it), are appended to `log`.
pub(crate) fn spawn_ssh_with_script(
    argv: &[String],
    script: String,
    log: &Path,
    capture_stdout: bool,
) -> Result<Child, LaunchError> {
    let (mut cmd, out) = session_command(argv, log)?;
    cmd.stdin(Stdio::piped());
    if capture_stdout {
        cmd.stdout(Stdio::piped());
    } else {
        cmd.stdout(out);
    }
    let mut child = spawn(cmd, argv)?;
    if let Some(mut stdin) = child.stdin.take() {
        std::thread::spawn(move || {
            let _ = stdin.write_all(script.as_bytes());
        });
    }
    Ok(child)
}

/// Spawns `argv` in a new session (a terminal's signals do not reach it),
/// stdin /dev/null, stdout and stderr appended to `log`, `env` added.
pub fn spawn_in_session(
    argv: &[String],
    env: &[(String, String)],
    log: &Path,
) -> Result<Child, LaunchError> {
    let (mut cmd, out) = session_command(argv, log)?;
    cmd.envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out);
    spawn(cmd, argv)
}

/// `argv` as a command that starts its own session, its stderr appended to
/// `log`; the log, opened, for the caller's stdout.
fn session_command(argv: &[String], log: &Path) -> Result<(Command, std::fs::File), LaunchError> {
    use std::os::unix::process::CommandExt;
    let (exe, args) = argv
        .split_first()
        .ok_or_else(|| LaunchError::Other("empty command".into()))?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut cmd = Command::new(exe);
    cmd.args(args).stderr(out.try_clone()?);
    // SAFETY: setsid is async-signal-safe; nothing else runs between fork
    // and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    Ok((cmd, out))
}

fn spawn(mut cmd: Command, argv: &[String]) -> Result<Child, LaunchError> {
    cmd.spawn().map_err(|e| LaunchError::Command {
        command: shell_join(argv),
        detail: e.to_string(),
    })
}

// ---------------------------------------------------------------- process

/// One local process: a single engine (`local`) or an `mpiexec` running N
/// (`mpi`).
pub struct ProcessLauncher {
    pub kind: LauncherKind,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub profile_dir: String,
    pub cluster_id: String,
    pub output_file: PathBuf,
    pub n: u32,
    pub grace: Duration,
    pub pid: i64,
    child: Option<Child>,
    state: &'static str,
}

impl ProcessLauncher {
    pub fn new(
        kind: LauncherKind,
        argv: Vec<String>,
        profile_dir: &str,
        cluster_id: &str,
        output_file: PathBuf,
        grace: Duration,
    ) -> ProcessLauncher {
        ProcessLauncher {
            kind,
            argv,
            env: Vec::new(),
            profile_dir: profile_dir.to_owned(),
            cluster_id: cluster_id.to_owned(),
            output_file,
            n: 0,
            grace,
            pid: -1,
            child: None,
            state: "before",
        }
    }

    /// A launcher restored from a cluster file, to stop what it started.
    pub fn from_dict(kind: LauncherKind, d: &Value, grace: Duration) -> ProcessLauncher {
        let s = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        let mut l = ProcessLauncher::new(
            kind,
            Vec::new(),
            &s("profile_dir"),
            &s("cluster_id"),
            PathBuf::from(s("output_file")),
            grace,
        );
        l.pid = d.get("pid").and_then(Value::as_i64).unwrap_or(-1);
        l.n = d.get("n").and_then(Value::as_u64).unwrap_or(1) as u32;
        l.state = "running";
        l
    }

    /// The exit status, once it exited (our child only).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }
}

impl Launcher for ProcessLauncher {
    fn start(&mut self, n: u32) -> Result<(), LaunchError> {
        self.n = n;
        let child = spawn_in_session(&self.argv, &self.env, &self.output_file)?;
        self.pid = i64::from(child.id());
        self.child = Some(child);
        self.state = "running";
        Ok(())
    }

    fn poll(&mut self) -> Result<JobState, LaunchError> {
        let running = match &mut self.child {
            Some(c) => c.try_wait()?.is_none(),
            None => pid_alive(self.pid),
        };
        if running {
            return Ok(JobState::Running {
                state: "running".into(),
            });
        }
        self.state = "after";
        Ok(match self.exit_status() {
            Some(s) if s.success() => JobState::Done {
                state: "exited".into(),
            },
            Some(s) => JobState::Failed {
                state: "exited".into(),
                reason: s.to_string(),
            },
            None => JobState::Done {
                state: "exited".into(),
            },
        })
    }

    fn signal(&mut self, sig: i32) -> Result<(), LaunchError> {
        kill(self.pid, sig);
        Ok(())
    }

    fn stop(&mut self) -> Result<(), LaunchError> {
        if self.pid > 0 {
            let child = &mut self.child;
            terminate_tree(self.pid, self.grace, || {
                if let Some(c) = child.as_mut() {
                    let _ = c.try_wait();
                }
            });
        }
        self.state = "after";
        Ok(())
    }

    fn to_dict(&self) -> Value {
        crate::local::process_dict(
            &self.profile_dir,
            &self.cluster_id,
            self.pid,
            &self.output_file.to_string_lossy(),
            self.state,
            Some(self.n),
        )
    }

    fn label(&self) -> String {
        let prog = self.argv.first().map_or("process".into(), |a| {
            Path::new(a)
                .file_name()
                .map_or(a.clone(), |f| f.to_string_lossy().into_owned())
        });
        format!("{prog} (pid {})", self.pid)
    }
}

// ------------------------------------------------------------------ batch

/// A job of a batch system.
pub struct BatchLauncher {
    pub job: BatchJob,
    /// Where the script is written (the profile directory, like ipcluster).
    pub script_path: PathBuf,
    /// Limit for each scheduler command.
    pub command_timeout: Duration,
    /// How long `stop` waits for the job to leave the queue.
    pub grace: Duration,
    pub job_id: Option<String>,
    /// Added to the submit command's environment (jobs that export the
    /// submitter's environment pass it on to the engines).
    pub env: Vec<(String, String)>,
    state: &'static str,
}

impl BatchLauncher {
    pub fn new(job: BatchJob, script_path: PathBuf) -> BatchLauncher {
        BatchLauncher {
            job,
            script_path,
            command_timeout: Duration::from_secs(30),
            grace: Duration::from_secs(30),
            job_id: None,
            env: Vec::new(),
            state: "before",
        }
    }

    /// A launcher restored from a cluster file (its `job_id`), to poll or
    /// stop the job.
    pub fn from_dict(
        system: &'static crate::batch::BatchSystem,
        d: &Value,
    ) -> Option<BatchLauncher> {
        let s = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        let job_id = s("job_id");
        if job_id.is_empty() {
            return None;
        }
        let job = BatchJob {
            system,
            options: crate::batch::BatchOptions {
                queue: s("queue"),
                ..Default::default()
            },
            n: d.get("n").and_then(Value::as_u64).unwrap_or(1) as u32,
            profile_dir: s("profile_dir"),
            cluster_id: s("cluster_id"),
            output_file: s("output_file"),
            program: Vec::new(),
            program_args: Vec::new(),
        };
        let mut l = BatchLauncher::new(job, PathBuf::new());
        l.job_id = Some(job_id);
        l.state = "running";
        Some(l)
    }

    fn run(&self, argv: &[String], input: Option<&str>) -> Result<CommandOutput, LaunchError> {
        run_command(argv, input, self.command_timeout)
    }

    /// The job's state as a state command reports it; `None` when none
    /// knows the job (it left the queue — or the commands do not work here).
    pub fn poll_known(&self) -> Result<Option<JobState>, LaunchError> {
        let id = self.job_id()?.to_owned();
        let sys = self.job.system;
        for argv in (sys.state_commands)(&id) {
            // a command that is missing (no accounting) or fails is skipped
            let Ok(out) = self.run(&argv, None) else {
                continue;
            };
            if let Some(s) = (sys.parse_state)(&id, &out.stdout) {
                return Ok(Some(s));
            }
        }
        Ok(None)
    }

    fn job_id(&self) -> Result<&str, LaunchError> {
        self.job_id
            .as_deref()
            .ok_or_else(|| LaunchError::Other("no job submitted".into()))
    }
}

impl Launcher for BatchLauncher {
    fn start(&mut self, n: u32) -> Result<(), LaunchError> {
        use std::os::unix::fs::PermissionsExt;
        self.job.n = n;
        let script = self.job.script()?;
        std::fs::write(&self.script_path, &script)?;
        std::fs::set_permissions(&self.script_path, std::fs::Permissions::from_mode(0o700))?;
        let path = self.script_path.to_string_lossy().into_owned();
        let argv = self.job.submit_argv(&path);
        let input = self.job.system.submit_via_stdin.then_some(script.as_str());
        let out = run_command_with_env(&argv, input, self.command_timeout, &self.env);
        // the scheduler keeps its own copy of a submitted script (sbatch,
        // qsub and bsub read it at submission): nothing to leave behind
        let _ = std::fs::remove_file(&self.script_path);
        let out = out?;
        let command = shell_join(&argv);
        if !out.success {
            return Err(LaunchError::Command {
                command,
                detail: format!(
                    "exit code {}: {}",
                    out.code.map_or("?".into(), |c| c.to_string()),
                    out.stderr.trim()
                ),
            });
        }
        let id = (self.job.system.parse_job_id)(&out.stdout).ok_or(LaunchError::JobId {
            command,
            output: out.stdout.clone(),
        })?;
        self.job_id = Some(id);
        self.state = "running";
        Ok(())
    }

    fn poll(&mut self) -> Result<JobState, LaunchError> {
        Ok(self
            .poll_known()?
            .unwrap_or_else(|| (self.job.system.gone_state)()))
    }

    fn signal(&mut self, sig: i32) -> Result<(), LaunchError> {
        let id = self.job_id()?.to_owned();
        if self.job.system.signal.is_empty() {
            return Err(LaunchError::Other(format!(
                "{} has no command to signal a job",
                self.job.system.kind.display_name()
            )));
        }
        let argv = self.job.system.signal_argv(&sig.to_string(), &id);
        let out = self.run(&argv, None)?;
        if !out.success {
            return Err(LaunchError::Command {
                command: shell_join(&argv),
                detail: out.stderr.trim().to_owned(),
            });
        }
        Ok(())
    }

    /// Deletes the job and waits (up to `grace`) until it has left the
    /// queue's active states, so nothing of it is running afterwards.
    fn stop(&mut self) -> Result<(), LaunchError> {
        let id = self.job_id()?.to_owned();
        let argv = self.job.system.delete_argv(&id);
        let out = self.run(&argv, None)?;
        if !out.success {
            // fine if the job is known to have ended; otherwise (wrong
            // scheduler environment, no permission, unknown id) it may
            // still run: say so instead of reporting it stopped
            match self.poll_known() {
                Ok(Some(s)) if !s.is_active() => {}
                _ => {
                    return Err(LaunchError::Command {
                        command: shell_join(&argv),
                        detail: format!(
                            "exit code {}: {}",
                            out.code.map_or("?".into(), |c| c.to_string()),
                            out.stderr.trim()
                        ),
                    });
                }
            }
        }
        let deadline = Instant::now() + self.grace;
        loop {
            match self.poll() {
                Ok(s) if s.is_active() => {}
                _ => break,
            }
            if Instant::now() >= deadline {
                return Err(LaunchError::Other(format!(
                    "job {id} is still in the queue {} s after `{}` ({})",
                    self.grace.as_secs(),
                    shell_join(&argv),
                    out.stderr.trim()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.state = "after";
        Ok(())
    }

    /// `BatchSystemLauncher.to_dict()`'s fields.
    fn to_dict(&self) -> Value {
        json!({
            "batch_template": self.job.template(),
            "cluster_id": self.job.cluster_id,
            "job_id": self.job_id.clone().unwrap_or_default(),
            "n": self.job.n,
            "namespace": self.job.options.namespace,
            "output_file": self.job.output_file,
            "profile_dir": self.job.profile_dir,
            "queue": self.job.options.queue,
            "state": self.state,
        })
    }

    fn label(&self) -> String {
        match &self.job_id {
            Some(id) => format!("job {id}"),
            None => "job (not submitted)".into(),
        }
    }
}

// -------------------------------------------------------------------- ssh

/// The engines of one host, started over one ssh connection that stays
/// open while they run (see [`crate::ssh`]).
pub struct SshLauncher {
    pub host: SshHost,
    pub ssh_cmd: Vec<String>,
    pub ssh_args: Vec<String>,
    /// `parallax engine …` as on this host (the host may name another
    /// `parallax`).
    pub engine_argv: Vec<String>,
    /// Exported by the remote script (the connection info in env mode).
    pub env: Vec<(String, String)>,
    pub profile_dir: String,
    pub cluster_id: String,
    /// The local log: the ssh's and the engines' output.
    pub output_file: PathBuf,
    pub grace: Duration,
    /// Limit for each ssh command (stop, signal).
    pub command_timeout: Duration,
    /// The local ssh process.
    pub ssh_pid: i64,
    /// The engines' pids (each its process group) on the host, and the
    /// host's own name, once the start script reported them.
    pub remote_pids: Vec<i64>,
    pub remote_hostname: String,
    child: Option<Child>,
    state: &'static str,
}

impl SshLauncher {
    #[allow(clippy::too_many_arguments)] // ipyparallel's SSHLauncher traits, one each
    pub fn new(
        host: SshHost,
        ssh_cmd: Vec<String>,
        ssh_args: Vec<String>,
        engine_argv: Vec<String>,
        profile_dir: &str,
        cluster_id: &str,
        output_file: PathBuf,
        grace: Duration,
    ) -> SshLauncher {
        SshLauncher {
            host,
            ssh_cmd,
            ssh_args,
            engine_argv,
            env: Vec::new(),
            profile_dir: profile_dir.to_owned(),
            cluster_id: cluster_id.to_owned(),
            output_file,
            grace,
            command_timeout: Duration::from_secs(30),
            ssh_pid: -1,
            remote_pids: Vec::new(),
            remote_hostname: String::new(),
            child: None,
            state: "before",
        }
    }

    /// A launcher restored from its cluster-file entry, to stop or signal
    /// what it started.
    pub fn from_dict(d: &Value, grace: Duration) -> Option<SshLauncher> {
        let s = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        let strings = |k: &str| -> Vec<String> {
            d.get(k)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let host = s("hostname");
        if host.is_empty() {
            return None;
        }
        let user = Some(s("user")).filter(|u| !u.is_empty());
        let port = d.get("port").and_then(Value::as_u64).map(|p| p as u16);
        let mut ssh_cmd = strings("ssh_cmd");
        if ssh_cmd.is_empty() {
            ssh_cmd = vec!["ssh".into()];
        }
        let mut l = SshLauncher::new(
            SshHost {
                user,
                host,
                port,
                engines: d.get("n").and_then(Value::as_u64).unwrap_or(0) as u32,
                parallax: None,
                python: None,
            },
            ssh_cmd,
            strings("ssh_args"),
            Vec::new(),
            &s("profile_dir"),
            &s("cluster_id"),
            PathBuf::from(s("output_file")),
            grace,
        );
        l.ssh_pid = d.get("ssh_pid").and_then(Value::as_i64).unwrap_or(-1);
        l.remote_pids = d
            .get("remote_pids")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_i64).collect())
            .unwrap_or_default();
        l.remote_hostname = s("remote_hostname");
        l.state = "running";
        Some(l)
    }

    /// Waits until the start script reported the engines' pids (true), or
    /// the ssh ended first or `timeout` passed (an error with ssh's words).
    pub fn wait_started(&mut self, timeout: Duration) -> Result<(), LaunchError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.learn_pids() {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                // the mark may have come just before the exit
                if self.learn_pids() {
                    return Ok(());
                }
                return Err(LaunchError::Other(format!(
                    "ssh to {} exited ({}) before the engines started: {}",
                    self.host.location(),
                    describe_ssh_exit(status),
                    self.output_tail(10)
                )));
            }
            if Instant::now() >= deadline {
                return Err(LaunchError::Timeout {
                    command: format!("ssh {} (starting engines)", self.host.location()),
                    seconds: timeout.as_secs_f64(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn learn_pids(&mut self) -> bool {
        if !self.remote_pids.is_empty() {
            return true;
        }
        let text = std::fs::read_to_string(&self.output_file).unwrap_or_default();
        match crate::ssh::parse_started(&text) {
            Some((host, pids)) if !pids.is_empty() => {
                self.remote_hostname = host;
                self.remote_pids = pids;
                true
            }
            _ => false,
        }
    }

    fn output_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.output_file).unwrap_or_default();
        let v: Vec<&str> = text.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }

    /// Runs `script` on the host (a separate connection).
    fn run_remote(&self, script: &str, timeout: Duration) -> Result<CommandOutput, LaunchError> {
        let argv = crate::ssh::ssh_argv(&self.ssh_cmd, &self.ssh_args, &self.host);
        run_command(&argv, Some(script), timeout)
    }
}

/// `exit status 255 (ssh could not connect or lost the connection)`.
pub(crate) fn describe_ssh_exit(status: std::process::ExitStatus) -> String {
    match status.code() {
        Some(255) => "exit status 255: ssh could not connect or lost the connection".into(),
        _ => status.to_string(),
    }
}

impl Launcher for SshLauncher {
    fn start(&mut self, n: u32) -> Result<(), LaunchError> {
        self.host.engines = n;
        let argv = crate::ssh::ssh_argv(&self.ssh_cmd, &self.ssh_args, &self.host);
        let script = crate::ssh::start_script(&self.env, &self.engine_argv, &self.host);
        let child = spawn_ssh_with_script(&argv, script, &self.output_file, false)?;
        self.ssh_pid = i64::from(child.id());
        self.child = Some(child);
        self.state = "running";
        Ok(())
    }

    fn poll(&mut self) -> Result<JobState, LaunchError> {
        self.learn_pids();
        let exited = match &mut self.child {
            Some(c) => c.try_wait()?,
            None if pid_alive(self.ssh_pid) => None,
            None => {
                // restored, and its ssh is gone: ask the host
                let out = self.run_remote(
                    &crate::ssh::alive_script(&self.remote_pids),
                    self.command_timeout,
                )?;
                let alive: usize = out.stdout.trim().parse().unwrap_or(0);
                return Ok(if alive > 0 {
                    JobState::Running {
                        state: format!("running ({alive} on {})", self.host.location()),
                    }
                } else {
                    JobState::Done {
                        state: "exited".into(),
                    }
                });
            }
        };
        let Some(status) = exited else {
            return Ok(JobState::Running {
                state: "running".into(),
            });
        };
        self.state = "after";
        Ok(if status.success() {
            JobState::Done {
                state: "exited".into(),
            }
        } else {
            JobState::Failed {
                state: "exited".into(),
                reason: describe_ssh_exit(status),
            }
        })
    }

    fn signal(&mut self, sig: i32) -> Result<(), LaunchError> {
        self.learn_pids();
        let script = crate::ssh::signal_script(&self.remote_pids, sig);
        let out = self.run_remote(&script, self.command_timeout)?;
        if !out.success {
            return Err(LaunchError::Other(format!(
                "no engine on {} took signal {sig}: {}",
                self.host.location(),
                out.stderr.trim()
            )));
        }
        Ok(())
    }

    /// Stops the engines by their process groups on the host (SIGTERM, then
    /// SIGKILL after the grace period), then the local ssh.
    fn stop(&mut self) -> Result<(), LaunchError> {
        self.learn_pids();
        let mut result = Ok(());
        if !self.remote_pids.is_empty() {
            let script = crate::ssh::stop_script(&self.remote_pids, self.grace.as_secs_f64());
            match self.run_remote(&script, self.grace + self.command_timeout) {
                Ok(out) if out.success => {}
                Ok(out) => {
                    result = Err(LaunchError::Other(format!(
                        "stopping the engines on {} failed ({}): {}",
                        self.host.location(),
                        out.code
                            .map_or("killed".into(), |c| format!("exit code {c}")),
                        out.stderr.trim()
                    )));
                }
                Err(e) => result = Err(e),
            }
        }
        if self.ssh_pid > 0 {
            let child = &mut self.child;
            terminate_tree(self.ssh_pid, Duration::from_secs(5), || {
                if let Some(c) = child.as_mut() {
                    let _ = c.try_wait();
                }
            });
        }
        self.state = "after";
        result
    }

    /// ipyparallel's `SSHLauncher` fields (hostname, user, location,
    /// ssh_cmd, ssh_args, pid: the remote engine's) plus ours.
    fn to_dict(&self) -> Value {
        json!({
            "cluster_id": self.cluster_id,
            "profile_dir": self.profile_dir,
            "hostname": self.host.host,
            "user": self.host.user.clone().unwrap_or_default(),
            "port": self.host.port,
            "location": self.host.location(),
            "ssh_cmd": self.ssh_cmd,
            "ssh_args": self.ssh_args,
            "n": self.host.engines,
            "output_file": self.output_file.to_string_lossy(),
            "ssh_pid": self.ssh_pid,
            "remote_pids": self.remote_pids,
            "remote_hostname": self.remote_hostname,
            "remote_python": self.host.python.clone().unwrap_or_else(|| "python3".into()),
            "state": self.state,
        })
    }

    fn label(&self) -> String {
        format!(
            "ssh {} ({} engines)",
            self.host.location(),
            self.host.engines
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn commands_run_with_stdin_and_time_out() {
        let out = run_command(
            &v(&["sh", "-c", "cat; echo err >&2; exit 3"]),
            Some("hi"),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!((out.success, out.code), (false, Some(3)));
        assert_eq!(out.stdout, "hi");
        assert_eq!(out.stderr, "err\n");
        let t = Instant::now();
        let e = run_command(&v(&["sleep", "10"]), None, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, LaunchError::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(run_command(&v(&["/nonexistent/cmd"]), None, Duration::from_secs(1)).is_err());
    }

    #[test]
    fn a_process_tree_is_stopped_whole() {
        let dir = std::env::temp_dir().join(format!("px-launch-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // a parent that ignores SIGTERM, with a child that ignores it too
        let mut l = ProcessLauncher::new(
            LauncherKind::Local,
            v(&[
                "sh",
                "-c",
                "trap '' TERM; sh -c \"trap '' TERM; sleep 60\" & sleep 60",
            ]),
            "/p",
            "",
            dir.join("out.log"),
            Duration::from_millis(300),
        );
        l.start(1).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let tree = descendants(l.pid);
        assert!(!tree.is_empty());
        assert!(l.poll().unwrap().is_active());
        l.stop().unwrap();
        assert!(!l.poll().unwrap().is_active());
        assert!(tree.iter().all(|p| !pid_alive(*p)), "left behind: {tree:?}");
        assert_eq!(l.to_dict()["state"], "after");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
