//! `parallax cluster start --controller mpi|slurm|pbs|sge|lsf|htcondor|ssh`:
//! the hub launched like engines are (ipyparallel's `*ControllerLauncher`s)
//! — a hub inside a batch job, with clients and kernels on the login node
//! reading its connection files from the (shared) profile directory.
//!
//! The hub of a cluster is a [`Hub`]: a local process (the default) or a
//! launcher. A launched hub listens on all interfaces unless `--ip` says
//! otherwise (it runs on a node other than this one) and writes its own
//! host name as `location`. Its state is polled at most every poll
//! interval (a batch system's state command is not free); a hub whose job
//! ended is a hub that exited. `ssh` is `cluster_ssh_controller`'s.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use parallax_launch::driver::{BatchLauncher, ProcessLauncher};
use parallax_launch::{JobState, Launcher, LauncherKind, batch};
use serde_json::Value;

use crate::cluster_cmd::{Proc, StartArgs};

/// The hub of a cluster being started or watched.
pub(crate) enum Hub {
    Local(Proc),
    Launched(LaunchedHub),
}

pub(crate) struct LaunchedHub {
    pub(crate) launcher: Box<dyn Launcher>,
    pub(crate) kind: LauncherKind,
    /// The last state seen and when (polled at most every `interval`).
    last: Option<(JobState, Instant)>,
    interval: Duration,
}

impl Hub {
    /// Whether the hub (process or job) may still be running.
    pub(crate) fn alive(&mut self) -> bool {
        match self {
            Hub::Local(p) => p.alive(),
            Hub::Launched(h) => h.state().is_active(),
        }
    }

    /// The local pid (-1 for a launched hub).
    pub(crate) fn pid(&self) -> i64 {
        match self {
            Hub::Local(p) => p.pid,
            Hub::Launched(_) => -1,
        }
    }

    /// How it ended, for messages: `exit status: 1`, `job 12 FAILED (…)`.
    pub(crate) fn ended(&mut self) -> String {
        match self {
            Hub::Local(p) => {
                let status = p.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
                status.map_or("unknown status".into(), |s| s.to_string())
            }
            Hub::Launched(h) => {
                let st = h.state();
                format!("{} {}", h.launcher.label(), st.describe())
            }
        }
    }

    /// `hub job 12 PENDING (Resources)` while a launched hub is not running.
    pub(crate) fn waiting_note(&mut self) -> Option<String> {
        match self {
            Hub::Launched(h) => match h.state() {
                st @ JobState::Pending { .. } => {
                    Some(format!("hub {} {}", h.launcher.label(), st.describe()))
                }
                _ => None,
            },
            Hub::Local(_) => None,
        }
    }
}

impl LaunchedHub {
    fn state(&mut self) -> JobState {
        if let Some((st, at)) = &self.last
            && at.elapsed() < self.interval
        {
            return st.clone();
        }
        let st = match self.launcher.poll() {
            Ok(s) => s,
            // a state command that fails says nothing: keep the last word
            Err(_) => self.last.as_ref().map_or(
                JobState::Running {
                    state: "unknown".into(),
                },
                |(s, _)| s.clone(),
            ),
        };
        self.last = Some((st.clone(), Instant::now()));
        st
    }

    /// The controller's `class` and `state` in the cluster file.
    pub(crate) fn class_and_state(&self) -> (&'static str, Value) {
        (self.kind.name(), self.launcher.to_dict())
    }
}

/// Refuse what cannot be launched as a hub.
pub(crate) fn check(args: &StartArgs) -> Result<()> {
    if args.controller != LauncherKind::Ssh && args.ssh_controller.controller_host.is_some() {
        bail!("--controller-host is the hub's host for --controller ssh");
    }
    match args.controller {
        LauncherKind::Local | LauncherKind::Mpi => Ok(()),
        LauncherKind::Ssh => crate::cluster_ssh_controller::host(args).map(drop),
        k if k.batch_system().is_some() => Ok(()),
        k => bail!(
            "--controller {k}: the hub can be launched local, mpi, slurm, pbs, sge, lsf, htcondor or ssh"
        ),
    }
}

/// Start the hub with `args.controller` (not local): `hub_argv` is `exe hub
/// …`. `log` is where its output goes.
#[allow(clippy::too_many_arguments)] // the pieces of a launch, as EnginePlan's
pub(crate) fn start(
    args: &StartArgs,
    hub_argv: Vec<String>,
    profile_dir: &Path,
    cid: &str,
    id_part: &str,
    log: &Path,
    grace: Duration,
    poll_interval: Duration,
) -> Result<LaunchedHub> {
    let kind = args.controller;
    let mut launcher: Box<dyn Launcher> = match kind.batch_system() {
        Some(system) => {
            let job = batch::BatchJob {
                system,
                options: batch::BatchOptions {
                    queue: args.queue.clone().unwrap_or_default(),
                    account: args.account.clone().unwrap_or_default(),
                    qos: args.qos.clone().unwrap_or_default(),
                    timelimit: args.time.clone().unwrap_or_default(),
                    extra_directives: args.extra_directive.clone(),
                    template: None,
                    namespace: Default::default(),
                },
                n: 1,
                profile_dir: profile_dir.to_string_lossy().into_owned(),
                cluster_id: cid.to_owned(),
                output_file: log.to_string_lossy().into_owned(),
                program: hub_argv[..2].to_vec(),
                program_args: hub_argv[2..].to_vec(),
            };
            let script = profile_dir.join(format!("{}-hub{id_part}", system.script_name));
            let mut l = BatchLauncher::new(job, script);
            l.grace = grace.max(Duration::from_secs(10));
            Box::new(l)
        }
        None if kind == LauncherKind::Mpi => {
            let cmd = parallax_launch::mpi::MpiCommand {
                mpi_cmd: args.mpi_cmd.split_whitespace().map(str::to_owned).collect(),
                mpi_args: args
                    .mpi_args
                    .iter()
                    .flat_map(|a| a.split_whitespace().map(str::to_owned))
                    .collect(),
                n: 1,
                program: hub_argv,
            };
            Box::new(ProcessLauncher::new(
                LauncherKind::Mpi,
                cmd.argv(),
                &profile_dir.to_string_lossy(),
                cid,
                log.to_path_buf(),
                grace,
            ))
        }
        None if kind == LauncherKind::Ssh => Box::new(crate::cluster_ssh_controller::launcher(
            args,
            hub_argv,
            profile_dir,
            cid,
            log,
            grace,
        )?),
        None => bail!("--controller {kind} cannot launch a hub"),
    };
    launcher
        .start(1)
        .with_context(|| format!("launching the hub ({})", kind.display_name()))?;
    Ok(LaunchedHub {
        launcher,
        kind,
        last: None,
        // an ssh hub's poll reads what its local ssh said: no command
        interval: if kind == LauncherKind::Ssh {
            Duration::ZERO
        } else {
            poll_interval
        },
    })
}

/// A launched hub rebuilt from a cluster file's `controller` section, to
/// poll or stop it; `None` for a local hub (its pid is what matters).
pub(crate) fn restore(class: &str, state: &Value, grace: Duration) -> Option<Box<dyn Launcher>> {
    let kind = LauncherKind::parse(class)?;
    if let Some(system) = kind.batch_system() {
        let mut l = BatchLauncher::from_dict(system, state)?;
        l.grace = grace.max(Duration::from_secs(10));
        return Some(Box::new(l));
    }
    if kind == LauncherKind::Ssh {
        return parallax_launch::driver::ssh_hub::SshHubLauncher::from_dict(state, grace)
            .map(|l| Box::new(l) as Box<dyn Launcher>);
    }
    if kind == LauncherKind::Mpi {
        // only an mpiexec still running our hub (not a reused pid)
        let pid = state
            .get("pid")
            .and_then(Value::as_i64)
            .filter(|p| *p > 0)?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let runs_hub = cmdline.split(|b| *b == 0).any(|a| a == b"hub");
        if !runs_hub && parallax_launch::driver::pid_alive(pid) {
            return None;
        }
        return Some(Box::new(ProcessLauncher::from_dict(
            LauncherKind::Mpi,
            state,
            grace,
        )));
    }
    None
}

/// Whether a restored launched hub may still be running.
pub(crate) fn restored_alive(l: &mut dyn Launcher) -> bool {
    l.poll().map(|s| s.is_active()).unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: StartArgs,
    }

    fn args(extra: &[&str]) -> StartArgs {
        let mut v = vec!["x"];
        v.extend_from_slice(extra);
        Cli::try_parse_from(v).unwrap().a
    }

    #[test]
    fn which_controllers() {
        for ok in ["local", "mpi", "slurm", "PBS", "sge", "lsf", "htcondor"] {
            assert!(check(&args(&["--controller", ok])).is_ok(), "{ok}");
        }
        assert!(check(&args(&["--controller", "ssh", "--controller-host", "h1"])).is_ok());
        let e = check(&args(&["--controller", "ssh"])).unwrap_err();
        assert!(e.to_string().contains("--controller-host"), "{e}");
        let e = check(&args(&["--controller", "ssh", "--controller-host", "h:x"])).unwrap_err();
        assert!(e.to_string().contains("not a port"), "{e}");
    }

    #[test]
    fn a_batch_hub_job_from_its_cluster_file() {
        let state = serde_json::json!({"job_id": "12", "queue": "debug", "n": 1,
            "profile_dir": "/p", "cluster_id": "c", "output_file": "/p/log/h.log"});
        let l = restore("slurm", &state, Duration::from_secs(1)).unwrap();
        assert_eq!(l.label(), "job 12");
        assert!(restore("local", &state, Duration::from_secs(1)).is_none());
        assert!(restore("slurm", &serde_json::json!({}), Duration::from_secs(1)).is_none());
        let ssh = serde_json::json!({"hostname": "h1", "pid": -1, "remote_pid": 77,
            "remote_dir": "/tmp/parallax-hub.x"});
        let l = restore("ssh", &ssh, Duration::from_secs(1)).unwrap();
        assert_eq!(l.label(), "ssh h1 (pid 77)");
    }
}
