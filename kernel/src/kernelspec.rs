//! `parallax kernelspec install|remove|list`: Jupyter kernelspecs for the
//! Parallax kernel, like `jupyter kernelspec install`.
//!
//! A kernelspec is a directory `<data dir>/kernels/<name>/` with a
//! `kernel.json` (the command line Jupyter runs, with `{connection_file}`
//! substituted) and logos. The logos are embedded in the binary, so
//! installing works from anywhere; `argv[0]` is the absolute path of the
//! running `parallax` executable.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};

/// `println!` that ignores a closed stdout (`parallax … | head`) instead of
/// panicking halfway through a command.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// The logos, drawn by `kernelspec/make_logos.py`.
const LOGO_32: &[u8] = include_bytes!("../../kernelspec/logo-32x32.png");
const LOGO_64: &[u8] = include_bytes!("../../kernelspec/logo-64x64.png");
const LOGO_SVG: &str = include_str!("../../kernelspec/logo-svg.svg");

/// Engines a kernel starts when the kernelspec does not say otherwise.
pub const DEFAULT_ENGINES: u32 = 4;

#[derive(Debug, Subcommand)]
pub enum KernelspecCommand {
    /// Install the Parallax kernelspec (parallax-python; parallax-rust with
    /// --language rust or --all) so that Jupyter offers the kernel.
    Install(InstallArgs),
    /// Remove installed Parallax kernelspecs.
    #[command(visible_alias = "uninstall")]
    Remove(RemoveArgs),
    /// List the Parallax kernelspecs Jupyter can find.
    List(ListArgs),
}

/// Where a kernelspec goes, as `jupyter kernelspec install` chooses it.
#[derive(Debug, Clone, Default, Args)]
#[group(multiple = false)]
pub struct Location {
    /// The user's Jupyter data dir ($JUPYTER_DATA_DIR, else
    /// ~/.local/share/jupyter). The default.
    #[arg(long)]
    pub user: bool,
    /// The active Python environment: $VIRTUAL_ENV, else sys.prefix of
    /// `python3` (PREFIX/share/jupyter/kernels).
    #[arg(long = "sys-prefix")]
    pub sys_prefix: bool,
    /// An explicit prefix: PREFIX/share/jupyter/kernels.
    #[arg(long, value_name = "PREFIX")]
    pub prefix: Option<PathBuf>,
}

/// The language of a kernel's cells (and of its engines' interpreters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Language {
    Python,
    Rust,
}

impl Language {
    /// `python`, `rust`: the `--language` value and the kernelspec's language.
    pub fn name(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Rust => "rust",
        }
    }

    /// `Python`, `Rust`: for display names and banners.
    pub fn title(self) -> &'static str {
        match self {
            Language::Python => "Python",
            Language::Rust => "Rust",
        }
    }

    /// The default kernelspec name: `parallax-python`, `parallax-rust`.
    pub fn default_kernel_name(self) -> String {
        format!("parallax-{}", self.name())
    }
}

impl std::fmt::Display for Language {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Args)]
pub struct InstallArgs {
    #[command(flatten)]
    pub location: Location,
    /// Number of engines the kernel starts.
    #[arg(long, default_value_t = DEFAULT_ENGINES, value_parser = clap::value_parser!(u32).range(1..))]
    pub engines: u32,
    /// Language of the cells (the Rust kernelspec is installed only when
    /// asked for, or with --all).
    #[arg(long, value_enum, default_value_t = Language::Python)]
    pub language: Language,
    /// Install the kernelspecs of every language.
    #[arg(long, conflicts_with = "language")]
    pub all: bool,
    /// Kernelspec (directory) name instead of parallax-<language>.
    #[arg(long, conflicts_with = "all")]
    pub name: Option<String>,
    /// Display name instead of "Parallax Python (N engines)".
    #[arg(long = "display-name", conflicts_with = "all")]
    pub display_name: Option<String>,
    /// Environment for the kernel, KEY=VALUE (repeatable; Jupyter expands
    /// ${VAR} in values, e.g. PATH=/venv/bin:${PATH}).
    #[arg(long, value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// The kernel launches its engines through this launcher (mpi, slurm,
    /// pbs, sge, lsf, htcondor, ssh) instead of as local processes: a
    /// kernelspec such as "Parallax Python (Slurm, 64 engines)".
    #[arg(long)]
    pub launcher: Option<String>,
    /// An option of the launcher, as `parallax cluster start` takes it
    /// (repeatable), e.g. --launcher-arg=--queue=debug.
    #[arg(
        long = "launcher-arg",
        allow_hyphen_values = true,
        value_name = "ARG",
        requires = "launcher"
    )]
    pub launcher_args: Vec<String>,
    /// The kernel's hub listens here (default 127.0.0.1): 0.0.0.0 or an
    /// address the engines' hosts reach.
    #[arg(long = "ip", value_name = "ADDR")]
    pub ip: Option<String>,
    /// The hub's host name as the engines' hosts know it.
    #[arg(long = "location", value_name = "HOST")]
    pub hub_location: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct RemoveArgs {
    #[command(flatten)]
    pub location: Location,
    /// Kernelspec names (default: parallax-python and parallax-rust).
    pub names: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Print JSON ({name: {resource_dir, spec}}) instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: KernelspecCommand) -> Result<()> {
    match cmd {
        KernelspecCommand::Install(mut args) => {
            if !parallax_engine::RUST_ENGINE_BUILT {
                // --all: every language this binary runs
                if args.all {
                    args.all = false;
                    args.language = Language::Python;
                    say!(
                        "Not installing parallax-rust: {}",
                        parallax_engine::RUST_ENGINE_MISSING
                    );
                } else if args.language == Language::Rust {
                    bail!(parallax_engine::RUST_ENGINE_MISSING);
                }
            }
            for (name, dir) in install(&args)? {
                say!("Installed kernelspec {name} in {}", dir.display());
            }
            Ok(())
        }
        KernelspecCommand::Remove(args) => remove(&args),
        KernelspecCommand::List(args) => list(&args),
    }
}

/// The `kernel.json` of a Parallax kernelspec.
pub fn kernel_json(
    exe: &Path,
    engines: u32,
    language: Language,
    display_name: Option<&str>,
    env: &BTreeMap<String, String>,
) -> Value {
    let display = display_name.map(str::to_owned).unwrap_or_else(|| {
        let s = if engines == 1 { "" } else { "s" };
        format!("Parallax {} ({engines} engine{s})", language.title())
    });
    let mut spec = json!({
        "argv": [
            exe.to_string_lossy(),
            "kernel",
            "-f",
            "{connection_file}",
            "--engines",
            engines.to_string(),
            "--language",
            language.name(),
        ],
        "display_name": display,
        "language": language.name(),
        "interrupt_mode": "signal",
        "metadata": {"debugger": false},
    });
    if !env.is_empty() {
        spec["env"] = json!(env);
    }
    spec
}

/// The Python module the wheel's kernelspec runs: `python -m
/// parallax_jupyter kernel …` execs the `parallax` binary installed beside
/// it, with `PARALLAX_PYTHON` set to that Python (python/parallax_jupyter).
pub const WHEEL_MODULE: &str = "parallax_jupyter";

/// The `kernel.json` the wheel installs as a data file
/// (python/parallax_jupyter.data/data/share/jupyter/kernels/parallax-python).
/// A wheel's files cannot name the environment's absolute paths, so argv
/// starts with `python`, which jupyter_client replaces by its own
/// interpreter (as for ipykernel's spec): the environment's Python, which
/// imports the package and finds the binary through the package's record.
pub fn wheel_kernel_json() -> Value {
    let mut spec = kernel_json(
        Path::new("python"),
        DEFAULT_ENGINES,
        Language::Python,
        None,
        &BTreeMap::new(),
    );
    if let Some(argv) = spec["argv"].as_array_mut() {
        argv.splice(1..1, [json!("-m"), json!(WHEEL_MODULE)]);
    }
    spec
}

/// A kernelspec whose kernel launches its engines (`--launcher`) and
/// places its hub (`--ip`, `--location`): the options appended to its
/// argv, and the display name "Parallax Python (Slurm, 64 engines)"
/// unless one was given. The launcher and its options are checked here,
/// so a bad spec fails at install, not in the notebook.
pub fn add_launcher(spec: &mut Value, args: &InstallArgs, language: Language) -> Result<()> {
    let argv = spec["argv"].as_array_mut().context("argv")?;
    if let Some(l) = &args.launcher {
        let words =
            crate::cluster_jobs::kernel_words(args.engines as usize, l, &args.launcher_args);
        let parsed = crate::cluster_jobs::parse_start(&words)
            .map_err(|e| anyhow::anyhow!("--launcher {l}: {e}"))?;
        argv.push(json!(format!("--launcher={l}")));
        for a in &args.launcher_args {
            argv.push(json!(format!("--launcher-arg={a}")));
        }
        if args.display_name.is_none() {
            let s = if args.engines == 1 { "" } else { "s" };
            spec["display_name"] = json!(format!(
                "Parallax {} ({}, {} engine{s})",
                language.title(),
                parsed.engines.display_name(),
                args.engines
            ));
        }
    }
    let argv = spec["argv"].as_array_mut().context("argv")?;
    if let Some(ip) = &args.ip {
        argv.push(json!(format!("--ip={ip}")));
    }
    if let Some(l) = &args.hub_location {
        argv.push(json!(format!("--location={l}")));
    }
    Ok(())
}

/// Jupyter's kernel name rule: letters, digits, `.`, `_`, `-`.
pub fn valid_kernel_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The user's Jupyter data dir, as `jupyter_core.paths.jupyter_data_dir`
/// computes it (`env` passed in for testing).
pub fn user_data_dir(env: impl Fn(&str) -> Option<String>) -> PathBuf {
    let get = |k: &str| env(k).filter(|v| !v.is_empty());
    if let Some(d) = get("JUPYTER_DATA_DIR") {
        return PathBuf::from(d);
    }
    let home = get("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    if cfg!(target_os = "macos") {
        return home.join("Library").join("Jupyter");
    }
    get("XDG_DATA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".local").join("share"))
        .join("jupyter")
}

/// sys.prefix of the active Python: `$VIRTUAL_ENV`, else what `python3`
/// reports.
fn sys_prefix() -> Result<PathBuf> {
    if let Some(v) = std::env::var_os("VIRTUAL_ENV").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(v));
    }
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.prefix)"])
        .output()
        .context("running python3 to find sys.prefix (is python3 on PATH?)")?;
    if !out.status.success() {
        bail!(
            "python3 -c 'import sys; print(sys.prefix)' failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let prefix = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if prefix.is_empty() {
        bail!("python3 reported an empty sys.prefix");
    }
    Ok(PathBuf::from(prefix))
}

fn env_var(k: &str) -> Option<String> {
    std::env::var(k).ok()
}

/// The `kernels` directory for a [`Location`].
pub fn kernels_dir(location: &Location) -> Result<PathBuf> {
    let data = if let Some(p) = &location.prefix {
        p.join("share").join("jupyter")
    } else if location.sys_prefix {
        sys_prefix()?.join("share").join("jupyter")
    } else {
        user_data_dir(env_var)
    };
    let kernels = data.join("kernels");
    Ok(if kernels.is_absolute() {
        kernels
    } else {
        std::env::current_dir()?.join(kernels)
    })
}

fn parse_env(pairs: &[String]) -> Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => bail!("--env expects KEY=VALUE, got {p:?}"),
        })
        .collect()
}

/// The absolute path of the running executable.
fn current_exe() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the parallax executable")?;
    Ok(exe.canonicalize().unwrap_or(exe))
}

/// Install the requested kernelspecs; returns `(name, directory)` for each.
pub fn install(args: &InstallArgs) -> Result<Vec<(String, PathBuf)>> {
    let exe = current_exe()?;
    let kernels = kernels_dir(&args.location)?;
    install_into(&kernels, &exe, args)
}

/// Install into an explicit `kernels` directory with an explicit `argv[0]`.
pub fn install_into(
    kernels: &Path,
    exe: &Path,
    args: &InstallArgs,
) -> Result<Vec<(String, PathBuf)>> {
    let env = parse_env(&args.env)?;
    let languages: &[Language] = if args.all {
        &[Language::Python, Language::Rust]
    } else {
        std::slice::from_ref(&args.language)
    };
    let mut done = Vec::new();
    for &lang in languages {
        let name = args
            .name
            .clone()
            .unwrap_or_else(|| lang.default_kernel_name());
        if !valid_kernel_name(&name) {
            bail!("invalid kernel name {name:?}: use letters, digits, '.', '_' and '-'");
        }
        let mut spec = kernel_json(exe, args.engines, lang, args.display_name.as_deref(), &env);
        add_launcher(&mut spec, args, lang)?;
        let dir = kernels.join(&name);
        write_kernelspec(&dir, &spec)
            .with_context(|| format!("installing kernelspec {name} in {}", dir.display()))?;
        done.push((name, dir));
    }
    Ok(done)
}

/// Write one kernelspec directory, replacing an existing one (as
/// `jupyter kernelspec install` does). The files are written to a sibling
/// temporary directory first, so Jupyter never sees a half-written spec.
fn write_kernelspec(dir: &Path, spec: &Value) -> Result<()> {
    let parent = dir.parent().context("kernelspec dir has no parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let file_name = dir.file_name().context("kernelspec dir has no name")?;
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let write = || -> Result<()> {
        let mut text = serde_json::to_string_pretty(spec)?;
        text.push('\n');
        std::fs::write(tmp.join("kernel.json"), text)?;
        std::fs::write(tmp.join("logo-32x32.png"), LOGO_32)?;
        std::fs::write(tmp.join("logo-64x64.png"), LOGO_64)?;
        std::fs::write(tmp.join("logo-svg.svg"), LOGO_SVG)?;
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("removing the old {}", dir.display()))?;
        }
        std::fs::rename(&tmp, dir)?;
        Ok(())
    };
    let r = write();
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    r
}

fn remove(args: &RemoveArgs) -> Result<()> {
    let kernels = kernels_dir(&args.location)?;
    let names: Vec<String> = if args.names.is_empty() {
        vec![
            Language::Python.default_kernel_name(),
            Language::Rust.default_kernel_name(),
        ]
    } else {
        args.names.clone()
    };
    let mut removed = 0;
    for name in &names {
        if !valid_kernel_name(name) {
            bail!("invalid kernel name {name:?}");
        }
        let dir = kernels.join(name);
        if dir.join("kernel.json").is_file() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
            say!("Removed {}", dir.display());
            removed += 1;
        } else if !args.names.is_empty() {
            bail!("no kernelspec {name} in {}", kernels.display());
        }
    }
    if removed == 0 {
        say!("No Parallax kernelspecs in {}", kernels.display());
    }
    Ok(())
}

/// Jupyter's data path, in `jupyter_core.paths.jupyter_path` order:
/// `$JUPYTER_PATH`, the user dir, the environment's prefix, system dirs.
fn jupyter_data_path() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("JUPYTER_PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push(user_data_dir(env_var));
    if let Some(v) = std::env::var_os("VIRTUAL_ENV").filter(|v| !v.is_empty()) {
        dirs.push(PathBuf::from(v).join("share").join("jupyter"));
    }
    dirs.push(PathBuf::from("/usr/local/share/jupyter"));
    dirs.push(PathBuf::from("/usr/share/jupyter"));
    dirs.retain(|d| !d.as_os_str().is_empty());
    dirs
}

/// Kernelspecs whose argv runs `parallax … kernel`, first occurrence of a
/// name wins (as in Jupyter).
fn find_parallax_specs() -> BTreeMap<String, (PathBuf, Value)> {
    let mut found = BTreeMap::new();
    for data in jupyter_data_path() {
        let Ok(entries) = std::fs::read_dir(data.join("kernels")) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if found.contains_key(&name) {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(entry.path().join("kernel.json")) else {
                continue;
            };
            let Ok(spec) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            if is_parallax_spec(&spec) {
                found.insert(name, (entry.path(), spec));
            }
        }
    }
    found
}

fn is_parallax_spec(spec: &Value) -> bool {
    let argv: Vec<&str> = spec["argv"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    argv.len() >= 2
        && argv[1] == "kernel"
        && Path::new(argv[0])
            .file_name()
            .is_some_and(|f| f.to_string_lossy().starts_with("parallax"))
}

fn list(args: &ListArgs) -> Result<()> {
    let found = find_parallax_specs();
    if args.json {
        let out: serde_json::Map<String, Value> = found
            .into_iter()
            .map(|(name, (dir, spec))| {
                (
                    name,
                    json!({"resource_dir": dir.to_string_lossy(), "spec": spec}),
                )
            })
            .collect();
        say!("{}", serde_json::to_string_pretty(&Value::Object(out))?);
        return Ok(());
    }
    if found.is_empty() {
        say!("No Parallax kernelspecs found (parallax kernelspec install)");
        return Ok(());
    }
    let width = found.keys().map(String::len).max().unwrap_or(0).max(4);
    say!("{:width$}  {:30}  DIRECTORY", "NAME", "DISPLAY NAME");
    for (name, (dir, spec)) in &found {
        let display = spec["display_name"].as_str().unwrap_or("");
        say!("{name:width$}  {display:30}  {}", dir.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> InstallArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            a: InstallArgs,
        }
        let mut argv = vec!["x"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).unwrap().a
    }

    #[test]
    fn python_kernel_json() {
        let spec = kernel_json(
            Path::new("/opt/bin/parallax"),
            4,
            Language::Python,
            None,
            &BTreeMap::new(),
        );
        assert_eq!(
            spec,
            json!({
                "argv": ["/opt/bin/parallax", "kernel", "-f", "{connection_file}",
                         "--engines", "4", "--language", "python"],
                "display_name": "Parallax Python (4 engines)",
                "language": "python",
                "interrupt_mode": "signal",
                "metadata": {"debugger": false},
            })
        );
    }

    #[test]
    fn rust_kernel_json_and_env() {
        let env = BTreeMap::from([("PATH".to_owned(), "/v/bin:${PATH}".to_owned())]);
        let spec = kernel_json(Path::new("/p"), 1, Language::Rust, None, &env);
        assert_eq!(spec["display_name"], "Parallax Rust (1 engine)");
        assert_eq!(spec["language"], "rust");
        assert_eq!(spec["argv"][5], "1");
        assert_eq!(spec["argv"][7], "rust");
        assert_eq!(spec["env"], json!({"PATH": "/v/bin:${PATH}"}));
        let spec = kernel_json(Path::new("/p"), 8, Language::Rust, None, &BTreeMap::new());
        assert_eq!(spec["display_name"], "Parallax Rust (8 engines)");
        assert!(spec.get("env").is_none());
    }

    #[test]
    fn data_dirs() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            user_data_dir(env(&[("JUPYTER_DATA_DIR", "/j"), ("HOME", "/h")])),
            Path::new("/j")
        );
        if !cfg!(target_os = "macos") {
            assert_eq!(
                user_data_dir(env(&[("HOME", "/h")])),
                Path::new("/h/.local/share/jupyter")
            );
            assert_eq!(
                user_data_dir(env(&[("HOME", "/h"), ("XDG_DATA_HOME", "/x")])),
                Path::new("/x/jupyter")
            );
        }
        let loc = Location {
            prefix: Some("/pre".into()),
            ..Location::default()
        };
        assert_eq!(
            kernels_dir(&loc).unwrap(),
            Path::new("/pre/share/jupyter/kernels")
        );
    }

    #[test]
    fn names() {
        assert!(valid_kernel_name("parallax-python"));
        assert!(valid_kernel_name("p.x_1"));
        assert!(!valid_kernel_name(""));
        assert!(!valid_kernel_name("a/b"));
        assert!(!valid_kernel_name("a b"));
    }

    #[test]
    fn launcher_kernelspecs() {
        let a = args(&[
            "--engines",
            "64",
            "--launcher",
            "slurm",
            "--launcher-arg=--queue=debug",
            "--launcher-arg=--time=1:00:00",
            "--ip=0.0.0.0",
            "--location=login1",
        ]);
        let mut spec = kernel_json(
            Path::new("/p"),
            a.engines,
            Language::Python,
            None,
            &BTreeMap::new(),
        );
        add_launcher(&mut spec, &a, Language::Python).unwrap();
        assert_eq!(spec["display_name"], "Parallax Python (Slurm, 64 engines)");
        let argv: Vec<&str> = spec["argv"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            argv[8..],
            [
                "--launcher=slurm",
                "--launcher-arg=--queue=debug",
                "--launcher-arg=--time=1:00:00",
                "--ip=0.0.0.0",
                "--location=login1"
            ]
        );
        // the kernel parses what the spec runs
        {
            use clap::Parser;
            #[derive(Parser)]
            struct K {
                #[command(flatten)]
                k: crate::cli::KernelArgs,
            }
            let mut kargv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
            kargv[3] = "/c.json".into();
            let k = K::try_parse_from(&kargv[1..]).unwrap().k;
            let words = k.launch_words().unwrap().unwrap();
            assert_eq!(words[..4], ["-n", "64", "--engines", "slurm"]);
            assert_eq!(k.ip.as_deref(), Some("0.0.0.0"));
        }
        let bad = args(&["--launcher", "torque"]);
        let mut spec = kernel_json(Path::new("/p"), 4, Language::Python, None, &BTreeMap::new());
        let e = add_launcher(&mut spec, &bad, Language::Python).unwrap_err();
        assert!(format!("{e}").contains("unknown launcher"), "{e}");
        let bad = args(&["--launcher", "slurm", "--launcher-arg=--no-such-option"]);
        assert!(add_launcher(&mut spec, &bad, Language::Python).is_err());
    }

    #[test]
    fn wheel_kernelspec_is_the_generated_one() {
        let committed: Value = serde_json::from_str(include_str!(
            "../../python/parallax_jupyter.data/data/share/jupyter/kernels/parallax-python/kernel.json"
        ))
        .unwrap();
        assert_eq!(
            committed,
            wheel_kernel_json(),
            "the wheel's kernel.json is wheel_kernel_json() pretty-printed: update the file"
        );
        assert_eq!(
            committed["argv"].as_array().unwrap()[..3],
            [json!("python"), json!("-m"), json!("parallax_jupyter")]
        );
        // the logos beside it are the ones the binary embeds
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../python/parallax_jupyter.data/data/share/jupyter/kernels/parallax-python");
        assert_eq!(std::fs::read(dir.join("logo-32x32.png")).unwrap(), LOGO_32);
        assert_eq!(std::fs::read(dir.join("logo-64x64.png")).unwrap(), LOGO_64);
        assert_eq!(
            std::fs::read_to_string(dir.join("logo-svg.svg")).unwrap(),
            LOGO_SVG
        );
    }

    #[test]
    fn install_writes_spec_and_logos() {
        let root = std::env::temp_dir().join(format!("parallax-ks-{}", uuid::Uuid::new_v4()));
        let kernels = root.join("kernels");
        let exe = Path::new("/usr/bin/parallax");
        let done = install_into(&kernels, exe, &args(&["--engines", "3"])).unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].0, "parallax-python");
        let dir = kernels.join("parallax-python");
        let spec: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("kernel.json")).unwrap())
                .unwrap();
        assert_eq!(spec["display_name"], "Parallax Python (3 engines)");
        assert_eq!(spec["argv"][0], "/usr/bin/parallax");
        for (file, size) in [("logo-32x32.png", 32u32), ("logo-64x64.png", 64)] {
            let png = std::fs::read(dir.join(file)).unwrap();
            assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
            assert_eq!(&png[12..16], b"IHDR");
            let w = u32::from_be_bytes(png[16..20].try_into().unwrap());
            let h = u32::from_be_bytes(png[20..24].try_into().unwrap());
            assert_eq!((w, h), (size, size), "{file}");
        }
        // Reinstalling replaces; --all adds the Rust spec.
        let done = install_into(&kernels, exe, &args(&["--all"])).unwrap();
        let names: Vec<_> = done.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["parallax-python", "parallax-rust"]);
        let rust: Value = serde_json::from_str(
            &std::fs::read_to_string(kernels.join("parallax-rust/kernel.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(rust["display_name"], "Parallax Rust (4 engines)");
        let leftovers: Vec<_> = std::fs::read_dir(&kernels)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers.len(), 2, "{leftovers:?}");
        // Bad names and env are refused.
        assert!(install_into(&kernels, exe, &args(&["--name", "a/b"])).is_err());
        assert!(install_into(&kernels, exe, &args(&["--env", "NOEQUALS"])).is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn recognises_parallax_specs() {
        let spec = kernel_json(
            Path::new("/x/parallax"),
            2,
            Language::Python,
            None,
            &BTreeMap::new(),
        );
        assert!(is_parallax_spec(&spec));
        assert!(!is_parallax_spec(
            &json!({"argv": ["/usr/bin/python3", "-m", "ipykernel_launcher"]})
        ));
    }
}
