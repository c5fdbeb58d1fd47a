//! `parallax engine` options, named after ipengine's where they exist.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Language {
    Python,
    Rust,
}

#[derive(Debug, Clone, Args)]
#[command(about = "Run an engine (like ipengine) that executes code for a hub")]
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
    /// Log level: DEBUG, INFO, WARN, ERROR or 10…50.
    #[arg(long = "log-level", default_value = "INFO")]
    pub log_level: String,
}
