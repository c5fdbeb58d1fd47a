//! `parallax hub` command-line options, in ipcontroller's `--name=value` form
//! so that `ipyparallel.Cluster` and scripts written for `ipcontroller` can
//! launch the hub in its place.

use std::path::PathBuf;

use clap::Args;

use crate::scheduler::Scheme;

#[derive(Debug, Clone, Args)]
#[command(
    about = "Run the hub (an ipyparallel-compatible controller)",
    long_about = "Run the hub (an ipyparallel-compatible controller).\n\n\
        ipcontroller's traitlets options are accepted too (--Class.trait=value, \
        its aliases and flags): see the README's option table.",
    args_override_self = true
)]
pub struct HubArgs {
    /// IPython profile name; the connection files go to its security dir.
    #[arg(long, default_value = "default")]
    pub profile: String,
    /// Profile directory (overrides --profile; env IPP_PROFILE_DIR).
    #[arg(long = "profile-dir")]
    pub profile_dir: Option<PathBuf>,
    /// IPython directory holding profiles (default $IPYTHONDIR or ~/.ipython).
    #[arg(long = "ipython-dir")]
    pub ipython_dir: Option<PathBuf>,
    /// Cluster id: files are named ipcontroller-ID-{client,engine}.json (env IPP_CLUSTER_ID).
    #[arg(long = "cluster-id")]
    pub cluster_id: Option<String>,
    /// IP address to listen on (all sockets).
    #[arg(long, default_value = "127.0.0.1")]
    pub ip: String,
    /// Transport; only tcp is supported.
    #[arg(long, default_value = "tcp")]
    pub transport: String,
    /// Registration port (0 = any free port).
    #[arg(long)]
    pub port: Option<u16>,
    /// Ports to use for the channels, in ipcontroller's order (comma-separated or repeated).
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub ports: Vec<u16>,
    /// Heartbeat period in milliseconds.
    #[arg(long, default_value_t = 3000)]
    pub ping: u64,
    /// Beats an engine may miss before it is unregistered.
    #[arg(long = "max-heartbeat-misses", default_value_t = 10)]
    pub max_heartbeat_misses: u32,
    /// Load-balancing scheme: leastload, lru, plainrandom, twobin, weighted, pure.
    #[arg(long, default_value = "leastload")]
    pub scheme: Scheme,
    /// Maximum outstanding load-balanced tasks per engine (0 = unlimited).
    #[arg(long, default_value_t = 1)]
    pub hwm: u32,
    /// Log level: a name (DEBUG, INFO, WARN, ERROR, CRITICAL) or Python's numbers (10…50).
    #[arg(long = "log-level", default_value = "INFO")]
    pub log_level: String,
    /// Worker threads of the hub's runtime (`parallax hub` only; an
    /// embedded hub shares its process's). Two keep up with a thousand
    /// engines on two cores (BENCHMARKS.md); more only spread the broadcast
    /// tree's leaves over more cores.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: u16,
    /// Hostname or IP that clients and engines use to reach this machine.
    #[arg(long)]
    pub location: Option<String>,
    /// ssh server for clients, recorded in the client connection file.
    #[arg(long, default_value = "")]
    pub ssh: String,
    /// ssh server for engines, recorded in the engine connection file.
    #[arg(long, default_value = "")]
    pub enginessh: String,
    /// Use the in-memory task database (default).
    #[arg(long)]
    pub dictdb: bool,
    /// Keep no task records (results cannot be fetched from the hub later).
    #[arg(long)]
    pub nodb: bool,
    /// Keep task records in SQLite (see --sqlitedb-file, --table): they outlive the hub.
    #[arg(long)]
    pub sqlitedb: bool,
    /// MongoDB task database: not supported (the hub refuses to start; use --sqlitedb).
    #[arg(long)]
    pub mongodb: bool,
    /// Task database by name: dictdb (memory), nodb (none), sqlitedb (sqlite), mongodb;
    /// overrides --dictdb/--nodb/--sqlitedb.
    #[arg(long, value_name = "NAME")]
    pub db: Option<DbKind>,
    /// The SQLite database file (default: tasks.db in the profile directory, as ipcontroller).
    #[arg(long = "sqlitedb-file", value_name = "PATH")]
    pub sqlitedb_file: Option<PathBuf>,
    /// Directory of the SQLite database (ipcontroller's SQLiteDB.location).
    #[arg(long = "sqlitedb-location", value_name = "DIR", hide = true)]
    pub sqlitedb_location: Option<PathBuf>,
    /// File name of the SQLite database (ipcontroller's SQLiteDB.filename).
    #[arg(long = "sqlitedb-filename", value_name = "NAME", hide = true)]
    pub sqlitedb_filename: Option<String>,
    /// Table of the SQLite database holding the task records.
    #[arg(long, value_name = "NAME", default_value = "tasks")]
    pub table: String,
    /// Maximum number of task records kept in memory (with --sqlitedb: the
    /// recent records cached beside the database, which keeps them all).
    #[arg(long = "record-limit", default_value_t = 1024)]
    pub record_limit: usize,
    /// Largest message accepted, in bytes (larger ones are dropped with a warning).
    #[arg(long = "max-message-size", default_value_t = 1 << 30)]
    pub max_message_size: usize,
    /// Reuse the ports and key of existing connection files, and keep them on exit.
    #[arg(long)]
    pub reuse: bool,
    /// Accepted for ipcontroller compatibility (the hub is one process; no effect).
    #[arg(long)]
    pub usethreads: bool,
    /// Restart without losing the cluster: reload the engine table from the state
    /// file and reuse the connection files (implies --reuse).
    #[arg(long)]
    pub restore: bool,
    /// Accepted for ipcontroller compatibility (logs go to stderr).
    #[arg(long = "log-to-file", num_args = 0..=1, default_missing_value = "True")]
    pub log_to_file: Option<String>,
    /// Accepted for ipcontroller compatibility.
    #[arg(long = "clean-logs", num_args = 0..=1, default_missing_value = "True")]
    pub clean_logs: Option<String>,
    /// Working directory to change to before starting.
    #[arg(long = "work-dir")]
    pub work_dir: Option<PathBuf>,
    /// The session key for the connection files (ipcontroller's
    /// --Session.key; default: $IPP_SESSION_KEY or a fresh one).
    #[arg(long = "session-key", hide = true)]
    pub session_key: Option<String>,
    /// Seed for the random scheduling schemes (default: from the clock).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Depth of the broadcast tree (ipcontroller's broadcast_scheduler_depth):
    /// 2^DEPTH leaf sockets, each served by its own task, an engine on leaf
    /// `id % 2^DEPTH`. 0 = one leaf.
    #[arg(
        long = "broadcast-scheduler-depth",
        value_name = "DEPTH",
        default_value_t = 1,
        value_parser = clap::value_parser!(u32).range(0..=6)
    )]
    pub broadcast_scheduler_depth: u32,
}

/// The task database backends, as `--db` names them (ipcontroller's
/// `db_class` shortcuts, plus plain names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    Dict,
    None,
    Sqlite,
    Mongo,
}

impl std::str::FromStr for DbKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let short = s.rsplit('.').next().unwrap_or(s).to_ascii_lowercase();
        Ok(match short.as_str() {
            "dictdb" | "dict" | "memory" => DbKind::Dict,
            "nodb" | "none" => DbKind::None,
            "sqlitedb" | "sqlite" => DbKind::Sqlite,
            "mongodb" | "mongo" => DbKind::Mongo,
            _ => {
                return Err(format!(
                    "unknown task database {s:?}: use dictdb, nodb, sqlitedb (or memory, none, sqlite)"
                ));
            }
        })
    }
}

impl HubArgs {
    /// The task database chosen: `--db` first, then the flags (`--mongodb`,
    /// `--nodb`, `--sqlitedb`, in that order of precedence), else DictDB.
    pub fn db_kind(&self) -> DbKind {
        if let Some(k) = self.db {
            k
        } else if self.mongodb {
            DbKind::Mongo
        } else if self.nodb {
            DbKind::None
        } else if self.sqlitedb {
            DbKind::Sqlite
        } else {
            DbKind::Dict
        }
    }
}

/// Map ipcontroller's log levels to a tracing filter directive.
pub fn log_filter(level: &str) -> Result<&'static str, String> {
    let l = level.trim().to_ascii_uppercase();
    let f = match l.as_str() {
        "0" | "TRACE" => "trace",
        "10" | "DEBUG" => "debug",
        "20" | "INFO" => "info",
        "30" | "WARN" | "WARNING" => "warn",
        "40" | "50" | "ERROR" | "CRITICAL" | "FATAL" => "error",
        _ => {
            return Err(format!(
                "invalid --log-level {level:?}: use DEBUG, INFO, WARN, ERROR, CRITICAL or 10, 20, 30, 40, 50"
            ));
        }
    };
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: HubArgs,
    }

    #[test]
    fn accepts_ipcontroller_options() {
        let t = T::try_parse_from([
            "x",
            "--profile-dir=/tmp/p",
            "--cluster-id=abc",
            "--ip=127.0.0.1",
            "--ping=200",
            "--scheme=twobin",
            "--hwm=0",
            "--log-level=10",
            "--nodb",
            "--usethreads",
            "--ports=1000,1001",
        ])
        .unwrap();
        assert_eq!(t.a.cluster_id.as_deref(), Some("abc"));
        assert_eq!(t.a.ping, 200);
        assert_eq!(t.a.scheme, Scheme::TwoBin);
        assert_eq!(t.a.ports, vec![1000, 1001]);
        assert!(t.a.nodb);
        assert_eq!(log_filter(&t.a.log_level).unwrap(), "debug");
        assert!(T::try_parse_from(["x", "--scheme=fast"]).is_err());
        assert_eq!(t.a.db_kind(), DbKind::None);
        let t = T::try_parse_from(["x", "--sqlitedb", "--table=t2", "--sqlitedb-file=/tmp/x.db"])
            .unwrap();
        assert_eq!(t.a.db_kind(), DbKind::Sqlite);
        assert_eq!(t.a.table, "t2");
        for (name, kind) in [
            ("sqlite", DbKind::Sqlite),
            ("SQLiteDB", DbKind::Sqlite),
            ("ipyparallel.controller.sqlitedb.SQLiteDB", DbKind::Sqlite),
            ("memory", DbKind::Dict),
            ("nodb", DbKind::None),
            ("mongodb", DbKind::Mongo),
        ] {
            let t = T::try_parse_from(["x", "--nodb", &format!("--db={name}")]).unwrap();
            assert_eq!(t.a.db_kind(), kind, "{name}");
        }
        assert!(T::try_parse_from(["x", "--db=postgres"]).is_err());
        assert_eq!(T::try_parse_from(["x"]).unwrap().a.db_kind(), DbKind::Dict);
        assert!(log_filter("loud").is_err());
    }
}
