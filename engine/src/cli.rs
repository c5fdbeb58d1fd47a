//! `parallax engine` options, named after ipengine's where they exist.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Language {
    Python,
    Rust,
}

#[derive(Debug, Clone, Args)]
#[command(
    about = "Run an engine (like ipengine) that executes code for a hub",
    long_about = "Run an engine (like ipengine) that executes code for a hub.\n\n\
        ipengine's traitlets options are accepted too (--Class.trait=value, \
        its aliases and flags): see the README's option table.",
    args_override_self = true
)]
pub struct EngineArgs {
    /// Engine connection file (ipcontroller-*-engine.json).
    #[arg(long = "file", visible_alias = "f")]
    pub file: Option<PathBuf>,
    /// IPython profile name, to find the connection file.
    #[arg(long, default_value = "default")]
    pub profile: String,
    /// Profile directory (env IPP_PROFILE_DIR), to find the connection file.
    #[arg(long = "profile-dir")]
    pub profile_dir: Option<PathBuf>,
    /// IPython directory holding profiles (default $IPYTHONDIR or ~/.ipython).
    #[arg(long = "ipython-dir")]
    pub ipython_dir: Option<PathBuf>,
    /// Cluster id (env IPP_CLUSTER_ID), to find the connection file.
    #[arg(long = "cluster-id")]
    pub cluster_id: Option<String>,
    /// Override the controller's address: a full URL such as tcp://10.0.0.5 …
    #[arg(long)]
    pub url: Option<String>,
    /// … or just the controller's IP/hostname.
    #[arg(long = "controller-ip")]
    pub controller_ip: Option<String>,
    /// Engine id to request; the hub honours it if free. Default: the MPI or
    /// srun rank (OMPI_COMM_WORLD_RANK, PMI_RANK, PMIX_RANK, SLURM_PROCID).
    #[arg(long)]
    pub id: Option<i64>,
    /// Seconds to wait for the connection file and the registration reply.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
    /// Seconds to wait for the connection file to appear (default: --timeout;
    /// ipengine's IPEngine.wait_for_url_file).
    #[arg(long = "wait-for-url-file")]
    pub wait_for_url_file: Option<f64>,
    /// Working directory to change to before starting (user code runs there).
    #[arg(long = "work-dir")]
    pub work_dir: Option<PathBuf>,
    /// The session key, overriding the connection file's (ipengine's
    /// --Session.key; visible to other users in the process list).
    #[arg(long = "session-key", hide = true)]
    pub session_key: Option<String>,
    /// A file holding the session key (ipengine's --Session.keyfile / --keyfile).
    #[arg(long = "session-keyfile")]
    pub session_keyfile: Option<PathBuf>,
    /// Missed controller heartbeats (of hb_period + 0.5 s) before the engine exits.
    #[arg(long = "max-heartbeat-misses", default_value_t = 50)]
    pub max_heartbeat_misses: u32,
    /// Language of the code this engine runs: python (a persistent Python
    /// subprocess) or rust (evcxr).
    #[arg(long, value_enum, default_value_t = Language::Python)]
    pub language: Language,
    /// Python interpreter to run user code in (default: the first python3 on PATH).
    #[arg(long, default_value = "python3")]
    pub python: PathBuf,
    /// Total number of engines in this job, exported as PARALLAX_N_ENGINES.
    #[arg(long = "n-engines")]
    pub n_engines: Option<u32>,
    /// What a crashed Python interpreter does to the engine: true (default)
    /// restarts it with a fresh namespace, the engine stays registered;
    /// false makes the engine unregister and exit, as ipengine does.
    #[arg(long = "restart-on-crash", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub restart_on_crash: bool,
    /// Import IPython and ipyparallel in a background thread of the Python
    /// process right after it starts, so the first apply does not pay for
    /// them (costs their memory, ~40 MiB, on idle engines); false imports
    /// them on first need.
    #[arg(long = "warm-imports", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub warm_imports: bool,
    /// A zygote's Unix socket (`parallax cluster start` and the kernel pass
    /// one to local engines): the Python interpreter is forked by that
    /// template process, sharing its imported IPython and ipyparallel
    /// pages, instead of started and importing them itself. Without one,
    /// or when it cannot fork, Python is started directly.
    #[arg(long, conflicts_with = "host_zygote")]
    pub zygote: Option<PathBuf>,
    /// Fork the Python interpreter from this cluster's zygote on this host,
    /// started by the first engine that asks and shared by the others (what
    /// `parallax cluster start` gives engines a launcher starts: mpiexec,
    /// Slurm, PBS, SGE, LSF, HTCondor, ssh). It exits on its own a few
    /// seconds after the host's last engine has gone.
    #[arg(long = "host-zygote", default_value_t = false, action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub host_zygote: bool,
    /// Log level: DEBUG, INFO, WARN, ERROR or 10…50.
    #[arg(long = "log-level", default_value = "INFO")]
    pub log_level: String,
}
