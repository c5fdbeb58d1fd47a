//! The Parallax Jupyter kernel: a frontend-facing Jupyter kernel whose
//! "interpreter" is a pool of engines behind a hub. Each cell is fanned out
//! to the engines its magics select and their outputs are merged in
//! ipyparallel's `%%px` formats.
//!
//! * [`frontend`] — the five Jupyter sockets, the kernel core (execution
//!   counter, busy/idle, `execute_input`), control and heartbeat on their own
//!   tasks.
//! * [`session`] — cells and magics: what to run where, defaults, noblock
//!   results.
//! * [`magics`] — parsing of `%%px`, `%px`, `%pxconfig`, … (pure).
//! * [`merge`] — the `[stdout:N]`, `Out[N:C]`, `[N:execute]` formats (pure).
//! * [`syntax`] — is_complete from the text alone (pure).
//! * [`stdin`] — the stdin channel: an engine's `input()` asks the frontend.
//! * [`parent`] — whether the process that started the kernel is still there.
//! * [`client`] — the hub's client protocol (query, mux, control, iopub).
//! * [`cluster`] — the embedded cluster: hub task + local engine processes.
//! * [`kernelspec`] — `parallax kernelspec install`.
//! * [`cluster_cmd`] — `parallax cluster start|stop|list` (like ipcluster).

pub mod cli;
pub mod client;
pub mod client_link;
pub mod cluster;
pub mod cluster_cmd;
pub mod cluster_controller;
pub mod cluster_jobs;
pub mod cluster_ssh;
pub mod cluster_ssh_controller;
pub mod cluster_ssh_proxy;
pub mod frontend;
pub mod kernelspec;
pub mod loadgen;
pub mod local;
pub mod magics;
pub mod merge;
pub mod parent;
pub mod session;
pub mod stdin;
pub mod syntax;
