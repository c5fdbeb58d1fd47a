//! The boundary between the engine's protocol handling and the language
//! runtime: requests in, output events and a reply out.

use bytes::Bytes;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

/// Output published on iopub while a request runs, parented to it.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Stream {
        name: String,
        text: String,
    },
    /// `update` means `update_display_data` (IPython's `update_display`).
    DisplayData {
        data: Value,
        metadata: Value,
        transient: Value,
        update: bool,
    },
    ClearOutput {
        wait: bool,
    },
    ExecuteResult {
        execution_count: i64,
        data: Value,
        metadata: Value,
    },
    Error {
        ename: String,
        evalue: String,
        traceback: Vec<String>,
    },
    /// ipyparallel's `publish_data`: a `data_message` whose buffers are the
    /// serialized namespace (the client merges it into `AsyncResult.data`).
    DataMessage {
        keys: Value,
        buffers: Vec<Bytes>,
    },
    /// `input()`/`getpass()` asks the client (Jupyter's `input_request`
    /// content); only under [`Stdin::Forward`]. The answer comes back
    /// through the interpreter's [`InputHandle`].
    InputRequest {
        prompt: String,
        password: bool,
    },
}

/// What `input()` does during an execute_request.
#[derive(Debug, Clone, PartialEq)]
pub enum Stdin {
    /// Ask the client: the request had `allow_stdin: true` (a Parallax
    /// kernel sets it only for a blocking cell with one target engine).
    Forward,
    /// Raise StdinNotImplementedError. The reason is the client's
    /// (`stdin_refused` in the request content: "this cell targets 4
    /// engines"), or none (a stock ipyparallel Client never sets either).
    Refuse(Option<String>),
}

/// Delivers the value of an `input_reply` to the request waiting in
/// `input()`. Values that arrive when nothing waits are dropped.
pub type InputHandle = mpsc::UnboundedSender<String>;

/// Where an interpreter sends its output. Dropping it means the request is
/// over (the driver stops listening).
pub type OutputSink = mpsc::UnboundedSender<Output>;

/// A request for the interpreter, with the fields it needs.
#[derive(Debug, Clone)]
pub enum Request {
    Execute {
        code: String,
        silent: bool,
        store_history: bool,
        user_expressions: Value,
        execution_count: i64,
        stdin: Stdin,
    },
    Apply {
        buffers: Vec<Bytes>,
    },
    Complete {
        code: String,
        cursor_pos: i64,
    },
    Inspect {
        code: String,
        cursor_pos: i64,
        detail_level: i64,
    },
    IsComplete {
        code: String,
    },
    Clear,
}

/// The reply content (Jupyter's `*_reply` content), buffers (apply results),
/// and metadata the interpreter wants merged into the reply metadata.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reply {
    pub content: Map<String, Value>,
    pub buffers: Vec<Bytes>,
    pub metadata: Map<String, Value>,
}

impl Reply {
    pub fn status(&self) -> &str {
        self.content
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("error")
    }

    pub fn error(ename: &str, evalue: impl Into<String>) -> Reply {
        let evalue = evalue.into();
        let mut content = Map::new();
        content.insert("status".into(), "error".into());
        content.insert("ename".into(), ename.into());
        content.insert(
            "traceback".into(),
            Value::Array(vec![format!("{ename}: {evalue}").into()]),
        );
        content.insert("evalue".into(), evalue.into());
        Reply {
            content,
            ..Reply::default()
        }
    }
}

/// A language's own way of delivering a signal (the Rust engine turns
/// SIGINT into stopping cargo or its runtime process).
pub type SignalHandler = std::sync::Arc<dyn Fn(i32) -> Result<(), String> + Send + Sync>;

/// Delivers signals to the interpreter's current process.
#[derive(Clone, Default)]
pub struct SignalHandle {
    pub pid: std::sync::Arc<std::sync::atomic::AtomicI32>,
    /// When set, signals go here instead of to `pid`.
    pub handler: Option<SignalHandler>,
}

impl std::fmt::Debug for SignalHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalHandle")
            .field("pid", &self.pid)
            .field("handler", &self.handler.is_some())
            .finish()
    }
}

impl SignalHandle {
    pub fn send(&self, sig: i32) -> Result<(), String> {
        if let Some(h) = &self.handler {
            return h(sig);
        }
        let pid = self.pid.load(std::sync::atomic::Ordering::SeqCst);
        if pid <= 0 {
            return Err("no interpreter process is running".into());
        }
        // SAFETY: kill has no memory-safety preconditions.
        let r = unsafe { libc::kill(pid, sig) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error().to_string())
        }
    }
}

/// A language runtime behind the engine.
pub trait Interpreter: Send {
    /// Run one request to completion, streaming output into `out`.
    fn run(
        &mut self,
        req: Request,
        out: OutputSink,
    ) -> impl std::future::Future<Output = Reply> + Send;

    /// A handle that delivers signals to the running code (SIGINT
    /// interrupts it); usable while a request runs.
    fn signal_handle(&self) -> SignalHandle;

    /// Where `input_reply` values go while a request runs; `None` when the
    /// language never forwards input (it then refuses, whatever [`Stdin`]
    /// says).
    fn input_handle(&self) -> Option<InputHandle> {
        None
    }

    /// The runtime died and was not restarted (`--restart-on-crash=false`):
    /// the engine leaves the hub, as ipengine does when its kernel dies.
    fn is_dead(&self) -> bool {
        false
    }

    /// Stop the runtime.
    fn shutdown(&mut self) -> impl std::future::Future<Output = ()> + Send;

    /// Language info for `kernel_info_reply`.
    fn language_info(&self) -> Value;
}
