//! The hub on another host over ssh (ipyparallel's `SSHControllerLauncher`),
//! the pure part: the `--controller-host` argument, the script the host
//! runs, and the parsing of what it prints. The driver
//! ([`crate::driver::ssh_hub::SshHubLauncher`]) runs them.
//!
//! One ssh connection runs `sh -s` with the script on its stdin (nothing
//! secret on a command line), as for engines. The script makes a private
//! profile directory on the host (`mktemp -d`, mode 0700: no shared file
//! system is assumed, and two hubs never share one), starts the hub there
//! in its own session (`setsid`, so stop kills its process group) with its
//! output in that directory, waits for the connection files and prints
//! them between marker lines on stdout: the launcher writes them into the
//! local profile (0600), so clients, kernels and engines started here later
//! use them as if the hub were local. The connection then stays open until
//! the hub exits (its last log lines come back on stderr). A hub that exits
//! before writing its files makes the script print its log on stderr and
//! exit 1 — the error `start` shows at once. Stop (another connection)
//! kills the hub's session and removes the directory.

use crate::ssh::{SESSION_FNS, SshHost};
use crate::template::shell_quote;

/// `--controller-host [user@]host[:port]`.
pub fn parse_controller_host(spec: &str) -> Result<SshHost, String> {
    let what = format!("--controller-host {spec:?}");
    let (user, rest) = match spec.split_once('@') {
        Some((u, h)) if !u.is_empty() => (Some(u.to_owned()), h),
        Some(_) => return Err(format!("{what}: the user before @ is empty")),
        None => (None, spec),
    };
    let (host, port) = match rest.split_once(':') {
        Some((h, p)) => {
            let port = p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{what}: {p:?} is not a port"))?;
            (h, Some(port))
        }
        None => (rest, None),
    };
    if host.is_empty() || host.contains(char::is_whitespace) || host.starts_with('-') {
        return Err(format!(
            "{what}: {host:?} is not a host name (expected [user@]host[:port])"
        ));
    }
    Ok(SshHost {
        user,
        host: host.to_owned(),
        port,
        engines: 1,
        parallax: None,
        python: None,
    })
}

/// The line the script prints once the hub runs.
pub const STARTED_MARK: &str = "__parallax_ssh_hub__";
/// Starts a connection file: `__parallax_ssh_hub_file__ client|engine`.
pub const FILE_MARK: &str = "__parallax_ssh_hub_file__";
/// After the last file.
pub const END_MARK: &str = "__parallax_ssh_hub_end__";
/// The hub ended before writing its files (its log follows on stderr).
pub const FAILED_MARK: &str = "__parallax_ssh_hub_failed__";

/// The start script: `hub_argv` (`parallax hub --cluster-id=… --ip=…`,
/// without `--profile-dir`, which the script adds) run in a fresh private
/// directory; waits up to `timeout_s` for `client_name` and `engine_name`
/// in its `security/`.
pub fn start_script(
    hub_argv: &[String],
    client_name: &str,
    engine_name: &str,
    timeout_s: f64,
) -> String {
    let cmd = hub_argv
        .iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ");
    let ticks = (timeout_s * 20.0).ceil().max(1.0) as u64;
    let (c, e) = (shell_quote(client_name), shell_quote(engine_name));
    format!(
        "set -u\n\
         umask 077\n\
         {SESSION_FNS}\
         d=$(mktemp -d \"${{TMPDIR:-/tmp}}/parallax-hub.XXXXXX\") || exit 1\n\
         setsid {cmd} \"--profile-dir=$d\" </dev/null >\"$d/hub.log\" 2>&1 &\n\
         pid=$!\n\
         echo \"{STARTED_MARK} host=$(hostname) pid=$pid dir=$d\"\n\
         c=\"$d/security/\"{c}\n\
         e=\"$d/security/\"{e}\n\
         fail() {{\n\
         \x20 echo \"{FAILED_MARK} $1\"\n\
         \x20 echo \"the hub on $(hostname) $1; its output:\" >&2\n\
         \x20 cat \"$d/hub.log\" >&2\n\
         \x20 rm -rf \"$d\"\n\
         \x20 exit 1\n\
         }}\n\
         i=0\n\
         while [ ! -s \"$c\" ] || [ ! -s \"$e\" ]; do\n\
         \x20 if [ \"$(live \"$pid\")\" = 0 ]; then wait \"$pid\"; fail \"exited (status $?) before writing its connection files\"; fi\n\
         \x20 i=$((i+1))\n\
         \x20 if [ \"$i\" -gt {ticks} ]; then sig KILL \"$pid\"; fail \"wrote no connection files within {timeout_s} s\"; fi\n\
         \x20 sleep 0.05\n\
         done\n\
         echo \"{FILE_MARK} client\"\n\
         cat \"$c\"; echo\n\
         echo \"{FILE_MARK} engine\"\n\
         cat \"$e\"; echo\n\
         echo \"{END_MARK}\"\n\
         wait \"$pid\"\n\
         rc=$?\n\
         tail -n 20 \"$d/hub.log\" >&2\n\
         rm -rf \"$d\"\n\
         exit \"$rc\"\n"
    )
}

/// What the start script printed so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubOutput {
    /// The host's name, the hub's pid (its session) and its directory.
    pub started: Option<(String, i64, String)>,
    /// The connection files (`client`, `engine`), once all were printed.
    pub files: Option<(String, String)>,
    /// Why the hub failed, if the script said so.
    pub failed: Option<String>,
}

/// Parses the start script's stdout (all of it so far).
pub fn parse_output(text: &str) -> HubOutput {
    let mut out = HubOutput::default();
    let mut current: Option<&str> = None;
    let mut client = String::new();
    let mut engine = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(STARTED_MARK) {
            let (mut host, mut pid, mut dir) = (String::new(), 0, String::new());
            for f in rest.split_whitespace() {
                if let Some(h) = f.strip_prefix("host=") {
                    host = h.to_owned();
                } else if let Some(p) = f.strip_prefix("pid=") {
                    pid = p.parse().unwrap_or(0);
                } else if let Some(d) = f.strip_prefix("dir=") {
                    dir = d.to_owned();
                }
            }
            out.started = Some((host, pid, dir));
        } else if let Some(rest) = line.strip_prefix(FILE_MARK) {
            current = match rest.trim() {
                "client" => Some("client"),
                "engine" => Some("engine"),
                _ => None,
            };
        } else if line.starts_with(END_MARK) {
            out.files = Some((client.trim().to_owned(), engine.trim().to_owned()));
            current = None;
        } else if let Some(rest) = line.strip_prefix(FAILED_MARK) {
            out.failed = Some(rest.trim().to_owned());
        } else {
            match current {
                Some("client") => {
                    client.push_str(line);
                    client.push('\n');
                }
                Some("engine") => {
                    engine.push_str(line);
                    engine.push('\n');
                }
                _ => {}
            }
        }
    }
    out
}

/// SIGTERM the hub's session, SIGKILL after `grace_s`, then remove its
/// directory (only a `parallax-hub.*` one: the path comes from a file).
pub fn stop_script(pid: i64, dir: &str, grace_s: f64) -> String {
    // the engines' stop script, in a subshell: its `exit` ends only that
    let mut s = if pid > 1 {
        format!("(\n{})\n", crate::ssh::stop_script(&[pid], grace_s))
    } else {
        String::new()
    };
    let base = dir.rsplit('/').next().unwrap_or("");
    if base.starts_with("parallax-hub.") && !dir.contains("..") {
        s.push_str(&format!("rm -rf {}\n", shell_quote(dir)));
    }
    s.push_str("exit 0\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_host_argument() {
        let h = parse_controller_host("alice@10.0.0.2:2222").unwrap();
        assert_eq!(h.user.as_deref(), Some("alice"));
        assert_eq!((h.host.as_str(), h.port), ("10.0.0.2", Some(2222)));
        assert_eq!(h.location(), "alice@10.0.0.2:2222");
        let h = parse_controller_host("node1").unwrap();
        assert_eq!((h.user, h.host.as_str(), h.port), (None, "node1", None));
        for bad in ["", "@h", "h:0", "h:x", "h:1:2", "-oProxyCommand=x", "a b"] {
            assert!(parse_controller_host(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_script_holds_no_secret_and_quotes_its_arguments() {
        let s = start_script(
            &[
                "/opt/px/parallax".into(),
                "hub".into(),
                "--cluster-id=c 1".into(),
                "--ip=0.0.0.0".into(),
            ],
            "ipcontroller-c 1-client.json",
            "ipcontroller-c 1-engine.json",
            30.0,
        );
        assert!(
            s.contains(
                "setsid /opt/px/parallax hub '--cluster-id=c 1' --ip=0.0.0.0 \"--profile-dir=$d\" </dev/null"
            ),
            "{s}"
        );
        assert!(
            s.contains("c=\"$d/security/\"'ipcontroller-c 1-client.json'"),
            "{s}"
        );
        assert!(s.contains("-gt 600 ]"), "{s}");
        assert!(s.contains("umask 077"));
    }

    #[test]
    fn output_is_parsed_as_it_arrives() {
        let mut text = format!("{STARTED_MARK} host=pxhost1 pid=4242 dir=/tmp/parallax-hub.Ab12\n");
        let o = parse_output(&text);
        assert_eq!(
            o.started,
            Some(("pxhost1".into(), 4242, "/tmp/parallax-hub.Ab12".into()))
        );
        assert_eq!(o.files, None);
        text.push_str(&format!(
            "{FILE_MARK} client\n{{\n  \"key\": \"k\"\n}}\n{FILE_MARK} engine\n{{\"key\": \"k\"}}\n\n"
        ));
        assert_eq!(parse_output(&text).files, None, "not complete yet");
        text.push_str(&format!("{END_MARK}\n"));
        let o = parse_output(&text);
        let (c, e) = o.files.unwrap();
        assert_eq!(c, "{\n  \"key\": \"k\"\n}");
        assert_eq!(e, "{\"key\": \"k\"}");
        let f = parse_output(&format!(
            "{STARTED_MARK} host=h pid=1 dir=/d\n{FAILED_MARK} exited (status 127) before writing\n"
        ));
        assert_eq!(
            f.failed.as_deref(),
            Some("exited (status 127) before writing")
        );
    }

    #[test]
    fn stop_removes_only_the_hubs_directory() {
        let s = stop_script(4242, "/tmp/parallax-hub.Ab12", 2.0);
        assert!(s.contains("sig TERM \"$p\""), "{s}");
        assert!(s.contains("rm -rf /tmp/parallax-hub.Ab12\nexit 0\n"), "{s}");
        for bad in ["/", "/home/u", "/tmp/parallax-hub.x/../..", ""] {
            assert!(!stop_script(4242, bad, 1.0).contains("rm -rf"), "{bad}");
        }
        assert!(!stop_script(0, "/tmp/parallax-hub.x", 1.0).contains("sig TERM"));
    }

    fn run_sh(script: &str) -> (Option<i32>, String, String) {
        let out = std::process::Command::new("sh")
            .arg("-s")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(script.as_bytes())?;
                c.wait_with_output()
            })
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    #[test]
    fn a_hub_that_fails_gives_its_output_and_leaves_no_directory() {
        let hub = [
            "sh".to_owned(),
            "-c".to_owned(),
            "echo 'no such option' >&2; exit 2".to_owned(),
        ];
        let (code, out, err) = run_sh(&start_script(&hub, "c.json", "e.json", 10.0));
        assert_eq!(code, Some(1), "{out}{err}");
        let o = parse_output(&out);
        let (_, pid, dir) = o.started.unwrap();
        assert!(pid > 0);
        assert!(o.failed.unwrap().contains("status 2"), "{out}");
        assert!(err.contains("no such option"), "{err}");
        assert!(!std::path::Path::new(&dir).exists());
    }

    #[test]
    fn a_hub_that_writes_its_files_is_reported_then_stopped() {
        // a "hub" that writes both files into $profile_dir/security, then waits
        let hub = [
            "sh".to_owned(),
            "-c".to_owned(),
            "d=${1#--profile-dir=}; mkdir -p $d/security; echo '{\"key\": \"x\"}' > $d/security/c.json; \
             echo '{\"key\": \"y\"}' > $d/security/e.json; exec sleep 30"
                .to_owned(),
            "hub".to_owned(),
        ];
        let script = start_script(&hub, "c.json", "e.json", 10.0);
        let mut child = std::process::Command::new("sh")
            .arg("-s")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(script.as_bytes())
                .unwrap();
        }
        let mut stdout = child.stdout.take().unwrap();
        let mut text = String::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut buf = [0u8; 4096];
        while parse_output(&text).files.is_none() && std::time::Instant::now() < deadline {
            use std::io::Read;
            let n = stdout.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        let o = parse_output(&text);
        assert_eq!(
            o.files,
            Some(("{\"key\": \"x\"}".into(), "{\"key\": \"y\"}".into())),
            "{text}"
        );
        let (_, pid, dir) = o.started.unwrap();
        assert!(std::path::Path::new(&dir).join("hub.log").exists());
        let (code, out, _) = run_sh(&stop_script(pid, &dir, 2.0));
        assert_eq!(code, Some(0), "{out}");
        assert!(!std::path::Path::new(&dir).exists());
        let status = child.wait().unwrap();
        assert!(!status.success());
    }
}
