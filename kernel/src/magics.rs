//! Parsing of cells and magics (pure: no I/O, no engines).
//!
//! A cell is either one `%%px` cell magic followed by its body, or a sequence
//! of line magics (`%name args`, at column 0) and code blocks. Magics are
//! never passed to the engines' interpreters: the kernel runs them. Only `%`
//! at column 0 starts a magic: everything else (Python's `!cmd`, evcxr's
//! `:dep`/`:vars`/`:opt` commands, Rust code) is code for the engines. Options
//! are ipyparallel's (`client/magics.py`: `exec_args`, `output_args`).

use std::fmt;

/// How `display_outputs` orders the outputs of several engines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupBy {
    /// All stdout, then all stderr, then displays per engine, then results.
    #[default]
    Type,
    /// Each engine's outputs together.
    Engine,
    /// Like `Type`, but the i-th display of every engine together.
    Order,
}

impl GroupBy {
    pub fn parse(s: &str) -> Result<GroupBy, MagicError> {
        match s {
            "type" => Ok(GroupBy::Type),
            "engine" => Ok(GroupBy::Engine),
            "order" => Ok(GroupBy::Order),
            other => Err(MagicError::new(format!(
                "argument --group-outputs: invalid choice: {other:?} (choose from 'engine', 'order', 'type')"
            ))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            GroupBy::Type => "type",
            GroupBy::Engine => "engine",
            GroupBy::Order => "order",
        }
    }
}

/// A target specification, resolved against the registered engine ids when
/// the cell runs (ipyparallel's `_eval_target_str`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Targets {
    All,
    /// One engine id (negative: counted from the end of the id list). A single
    /// target shows its streams without the `[stdout:N]` prefix in
    /// `display_outputs`, as ipyparallel's single results do.
    One(i64),
    List(Vec<i64>),
    /// A Python slice of the sorted engine ids.
    Slice {
        start: Option<i64>,
        stop: Option<i64>,
        step: Option<i64>,
    },
}

impl Targets {
    pub fn parse(s: &str) -> Result<Targets, MagicError> {
        let t = s.trim();
        let bad = || {
            MagicError::new(format!(
                "invalid --targets {s:?}: use an engine id (3), a list (0,2 or [0,2]), a slice of the ids (::2, 1:3, -2:) or all"
            ))
        };
        if t.is_empty() {
            return Err(bad());
        }
        if t.contains(':') {
            let inner = t.trim_start_matches('[').trim_end_matches(']');
            let parts: Vec<&str> = inner.split(':').collect();
            if parts.len() > 3 {
                return Err(bad());
            }
            let num = |p: Option<&&str>| -> Result<Option<i64>, MagicError> {
                match p.map(|p| p.trim()) {
                    None | Some("") => Ok(None),
                    Some(p) => p.parse::<i64>().map(Some).map_err(|_| bad()),
                }
            };
            let step = num(parts.get(2))?;
            if step == Some(0) {
                return Err(MagicError::new(
                    "invalid --targets: slice step cannot be zero",
                ));
            }
            return Ok(Targets::Slice {
                start: num(parts.first())?,
                stop: num(parts.get(1))?,
                step,
            });
        }
        if t.contains("all") {
            return Ok(Targets::All);
        }
        let bracketed = t.starts_with('[') || t.starts_with('(');
        let inner = t
            .trim_start_matches(['[', '('])
            .trim_end_matches([']', ')'])
            .trim();
        if inner.contains(',') || bracketed {
            let mut ids = Vec::new();
            for p in inner.split(',') {
                let p = p.trim();
                if p.is_empty() {
                    continue;
                }
                ids.push(p.parse::<i64>().map_err(|_| bad())?);
            }
            return Ok(Targets::List(ids));
        }
        inner.parse::<i64>().map(Targets::One).map_err(|_| bad())
    }

    /// Resolve against the sorted registered ids.
    pub fn resolve(&self, ids: &[i64]) -> Result<Vec<i64>, String> {
        let index = |i: i64| -> Result<i64, String> {
            let n = ids.len() as i64;
            let j = if i < 0 { i + n } else { i };
            if j < 0 || j >= n {
                Err(format!(
                    "engine index {i} out of range: engines are {ids:?}"
                ))
            } else {
                Ok(ids[j as usize])
            }
        };
        let check = |id: i64| -> Result<i64, String> {
            if id < 0 {
                index(id)
            } else if ids.contains(&id) {
                Ok(id)
            } else {
                Err(format!("no engine with id {id}: engines are {ids:?}"))
            }
        };
        let out = match self {
            Targets::All => ids.to_vec(),
            Targets::One(i) => vec![check(*i)?],
            Targets::List(l) => l.iter().map(|&i| check(i)).collect::<Result<_, _>>()?,
            Targets::Slice { start, stop, step } => py_slice(ids, *start, *stop, *step),
        };
        if out.is_empty() {
            return Err(format!(
                "--targets {self} selects no engine: engines are {ids:?}"
            ));
        }
        Ok(out)
    }

    pub fn is_single(&self) -> bool {
        matches!(self, Targets::One(_))
    }
}

impl fmt::Display for Targets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Targets::All => write!(f, "all"),
            Targets::One(i) => write!(f, "{i}"),
            Targets::List(l) => {
                let s: Vec<String> = l.iter().map(|i| i.to_string()).collect();
                write!(f, "[{}]", s.join(", "))
            }
            Targets::Slice { start, stop, step } => {
                let o = |x: &Option<i64>| x.map(|v| v.to_string()).unwrap_or_default();
                write!(f, "{}:{}", o(start), o(stop))?;
                if let Some(s) = step {
                    write!(f, ":{s}")?;
                }
                Ok(())
            }
        }
    }
}

/// Python's `list[start:stop:step]`.
fn py_slice<T: Copy>(v: &[T], start: Option<i64>, stop: Option<i64>, step: Option<i64>) -> Vec<T> {
    let n = v.len() as i64;
    let step = step.unwrap_or(1);
    let clamp = |x: i64, lo: i64, hi: i64| x.max(lo).min(hi);
    let norm = |x: i64| if x < 0 { x + n } else { x };
    let mut out = Vec::new();
    if step > 0 {
        let s = clamp(start.map(norm).unwrap_or(0), 0, n);
        let e = clamp(stop.map(norm).unwrap_or(n), 0, n);
        let mut i = s;
        while i < e {
            out.push(v[i as usize]);
            i += step;
        }
    } else {
        let s = clamp(start.map(norm).unwrap_or(n - 1), -1, n - 1);
        let e = clamp(stop.map(norm).unwrap_or(-1), -1, n - 1);
        let mut i = s;
        while i > e {
            out.push(v[i as usize]);
            i += step;
        }
    }
    out
}

/// A clear, user-facing error about a magic; nothing has run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MagicError(pub String);

impl MagicError {
    pub fn new(s: impl Into<String>) -> Self {
        MagicError(s.into())
    }
}

impl fmt::Display for MagicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Options of `%%px` / `%pxconfig` / `%pxresult`; `None` = use the default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PxOptions {
    pub targets: Option<Targets>,
    pub block: Option<bool>,
    pub stream: Option<bool>,
    pub group_by: Option<GroupBy>,
    pub progress_after: Option<f64>,
    pub out: Option<String>,
    pub verbose: Option<bool>,
    pub signal_on_interrupt: Option<String>,
    pub merge: Option<bool>,
    /// `%%px --local`: the cell also runs in the kernel's local interpreter.
    pub local: bool,
}

/// The defaults `%pxconfig` changes.
#[derive(Debug, Clone, PartialEq)]
pub struct PxConfig {
    pub targets: Targets,
    pub block: bool,
    pub stream: bool,
    pub group_by: GroupBy,
    pub progress_after: f64,
    pub verbose: bool,
    pub signal_on_interrupt: String,
    /// Show identical streams of many engines once (`[stdout:0-63] done`).
    pub merge: bool,
}

impl Default for PxConfig {
    fn default() -> Self {
        PxConfig {
            targets: Targets::All,
            block: true,
            stream: true,
            group_by: GroupBy::Type,
            progress_after: 2.0,
            verbose: false,
            signal_on_interrupt: "SIGINT".into(),
            merge: true,
        }
    }
}

impl PxConfig {
    /// The effective settings of one execution.
    pub fn with(&self, o: &PxOptions) -> PxConfig {
        PxConfig {
            targets: o.targets.clone().unwrap_or_else(|| self.targets.clone()),
            block: o.block.unwrap_or(self.block),
            stream: o.stream.unwrap_or(self.stream),
            group_by: o.group_by.unwrap_or(self.group_by),
            progress_after: o.progress_after.unwrap_or(self.progress_after),
            verbose: o.verbose.unwrap_or(self.verbose),
            signal_on_interrupt: o
                .signal_on_interrupt
                .clone()
                .unwrap_or_else(|| self.signal_on_interrupt.clone()),
            merge: o.merge.unwrap_or(self.merge),
        }
    }
}

/// Which options a magic accepts.
#[derive(Clone, Copy)]
struct Accepts {
    exec: bool,
    output: bool,
    out: bool,
}

/// One unit of work the kernel runs in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// Code for the engines, with per-execution options.
    Px {
        code: String,
        options: PxOptions,
    },
    /// Code without magic: runs with the defaults if `%autopx` is on.
    Code(String),
    PxConfig(PxOptions),
    PxResult {
        group_by: Option<GroupBy>,
        name: Option<String>,
    },
    Autopx,
    Engines,
    Cluster(ClusterCommand),
    /// `%%local` cells and `%local` lines: code for the kernel's own
    /// interpreter (crate::local), not the engines.
    Local(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum ClusterCommand {
    Show,
    Add(usize),
    Stop(Option<Vec<i64>>),
    Restart(Option<Vec<i64>>),
    Connect(String),
    /// `%cluster start ARGS`: engines through a launcher (the words, checked
    /// by `cluster_jobs::parse_start`).
    Start(Vec<String>),
}

pub const LINE_MAGICS: &[&str] = &[
    "px", "pxconfig", "pxresult", "result", "autopx", "engines", "cluster", "local",
];
pub const CELL_MAGICS: &[&str] = &["px", "local"];

const PX_HELP: &str = "%%px options: --targets/-t SPEC (id, list, slice like ::2, all), --block/-b, --noblock/-a, --stream, --no-stream, --group-outputs/-g type|engine|order (-e, -r), --progress-after SECONDS, --out NAME, --verbose, --no-verbose, --signal-on-interrupt SIG, --merge/--no-merge (identical output of 9+ engines shown once), --local (also run the cell in the kernel's local interpreter)";

fn unknown_magic(prefix: &str, name: &str) -> MagicError {
    let list = if prefix == "%%" {
        CELL_MAGICS
            .iter()
            .map(|m| format!("%%{m}"))
            .collect::<Vec<_>>()
    } else {
        LINE_MAGICS
            .iter()
            .map(|m| format!("%{m}"))
            .collect::<Vec<_>>()
    };
    MagicError::new(format!(
        "UsageError: {} magic {prefix}{name} not found. Parallax magics: {}. To run an engine-side magic, use %px {prefix}{name} … or a %%px cell.",
        if prefix == "%%" { "Cell" } else { "Line" },
        list.join(", ")
    ))
}

/// Split a cell into the items the kernel runs, every `%magic` a Parallax
/// one (the Rust kernel: evcxr has no `%` magics).
pub fn parse_cell(cell: &str) -> Result<Vec<Item>, MagicError> {
    parse_cell_with(cell, false)
}

/// IPython's own magics, never taken for a misspelt Parallax magic however
/// near their names are (`%config` is two edits from `%pxconfig`).
const IPYTHON_MAGICS: &[&str] = &[
    "alias",
    "alias_magic",
    "autoawait",
    "autocall",
    "automagic",
    "bookmark",
    "cat",
    "cd",
    "clear",
    "colors",
    "conda",
    "config",
    "connect_info",
    "cp",
    "debug",
    "dhist",
    "dirs",
    "doctest_mode",
    "ed",
    "edit",
    "env",
    "gui",
    "hist",
    "history",
    "killbgscripts",
    "ldir",
    "less",
    "lf",
    "lk",
    "ll",
    "load",
    "load_ext",
    "loadpy",
    "logoff",
    "logon",
    "logstart",
    "logstate",
    "logstop",
    "ls",
    "lsmagic",
    "lx",
    "macro",
    "magic",
    "man",
    "matplotlib",
    "mkdir",
    "more",
    "mv",
    "notebook",
    "page",
    "pastebin",
    "pdb",
    "pdef",
    "pdoc",
    "pfile",
    "pinfo",
    "pinfo2",
    "pip",
    "popd",
    "pprint",
    "precision",
    "prun",
    "psearch",
    "psource",
    "pushd",
    "pwd",
    "pycat",
    "pylab",
    "qtconsole",
    "quickref",
    "recall",
    "rehashx",
    "reload_ext",
    "rep",
    "rerun",
    "reset",
    "reset_selective",
    "rm",
    "rmdir",
    "run",
    "save",
    "sc",
    "set_env",
    "store",
    "sx",
    "system",
    "tb",
    "time",
    "timeit",
    "unalias",
    "unload_ext",
    "who",
    "who_ls",
    "whos",
    "xdel",
    "xmode",
    "bash",
    "capture",
    "debug",
    "file",
    "html",
    "javascript",
    "js",
    "latex",
    "markdown",
    "perl",
    "prun",
    "pypy",
    "python",
    "python2",
    "python3",
    "ruby",
    "script",
    "sh",
    "svg",
    "writefile",
];

/// Levenshtein distance of two short names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The Parallax magic a non-Parallax `name` looks like a slip of, if any:
/// `%pxconfg` → `pxconfig`, `%%pxx` → `px`, `%clster` → `cluster`. IPython's
/// own magics are never slips.
fn near_parallax_magic(prefix: &str, name: &str) -> Option<&'static str> {
    if IPYTHON_MAGICS.contains(&name) {
        return None;
    }
    let names = if prefix == "%%" {
        CELL_MAGICS
    } else {
        LINE_MAGICS
    };
    let best = names.iter().map(|m| (edit_distance(name, m), *m)).min()?;
    let (d, m) = best;
    // Short names need a closer match: `%px` is one edit from many words.
    let allowed = if m.len() >= 6 { 2 } else { 1 };
    if d <= allowed || (name.starts_with("px") && name.len() <= 10) {
        Some(m)
    } else {
        None
    }
}

/// A `%name` that is not a Parallax magic: with `engine_magics` (the Python
/// kernel) it goes to the engines' IPython as ipyparallel's `%autopx` sends
/// it, unless it looks like a slip of a Parallax magic, which is a
/// UsageError suggesting the near name.
fn foreign_magic(prefix: &str, name: &str, engine_magics: bool) -> Result<(), MagicError> {
    if name.is_empty() || !engine_magics {
        return Err(if name.is_empty() && prefix == "%" {
            MagicError::new(
                "UsageError: a lone % is not a magic; Parallax magics: %px, %pxconfig, %pxresult, %autopx, %engines, %cluster",
            )
        } else {
            unknown_magic(prefix, name)
        });
    }
    match near_parallax_magic(prefix, name) {
        Some(near) => Err(MagicError::new(format!(
            "{} Did you mean {prefix}{near}? (IPython's own magics, such as %timeit or %%bash, run on the engines.)",
            unknown_magic(prefix, name).0
        ))),
        None => Ok(()),
    }
}

/// Split a cell into the items the kernel runs; with `engine_magics` (the
/// Python kernel), `%magic`/`%%magic` that are not Parallax's stay in the
/// code for the engines' IPython.
pub fn parse_cell_with(cell: &str, engine_magics: bool) -> Result<Vec<Item>, MagicError> {
    let first_nonblank = cell.lines().position(|l| !l.trim().is_empty());
    let Some(first) = first_nonblank else {
        return Ok(vec![]);
    };
    let lines: Vec<&str> = cell.lines().collect();
    if let Some(rest) = lines[first].strip_prefix("%%") {
        let (name, args) = split_name(rest);
        if name == "local" {
            if !args.is_empty() {
                return Err(MagicError::new(format!(
                    "UsageError: %%local takes no arguments (got {args:?})"
                )));
            }
            let body = lines[first + 1..].join("\n");
            if body.trim().is_empty() {
                return Ok(vec![]);
            }
            return Ok(vec![Item::Local(body)]);
        }
        if name != "px" {
            foreign_magic("%%", name, engine_magics)?;
            return Ok(vec![Item::Code(lines[first..].join("\n"))]);
        }
        let options = parse_options(
            args,
            Accepts {
                exec: true,
                output: true,
                out: true,
            },
            "%%px",
        )?;
        let body = lines[first + 1..].join("\n");
        if body.trim().is_empty() {
            return Ok(vec![]);
        }
        return Ok(vec![Item::Px {
            code: body,
            options,
        }]);
    }
    let mut items = Vec::new();
    let mut code: Vec<&str> = Vec::new();
    let flush = |code: &mut Vec<&str>, items: &mut Vec<Item>| {
        if code.iter().any(|l| !l.trim().is_empty()) {
            items.push(Item::Code(code.join("\n")));
        }
        code.clear();
    };
    for line in lines {
        if let Some(rest) = line.strip_prefix("%%") {
            let (name, _) = split_name(rest);
            return Err(MagicError::new(format!(
                "UsageError: %%{name} must be on the first line of the cell"
            )));
        }
        if let Some(rest) = line.strip_prefix('%') {
            let (name, _) = split_name(rest);
            if !LINE_MAGICS.contains(&name) {
                foreign_magic("%", name, engine_magics)?;
                code.push(line);
                continue;
            }
            flush(&mut code, &mut items);
            items.push(parse_line_magic(rest)?);
        } else {
            code.push(line);
        }
    }
    flush(&mut code, &mut items);
    Ok(items)
}

/// Whether a cell runs in the local interpreter as a whole: a `%%local`
/// cell, or (with `%autopx` off) one without a `%%` magic. For
/// complete/inspect, which ask the interpreter the cell runs in.
pub fn is_local_cell(cell: &str, autopx: bool) -> bool {
    let first = cell.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    match first.strip_prefix("%%") {
        Some(rest) => split_name(rest).0 == "local",
        None => !autopx,
    }
}

/// Whether a cell only asks IPython for help (`?obj`, `obj?`, `obj??`,
/// `np.*int*?`): the engines' answers are shown once when they agree.
pub fn is_help_cell(cell: &str) -> bool {
    let name = |t: &str| {
        !t.is_empty()
            && t.chars()
                .all(|c| c.is_alphanumeric() || "_.*[]'\"".contains(c))
    };
    let mut any = false;
    for line in cell.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let t = line.trim_start_matches('?');
        let t = if t.len() < line.len() {
            t
        } else {
            line.trim_end_matches('?')
        };
        if t.len() == line.len() || line.len() - t.len() > 2 || !name(t.trim()) {
            return false;
        }
        any = true;
    }
    any
}

fn split_name(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.find(char::is_whitespace) {
        Some(i) => (&s[..i], s[i..].trim()),
        None => (s.trim(), ""),
    }
}

fn parse_line_magic(rest: &str) -> Result<Item, MagicError> {
    let (name, args) = split_name(rest);
    match name {
        "px" => {
            // ipyparallel's %px takes no options: the whole line is code.
            if args.is_empty() {
                return Err(MagicError::new(
                    "UsageError: %px needs code to run, e.g. %px import numpy",
                ));
            }
            Ok(Item::Px {
                code: args.to_owned(),
                options: PxOptions::default(),
            })
        }
        "pxconfig" => Ok(Item::PxConfig(parse_options(
            args,
            Accepts {
                exec: true,
                output: true,
                out: false,
            },
            "%pxconfig",
        )?)),
        "pxresult" | "result" => {
            let o = parse_options(
                args,
                Accepts {
                    exec: false,
                    output: true,
                    out: true,
                },
                "%pxresult",
            )?;
            Ok(Item::PxResult {
                group_by: o.group_by,
                name: o.out,
            })
        }
        "local" => {
            if args.is_empty() {
                return Err(MagicError::new(
                    "UsageError: %local needs code to run in the kernel's local interpreter, e.g. %local x = rc[:]['x']",
                ));
            }
            Ok(Item::Local(args.to_owned()))
        }
        "autopx" => no_args("%autopx", args, Item::Autopx),
        "engines" => no_args("%engines", args, Item::Engines),
        "cluster" => parse_cluster(args).map(Item::Cluster),
        "" => Err(MagicError::new(
            "UsageError: a lone % is not a magic; Parallax magics: %px, %pxconfig, %pxresult, %autopx, %engines, %cluster",
        )),
        other => Err(unknown_magic("%", other)),
    }
}

fn no_args(name: &str, args: &str, item: Item) -> Result<Item, MagicError> {
    if args.is_empty() {
        Ok(item)
    } else {
        Err(MagicError::new(format!(
            "UsageError: {name} takes no arguments (got {args:?})"
        )))
    }
}

const CLUSTER_HELP: &str = "%cluster usage: %cluster (show), %cluster add N, %cluster start -n N --engines mpi|slurm|pbs|sge|lsf|htcondor|ssh [parallax cluster start options], %cluster stop [IDS|all], %cluster restart [IDS|all], %cluster connect FILE";

fn parse_ids(args: &[String]) -> Result<Option<Vec<i64>>, MagicError> {
    if args.is_empty() || (args.len() == 1 && args[0] == "all") {
        return Ok(None);
    }
    let mut ids = Vec::new();
    for a in args {
        for p in a.split(',').filter(|p| !p.is_empty()) {
            ids.push(p.trim().parse::<i64>().map_err(|_| {
                MagicError::new(format!("UsageError: bad engine id {p:?}. {CLUSTER_HELP}"))
            })?);
        }
    }
    Ok(Some(ids))
}

fn parse_cluster(args: &str) -> Result<ClusterCommand, MagicError> {
    let words = shell_words(args)?;
    let bad = |m: String| MagicError::new(format!("UsageError: {m}. {CLUSTER_HELP}"));
    match words.first().map(String::as_str) {
        None | Some("show") | Some("status") if words.len() <= 1 => Ok(ClusterCommand::Show),
        Some("add") => {
            let n = match words.get(1) {
                None => 1,
                Some(w) => w
                    .trim_start_matches("-n")
                    .trim_start_matches('=')
                    .parse::<usize>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| bad(format!("%cluster add: bad engine count {w:?}")))?,
            };
            if words.len() > 2 {
                return Err(bad("%cluster add takes one count".into()));
            }
            Ok(ClusterCommand::Add(n))
        }
        Some("start") => {
            crate::cluster_jobs::parse_start(&words[1..])
                .map_err(|e| bad(format!("%cluster start: {e}")))?;
            Ok(ClusterCommand::Start(words[1..].to_vec()))
        }
        Some("stop") => Ok(ClusterCommand::Stop(parse_ids(&words[1..])?)),
        Some("restart") => Ok(ClusterCommand::Restart(parse_ids(&words[1..])?)),
        Some("connect") => match words.get(1) {
            Some(f) if words.len() == 2 => Ok(ClusterCommand::Connect(f.clone())),
            _ => Err(bad(
                "%cluster connect needs one connection file (ipcontroller-client.json)".into(),
            )),
        },
        Some(other) => Err(bad(format!("unknown %cluster action {other:?}"))),
        None => Ok(ClusterCommand::Show),
    }
}

/// Split like a POSIX shell (quotes, backslash escapes), as argparse sees it.
pub fn shell_words(s: &str) -> Result<Vec<String>, MagicError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err(MagicError::new("UsageError: unclosed ' quote")),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => {
                            if let Some(c) = chars.next() {
                                cur.push(c)
                            }
                        }
                        Some(c) => cur.push(c),
                        None => return Err(MagicError::new("UsageError: unclosed \" quote")),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(c) = chars.next() {
                    cur.push(c)
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c)
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

fn parse_options(args: &str, acc: Accepts, magic: &str) -> Result<PxOptions, MagicError> {
    let words = shell_words(args)?;
    let mut o = PxOptions::default();
    let mut it = words.into_iter().peekable();
    let usage = |m: String| MagicError::new(format!("UsageError: {magic}: {m}\n{PX_HELP}"));
    while let Some(w) = it.next() {
        let (flag, inline) = match w.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (w.clone(), None),
        };
        let mut value = |name: &str| -> Result<String, MagicError> {
            if let Some(v) = inline.clone() {
                return Ok(v);
            }
            match it.next() {
                Some(v) => Ok(v),
                None => Err(usage(format!("argument {name}: expected one argument"))),
            }
        };
        let exec_flag = matches!(
            flag.as_str(),
            "-b" | "--block"
                | "-a"
                | "--noblock"
                | "--stream"
                | "--no-stream"
                | "-t"
                | "--targets"
                | "--verbose"
                | "--no-verbose"
                | "--progress-after"
                | "--signal-on-interrupt"
                | "--merge"
                | "--no-merge"
        );
        let output_flag = matches!(flag.as_str(), "-r" | "-e" | "-g" | "--group-outputs");
        let out_flag = matches!(flag.as_str(), "-o" | "--out");
        if (exec_flag && !acc.exec) || (output_flag && !acc.output) || (out_flag && !acc.out) {
            return Err(usage(format!("unrecognized argument: {flag}")));
        }
        match flag.as_str() {
            "-b" | "--block" => o.block = Some(true),
            "-a" | "--noblock" => o.block = Some(false),
            "--stream" => o.stream = Some(true),
            "--no-stream" => o.stream = Some(false),
            "--verbose" => o.verbose = Some(true),
            "--merge" => o.merge = Some(true),
            "--no-merge" => o.merge = Some(false),
            "--no-verbose" => o.verbose = Some(false),
            "-t" | "--targets" => {
                o.targets = Some(Targets::parse(&value("--targets")?).map_err(|e| usage(e.0))?)
            }
            "--progress-after" => {
                let v = value("--progress-after")?;
                o.progress_after = Some(
                    v.parse::<f64>()
                        .ok()
                        .filter(|x| x.is_finite())
                        .ok_or_else(|| {
                            usage(format!(
                                "argument --progress-after: invalid float value: {v:?}"
                            ))
                        })?,
                )
            }
            "--signal-on-interrupt" => {
                let v = value("--signal-on-interrupt")?;
                if signal_number(&v).is_none() {
                    return Err(usage(format!(
                        "argument --signal-on-interrupt: unknown signal {v:?} (e.g. SIGINT, 2, SIGKILL, 9)"
                    )));
                }
                o.signal_on_interrupt = Some(v)
            }
            "-r" => o.group_by = Some(GroupBy::Order),
            "-e" => o.group_by = Some(GroupBy::Engine),
            "-g" | "--group-outputs" => {
                o.group_by =
                    Some(GroupBy::parse(&value("--group-outputs")?).map_err(|e| usage(e.0))?)
            }
            "-o" | "--out" => {
                let v = value("--out")?;
                if v.is_empty() || !v.chars().all(|c| c.is_alphanumeric() || c == '_') {
                    return Err(usage(format!("argument --out: {v:?} is not a name")));
                }
                o.out = Some(v)
            }
            "--local" if magic == "%%px" => o.local = true,
            other => return Err(usage(format!("unrecognized argument: {other}"))),
        }
    }
    Ok(o)
}

/// A signal name or number as `--signal-on-interrupt` takes it.
pub fn signal_number(s: &str) -> Option<i32> {
    if let Ok(n) = s.parse::<i32>() {
        return (0..=64).contains(&n).then_some(n);
    }
    let name = s.to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    Some(match name {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "TERM" => 15,
        "CONT" => 18,
        "STOP" => 19,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_specs() {
        let ids = [0, 1, 2, 3, 5];
        let r = |s: &str| Targets::parse(s).and_then(|t| t.resolve(&ids).map_err(MagicError));
        assert_eq!(r("all").unwrap(), vec![0, 1, 2, 3, 5]);
        assert_eq!(r("::2").unwrap(), vec![0, 2, 5]);
        assert_eq!(r("1:3").unwrap(), vec![1, 2]);
        assert_eq!(r("-2:").unwrap(), vec![3, 5]);
        assert_eq!(r("::-1").unwrap(), vec![5, 3, 2, 1, 0]);
        assert_eq!(r("5").unwrap(), vec![5]);
        assert_eq!(r("-1").unwrap(), vec![5]);
        assert_eq!(r("[0, 2]").unwrap(), vec![0, 2]);
        assert_eq!(r("0,3").unwrap(), vec![0, 3]);
        assert!(r("4").unwrap_err().0.contains("no engine with id 4"));
        assert!(r("7:").unwrap_err().0.contains("selects no engine"));
        assert!(Targets::parse("x").is_err());
        assert!(Targets::parse("::0").is_err());
        assert!(Targets::parse("1").unwrap().is_single());
    }

    #[test]
    fn cells() {
        assert_eq!(parse_cell("").unwrap(), vec![]);
        assert_eq!(parse_cell("  \n\n").unwrap(), vec![]);
        assert_eq!(
            parse_cell("x = 1\nprint(x)").unwrap(),
            vec![Item::Code("x = 1\nprint(x)".into())]
        );
        let items = parse_cell("%%px --targets ::2 --noblock -e\nprint(1)\n").unwrap();
        assert_eq!(
            items,
            vec![Item::Px {
                code: "print(1)".into(),
                options: PxOptions {
                    targets: Some(Targets::Slice {
                        start: None,
                        stop: None,
                        step: Some(2)
                    }),
                    block: Some(false),
                    group_by: Some(GroupBy::Engine),
                    ..Default::default()
                }
            }]
        );
        let items = parse_cell("%pxconfig --no-stream\na = 1\n%px print(a)\n%engines").unwrap();
        assert_eq!(items.len(), 4);
        assert_eq!(
            items[0],
            Item::PxConfig(PxOptions {
                stream: Some(false),
                ..Default::default()
            })
        );
        assert_eq!(items[1], Item::Code("a = 1".into()));
        assert_eq!(
            items[2],
            Item::Px {
                code: "print(a)".into(),
                options: PxOptions::default()
            }
        );
        assert_eq!(items[3], Item::Engines);
        // Indented % is code (e.g. inside a string or a continuation).
        assert_eq!(
            parse_cell("if 1:\n    %x").unwrap(),
            vec![Item::Code("if 1:\n    %x".into())]
        );
        assert_eq!(
            parse_cell("%pxresult --group-outputs=order").unwrap(),
            vec![Item::PxResult {
                group_by: Some(GroupBy::Order),
                name: None
            }]
        );
        assert_eq!(parse_cell("%%px\n\n").unwrap(), vec![]);
    }

    #[test]
    fn rust_cells_and_evcxr_commands_are_code() {
        // evcxr's `:` commands, shell-like `!` lines, attributes and `%`
        // (remainder) inside expressions are the engines' business.
        let cell = ":dep rand = \"0.8\"\n:vars\n!ls\n#[derive(Debug)]\nstruct P;\nlet r = 7 % 3;";
        assert_eq!(parse_cell(cell).unwrap(), vec![Item::Code(cell.into())]);
        assert_eq!(
            parse_cell("%%px --targets ::2\n:opt 2\nfn f() -> i32 { 1 }").unwrap(),
            vec![Item::Px {
                code: ":opt 2\nfn f() -> i32 { 1 }".into(),
                options: PxOptions {
                    targets: Some(Targets::Slice {
                        start: None,
                        stop: None,
                        step: Some(2)
                    }),
                    ..Default::default()
                }
            }]
        );
        assert_eq!(
            parse_cell(":dep serde\n%px :vars\nlet x = 1;").unwrap(),
            vec![
                Item::Code(":dep serde".into()),
                Item::Px {
                    code: ":vars".into(),
                    options: PxOptions::default()
                },
                Item::Code("let x = 1;".into()),
            ]
        );
    }

    #[test]
    fn ipython_magics_reach_the_python_engines() {
        let py = |c: &str| parse_cell_with(c, true);
        assert_eq!(
            py("%%bash\necho hi").unwrap(),
            vec![Item::Code("%%bash\necho hi".into())]
        );
        assert_eq!(
            py("%matplotlib inline\nimport numpy\n%timeit sum(range(9))").unwrap(),
            vec![Item::Code(
                "%matplotlib inline\nimport numpy\n%timeit sum(range(9))".into()
            )]
        );
        // Parallax magics keep priority and still split the cell.
        assert_eq!(
            py("%load_ext foo\n%px x = 1\n%config A.b = 1").unwrap(),
            vec![
                Item::Code("%load_ext foo".into()),
                Item::Px {
                    code: "x = 1".into(),
                    options: PxOptions::default()
                },
                Item::Code("%config A.b = 1".into()),
            ]
        );
        assert_eq!(py("?print").unwrap(), vec![Item::Code("?print".into())]);
        // Slips of Parallax magics are still UsageErrors naming the near one.
        for (cell, near) in [
            ("%pxconfg --no-stream", "%pxconfig"),
            ("%clster", "%cluster"),
            ("%autpx", "%autopx"),
            ("%pxreslt", "%pxresult"),
            ("%%pxx\nx", "%%px"),
        ] {
            let e = py(cell).unwrap_err().0;
            assert!(e.contains(&format!("Did you mean {near}?")), "{cell}: {e}");
        }
        // IPython's own names are never slips, however near.
        for m in [
            "%config x",
            "%reset -f",
            "%env A=1",
            "%time x",
            "%%time\nx",
            "%%html\n<b/>",
        ] {
            assert!(py(m).is_ok(), "{m}");
        }
        assert!(py("%").unwrap_err().0.contains("lone %"));
        assert!(
            py("x = 1\n%%bash\nls")
                .unwrap_err()
                .0
                .contains("first line")
        );
    }

    #[test]
    fn bad_magics_say_what_is_valid() {
        let e = parse_cell("%%bash\nls").unwrap_err().0;
        assert!(
            e.contains("Cell magic %%bash not found") && e.contains("%%px"),
            "{e}"
        );
        let e = parse_cell("%timeit x").unwrap_err().0;
        assert!(
            e.contains("%timeit not found") && e.contains("%px %timeit"),
            "{e}"
        );
        let e = parse_cell("%%px --targets\nx").unwrap_err().0;
        assert!(
            e.contains("--targets: expected one argument") && e.contains("--group-outputs"),
            "{e}"
        );
        let e = parse_cell("%%px --group-outputs=bogus\nx").unwrap_err().0;
        assert!(e.contains("invalid choice"), "{e}");
        let e = parse_cell("%%px --frobnicate\nx").unwrap_err().0;
        assert!(e.contains("unrecognized argument: --frobnicate"), "{e}");
        let items = parse_cell("%%px --local\nx = 1").unwrap();
        assert!(
            matches!(&items[..], [Item::Px { options, .. }] if options.local),
            "{items:?}"
        );
        let e = parse_cell("%pxconfig --local").unwrap_err().0;
        assert!(e.contains("unrecognized argument: --local"), "{e}");
        assert_eq!(
            parse_cell("%%local\nimport os\nos.getpid()").unwrap(),
            vec![Item::Local("import os\nos.getpid()".into())]
        );
        assert_eq!(
            parse_cell("%local y = 2\n%px x = 1").unwrap()[0],
            Item::Local("y = 2".into())
        );
        assert!(parse_cell("%local").unwrap_err().0.contains("needs code"));
        assert!(
            parse_cell("%%local -v\nx")
                .unwrap_err()
                .0
                .contains("no arguments")
        );
        assert_eq!(parse_cell("%%local\n\n").unwrap(), vec![]);
        for help in [
            "?len",
            "len?",
            "os.path??",
            "  x?\n?y\n",
            "np.*int*?",
            "d['k']?",
        ] {
            assert!(is_help_cell(help), "{help}");
        }
        for not_help in ["", "x = 1\nx?", "???x", "print('?')", "x ? y", "f(x)?"] {
            assert!(!is_help_cell(not_help), "{not_help}");
        }
        assert!(is_local_cell("%%local\nx", true) && is_local_cell("x", false));
        assert!(!is_local_cell("%%px\nx", false) && !is_local_cell("x", true));
        let e = parse_cell("%pxconfig --out x").unwrap_err().0;
        assert!(e.contains("unrecognized argument: --out"), "{e}");
        let e = parse_cell("%%px --progress-after soon\nx").unwrap_err().0;
        assert!(e.contains("invalid float"), "{e}");
        let e = parse_cell("x\n%%px\ny").unwrap_err().0;
        assert!(e.contains("first line"), "{e}");
        assert!(parse_cell("%px").is_err());
        assert!(parse_cell("%autopx now").is_err());
        assert!(parse_cell("%%px --signal-on-interrupt SIGFOO\nx").is_err());
    }

    #[test]
    fn cluster_magic() {
        let c = |s: &str| match parse_cell(s).unwrap().remove(0) {
            Item::Cluster(c) => c,
            other => panic!("{other:?}"),
        };
        assert_eq!(c("%cluster"), ClusterCommand::Show);
        assert_eq!(c("%cluster add 2"), ClusterCommand::Add(2));
        assert_eq!(c("%cluster add"), ClusterCommand::Add(1));
        assert_eq!(
            c("%cluster stop 1 2"),
            ClusterCommand::Stop(Some(vec![1, 2]))
        );
        assert_eq!(c("%cluster restart all"), ClusterCommand::Restart(None));
        assert_eq!(
            c("%cluster connect '/tmp/a b.json'"),
            ClusterCommand::Connect("/tmp/a b.json".into())
        );
        assert!(parse_cell("%cluster add zero").is_err());
        assert!(parse_cell("%cluster explode").is_err());
        assert_eq!(
            c("%cluster start -n 4 --engines slurm --queue debug"),
            ClusterCommand::Start(
                ["-n", "4", "--engines", "slurm", "--queue", "debug"]
                    .map(String::from)
                    .to_vec()
            )
        );
        assert!(parse_cell("%cluster start -n 4 --engines nope").is_err());
    }

    #[test]
    fn config_merge() {
        let d = PxConfig::default();
        let o = PxOptions {
            block: Some(false),
            ..Default::default()
        };
        let e = d.with(&o);
        assert!(!e.block && e.stream && e.targets == Targets::All);
    }
}
