//! `parallax cluster start --controller ssh --controller-host
//! [user@]host[:port]`: the hub on another host over ssh (ipyparallel's
//! `SSHControllerLauncher`). Its option, the hub's command line as that
//! host runs it, and the launcher; the script is
//! `parallax_launch::ssh_controller`'s, the I/O
//! `parallax_launch::driver::ssh_hub::SshHubLauncher`'s.
//!
//! The hub listens on all interfaces of that host (`--ip` default 0.0.0.0)
//! and names it as `location` the way ssh reached it (`--location`
//! overrides: the name engines and clients use). Its connection files come
//! back over the same ssh into this profile, so everything that reads the
//! profile here — `cluster engines`, the stock `ipyparallel.Client`, a
//! kernel — works as with a local hub; the cluster file records the host,
//! the hub's pid and directory there, so `stop` and `list` work from any
//! process.

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;
use parallax_launch::driver::ssh_hub::SshHubLauncher;
use parallax_launch::ssh::SshHost;
use parallax_launch::ssh_controller::parse_controller_host;

use crate::cluster_cmd::StartArgs;

#[derive(Debug, Clone, Default, Args)]
pub struct SshControllerArgs {
    /// --controller ssh: the hub's host, `[user@]host[:port]` (ssh's
    /// options are --ssh-cmd/--ssh-args, its parallax --remote-parallax).
    #[arg(long = "controller-host", value_name = "[USER@]HOST[:PORT]")]
    pub controller_host: Option<String>,
}

/// The hub's host, for `--controller ssh`.
pub fn host(args: &StartArgs) -> Result<SshHost> {
    match &args.ssh_controller.controller_host {
        Some(spec) => parse_controller_host(spec).map_err(anyhow::Error::msg),
        None => {
            bail!("--controller ssh needs the hub's host: --controller-host [user@]host[:port]")
        }
    }
}

/// `--location` unless given: the host as ssh names it (without user and
/// port), which is how this side — and engines beside it — reach it.
pub fn default_location(args: &StartArgs) -> Option<String> {
    host(args).ok().map(|h| h.host)
}

fn split_words(values: &[String]) -> Vec<String> {
    values
        .iter()
        .flat_map(|v| v.split_whitespace().map(str::to_owned))
        .collect()
}

/// The launcher for `local_hub_argv` (`exe hub --profile-dir=… …` as it
/// would run here): the remote `parallax` in place of `exe`, and no
/// `--profile-dir` (the host makes a private one).
pub fn launcher(
    args: &StartArgs,
    local_hub_argv: Vec<String>,
    profile_dir: &Path,
    cid: &str,
    log: &Path,
    grace: Duration,
) -> Result<SshHubLauncher> {
    let host = host(args)?;
    let mut hub_argv: Vec<String> = local_hub_argv
        .into_iter()
        .filter(|a| !a.starts_with("--profile-dir="))
        .collect();
    if let Some(p) = &args.ssh.remote_parallax {
        hub_argv[0] = p.clone();
    }
    let (client, engine) = parallax_wire::connection::connection_file_names(cid);
    let security = profile_dir.join("security");
    Ok(SshHubLauncher::new(
        host,
        split_words(std::slice::from_ref(&args.ssh.ssh_cmd)),
        split_words(&args.ssh.ssh_args),
        hub_argv,
        security.join(client),
        security.join(engine),
        &profile_dir.to_string_lossy(),
        cid,
        log.to_path_buf(),
        grace,
        Duration::from_secs_f64(args.timeout.max(1.0)),
    ))
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
    fn the_hub_runs_the_remote_parallax_in_a_directory_of_its_own() {
        let a = args(&[
            "--controller",
            "ssh",
            "--controller-host",
            "bob@node1:2222",
            "--remote-parallax",
            "/opt/px/parallax",
            "--ssh-args=-F /cfg",
        ]);
        let l = launcher(
            &a,
            [
                "/here/parallax",
                "hub",
                "--profile-dir=/p",
                "--cluster-id=c",
                "--ip=0.0.0.0",
            ]
            .map(String::from)
            .to_vec(),
            Path::new("/p"),
            "c",
            Path::new("/p/log/hub.log"),
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(
            l.hub_argv,
            ["/opt/px/parallax", "hub", "--cluster-id=c", "--ip=0.0.0.0"]
        );
        assert_eq!(l.ssh_args, ["-F", "/cfg"]);
        assert_eq!(
            l.client_file,
            Path::new("/p/security/ipcontroller-c-client.json")
        );
        assert_eq!(default_location(&a).as_deref(), Some("node1"));
        let e = host(&args(&["--controller", "ssh"])).unwrap_err();
        assert!(e.to_string().contains("--controller-host"), "{e}");
    }
}
