//! `parallax cluster start|engines --engines sshproxy`: ssh proxy mode
//! (ipyparallel's `SSHProxyEngineSetLauncher`). For each host of `--hosts`
//! / `--hostfile`, `parallax cluster engines -n N --engines
//! <--proxy-engines> [--proxy-args]` runs there over ssh, on a private
//! profile holding the hub's connection files, so the host's own launcher
//! starts the engines: local processes on a workstation, `slurm` on a
//! login node, `mpi` inside an allocation. The scripts are
//! `parallax_launch::ssh_proxy`'s, the I/O
//! `parallax_launch::driver::ssh_proxy::SshProxyLauncher`'s.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use parallax_launch::driver::ssh_proxy::SshProxyLauncher;
use parallax_launch::ssh::SshHost;
use parallax_launch::{LauncherKind, ssh, ssh_proxy};
use serde_json::{Value, json};

use crate::cluster_cmd::StartArgs;

#[derive(Debug, Clone, Default, Args)]
pub struct SshProxyArgs {
    /// sshproxy: the launcher each host runs its engines with (local, mpi,
    /// slurm, pbs, sge, lsf, htcondor, ssh; default local).
    #[arg(long = "proxy-engines", value_name = "LAUNCHER")]
    pub proxy_engines: Option<String>,
    /// sshproxy: more options for the host's `parallax cluster engines`
    /// (split as a shell would; repeatable), e.g. --proxy-args='--queue=debug
    /// --time=1:00:00 --extra-directive="--mem 2G"'.
    #[arg(long = "proxy-args", allow_hyphen_values = true, value_name = "ARGS")]
    pub proxy_args: Vec<String>,
}

fn split_words(values: &[String]) -> Vec<String> {
    values
        .iter()
        .flat_map(|v| v.split_whitespace().map(str::to_owned))
        .collect()
}

/// `--proxy-args`, split as a shell would split them.
fn proxy_args(args: &StartArgs) -> Result<Vec<String>> {
    let mut v = Vec::new();
    for a in &args.ssh_proxy.proxy_args {
        v.extend(
            parallax_launch::template::shell_split(a)
                .map_err(|e| anyhow::anyhow!("--proxy-args: {e}"))?,
        );
    }
    Ok(v)
}

/// The hosts' launcher, checked here before anything starts.
pub fn remote_launcher(args: &StartArgs) -> Result<LauncherKind> {
    let name = args.ssh_proxy.proxy_engines.as_deref().unwrap_or("local");
    match LauncherKind::parse(name) {
        Some(LauncherKind::SshProxy) => bail!("--proxy-engines sshproxy would proxy again"),
        Some(k) => Ok(k),
        None => bail!(
            "--proxy-engines {name:?}: not a launcher (one of: {})",
            LauncherKind::ALL.map(LauncherKind::name).join(", ")
        ),
    }
}

/// Refuse what cannot work before anything starts: options meant for the
/// proxy on another launcher, an unknown remote launcher.
pub fn check(args: &StartArgs) -> Result<()> {
    let proxy = &args.ssh_proxy;
    if args.engines != LauncherKind::SshProxy {
        if proxy.proxy_engines.is_some() || !proxy.proxy_args.is_empty() {
            bail!("--proxy-engines/--proxy-args are for --engines sshproxy");
        }
        return Ok(());
    }
    proxy_args(args)?;
    remote_launcher(args).map(drop)
}

/// `cluster engines` options for one host (after `-n N`; the script adds
/// `--profile-dir`).
fn engines_args(args: &StartArgs, host: &SshHost, cid: &str, remote: LauncherKind) -> Vec<String> {
    let mut v = vec![
        "--engines".to_owned(),
        remote.name().to_owned(),
        format!("--cluster-id={cid}"),
        format!("--timeout={}", args.timeout),
        format!("--stop-timeout={}", args.stop_timeout),
    ];
    for a in split_words(&args.engine_args) {
        v.push(format!("--engine-args={a}"));
    }
    if let Some(py) = &host.python {
        v.push(format!("--engine-args=--python={py}"));
    }
    v.extend(proxy_args(args).unwrap_or_default()); // checked at start
    v
}

/// The host's cluster file: the hub runs elsewhere (its host's `cluster
/// stop` never touches it), no engine set yet.
fn remote_cluster_file(cid: &str, remote: LauncherKind, client_info: &Value) -> String {
    json!({
        "cluster": {
            "cluster_id": cid,
            "class": "ipyparallel.cluster.cluster.Cluster",
            "controller_ip": client_info.get("interface").and_then(Value::as_str)
                .map(|i| i.trim_start_matches("tcp://")).unwrap_or(""),
            "controller_location": client_info.get("location").cloned().unwrap_or(json!("")),
            "n": 0,
        },
        "controller": {"class": ssh_proxy::EXTERNAL_HUB_CLASS, "state": {}},
        "engines": {"class": remote.name(), "sets": {}},
    })
    .to_string()
}

/// One launcher per host, for `n` engines.
#[allow(clippy::too_many_arguments)] // the pieces of a launch, as EnginePlan's
pub fn launchers(
    args: &StartArgs,
    n: u32,
    exe: &Path,
    client_file: &Path,
    engine_file: &Path,
    profile_dir: &Path,
    cid: &str,
    log_for: impl Fn(usize) -> std::path::PathBuf,
    grace: Duration,
) -> Result<Vec<SshProxyLauncher>> {
    let remote = remote_launcher(args)?;
    let hosts = crate::cluster_ssh::hosts_for(args, n)?;
    let read =
        |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let (client, engine) = (read(client_file)?, read(engine_file)?);
    let client_info: Value = serde_json::from_str(&client)
        .with_context(|| format!("parsing {}", client_file.display()))?;
    let name = |p: &Path| {
        p.file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let files = vec![
        (name(client_file), client),
        (name(engine_file), engine),
        (
            format!("cluster-{cid}.json"),
            remote_cluster_file(cid, remote, &client_info),
        ),
    ];
    Ok(hosts
        .into_iter()
        .enumerate()
        .map(|(i, host)| {
            let parallax = host
                .parallax
                .clone()
                .unwrap_or_else(|| exe.to_string_lossy().into_owned());
            let a = engines_args(args, &host, cid, remote);
            SshProxyLauncher::new(
                host,
                split_words(std::slice::from_ref(&args.ssh.ssh_cmd)),
                split_words(&args.ssh.ssh_args),
                parallax,
                remote.name().to_owned(),
                a,
                files.clone(),
                &profile_dir.to_string_lossy(),
                cid,
                log_for(i),
                grace,
            )
        })
        .collect())
}

/// `--print-script`: each host's ssh command and script, the files' contents
/// shown as placeholders (they hold the key).
pub fn describe(args: &StartArgs, n: u32, exe: &Path, cid: &str) -> Result<String> {
    let remote = remote_launcher(args)?;
    let ssh_cmd = split_words(std::slice::from_ref(&args.ssh.ssh_cmd));
    let ssh_args = split_words(&args.ssh.ssh_args);
    let (client, engine) = parallax_wire::connection::connection_file_names(cid);
    let files: Vec<(String, String)> = [client, engine, format!("cluster-{cid}.json")]
        .into_iter()
        .map(|f| (f.clone(), format!("<{f} from this profile>")))
        .collect();
    let mut out = String::new();
    for host in crate::cluster_ssh::hosts_for(args, n)? {
        let parallax = host
            .parallax
            .clone()
            .unwrap_or_else(|| exe.to_string_lossy().into_owned());
        let mut argv = vec![
            parallax,
            "cluster".into(),
            "engines".into(),
            "-n".into(),
            host.engines.to_string(),
        ];
        argv.extend(engines_args(args, &host, cid, remote));
        out.push_str(&format!(
            "# --- {} engines on {} ({} there): {} <<'EOF'\n{}EOF\n",
            host.engines,
            host.location(),
            remote.name(),
            parallax_launch::template::shell_join(&ssh::ssh_argv(&ssh_cmd, &ssh_args, &host)),
            ssh_proxy::start_script(&files, &argv)
        ));
    }
    Ok(out)
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
    fn the_hosts_launcher_and_its_options() {
        let a = args(&[
            "--engines",
            "sshproxy",
            "--hosts",
            "login1:4",
            "--proxy-engines",
            "Slurm",
            "--proxy-args=--queue=debug --time=1:00:00 --extra-directive='--mem 2G'",
            "--engine-args=--warm-imports=false",
        ]);
        assert!(check(&a).is_ok());
        assert_eq!(remote_launcher(&a).unwrap(), LauncherKind::Slurm);
        let mut host = crate::cluster_ssh::hosts(&a).unwrap().remove(0);
        host.python = Some("/opt/py".into());
        assert_eq!(
            engines_args(&a, &host, "c", LauncherKind::Slurm),
            [
                "--engines",
                "slurm",
                "--cluster-id=c",
                "--timeout=60",
                "--stop-timeout=5",
                "--engine-args=--warm-imports=false",
                "--engine-args=--python=/opt/py",
                "--queue=debug",
                "--time=1:00:00",
                "--extra-directive=--mem 2G"
            ]
        );
        let e = check(&args(&["--proxy-engines", "slurm"])).unwrap_err();
        assert!(e.to_string().contains("--engines sshproxy"), "{e}");
        for bad in ["sshproxy", "windowshpc"] {
            let a = args(&["--engines", "sshproxy", "--proxy-engines", bad]);
            assert!(check(&a).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_hosts_cluster_file_names_the_hub_external() {
        let info = json!({"interface": "tcp://0.0.0.0", "location": "10.0.0.1", "key": "k"});
        let v: Value =
            serde_json::from_str(&remote_cluster_file("c", LauncherKind::Local, &info)).unwrap();
        assert_eq!(v["controller"]["class"], "external");
        assert_eq!(v["engines"]["class"], "local");
        assert_eq!(v["cluster"]["controller_ip"], "0.0.0.0");
        assert!(!v.to_string().contains("\"k\""));
    }
}
