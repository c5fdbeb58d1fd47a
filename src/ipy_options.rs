//! ipengine's and ipcontroller's traitlets command-line forms, translated
//! into `parallax engine` / `parallax hub` options before clap sees them.
//!
//! ipyparallel's launchers, ipcluster profiles and users' scripts pass
//! options such as `--IPEngine.wait_for_url_file=30`,
//! `--InteractiveShell.colors=nocolor` or `--Session.key=…`. Three forms are
//! recognised, as traitlets does:
//! * `--Class.trait=value` or `--Class.trait value` — any class is
//!   accepted (traitlets ignores config for classes the program does not
//!   have);
//! * `--alias=value` / `--alias value` for ipengine's/ipcontroller's aliases
//!   that have no native option of the same name;
//! * `--flag` for their flags (`--debug`, `--mpi`, `--secure`, …).
//!
//! Each recognised option is either *honoured* (rewritten into the native
//! option) or *accepted* (dropped, with a note saying why it has no effect);
//! everything else is passed to clap unchanged, so native options and typos
//! behave as before. Only malformed traitlets options (`--.x=1`,
//! `--IPEngine.=1`, a missing value, a non-boolean for a boolean) are
//! errors. The notes are logged once tracing is set up; values of secret
//! options (the session key) never appear in them.

use std::ffi::OsString;

/// What a recognised ipengine/ipcontroller option becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `--native=value`.
    Native(&'static str),
    /// `--native=value`, the value never logged.
    Secret(&'static str),
    /// A boolean trait: `--native` when true, nothing when false.
    Switch(&'static str),
    /// A flag with a fixed native meaning: `--native=value`.
    Set(&'static str, &'static str),
    /// ipcontroller's `db_class`: the value picks `--dictdb`/`--nodb`/….
    DbClass,
    /// ipengine's `registration_url` (`tcp://host:port`): `--url` takes the
    /// address; the ports come from the connection file.
    RegistrationUrl,
    /// Accepted without effect, for this reason.
    Ignore(&'static str),
}

/// The option tables of one program.
pub struct Spec {
    /// "ipengine" or "ipcontroller", for the notes.
    pub program: &'static str,
    /// `Class.trait` → action; a `*` class matches any class.
    pub traits: &'static [(&'static str, Action)],
    /// `--alias=value` forms that are not native options.
    pub aliases: &'static [(&'static str, Action)],
    /// `--flag` forms that are not native options.
    pub flags: &'static [(&'static str, Action)],
}

/// The command line for clap, and what to log about the translation.
#[derive(Debug, Default, PartialEq)]
pub struct Translated {
    pub args: Vec<OsString>,
    pub notes: Vec<String>,
}

const NO_TUNNEL: &str = "ssh tunnels are not supported; connect directly";
const NO_LOGFILE: &str = "Parallax logs to stderr";
const NO_EFFECT_SHELL: &str = "the engine's IPython shell is configured by Parallax";

// Shared by both programs (BaseIPythonApplication / BaseParallelApplication).
const COMMON_TRAITS: &[(&str, Action)] = &[
    ("*.log_level", Action::Native("--log-level")),
    ("*.profile", Action::Native("--profile")),
    ("*.profile_dir", Action::Native("--profile-dir")),
    ("*.ipython_dir", Action::Native("--ipython-dir")),
    ("*.cluster_id", Action::Native("--cluster-id")),
    ("*.work_dir", Action::Native("--work-dir")),
    ("*.log_to_file", Action::Ignore(NO_LOGFILE)),
    ("*.log_url", Action::Ignore(NO_LOGFILE)),
    ("*.clean_logs", Action::Ignore(NO_LOGFILE)),
    ("Session.key", Action::Secret("--session-key")),
];

pub const IPENGINE: Spec = Spec {
    program: "ipengine",
    traits: &[
        ("IPEngine.url_file", Action::Native("--file")),
        ("IPEngine.registration_url", Action::RegistrationUrl),
        ("IPEngine.timeout", Action::Native("--timeout")),
        ("EngineFactory.timeout", Action::Native("--timeout")),
        (
            "IPEngine.wait_for_url_file",
            Action::Native("--wait-for-url-file"),
        ),
        ("IPEngine.id", Action::Native("--id")),
        (
            "IPEngine.max_heartbeat_misses",
            Action::Native("--max-heartbeat-misses"),
        ),
        (
            "EngineFactory.max_heartbeat_misses",
            Action::Native("--max-heartbeat-misses"),
        ),
        ("Session.keyfile", Action::Native("--session-keyfile")),
        (
            "IPEngine.enable_nanny",
            Action::Ignore(
                "the Rust engine process already supervises the interpreter (see --restart-on-crash)",
            ),
        ),
        (
            "IPEngine.use_mpi",
            Action::Ignore("MPI is not initialised by the engine (pass --id=RANK)"),
        ),
        (
            "IPEngine.startup_command",
            Action::Ignore("startup commands are not run; execute them after start"),
        ),
        (
            "IPEngine.startup_script",
            Action::Ignore("startup scripts are not run; execute them after start"),
        ),
        ("IPEngine.sshserver", Action::Ignore(NO_TUNNEL)),
        ("IPEngine.sshkey", Action::Ignore(NO_TUNNEL)),
        ("EngineFactory.sshserver", Action::Ignore(NO_TUNNEL)),
        ("EngineFactory.sshkey", Action::Ignore(NO_TUNNEL)),
        (
            "IPEngine.location",
            Action::Ignore("the controller's address comes from the connection file or --url"),
        ),
        ("InteractiveShell.*", Action::Ignore(NO_EFFECT_SHELL)),
        ("ZMQInteractiveShell.*", Action::Ignore(NO_EFFECT_SHELL)),
    ],
    aliases: &[
        (
            "c",
            Action::Ignore("startup commands are not run; execute them after start"),
        ),
        (
            "s",
            Action::Ignore("startup scripts are not run; execute them after start"),
        ),
        ("ssh", Action::Ignore(NO_TUNNEL)),
        ("sshkey", Action::Ignore(NO_TUNNEL)),
        (
            "location",
            Action::Ignore("the controller's address comes from the connection file or --url"),
        ),
        ("keyfile", Action::Native("--session-keyfile")),
        ("log-to-file", Action::Ignore(NO_LOGFILE)),
        ("clean-logs", Action::Ignore(NO_LOGFILE)),
        ("log-url", Action::Ignore(NO_LOGFILE)),
        (
            "ident",
            Action::Ignore("the engine's session id is its uuid"),
        ),
        ("user", Action::Ignore("the session user name is not used")),
    ],
    flags: &[
        (
            "mpi",
            Action::Ignore("MPI is not initialised by the engine (pass --id=RANK)"),
        ),
        ("debug", Action::Set("--log-level", "DEBUG")),
        ("quiet", Action::Set("--log-level", "CRITICAL")),
        ("log-to-file", Action::Ignore(NO_LOGFILE)),
        ("init", Action::Ignore("no profile files are created")),
        (
            "secure",
            Action::Ignore("the key always comes from the connection file (or --Session.key)"),
        ),
        (
            "no-secure",
            Action::Ignore("the key always comes from the connection file (or --Session.key)"),
        ),
    ],
};

pub const IPCONTROLLER: Spec = Spec {
    program: "ipcontroller",
    traits: &[
        ("IPController.ip", Action::Native("--ip")),
        ("IPController.transport", Action::Native("--transport")),
        ("IPController.regport", Action::Native("--port")),
        ("IPController.ports", Action::Native("--ports")),
        ("IPController.location", Action::Native("--location")),
        ("IPController.ssh_server", Action::Native("--ssh")),
        (
            "IPController.engine_ssh_server",
            Action::Native("--enginessh"),
        ),
        ("IPController.reuse_files", Action::Switch("--reuse")),
        ("IPController.restore_engines", Action::Switch("--restore")),
        ("IPController.use_threads", Action::Switch("--usethreads")),
        ("IPController.db_class", Action::DbClass),
        ("HubFactory.db_class", Action::DbClass),
        ("HeartMonitor.period", Action::Native("--ping")),
        (
            "HeartMonitor.max_heartmonitor_misses",
            Action::Native("--max-heartbeat-misses"),
        ),
        ("TaskScheduler.scheme_name", Action::Native("--scheme")),
        (
            "IPController.broadcast_scheduler_depth",
            Action::Native("--broadcast-scheduler-depth"),
        ),
        ("TaskScheduler.hwm", Action::Native("--hwm")),
        ("DictDB.record_limit", Action::Native("--record-limit")),
        ("SQLiteDB.table", Action::Native("--table")),
        ("SQLiteDB.location", Action::Native("--sqlitedb-location")),
        ("SQLiteDB.filename", Action::Native("--sqlitedb-filename")),
        (
            "Session.keyfile",
            Action::Ignore("the key is written to the connection files"),
        ),
    ],
    aliases: &[
        ("log-url", Action::Ignore(NO_LOGFILE)),
        ("ident", Action::Ignore("the hub's session id is generated")),
        ("user", Action::Ignore("the session user name is not used")),
        (
            "keyfile",
            Action::Ignore("the key is written to the connection files"),
        ),
    ],
    flags: &[
        ("debug", Action::Set("--log-level", "DEBUG")),
        ("quiet", Action::Set("--log-level", "CRITICAL")),
        ("init", Action::Ignore("no profile files are created")),
        (
            "secure",
            Action::Ignore("messages are always signed with a fresh key"),
        ),
        (
            "no-secure",
            Action::Ignore("messages are always signed with a fresh key"),
        ),
    ],
};

fn lookup(table: &[(&'static str, Action)], name: &str) -> Option<Action> {
    table.iter().find(|(k, _)| *k == name).map(|(_, a)| *a)
}

fn lookup_trait(spec: &Spec, class: &str, name: &str) -> Option<Action> {
    let full = format!("{class}.{name}");
    lookup(spec.traits, &full)
        .or_else(|| lookup(COMMON_TRAITS, &full))
        .or_else(|| lookup(spec.traits, &format!("{class}.*")))
        .or_else(|| lookup(COMMON_TRAITS, &format!("*.{name}")))
}

fn is_ident(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

/// A traitlets string value: surrounding quotes (and a bytes literal's `b`)
/// removed, as traitlets' `Unicode`/`Bytes.from_string` do.
fn unquote(v: &str) -> &str {
    let b = v.as_bytes();
    if b.len() >= 3
        && (b[0] == b'b' || b[0] == b'B')
        && (b[1] == b'\'' || b[1] == b'"')
        && b[b.len() - 1] == b[1]
    {
        return &v[2..v.len() - 1];
    }
    if b.len() >= 2 && (b[0] == b'\'' || b[0] == b'"') && b[b.len() - 1] == b[0] {
        return &v[1..v.len() - 1];
    }
    v
}

fn parse_bool(v: &str) -> Option<bool> {
    match unquote(v).to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// Translate the arguments after the subcommand name.
pub fn translate(spec: &Spec, args: Vec<OsString>) -> Result<Translated, String> {
    let mut out = Translated::default();
    let mut it = args.into_iter().peekable();
    while let Some(arg) = it.next() {
        let Some(s) = arg.to_str().map(str::to_owned) else {
            out.args.push(arg);
            continue;
        };
        let Some(body) = s.strip_prefix("--") else {
            out.args.push(arg);
            continue;
        };
        if body.is_empty() {
            // `--`: the rest is not ours to look at
            out.args.push(arg);
            out.args.extend(it);
            break;
        }
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_owned())),
            None => (body, None),
        };
        let traitlet = name.contains('.');
        let action = if traitlet {
            let parts: Vec<&str> = name.split('.').collect();
            if parts.len() != 2 || !parts.iter().all(|p| is_ident(p)) {
                return Err(format!(
                    "malformed {} option {:?}: expected --Class.trait=value (e.g. --IPEngine.timeout=10)",
                    spec.program,
                    redact_arg(&s)
                ));
            }
            Some(
                lookup_trait(spec, parts[0], parts[1])
                    .unwrap_or(Action::Ignore("no Parallax equivalent")),
            )
        } else if inline.is_some() {
            lookup(spec.aliases, name)
        } else {
            lookup(spec.flags, name).or_else(|| lookup(spec.aliases, name))
        };
        let Some(action) = action else {
            out.args.push(arg);
            continue;
        };
        let is_flag = !traitlet && inline.is_none() && lookup(spec.flags, name).is_some();
        // the value: inline, or the next argument (traitlets accepts both)
        let value = if is_flag {
            None
        } else if let Some(v) = inline {
            Some(v)
        } else {
            match it.peek().and_then(|n| n.to_str()) {
                Some(n) if !n.starts_with("--") => {
                    let v = n.to_owned();
                    it.next();
                    Some(v)
                }
                _ => {
                    return Err(format!(
                        "{} option --{name} needs a value: --{name}=VALUE",
                        spec.program
                    ));
                }
            }
        };
        let given = match (&value, action) {
            (Some(_), Action::Secret(_)) => format!("--{name}=<hidden>"),
            (Some(v), _) => format!("--{name}={v}"),
            (None, _) => format!("--{name}"),
        };
        match action {
            Action::Native(native) | Action::Secret(native) => {
                let v = value.unwrap_or_default();
                let v = unquote(&v);
                out.args.push(format!("{native}={v}").into());
                if !matches!(action, Action::Secret(_)) {
                    out.notes.push(format!(
                        "{} option {given} honoured as {native}={v}",
                        spec.program
                    ));
                } else {
                    out.notes.push(format!(
                        "{} option {given} honoured (a key on the command line is visible to other users; prefer the connection file)",
                        spec.program
                    ));
                }
            }
            Action::Switch(native) => {
                let v = value.unwrap_or_default();
                let on = parse_bool(&v).ok_or_else(|| {
                    format!(
                        "{} option --{name} expects True or False, not {v:?}",
                        spec.program
                    )
                })?;
                if on {
                    out.args.push(native.into());
                }
                out.notes.push(format!(
                    "{} option {given} honoured as {}",
                    spec.program,
                    if on { native } else { "the default" }
                ));
            }
            Action::Set(native, v) => {
                out.args.push(format!("{native}={v}").into());
                out.notes.push(format!(
                    "{} option {given} honoured as {native}={v}",
                    spec.program
                ));
            }
            Action::DbClass => {
                let v = value.unwrap_or_default();
                let cls = unquote(&v);
                // A class path or ipcontroller's lower-case shortcut.
                let short = cls.rsplit('.').next().unwrap_or(cls).to_ascii_lowercase();
                let native = match short.as_str() {
                    "dictdb" => "--dictdb",
                    "nodb" => "--nodb",
                    "sqlitedb" => "--sqlitedb",
                    "mongodb" => "--mongodb",
                    _ => {
                        return Err(format!(
                            "{} option --{name}: unknown database class {cls:?} (DictDB, NoDB, SQLiteDB, MongoDB)",
                            spec.program
                        ));
                    }
                };
                out.args.push(native.into());
                out.notes.push(format!(
                    "{} option {given} honoured as {native}",
                    spec.program
                ));
            }
            Action::RegistrationUrl => {
                let v = value.unwrap_or_default();
                let url = unquote(&v);
                // drop a trailing :port (the connection file has the ports)
                let base = match url.rsplit_once(':') {
                    Some((b, p))
                        if !p.is_empty()
                            && p.bytes().all(|c| c.is_ascii_digit())
                            && b.contains("://") =>
                    {
                        b
                    }
                    _ => url,
                };
                out.args.push(format!("--url={base}").into());
                out.notes.push(format!(
                    "{} option {given} honoured as --url={base} (ports from the connection file)",
                    spec.program
                ));
            }
            Action::Ignore(why) => {
                if let Some(v) = &value
                    && traitlet
                    && name.ends_with(".enable_nanny")
                    && parse_bool(v).is_none()
                {
                    return Err(format!(
                        "{} option --{name} expects True or False, not {v:?}",
                        spec.program
                    ));
                }
                out.notes.push(format!(
                    "{} option {given} accepted, no effect: {why}",
                    spec.program
                ));
            }
        }
    }
    Ok(out)
}

/// An argument as it may be shown in an error: a key's value hidden.
fn redact_arg(s: &str) -> String {
    match s.split_once('=') {
        Some((n, _)) if n.to_ascii_lowercase().contains("key") => format!("{n}=<hidden>"),
        _ => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tr(spec: &Spec, args: &[&str]) -> Result<(Vec<String>, Vec<String>), String> {
        translate(spec, args.iter().map(OsString::from).collect()).map(|t| {
            (
                t.args
                    .into_iter()
                    .map(|a| a.into_string().unwrap())
                    .collect(),
                t.notes,
            )
        })
    }

    #[test]
    fn ipengine_forms() {
        let (args, notes) = tr(
            &IPENGINE,
            &[
                "--InteractiveShell.colors=nocolor",
                "--IPEngine.wait_for_url_file=30",
                "--EngineFactory.timeout",
                "10",
                "--Session.key=b'sekrit'",
                "--IPEngine.enable_nanny=False",
                "--profile-dir=/tmp/p",
                "--debug",
                "--mpi",
                "--IPEngine.registration_url=tcp://10.0.0.5:5555",
                "--BaseParallelApplication.cluster_id=abc",
                "--c=import os",
            ],
        )
        .unwrap();
        assert_eq!(
            args,
            [
                "--wait-for-url-file=30",
                "--timeout=10",
                "--session-key=sekrit",
                "--profile-dir=/tmp/p",
                "--log-level=DEBUG",
                "--url=tcp://10.0.0.5",
                "--cluster-id=abc",
            ]
        );
        let all = notes.join("\n");
        assert!(!all.contains("sekrit"), "{all}");
        assert!(all.contains("--Session.key=<hidden> honoured"), "{all}");
        assert!(all.contains("--InteractiveShell.colors=nocolor accepted, no effect"));
        assert!(all.contains("--IPEngine.enable_nanny=False accepted, no effect"));
        assert!(all.contains("--mpi accepted"));
        assert!(all.contains("--c=import os accepted"));
    }

    #[test]
    fn unknown_class_options_are_accepted_and_native_ones_pass() {
        let (args, notes) = tr(&IPENGINE, &["--Foo.bar=1", "--timeout=5", "--bogus", "x"]).unwrap();
        assert_eq!(args, ["--timeout=5", "--bogus", "x"]);
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains("no Parallax equivalent"));
    }

    #[test]
    fn malformed_options_are_errors() {
        for bad in [
            &["--.timeout=1"][..],
            &["--IPEngine.=1"],
            &["--IPEngine.a.b=1"],
            &["--1x.y=2"],
            &["--IPEngine.timeout"],
            &["--IPEngine.timeout", "--debug"],
            &["--IPEngine.enable_nanny=maybe"],
        ] {
            let e = tr(&IPENGINE, bad).unwrap_err();
            assert!(
                e.contains("ipengine option") || e.contains("malformed"),
                "{e}"
            );
        }
        let e = tr(&IPENGINE, &["--Session.key.x=sekrit"]).unwrap_err();
        assert!(!e.contains("sekrit"), "{e}");
    }

    #[test]
    fn ipcontroller_forms() {
        let (args, _) = tr(
            &IPCONTROLLER,
            &[
                "--HeartMonitor.period=200",
                "--TaskScheduler.scheme_name=lru",
                "--IPController.db_class=NoDB",
                "--IPController.reuse_files=True",
                "--IPController.use_threads=False",
                "--quiet",
                "--ping=100",
            ],
        )
        .unwrap();
        assert_eq!(
            args,
            [
                "--ping=200",
                "--scheme=lru",
                "--nodb",
                "--reuse",
                "--log-level=CRITICAL",
                "--ping=100"
            ]
        );
        assert!(tr(&IPCONTROLLER, &["--IPController.db_class=Oracle"]).is_err());
        let (args, _) = tr(
            &IPCONTROLLER,
            &[
                "--HubFactory.db_class=ipyparallel.controller.sqlitedb.SQLiteDB",
                "--IPController.db_class=sqlitedb",
                "--SQLiteDB.table=runs",
                "--SQLiteDB.location=/tmp/db",
                "--SQLiteDB.filename=t.db",
            ],
        )
        .unwrap();
        assert_eq!(
            args,
            [
                "--sqlitedb",
                "--sqlitedb",
                "--table=runs",
                "--sqlitedb-location=/tmp/db",
                "--sqlitedb-filename=t.db"
            ]
        );
    }
}
