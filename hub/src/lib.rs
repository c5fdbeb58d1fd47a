//! The Parallax hub: an ipyparallel-compatible controller.
//!
//! * [`core`] — the whole controller as a state machine with no sockets and
//!   no clock (registration, heartbeat, relays, schedulers, task records).
//! * [`tasks`] — the load-balanced scheduler part of that state machine.
//! * [`scheduler`] — pure choice functions and dependency rules.
//! * [`leaf`] — the broadcast tree's leaves without I/O: each engine's
//!   signed copy of a broadcast, replies verified and decoded off the core.
//! * [`records`] — the task database trait ([`records::TaskDb`]) and the
//!   bounded in-memory store (DictDB semantics, query matcher).
//! * [`sqlite_db`] — the SQLite store behind the same trait (writer thread,
//!   batched transactions, cache of recent records).
//! * [`restore`] — `--restore`: the engine table the state file keeps, and
//!   the requests a previous hub left without a reply (sans-IO);
//!   [`state_file`] reads and writes that file.
//! * [`listen`] — the TCP listeners under those sockets, with an accept
//!   backlog deep enough for a registration storm.
//! * [`driver`] — binds the zeromq sockets, writes the connection files and
//!   feeds the core; [`cli`] — `parallax hub` options in ipcontroller's form.

pub mod cli;
pub mod core;
pub mod driver;
pub mod leaf;
pub mod listen;
pub mod records;
pub mod restore;
pub mod scheduler;
pub mod sqlite_db;
pub mod state_file;
mod tasks;

pub use crate::cli::HubArgs;
pub use crate::core::{Channel, CoreConfig, Hub, HubEvent, Now, Transmit};
#[cfg(test)]
mod core_tests;
