//! The Python kernel's local interpreter: a Python process of the kernel's
//! own, beside the engines, where `%%local` cells, `%local` lines, unmarked
//! cells under `%autopx` off and the local half of `%%px --local` run — the
//! notebook's "home" namespace of ipyparallel's tutorial, where results
//! come back to be plotted.
//!
//! It is the engines' Python machinery
//! ([`parallax_engine::python::PythonInterpreter`]): a persistent namespace,
//! output captured at the file-descriptor level, IPython's display and
//! syntax (`%matplotlib inline`, `?obj`, `!cmd`), SIGINT as
//! `KeyboardInterrupt`, and a crash reported and followed by a fresh
//! process. It starts on first use, so a kernel that never runs local code
//! pays nothing.
//!
//! Its namespace holds a client connected to the kernel's cluster: `rc`
//! (the stock `ipyparallel.Client`), `dview` (a `DirectView` on all
//! engines, including those that register later) and `lview` (a
//! load-balanced view), set up again after a crash or `%cluster connect`
//! (see `local_setup.py`). `IPYTHONDIR` points at a private directory whose
//! default profile holds the cluster's client connection file, so a bare
//! `ipyparallel.Client()` — the tutorial's first cell — connects to the
//! same cluster. That client's requests and the kernel's own never mix:
//! both route iopub messages by their parent's msg_id.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use parallax_engine::interpreter::{Interpreter, Output, Reply, Request, Stdin};
use parallax_engine::python::{PythonConfig, PythonInterpreter};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::frontend::Publisher;
use crate::merge::CellError;
use crate::session::CellOutcome;
use crate::stdin::FrontendStdin;

/// Run in the local namespace (silently) whenever it is new or the cluster
/// changed: binds `rc`, `dview`, `lview`.
const SETUP_SOURCE: &str = include_str!("local_setup.py");

/// The local interpreter, started on first use.
pub struct LocalPython {
    python: PathBuf,
    /// The cluster's client connection file (`ipcontroller-client.json`).
    client_file: Option<PathBuf>,
    interp: Option<PythonInterpreter>,
    /// The process and client file the namespace was set up for.
    ready: Option<(i32, Option<PathBuf>)>,
    /// The private `IPYTHONDIR` (removed on drop).
    ipython_dir: Option<PathBuf>,
}

impl LocalPython {
    pub fn new(python: PathBuf, client_file: Option<PathBuf>) -> LocalPython {
        LocalPython {
            python,
            client_file,
            interp: None,
            ready: None,
            ipython_dir: None,
        }
    }

    /// Whether its process has been started.
    pub fn started(&self) -> bool {
        self.interp.is_some()
    }

    /// The cluster changed (`%cluster connect`): the next local run binds
    /// `rc`/`dview`/`lview` to the new one.
    pub fn set_client_file(&mut self, f: Option<PathBuf>) {
        if f != self.client_file {
            self.client_file = f;
            if let Some(dir) = &self.ipython_dir {
                let _ = write_profile(dir, self.client_file.as_deref());
            }
        }
    }

    /// The kernel reconnected to a restarted hub: the next local run binds
    /// `rc`/`dview`/`lview` again (the old client's sockets are dead).
    pub fn rebind(&mut self) {
        self.ready = None;
    }

    /// Start the process (if needed) and set its namespace up (if new).
    async fn ensure(&mut self) -> Result<&mut PythonInterpreter> {
        if self.interp.is_none() {
            let dir = match &self.ipython_dir {
                Some(d) => d.clone(),
                None => {
                    let d = private_ipython_dir()?;
                    self.ipython_dir = Some(d.clone());
                    d
                }
            };
            write_profile(&dir, self.client_file.as_deref())?;
            let cfg = PythonConfig {
                python: self.python.clone(),
                env: vec![("IPYTHONDIR".into(), dir.display().to_string())],
                restart_on_crash: true,
                zygote: None,
            };
            let interp = PythonInterpreter::start(cfg)
                .await
                .context("starting the kernel's local Python")?;
            info!(pid = interp.pid(), "local interpreter started");
            self.interp = Some(interp);
        }
        let interp = self.interp.as_mut().expect("started");
        let pid = interp.pid().unwrap_or(-1);
        let want = (pid, self.client_file.clone());
        if self.ready.as_ref() != Some(&want) {
            let path = match &self.client_file {
                Some(f) => json!(f.display().to_string()),
                None => Value::Null,
            };
            let code = format!(
                "{SETUP_SOURCE}\n_parallax_local_setup({path})\ndel _parallax_local_setup\n"
            );
            let (tx, mut rx) = mpsc::unbounded_channel();
            let reply = interp
                .run(execute(code, true, 0, Stdin::Refuse(None)), tx)
                .await;
            while let Ok(o) = rx.try_recv() {
                if let Output::Stream { text, .. } = o {
                    warn!(%text, "local namespace set-up printed");
                }
            }
            if reply.status() != "ok" {
                warn!(reply = ?reply.content, "setting up the local namespace failed");
            }
            self.ready = Some((interp.pid().unwrap_or(-1), self.client_file.clone()));
        }
        Ok(self.interp.as_mut().expect("started"))
    }

    /// Run a cell locally: its outputs are shown plainly (no `[n]` prefix),
    /// its value as the cell's `Out[count]`; `input()` asks the frontend;
    /// an interrupt is `KeyboardInterrupt` in the local code.
    pub async fn run(
        &mut self,
        code: &str,
        count: i64,
        p: &Publisher,
        stdin: &FrontendStdin,
        interrupts: &mut watch::Receiver<u64>,
    ) -> CellOutcome {
        let interp = match self.ensure().await {
            Ok(i) => i,
            Err(e) => return CellOutcome::error("LocalInterpreterError", &format!("{e:#}")),
        };
        let signals = interp.signal_handle();
        let input = interp.input_handle();
        let mode = if stdin.allowed {
            Stdin::Forward
        } else {
            Stdin::Refuse(Some("this frontend does not support input".into()))
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let req = execute(code.to_owned(), p.silent, count, mode);
        interrupts.borrow_and_update();
        let mut asking: Option<tokio::task::JoinHandle<()>> = None;
        let reply = {
            let fut = interp.run(req, tx);
            tokio::pin!(fut);
            loop {
                tokio::select! {
                    r = &mut fut => break r,
                    Some(o) = rx.recv() => {
                        if let Some(a) = publish(o, count, p, stdin, input.as_ref()) {
                            asking = Some(a);
                        }
                    }
                    Ok(()) = interrupts.changed() => {
                        if let Err(e) = signals.send(libc::SIGINT) {
                            warn!(error = %e, "interrupting the local interpreter");
                        }
                    }
                }
            }
        };
        while let Ok(o) = rx.try_recv() {
            publish(o, count, p, stdin, input.as_ref());
        }
        if let Some(a) = asking {
            a.abort();
        }
        outcome(reply)
    }

    /// complete/inspect in a local cell: the local interpreter's answer.
    /// None when it has not started yet (a frontend asks while the user
    /// types; starting Python for that is not worth its wait).
    pub async fn assist(&mut self, msg_type: &str, content: &Value) -> Option<Value> {
        self.interp.as_ref()?;
        let code = content.get("code")?.as_str()?.to_owned();
        let cursor_pos = content.get("cursor_pos").and_then(Value::as_i64)?;
        let req = match msg_type {
            "complete_request" => Request::Complete { code, cursor_pos },
            "inspect_request" => Request::Inspect {
                code,
                cursor_pos,
                detail_level: content
                    .get("detail_level")
                    .and_then(Value::as_i64)
                    .unwrap_or(0),
            },
            _ => return None,
        };
        let interp = self.ensure().await.ok()?;
        let (tx, _rx) = mpsc::unbounded_channel();
        let r = interp.run(req, tx).await;
        Some(Value::Object(r.content))
    }

    pub async fn shutdown(&mut self) {
        if let Some(mut i) = self.interp.take() {
            i.shutdown().await;
        }
    }
}

impl Drop for LocalPython {
    fn drop(&mut self) {
        if let Some(d) = &self.ipython_dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn execute(code: String, silent: bool, count: i64, stdin: Stdin) -> Request {
    Request::Execute {
        code,
        silent,
        store_history: !silent,
        user_expressions: json!({}),
        execution_count: count,
        stdin,
    }
}

/// Show one output of a local cell; an `input()` becomes a task asking the
/// frontend (returned, to be aborted when the cell ends).
fn publish(
    o: Output,
    count: i64,
    p: &Publisher,
    stdin: &FrontendStdin,
    input: Option<&parallax_engine::interpreter::InputHandle>,
) -> Option<tokio::task::JoinHandle<()>> {
    match o {
        Output::Stream { name, text } => p.stream(&name, text),
        Output::DisplayData {
            data,
            metadata,
            transient,
            update,
        } => p.publish(
            if update {
                "update_display_data"
            } else {
                "display_data"
            },
            json!({"data": data, "metadata": metadata, "transient": transient}),
        ),
        Output::ClearOutput { wait } => p.publish("clear_output", json!({"wait": wait})),
        Output::ExecuteResult { data, metadata, .. } => p.publish(
            "execute_result",
            json!({"execution_count": count, "data": data, "metadata": metadata}),
        ),
        // the reply carries the error; the frontend shows it once
        Output::Error { .. } | Output::DataMessage { .. } => {}
        Output::InputRequest { prompt, password } => {
            let (stdin, input) = (stdin.clone(), input?.clone());
            return Some(tokio::spawn(async move {
                if let Some(v) = stdin.ask(&prompt, password).await {
                    let _ = input.send(v);
                }
            }));
        }
    }
    None
}

/// A local reply as the cell's outcome. A crash of the local Python (the
/// engine machinery calls it `EngineError`) is named for what it is.
fn outcome(reply: Reply) -> CellOutcome {
    if reply.status() == "ok" {
        return CellOutcome::Ok { result: None };
    }
    let s = |k: &str| {
        reply
            .content
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let (mut ename, mut evalue) = (s("ename"), s("evalue"));
    let mut traceback: Vec<String> = reply
        .content
        .get("traceback")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if ename == "EngineError" {
        ename = "LocalInterpreterError".into();
        evalue = format!(
            "the kernel's local interpreter died: {}{}",
            evalue.replace("the Python process", "its Python process"),
            if reply.content.contains_key("engine_restarted") {
                " (rc, dview and lview are set up again)"
            } else {
                ""
            }
        );
        traceback = vec![format!("{ename}: {evalue}")];
    }
    if ename.is_empty() {
        ename = "LocalInterpreterError".into();
    }
    CellOutcome::Error(CellError {
        ename,
        evalue,
        traceback,
    })
}

/// A private `IPYTHONDIR` for the local interpreter (0700).
fn private_ipython_dir() -> Result<PathBuf> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!(
        "parallax-local-{}-{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(dir)
}

/// The default profile's client connection file, so `Client()` with no
/// arguments finds the kernel's cluster (0600: it holds the HMAC key).
fn write_profile(dir: &Path, client_file: Option<&Path>) -> Result<()> {
    let security = dir.join("profile_default").join("security");
    std::fs::create_dir_all(&security)?;
    let target = security.join("ipcontroller-client.json");
    let _ = std::fs::remove_file(&target);
    if let Some(f) = client_file {
        let text = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&target)?;
        out.write_all(&text)?;
    }
    Ok(())
}
