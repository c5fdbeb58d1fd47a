//! Engines the kernel launches through a launcher (MPI, Slurm, PBS, SGE,
//! LSF, HTCondor, SSH) for its own hub: `%cluster start -n 64 --engines
//! slurm --queue debug` and the kernel options `--launcher` /
//! `--launcher-arg` (a kernelspec "Parallax Python (Slurm, 64 engines)").
//!
//! The options are `parallax cluster start`'s, parsed by the same clap
//! definition, and the engine sets are `cluster_cmd`'s: one code path for
//! the command line and the notebook. The engines get the connection info
//! in their environment by default (no shared file system needed: the
//! kernel's profile directory is private). Launcher calls (sbatch, squeue,
//! ssh) block, so they run on the blocking pool. Everything launched is
//! stopped (jobs cancelled and waited for) when the kernel shuts down.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use parallax_launch::LauncherKind;

use crate::cluster_cmd::{EnginePlan, EngineSet, StartArgs, set_failure};

#[derive(Parser, Debug)]
#[command(
    name = "%cluster start",
    no_binary_name = true,
    disable_help_flag = true,
    disable_version_flag = true
)]
struct MagicStart {
    #[command(flatten)]
    args: StartArgs,
}

/// `%cluster start` options, or why they are wrong. Options that belong to
/// a cluster of its own (a profile, a hub) are refused: the engines join
/// this kernel's hub.
pub fn parse_start(words: &[String]) -> Result<StartArgs, String> {
    let args = MagicStart::try_parse_from(words)
        .map_err(|e| {
            let text = e.to_string();
            text.trim()
                .trim_start_matches("error: ")
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        })?
        .args;
    let mut foreign = Vec::new();
    if args.profile.profile.is_some()
        || args.profile.profile_dir.is_some()
        || args.profile.ipython_dir.is_some()
    {
        foreign.push("--profile/--profile-dir/--ipython-dir");
    }
    if args.cluster_id.is_some() {
        foreign.push("--cluster-id");
    }
    if args.ip.is_some() || args.location.is_some() {
        foreign.push("--ip/--location (the kernel's own options)");
    }
    if args.controller != LauncherKind::Local
        || !args.hub_args.is_empty()
        || args.ssh_controller.controller_host.is_some()
    {
        foreign.push("--controller/--hub-args");
    }
    if args.daemonize {
        foreign.push("--daemonize");
    }
    if !foreign.is_empty() {
        return Err(format!(
            "{} do not apply: the engines join this kernel's hub",
            foreign.join(", ")
        ));
    }
    if args.engines == LauncherKind::Local {
        return Err("--engines local: use %cluster add N for local engines".into());
    }
    Ok(args)
}

/// Where the kernel's hub is, for the launchers.
#[derive(Debug, Clone)]
pub struct HubPlace {
    pub engine_file: PathBuf,
    /// The kernel's private profile directory (job scripts, read by the
    /// submit command here).
    pub profile_dir: PathBuf,
    /// The engines' output files: jobs on other nodes write them, so a
    /// directory in the home directory (shared on clusters), not the
    /// private profile; removed when the kernel shuts down.
    pub log_dir: PathBuf,
    /// The hub's listening address (for the ssh launcher's loopback check).
    pub ip: String,
    /// `--python=…` or `--language=rust`, as the embedded engines get.
    pub language_args: Vec<String>,
}

impl HubPlace {
    /// `$XDG_CACHE_HOME/parallax/jobs/<pid>-<random>` (or ~/.cache/…).
    pub fn job_log_dir() -> PathBuf {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(std::env::temp_dir);
        cache.join("parallax").join("jobs").join(format!(
            "{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ))
    }
}

/// Engine sets this kernel launched.
#[derive(Default)]
pub(crate) struct Launched {
    pub(crate) sets: Vec<LaunchedSet>,
}

pub(crate) struct LaunchedSet {
    pub(crate) set: EngineSet,
    pub n: u32,
    /// The final state, once the set is no longer active.
    pub ended: Option<String>,
}

impl Launched {
    /// Engines launched and not known to have ended.
    pub fn expected(&self) -> usize {
        self.sets
            .iter()
            .filter(|s| s.ended.is_none())
            .map(|s| s.n as usize)
            .sum()
    }

    /// `job 12 RUNNING, ssh h1 (2 engines) running`, for progress lines.
    pub fn states(&self) -> String {
        self.sets
            .iter()
            .map(|s| {
                let label = s
                    .set
                    .members
                    .first()
                    .map_or("engine set".into(), |m| m.label());
                let state = match (&s.ended, &s.set.last) {
                    (Some(e), _) => e.clone(),
                    (None, Some((st, _))) => st.describe(),
                    (None, None) => "launched".into(),
                };
                format!("{label} {state}")
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `%cluster`'s lines about launched engines.
    pub fn show(&self) -> String {
        let mut s = String::new();
        for l in &self.sets {
            let members: Vec<String> = l.set.members.iter().map(|m| m.label()).collect();
            let state = match (&l.ended, &l.set.last) {
                (Some(e), _) => e.clone(),
                (None, Some((st, _))) => st.describe(),
                (None, None) => "launched".into(),
            };
            s.push_str(&format!(
                "launched: {} engines via {} ({}): {state}; log {}\n",
                l.n,
                l.set.kind.display_name(),
                members.join(", "),
                l.set
                    .logs
                    .first()
                    .map_or(String::new(), |p| p.display().to_string())
            ));
        }
        s
    }
}

/// Start the engines (blocking: submits jobs, runs mpiexec or ssh).
pub(crate) fn launch(args: &StartArgs, hub: &HubPlace) -> Result<Vec<LaunchedSet>> {
    let n = match args.n {
        Some(n) if n > 0 => n,
        Some(_) => anyhow::bail!("-n must be at least 1"),
        None if matches!(args.engines, LauncherKind::Ssh | LauncherKind::SshProxy) => {
            crate::cluster_ssh::default_n(args)?
        }
        None => anyhow::bail!("-n N: how many engines to launch"),
    };
    crate::cluster_ssh_proxy::check(args)?;
    if matches!(args.engines, LauncherKind::Ssh | LauncherKind::SshProxy) {
        let mut with_ip = args.clone();
        with_ip.ip = Some(hub.ip.clone());
        crate::cluster_ssh::check_reachable(&with_ip)?;
    }
    let mut args = args.clone();
    // the kernel's profile directory is private to this host: the engines
    // get the connection info in their environment unless told otherwise
    args.connection_info
        .get_or_insert(crate::cluster_cmd::ConnectionInfo::Env);
    args.engine_args.extend(hub.language_args.iter().cloned());
    let exe = std::env::current_exe().context("finding the parallax executable")?;
    let log_dir = &hub.log_dir;
    std::fs::create_dir_all(log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let set_base = format!(
        "{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    );
    let plan = EnginePlan {
        args: &args,
        exe: &exe,
        engine_file: &hub.engine_file,
        profile_dir: &hub.profile_dir,
        cid: "",
        log_dir,
        id_part: "",
        set_base: &set_base,
        n,
        grace: Duration::from_secs_f64(args.stop_timeout.max(0.0)),
    };
    let mut sets = Vec::new();
    let started = plan.start(&mut sets);
    if let Err(e) = started {
        for mut s in sets {
            for err in s.stop() {
                tracing::warn!("stopping {err}");
            }
        }
        return Err(e);
    }
    let count = sets.len() as u32;
    let per_set = |i: u32| -> u32 {
        // batch jobs split by --engines-per-job; others are one set
        match args.engines_per_job {
            Some(k) if count > 1 => {
                let k = k.clamp(1, n);
                k.min(n - i * k)
            }
            _ => n,
        }
    };
    Ok(sets
        .into_iter()
        .enumerate()
        .map(|(i, set)| LaunchedSet {
            n: per_set(i as u32),
            set,
            ended: None,
        })
        .collect())
}

/// Poll the sets (batch jobs at most every `interval`); the first that
/// ended since, with why (its state and the end of its log).
pub(crate) fn poll(sets: &mut [LaunchedSet], interval: Duration) -> Vec<String> {
    let mut ended = Vec::new();
    for l in sets.iter_mut().filter(|l| l.ended.is_none()) {
        if let Some((member, st)) = l.set.poll(interval) {
            l.set.reported[member] = true;
            l.ended = Some(st.describe());
            ended.push(set_failure(&l.set, member, &st));
        }
    }
    ended
}

/// Stop everything launched (jobs cancelled and waited for); the errors.
pub(crate) fn stop_all(sets: &mut [LaunchedSet]) -> Vec<String> {
    // all sets at once (a kernel's shutdown has jupyter_client's 5 s)
    crate::cluster_cmd::each_at_once(sets, |l| {
        let errors = l.set.stop();
        l.ended.get_or_insert_with(|| "stopped".into());
        errors
    })
}

/// How long `%cluster start` waits for the engines before returning with
/// the rest still pending (they join as they register).
pub fn default_wait(args: &StartArgs) -> Duration {
    Duration::from_secs_f64(args.timeout.clamp(0.0, 3600.0))
}

/// The kernel options as `%cluster start` words: `-n N --engines KIND
/// [launcher args]`.
pub fn kernel_words(n: usize, launcher: &str, extra: &[String]) -> Vec<String> {
    let mut v = vec![
        "-n".to_owned(),
        n.to_string(),
        "--engines".to_owned(),
        launcher.to_owned(),
    ];
    v.extend(extra.iter().cloned());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn start_options_are_cluster_starts() {
        let a = parse_start(&w("-n 4 --engines slurm --queue debug --time 0:10:00")).unwrap();
        assert_eq!(a.n, Some(4));
        assert_eq!(a.engines, LauncherKind::Slurm);
        assert_eq!(a.queue.as_deref(), Some("debug"));
        let a = parse_start(&w("-n 2 --engines MPI --mpi-args=--oversubscribe")).unwrap();
        assert_eq!(a.engines, LauncherKind::Mpi);
        let e = parse_start(&w("-n 2 --engines torque")).unwrap_err();
        assert!(e.contains("unknown launcher \"torque\""), "{e}");
        let e = parse_start(&w("-n 2 --engines slurm --profile-dir /x --daemonize")).unwrap_err();
        assert!(e.contains("--profile") && e.contains("--daemonize"), "{e}");
        let e = parse_start(&w("-n 2")).unwrap_err();
        assert!(e.contains("%cluster add"), "{e}");
        let e = parse_start(&w("-n 2 --engines slurm --bogus")).unwrap_err();
        assert!(e.contains("--bogus"), "{e}");
    }

    #[test]
    fn kernel_options_become_start_words() {
        let words = kernel_words(8, "slurm", &w("--queue debug"));
        let a = parse_start(&words).unwrap();
        assert_eq!((a.n, a.engines), (Some(8), LauncherKind::Slurm));
    }
}
