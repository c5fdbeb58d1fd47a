//! [`SshProxyLauncher`]: one host's engines started by that host's own
//! `parallax cluster engines` over ssh (the scripts are
//! [`crate::ssh_proxy`]'s). The ssh's output (the remote command's
//! progress and errors; nothing secret: the connection files travel only
//! on its stdin) goes to the local log.

use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use serde_json::{Value, json};

use super::{CommandOutput, describe_ssh_exit, pid_alive, run_command, terminate_tree};
use crate::ssh::SshHost;
use crate::{JobState, LaunchError, Launcher, ssh_proxy};

pub struct SshProxyLauncher {
    pub host: SshHost,
    pub ssh_cmd: Vec<String>,
    pub ssh_args: Vec<String>,
    /// The `parallax` on the host.
    pub remote_parallax: String,
    /// `cluster engines` options after `-n N`: `--engines L`, the
    /// cluster id, `--engine-args`, the user's `--proxy-args`.
    pub engines_args: Vec<String>,
    /// The launcher the host uses (`local`, `slurm`…), for labels.
    pub remote_launcher: String,
    /// (name, contents) of the files the host's profile gets: the hub's
    /// connection files and a cluster file. Never in `to_dict`.
    pub files: Vec<(String, String)>,
    pub profile_dir: String,
    pub cluster_id: String,
    pub output_file: PathBuf,
    pub grace: Duration,
    pub command_timeout: Duration,
    pub ssh_pid: i64,
    pub remote_dir: String,
    pub remote_hostname: String,
    child: Option<Child>,
    state: &'static str,
}

impl SshProxyLauncher {
    #[allow(clippy::too_many_arguments)] // the pieces of one launch, as SshLauncher's
    pub fn new(
        host: SshHost,
        ssh_cmd: Vec<String>,
        ssh_args: Vec<String>,
        remote_parallax: String,
        remote_launcher: String,
        engines_args: Vec<String>,
        files: Vec<(String, String)>,
        profile_dir: &str,
        cluster_id: &str,
        output_file: PathBuf,
        grace: Duration,
    ) -> SshProxyLauncher {
        SshProxyLauncher {
            host,
            ssh_cmd,
            ssh_args,
            remote_parallax,
            engines_args,
            remote_launcher,
            files,
            profile_dir: profile_dir.to_owned(),
            cluster_id: cluster_id.to_owned(),
            output_file,
            grace,
            command_timeout: Duration::from_secs(30),
            ssh_pid: -1,
            remote_dir: String::new(),
            remote_hostname: String::new(),
            child: None,
            state: "before",
        }
    }

    /// Restored from its cluster-file entry, to poll, signal or stop.
    pub fn from_dict(d: &Value, grace: Duration) -> Option<SshProxyLauncher> {
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
        if host.is_empty() || s("remote_parallax").is_empty() {
            return None;
        }
        let mut ssh_cmd = strings("ssh_cmd");
        if ssh_cmd.is_empty() {
            ssh_cmd = vec!["ssh".into()];
        }
        let mut l = SshProxyLauncher::new(
            SshHost {
                user: Some(s("user")).filter(|u| !u.is_empty()),
                host,
                port: d.get("port").and_then(Value::as_u64).map(|p| p as u16),
                engines: d.get("n").and_then(Value::as_u64).unwrap_or(0) as u32,
                parallax: None,
                python: None,
            },
            ssh_cmd,
            strings("ssh_args"),
            s("remote_parallax"),
            s("remote_launcher"),
            Vec::new(),
            Vec::new(),
            &s("profile_dir"),
            &s("cluster_id"),
            PathBuf::from(s("output_file")),
            grace,
        );
        l.ssh_pid = d.get("ssh_pid").and_then(Value::as_i64).unwrap_or(-1);
        l.remote_dir = s("remote_dir");
        l.remote_hostname = s("remote_hostname");
        l.state = "running";
        Some(l)
    }

    fn learn_dir(&mut self) {
        if !self.remote_dir.is_empty() {
            return;
        }
        let text = std::fs::read_to_string(&self.output_file).unwrap_or_default();
        if let Some((host, dir)) = ssh_proxy::parse_started(&text) {
            self.remote_hostname = host;
            self.remote_dir = dir;
        }
    }

    fn run_remote(&self, script: &str, timeout: Duration) -> Result<CommandOutput, LaunchError> {
        let argv = crate::ssh::ssh_argv(&self.ssh_cmd, &self.ssh_args, &self.host);
        run_command(&argv, Some(script), timeout)
    }

    fn output_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.output_file).unwrap_or_default();
        let v: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with(ssh_proxy::STARTED_MARK))
            .collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }
}

impl Launcher for SshProxyLauncher {
    fn start(&mut self, n: u32) -> Result<(), LaunchError> {
        self.host.engines = n;
        let argv = crate::ssh::ssh_argv(&self.ssh_cmd, &self.ssh_args, &self.host);
        let mut engines_argv = vec![
            self.remote_parallax.clone(),
            "cluster".into(),
            "engines".into(),
            "-n".into(),
            n.to_string(),
        ];
        engines_argv.extend(self.engines_args.iter().cloned());
        let script = ssh_proxy::start_script(&self.files, &engines_argv);
        let child = super::spawn_ssh_with_script(&argv, script, &self.output_file, false)?;
        self.ssh_pid = i64::from(child.id());
        self.child = Some(child);
        self.state = "running";
        Ok(())
    }

    /// While the ssh runs: the host's `cluster engines` is starting them.
    /// It ends when they registered (running) or it failed (its words).
    fn poll(&mut self) -> Result<JobState, LaunchError> {
        self.learn_dir();
        let on = self.host.location();
        match &mut self.child {
            Some(c) => match c.try_wait()? {
                None => Ok(JobState::Running {
                    state: format!("starting on {on}"),
                }),
                Some(status) if status.success() => Ok(JobState::Running {
                    state: format!("running on {on}"),
                }),
                Some(status) => {
                    self.state = "after";
                    Ok(JobState::Failed {
                        state: "failed".into(),
                        reason: format!(
                            "`parallax cluster engines` on {on}: {}: {}",
                            describe_ssh_exit(status),
                            self.output_tail(10)
                        ),
                    })
                }
            },
            None => {
                if self.remote_dir.is_empty() {
                    return Ok(JobState::Done {
                        state: "gone".into(),
                    });
                }
                let out = self.run_remote(
                    &ssh_proxy::alive_script(
                        &self.remote_parallax,
                        &self.remote_dir,
                        &self.cluster_id,
                    ),
                    self.command_timeout,
                )?;
                Ok(if out.stdout.trim() == "1" {
                    JobState::Running {
                        state: format!("running on {on}"),
                    }
                } else {
                    JobState::Done {
                        state: "exited".into(),
                    }
                })
            }
        }
    }

    fn signal(&mut self, sig: i32) -> Result<(), LaunchError> {
        self.learn_dir();
        let out = self.run_remote(
            &ssh_proxy::signal_script(
                &self.remote_parallax,
                &self.remote_dir,
                &self.cluster_id,
                sig,
            ),
            self.command_timeout,
        )?;
        if !out.success {
            return Err(LaunchError::Other(format!(
                "`parallax cluster signal` on {} failed: {}",
                self.host.location(),
                out.stderr.trim()
            )));
        }
        Ok(())
    }

    /// The local ssh, then the stop script: it ends the host's `cluster
    /// engines` if that still waits for registrations, and runs `cluster
    /// stop` on the profile, which stops the engines its own way.
    fn stop(&mut self) -> Result<(), LaunchError> {
        self.learn_dir();
        if self.ssh_pid > 0 && (self.child.is_some() || pid_alive(self.ssh_pid)) {
            let child = &mut self.child;
            let ours = child.is_some()
                || std::fs::read(format!("/proc/{}/cmdline", self.ssh_pid)).is_ok_and(|c| {
                    c.split(|b| *b == 0)
                        .next()
                        .is_some_and(|a| a.ends_with(b"ssh"))
                });
            if ours {
                terminate_tree(self.ssh_pid, Duration::from_secs(5), || {
                    if let Some(c) = child.as_mut() {
                        let _ = c.try_wait();
                    }
                });
            }
        }
        let mut result = Ok(());
        if !self.remote_dir.is_empty() {
            let script = ssh_proxy::stop_script(
                &self.remote_parallax,
                &self.remote_dir,
                &self.cluster_id,
                self.grace.as_secs_f64(),
            );
            match self.run_remote(&script, self.grace * 2 + self.command_timeout) {
                Ok(out) if out.success => {}
                Ok(out) => {
                    result = Err(LaunchError::Other(format!(
                        "`parallax cluster stop` on {} failed ({}): {}{}",
                        self.host.location(),
                        out.code
                            .map_or("killed".into(), |c| format!("exit code {c}")),
                        out.stdout.trim(),
                        out.stderr.trim()
                    )));
                }
                Err(e) => result = Err(e),
            }
        }
        self.state = "after";
        result
    }

    /// ipyparallel's `SSHProxyEngineSetLauncher` fields (hostname, user,
    /// location, ssh_cmd, ssh_args, n) plus what stop needs: the host's
    /// `parallax` and the profile made there.
    fn to_dict(&self) -> Value {
        json!({
            "cluster_id": self.cluster_id,
            "profile_dir": self.profile_dir,
            "proxy": true,
            "hostname": self.host.host,
            "user": self.host.user.clone().unwrap_or_default(),
            "port": self.host.port,
            "location": self.host.location(),
            "ssh_cmd": self.ssh_cmd,
            "ssh_args": self.ssh_args,
            "n": self.host.engines,
            "output_file": self.output_file.to_string_lossy(),
            "ssh_pid": self.ssh_pid,
            "remote_parallax": self.remote_parallax,
            "remote_launcher": self.remote_launcher,
            "remote_dir": self.remote_dir,
            "remote_hostname": self.remote_hostname,
            "state": self.state,
        })
    }

    fn label(&self) -> String {
        format!(
            "sshproxy {} ({} engines, {} there)",
            self.host.location(),
            self.host.engines,
            self.remote_launcher
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_without_the_files() {
        let mut l = SshProxyLauncher::new(
            crate::ssh_controller::parse_controller_host("h2").unwrap(),
            vec!["ssh".into()],
            vec!["-F".into(), "/cfg".into()],
            "/opt/parallax".into(),
            "slurm".into(),
            vec!["--engines=slurm".into()],
            vec![(
                "ipcontroller-client.json".into(),
                "{\"key\": \"k3y\"}".into(),
            )],
            "/p",
            "c",
            "/p/log/x.log".into(),
            Duration::from_secs(1),
        );
        l.remote_dir = "/root/.cache/parallax/proxy/p.x".into();
        let d = l.to_dict();
        assert!(!d.to_string().contains("k3y"));
        let r = SshProxyLauncher::from_dict(&d, Duration::from_secs(1)).unwrap();
        assert_eq!(r.remote_dir, l.remote_dir);
        assert_eq!(r.remote_parallax, "/opt/parallax");
        assert_eq!(r.label(), "sshproxy h2 (1 engines, slurm there)");
        assert!(SshProxyLauncher::from_dict(&json!({"hostname": "h"}), Duration::ZERO).is_none());
    }
}
