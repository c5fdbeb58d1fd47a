//! ssh proxy mode (ipyparallel's `SSHProxyEngineSetLauncher`), the pure
//! part: the scripts that run `parallax cluster engines` on another host,
//! so that host's own launcher (local processes there, its Slurm, its
//! mpiexec…) starts the engines, and the parsing of what they print. The
//! driver ([`crate::driver::ssh_proxy::SshProxyLauncher`]) runs them.
//!
//! One ssh connection per host runs `sh -s` with the script on its stdin.
//! The script makes a private profile directory on the host (0700, under
//! `${XDG_CACHE_HOME:-$HOME/.cache}/parallax/proxy`: a home directory is
//! what a cluster's nodes share, so a batch job there sees it too), writes
//! the hub's connection files into it (0600, from here-documents in the
//! script: the key is on no command line) with a cluster file that names
//! the hub as running elsewhere, and runs `parallax cluster engines` on
//! that profile. That command returns once its engines registered (or
//! fails, stopping them, with its own words on stderr), and so does the
//! ssh. Stop runs `parallax cluster stop` on that profile over another
//! connection — the remote launcher stops its engines its own way
//! (SIGTERM to process groups, `scancel`…) — then removes the directory.

use crate::template::shell_quote;

/// The line the script prints once its directory exists.
pub const STARTED_MARK: &str = "__parallax_ssh_proxy__";

/// The class of the hub in the host's cluster file: not started there, not
/// stopped by the host's `cluster stop`.
pub const EXTERNAL_HUB_CLASS: &str = "external";

const EOF_MARK: &str = "__PARALLAX_PROXY_EOF__";

/// The host's `cluster engines` pid while it runs, in its profile.
const STARTER_PID: &str = "starter.pid";

/// Where the host's private profiles live, as a shell word.
const BASE: &str = "\"${XDG_CACHE_HOME:-$HOME/.cache}/parallax/proxy\"";

/// The start script: `files` (name, contents) written into the private
/// profile's `security/`, then `engines_argv` (`parallax cluster engines
/// -n N …`, without `--profile-dir`, which the script adds) run there.
pub fn start_script(files: &[(String, String)], engines_argv: &[String]) -> String {
    let cmd = engines_argv
        .iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ");
    let mut s = format!(
        "set -u\n\
         umask 077\n\
         base={BASE}\n\
         mkdir -p \"$base\" || exit 1\n\
         d=$(mktemp -d \"$base/p.XXXXXX\") || exit 1\n\
         echo \"{STARTED_MARK} host=$(hostname) dir=$d\"\n\
         mkdir \"$d/security\" \"$d/log\" || exit 1\n"
    );
    for (name, text) in files {
        s.push_str(&format!(
            "cat > \"$d/security/\"{} <<'{EOF_MARK}'\n{}\n{EOF_MARK}\n",
            shell_quote(name),
            text.trim_end()
        ));
    }
    // its pid in the profile: a stop while it still waits for its
    // engines ends it first (what it started is in its cluster file by then)
    s.push_str(&format!(
        "{cmd} \"--profile-dir=$d\" </dev/null &\n\
         echo $! > \"$d/{STARTER_PID}\"\n\
         wait $!\n\
         rc=$?\n\
         rm -f \"$d/{STARTER_PID}\"\n\
         [ \"$rc\" = 0 ] || rm -rf \"$d\"\n\
         exit \"$rc\"\n"
    ));
    s
}

/// The host's name and its private profile, once the script printed them.
pub fn parse_started(output: &str) -> Option<(String, String)> {
    let line = output
        .lines()
        .find_map(|l| l.trim_end().strip_prefix(STARTED_MARK))?;
    let mut host = String::new();
    let mut dir = String::new();
    for f in line.split_whitespace() {
        if let Some(h) = f.strip_prefix("host=") {
            host = h.to_owned();
        } else if let Some(d) = f.strip_prefix("dir=") {
            dir = d.to_owned();
        }
    }
    Some((host, dir)).filter(|(_, d)| !d.is_empty())
}

/// Whether `dir` is one of the start script's directories (the path comes
/// from a file: nothing else is ever removed).
fn is_proxy_dir(dir: &str) -> bool {
    dir.contains("/parallax/proxy/p.")
        && !dir.contains("..")
        && !dir.contains(char::is_whitespace)
        && !dir.contains('\'')
}

/// `parallax cluster ACTION --profile-dir=DIR --cluster-id=CID [args]` on
/// the host, as a script line.
fn cluster_cmd(parallax: &str, action: &str, dir: &str, cid: &str, args: &[String]) -> String {
    let mut v = vec![
        parallax.to_owned(),
        "cluster".into(),
        action.into(),
        format!("--profile-dir={dir}"),
        format!("--cluster-id={cid}"),
    ];
    v.extend(args.iter().cloned());
    v.iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Stop what the host's `cluster engines` started, then remove the
/// directory (kept when the stop failed: its cluster file is the only
/// record of what may still run there).
pub fn stop_script(parallax: &str, dir: &str, cid: &str, grace_s: f64) -> String {
    if !is_proxy_dir(dir) {
        return "echo 'not a parallax proxy directory' >&2\nexit 1\n".into();
    }
    format!(
        "[ -d {d} ] || exit 0\n\
         if [ -s {d}/{STARTER_PID} ]; then\n\
         \x20 s=$(cat {d}/{STARTER_PID})\n\
         \x20 kill -TERM \"$s\" 2>/dev/null\n\
         \x20 i=0; while kill -0 \"$s\" 2>/dev/null && [ \"$i\" -lt 50 ]; do sleep 0.1; i=$((i+1)); done\n\
         fi\n\
         {cmd} </dev/null\n\
         rc=$?\n\
         [ \"$rc\" = 0 ] && rm -rf {d}\n\
         exit \"$rc\"\n",
        d = shell_quote(dir),
        cmd = cluster_cmd(
            parallax,
            "stop",
            dir,
            cid,
            &[format!("--stop-timeout={grace_s}")]
        ),
    )
}

/// Signal the engines through the host's `cluster signal`.
pub fn signal_script(parallax: &str, dir: &str, cid: &str, sig: i32) -> String {
    format!(
        "{} </dev/null\n",
        cluster_cmd(parallax, "signal", dir, cid, &[format!("--signal={sig}")])
    )
}

/// Prints 1 while the host's cluster file still lists a running set (its
/// `cluster list` forgets one whose engines are all gone), else 0.
pub fn alive_script(parallax: &str, dir: &str, cid: &str) -> String {
    let file = format!("{dir}/security/cluster-{cid}.json");
    format!(
        "[ -d {d} ] || {{ echo 0; exit 0; }}\n\
         {p} cluster list {pd} >/dev/null 2>&1\n\
         if [ -e {f} ]; then echo 1; else echo 0; fi\n",
        d = shell_quote(dir),
        p = shell_quote(parallax),
        pd = shell_quote(&format!("--profile-dir={dir}")),
        f = shell_quote(&file),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_in_a_here_document_not_a_command_line() {
        let s = start_script(
            &[
                (
                    "ipcontroller-c-client.json".into(),
                    "{\"key\": \"s3cr'et\"}\n".into(),
                ),
                ("cluster-c.json".into(), "{}".into()),
            ],
            &[
                "/opt/px/parallax".into(),
                "cluster".into(),
                "engines".into(),
                "-n".into(),
                "4".into(),
                "--engines".into(),
                "slurm".into(),
                "--queue=debug part".into(),
            ],
        );
        assert!(s.contains(&format!(
            "cat > \"$d/security/\"ipcontroller-c-client.json <<'{EOF_MARK}'\n{{\"key\": \"s3cr'et\"}}\n{EOF_MARK}\n"
        )), "{s}");
        assert!(s.contains(
            "/opt/px/parallax cluster engines -n 4 --engines slurm '--queue=debug part' \"--profile-dir=$d\" </dev/null"
        ), "{s}");
        assert!(s.starts_with("set -u\numask 077\n"));
    }

    #[test]
    fn the_start_script_runs_under_sh() {
        let home = std::env::temp_dir().join(format!("px-proxy-test-{}", std::process::id()));
        std::fs::create_dir_all(&home).unwrap();
        let script = start_script(
            &[("a.json".into(), "{\"key\": \"x\"}".into())],
            &[
                "sh".into(),
                "-c".into(),
                "d=${1#--profile-dir=}; cat $d/security/a.json; ls -ld $d | cut -c1-10; exit 3"
                    .into(),
                "x".into(),
            ],
        );
        let out = std::process::Command::new("sh")
            .arg("-s")
            .env("XDG_CACHE_HOME", &home)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(script.as_bytes())?;
                c.wait_with_output()
            })
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(3), "{text}");
        assert!(text.contains("{\"key\": \"x\"}\ndrwx------"), "{text}");
        let (host, dir) = parse_started(&text).unwrap();
        assert!(!host.is_empty());
        assert!(is_proxy_dir(&dir), "{dir}");
        // a failed start leaves no directory
        assert!(!std::path::Path::new(&dir).exists());
        std::fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn stop_and_poll_go_through_the_hosts_own_cluster_commands() {
        let d = "/home/u/.cache/parallax/proxy/p.Ab12";
        let s = stop_script("/opt/parallax", d, "c", 5.0);
        assert!(s.contains(
            "/opt/parallax cluster stop --profile-dir=/home/u/.cache/parallax/proxy/p.Ab12 --cluster-id=c --stop-timeout=5 </dev/null"
        ), "{s}");
        assert!(
            s.contains("&& rm -rf /home/u/.cache/parallax/proxy/p.Ab12\n"),
            "{s}"
        );
        for bad in ["/", "/home/u", "/x/parallax/proxy/p.1/../..", ""] {
            assert!(!stop_script("p", bad, "c", 1.0).contains("rm -rf"), "{bad}");
        }
        assert!(s.contains("kill -TERM \"$s\""), "{s}");
        assert!(signal_script("p", d, "c", 2).contains("cluster signal"));
        assert!(
            alive_script("p", d, "c").contains("security/cluster-c.json"),
            "{}",
            alive_script("p", d, "c")
        );
        assert_eq!(
            parse_started(&format!("x\n{STARTED_MARK} host=h2 dir={d}\n")),
            Some(("h2".into(), d.into()))
        );
        assert_eq!(parse_started("nothing"), None);
    }
}
