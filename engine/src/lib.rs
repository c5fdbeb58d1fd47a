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

pub mod cli;
pub mod driver;
pub mod interpreter;
pub mod link;
pub mod python;
pub mod rank;
pub mod reach;
pub mod rust;
pub mod rust_syntax;
pub mod rustc_cache;

pub use cli::EngineArgs;
