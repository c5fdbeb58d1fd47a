//! `parallax kernel` options (what kernel.json runs).

use std::path::PathBuf;

use clap::Args;

pub use crate::kernelspec::Language;

#[derive(Debug, Clone, Args)]
#[command(about = "Run the Parallax Jupyter kernel (started by Jupyter from kernel.json)")]
pub struct KernelArgs {
    /// Jupyter connection file written by the frontend.
    #[arg(short = 'f', long = "connection-file")]
    pub connection_file: PathBuf,
    /// Engines of the embedded cluster (default: $PARALLAX_ENGINES or 4).
    #[arg(long)]
    pub engines: Option<usize>,
    /// Use an existing cluster: its client connection file
    /// (ipcontroller-client.json of `parallax hub`, `parallax cluster start`
    /// or a stock ipcontroller) instead of starting an embedded one.
    #[arg(long)]
    pub cluster: Option<PathBuf>,
    /// Language of the cells: python (engines run IPython) or rust
    /// (engines run evcxr; `parallax engine --language rust`).
    #[arg(long, value_enum, default_value_t = Language::Python)]
    pub language: Language,
    /// Python interpreter the embedded engines run code in
    /// (default: $PARALLAX_PYTHON, else python3 on PATH; python only).
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Launch the engines through a launcher instead of as local processes:
    /// mpi, slurm, pbs, sge, lsf, htcondor or ssh (`--engines` of them; the
    /// kernel answers at once and they join as they register).
    #[arg(long)]
    pub launcher: Option<String>,
    /// An option for the launcher, as `parallax cluster start` takes it
    /// (repeatable), e.g. --launcher-arg=--queue=debug.
    #[arg(long = "launcher-arg", allow_hyphen_values = true, value_name = "ARG")]
    pub launcher_args: Vec<String>,
    /// The embedded hub's listening address (default 127.0.0.1): 0.0.0.0 or
    /// an address engines on other hosts reach.
    #[arg(long = "ip", value_name = "ADDR")]
    pub ip: Option<String>,
    /// The hub's host as engines elsewhere reach it (default this host's name).
    #[arg(long = "location", value_name = "HOST")]
    pub location: Option<String>,
    /// Seconds to wait for the engines to register.
    #[arg(long = "engine-timeout", default_value_t = 60.0)]
    pub engine_timeout: f64,
    /// Log level: DEBUG, INFO, WARN, ERROR or 10…50 (logs go to stderr).
    #[arg(long = "log-level", default_value = "WARN")]
    pub log_level: String,
}

impl KernelArgs {
    pub fn engine_count(&self) -> anyhow::Result<usize> {
        let n = match self.engines {
            Some(n) => n,
            None => match std::env::var("PARALLAX_ENGINES") {
                Ok(v) if !v.trim().is_empty() => v.trim().parse::<usize>().map_err(|_| {
                    anyhow::anyhow!("PARALLAX_ENGINES={v:?} is not a number of engines")
                })?,
                _ => 4,
            },
        };
        if n == 0 {
            anyhow::bail!("--engines must be at least 1");
        }
        Ok(n)
    }

    /// `--launcher` as `%cluster start` words, checked.
    pub fn launch_words(&self) -> anyhow::Result<Option<Vec<String>>> {
        let Some(l) = &self.launcher else {
            return Ok(None);
        };
        if self.cluster.is_some() {
            anyhow::bail!(
                "--launcher starts engines for the embedded hub; it cannot be used with --cluster"
            );
        }
        let words = crate::cluster_jobs::kernel_words(self.engine_count()?, l, &self.launcher_args);
        crate::cluster_jobs::parse_start(&words)
            .map_err(|e| anyhow::anyhow!("--launcher {l}: {e}"))?;
        Ok(Some(words))
    }

    pub fn python(&self) -> PathBuf {
        self.python
            .clone()
            .or_else(|| std::env::var_os("PARALLAX_PYTHON").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("python3"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: KernelArgs,
    }

    fn parse(extra: &[&str]) -> Result<KernelArgs, clap::Error> {
        let mut argv = vec!["kernel", "-f", "/c.json"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).map(|c| c.a)
    }

    #[test]
    fn languages() {
        assert_eq!(parse(&[]).unwrap().language, Language::Python);
        assert_eq!(
            parse(&["--language", "rust"]).unwrap().language,
            Language::Rust
        );
        assert_eq!(
            parse(&["--language=python"]).unwrap().language,
            Language::Python
        );
        let e = parse(&["--language", "go"]).unwrap_err().to_string();
        assert!(
            e.contains("invalid value 'go'") && e.contains("[possible values: python, rust]"),
            "{e}"
        );
    }
}
