//! [`SshHubLauncher`]: the hub on another host over one ssh connection
//! (the script and its output are [`crate::ssh_controller`]'s). A reader
//! thread takes the script's stdout: the connection files it prints are
//! written into the local profile (0600, renamed into place, so a watcher
//! sees a new inode), everything else goes to the local log, as ssh's
//! stderr does.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use super::{CommandOutput, describe_ssh_exit, pid_alive, run_command, terminate_tree};
use crate::ssh::SshHost;
use crate::ssh_controller::{self, HubOutput};
use crate::{JobState, LaunchError, Launcher};

/// What the reader thread learnt from the script's stdout.
#[derive(Debug, Default)]
struct Seen {
    output: HubOutput,
    /// The connection files are in the local profile.
    written: bool,
    /// Writing them failed.
    error: Option<String>,
}

/// The hub of a cluster, running on `host`.
pub struct SshHubLauncher {
    pub host: SshHost,
    pub ssh_cmd: Vec<String>,
    pub ssh_args: Vec<String>,
    /// `parallax hub …` as on the host (no `--profile-dir`: the script
    /// makes a private one there).
    pub hub_argv: Vec<String>,
    /// Where the connection files go here.
    pub client_file: PathBuf,
    pub engine_file: PathBuf,
    pub profile_dir: String,
    pub cluster_id: String,
    /// The local log: ssh's stderr (the remote hub's output when it ends).
    pub output_file: PathBuf,
    pub grace: Duration,
    /// How long the hub may take to write its connection files there.
    pub start_timeout: Duration,
    /// Limit for each ssh command (stop, signal, poll).
    pub command_timeout: Duration,
    pub ssh_pid: i64,
    /// The hub's pid (its session) on the host, its directory there and
    /// the host's own name, once the script reported them.
    pub remote_pid: i64,
    pub remote_dir: String,
    pub remote_hostname: String,
    seen: Arc<Mutex<Seen>>,
    child: Option<Child>,
    state: &'static str,
}

/// Writes `text` to `path` with mode 0600 (a temp file renamed into place).
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("json.part-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    drop(f);
    std::fs::rename(&tmp, path)
}

fn install_files(output: &HubOutput, client: &Path, engine: &Path) -> Result<(), String> {
    let Some((c, e)) = &output.files else {
        return Err("no connection files".into());
    };
    for (text, path) in [(c, client), (e, engine)] {
        serde_json::from_str::<Value>(text).map_err(|err| {
            format!(
                "the hub's {} as printed by the host is not JSON: {err}",
                path.display()
            )
        })?;
    }
    // the engine file first: a watcher waits for the client file
    for (text, path) in [(e, engine), (c, client)] {
        write_private(path, text).map_err(|err| format!("writing {}: {err}", path.display()))?;
    }
    Ok(())
}

impl SshHubLauncher {
    #[allow(clippy::too_many_arguments)] // the pieces of one launch, as SshLauncher's
    pub fn new(
        host: SshHost,
        ssh_cmd: Vec<String>,
        ssh_args: Vec<String>,
        hub_argv: Vec<String>,
        client_file: PathBuf,
        engine_file: PathBuf,
        profile_dir: &str,
        cluster_id: &str,
        output_file: PathBuf,
        grace: Duration,
        start_timeout: Duration,
    ) -> SshHubLauncher {
        SshHubLauncher {
            host,
            ssh_cmd,
            ssh_args,
            hub_argv,
            client_file,
            engine_file,
            profile_dir: profile_dir.to_owned(),
            cluster_id: cluster_id.to_owned(),
            output_file,
            grace,
            start_timeout,
            command_timeout: Duration::from_secs(30),
            ssh_pid: -1,
            remote_pid: -1,
            remote_dir: String::new(),
            remote_hostname: String::new(),
            seen: Arc::default(),
            child: None,
            state: "before",
        }
    }

    /// A launcher restored from the cluster file's `controller.state`, to
    /// poll or stop the hub from another process.
    pub fn from_dict(d: &Value, grace: Duration) -> Option<SshHubLauncher> {
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
        let mut ssh_cmd = strings("ssh_cmd");
        if ssh_cmd.is_empty() {
            ssh_cmd = vec!["ssh".into()];
        }
        let mut l = SshHubLauncher::new(
            SshHost {
                user: Some(s("user")).filter(|u| !u.is_empty()),
                host,
                port: d.get("port").and_then(Value::as_u64).map(|p| p as u16),
                engines: 1,
                parallax: None,
                python: None,
            },
            ssh_cmd,
            strings("ssh_args"),
            Vec::new(),
            PathBuf::new(),
            PathBuf::new(),
            &s("profile_dir"),
            &s("cluster_id"),
            PathBuf::from(s("output_file")),
            grace,
            Duration::ZERO,
        );
        l.ssh_pid = d.get("pid").and_then(Value::as_i64).unwrap_or(-1);
        l.remote_pid = d.get("remote_pid").and_then(Value::as_i64).unwrap_or(-1);
        l.remote_dir = s("remote_dir");
        l.remote_hostname = s("remote_hostname");
        l.state = "running";
        Some(l)
    }

    /// Takes what the reader thread learnt; whether the connection files
    /// are in place (or why they cannot be).
    fn sync(&mut self) -> Result<bool, String> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((host, pid, dir)) = &seen.output.started {
            self.remote_hostname = host.clone();
            self.remote_pid = *pid;
            self.remote_dir = dir.clone();
        }
        if let Some(e) = &seen.error {
            return Err(e.clone());
        }
        Ok(seen.written)
    }

    /// Why the script said the hub failed, if it did.
    fn failure(&self) -> Option<String> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.error.clone().or_else(|| seen.output.failed.clone())
    }

    fn run_remote(&self, script: &str, timeout: Duration) -> Result<CommandOutput, LaunchError> {
        let argv = crate::ssh::ssh_argv(&self.ssh_cmd, &self.ssh_args, &self.host);
        run_command(&argv, Some(script), timeout)
    }

    /// Whether a recorded local ssh pid is still our ssh (not a reused pid).
    fn local_ssh_alive(&self) -> bool {
        if !pid_alive(self.ssh_pid) {
            return false;
        }
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.ssh_pid)).unwrap_or_default();
        let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        String::from_utf8_lossy(argv0).ends_with("ssh")
            && cmdline
                .windows(self.host.host.len().max(1))
                .any(|w| w == self.host.host.as_bytes())
    }
}

impl Launcher for SshHubLauncher {
    fn start(&mut self, _n: u32) -> Result<(), LaunchError> {
        let argv = crate::ssh::ssh_argv(&self.ssh_cmd, &self.ssh_args, &self.host);
        let name = |p: &Path| {
            p.file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let script = ssh_controller::start_script(
            &self.hub_argv,
            &name(&self.client_file),
            &name(&self.engine_file),
            self.start_timeout.as_secs_f64(),
        );
        let mut child = super::spawn_ssh_with_script(&argv, script, &self.output_file, true)?;
        // the hub's output, read for the connection files, goes on to the log
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.output_file)?;
        if let Some(stdout) = child.stdout.take() {
            let seen = Arc::clone(&self.seen);
            let (client, engine) = (self.client_file.clone(), self.engine_file.clone());
            std::thread::spawn(move || {
                let mut log = log;
                let mut text = String::new();
                let mut done = false;
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if done {
                        let _ = writeln!(log, "{line}");
                        continue;
                    }
                    // the connection files hold the key: they never reach the log
                    text.push_str(&line);
                    text.push('\n');
                    let output = ssh_controller::parse_output(&text);
                    let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
                    if output.files.is_some() {
                        match install_files(&output, &client, &engine) {
                            Ok(()) => s.written = true,
                            Err(e) => s.error = Some(e),
                        }
                        done = true;
                        text.clear();
                    } else if output.failed.is_some() {
                        done = true;
                    }
                    s.output = HubOutput {
                        files: None,
                        ..output
                    };
                }
            });
        }
        self.ssh_pid = i64::from(child.id());
        self.child = Some(child);
        self.state = "running";
        Ok(())
    }

    fn poll(&mut self) -> Result<JobState, LaunchError> {
        let synced = self.sync();
        let local_alive = self.child.is_none() && self.local_ssh_alive();
        let exited = match &mut self.child {
            Some(c) => c.try_wait()?,
            None if local_alive => None,
            None => {
                // restored, and its ssh is gone: ask the host
                if self.remote_pid <= 1 {
                    return Ok(JobState::Done {
                        state: "gone".into(),
                    });
                }
                let out = self.run_remote(
                    &crate::ssh::alive_script(&[self.remote_pid]),
                    self.command_timeout,
                )?;
                if !out.success {
                    return Err(LaunchError::Other(format!(
                        "asking {} about the hub failed: {}",
                        self.host.location(),
                        out.stderr.trim()
                    )));
                }
                let alive: usize = out.stdout.trim().parse().unwrap_or(0);
                return Ok(if alive > 0 {
                    JobState::Running {
                        state: "running".into(),
                    }
                } else {
                    JobState::Done {
                        state: "exited".into(),
                    }
                });
            }
        };
        if let Err(e) = synced {
            return Ok(JobState::Failed {
                state: "failed".into(),
                reason: e,
            });
        }
        let Some(status) = exited else {
            return Ok(JobState::Running {
                state: "running".into(),
            });
        };
        // the reader may still be taking the last lines
        std::thread::sleep(Duration::from_millis(50));
        let _ = self.sync();
        self.state = "after";
        Ok(match self.failure() {
            Some(reason) => JobState::Failed {
                state: "failed".into(),
                reason,
            },
            None if status.success() => JobState::Done {
                state: "exited".into(),
            },
            None => JobState::Failed {
                state: "exited".into(),
                reason: describe_ssh_exit(status),
            },
        })
    }

    fn signal(&mut self, sig: i32) -> Result<(), LaunchError> {
        let _ = self.sync();
        let out = self.run_remote(
            &crate::ssh::signal_script(&[self.remote_pid], sig),
            self.command_timeout,
        )?;
        if !out.success {
            return Err(LaunchError::Other(format!(
                "the hub on {} did not take signal {sig}: {}",
                self.host.location(),
                out.stderr.trim()
            )));
        }
        Ok(())
    }

    /// Kills the hub's session on the host (SIGTERM, SIGKILL after the
    /// grace period) and removes its directory there, then the local ssh.
    fn stop(&mut self) -> Result<(), LaunchError> {
        let _ = self.sync();
        let mut result = Ok(());
        if self.remote_pid > 1 || !self.remote_dir.is_empty() {
            let script = ssh_controller::stop_script(
                self.remote_pid,
                &self.remote_dir,
                self.grace.as_secs_f64(),
            );
            match self.run_remote(&script, self.grace + self.command_timeout) {
                Ok(out) if out.success => {}
                Ok(out) => {
                    result = Err(LaunchError::Other(format!(
                        "stopping the hub on {} failed ({}): {}",
                        self.host.location(),
                        out.code
                            .map_or("killed".into(), |c| format!("exit code {c}")),
                        out.stderr.trim()
                    )));
                }
                Err(e) => result = Err(e),
            }
        }
        if self.ssh_pid > 0 && (self.child.is_some() || self.local_ssh_alive()) {
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
    /// ssh_cmd, ssh_args, pid: the local ssh's) plus ours: the hub's pid
    /// and directory on the host.
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
            "pid": self.ssh_pid,
            "remote_pid": self.remote_pid,
            "remote_dir": self.remote_dir,
            "remote_hostname": self.remote_hostname,
            "output_file": self.output_file.to_string_lossy(),
            "state": self.state,
        })
    }

    fn label(&self) -> String {
        if self.remote_pid > 0 {
            format!("ssh {} (pid {})", self.host.location(), self.remote_pid)
        } else {
            format!("ssh {}", self.host.location())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_through_the_cluster_file() {
        let mut l = SshHubLauncher::new(
            crate::ssh_controller::parse_controller_host("bob@h1:2222").unwrap(),
            vec!["ssh".into()],
            vec!["-F".into(), "/cfg".into()],
            vec!["/bin/parallax".into(), "hub".into()],
            "/p/security/c.json".into(),
            "/p/security/e.json".into(),
            "/p",
            "c",
            "/p/log/hub.log".into(),
            Duration::from_secs(1),
            Duration::from_secs(10),
        );
        l.remote_pid = 4242;
        l.remote_dir = "/tmp/parallax-hub.x".into();
        let d = l.to_dict();
        assert_eq!(d["location"], "bob@h1:2222");
        let r = SshHubLauncher::from_dict(&d, Duration::from_secs(1)).unwrap();
        assert_eq!(r.host, l.host);
        assert_eq!(r.ssh_args, l.ssh_args);
        assert_eq!(
            (r.remote_pid, r.remote_dir.as_str()),
            (4242, "/tmp/parallax-hub.x")
        );
        assert_eq!(r.label(), "ssh bob@h1:2222 (pid 4242)");
        assert!(SshHubLauncher::from_dict(&json!({}), Duration::ZERO).is_none());
    }

    #[test]
    fn printed_files_are_written_private() {
        let dir = std::env::temp_dir().join(format!("px-ssh-hub-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (c, e) = (dir.join("c.json"), dir.join("e.json"));
        let out = HubOutput {
            files: Some(("{\"key\": \"a\"}".into(), "{\"key\": \"b\"}".into())),
            ..Default::default()
        };
        install_files(&out, &c, &e).unwrap();
        use std::os::unix::fs::PermissionsExt;
        for f in [&c, &e] {
            let mode = std::fs::metadata(f).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", f.display());
        }
        assert!(std::fs::read_to_string(&c).unwrap().contains("\"a\""));
        let bad = HubOutput {
            files: Some(("not json".into(), "{}".into())),
            ..Default::default()
        };
        assert!(
            install_files(&bad, &c, &e)
                .unwrap_err()
                .contains("not JSON")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
