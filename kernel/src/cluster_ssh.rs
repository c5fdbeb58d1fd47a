//! `parallax cluster start|engines --engines ssh`: engines on other hosts
//! over ssh (the options, the host list, the reachability check and the
//! cluster-file entries). The launcher itself is
//! `parallax_launch::driver::SshLauncher`; the scripts it runs are in
//! `parallax_launch::ssh`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use parallax_launch::Launcher;
use parallax_launch::driver::SshLauncher;
use parallax_launch::ssh::{self, SshHost};
use serde_json::{Value, json};

use crate::cluster_cmd::StartArgs;

/// How long one host may take to start its engines (connect, log in, fork).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Default, Args)]
pub struct SshArgs {
    /// ssh: the hosts and their engines, `[user@]host[:N]` or
    /// `[user@]host:PORT:N`, comma-separated (e.g. --hosts 'h1:4,h2:8').
    #[arg(long = "hosts", value_name = "HOSTS")]
    pub hosts: Option<String>,
    /// ssh: a hosts file, one host per line: `[user@]host[:port] [N]
    /// [parallax=PATH] [python=PATH]` (# comments).
    #[arg(
        long = "hostfile",
        visible_alias = "hosts-file",
        value_name = "FILE",
        conflicts_with = "hosts"
    )]
    pub hostfile: Option<PathBuf>,
    /// ssh: the ssh command (split on whitespace).
    #[arg(long = "ssh-cmd", default_value = "ssh", value_name = "CMD")]
    pub ssh_cmd: String,
    /// ssh: extra arguments for ssh (split on whitespace; repeatable), e.g.
    /// --ssh-args='-F /path/ssh_config'.
    #[arg(long = "ssh-args", allow_hyphen_values = true, value_name = "ARGS")]
    pub ssh_args: Vec<String>,
    /// ssh: the `parallax` executable on the hosts (default: this one's
    /// path; a hosts-file line's parallax= overrides it).
    #[arg(long = "remote-parallax", value_name = "PATH")]
    pub remote_parallax: Option<String>,
}

fn split_words(values: &[String]) -> Vec<String> {
    values
        .iter()
        .flat_map(|v| v.split_whitespace().map(str::to_owned))
        .collect()
}

/// The hosts as given (`--hosts` or `--hostfile`), before `-n` applies.
pub fn hosts(args: &StartArgs) -> Result<Vec<SshHost>> {
    let a = &args.ssh;
    let mut hosts = match (&a.hosts, &a.hostfile) {
        (Some(spec), _) => ssh::parse_hosts_arg(spec).map_err(anyhow::Error::msg)?,
        (None, Some(file)) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading the hosts file {}", file.display()))?;
            ssh::parse_hosts_file(&text)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("in {}", file.display()))?
        }
        (None, None) => {
            bail!("--engines ssh needs the hosts: --hosts 'host1:N,host2:M' or --hostfile FILE")
        }
    };
    if let Some(p) = &a.remote_parallax {
        for h in &mut hosts {
            h.parallax.get_or_insert_with(|| p.clone());
        }
    }
    Ok(hosts)
}

/// The engines per host for `n` engines.
pub fn hosts_for(args: &StartArgs, n: u32) -> Result<Vec<SshHost>> {
    ssh::assign(&hosts(args)?, Some(n)).map_err(anyhow::Error::msg)
}

/// `-n` when none is given: every slot of the hosts.
pub fn default_n(args: &StartArgs) -> Result<u32> {
    Ok(hosts(args)?.iter().map(|h| h.engines).sum())
}

fn loopback_error(ip: &str, remote: &[&SshHost]) -> anyhow::Error {
    let names: Vec<String> = remote.iter().map(|h| h.host.clone()).collect();
    anyhow::anyhow!(
        "the hub listens on {ip} (loopback), which engines on {} cannot reach: start it with \
         --ip=0.0.0.0 (or an address of this host they reach) and --location=<that address or \
         this host's name as they know it>",
        names.join(", ")
    )
}

fn check(ip: &str, hosts: &[SshHost]) -> Result<()> {
    let remote: Vec<&SshHost> = hosts.iter().filter(|h| !h.is_loopback()).collect();
    if !remote.is_empty() && ssh::is_loopback_name(ip) {
        return Err(loopback_error(ip, &remote));
    }
    Ok(())
}

/// Before anything starts: the hosts parse, `-n` fits them, and a hub on
/// loopback is not asked to serve engines elsewhere.
pub fn check_reachable(args: &StartArgs) -> Result<()> {
    let hosts = hosts(args)?;
    if let Some(n) = args.n {
        ssh::assign(&hosts, Some(n)).map_err(anyhow::Error::msg)?;
    }
    // a launched hub (ssh, a job) listens on all interfaces by default
    let default_ip = if args.controller == parallax_launch::LauncherKind::Local {
        "127.0.0.1"
    } else {
        "0.0.0.0"
    };
    check(args.ip.as_deref().unwrap_or(default_ip), &hosts)
}

/// The same for `cluster engines`, with the running hub's address from
/// its cluster file.
pub fn check_reachable_from(args: &StartArgs, cluster: &Value) -> Result<()> {
    let hosts = hosts(args)?;
    if let Some(n) = args.n {
        ssh::assign(&hosts, Some(n)).map_err(anyhow::Error::msg)?;
    }
    let ip = cluster["cluster"]["controller_ip"]
        .as_str()
        .filter(|s| !s.is_empty())
        .unwrap_or("127.0.0.1");
    check(ip, &hosts)
}

/// One host's launcher.
pub fn launcher(
    args: &StartArgs,
    host: SshHost,
    engine_argv: Vec<String>,
    profile_dir: &str,
    cid: &str,
    log: PathBuf,
    grace: Duration,
) -> SshLauncher {
    SshLauncher::new(
        host,
        split_words(std::slice::from_ref(&args.ssh.ssh_cmd)),
        split_words(&args.ssh.ssh_args),
        engine_argv,
        profile_dir,
        cid,
        log,
        grace,
    )
}

/// `--print-script`: each host's ssh command and the script it is sent
/// (the connection info shown as a placeholder: it holds the key).
pub fn describe(
    args: &StartArgs,
    n: u32,
    engine_argv: &[String],
    env_mode: bool,
) -> Result<String> {
    let ssh_cmd = split_words(std::slice::from_ref(&args.ssh.ssh_cmd));
    let ssh_args = split_words(&args.ssh.ssh_args);
    let env: Vec<(String, String)> = if env_mode {
        vec![(
            "IPP_CONNECTION_INFO".into(),
            "<the engine connection file's contents>".into(),
        )]
    } else {
        Vec::new()
    };
    let mut out = String::new();
    for host in hosts_for(args, n)? {
        let argv = ssh::ssh_argv(&ssh_cmd, &ssh_args, &host);
        out.push_str(&format!(
            "# --- {} engines on {}: {} <<'EOF'\n{}EOF\n",
            host.engines,
            host.location(),
            parallax_launch::template::shell_join(&argv),
            ssh::start_script(&env, engine_argv, &host)
        ));
    }
    Ok(out)
}

/// The engine set in the cluster file: ipyparallel's engine-set fields,
/// with one entry per host under `hosts` (what stop needs: the host, the
/// ssh command, the engines' pids there, the local ssh's pid).
pub fn set_value(members: &[Box<dyn Launcher>], profile_dir: &Path, cid: &str) -> Value {
    let hosts: Vec<Value> = members.iter().map(|m| m.to_dict()).collect();
    let n: u64 = hosts.iter().filter_map(|h| h["n"].as_u64()).sum();
    let engines: serde_json::Map<String, Value> = hosts
        .iter()
        .filter_map(|h| Some((h["location"].as_str()?.to_owned(), h["n"].clone())))
        .collect();
    json!({
        "cluster_id": cid,
        "profile_dir": profile_dir.to_string_lossy(),
        "n": n,
        "state": "running",
        "engines_per_host": engines,
        "engines": engine_launchers(&hosts),
        "hosts": hosts,
    })
}

/// ipyparallel's `SSHEngineSetLauncher.engines`: one `SSHEngineLauncher`
/// entry per remote engine (its pid on its host, how to reach the host), so
/// `Cluster.from_file` restores the set and can signal or stop each engine
/// through ssh itself.
fn engine_launchers(hosts: &[Value]) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    for h in hosts
        .iter()
        .filter(|h| h.get("proxy").and_then(Value::as_bool) != Some(true))
    {
        let mut ssh_args: Vec<Value> = h["ssh_args"].as_array().cloned().unwrap_or_default();
        if let Some(port) = h["port"].as_u64() {
            ssh_args.extend([json!("-p"), json!(port.to_string())]);
        }
        for pid in h["remote_pids"].as_array().into_iter().flatten() {
            out.insert(
                out.len().to_string(),
                json!({
                    "cluster_id": h["cluster_id"],
                    "profile_dir": h["profile_dir"],
                    "hostname": h["hostname"],
                    "user": h["user"],
                    "ssh_cmd": h["ssh_cmd"],
                    "ssh_args": ssh_args,
                    "remote_python": h["remote_python"],
                    "output_file": h["output_file"],
                    "pid": pid,
                    "n": 1,
                    "state": "running",
                }),
            );
        }
    }
    out
}

/// One host's launcher from its cluster-file entry: an ssh engine set's,
/// or an ssh proxy's (`"proxy": true`).
pub fn restore_host(h: &Value, grace: Duration) -> Option<Box<dyn Launcher>> {
    if h.get("proxy").and_then(Value::as_bool) == Some(true) {
        return parallax_launch::driver::ssh_proxy::SshProxyLauncher::from_dict(h, grace)
            .map(|l| Box::new(l) as Box<dyn Launcher>);
    }
    SshLauncher::from_dict(h, grace).map(|l| Box::new(l) as Box<dyn Launcher>)
}

/// Stops what a cluster file's ssh entries started; the hosts whose
/// engines could not be stopped, with why.
pub fn stop_hosts(hosts: &[Value], grace: Duration) -> Vec<String> {
    let mut failed = Vec::new();
    for h in hosts {
        let Some(mut l) = restore_host(h, grace) else {
            continue;
        };
        crate::cluster_cmd::say_line(&format!("Stopping {}", l.label()));
        if let Err(e) = l.stop() {
            failed.push(format!("{}: {e}", l.label()));
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(host: &str) -> SshHost {
        SshHost {
            user: None,
            host: host.into(),
            port: None,
            engines: 1,
            parallax: None,
            python: None,
        }
    }

    #[test]
    fn a_loopback_hub_serves_only_loopback_hosts() {
        assert!(check("127.0.0.1", &[h("localhost"), h("127.0.0.1")]).is_ok());
        let e = check("127.0.0.1", &[h("localhost"), h("10.200.0.2")]).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("10.200.0.2") && msg.contains("--ip=0.0.0.0"),
            "{msg}"
        );
        assert!(check("0.0.0.0", &[h("10.200.0.2")]).is_ok());
        assert!(check("10.200.0.1", &[h("10.200.0.2")]).is_ok());
    }
}
