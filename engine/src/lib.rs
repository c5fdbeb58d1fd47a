//! The Parallax engine: ipengine's counterpart in Rust.
//!
//! * [`cli`] — `parallax engine` options (ipengine's names where they exist).
//! * [`driver`] — registration, heartbeat (answered from Rust, so a busy
//!   interpreter never misses a beat), shell/control/iopub sockets, the
//!   request loop.
//! * [`interpreter`] — the `Interpreter` trait and its output events.
//! * [`rank`] — the id asked for by default: the MPI/srun rank.
//! * [`reach`] — a loopback hub seen from another host is an error at once.
//! * [`python`] — the persistent Python subprocess behind the trait, and its
//!   framed pipe protocol (the Python side is `python/parallax_engine_shim.py`).
//! * [`rust`], [`rustc_cache`] — Rust cells in evcxr and the machine-wide
//!   rustc cache: only with the `rust-engine` feature (evcxr and its
//!   rust-analyzer crates are most of a cold build).
//! * [`rust_syntax`] — Rust text the kernel reads in every build.
//! * [`zygote`] — one template Python per cluster that forks the engines'
//!   interpreters, so they share its imported modules' pages;
//!   [`host_zygote`] — the one a launcher's engines on a host share, started
//!   by the first of them and gone when the last has left.

pub mod cli;
pub mod driver;
pub mod host_zygote;
pub mod interpreter;
pub mod link;
pub mod python;
pub mod rank;
pub mod reach;
#[cfg(feature = "rust-engine")]
pub mod rust;
pub mod rust_syntax;
#[cfg(feature = "rust-engine")]
pub mod rustc_cache;
pub mod zygote;

pub use cli::EngineArgs;

/// Whether this build runs Rust cells (`parallax engine --language rust`).
pub const RUST_ENGINE_BUILT: bool = cfg!(feature = "rust-engine");

/// What a build without the Rust engine says when Rust cells are asked for.
pub const RUST_ENGINE_MISSING: &str = "this parallax binary was built without the Rust engine \
     (evcxr): build it with `make build-rust` or \
     `cargo build --release --features rust-engine`";
