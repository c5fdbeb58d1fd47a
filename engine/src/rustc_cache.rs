//! Compile once, run everywhere: a machine-wide cache of rustc invocations
//! shared by the Rust engines of one machine.
//!
//! Every Rust engine owns an evcxr context with its own crate directory, and
//! in a `%%px` cell every engine compiles the same code. Paying that N times
//! on a 2-core laptop would make N engines N/2 times slower than one. So the
//! engine sets itself as cargo's `RUSTC_WRAPPER` (with [`CACHE_ENV`] naming
//! the cache directory), and each rustc invocation goes through [`run`]:
//!
//! 1. The invocation is keyed by a SHA-256 over the rustc binary, the
//!    arguments and the `CARGO_*` environment with the engine's own crate
//!    directory (the "base") replaced by a placeholder, and the contents of the
//!    cell crate's sources, of every `--extern` file and of `OUT_DIR`.
//! 2. The first engine to take the key's lock compiles (its stderr goes to
//!    cargo live, so pipelining works) and stores the outputs rustc announced
//!    (`--json=artifacts`), its stdout/stderr and exit code — failed
//!    compilations too, so a compile error is also computed once.
//! 3. The others wait on the lock, then copy the outputs into their own
//!    target directory and replay the messages with their own base.
//!
//! What rustc read that the key does not cover is checked on every hit: the
//! `env!` variables and files outside the crate listed in the dep-info. An
//! engine whose values differ (`env!("PARALLAX_ENGINE_ID")`) compiles for
//! itself. Only crates whose sources are known are cached: the cell crate
//! `ctx` (evcxr writes all of it to `src/`) and crates from cargo's registry
//! or git checkouts; anything else runs rustc unchanged.

use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Names the cache directory; set (with `RUSTC_WRAPPER`) for cargo by the
/// Rust engine. `off` disables the cache.
pub const CACHE_ENV: &str = "PARALLAX_RUSTC_CACHE";
/// Upper bound of the cache's size in MiB (default 2048); least recently
/// used entries go first.
pub const CACHE_MB_ENV: &str = "PARALLAX_RUSTC_CACHE_MB";
/// When set, each invocation appends `pid crate outcome ms` to this file.
pub const LOG_ENV: &str = "PARALLAX_RUSTC_CACHE_LOG";

const PLACEHOLDER: &str = "\u{1}PARALLAX_BASE\u{1}";
const FORMAT: &str = "parallax-rustc-cache-1";

/// The default cache directory: `$XDG_CACHE_HOME/parallax/rustc`, else
/// `~/.cache/parallax/rustc`.
pub fn default_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("parallax").join("rustc"))
}

/// If cargo started this process as the rustc wrapper of a Rust engine, run
/// rustc through the cache and exit; otherwise return.
pub fn wrapper_hook() {
    let Some(dir) = std::env::var_os(CACHE_ENV) else {
        return;
    };
    let args: Vec<OsString> = std::env::args_os().collect();
    let is_rustc = args
        .get(1)
        .and_then(|a| Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("rustc"));
    if !is_rustc {
        return;
    }
    if dir == "off" || dir.is_empty() {
        exec_rustc(&args[1], &args[2..]);
    }
    std::process::exit(run(Path::new(&dir), &args[1], &args[2..]));
}

fn exec_rustc(rustc: &OsString, args: &[OsString]) -> ! {
    let err = Command::new(rustc).args(args).exec();
    eprintln!("parallax: could not run {}: {err}", rustc.to_string_lossy());
    std::process::exit(101);
}

/// Run one rustc invocation through the cache in `dir`; returns the exit code.
pub fn run(dir: &Path, rustc: &OsString, args: &[OsString]) -> i32 {
    let Some(plan) = Plan::new(rustc, args) else {
        exec_rustc(rustc, args);
    };
    let t0 = std::time::Instant::now();
    let result = plan.execute(dir);
    if let Some(log) = std::env::var_os(LOG_ENV) {
        // One line per invocation: crate, outcome, milliseconds.
        let line = format!(
            "{} {} {:?} {}ms\n",
            std::process::id(),
            plan.crate_name,
            result.as_ref().map(|(_, how)| *how),
            t0.elapsed().as_millis()
        );
        let _ = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .and_then(|mut f| f.write_all(line.as_bytes()));
    }
    match result {
        Ok((code, _)) => code,
        // Nothing ran yet: fall back to rustc itself.
        Err(_) => exec_rustc(rustc, args),
    }
}

/// Options of rustc's command line that take their value as the next argument.
const VALUE_OPTIONS: &[&str] = &[
    "-C",
    "--cfg",
    "--check-cfg",
    "--extern",
    "-L",
    "-l",
    "--out-dir",
    "--crate-name",
    "--crate-type",
    "--target",
    "--cap-lints",
    "--remap-path-prefix",
    "--env-set",
    "-Z",
    "--print",
    "-o",
    "-A",
    "-W",
    "-D",
    "-F",
    "--emit",
    "--error-format",
    "--json",
    "--edition",
];

#[derive(Debug)]
struct Plan {
    rustc: OsString,
    args: Vec<String>,
    crate_name: String,
    /// SHA-256 of the cell crate's sources as written (empty for other
    /// crates), when the key canonicalized them.
    exact: String,
    /// The engine's crate directory, replaced by [`PLACEHOLDER`] in the key
    /// and in stored text.
    base: String,
    key: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    path: String,
    file: String,
    /// Text with the base replaced (dep-info); binary files are copied as is.
    text: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    code: i32,
    /// The `exact` sources this was compiled from.
    #[serde(default)]
    exact: String,
    /// For a failed build of the cell crate: its `src/lib.rs` and the line
    /// ranges its diagnostics point at, so an engine whose variable
    /// statements are ordered differently can reuse the diagnostics when
    /// none of them points at a line that differs.
    #[serde(default)]
    source: String,
    #[serde(default)]
    diag_lines: Vec<(u64, u64)>,
    stdout: String,
    stderr: String,
    files: Vec<Stored>,
    /// `env!` variables rustc read, with their normalized values.
    env_deps: Vec<(String, Option<String>)>,
    /// Files outside the crate and the registry that rustc read, with the
    /// SHA-256 of their contents.
    file_deps: Vec<(String, String)>,
}

/// How an invocation was served (for the log).
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Hit,
    /// Another engine was compiling the same thing; its result was used.
    HitAfterWait,
    Compiled,
    /// Cached, but an `env!` value or a file differs here: compiled.
    Differs,
}

enum Lookup {
    Hit(i32),
    Miss,
    /// An entry exists but what this engine's rustc would read differs.
    Differs,
}

fn cargo_home() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
}

/// Sources under cargo's registry or git checkouts never change in place.
fn immutable_source(path: &Path) -> bool {
    let Some(home) = cargo_home() else {
        return false;
    };
    path.starts_with(home.join("registry").join("src"))
        || path.starts_with(home.join("git").join("checkouts"))
}

fn hash_file(h: &mut Sha256, path: &Path) -> std::io::Result<()> {
    let mut f = fs::File::open(path)?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
    }
}

fn sha_of_file(path: &Path) -> std::io::Result<String> {
    let mut h = Sha256::new();
    hash_file(&mut h, path)?;
    Ok(hex::encode(h.finalize()))
}

/// Hash every file under `dir` (sorted, with names relative to `dir`).
fn hash_tree(h: &mut Sha256, dir: &Path) -> std::io::Result<()> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let t = e.file_type()?;
            if t.is_dir() {
                stack.push(e.path());
            } else {
                files.push(e.path());
            }
        }
    }
    files.sort();
    for f in files {
        h.update(
            f.strip_prefix(dir)
                .unwrap_or(&f)
                .as_os_str()
                .as_encoded_bytes(),
        );
        h.update([0]);
        hash_file(h, &f)?;
        h.update([0]);
    }
    Ok(())
}

impl Plan {
    fn new(rustc: &OsString, args: &[OsString]) -> Option<Plan> {
        let args: Vec<String> = args
            .iter()
            .map(|a| a.to_str().map(str::to_owned))
            .collect::<Option<_>>()?;
        if args.iter().any(|a| a.starts_with('@') || a == "-") {
            return None;
        }
        let value_of = |name: &str| {
            args.iter()
                .position(|a| a == name)
                .and_then(|i| args.get(i + 1))
                .cloned()
        };
        let crate_name = value_of("--crate-name")?;
        let out_dir = value_of("--out-dir")?;
        let base = out_dir[..out_dir.find("/target/")?].to_owned();
        if !Path::new(&base).is_absolute() || !Path::new(&base).join("Cargo.toml").is_file() {
            return None;
        }
        let mut sources = Vec::new();
        for (i, a) in args.iter().enumerate() {
            let after_option = i > 0 && VALUE_OPTIONS.contains(&args[i - 1].as_str());
            if !a.starts_with('-') && !after_option {
                sources.push(a.clone());
            }
        }
        let [source] = sources.as_slice() else {
            return None;
        };
        let source_path = Path::new(&base).join(source);
        let normalize = |s: &str| s.replace(&base, PLACEHOLDER);

        let mut exact = String::new();
        let mut h = Sha256::new();
        h.update(FORMAT);
        h.update([0]);
        let meta = fs::metadata(rustc).ok()?;
        h.update(rustc.as_encoded_bytes());
        h.update(format!("|{}|{:?}", meta.len(), meta.modified().ok()));
        h.update([0]);
        for a in &args {
            h.update(normalize(a));
            h.update([0]);
        }
        if source_path.starts_with(Path::new(&base).join("src")) {
            // The cell crate: evcxr writes all of it under src/.
            if crate_name != "ctx" {
                return None;
            }
            let src = Path::new(&base).join("src");
            let mut exact_h = Sha256::new();
            hash_tree(&mut exact_h, &src).ok()?;
            exact = hex::encode(exact_h.finalize());
            // The key sees evcxr's variable statements in a canonical order
            // (see `canonical_cell`); other files under src/ as they are.
            match fs::read_to_string(src.join("lib.rs")) {
                Ok(lib) => h.update(canonical_cell(&lib)),
                Err(_) => h.update("no lib.rs"),
            }
            h.update([0]);
            let mut others = Sha256::new();
            for e in fs::read_dir(&src).ok()? {
                let e = e.ok()?;
                if e.file_name() != "lib.rs" {
                    others.update(e.file_name().as_encoded_bytes());
                    if e.file_type().ok()?.is_dir() {
                        hash_tree(&mut others, &e.path()).ok()?;
                    } else {
                        hash_file(&mut others, &e.path()).ok()?;
                    }
                }
            }
            h.update(others.finalize());
        } else if !immutable_source(&source_path) {
            return None;
        }
        h.update([0]);
        for (i, a) in args.iter().enumerate() {
            if i > 0
                && args[i - 1] == "--extern"
                && let Some((_, path)) = a.split_once('=')
            {
                hash_file(&mut h, Path::new(path)).ok()?;
                h.update([0]);
            }
        }
        let mut env: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| {
                (k.starts_with("CARGO_") && k != "CARGO_MAKEFLAGS")
                    || k == "OUT_DIR"
                    || k == "RUSTC_BOOTSTRAP"
            })
            .collect();
        env.sort();
        for (k, v) in &env {
            h.update(format!("{k}={}", normalize(v)));
            h.update([0]);
        }
        if let Some(out) = std::env::var_os("OUT_DIR") {
            hash_tree(&mut h, Path::new(&out)).ok()?;
        }
        Some(Plan {
            rustc: rustc.clone(),
            args,
            crate_name,
            base,
            exact,
            key: hex::encode(h.finalize()),
        })
    }

    fn normalize(&self, s: &str) -> String {
        s.replace(&self.base, PLACEHOLDER)
    }

    fn denormalize(&self, s: &str) -> String {
        s.replace(PLACEHOLDER, &self.base)
    }

    /// Errors mean nothing was compiled and the caller may run rustc itself.
    fn execute(&self, dir: &Path) -> std::io::Result<(i32, Outcome)> {
        let entries = dir.join("entries");
        let locks = dir.join("locks");
        fs::create_dir_all(&entries)?;
        fs::create_dir_all(&locks)?;
        let entry = entries.join(&self.key);
        if let Lookup::Hit(code) = self.lookup(&entry) {
            return Ok((code, Outcome::Hit));
        }
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(locks.join(&self.key))?;
        // SAFETY: flock on a descriptor we own; released when `lock` closes.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let store = match self.lookup(&entry) {
            Lookup::Hit(code) => return Ok((code, Outcome::HitAfterWait)),
            Lookup::Miss => true,
            Lookup::Differs => false,
        };
        let (status, stdout, stderr) = self.compile()?;
        let code = match status.code() {
            Some(c) => c,
            None => return Ok((128 + status.signal().unwrap_or(9), Outcome::Compiled)),
        };
        // 0: built; 1: compile errors. Anything else (an ICE, a crash) is
        // not worth replaying.
        if store && (code == 0 || code == 1) {
            let _ = self.store(dir, &entry, code, &stdout, &stderr);
        }
        drop(lock);
        Ok((
            code,
            if store {
                Outcome::Compiled
            } else {
                Outcome::Differs
            },
        ))
    }

    /// Run rustc; its stderr is forwarded line by line as it comes (cargo
    /// starts dependent crates on the metadata artifact notification).
    fn compile(&self) -> std::io::Result<(std::process::ExitStatus, Vec<u8>, Vec<u8>)> {
        let mut child = Command::new(&self.rustc)
            .args(&self.args)
            .stdin(Stdio::inherit())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let tee = std::thread::spawn(move || {
            let mut all = Vec::new();
            let mut r = BufReader::new(err);
            let stderr = std::io::stderr();
            loop {
                let start = all.len();
                match r.read_until(b'\n', &mut all) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let mut e = stderr.lock();
                        let _ = e.write_all(&all[start..]);
                        let _ = e.flush();
                    }
                }
            }
            all
        });
        let mut stdout = Vec::new();
        out.read_to_end(&mut stdout)?;
        let stderr = tee.join().unwrap_or_default();
        let status = child.wait()?;
        std::io::stdout().write_all(&stdout)?;
        Ok((status, stdout, stderr))
    }

    fn lookup(&self, entry: &Path) -> Lookup {
        let Ok(text) = fs::read_to_string(entry.join("meta.json")) else {
            return Lookup::Miss;
        };
        let Ok(meta) = serde_json::from_str::<Meta>(&text) else {
            return Lookup::Miss;
        };
        // A differently ordered source: a build stands in for it, and so do
        // diagnostics that point at none of the lines that differ.
        if meta.exact != self.exact && meta.code != 0 && !self.same_diagnostics(&meta) {
            return Lookup::Differs;
        }
        for (name, value) in &meta.env_deps {
            let now = std::env::var(name).ok().map(|v| self.normalize(&v));
            if &now != value {
                return Lookup::Differs;
            }
        }
        for (path, sha) in &meta.file_deps {
            if sha_of_file(Path::new(path)).ok().as_ref() != Some(sha) {
                return Lookup::Differs;
            }
        }
        let restored = meta.files.iter().try_for_each(|f| {
            let dest = PathBuf::from(self.denormalize(&f.path));
            let src = entry.join(&f.file);
            if f.text {
                fs::write(&dest, self.denormalize(&fs::read_to_string(&src)?))
            } else {
                // Not a hard link: evcxr renames the library it loads.
                let _ = fs::remove_file(&dest);
                fs::copy(&src, &dest).map(|_| ())
            }
        });
        if restored.is_err() {
            return Lookup::Miss;
        }
        // Least recently used goes first when the cache is full.
        if let Ok(f) = fs::File::options()
            .write(true)
            .open(entry.join("meta.json"))
        {
            let _ = f.set_modified(SystemTime::now());
        }
        let _ = std::io::stdout().write_all(self.denormalize(&meta.stdout).as_bytes());
        let _ = std::io::stderr().write_all(self.denormalize(&meta.stderr).as_bytes());
        Lookup::Hit(meta.code)
    }

    fn same_diagnostics(&self, meta: &Meta) -> bool {
        let Ok(mine) = fs::read_to_string(Path::new(&self.base).join("src/lib.rs")) else {
            return false;
        };
        let (a, b): (Vec<&str>, Vec<&str>) =
            (mine.lines().collect(), meta.source.lines().collect());
        if meta.source.is_empty() || a.len() != b.len() {
            return false;
        }
        let differ: Vec<u64> = (0..a.len())
            .filter(|&i| a[i] != b[i])
            .map(|i| i as u64 + 1)
            .collect();
        !meta
            .diag_lines
            .iter()
            .any(|&(lo, hi)| differ.iter().any(|&l| lo <= l && l <= hi))
    }

    fn store(
        &self,
        dir: &Path,
        entry: &Path,
        code: i32,
        stdout: &[u8],
        stderr: &[u8],
    ) -> std::io::Result<()> {
        let stderr = String::from_utf8_lossy(stderr);
        let mut artifacts = Vec::new();
        for line in stderr.lines() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line)
                && let Some(a) = v.get("artifact").and_then(|a| a.as_str())
            {
                artifacts.push((a.to_owned(), v["emit"] == "dep-info"));
            }
        }
        let tmp = dir.join(format!(".tmp-{}-{}", std::process::id(), self.key));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp)?;
        let result = (|| {
            let mut files = Vec::new();
            let mut env_deps = Vec::new();
            let mut file_deps = Vec::new();
            for (i, (path, dep_info)) in artifacts.iter().enumerate() {
                let name = format!("f{i}");
                if *dep_info {
                    let text = fs::read_to_string(path)?;
                    self.read_dep_info(&text, &mut env_deps, &mut file_deps)?;
                    fs::write(tmp.join(&name), self.normalize(&text))?;
                } else {
                    fs::copy(path, tmp.join(&name))?;
                }
                files.push(Stored {
                    path: self.normalize(path),
                    file: name,
                    text: *dep_info,
                });
            }
            let failed_cell = code != 0 && !self.exact.is_empty();
            let meta = Meta {
                code,
                exact: self.exact.clone(),
                source: if failed_cell {
                    fs::read_to_string(Path::new(&self.base).join("src/lib.rs")).unwrap_or_default()
                } else {
                    String::new()
                },
                diag_lines: if failed_cell {
                    diagnostic_lines(&stderr)
                } else {
                    Vec::new()
                },
                stdout: self.normalize(&String::from_utf8_lossy(stdout)),
                stderr: self.normalize(&stderr),
                files,
                env_deps,
                file_deps,
            };
            fs::write(tmp.join("meta.json"), serde_json::to_vec(&meta)?)?;
            let _ = fs::remove_dir_all(entry);
            fs::rename(&tmp, entry)
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        evict_if_needed(dir);
        result
    }

    /// Collect `# env-dep:` variables and the files outside the crate, the
    /// registry and the toolchain that a dep-info file lists.
    fn read_dep_info(
        &self,
        text: &str,
        env_deps: &mut Vec<(String, Option<String>)>,
        file_deps: &mut Vec<(String, String)>,
    ) -> std::io::Result<()> {
        let sysroot = Path::new(&self.rustc)
            .parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf);
        let out_dir = std::env::var_os("OUT_DIR").map(PathBuf::from);
        for line in text.lines() {
            if let Some(dep) = line.strip_prefix("# env-dep:") {
                let name = dep.split_once('=').map_or(dep, |(n, _)| n).to_owned();
                let value = std::env::var(&name).ok().map(|v| self.normalize(&v));
                if !env_deps.iter().any(|(n, _)| *n == name) {
                    env_deps.push((name, value));
                }
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let Some((_, deps)) = line.split_once(": ") else {
                continue;
            };
            for dep in split_escaped(deps) {
                let path = Path::new(&self.base).join(&dep);
                let known = path.starts_with(Path::new(&self.base).join("src"))
                    || immutable_source(&path)
                    || sysroot.as_ref().is_some_and(|s| path.starts_with(s))
                    || out_dir.as_ref().is_some_and(|o| path.starts_with(o));
                if !known && !file_deps.iter().any(|(p, _)| Path::new(p) == path) {
                    let sha = sha_of_file(&path)?;
                    file_deps.push((path.to_string_lossy().into_owned(), sha));
                }
            }
        }
        Ok(())
    }
}

/// The `src/lib.rs` line ranges rustc's JSON diagnostics point at,
/// children included.
fn diagnostic_lines(stderr: &str) -> Vec<(u64, u64)> {
    fn walk(v: &serde_json::Value, out: &mut Vec<(u64, u64)>) {
        for span in v["spans"].as_array().into_iter().flatten() {
            let file = span["file_name"].as_str().unwrap_or("");
            if file == "src/lib.rs" || file.ends_with("/src/lib.rs") {
                let lo = span["line_start"].as_u64().unwrap_or(0);
                let hi = span["line_end"].as_u64().unwrap_or(lo);
                out.push((lo, hi));
            }
        }
        for child in v["children"].as_array().into_iter().flatten() {
            walk(child, out);
        }
    }
    let mut out = Vec::new();
    for line in stderr.lines() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line)
            && v.get("spans").is_some()
        {
            walk(&v, &mut out);
        }
    }
    out
}

/// evcxr writes the statements that check, load and store a cell's
/// variables in the order of a `HashMap`, which differs between processes,
/// so engines that ran the same cells generate the same code in different
/// orders. For the key, each run of consecutive such lines is sorted: the
/// statements are independent operations on the variable store, so builds
/// of any order behave the same.
fn canonical_cell(src: &str) -> String {
    fn is_variable_line(l: &str) -> bool {
        let t = l.trim_start();
        t.contains("evcxr_variable_store.")
            && t.contains("stringify!(")
            && (t.starts_with("let ")
                || t.starts_with("vars_ok &= evcxr_variable_store.check_variable")
                || t.starts_with("evcxr_variable_store.put_variable"))
    }
    let mut out: Vec<&str> = Vec::new();
    let mut run: Vec<&str> = Vec::new();
    for l in src.split_inclusive('\n') {
        if is_variable_line(l) {
            run.push(l);
            continue;
        }
        run.sort_unstable();
        out.append(&mut run);
        out.push(l);
    }
    run.sort_unstable();
    out.append(&mut run);
    out.concat()
}

/// Make-style dependency lists escape spaces in paths with a backslash.
fn split_escaped(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            ' ' => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            _ => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Keep the cache under its size limit, removing least recently used
/// entries. Runs after about one store in eight.
fn evict_if_needed(dir: &Path) {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    if !nanos.is_multiple_of(8) {
        return;
    }
    let limit_mb: u64 = std::env::var(CACHE_MB_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    evict(dir, limit_mb * 1024 * 1024);
}

fn evict(dir: &Path, limit: u64) {
    let Ok(rd) = fs::read_dir(dir.join("entries")) else {
        return;
    };
    let mut entries: Vec<(SystemTime, u64, PathBuf)> = rd
        .flatten()
        .filter_map(|e| {
            let used = fs::metadata(e.path().join("meta.json"))
                .and_then(|m| m.modified())
                .ok()?;
            let size = fs::read_dir(e.path())
                .ok()?
                .flatten()
                .filter_map(|f| f.metadata().ok())
                .map(|m| m.len())
                .sum();
            Some((used, size, e.path()))
        })
        .collect();
    let mut total: u64 = entries.iter().map(|e| e.1).sum();
    if total <= limit {
        return;
    }
    entries.sort();
    for (_, size, path) in entries {
        if total <= limit / 10 * 8 {
            break;
        }
        if fs::remove_dir_all(&path).is_ok() {
            if let Some(key) = path.file_name() {
                let _ = fs::remove_file(dir.join("locks").join(key));
            }
            total = total.saturating_sub(size);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variable_statements_are_ordered_for_the_key() {
        let a = "fn run() {\n\
                 let mut x = evcxr_variable_store.take_variable::<i32>(stringify!(x));\n\
                 let a = evcxr_variable_store.take_variable::<u8>(stringify!(a));\n\
                 x += 1;\n\
                 evcxr_variable_store.put_variable::<i32>(stringify!(x), x);\n\
                 evcxr_variable_store.put_variable::<u8>(stringify!(a), a);\n}\n";
        let b = "fn run() {\n\
                 let a = evcxr_variable_store.take_variable::<u8>(stringify!(a));\n\
                 let mut x = evcxr_variable_store.take_variable::<i32>(stringify!(x));\n\
                 x += 1;\n\
                 evcxr_variable_store.put_variable::<u8>(stringify!(a), a);\n\
                 evcxr_variable_store.put_variable::<i32>(stringify!(x), x);\n}\n";
        assert_ne!(a, b);
        assert_eq!(canonical_cell(a), canonical_cell(b));
        // user statements never move
        let c = b.replace("x += 1;", "x += 2;");
        assert_ne!(canonical_cell(a), canonical_cell(&c));
        assert_eq!(canonical_cell("x\ny"), "x\ny");
    }

    #[test]
    fn dep_info_paths_split_on_unescaped_spaces() {
        assert_eq!(
            split_escaped("src/lib.rs /a\\ b/c.rs  /d.rs"),
            ["src/lib.rs", "/a b/c.rs", "/d.rs"]
        );
    }

    #[test]
    fn eviction_removes_least_recently_used_first() {
        let dir = std::env::temp_dir().join(format!("parallax-evict-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for (i, name) in ["old", "mid", "new"].iter().enumerate() {
            let e = dir.join("entries").join(name);
            fs::create_dir_all(&e).unwrap();
            fs::write(e.join("f0"), vec![0u8; 1000]).unwrap();
            fs::write(e.join("meta.json"), b"{}").unwrap();
            let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000 + i as u64);
            fs::File::options()
                .write(true)
                .open(e.join("meta.json"))
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        evict(&dir, 2100);
        let mut left: Vec<String> = fs::read_dir(dir.join("entries"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["new"]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
