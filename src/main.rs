//! `parallax`: the one user-facing binary. Parses the command line, sets up
//! logging, and calls the crate that does the work.

/// mimalloc instead of glibc malloc: the hub's fan-out is allocation-bound
/// (README, "Dependencies and why"; BENCHMARKS.md, issue 11).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Result;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

mod ipy_options;

#[derive(Parser)]
#[command(
    name = "parallax",
    version,
    about = "Interactive parallel computing for Jupyter"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the hub: an ipyparallel-compatible controller (like ipcontroller).
    Hub(parallax_hub::HubArgs),
    /// Run an engine that registers with a hub and runs Python or Rust code (like ipengine).
    Engine(parallax_engine::EngineArgs),
    /// Install, remove or list the Parallax Jupyter kernelspecs.
    /// Run the Jupyter kernel (what kernel.json starts): cells fan out to engines.
    Kernel(parallax_kernel::cli::KernelArgs),
    Kernelspec {
        #[command(subcommand)]
        cmd: parallax_kernel::kernelspec::KernelspecCommand,
    },
    /// Start, stop or list local clusters: a hub and N engines (like ipcluster).
    Cluster {
        #[command(subcommand)]
        cmd: parallax_kernel::cluster_cmd::ClusterCommand,
    },
    /// Load generators: `parallax bench engines -n N` measures a hub with N
    /// fake engines (registration storm, heartbeat CPU, fan-out latency).
    Bench {
        #[command(subcommand)]
        cmd: parallax_kernel::loadgen::BenchCommand,
    },
}

/// The command line with ipengine's / ipcontroller's traitlets options
/// (`--Class.trait=value`, their aliases and flags) translated for
/// `parallax engine` / `parallax hub` (see `ipy_options`); a malformed one
/// ends the process with a clear message, as clap's own errors do.
fn ipengine_compatible_argv() -> (Vec<std::ffi::OsString>, Vec<String>) {
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let spec = match argv.get(1).and_then(|a| a.to_str()) {
        Some("engine") => &ipy_options::IPENGINE,
        Some("hub") => &ipy_options::IPCONTROLLER,
        _ => return (argv, vec![]),
    };
    let tail = argv.split_off(2);
    match ipy_options::translate(spec, tail) {
        Ok(t) => {
            argv.extend(t.args);
            (argv, t.notes)
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}

/// `extra` appends filter directives. At the default level (WARN) and
/// quieter, zmq.rs's reconnection warnings are silenced: a peer that went
/// away (a stopped hub, the kernel's engines while it shuts down) is
/// expected, and an engine's stderr is the terminal of the kernel's frontend
/// (jupyter console). `--log-level=INFO` or `PARALLAX_LOG` shows them.
///
/// Internal errors of the subscriber are not reported: when stderr is gone
/// (the frontend's terminal closed) that report's `eprintln!` would panic
/// the logging task — the kernel's parent watch among them.
fn init_tracing_with(level: &str, extra: &str) -> Result<()> {
    let base = parallax_hub::cli::log_filter(level).map_err(anyhow::Error::msg)?;
    let quiet = if matches!(base, "warn" | "error") {
        ",zeromq=error"
    } else {
        ""
    };
    let default = format!("{base}{quiet}{extra}");
    let filter = tracing_subscriber::EnvFilter::try_from_env("PARALLAX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .log_internal_errors(false)
        .init();
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn main() -> Result<()> {
    // evcxr re-executes this binary as the runtime process that loads and
    // runs compiled Rust cells; in that process this call never returns. It
    // must come first, before anything else looks at the command line.
    #[cfg(feature = "rust-engine")]
    parallax_engine::rust::runtime_hook();
    let (argv, notes) = ipengine_compatible_argv();
    let cli = Cli::parse_from(argv);
    // logged once tracing is up (values of secret options never appear)
    let log_notes = || {
        for n in &notes {
            tracing::info!("{n}");
        }
    };
    match cli.command {
        Command::Kernel(args) => {
            init_tracing_with(&args.log_level, "")?;
            parallax_hub::driver::raise_fd_limit(65536);
            runtime()?.block_on(parallax_kernel::frontend::run(args))
        }
        Command::Kernelspec { cmd } => parallax_kernel::kernelspec::run(cmd),
        Command::Cluster { cmd } => parallax_kernel::cluster_cmd::run(cmd),
        Command::Bench { cmd } => {
            init_tracing_with("WARN", "")?;
            parallax_kernel::loadgen::run(cmd)
        }
        Command::Engine(args) => {
            if args.language == parallax_engine::cli::Language::Rust
                && !parallax_engine::RUST_ENGINE_BUILT
            {
                anyhow::bail!(parallax_engine::RUST_ENGINE_MISSING);
            }
            #[cfg(feature = "rust-engine")]
            if args.language == parallax_engine::cli::Language::Rust {
                // before any thread starts: it sets environment variables
                parallax_engine::rust::prepare_process_env();
            }
            // evcxr's embedded rust-analyzer (ra_ap_*, salsa) logs every
            // query at INFO
            init_tracing_with(&args.log_level, ",ra_ap=warn,salsa=warn")?;
            log_notes();
            if let Some(d) = &args.work_dir {
                std::env::set_current_dir(d)
                    .map_err(|e| anyhow::anyhow!("--work-dir {}: {e}", d.display()))?;
            }
            parallax_hub::driver::tune_allocator();
            // One thread: an engine's work is a few messages per request,
            // and a second worker only added wake-ups across threads (16
            // engines, `dv.execute`: the engines' Rust CPU per round -15%).
            // Heartbeats are answered on it too; what could hold it (signing
            // or checking a large message) takes far less than a beat.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                // The engine handles SIGINT/SIGTERM itself (clean unregistration).
                parallax_engine::driver::run(args, CancellationToken::new()).await
            })
        }
        Command::Hub(args) => {
            init_tracing_with(&args.log_level, "")?;
            log_notes();
            parallax_hub::driver::tune_allocator();
            // up to eight connections per engine (registration, MUX, task,
            // broadcast, control, IOPub, heartbeat ping and pong): thousands
            // of engines need more than the usual 1024 open files
            parallax_hub::driver::raise_fd_limit(65536);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(args.threads.into())
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let shutdown = CancellationToken::new();
                let signals = shutdown.clone();
                tokio::spawn(async move {
                    use tokio::signal::unix::{SignalKind, signal};
                    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
                    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                    signals.cancel();
                });
                parallax_hub::driver::run(args, shutdown).await
            })
        }
    }
}
