//! Engines on other hosts over ssh (ipyparallel's `SSHEngineSetLauncher`),
//! the pure part: host lists, the ssh command line, the scripts run on the
//! remote host and the parsing of what they print. The driver
//! ([`crate::driver::SshLauncher`]) runs them.
//!
//! One ssh connection per host starts all of that host's engines and stays
//! open while they run: the engines' output streams back into the local
//! log, and the connection ending means the engines ended (ipyparallel
//! opens one connection per engine and polls each with another). The
//! script goes to `sh -s` on ssh's stdin, so nothing secret (the
//! connection info with its HMAC key) is ever on a command line, local or
//! remote. Each engine runs in its own session (`setsid`), so stopping
//! kills its process group: the engine and its Python.

use crate::template::shell_quote;

/// A host and how many engines it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshHost {
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
    pub engines: u32,
    /// The `parallax` executable on that host (default: the launcher's).
    pub parallax: Option<String>,
    /// The Python the engines run user code in (`--python`).
    pub python: Option<String>,
}

impl SshHost {
    /// `user@host` or `host`, as ssh takes it.
    pub fn destination(&self) -> String {
        match &self.user {
            Some(u) => format!("{u}@{}", self.host),
            None => self.host.clone(),
        }
    }

    /// `user@host:port` as ipyparallel's `location` (and our labels).
    pub fn location(&self) -> String {
        match self.port {
            Some(p) => format!("{}:{p}", self.destination()),
            None => self.destination(),
        }
    }

    /// Whether the host is this one through loopback (a hub on 127.0.0.1
    /// reaches it).
    pub fn is_loopback(&self) -> bool {
        is_loopback_name(&self.host)
    }
}

/// `localhost`, `127.x.y.z`, `::1`.
pub fn is_loopback_name(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn split_user(s: &str) -> (Option<String>, &str) {
    match s.split_once('@') {
        Some((u, h)) if !u.is_empty() => (Some(u.to_owned()), h),
        Some((_, h)) => (None, h),
        None => (None, s),
    }
}

fn parse_count(s: &str, what: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!(
            "{what}: {s:?} is not a number of engines (1 or more)"
        )),
    }
}

fn parse_port(s: &str, what: &str) -> Result<u16, String> {
    s.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{what}: {s:?} is not a port"))
}

fn check_host(h: &str, what: &str) -> Result<(), String> {
    if h.is_empty() || h.contains(char::is_whitespace) || h.starts_with('-') {
        return Err(format!("{what}: {h:?} is not a host name"));
    }
    Ok(())
}

/// `--hosts 'h1:4,alice@h2:8,h3,h4:2222:2'`: `[user@]host[:N]` (N engines,
/// default 1) or `[user@]host:PORT:N`.
pub fn parse_hosts_arg(spec: &str) -> Result<Vec<SshHost>, String> {
    let mut out = Vec::new();
    for item in spec.split([',', ' ', '\n']).filter(|s| !s.is_empty()) {
        let what = format!("--hosts entry {item:?}");
        let (user, rest) = split_user(item);
        let parts: Vec<&str> = rest.split(':').collect();
        let (host, port, engines) = match parts.as_slice() {
            [h] => (*h, None, 1),
            [h, n] => (*h, None, parse_count(n, &what)?),
            [h, p, n] => (*h, Some(parse_port(p, &what)?), parse_count(n, &what)?),
            _ => {
                return Err(format!(
                    "{what}: expected [user@]host[:N] or [user@]host:PORT:N"
                ));
            }
        };
        check_host(host, &what)?;
        out.push(SshHost {
            user,
            host: host.to_owned(),
            port,
            engines,
            parallax: None,
            python: None,
        });
    }
    if out.is_empty() {
        return Err("--hosts names no host".into());
    }
    Ok(out)
}

/// A hosts file: one host per line, `[user@]host[:port] [N] [parallax=PATH]
/// [python=PATH]` (N engines, default 1); `#` starts a comment.
pub fn parse_hosts_file(text: &str) -> Result<Vec<SshHost>, String> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let what = format!("hosts file line {}", i + 1);
        let mut fields = line.split_whitespace();
        let first = fields.next().expect("non-empty line");
        let (user, rest) = split_user(first);
        let (host, port) = match rest.split_once(':') {
            Some((h, p)) => (h, Some(parse_port(p, &what)?)),
            None => (rest, None),
        };
        check_host(host, &what)?;
        let mut h = SshHost {
            user,
            host: host.to_owned(),
            port,
            engines: 1,
            parallax: None,
            python: None,
        };
        let mut counted = false;
        for f in fields {
            match f.split_once('=') {
                Some(("parallax", p)) if !p.is_empty() => h.parallax = Some(p.to_owned()),
                Some(("python", p)) if !p.is_empty() => h.python = Some(p.to_owned()),
                Some(("engines" | "n", n)) if !counted => {
                    h.engines = parse_count(n, &what)?;
                    counted = true;
                }
                None if !counted => {
                    h.engines = parse_count(f, &what)?;
                    counted = true;
                }
                _ => {
                    return Err(format!(
                        "{what}: unexpected {f:?} (fields: [user@]host[:port] [N] [parallax=PATH] [python=PATH])"
                    ));
                }
            }
        }
        out.push(h);
    }
    if out.is_empty() {
        return Err("the hosts file names no host".into());
    }
    Ok(out)
}

/// The engines per host for `n` engines: the hosts in order, each up to
/// its count (ipyparallel's `engines` dict; `n` is an upper limit there
/// too). `None` for `n`: every slot. More than the slots is an error.
pub fn assign(hosts: &[SshHost], n: Option<u32>) -> Result<Vec<SshHost>, String> {
    let slots: u32 = hosts.iter().map(|h| h.engines).sum();
    let mut left = n.unwrap_or(slots);
    if left > slots {
        return Err(format!(
            "-n {left} asks for more engines than the hosts have slots for ({slots}: {})",
            hosts
                .iter()
                .map(|h| format!("{}:{}", h.location(), h.engines))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let mut out = Vec::new();
    for h in hosts {
        if left == 0 {
            break;
        }
        let k = h.engines.min(left);
        left -= k;
        out.push(SshHost {
            engines: k,
            ..h.clone()
        });
    }
    Ok(out)
}

/// `ssh [args] [-p port] [user@]host sh -s`: the script comes on stdin.
pub fn ssh_argv(ssh_cmd: &[String], ssh_args: &[String], host: &SshHost) -> Vec<String> {
    let mut v = ssh_cmd.to_vec();
    v.extend(ssh_args.iter().cloned());
    if let Some(p) = host.port {
        v.push("-p".into());
        v.push(p.to_string());
    }
    v.push(host.destination());
    v.push("sh -s".into());
    v
}

/// The line the start script prints once the engines run.
pub const STARTED_MARK: &str = "__parallax_ssh_started__";

/// The script that starts `host.engines` engines (`engine_argv` with the
/// host's `parallax` in place of the first word), each in its own session
/// with stdin from /dev/null, prints their pids, and waits for them: its
/// exit status is the last failed engine's (0 if none failed).
pub fn start_script(env: &[(String, String)], engine_argv: &[String], host: &SshHost) -> String {
    let mut argv = engine_argv.to_vec();
    if let (Some(p), Some(first)) = (&host.parallax, argv.first_mut()) {
        *first = p.clone();
    }
    if let Some(py) = &host.python {
        argv.push(format!("--python={py}"));
    }
    let cmd = argv
        .iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ");
    let mut s = String::from("set -u\n");
    for (k, v) in env {
        s.push_str(&format!("{k}={}; export {k}\n", shell_quote(v)));
    }
    s.push_str(&format!(
        "pids=''\n\
         i=0\n\
         while [ \"$i\" -lt {n} ]; do\n\
         \x20 setsid {cmd} </dev/null 2>&1 &\n\
         \x20 pids=\"$pids $!\"\n\
         \x20 i=$((i+1))\n\
         done\n\
         echo \"{STARTED_MARK} host=$(hostname) pids=$pids\"\n\
         rc=0\n\
         for p in $pids; do wait \"$p\" || rc=$?; done\n\
         exit \"$rc\"\n",
        n = host.engines,
    ));
    s
}

/// What the start script printed: the remote host name and the engines'
/// pids (each its process group), once it has.
pub fn parse_started(output: &str) -> Option<(String, Vec<i64>)> {
    let line = output
        .lines()
        .find_map(|l| l.trim_end().strip_prefix(STARTED_MARK))?;
    let mut host = String::new();
    let mut pids = Vec::new();
    for f in line.split_whitespace() {
        if let Some(h) = f.strip_prefix("host=") {
            host = h.to_owned();
        } else if let Some(p) = f.strip_prefix("pids=") {
            pids.extend(p.parse::<i64>().ok());
        } else if let Ok(p) = f.parse::<i64>() {
            pids.push(p);
        }
    }
    Some((host, pids))
}

fn group_list(pids: &[i64]) -> String {
    pids.iter()
        .filter(|p| **p > 1)
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The line the stop script prints when it had to SIGKILL.
pub const KILLED_MARK: &str = "__parallax_ssh_killed__";

/// Shell functions of the stop and poll scripts: `sig S SID` signals every
/// process of a session (the engine leads its own, and its Python stays
/// in it even in another process group), `live SID` counts the session's
/// processes that are not zombies.
pub(crate) const SESSION_FNS: &str = "sig() { if command -v pkill >/dev/null 2>&1; then pkill -\"$1\" -s \"$2\"; else kill -\"$1\" -\"$2\"; fi; } 2>/dev/null\n\
live() { c=$(ps -o stat= -s \"$1\" 2>/dev/null | grep -vc '^Z'); echo \"${c:-0}\"; }\n";

/// SIGTERM each engine's session, wait up to `grace_s` for all of them to
/// end, SIGKILL what is left (and say so). Then wait (2 s at most) for the
/// host zygotes these engines started (`parallax engine --host-zygote`:
/// their children, in sessions of their own) to leave on their own; they
/// are never signalled, as engines of another set may still use them.
pub fn stop_script(pids: &[i64], grace_s: f64) -> String {
    let groups = group_list(pids);
    let ticks = (grace_s * 10.0).ceil().max(1.0) as u64;
    format!(
        "{SESSION_FNS}\
         z=''\n\
         for p in {groups}; do z=\"$z $(ps -o pid=,args= --ppid \"$p\" 2>/dev/null | awk '/--host-lock/ {{print $1}}')\"; done\n\
         for p in {groups}; do sig TERM \"$p\"; done\n\
         i=0\n\
         gone=0\n\
         while [ \"$i\" -lt {ticks} ]; do\n\
         \x20 n=0\n\
         \x20 for p in {groups}; do n=$((n + $(live \"$p\"))); done\n\
         \x20 [ \"$n\" = 0 ] && {{ gone=1; break; }}\n\
         \x20 sleep 0.1\n\
         \x20 i=$((i+1))\n\
         done\n\
         if [ \"$gone\" = 0 ]; then\n\
         \x20 for p in {groups}; do sig KILL \"$p\"; done\n\
         \x20 echo {KILLED_MARK}\n\
         fi\n\
         j=0\n\
         while [ \"$j\" -lt 20 ]; do\n\
         \x20 n=0\n\
         \x20 for q in $z; do kill -0 \"$q\" 2>/dev/null && n=$((n+1)); done\n\
         \x20 [ \"$n\" = 0 ] && break\n\
         \x20 sleep 0.1\n\
         \x20 j=$((j+1))\n\
         done\n\
         exit 0\n"
    )
}

/// Send signal `sig` (a number) to each engine (not its Python: the
/// engine forwards SIGINT as an interrupt itself).
pub fn signal_script(pids: &[i64], sig: i32) -> String {
    format!(
        "rc=1\nfor p in {}; do kill -{sig} \"$p\" 2>/dev/null && rc=0; done\nexit $rc\n",
        group_list(pids)
    )
}

/// How many of the engines' sessions still have a live process: the
/// script prints a number.
pub fn alive_script(pids: &[i64]) -> String {
    format!(
        "{SESSION_FNS}n=0\nfor p in {}; do [ \"$(live \"$p\")\" -gt 0 ] && n=$((n+1)); done\necho $n\n",
        group_list(pids)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(host: &str, engines: u32) -> SshHost {
        SshHost {
            user: None,
            host: host.into(),
            port: None,
            engines,
            parallax: None,
            python: None,
        }
    }

    #[test]
    fn hosts_argument() {
        let v = parse_hosts_arg("h1:4,alice@h2:8, h3 ,h4:2222:2").unwrap();
        assert_eq!(v[0], h("h1", 4));
        assert_eq!(v[1].user.as_deref(), Some("alice"));
        assert_eq!((v[1].host.as_str(), v[1].engines), ("h2", 8));
        assert_eq!(v[2], h("h3", 1));
        assert_eq!((v[3].port, v[3].engines), (Some(2222), 2));
        assert_eq!(v[3].location(), "h4:2222");
        for bad in [
            "",
            "h1:0",
            "h1:x",
            "h1:1:2:3",
            "h:99999:1",
            "-oProxyCommand=x:1",
        ] {
            assert!(parse_hosts_arg(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn hosts_file() {
        let v = parse_hosts_file(
            "# the cluster\n\
             h1 4\n\
             bob@h2:2222  2 parallax=/opt/px/bin/parallax python=/opt/venv/bin/python3  # gpu\n\
             \n\
             h3\n\
             h4 engines=3\n",
        )
        .unwrap();
        assert_eq!(v.len(), 4);
        assert_eq!(v[0], h("h1", 4));
        assert_eq!(v[1].destination(), "bob@h2");
        assert_eq!((v[1].port, v[1].engines), (Some(2222), 2));
        assert_eq!(v[1].parallax.as_deref(), Some("/opt/px/bin/parallax"));
        assert_eq!(v[1].python.as_deref(), Some("/opt/venv/bin/python3"));
        assert_eq!(v[2], h("h3", 1));
        assert_eq!(v[3].engines, 3);
        let e = parse_hosts_file("h1 2 3\n").unwrap_err();
        assert!(e.contains("line 1") && e.contains("\"3\""), "{e}");
        assert!(parse_hosts_file("h1 pyhton=/x\n").is_err());
        assert!(parse_hosts_file("h1:notaport\n").is_err());
        assert!(parse_hosts_file("# nothing\n").is_err());
    }

    #[test]
    fn assignment_fills_hosts_in_order() {
        let hosts = [h("a", 2), h("b", 3)];
        let all = assign(&hosts, None).unwrap();
        assert_eq!(all.iter().map(|h| h.engines).collect::<Vec<_>>(), [2, 3]);
        let three = assign(&hosts, Some(3)).unwrap();
        assert_eq!(
            three
                .iter()
                .map(|h| (h.host.as_str(), h.engines))
                .collect::<Vec<_>>(),
            [("a", 2), ("b", 1)]
        );
        assert_eq!(assign(&hosts, Some(1)).unwrap().len(), 1);
        let e = assign(&hosts, Some(6)).unwrap_err();
        assert!(e.contains("(5: a:2, b:3)"), "{e}");
    }

    #[test]
    fn loopback() {
        for l in ["localhost", "127.0.0.1", "127.1.2.3", "::1", "[::1]"] {
            assert!(is_loopback_name(l), "{l}");
        }
        for r in ["10.200.0.2", "h1", "example.org"] {
            assert!(!is_loopback_name(r), "{r}");
        }
    }

    #[test]
    fn command_line_has_no_secret() {
        let mut host = h("10.0.0.2", 2);
        host.port = Some(2222);
        host.user = Some("root".into());
        let argv = ssh_argv(&["ssh".into()], &["-F".into(), "/cfg".into()], &host);
        assert_eq!(
            argv,
            ["ssh", "-F", "/cfg", "-p", "2222", "root@10.0.0.2", "sh -s"]
        );
        let env = [(
            "IPP_CONNECTION_INFO".to_owned(),
            "{\"key\": \"s3cr'et\"}".to_owned(),
        )];
        let script = start_script(
            &env,
            &[
                "/bin/parallax".into(),
                "engine".into(),
                "--n-engines=2".into(),
            ],
            &host,
        );
        assert!(script.contains(r#"IPP_CONNECTION_INFO='{"key": "s3cr'"'"'et"}'; export"#));
        assert!(script.contains("setsid /bin/parallax engine --n-engines=2 </dev/null"));
        assert!(script.contains("-lt 2 ]"));
    }

    #[test]
    fn host_overrides_reach_the_script() {
        let mut host = h("h", 1);
        host.parallax = Some("/opt/parallax".into());
        host.python = Some("/opt/py 3/python".into());
        let s = start_script(&[], &["/bin/parallax".into(), "engine".into()], &host);
        assert!(
            s.contains("setsid /opt/parallax engine '--python=/opt/py 3/python'"),
            "{s}"
        );
    }

    #[test]
    fn scripts_run_under_sh() {
        // the start script, run here by sh, starts and reports real processes
        let host = h("localhost", 2);
        let script = start_script(
            &[("PX_TEST_VALUE".into(), "it's".into())],
            &[
                "sh".into(),
                "-c".into(),
                "echo \"$PX_TEST_VALUE\"; exit 3".into(),
            ],
            &host,
        );
        let out = std::process::Command::new("sh")
            .arg("-s")
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
        assert_eq!(text.matches("it's").count(), 2, "{text}");
        let (host, pids) = parse_started(&text).unwrap();
        assert!(!host.is_empty());
        assert_eq!(pids.len(), 2);
        assert!(parse_started("nothing yet\n").is_none());
    }

    #[test]
    fn stop_script_kills_sessions() {
        let s = stop_script(&[101, 102, 1, 0], 2.0);
        assert!(s.contains("for p in 101 102; do sig TERM \"$p\""));
        assert!(s.contains("-lt 20 ]"));
        assert!(signal_script(&[7], 2).contains("kill -2 \"$p\""));
        assert!(alive_script(&[7, 8]).contains("for p in 7 8;"));
    }

    fn sh(script: &str) -> String {
        let out = std::process::Command::new("sh")
            .args(["-c", script])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn stop_script_ends_a_session_that_ignores_sigterm() {
        // an "engine" leading its session, with a "Python" in another
        // process group of the same session, both ignoring SIGTERM
        let pid: i64 = sh(
            "setsid sh -c 'trap \"\" TERM; perl -e \"setpgrp; \\$SIG{TERM}=q(IGNORE); sleep 60\" & sleep 60' \
             </dev/null >/dev/null 2>&1 & echo $!",
        )
        .trim()
        .parse()
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert_eq!(sh(&alive_script(&[pid])).trim(), "1");
        let out = sh(&stop_script(&[pid], 0.3));
        assert!(out.contains(KILLED_MARK), "{out}");
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(sh(&alive_script(&[pid])).trim(), "0");
    }
}
