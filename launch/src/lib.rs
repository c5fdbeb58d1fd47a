//! Launchers: how engines get started beyond "N child processes here".
//!
//! The crate is split the way the rest of Parallax is (see quinn-proto):
//!
//! * a **pure layer** with no I/O: launcher names ([`LauncherKind`]), job
//!   states ([`JobState`]), template rendering ([`template`]), the `mpiexec`
//!   command line ([`mpi`]), and one module of data per batch system
//!   ([`slurm`], [`pbs`], [`sge`], [`lsf`], [`htcondor`]: default template,
//!   directives, submit/delete/signal/state commands and the parsers of
//!   their output) on the shared [`batch`] machinery, and the ssh host
//!   lists and remote scripts ([`ssh`]), the hub over ssh's script and
//!   output ([`ssh_controller`]), the ssh proxy's ([`ssh_proxy`]);
//! * a **driver** ([`driver`]) that runs commands (std::process, with
//!   timeouts), spawns and stops processes, and implements [`Launcher`] for
//!   a process (`local`, `mpi`), a batch job and a host's engines over ssh.
//!
//! Parsing a scheduler's output is a pure function tested as data against
//! real output samples; only the driver touches processes.

pub mod batch;
pub mod driver;
pub mod htcondor;
pub mod local;
pub mod lsf;
pub mod mpi;
pub mod pbs;
pub mod sge;
pub mod slurm;
pub mod ssh;
pub mod ssh_controller;
pub mod ssh_proxy;
pub mod template;

use std::fmt;

/// ipyparallel's launcher names (its entry points), case-insensitive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LauncherKind {
    Local,
    Mpi,
    Slurm,
    Pbs,
    Sge,
    Lsf,
    HtCondor,
    Ssh,
    /// `parallax cluster engines` run on another host over ssh, whose own
    /// launcher starts the engines (ipyparallel's `sshproxy`).
    SshProxy,
}

impl LauncherKind {
    pub const ALL: [LauncherKind; 9] = [
        LauncherKind::Local,
        LauncherKind::Mpi,
        LauncherKind::Slurm,
        LauncherKind::Pbs,
        LauncherKind::Sge,
        LauncherKind::Lsf,
        LauncherKind::HtCondor,
        LauncherKind::Ssh,
        LauncherKind::SshProxy,
    ];

    /// The entry-point name ipyparallel writes in a cluster file's `class`.
    pub fn name(self) -> &'static str {
        match self {
            LauncherKind::Local => "local",
            LauncherKind::Mpi => "mpi",
            LauncherKind::Slurm => "slurm",
            LauncherKind::Pbs => "pbs",
            LauncherKind::Sge => "sge",
            LauncherKind::Lsf => "lsf",
            LauncherKind::HtCondor => "htcondor",
            LauncherKind::Ssh => "ssh",
            LauncherKind::SshProxy => "sshproxy",
        }
    }

    /// ipcluster's spelling (`ipcluster list`'s LAUNCHER column).
    pub fn display_name(self) -> &'static str {
        match self {
            LauncherKind::Local => "Local",
            LauncherKind::Mpi => "MPI",
            LauncherKind::Slurm => "Slurm",
            LauncherKind::Pbs => "PBS",
            LauncherKind::Sge => "SGE",
            LauncherKind::Lsf => "LSF",
            LauncherKind::HtCondor => "HTCondor",
            LauncherKind::Ssh => "SSH",
            LauncherKind::SshProxy => "SSHProxy",
        }
    }

    /// A name as users and cluster files spell it: `mpi`, `MPI`,
    /// `mpiexec`, `MPIEngineSetLauncher`,
    /// `ipyparallel.cluster.launcher.SlurmEngineSetLauncher`,
    /// `ipyparallel.cluster.launcher:SlurmControllerLauncher`.
    pub fn parse(name: &str) -> Option<LauncherKind> {
        let last = name.rsplit(['.', ':']).next().unwrap_or(name);
        let lower = last.to_ascii_lowercase();
        let stem = ["enginesetlauncher", "controllerlauncher", "launcher"]
            .iter()
            .find_map(|s| lower.strip_suffix(s).filter(|r| !r.is_empty()))
            .unwrap_or(&lower);
        Some(match stem {
            "local" => LauncherKind::Local,
            "mpi" | "mpiexec" => LauncherKind::Mpi,
            "slurm" => LauncherKind::Slurm,
            "pbs" => LauncherKind::Pbs,
            "sge" => LauncherKind::Sge,
            "lsf" => LauncherKind::Lsf,
            "htcondor" | "condor" => LauncherKind::HtCondor,
            "ssh" => LauncherKind::Ssh,
            "sshproxy" => LauncherKind::SshProxy,
            _ => return None,
        })
    }

    /// The batch system's data, for the batch launchers.
    pub fn batch_system(self) -> Option<&'static batch::BatchSystem> {
        match self {
            LauncherKind::Slurm => Some(&slurm::SYSTEM),
            LauncherKind::Pbs => Some(&pbs::SYSTEM),
            LauncherKind::Sge => Some(&sge::SYSTEM),
            LauncherKind::Lsf => Some(&lsf::SYSTEM),
            LauncherKind::HtCondor => Some(&htcondor::SYSTEM),
            _ => None,
        }
    }
}

impl fmt::Display for LauncherKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a launched job (or process) stands, with the scheduler's own words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Queued; `reason` as the scheduler gives it (Slurm's `Resources`,
    /// `Priority`, `PartitionConfig`, …), empty if none.
    Pending {
        state: String,
        reason: String,
    },
    Running {
        state: String,
    },
    /// Finished without an error the scheduler reports.
    Done {
        state: String,
    },
    /// Failed, cancelled, timed out, held for good, or pending for a reason
    /// that can never clear.
    Failed {
        state: String,
        reason: String,
    },
}

impl JobState {
    /// Pending or running: the job may still produce engines.
    pub fn is_active(&self) -> bool {
        matches!(self, JobState::Pending { .. } | JobState::Running { .. })
    }

    /// `PENDING (Resources)`, `RUNNING`, `FAILED (NonZeroExitCode)`.
    pub fn describe(&self) -> String {
        match self {
            JobState::Pending { state, reason } | JobState::Failed { state, reason }
                if !reason.is_empty() && reason != "None" =>
            {
                format!("{state} ({reason})")
            }
            JobState::Pending { state, .. }
            | JobState::Failed { state, .. }
            | JobState::Running { state }
            | JobState::Done { state } => state.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{0}")]
    Template(#[from] template::TemplateError),
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("`{command}` did not finish within {seconds} s")]
    Timeout { command: String, seconds: f64 },
    #[error("could not find a job id in the output of `{command}`: {output:?}")]
    JobId { command: String, output: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
}

/// A started set of engines (or a hub): ipyparallel's launcher interface.
pub trait Launcher: Send + Sync {
    /// Start `n` engines (a process, an mpiexec, or a submitted job).
    fn start(&mut self, n: u32) -> Result<(), LaunchError>;
    /// The current state (for a process: running, or done/failed with its
    /// exit status).
    fn poll(&mut self) -> Result<JobState, LaunchError>;
    /// Send a signal (a number, as `kill`).
    fn signal(&mut self, sig: i32) -> Result<(), LaunchError>;
    /// Stop and wait until nothing of it is left (within the launcher's
    /// grace period, then forcefully).
    fn stop(&mut self) -> Result<(), LaunchError>;
    /// The launcher's state as ipyparallel's `BaseLauncher.to_dict()` of the
    /// matching class writes it (plus fields ipyparallel ignores).
    fn to_dict(&self) -> serde_json::Value;
    /// What to show while waiting: `job 12`, `mpiexec (pid 4242)`.
    fn label(&self) -> String;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_case_insensitive_and_accept_class_names() {
        for k in LauncherKind::ALL {
            assert_eq!(LauncherKind::parse(k.name()), Some(k));
            assert_eq!(LauncherKind::parse(&k.name().to_uppercase()), Some(k));
            assert_eq!(LauncherKind::parse(k.display_name()), Some(k));
        }
        let p = LauncherKind::parse;
        assert_eq!(p("MPIEngineSetLauncher"), Some(LauncherKind::Mpi));
        assert_eq!(p("MPIExec"), Some(LauncherKind::Mpi));
        assert_eq!(
            p("ipyparallel.cluster.launcher.SlurmEngineSetLauncher"),
            Some(LauncherKind::Slurm)
        );
        assert_eq!(
            p("ipyparallel.cluster.launcher:SGEControllerLauncher"),
            Some(LauncherKind::Sge)
        );
        assert_eq!(p("HTCondor"), Some(LauncherKind::HtCondor));
        assert_eq!(
            p("ipyparallel.cluster.launcher.SSHProxyEngineSetLauncher"),
            Some(LauncherKind::SshProxy)
        );
        assert_eq!(p("windowshpc"), None);
        assert_eq!(p("launcher"), None);
    }

    #[test]
    fn describe() {
        let s = |x: &str| x.to_owned();
        assert_eq!(
            JobState::Pending {
                state: s("PENDING"),
                reason: s("Resources")
            }
            .describe(),
            "PENDING (Resources)"
        );
        assert_eq!(
            JobState::Pending {
                state: s("PENDING"),
                reason: s("None")
            }
            .describe(),
            "PENDING"
        );
        assert_eq!(
            JobState::Running {
                state: s("RUNNING")
            }
            .describe(),
            "RUNNING"
        );
    }
}
