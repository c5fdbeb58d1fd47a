//! ipyparallel's `%%px` output formats, as data (pure: no I/O).
//!
//! Inputs are the engines' iopub events and replies, accumulated per engine
//! in [`Results`] (like ipyparallel's `Metadata`: stdout, stderr, outputs,
//! execute_result, error). Outputs are the iopub messages the kernel
//! publishes, as `(msg_type, content)` pairs ([`Out`]):
//!
//! * streaming ([`Streamer`]): per engine and stream one display whose text is
//!   `[stdout:N] ` + everything so far, updated in place (display id
//!   `{request msg_id}-{stream}`); `[output:N]` before an engine's displays;
//!   `Out[N:C]: ` results; errors on stderr as `[N:execute]` + traceback, the
//!   ones after the fourth as one line each (`asyncresult.py`,
//!   `_iopub_streaming_output_callback`).
//! * at the end or for `%pxresult` ([`display_outputs`]): grouped by type,
//!   engine or order (`AsyncResult.display_outputs`).
//! * the cell's error ([`composite_error`], [`results_composite_error`],
//!   [`already_displayed_error`]).
//!
//! One addition to ipyparallel's formats: a Rust cell that does not compile
//! fails the same way on every engine (ename `CompileError`, rustc's
//! diagnostics as the traceback). When every target engine (two or more)
//! reports an identical CompileError (same ename, evalue, traceback), it is
//! shown once, headed by the engines' ids (runs of three or more consecutive
//! ids as `a-b`, see [`fmt_id_ranges`]) — [`SharedError`]:
//!
//! ```text
//! [0-3:execute] CompileError on all 4 engines
//! error[E0425]: cannot find value `y` in this scope
//! ...
//! ```
//!
//! While streaming, CompileErrors are held back until every target has
//! finished (other output streams live); if they turn out not to be one
//! identical error on all targets, each is printed as `[N:execute]` as
//! usual. Other errors are never merged.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value, json};

use crate::magics::GroupBy;

/// CompositeError.tb_limit: full tracebacks for this many errors.
pub const TB_LIMIT: usize = 4;
/// The ename of a Rust cell that did not compile (the Rust engine's).
pub const COMPILE_ERROR: &str = "CompileError";
const RED: &str = "\x1b[0;31m";
const NORMAL: &str = "\x1b[0m";

/// One iopub message to publish: `msg_type` and content.
#[derive(Debug, Clone, PartialEq)]
pub struct Out {
    pub msg_type: &'static str,
    pub content: Value,
}

impl Out {
    fn stream(name: &str, text: String) -> Out {
        Out {
            msg_type: "stream",
            content: json!({"name": name, "text": text}),
        }
    }
    fn raw_text(text: String) -> Out {
        Out {
            msg_type: "display_data",
            content: json!({"data": {"text/plain": text}, "metadata": {}, "transient": {}}),
        }
    }
}

/// What an engine sent about one request, in arrival order.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    Stream {
        name: String,
        text: String,
    },
    /// `display_data` content (data, metadata, transient).
    Display(Value),
    /// `update_display_data` content.
    UpdateDisplay(Value),
    ClearOutput {
        wait: bool,
    },
    Result {
        execution_count: i64,
        data: Value,
        metadata: Value,
    },
    /// An `error` on iopub.
    Error(RemoteError),
}

/// An engine's exception (ipyparallel's `RemoteError`).
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteError {
    pub engine_id: i64,
    pub method: String,
    pub ename: String,
    pub evalue: String,
    pub traceback: Vec<String>,
}

impl RemoteError {
    pub fn from_content(content: &Value, engine_id: i64) -> RemoteError {
        let s = |k: &str| {
            content
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let info = content.get("engine_info");
        RemoteError {
            engine_id: info
                .and_then(|i| i.get("engine_id"))
                .and_then(Value::as_i64)
                .unwrap_or(engine_id),
            method: info
                .and_then(|i| i.get("method"))
                .and_then(Value::as_str)
                .unwrap_or("execute")
                .to_owned(),
            ename: s("ename"),
            evalue: s("evalue"),
            traceback: content
                .get("traceback")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|l| l.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    fn label(&self) -> String {
        format!("[{}:{}]", self.engine_id, self.method)
    }

    /// The traceback as one string (ipyparallel joins the lines with "\n").
    fn traceback_text(&self) -> Option<String> {
        let t = self.traceback.join("\n");
        (!t.is_empty()).then_some(t)
    }

    /// `RemoteError.render_traceback()`.
    pub fn render_traceback(&self) -> Vec<String> {
        let mut v = vec![self.label()];
        match self.traceback_text() {
            Some(t) => v.extend(t.lines().map(str::to_owned)),
            None => v.push("No traceback available".into()),
        }
        v
    }

    /// `str(RemoteError)`.
    pub fn one_line(&self) -> String {
        format!("{} {}: {}", self.label(), self.ename, self.evalue)
    }
}

/// The reply's status for one engine.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyStatus {
    Ok,
    Error,
    Aborted,
}

/// Everything one engine produced for one request (ipyparallel `Metadata`).
#[derive(Debug, Clone, PartialEq)]
pub struct EngineResult {
    pub engine_id: i64,
    /// The msg_id of the request sent to this engine.
    pub msg_id: String,
    pub stdout: String,
    pub stderr: String,
    pub outputs: Vec<Value>,
    pub execute_result: Option<(i64, Value, Value)>,
    pub error: Option<RemoteError>,
    /// The error was shown while streaming.
    pub error_shown: bool,
    pub execution_count: Option<i64>,
    pub reply: Option<ReplyStatus>,
    /// All output is in: `status: idle` arrived, or it never will.
    pub output_done: bool,
}

impl EngineResult {
    pub fn new(engine_id: i64, msg_id: String) -> EngineResult {
        EngineResult {
            engine_id,
            msg_id,
            stdout: String::new(),
            stderr: String::new(),
            outputs: Vec::new(),
            execute_result: None,
            error: None,
            error_shown: false,
            execution_count: None,
            reply: None,
            output_done: false,
        }
    }

    pub fn done(&self) -> bool {
        self.reply.is_some() && self.output_done
    }
}

/// The results of one `%px` execution, in target order.
#[derive(Debug, Clone, PartialEq)]
pub struct Results {
    pub engines: Vec<EngineResult>,
    /// One int target: `display_outputs` shows streams without prefixes.
    pub single: bool,
}

/// Drop what a carriage return overwrote (`re.sub(r'.*\r(?=[^\n])', '', s)`).
pub fn collapse_cr(s: &str) -> String {
    if !s.contains('\r') {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len());
    for (i, line) in s.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let b = line.as_bytes();
        let cut = (0..b.len().saturating_sub(1))
            .rev()
            .find(|&p| b[p] == b'\r')
            .map(|p| p + 1)
            .unwrap_or(0);
        out.push_str(&line[cut..]);
    }
    out
}

impl Results {
    pub fn new(targets: &[(i64, String)], single: bool) -> Results {
        Results {
            engines: targets
                .iter()
                .map(|(id, m)| EngineResult::new(*id, m.clone()))
                .collect(),
            single,
        }
    }

    pub fn done(&self) -> bool {
        self.engines.iter().all(EngineResult::done)
    }

    pub fn finished(&self) -> usize {
        self.engines.iter().filter(|e| e.reply.is_some()).count()
    }

    /// Record an event (ipyparallel's `Client._dispatch_iopub`).
    pub fn apply(&mut self, idx: usize, ev: &EngineEvent) {
        let e = &mut self.engines[idx];
        match ev {
            EngineEvent::Stream { name, text } => {
                let buf = if name == "stderr" {
                    &mut e.stderr
                } else {
                    &mut e.stdout
                };
                buf.push_str(text);
                if text.contains('\r') {
                    *buf = collapse_cr(buf);
                }
            }
            EngineEvent::Display(c) => e.outputs.push(c.clone()),
            EngineEvent::UpdateDisplay(c) => {
                // Replace the stored display with the same id, so results
                // shown later carry the newest content.
                let id = display_id(c);
                if let Some(id) = id {
                    for o in e.outputs.iter_mut() {
                        if display_id(o).as_deref() == Some(id.as_str()) {
                            o["data"] = c.get("data").cloned().unwrap_or(json!({}));
                            o["metadata"] = c.get("metadata").cloned().unwrap_or(json!({}));
                        }
                    }
                }
            }
            EngineEvent::ClearOutput { .. } => {
                e.stdout.clear();
                e.stderr.clear();
                e.outputs.clear();
            }
            EngineEvent::Result {
                execution_count,
                data,
                metadata,
            } => {
                e.execute_result = Some((*execution_count, data.clone(), metadata.clone()));
                e.execution_count = Some(*execution_count);
            }
            EngineEvent::Error(err) => e.error = Some(err.clone()),
        }
    }

    /// Record the engine's reply.
    pub fn apply_reply(&mut self, idx: usize, content: &Value) {
        let e = &mut self.engines[idx];
        let status = content
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("error");
        if let Some(c) = content.get("execution_count").and_then(Value::as_i64) {
            e.execution_count = Some(c);
        }
        e.reply = Some(match status {
            "ok" => ReplyStatus::Ok,
            "aborted" => ReplyStatus::Aborted,
            _ => ReplyStatus::Error,
        });
        match status {
            "ok" => {}
            "aborted" => {
                if e.error.is_none() {
                    e.error = Some(RemoteError {
                        engine_id: e.engine_id,
                        method: "execute".into(),
                        ename: "TaskAborted".into(),
                        evalue: "the request was aborted before it ran".into(),
                        // shown instead of "No traceback available": aborts
                        // follow an earlier failure (stop_on_error) or an
                        // abort request
                        traceback: vec![
                            "TaskAborted: the request was aborted before it ran \
                             (an earlier request failed on this engine, or it was aborted)"
                                .into(),
                        ],
                    });
                }
                e.output_done = true;
            }
            _ => {
                let err = RemoteError::from_content(content, e.engine_id);
                // An engine that died never sends `idle`.
                if err.ename == "EngineError" {
                    e.output_done = true;
                }
                if e.error.is_none() {
                    e.error = Some(err);
                }
            }
        }
    }

    pub fn errors(&self) -> Vec<&RemoteError> {
        self.engines
            .iter()
            .filter_map(|e| e.error.as_ref())
            .collect()
    }
}

fn display_id(c: &Value) -> Option<String> {
    c.get("transient")
        .and_then(|t| t.get("display_id"))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// The engine's display republished with `metadata.engine = N`
/// (`_republish_displaypub`). Display ids are made per engine so that two
/// engines updating "the same" display do not overwrite each other.
fn republish(content: &Value, eid: i64, update: bool) -> Out {
    let mut md = content
        .get("metadata")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    md.insert("engine".into(), json!(eid));
    let mut transient = Map::new();
    if let Some(id) = display_id(content) {
        transient.insert("display_id".into(), json!(format!("engine{eid}-{id}")));
    }
    Out {
        msg_type: if update {
            "update_display_data"
        } else {
            "display_data"
        },
        content: json!({
            "data": content.get("data").cloned().unwrap_or(json!({})),
            "metadata": md,
            "transient": transient,
        }),
    }
}

/// `display(ExecuteReply)`: the result with an `Out[N:C]: ` prefix.
fn result_display(eid: i64, r: &(i64, Value, Value), color: bool) -> Out {
    let (count, data, md) = r;
    let mut data = data.as_object().cloned().unwrap_or_default();
    if let Some(text) = data.get("text/plain").and_then(Value::as_str) {
        let plain = if text.is_empty() {
            String::new()
        } else {
            let text = if text.contains('\n') && !text.starts_with('\n') {
                format!("\n{text}")
            } else {
                text.to_owned()
            };
            let (out, normal) = if color { (RED, NORMAL) } else { ("", "") };
            format!("{out}Out[{eid}:{count}]: {normal}{text}")
        };
        data.insert("text/plain".into(), json!(plain));
    }
    Out {
        msg_type: "display_data",
        content: json!({"data": data, "metadata": md, "transient": {}}),
    }
}

fn error_text(err: &RemoteError, nth: usize) -> String {
    if nth <= TB_LIMIT {
        err.render_traceback().join("\n") + "\n"
    } else {
        err.one_line() + "\n"
    }
}

/// Engine ids, ascending, with runs of three or more consecutive ids as
/// `first-last`: `[0, 1, 2, 3]` → `0-3`, `[5, 0, 2, 6, 7]` → `0,2,5-7`,
/// `[0, 1]` → `0,1`.
pub fn fmt_id_ranges(ids: &[i64]) -> String {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        let mut j = i;
        while j + 1 < ids.len() && ids[j + 1] == ids[j] + 1 {
            j += 1;
        }
        if j - i >= 2 {
            parts.push(format!("{}-{}", ids[i], ids[j]));
        } else {
            parts.extend(ids[i..=j].iter().map(i64::to_string));
        }
        i = j + 1;
    }
    parts.join(",")
}

/// One CompileError that every target engine reported identically.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedError<'a> {
    /// The engines, in target order.
    pub engine_ids: Vec<i64>,
    /// The first target's error (all are equal but for the engine id).
    pub error: &'a RemoteError,
}

impl SharedError<'_> {
    /// `[0-3:execute]`.
    pub fn label(&self) -> String {
        format!(
            "[{}:{}]",
            fmt_id_ranges(&self.engine_ids),
            self.error.method
        )
    }

    /// `[0-3:execute] CompileError on all 4 engines`.
    pub fn header(&self) -> String {
        format!(
            "{} {} on all {} engines",
            self.label(),
            self.error.ename,
            self.engine_ids.len()
        )
    }

    /// The header, then the traceback (like `RemoteError.render_traceback`).
    pub fn render_traceback(&self) -> Vec<String> {
        let mut v = vec![self.header()];
        match self.error.traceback_text() {
            Some(t) => v.extend(t.lines().map(str::to_owned)),
            None => v.push("No traceback available".into()),
        }
        v
    }
}

/// The cell's errors as one [`SharedError`], if there are two or more
/// targets and each reported a `CompileError` with the same ename, evalue,
/// traceback (and method).
pub fn identical_compile_error(r: &Results) -> Option<SharedError<'_>> {
    if r.engines.len() < 2 {
        return None;
    }
    let first = r.engines[0].error.as_ref()?;
    if first.ename != COMPILE_ERROR {
        return None;
    }
    let same = |e: &RemoteError| {
        e.ename == first.ename
            && e.evalue == first.evalue
            && e.traceback == first.traceback
            && e.method == first.method
    };
    if !r.engines.iter().all(|e| e.error.as_ref().is_some_and(same)) {
        return None;
    }
    Some(SharedError {
        engine_ids: r.engines.iter().map(|e| e.engine_id).collect(),
        error: first,
    })
}

/// Live output while a blocking `%px` runs with streaming on.
#[derive(Debug, Default)]
pub struct Streamer {
    pub color: bool,
    already_streamed: HashSet<String>,
    streamed_errors: usize,
    /// Engines (indices) whose CompileError waits for the other targets:
    /// shown once for all of them if they are identical ([`SharedError`]).
    held: Vec<usize>,
    /// Streams of many engines as one display per stream, engines with
    /// identical text merged ([`merged_stream_text`]).
    pub merge: bool,
}

/// From how many targets on identical outputs are merged (`[stdout:0-63]
/// done`); fewer keep ipyparallel's exact per-engine format.
pub const MERGE_MIN_TARGETS: usize = 9;

/// One stream of every engine, engines whose text is identical shown once
/// under their id ranges, groups in the order of their first engine:
/// `[stdout:0-62] done\n[stdout:63] failed\n`. Engines that wrote nothing
/// are left out.
pub fn merged_stream_text(r: &Results, name: &str) -> String {
    let mut groups: Vec<(&str, Vec<i64>)> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for e in &r.engines {
        let t = if name == "stderr" {
            &e.stderr
        } else {
            &e.stdout
        };
        if t.is_empty() {
            continue;
        }
        match index.get(t.as_str()) {
            Some(&i) => groups[i].1.push(e.engine_id),
            None => {
                index.insert(t.as_str(), groups.len());
                groups.push((t.as_str(), vec![e.engine_id]));
            }
        }
    }
    let mut out = String::new();
    for (text, ids) in groups {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&format!("[{name}:{}] {text}", fmt_id_ranges(&ids)));
    }
    out
}

impl Streamer {
    pub fn new(color: bool) -> Streamer {
        Streamer {
            color,
            ..Default::default()
        }
    }

    pub fn errors_shown(&self) -> usize {
        self.streamed_errors
    }

    /// Outputs for an event already recorded with [`Results::apply`].
    pub fn on_event(&mut self, results: &mut Results, idx: usize, ev: &EngineEvent) -> Vec<Out> {
        let e = &results.engines[idx];
        let eid = e.engine_id;
        match ev {
            EngineEvent::Stream { name, .. } if self.merge => {
                let name = if name == "stderr" { "stderr" } else { "stdout" };
                let id = format!("{}-merged-{name}", results.engines[0].msg_id);
                let update = !self.already_streamed.insert(id.clone());
                vec![Out {
                    msg_type: if update {
                        "update_display_data"
                    } else {
                        "display_data"
                    },
                    content: json!({
                        "data": {"text/plain": merged_stream_text(results, name)},
                        "metadata": {},
                        "transient": {"display_id": id},
                    }),
                }]
            }
            EngineEvent::Stream { name, .. } => {
                let name = if name == "stderr" { "stderr" } else { "stdout" };
                let full = if name == "stderr" {
                    &e.stderr
                } else {
                    &e.stdout
                };
                let id = format!("{}-{name}", e.msg_id);
                let update = !self.already_streamed.insert(id.clone());
                vec![Out {
                    msg_type: if update {
                        "update_display_data"
                    } else {
                        "display_data"
                    },
                    content: json!({
                        "data": {"text/plain": format!("[{name}:{eid}] {full}")},
                        "metadata": {},
                        "transient": {"display_id": id},
                    }),
                }]
            }
            EngineEvent::Display(c) => {
                vec![
                    Out::raw_text(format!("[output:{eid}]")),
                    republish(c, eid, false),
                ]
            }
            EngineEvent::UpdateDisplay(c) => vec![republish(c, eid, true)],
            EngineEvent::ClearOutput { .. } => vec![],
            EngineEvent::Result { .. } => match &e.execute_result {
                Some(r) => vec![result_display(eid, r, self.color)],
                None => vec![],
            },
            EngineEvent::Error(_) => self.show_error(results, idx),
        }
    }

    /// Show an engine's error if it has one that was not shown yet: from
    /// iopub as it arrives, or from the reply when no iopub error came (an
    /// engine that died, an aborted request). A CompileError of a cell with
    /// several targets is held until every target is done (then shown once
    /// if all are the same, else each one); see [`Streamer::finish`].
    pub fn show_error(&mut self, results: &mut Results, idx: usize) -> Vec<Out> {
        let several = results.engines.len() > 1;
        let e = &mut results.engines[idx];
        let mut out = vec![];
        match &e.error {
            Some(err) if !e.error_shown && !self.held.contains(&idx) => {
                if several && err.ename == COMPILE_ERROR {
                    self.held.push(idx);
                } else {
                    e.error_shown = true;
                    self.streamed_errors += 1;
                    out.push(Out::stream("stderr", error_text(err, self.streamed_errors)));
                }
            }
            _ => {}
        }
        if !self.held.is_empty() && results.done() {
            out.extend(self.finish(results));
        }
        out
    }

    /// Release the held CompileErrors (when every target is done, or the
    /// cell ends without them, e.g. interrupted): one block for an error
    /// that every target reported identically, else each in target order,
    /// counted like the others for the tb limit.
    pub fn finish(&mut self, results: &mut Results) -> Vec<Out> {
        if self.held.is_empty() {
            return vec![];
        }
        self.held.clear();
        if let Some(shared) = identical_compile_error(results) {
            let text = shared.render_traceback().join("\n") + "\n";
            for e in results.engines.iter_mut() {
                e.error_shown = true;
            }
            self.streamed_errors += 1;
            return vec![Out::stream("stderr", text)];
        }
        let mut out = vec![];
        for e in results.engines.iter_mut() {
            if let Some(err) = &e.error
                && !e.error_shown
                && err.ename == COMPILE_ERROR
            {
                e.error_shown = true;
                self.streamed_errors += 1;
                out.push(Out::stream("stderr", error_text(err, self.streamed_errors)));
            }
        }
        out
    }
}

/// ipyparallel's `_display_stream` state: the prefix is printed only when it
/// changes; a newline is inserted when the previous text lacked one.
struct StreamPrinter {
    last_prefix: String,
    trailing_newline: bool,
}

impl StreamPrinter {
    fn new() -> Self {
        StreamPrinter {
            last_prefix: String::new(),
            trailing_newline: true,
        }
    }

    fn print(&mut self, out: &mut Vec<Out>, name: &str, text: &str, prefix: &str) {
        if text.is_empty() {
            return;
        }
        let mut prefix = prefix;
        if !prefix.is_empty() {
            if prefix == self.last_prefix {
                prefix = "";
            } else {
                self.last_prefix = prefix.to_owned();
            }
        }
        let pre = if !prefix.is_empty() && !self.trailing_newline {
            "\n"
        } else {
            ""
        };
        let sep = if prefix.is_empty() { "" } else { "\n" };
        self.trailing_newline = text.ends_with('\n');
        out.push(Out::stream(name, format!("{pre}{prefix}{sep}{text}")));
    }
}

/// `AsyncResult.display_outputs(groupby, result_only)`.
///
/// With `merge` (many targets, see [`MERGE_MIN_TARGETS`]) and grouping by
/// type or order, the engines' streams are shown as [`merged_stream_text`].
pub fn display_outputs(
    r: &Results,
    group: GroupBy,
    result_only: bool,
    color: bool,
    merge: bool,
) -> Vec<Out> {
    let mut out = Vec::new();
    let mut sp = StreamPrinter::new();
    if r.single && r.engines.len() == 1 {
        let e = &r.engines[0];
        if !result_only {
            sp.print(&mut out, "stdout", &e.stdout, "");
            sp.print(&mut out, "stderr", &e.stderr, "");
            for o in &e.outputs {
                out.push(republish(o, e.engine_id, false));
            }
        }
        if let Some(res) = &e.execute_result {
            out.push(result_display(e.engine_id, res, color));
        }
        return out;
    }
    match group {
        GroupBy::Engine => {
            for e in &r.engines {
                let eid = e.engine_id;
                if !result_only {
                    sp.print(&mut out, "stdout", &e.stdout, &format!("[stdout:{eid}] "));
                    sp.print(&mut out, "stderr", &e.stderr, &format!("[stderr:{eid}] "));
                }
                if (!e.outputs.is_empty() && !result_only) || e.execute_result.is_some() {
                    out.push(Out::raw_text(format!("[output:{eid}]")));
                }
                if !result_only {
                    for o in &e.outputs {
                        out.push(republish(o, eid, false));
                    }
                }
                if let Some(res) = &e.execute_result {
                    out.push(result_display(eid, res, color));
                }
            }
        }
        GroupBy::Type | GroupBy::Order => {
            if !result_only && merge {
                for name in ["stdout", "stderr"] {
                    let t = merged_stream_text(r, name);
                    if !t.is_empty() {
                        out.push(Out::stream(name, t));
                    }
                }
            } else if !result_only {
                for e in &r.engines {
                    let p = format!("[stdout:{}] ", e.engine_id);
                    sp.print(&mut out, "stdout", &e.stdout, &p);
                }
                for e in &r.engines {
                    let p = format!("[stderr:{}] ", e.engine_id);
                    sp.print(&mut out, "stderr", &e.stderr, &p);
                }
            }
            if !result_only {
                if group == GroupBy::Order {
                    // ipyparallel shows the i-th output only of engines that
                    // have the maximum number of outputs; we show every
                    // engine's i-th output that exists.
                    let n = r.engines.iter().map(|e| e.outputs.len()).max().unwrap_or(0);
                    for i in 0..n {
                        for e in &r.engines {
                            if let Some(o) = e.outputs.get(i) {
                                out.push(Out::raw_text(format!("[output:{}]", e.engine_id)));
                                out.push(republish(o, e.engine_id, false));
                            }
                        }
                    }
                } else {
                    for e in &r.engines {
                        if !e.outputs.is_empty() {
                            out.push(Out::raw_text(format!("[output:{}]", e.engine_id)));
                        }
                        for o in &e.outputs {
                            out.push(republish(o, e.engine_id, false));
                        }
                    }
                }
            }
            for e in &r.engines {
                if let Some(res) = &e.execute_result {
                    out.push(result_display(e.engine_id, res, color));
                }
            }
        }
    }
    out
}

/// The error a cell ends with.
#[derive(Debug, Clone, PartialEq)]
pub struct CellError {
    pub ename: String,
    pub evalue: String,
    pub traceback: Vec<String>,
}

impl CellError {
    pub fn content(&self) -> Value {
        json!({"ename": self.ename, "evalue": self.evalue, "traceback": self.traceback})
    }
}

/// One entry of a CompositeError: its label (`[0:execute]`), the line
/// heading its traceback, the error.
struct CompositeEntry<'a> {
    label: String,
    heading: String,
    error: &'a RemoteError,
}

fn composite(entries: &[CompositeEntry<'_>]) -> Option<CellError> {
    if entries.is_empty() {
        return None;
    }
    let mut evalue = "one or more exceptions raised in: %px".to_owned();
    let mut tb = Vec::new();
    for c in entries.iter().take(TB_LIMIT) {
        let e = c.error;
        evalue.push_str(&format!("\n{}{}: {}", c.label, e.ename, e.evalue));
        tb.push(c.heading.clone());
        match e.traceback_text() {
            Some(t) => tb.extend(t.lines().map(str::to_owned)),
            None => tb.push("No traceback available".into()),
        }
        tb.push(String::new());
    }
    if entries.len() > TB_LIMIT {
        let more = entries.len() - TB_LIMIT;
        evalue.push_str(&format!("\n.... {more} more exceptions ..."));
        tb.push(format!("... {more} more exceptions ..."));
    }
    Some(CellError {
        ename: "CompositeError".into(),
        evalue,
        traceback: tb,
    })
}

/// `CompositeError` for results whose errors were not shown yet.
pub fn composite_error(errors: &[&RemoteError]) -> Option<CellError> {
    let entries: Vec<CompositeEntry<'_>> = errors
        .iter()
        .map(|e| CompositeEntry {
            label: e.label(),
            heading: format!("{}:", e.label()),
            error: e,
        })
        .collect();
    composite(&entries)
}

/// The `CompositeError` of a whole execution (`--no-stream`, `%pxresult`):
/// [`composite_error`] of its errors, or one entry for a CompileError that
/// every target reported identically
/// (`[0-3:execute]CompileError: error[E0425]: …`, traceback headed
/// `[0-3:execute] CompileError on all 4 engines:`).
pub fn results_composite_error(r: &Results) -> Option<CellError> {
    match identical_compile_error(r) {
        Some(shared) => composite(&[CompositeEntry {
            label: shared.label(),
            heading: format!("{}:", shared.header()),
            error: shared.error,
        }]),
        None => composite_error(&r.errors()),
    }
}

/// `AlreadyDisplayedError`: the errors were streamed; the cell says how many.
pub fn already_displayed_error(n: usize) -> CellError {
    CellError {
        ename: "AlreadyDisplayedError".into(),
        evalue: format!("{n} errors"),
        traceback: vec![format!("{n} errors")],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{Expect, expect};

    fn render(outs: &[Out]) -> String {
        let mut s = String::new();
        for o in outs {
            let c = &o.content;
            match o.msg_type {
                "stream" => s.push_str(&format!(
                    "stream {}: {:?}\n",
                    c["name"].as_str().unwrap(),
                    c["text"].as_str().unwrap()
                )),
                t => {
                    let id = c["transient"]["display_id"].as_str().unwrap_or("-");
                    s.push_str(&format!(
                        "{t} [{id}] {} md={}\n",
                        serde_json::to_string(&c["data"]).unwrap(),
                        serde_json::to_string(&c["metadata"]).unwrap()
                    ));
                }
            }
        }
        s
    }

    fn check(outs: &[Out], e: Expect) {
        e.assert_eq(&render(outs));
    }

    fn stream(name: &str, t: &str) -> EngineEvent {
        EngineEvent::Stream {
            name: name.into(),
            text: t.into(),
        }
    }

    fn err(eid: i64, ename: &str) -> RemoteError {
        RemoteError {
            engine_id: eid,
            method: "execute".into(),
            ename: ename.into(),
            evalue: "boom".into(),
            traceback: vec![
                "Traceback (most recent call last):".into(),
                format!("  line 1\n{ename}: boom"),
            ],
        }
    }

    fn results(n: i64) -> Results {
        let t: Vec<(i64, String)> = (0..n).map(|i| (i, format!("m{i}"))).collect();
        Results::new(&t, false)
    }

    fn feed(r: &mut Results, s: &mut Streamer, idx: usize, ev: EngineEvent) -> Vec<Out> {
        r.apply(idx, &ev);
        s.on_event(r, idx, &ev)
    }

    #[test]
    fn many_engines_stream_into_one_display_with_identical_text_merged() {
        let mut r = results(12);
        let mut s = Streamer::new(false);
        s.merge = true;
        let mut outs = vec![];
        for i in 0..12 {
            outs.extend(feed(&mut r, &mut s, i, stream("stdout", "done\n")));
        }
        // the last update shows the whole picture: one line for 12 engines
        check(
            &outs[11..],
            expect![[r#"
                update_display_data [m0-merged-stdout] {"text/plain":"[stdout:0-11] done\n"} md={}
            "#]],
        );
        // engine 5 writes more: it leaves the group, in engine order; a
        // line without a newline is ended before the next group
        let o = feed(&mut r, &mut s, 5, stream("stdout", "and more"));
        let o2 = feed(&mut r, &mut s, 7, stream("stderr", "warn\n"));
        check(
            &[o, o2].concat(),
            expect![[r#"
                update_display_data [m0-merged-stdout] {"text/plain":"[stdout:0-4,6-11] done\n[stdout:5] done\nand more"} md={}
                display_data [m0-merged-stderr] {"text/plain":"[stderr:7] warn\n"} md={}
            "#]],
        );
        assert_eq!(
            merged_stream_text(&r, "stdout"),
            "[stdout:0-4,6-11] done\n[stdout:5] done\nand more"
        );
        // --no-stream: the same grouping in the final display
        check(
            &display_outputs(&r, GroupBy::Type, false, false, true),
            expect![[r#"
                stream stdout: "[stdout:0-4,6-11] done\n[stdout:5] done\nand more"
                stream stderr: "[stderr:7] warn\n"
            "#]],
        );
        // grouped by engine, every engine keeps its own block
        let by_engine = render(&display_outputs(&r, GroupBy::Engine, false, false, true));
        assert!(by_engine.contains("[stdout:11]"), "{by_engine}");
    }

    #[test]
    fn streaming_updates_one_display_per_engine_and_stream() {
        let mut r = results(2);
        let mut s = Streamer::new(true);
        let mut outs = vec![];
        outs.extend(feed(&mut r, &mut s, 0, stream("stdout", "hi\n")));
        outs.extend(feed(&mut r, &mut s, 1, stream("stdout", "hi\n")));
        outs.extend(feed(&mut r, &mut s, 0, stream("stdout", "there")));
        outs.extend(feed(&mut r, &mut s, 0, stream("stderr", "warn\n")));
        outs.extend(feed(
            &mut r,
            &mut s,
            1,
            EngineEvent::Result {
                execution_count: 3,
                data: json!({"text/plain": "42", "text/html": "<b>42</b>"}),
                metadata: json!({}),
            },
        ));
        outs.extend(feed(
            &mut r,
            &mut s,
            0,
            EngineEvent::Display(json!({"data": {"image/png": "iVBO"}, "metadata": {"width": 3}})),
        ));
        check(
            &outs,
            expect![[r#"
                display_data [m0-stdout] {"text/plain":"[stdout:0] hi\n"} md={}
                display_data [m1-stdout] {"text/plain":"[stdout:1] hi\n"} md={}
                update_display_data [m0-stdout] {"text/plain":"[stdout:0] hi\nthere"} md={}
                display_data [m0-stderr] {"text/plain":"[stderr:0] warn\n"} md={}
                display_data [-] {"text/html":"<b>42</b>","text/plain":"\u001b[0;31mOut[1:3]: \u001b[0m42"} md={}
                display_data [-] {"text/plain":"[output:0]"} md={}
                display_data [-] {"image/png":"iVBO"} md={"engine":0,"width":3}
            "#]],
        );
    }

    #[test]
    fn multiline_result_and_no_color() {
        let mut r = results(1);
        let mut s = Streamer::new(false);
        let outs = feed(
            &mut r,
            &mut s,
            0,
            EngineEvent::Result {
                execution_count: 1,
                data: json!({"text/plain": "array([[1],\n       [2]])"}),
                metadata: json!({}),
            },
        );
        check(
            &outs,
            expect![[r#"
                display_data [-] {"text/plain":"Out[0:1]: \narray([[1],\n       [2]])"} md={}
            "#]],
        );
    }

    #[test]
    fn errors_stream_then_collapse_after_four() {
        let mut r = results(6);
        let mut s = Streamer::new(true);
        let mut outs = vec![];
        for i in 0..6 {
            outs.extend(feed(
                &mut r,
                &mut s,
                i,
                EngineEvent::Error(err(i as i64, "ZeroDivisionError")),
            ));
        }
        check(
            &outs,
            expect![[r#"
                stream stderr: "[0:execute]\nTraceback (most recent call last):\n  line 1\nZeroDivisionError: boom\n"
                stream stderr: "[1:execute]\nTraceback (most recent call last):\n  line 1\nZeroDivisionError: boom\n"
                stream stderr: "[2:execute]\nTraceback (most recent call last):\n  line 1\nZeroDivisionError: boom\n"
                stream stderr: "[3:execute]\nTraceback (most recent call last):\n  line 1\nZeroDivisionError: boom\n"
                stream stderr: "[4:execute] ZeroDivisionError: boom\n"
                stream stderr: "[5:execute] ZeroDivisionError: boom\n"
            "#]],
        );
        // The reply's error is the same one: not shown twice.
        r.apply_reply(0, &json!({"status": "error", "ename": "ZeroDivisionError", "evalue": "boom", "traceback": []}));
        assert!(s.show_error(&mut r, 0).is_empty());
        assert_eq!(
            already_displayed_error(r.errors().len()).content(),
            json!({"ename": "AlreadyDisplayedError", "evalue": "6 errors", "traceback": ["6 errors"]})
        );
    }

    #[test]
    fn dead_engine_error_comes_from_the_reply() {
        let mut r = results(2);
        let mut s = Streamer::new(true);
        r.apply_reply(
            1,
            &json!({"status": "error", "ename": "EngineError", "evalue": "Engine 1 died while running task 'm1'",
                    "traceback": [], "engine_info": {"engine_id": 1, "method": "execute"}}),
        );
        assert!(r.engines[1].done());
        check(
            &s.show_error(&mut r, 1),
            expect![[r#"
                stream stderr: "[1:execute]\nNo traceback available\n"
            "#]],
        );
        assert!(!r.done());
    }

    fn sample() -> Results {
        let mut r = results(2);
        for i in 0..2 {
            r.apply(i, &stream("stdout", &format!("out{i}\n")));
            r.apply(i, &stream("stderr", &format!("err{i}")));
            r.apply(
                i,
                &EngineEvent::Display(
                    json!({"data": {"text/html": format!("<p>{i}a</p>")}, "metadata": {}}),
                ),
            );
            r.apply(
                i,
                &EngineEvent::Display(
                    json!({"data": {"text/html": format!("<p>{i}b</p>")}, "metadata": {}}),
                ),
            );
            r.apply(
                i,
                &EngineEvent::Result {
                    execution_count: 5,
                    data: json!({"text/plain": format!("{i}")}),
                    metadata: json!({}),
                },
            );
        }
        r
    }

    #[test]
    fn group_by_type() {
        check(
            &display_outputs(&sample(), GroupBy::Type, false, false, false),
            expect![[r#"
                stream stdout: "[stdout:0] \nout0\n"
                stream stdout: "[stdout:1] \nout1\n"
                stream stderr: "[stderr:0] \nerr0"
                stream stderr: "\n[stderr:1] \nerr1"
                display_data [-] {"text/plain":"[output:0]"} md={}
                display_data [-] {"text/html":"<p>0a</p>"} md={"engine":0}
                display_data [-] {"text/html":"<p>0b</p>"} md={"engine":0}
                display_data [-] {"text/plain":"[output:1]"} md={}
                display_data [-] {"text/html":"<p>1a</p>"} md={"engine":1}
                display_data [-] {"text/html":"<p>1b</p>"} md={"engine":1}
                display_data [-] {"text/plain":"Out[0:5]: 0"} md={}
                display_data [-] {"text/plain":"Out[1:5]: 1"} md={}
            "#]],
        );
    }

    #[test]
    fn group_by_engine() {
        check(
            &display_outputs(&sample(), GroupBy::Engine, false, false, false),
            expect![[r#"
                stream stdout: "[stdout:0] \nout0\n"
                stream stderr: "[stderr:0] \nerr0"
                display_data [-] {"text/plain":"[output:0]"} md={}
                display_data [-] {"text/html":"<p>0a</p>"} md={"engine":0}
                display_data [-] {"text/html":"<p>0b</p>"} md={"engine":0}
                display_data [-] {"text/plain":"Out[0:5]: 0"} md={}
                stream stdout: "\n[stdout:1] \nout1\n"
                stream stderr: "[stderr:1] \nerr1"
                display_data [-] {"text/plain":"[output:1]"} md={}
                display_data [-] {"text/html":"<p>1a</p>"} md={"engine":1}
                display_data [-] {"text/html":"<p>1b</p>"} md={"engine":1}
                display_data [-] {"text/plain":"Out[1:5]: 1"} md={}
            "#]],
        );
    }

    #[test]
    fn group_by_order() {
        check(
            &display_outputs(&sample(), GroupBy::Order, false, false, false),
            expect![[r#"
                stream stdout: "[stdout:0] \nout0\n"
                stream stdout: "[stdout:1] \nout1\n"
                stream stderr: "[stderr:0] \nerr0"
                stream stderr: "\n[stderr:1] \nerr1"
                display_data [-] {"text/plain":"[output:0]"} md={}
                display_data [-] {"text/html":"<p>0a</p>"} md={"engine":0}
                display_data [-] {"text/plain":"[output:1]"} md={}
                display_data [-] {"text/html":"<p>1a</p>"} md={"engine":1}
                display_data [-] {"text/plain":"[output:0]"} md={}
                display_data [-] {"text/html":"<p>0b</p>"} md={"engine":0}
                display_data [-] {"text/plain":"[output:1]"} md={}
                display_data [-] {"text/html":"<p>1b</p>"} md={"engine":1}
                display_data [-] {"text/plain":"Out[0:5]: 0"} md={}
                display_data [-] {"text/plain":"Out[1:5]: 1"} md={}
            "#]],
        );
    }

    #[test]
    fn single_target_has_no_prefix() {
        let mut r = Results::new(&[(3, "m".into())], true);
        r.apply(0, &stream("stdout", "x\n"));
        check(
            &display_outputs(&r, GroupBy::Type, false, true, false),
            expect![[r#"
                stream stdout: "x\n"
            "#]],
        );
    }

    #[test]
    fn composite_error_lists_four_then_counts() {
        let errs: Vec<RemoteError> = (0..6).map(|i| err(i, "ValueError")).collect();
        let refs: Vec<&RemoteError> = errs.iter().collect();
        let e = composite_error(&refs).unwrap();
        expect![[r#"
            one or more exceptions raised in: %px
            [0:execute]ValueError: boom
            [1:execute]ValueError: boom
            [2:execute]ValueError: boom
            [3:execute]ValueError: boom
            .... 2 more exceptions ..."#]]
        .assert_eq(&e.evalue);
        expect![[r#"
            [0:execute]:
            Traceback (most recent call last):
              line 1
            ValueError: boom

            [1:execute]:
            Traceback (most recent call last):
              line 1
            ValueError: boom

            [2:execute]:
            Traceback (most recent call last):
              line 1
            ValueError: boom

            [3:execute]:
            Traceback (most recent call last):
              line 1
            ValueError: boom

            ... 2 more exceptions ..."#]]
        .assert_eq(&e.traceback.join("\n"));
        assert!(composite_error(&[]).is_none());
    }

    fn compile_err(eid: i64, name: &str) -> RemoteError {
        let first = format!("error[E0425]: cannot find value `{name}` in this scope");
        RemoteError {
            engine_id: eid,
            method: "execute".into(),
            ename: COMPILE_ERROR.into(),
            evalue: first.clone(),
            traceback: vec![
                first,
                " --> src/lib.rs:1:1".into(),
                "  |".into(),
                format!("1 | {name} + 1"),
                "  | ^ not found in this scope".into(),
            ],
        }
    }

    fn compile_reply(e: &RemoteError) -> Value {
        json!({"status": "error", "ename": e.ename, "evalue": e.evalue, "traceback": e.traceback,
               "engine_info": {"engine_id": e.engine_id, "method": "execute"}})
    }

    /// An engine's error on iopub, then its reply and `idle` (the session
    /// shows errors of engines that are done).
    fn fail(r: &mut Results, s: &mut Streamer, idx: usize, e: RemoteError) -> Vec<Out> {
        let reply = compile_reply(&e);
        let mut outs = feed(r, s, idx, EngineEvent::Error(e));
        outs.extend(finish_engine(r, s, idx, reply));
        outs
    }

    fn finish_engine(r: &mut Results, s: &mut Streamer, idx: usize, reply: Value) -> Vec<Out> {
        r.apply_reply(idx, &reply);
        r.engines[idx].output_done = true;
        s.show_error(r, idx)
    }

    fn ok_reply() -> Value {
        json!({"status": "ok", "execution_count": 1})
    }

    #[test]
    fn id_ranges() {
        assert_eq!(fmt_id_ranges(&[0, 1, 2, 3]), "0-3");
        assert_eq!(fmt_id_ranges(&[5, 0, 2, 6, 7]), "0,2,5-7");
        assert_eq!(fmt_id_ranges(&[0, 1]), "0,1");
        assert_eq!(fmt_id_ranges(&[3, 2, 1, 0, 9]), "0-3,9");
        assert_eq!(fmt_id_ranges(&[4]), "4");
    }

    #[test]
    fn identical_compile_errors_are_shown_once() {
        let mut r = results(4);
        let mut s = Streamer::new(false);
        let mut outs = vec![];
        for i in 0..4 {
            outs.extend(fail(&mut r, &mut s, i, compile_err(i as i64, "y")));
            if i == 1 {
                // Other output keeps streaming while the errors are held.
                outs.extend(feed(&mut r, &mut s, 2, stream("stdout", "warming up\n")));
            }
        }
        assert!(r.done());
        check(
            &outs,
            expect![[r#"
                display_data [m2-stdout] {"text/plain":"[stdout:2] warming up\n"} md={}
                stream stderr: "[0-3:execute] CompileError on all 4 engines\nerror[E0425]: cannot find value `y` in this scope\n --> src/lib.rs:1:1\n  |\n1 | y + 1\n  | ^ not found in this scope\n"
            "#]],
        );
        // Nothing is shown twice; the cell still counts every engine's error.
        assert!(s.finish(&mut r).is_empty());
        assert!((0..4).all(|i| s.show_error(&mut r, i).is_empty()));
        assert_eq!(already_displayed_error(r.errors().len()).evalue, "4 errors");
        // --no-stream / %pxresult: the CompositeError lists it once.
        let e = results_composite_error(&r).unwrap();
        expect![[r#"
            one or more exceptions raised in: %px
            [0-3:execute]CompileError: error[E0425]: cannot find value `y` in this scope"#]]
        .assert_eq(&e.evalue);
        expect![[r#"
            [0-3:execute] CompileError on all 4 engines:
            error[E0425]: cannot find value `y` in this scope
             --> src/lib.rs:1:1
              |
            1 | y + 1
              | ^ not found in this scope
        "#]]
        .assert_eq(&e.traceback.join("\n"));
        // Two engines, listed as such.
        let mut r = Results::new(&[(2, "a".into()), (5, "b".into())], false);
        let mut s = Streamer::new(false);
        let mut outs = fail(&mut r, &mut s, 0, compile_err(2, "y"));
        outs.extend(fail(&mut r, &mut s, 1, compile_err(5, "y")));
        check(
            &outs,
            expect![[r#"
                stream stderr: "[2,5:execute] CompileError on all 2 engines\nerror[E0425]: cannot find value `y` in this scope\n --> src/lib.rs:1:1\n  |\n1 | y + 1\n  | ^ not found in this scope\n"
            "#]],
        );
    }

    #[test]
    fn different_compile_errors_are_shown_each() {
        let mut r = results(3);
        let mut s = Streamer::new(false);
        let mut outs = vec![];
        outs.extend(fail(&mut r, &mut s, 0, compile_err(0, "y")));
        outs.extend(fail(&mut r, &mut s, 1, compile_err(1, "z")));
        // A runtime error is never held or merged: it streams at once.
        outs.extend(feed(
            &mut r,
            &mut s,
            2,
            EngineEvent::Error(err(2, "ZeroDivisionError")),
        ));
        outs.extend(finish_engine(&mut r, &mut s, 2, ok_reply()));
        check(
            &outs,
            expect![[r#"
                stream stderr: "[2:execute]\nTraceback (most recent call last):\n  line 1\nZeroDivisionError: boom\n"
                stream stderr: "[0:execute]\nerror[E0425]: cannot find value `y` in this scope\n --> src/lib.rs:1:1\n  |\n1 | y + 1\n  | ^ not found in this scope\n"
                stream stderr: "[1:execute]\nerror[E0425]: cannot find value `z` in this scope\n --> src/lib.rs:1:1\n  |\n1 | z + 1\n  | ^ not found in this scope\n"
            "#]],
        );
        assert!(s.finish(&mut r).is_empty());
        // The same error text but one engine differs: each, ipyparallel's way.
        let mut r = results(2);
        r.apply(0, &EngineEvent::Error(compile_err(0, "y")));
        r.apply(1, &EngineEvent::Error(compile_err(1, "z")));
        expect![[r#"
            one or more exceptions raised in: %px
            [0:execute]CompileError: error[E0425]: cannot find value `y` in this scope
            [1:execute]CompileError: error[E0425]: cannot find value `z` in this scope"#]]
        .assert_eq(&results_composite_error(&r).unwrap().evalue);
    }

    #[test]
    fn compile_error_on_some_engines_only_is_shown_each() {
        let mut r = results(3);
        let mut s = Streamer::new(false);
        let mut outs = vec![];
        outs.extend(fail(&mut r, &mut s, 0, compile_err(0, "y")));
        outs.extend(fail(&mut r, &mut s, 2, compile_err(2, "y")));
        assert!(outs.is_empty(), "held until every target is done");
        outs.extend(feed(&mut r, &mut s, 1, stream("stdout", "ok\n")));
        outs.extend(finish_engine(&mut r, &mut s, 1, ok_reply()));
        check(
            &outs,
            expect![[r#"
                display_data [m1-stdout] {"text/plain":"[stdout:1] ok\n"} md={}
                stream stderr: "[0:execute]\nerror[E0425]: cannot find value `y` in this scope\n --> src/lib.rs:1:1\n  |\n1 | y + 1\n  | ^ not found in this scope\n"
                stream stderr: "[2:execute]\nerror[E0425]: cannot find value `y` in this scope\n --> src/lib.rs:1:1\n  |\n1 | y + 1\n  | ^ not found in this scope\n"
            "#]],
        );
        assert_eq!(already_displayed_error(r.errors().len()).evalue, "2 errors");
        let e = results_composite_error(&r).unwrap();
        expect![[r#"
            [0:execute]:
            error[E0425]: cannot find value `y` in this scope
             --> src/lib.rs:1:1
              |
            1 | y + 1
              | ^ not found in this scope

            [2:execute]:
            error[E0425]: cannot find value `y` in this scope
             --> src/lib.rs:1:1
              |
            1 | y + 1
              | ^ not found in this scope
        "#]]
        .assert_eq(&e.traceback.join("\n"));
    }

    #[test]
    fn held_compile_errors_are_released_when_the_cell_ends_early() {
        // Interrupted: engine 1 never returned; engine 0's error still shows.
        let mut r = results(2);
        let mut s = Streamer::new(false);
        assert!(fail(&mut r, &mut s, 0, compile_err(0, "y")).is_empty());
        check(
            &s.finish(&mut r),
            expect![[r#"
                stream stderr: "[0:execute]\nerror[E0425]: cannot find value `y` in this scope\n --> src/lib.rs:1:1\n  |\n1 | y + 1\n  | ^ not found in this scope\n"
            "#]],
        );
    }

    #[test]
    fn single_target_compile_error_streams_at_once_and_others_never_merge() {
        let mut r = results(1);
        let mut s = Streamer::new(false);
        check(
            &feed(&mut r, &mut s, 0, EngineEvent::Error(compile_err(0, "y"))),
            expect![[r#"
                stream stderr: "[0:execute]\nerror[E0425]: cannot find value `y` in this scope\n --> src/lib.rs:1:1\n  |\n1 | y + 1\n  | ^ not found in this scope\n"
            "#]],
        );
        assert!(identical_compile_error(&r).is_none());
        // Identical runtime errors on every engine stay one per engine.
        let mut r = results(2);
        for i in 0..2 {
            r.apply(i, &EngineEvent::Error(err(i as i64, "ValueError")));
        }
        assert!(identical_compile_error(&r).is_none());
        let e = results_composite_error(&r).unwrap();
        assert_eq!(e.evalue.lines().count(), 3, "{}", e.evalue);
    }

    #[test]
    fn carriage_returns_overwrite() {
        assert_eq!(collapse_cr("10%\r50%\r100%\n"), "100%\n");
        assert_eq!(collapse_cr("a\r\nb"), "a\r\nb");
        assert_eq!(collapse_cr("x\ry\nz\rw"), "y\nw");
    }
}
