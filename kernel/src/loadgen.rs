//! `parallax bench engines -n N`: a load generator for the hub, as `wrk` is
//! for HTTP servers. It opens N *fake* engines — the engine side of the
//! protocol with nothing behind it: each registers (with the real engine's
//! registration code, retries included), echoes heartbeats from its own
//! sockets and answers every request on its shell at once — so the hub's
//! own limits are measured apart from Python's cost.
//!
//! Measured, in this order: the registration storm (N engines asking at
//! once → all replies, → all registered as the hub's notifications say),
//! the hub's memory per engine, the hub's CPU while it only heartbeats the
//! N engines, and fan-out + gather latency through the MUX (one
//! `execute_request` per engine, all N replies back, as `dv.execute` does).
//!
//! By default the hub is a `parallax hub` process of this binary in a
//! private profile (so its CPU and memory can be read from /proc);
//! `--file` points at an existing hub's engine connection file instead.
//!
//! `--sockets full` (the default) gives each fake engine the connections a
//! real engine holds: registration (kept open), heartbeat ping SUB and pong
//! DEALER, a shell ROUTER connected to the MUX, the task scheduler and its
//! broadcast leaf — 6 open files per engine here and 6 in the hub, so at
//! most ~3,160 engines fit under a hard limit of 20,000 per process.
//!
//! `--sockets lean` holds only what the measurement needs, so 10,000 fit:
//! * its own heartbeat **pong** DEALER (routing id = its uuid: the hub
//!   knows hearts by that connection, so it cannot be shared);
//! * a shell ROUTER connected only to what is measured: the MUX
//!   (`--via mux`), its broadcast leaf (`--via broadcast`), both, or
//!   nothing (`--via none`: registration storm, memory and heartbeat CPU
//!   only); the task scheduler as well where `--tasks` > 0;
//! * heartbeat **pings** on one SUB socket per `--ping-group` engines
//!   (default 500), each ping echoed on every member's own pong. The hub
//!   then publishes each ping to N/500 subscribers instead of N, so its
//!   heartbeat CPU at N lean engines undercounts the PUB side (the pongs,
//!   one per engine, are all there);
//! * **registration**: a DEALER of its own (identity = its uuid, the real
//!   engine's `register`, retries included), closed as soon as the reply is
//!   in, at most `--register-at-once` open at once (default: all -n where
//!   the limit on open files leaves room, else as many as it does). A few
//!   shared DEALERs would need fewer files, but the hub sends
//!   `registration_reply` without a parent header (as ipyparallel does)
//!   and its content carries only the id, status, heartbeat period and
//!   connection info — not the uuid — so replies on a shared socket could
//!   not be matched to the engines that asked. With the default the storm
//!   is still (nearly) every engine asking at once — 8,956 of 10,000 with
//!   `--via none` under a limit of 20,000 — and where the limit is tighter
//!   (958 at once for 9,000 `--via mux`) the rest queue for a socket.
//!
//! The open files needed (per engine × N + the shared ones + a slack of
//! 1024) are checked before anything starts, against the soft limit raised
//! to the hard one; the hub this command starts inherits that limit
//! (`parallax hub` raises its own soft limit to the hard one too), and
//! holds as many connections as this process. Where they do not fit the
//! command fails naming the largest -n that does.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use clap::{Args, Subcommand};
use parallax_wire::connection::EngineConnectionInfo;
use parallax_wire::{Authenticator, Limits, RawMessage, Session, Signer, format_date};
use serde_json::{Map, Value, json};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use zeromq::{DealerSocket, RouterSocket, Socket, SocketRecv, SocketSend, SubSocket, ZmqMessage};

use crate::client::{Chan, ClientEvent, HubClient};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Fake engines against a hub: registration storm, heartbeat CPU,
    /// memory per engine, fan-out/gather latency.
    Engines(EnginesArgs),
}

#[derive(Debug, Clone, Args)]
pub struct EnginesArgs {
    /// How many fake engines to connect.
    #[arg(short = 'n', long = "engines", default_value_t = 1000)]
    pub n: usize,
    /// An existing hub's engine connection file (ipcontroller-engine.json;
    /// its -client.json beside it). Default: start `parallax hub` here.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Fan-out rounds (one execute_request to every engine, all replies).
    #[arg(long, default_value_t = 20)]
    pub rounds: usize,
    /// Seconds over which the idle hub's heartbeat CPU is measured.
    #[arg(long, default_value_t = 10.0)]
    pub idle: f64,
    /// Heartbeat period of the hub this command starts, in ms.
    #[arg(long, default_value_t = 3000)]
    pub ping: u64,
    /// Seconds to wait for every engine to register.
    #[arg(long, default_value_t = 300.0)]
    pub timeout: f64,
    /// Print the figures as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Which fan-out to measure: one `execute_request` per engine through
    /// the MUX, one request through the broadcast scheduler, both, or none
    /// (registration, memory and heartbeats only). With `--sockets lean`
    /// it also picks the shell connections each fake engine opens.
    #[arg(long, value_enum, default_value_t = Via::Both)]
    pub via: Via,
    /// The fake engines' connections. `full`: each holds what a real
    /// engine holds (registration, heartbeat ping and pong, shell to the
    /// MUX, the task scheduler and its broadcast leaf: 6 in all, and the
    /// hub as many). `lean`: each holds its own heartbeat pong and a shell
    /// connected only to what `--via` (and `--tasks`) measure; heartbeat
    /// pings come in on one SUB per `--ping-group` engines and registration
    /// sockets close after the reply — so 10,000 fit under 20,000 open
    /// files, but the hub publishes each ping to fewer subscribers.
    #[arg(long, value_enum, default_value_t = Sockets::Full)]
    pub sockets: Sockets,
    /// `--sockets lean`: fake engines per shared heartbeat-ping SUB socket
    /// (default 500).
    #[arg(long, value_name = "N")]
    pub ping_group: Option<usize>,
    /// `--sockets lean`: registration sockets open at once (each closed
    /// after its reply). Default: as many as the limit on open files
    /// leaves room for, at most -n.
    #[arg(long, value_name = "N")]
    pub register_at_once: Option<usize>,
    /// After the fan-outs: this many load-balanced tasks through the hub's
    /// task scheduler (`apply_request`s with no target, as `lview.apply`
    /// sends them), at most `--window` in flight; reports tasks/s, every
    /// reply counted (none lost) and the hub's RSS along the way.
    #[arg(long, default_value_t = 0)]
    pub tasks: u64,
    /// Load-balanced tasks in flight at once.
    #[arg(long, default_value_t = 2000)]
    pub window: usize,
    /// An argument for the hub this command starts (repeatable), e.g.
    /// `--hub-arg=--sqlitedb`.
    #[arg(long = "hub-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub hub_args: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    Mux,
    Broadcast,
    Both,
    None,
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Mux => "mux",
            Via::Broadcast => "broadcast",
            Via::Both => "both",
            Via::None => "none",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Sockets {
    Full,
    Lean,
}

/// Fake engines per shared heartbeat-ping SUB socket in lean mode.
const PING_GROUP: usize = 500;
/// Open files neither side spends on engines: listening sockets, the
/// client's connections, epoll, stdio, the hub's database, etc.
const FD_SLACK: u64 = 1024;
/// Lean mode's least number of registration sockets open at once.
const MIN_REGISTER_AT_ONCE: usize = 64;

/// How the fake engines connect, with the open files that takes.
#[derive(Clone, Copy, Debug)]
struct Plan {
    sockets: Sockets,
    /// lean: connections each engine keeps (its pong + shell connections);
    /// full: 6
    per_engine: u64,
    /// lean: engines per shared ping SUB
    ping_group: usize,
    /// lean: registration sockets open at once
    register_at_once: usize,
}

impl Plan {
    /// Lean mode's shell connections per engine: the MUX and/or its
    /// broadcast leaf as `--via` says, the task scheduler for `--tasks`.
    fn lean_shell(a: &EnginesArgs) -> u64 {
        let via = match a.via {
            Via::Mux | Via::Broadcast => 1,
            Via::Both => 2,
            Via::None => 0,
        };
        via + u64::from(a.tasks > 0)
    }

    /// Open files `n` engines take in this process (the hub holds as many
    /// on its side), with `reg` registration sockets open at once in lean
    /// mode.
    fn need(&self, n: usize, reg: usize) -> u64 {
        match self.sockets {
            Sockets::Full => 6 * n as u64 + FD_SLACK,
            Sockets::Lean => {
                self.per_engine * n as u64
                    + n.div_ceil(self.ping_group) as u64
                    + reg.min(n) as u64
                    + FD_SLACK
            }
        }
    }

    /// The largest -n whose need fits under `have`.
    fn largest(&self, have: u64, reg: Option<usize>) -> usize {
        let fits = |n: usize| self.need(n, reg.unwrap_or(MIN_REGISTER_AT_ONCE)) <= have;
        let (mut lo, mut hi) = (0usize, have as usize);
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if fits(mid) { lo = mid } else { hi = mid - 1 }
        }
        lo
    }
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Engines(a) => {
            let plan = plan(&a)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let report = rt.block_on(engines(a.clone(), plan))?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_report(&report);
            }
            // Thousands of sockets: leave without waiting for each to close.
            rt.shutdown_timeout(Duration::from_secs(1));
            Ok(())
        }
    }
}

/// Check the options, raise the limit on open files as far as the engines
/// need (the hub this command starts inherits it, and `parallax hub` raises
/// its own soft limit to the hard one) and fail clearly, naming the largest
/// -n that fits, where they do not fit.
fn plan(a: &EnginesArgs) -> Result<Plan> {
    if a.n == 0 {
        bail!("-n must be at least 1");
    }
    let mut plan = Plan {
        sockets: a.sockets,
        per_engine: 6,
        ping_group: PING_GROUP,
        register_at_once: a.n,
    };
    match a.sockets {
        Sockets::Full => {
            if a.ping_group.is_some() || a.register_at_once.is_some() {
                bail!("--ping-group and --register-at-once apply only with --sockets lean");
            }
        }
        Sockets::Lean => {
            if a.via == Via::None && a.tasks > 0 {
                bail!(
                    "--tasks needs fake engines with a shell connection, and --sockets lean --via none \
                     opens none: use --via mux|broadcast|both with --tasks (or --sockets full)"
                );
            }
            if a.ping_group == Some(0) {
                bail!("--ping-group must be at least 1");
            }
            if a.register_at_once == Some(0) {
                bail!("--register-at-once must be at least 1");
            }
            plan.per_engine = 1 + Plan::lean_shell(a);
            plan.ping_group = a.ping_group.unwrap_or(PING_GROUP);
        }
    }
    let what = match a.sockets {
        Sockets::Full => "6 connections each".to_owned(),
        Sockets::Lean => format!(
            "{} connection{} each with --sockets lean --via {}{}",
            plan.per_engine,
            if plan.per_engine == 1 { "" } else { "s" },
            a.via.name(),
            if a.tasks > 0 { " --tasks" } else { "" }
        ),
    };
    // lean: the registration sockets open at once count too — ask for room
    // for all -n (or --register-at-once) of them, need room for at least
    // MIN_REGISTER_AT_ONCE
    let least = plan.need(a.n, a.register_at_once.unwrap_or(MIN_REGISTER_AT_ONCE));
    let want = plan.need(a.n, a.register_at_once.unwrap_or(a.n));
    let have = parallax_hub::driver::raise_fd_limit(want);
    if have < least {
        bail!(
            "{} fake engines ({what}) need about {least} open files, here and in the hub, but the limit is {have} \
             (and this process may not raise it: `ulimit -Hn`, or run as root where allowed); \
             use at most -n {}{}",
            a.n,
            plan.largest(have, a.register_at_once),
            if a.sockets == Sockets::Full {
                ", or --sockets lean"
            } else {
                ""
            }
        );
    }
    if a.sockets == Sockets::Lean {
        // what the limit leaves after the engines' own connections
        let room = have.saturating_sub(plan.need(a.n, 0)) as usize;
        plan.register_at_once = a.register_at_once.unwrap_or(a.n).min(a.n).min(room);
    }
    Ok(plan)
}

/// The hub process this command started (stopped on drop).
struct HubProc {
    child: Child,
    dir: PathBuf,
}

impl Drop for HubProc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_hub(ping_ms: u64, extra: &[String]) -> Result<(HubProc, PathBuf)> {
    // the hub inherits this process's (raised) limit on open files
    let dir = std::env::temp_dir().join(format!(
        "parallax-bench-engines-{}-{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir_all(&dir)?;
    let exe = std::env::current_exe().context("finding this executable")?;
    let child = Command::new(exe)
        .arg("hub")
        .arg(format!("--profile-dir={}", dir.display()))
        .arg("--ip=127.0.0.1")
        .arg(format!("--ping={ping_ms}"))
        .arg("--log-level=WARN")
        .args(extra)
        .stdin(Stdio::null())
        .spawn()
        .context("starting parallax hub")?;
    let hub = HubProc { child, dir };
    let file = hub.dir.join("security/ipcontroller-engine.json");
    let t = Instant::now();
    while !(file.exists() && hub.dir.join("security/ipcontroller-client.json").exists()) {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("the hub wrote no connection files within 30 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok((hub, file))
}

/// /proc/<pid>: (user+system CPU seconds, resident bytes).
fn proc_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // fields 14 and 15 (utime, stime) are at 11 and 12 after the comm
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf is always safe to call.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()?;
    Some((ticks / hz, rss_kb * 1024))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn engines(a: EnginesArgs, plan: Plan) -> Result<Value> {
    let (hub, engine_file) = match &a.file {
        Some(f) => (None, f.clone()),
        None => {
            let (h, f) = start_hub(a.ping, &a.hub_args)?;
            (Some(h), f)
        }
    };
    let hub_pid = hub.as_ref().map(|h| h.child.id());
    let info: EngineConnectionInfo = serde_json::from_str(
        &std::fs::read_to_string(&engine_file)
            .with_context(|| format!("reading {}", engine_file.display()))?,
    )
    .with_context(|| format!("{} is not an engine connection file", engine_file.display()))?;
    let client_file = client_file_beside(&engine_file)?;
    let client = HubClient::connect_file(&client_file).await?;
    let base_usage = hub_pid.and_then(proc_usage);

    // --- registration storm
    let stop = CancellationToken::new();
    let info = Arc::new(info);
    let (reg_tx, mut reg_rx) = mpsc::unbounded_channel::<Result<i64>>();
    let t0 = Instant::now();
    let mut changes = client.watch_engines();
    let mut ping_sockets = a.n;
    match plan.sockets {
        Sockets::Full => {
            for _ in 0..a.n {
                tokio::spawn(fake_engine(info.clone(), stop.clone(), reg_tx.clone()));
            }
        }
        Sockets::Lean => {
            let lean = Arc::new(Lean {
                info: info.clone(),
                stop: stop.clone(),
                registered: reg_tx.clone(),
                slots: Semaphore::new(plan.register_at_once),
                via: a.via,
                task: a.tasks > 0,
            });
            let groups = a.n.div_ceil(plan.ping_group);
            ping_sockets = groups;
            let mut pongs = Vec::with_capacity(groups);
            for _ in 0..groups {
                let mut ping = SubSocket::new();
                ping.subscribe("").await?;
                ping.connect(&engine_url(&info, info.hb_ping))
                    .await
                    .context("connecting a heartbeat ping socket")?;
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(ping_group(ping, rx, stop.clone()));
                pongs.push(tx);
            }
            for i in 0..a.n {
                tokio::spawn(lean_engine(
                    lean.clone(),
                    pongs[i / plan.ping_group].clone(),
                ));
            }
        }
    }
    drop(reg_tx);
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(a.timeout);
    let mut replies = 0usize;
    let mut replies_at = None;
    let mut failures = Vec::new();
    let registered_at = loop {
        let have = client.engines().len();
        if have >= a.n && replies_at.is_some() {
            break t0.elapsed();
        }
        tokio::select! {
            r = reg_rx.recv(), if replies_at.is_none() => match r {
                Some(Ok(_)) => {
                    replies += 1;
                    if replies + failures.len() == a.n { replies_at = Some(t0.elapsed()); }
                }
                Some(Err(e)) => {
                    failures.push(format!("{e:#}"));
                    if replies + failures.len() == a.n { replies_at = Some(t0.elapsed()); }
                }
                None => { replies_at.get_or_insert(t0.elapsed()); }
            },
            r = changes.changed() => { r.map_err(|_| anyhow!("the connection to the hub closed"))?; }
            _ = tokio::time::sleep_until(deadline) => {
                bail!(
                    "only {} of {} fake engines registered within {} s ({} registration replies; {} failed{})",
                    client.engines().len(), a.n, a.timeout, replies, failures.len(),
                    failures.first().map(|f| format!(": {f}")).unwrap_or_default()
                );
            }
        }
        if !failures.is_empty() {
            bail!(
                "{} fake engines failed to register: {}",
                failures.len(),
                failures[0]
            );
        }
    };
    let replies_at = replies_at.unwrap_or(registered_at);
    // let the hub finish the storm's work (notifications, the registration
    // pings' tail, compaction) before reading its memory and idle CPU
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reg_usage = hub_pid.and_then(proc_usage);
    let hub_files = hub_pid.and_then(open_files);
    let own_files = open_files(std::process::id());

    // --- idle heartbeats
    let idle = Duration::from_secs_f64(a.idle.max(0.0));
    let before = hub_pid.and_then(proc_usage);
    tokio::time::sleep(idle).await;
    let after = hub_pid.and_then(proc_usage);
    let registered_after_idle = client.engines().len();

    // --- fan-out and gather: through the MUX, then the broadcast scheduler
    let engines: Vec<(String, i64)> = client
        .engines()
        .into_iter()
        .map(|(id, u)| (u, id))
        .collect();
    let mut fanouts = Vec::new();
    for (via, prefix) in [(Via::Mux, "fanout"), (Via::Broadcast, "bcast")] {
        if a.via != via && a.via != Via::Both {
            continue;
        }
        let before = hub_pid.and_then(proc_usage);
        let mut times = Vec::with_capacity(a.rounds);
        for _ in 0..a.rounds {
            times.push(fan_out(&client, &engines, via).await?);
        }
        times.sort_by(|x, y| x.total_cmp(y));
        let after = hub_pid.and_then(proc_usage);
        fanouts.push((prefix, times, before, after));
    }
    let end_usage = hub_pid.filter(|_| a.via != Via::None).and_then(proc_usage);
    let tasks = if a.tasks > 0 {
        Some(load_balanced(&client, a.tasks, a.window.max(1), hub_pid).await?)
    } else {
        None
    };
    stop.cancel();

    let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
    let mut r = Map::new();
    r.insert("engines".into(), json!(a.n));
    r.insert(
        "sockets".into(),
        json!(match plan.sockets {
            Sockets::Full => "full",
            Sockets::Lean => "lean",
        }),
    );
    r.insert("via".into(), json!(a.via.name()));
    // the SUB sockets the hub publishes each ping to (one per engine with
    // full sockets, one per --ping-group engines with lean ones)
    r.insert("ping_subscribers".into(), json!(ping_sockets));
    if plan.sockets == Sockets::Lean {
        r.insert(
            "registration_sockets_at_once".into(),
            json!(plan.register_at_once),
        );
    }
    if let Some(f) = hub_files {
        r.insert("hub_open_files".into(), json!(f));
    }
    if let Some(f) = own_files {
        r.insert("loadgen_open_files".into(), json!(f));
    }
    r.insert(
        "registration_replies_s".into(),
        json!(replies_at.as_secs_f64()),
    );
    r.insert(
        "all_registered_s".into(),
        json!(registered_at.as_secs_f64()),
    );
    r.insert("registered_after_idle".into(), json!(registered_after_idle));
    if let (Some((_, rss0)), Some((_, rss1))) = (base_usage, reg_usage) {
        r.insert("hub_rss_idle_mib".into(), json!(mb(rss0)));
        r.insert("hub_rss_registered_mib".into(), json!(mb(rss1)));
        r.insert(
            "hub_kib_per_engine".into(),
            json!((rss1.saturating_sub(rss0)) as f64 / 1024.0 / a.n as f64),
        );
    }
    if let (Some((c0, _)), Some((c1, _))) = (before, after)
        && idle > Duration::ZERO
    {
        r.insert(
            "hub_heartbeat_cpu_percent".into(),
            json!(100.0 * (c1 - c0) / idle.as_secs_f64()),
        );
        r.insert("heartbeat_period_ms".into(), json!(a.ping));
    }
    if let Some((_, rss)) = end_usage {
        r.insert("hub_rss_after_fanout_mib".into(), json!(mb(rss)));
    }
    r.insert("fanout_rounds".into(), json!(a.rounds));
    if a.via == Via::None {
        r.insert(
            "fanout_skipped".into(),
            json!("--via none: no fan-out measured (registration, memory and heartbeats only)"),
        );
    }
    for (prefix, times, before, after) in fanouts {
        // The hub's own CPU per round: its side of fan-out + gather
        // (relaying N requests and N replies, recording them), apart from
        // this process's cost of signing and answering as the client and
        // the N engines.
        if let (Some((c0, _)), Some((c1, _))) = (before, after)
            && a.rounds > 0
        {
            r.insert(
                format!("hub_cpu_ms_per_{prefix}"),
                json!(1e3 * (c1 - c0) / a.rounds as f64),
            );
        }
        r.insert(
            format!("{prefix}_p50_ms"),
            json!(percentile(&times, 0.5) * 1e3),
        );
        r.insert(
            format!("{prefix}_p90_ms"),
            json!(percentile(&times, 0.9) * 1e3),
        );
        r.insert(
            format!("{prefix}_max_ms"),
            json!(times.last().copied().unwrap_or(f64::NAN) * 1e3),
        );
    }
    if let Some(t) = tasks {
        r.insert("tasks".into(), t);
    }
    // the client first, so that its link ends quietly rather than seeing
    // the hub vanish (and warning that it lost it)
    drop(client);
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(hub);
    Ok(Value::Object(r))
}

/// `n` load-balanced tasks through the task scheduler, `window` in flight;
/// the hub's RSS is sampled ten times along the way. Fails if a reply is
/// missing (a lost task) or a task fails.
async fn load_balanced(
    client: &HubClient,
    n: u64,
    window: usize,
    hub_pid: Option<u32>,
) -> Result<Value> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let content = json!({});
    let md = json!({"after": [], "follow": [], "timeout": null, "targets": [], "retries": 0});
    let before = hub_pid.and_then(proc_usage);
    let t = Instant::now();
    let (mut sent, mut done, mut failed) = (0u64, 0u64, 0u64);
    let mut rss = Vec::new();
    let step = (n / 10).max(1);
    while done < n {
        while sent < n && sent - done < window as u64 {
            client.send_with(
                Chan::Task,
                None,
                "apply_request",
                content.clone(),
                md.clone(),
                &tx,
            )?;
            sent += 1;
        }
        let ev = tokio::time::timeout(Duration::from_secs(60), rx.recv()).await;
        match ev {
            Ok(Some(ClientEvent::Reply(_, m))) => {
                if m.content.get("status").and_then(Value::as_str) != Some("ok") {
                    failed += 1;
                }
                client.forget(m.parent_msg_id().unwrap_or(""));
                done += 1;
                if done % step == 0
                    && let Some((_, b)) = hub_pid.and_then(proc_usage)
                {
                    rss.push(json!([done, b as f64 / (1024.0 * 1024.0)]));
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => bail!("the connection to the hub closed after {done} of {n} tasks"),
            Err(_) => bail!(
                "no task reply within 60 s: {done} of {n} tasks back ({sent} sent) — lost tasks"
            ),
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let after = hub_pid.and_then(proc_usage);
    let mut out = json!({"n": n, "window": window, "seconds": secs, "per_second": n as f64 / secs,
                         "replies": done, "failed": failed, "hub_rss_mib": rss});
    if let (Some((c0, _)), Some((c1, _))) = (before, after) {
        out["hub_cpu_us_per_task"] = json!(1e6 * (c1 - c0) / n as f64);
    }
    if failed > 0 {
        bail!("{failed} of {n} load-balanced tasks failed: {out}");
    }
    Ok(out)
}

fn client_file_beside(engine_file: &Path) -> Result<PathBuf> {
    let name = engine_file
        .file_name()
        .and_then(|n| n.to_str())
        .context("engine connection file name")?;
    let Some(stem) = name.strip_suffix("-engine.json") else {
        bail!("{name}: expected a file named …-engine.json");
    };
    Ok(engine_file.with_file_name(format!("{stem}-client.json")))
}

/// One `execute_request` to every engine (through the MUX: one request per
/// engine; through the broadcast scheduler: one request in all); seconds
/// until every reply is back.
async fn fan_out(client: &HubClient, engines: &[(String, i64)], via: Via) -> Result<f64> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let content = || {
        json!({"code": "a=1", "silent": false, "store_history": true,
               "user_expressions": {}, "allow_stdin": false})
    };
    let t = Instant::now();
    let ids = if via == Via::Broadcast {
        client.broadcast_to(engines, "execute_request", content(), &tx)?
    } else {
        let mut ids = Vec::with_capacity(engines.len());
        for (u, _) in engines {
            ids.push(client.send_to(Chan::Mux, Some(u), "execute_request", content(), &tx)?);
        }
        ids
    };
    let mut got = 0;
    let r = tokio::time::timeout(Duration::from_secs(60), async {
        while got < engines.len() {
            match rx.recv().await {
                Some(ClientEvent::Reply(..)) => got += 1,
                Some(_) => {}
                None => break,
            }
        }
    })
    .await;
    let dt = t.elapsed().as_secs_f64();
    for id in &ids {
        client.forget(id);
    }
    if r.is_err() || got < engines.len() {
        bail!(
            "fan-out ({via:?}): {got} of {} replies within 60 s",
            engines.len()
        );
    }
    Ok(dt)
}

/// `tcp://host:port` of one of the hub's engine-facing ports (a hub bound
/// on all interfaces is reached at its location).
fn engine_url(info: &EngineConnectionInfo, port: u16) -> String {
    let host = info
        .interface
        .strip_prefix("tcp://")
        .unwrap_or(&info.interface);
    let host = if host == "*" || host == "0.0.0.0" {
        info.location.as_str()
    } else {
        host
    };
    format!("tcp://{host}:{port}")
}

/// A fake engine's identity and signing state.
struct Identity {
    uuid: String,
    session: Session,
    auth: Authenticator,
    /// The content of every reply, encoded at the first.
    content: Option<Bytes>,
}

impl Identity {
    fn new(info: &EngineConnectionInfo) -> Identity {
        let uuid = uuid::Uuid::new_v4().to_string();
        let signer = Signer::new(info.key.as_bytes());
        let session = Session::new(
            signer.clone(),
            uuid.clone(),
            "parallax-bench".into(),
            std::process::id(),
        );
        Identity {
            uuid,
            session,
            auth: Authenticator::new(signer),
            content: None,
        }
    }

    /// Register with the real engine's code (retries included) on `reg`;
    /// the id the hub gave.
    async fn register(&mut self, info: &EngineConnectionInfo) -> Result<(DealerSocket, i64)> {
        let total = Duration::from_secs(120);
        let mut reg =
            DealerSocket::with_options(parallax_engine::driver::identity_opts(&self.uuid));
        tokio::time::timeout(total, reg.connect(&engine_url(info, info.registration)))
            .await
            .map_err(|_| anyhow!("timed out connecting to the registration socket"))??;
        let reply = parallax_engine::driver::register(
            &mut reg,
            &mut self.session,
            &mut self.auth,
            &self.uuid,
            None,
            total,
        )
        .await?;
        let id = reply
            .content
            .get("id")
            .and_then(Value::as_i64)
            .context("registration reply without id")?;
        Ok((reg, id))
    }

    /// The heartbeat pong DEALER (routing id = the uuid: the hub knows
    /// hearts by it), connected, its first pong sent.
    async fn pong(&self, info: &EngineConnectionInfo) -> Result<DealerSocket> {
        let mut pong =
            DealerSocket::with_options(parallax_engine::driver::identity_opts(&self.uuid));
        pong.connect(&engine_url(info, info.hb_pong)).await?;
        parallax_engine::driver::first_pong(&mut pong).await;
        Ok(pong)
    }

    /// Answer one shell request with an `ok` reply at once.
    async fn answer(&mut self, shell: &mut RouterSocket, id: i64, m: ZmqMessage, limits: &Limits) {
        let Ok(raw) = RawMessage::from_frames(m.into_vec(), limits) else {
            return;
        };
        let Some(frames) = self.reply(raw, id) else {
            return;
        };
        if let Ok(z) = ZmqMessage::try_from(frames)
            && shell.send(z).await.is_err()
        {
            warn!(engine = id, "shell reply failed");
        }
    }

    /// The signed reply frames, made as cheaply as the protocol allows (the
    /// load generator must cost far less than the hub it measures: on 2
    /// cores the fake engines share the CPU with it). The request is not
    /// decoded: its header frame is the reply's parent as it came, and only
    /// the header's `msg_type` and the metadata's broadcast flags are read;
    /// the content is the same `ok` reply every time, encoded once. `None`
    /// for a request whose header or metadata is not a request's JSON.
    fn reply(&mut self, raw: RawMessage, id: i64) -> Option<Vec<Bytes>> {
        #[derive(serde::Deserialize)]
        struct ReqHeader<'a> {
            #[serde(borrow)]
            msg_type: std::borrow::Cow<'a, str>,
        }
        #[derive(serde::Deserialize, Default)]
        #[serde(default)]
        struct ReqMetadata {
            is_broadcast: bool,
            is_coalescing: bool,
            original_msg_id: String,
            label: Value,
        }
        // what the real engine's init_metadata puts in a reply's metadata
        #[derive(serde::Serialize)]
        struct ReplyMetadata<'a> {
            started: &'a str,
            completed: &'a str,
            dependencies_met: bool,
            engine: &'a str,
            is_broadcast: bool,
            is_coalescing: bool,
            original_msg_id: &'a str,
            label: &'a Value,
            status: &'static str,
        }
        let header: ReqHeader = serde_json::from_slice(&raw.header).ok()?;
        let md: ReqMetadata = serde_json::from_slice(&raw.metadata).ok()?;
        let reply_type = header.msg_type.replace("_request", "_reply");
        let now = format_date(chrono::Utc::now());
        let h = self.session.header(&reply_type, &now);
        let metadata = ReplyMetadata {
            started: &now,
            completed: &now,
            dependencies_met: true,
            engine: &self.uuid,
            is_broadcast: md.is_broadcast,
            is_coalescing: md.is_coalescing,
            original_msg_id: &md.original_msg_id,
            label: &md.label,
            status: "ok",
        };
        let uuid = &self.uuid;
        let content = self
            .content
            .get_or_insert_with(|| {
                let c = json!({"status": "ok", "execution_count": 1, "user_expressions": {},
                               "engine_info": {"engine_uuid": uuid, "engine_id": id}});
                Bytes::from(c.to_string())
            })
            .clone();
        let h = serde_json::to_vec(&h).ok()?;
        let metadata = serde_json::to_vec(&metadata).ok()?;
        Some(self.session.serialize_frames(
            raw.idents,
            Bytes::from(h),
            raw.header,
            Bytes::from(metadata),
            content,
            vec![],
        ))
    }
}

/// One fake engine: registers, echoes heartbeats, answers every shell
/// request with an `ok` reply at once, until `stop`.
async fn fake_engine(
    info: Arc<EngineConnectionInfo>,
    stop: CancellationToken,
    registered: mpsc::UnboundedSender<Result<i64>>,
) {
    let r = fake_engine_inner(&info, &stop, &registered).await;
    if let Err(e) = r {
        let _ = registered.send(Err(e));
    }
}

async fn fake_engine_inner(
    info: &EngineConnectionInfo,
    stop: &CancellationToken,
    registered: &mpsc::UnboundedSender<Result<i64>>,
) -> Result<()> {
    let url = |port: u16| engine_url(info, port);
    let mut me = Identity::new(info);
    // kept open, as a real engine keeps it
    let (_reg, id) = me.register(info).await?;

    let mut ping = SubSocket::new();
    ping.subscribe("").await?;
    ping.connect(&url(info.hb_ping)).await?;
    let mut pong = me.pong(info).await?;
    let mut shell = RouterSocket::with_options(parallax_engine::driver::identity_opts(&me.uuid));
    shell.connect(&url(info.mux)).await?;
    shell.connect(&url(info.task)).await?;
    // the broadcast leaf a real engine connects to (ipengine: id % leaves)
    if !info.broadcast.is_empty() {
        let leaf = info.broadcast[(id.max(0) as usize) % info.broadcast.len()];
        shell.connect(&url(leaf)).await?;
    }
    let _ = registered.send(Ok(id));

    let limits = Limits::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            m = ping.recv() => {
                if let Ok(m) = m && pong.send(m).await.is_err() {
                    debug!(engine = id, "heartbeat reply failed");
                }
            }
            m = shell.recv() => {
                let Ok(m) = m else { continue };
                me.answer(&mut shell, id, m, &limits).await;
            }
        }
    }
}

/// What the lean fake engines share.
struct Lean {
    info: Arc<EngineConnectionInfo>,
    stop: CancellationToken,
    registered: mpsc::UnboundedSender<Result<i64>>,
    /// registration sockets open at once
    slots: Semaphore,
    via: Via,
    /// connect the shell to the task scheduler (--tasks)
    task: bool,
}

/// One lean fake engine: registers on a registration socket of its own
/// that it closes after the reply (at most `slots` open at once), hands its
/// pong socket to its ping group, and answers shell requests on a shell
/// connected only to what is measured (none with `--via none`).
async fn lean_engine(lean: Arc<Lean>, pongs: mpsc::UnboundedSender<DealerSocket>) {
    if let Err(e) = lean_engine_inner(&lean, pongs).await {
        let _ = lean.registered.send(Err(e));
    }
}

async fn lean_engine_inner(lean: &Lean, pongs: mpsc::UnboundedSender<DealerSocket>) -> Result<()> {
    let info = &*lean.info;
    let url = |port: u16| engine_url(info, port);
    let mut me = Identity::new(info);
    let id = {
        let _slot = lean.slots.acquire().await?;
        let (reg, id) = me.register(info).await?;
        drop(reg);
        id
    };
    let pong = me.pong(info).await?;
    pongs
        .send(pong)
        .map_err(|_| anyhow!("the heartbeat group stopped"))?;
    let mut shell = RouterSocket::with_options(parallax_engine::driver::identity_opts(&me.uuid));
    let mut connected = false;
    if matches!(lean.via, Via::Mux | Via::Both) {
        shell.connect(&url(info.mux)).await?;
        connected = true;
    }
    if matches!(lean.via, Via::Broadcast | Via::Both) && !info.broadcast.is_empty() {
        // the broadcast leaf a real engine connects to (ipengine: id % leaves)
        let leaf = info.broadcast[(id.max(0) as usize) % info.broadcast.len()];
        shell.connect(&url(leaf)).await?;
        connected = true;
    }
    if lean.task {
        shell.connect(&url(info.task)).await?;
        connected = true;
    }
    let _ = lean.registered.send(Ok(id));
    if !connected {
        return Ok(());
    }
    let limits = Limits::default();
    loop {
        tokio::select! {
            _ = lean.stop.cancelled() => return Ok(()),
            m = shell.recv() => {
                let Ok(m) = m else { continue };
                me.answer(&mut shell, id, m, &limits).await;
            }
        }
    }
}

/// A group of lean fake engines' heartbeats: each ping that arrives on the
/// group's one SUB socket is echoed on every member's own pong socket.
async fn ping_group(
    mut ping: SubSocket,
    mut joins: mpsc::UnboundedReceiver<DealerSocket>,
    stop: CancellationToken,
) {
    let mut pongs: Vec<DealerSocket> = Vec::new();
    let mut open = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            p = joins.recv(), if open => match p {
                Some(p) => pongs.push(p),
                None => open = false,
            },
            m = ping.recv() => {
                let Ok(m) = m else { continue };
                for p in &mut pongs {
                    if p.send(m.clone()).await.is_err() {
                        debug!("heartbeat reply failed");
                    }
                }
            }
        }
    }
}

/// Open files of a process (/proc/<pid>/fd).
fn open_files(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

fn print_report(r: &Value) {
    let f = |k: &str| r.get(k).and_then(Value::as_f64);
    let n = r["engines"].as_u64().unwrap_or(0);
    println!(
        "parallax bench engines: {n} fake engines, {} sockets (via {}; the hub pings {} subscriber{})",
        r["sockets"].as_str().unwrap_or("?"),
        r["via"].as_str().unwrap_or("?"),
        r["ping_subscribers"],
        if r["ping_subscribers"].as_u64() == Some(1) {
            ""
        } else {
            "s"
        }
    );
    if let Some(k) = r.get("registration_sockets_at_once") {
        println!("  registration sockets open at once: {k} (each closed after its reply)");
    }
    if let (Some(h), Some(l)) = (r.get("hub_open_files"), r.get("loadgen_open_files")) {
        println!("  open files after registration: hub {h}, this process {l}");
    }
    if let (Some(a), Some(b)) = (f("registration_replies_s"), f("all_registered_s")) {
        println!("  registration storm: all replies {a:.3} s, all registered {b:.3} s");
    }
    if let Some(k) = f("hub_kib_per_engine") {
        println!(
            "  hub memory: {:.1} MiB idle, {:.1} MiB with {n} engines ({k:.1} KiB per engine)",
            f("hub_rss_idle_mib").unwrap_or(0.0),
            f("hub_rss_registered_mib").unwrap_or(0.0)
        );
    }
    if let Some(c) = f("hub_heartbeat_cpu_percent") {
        println!(
            "  hub CPU while heartbeating ({} ms period): {c:.1} % of one core",
            r["heartbeat_period_ms"]
        );
    }
    println!(
        "  registered after the idle period: {}",
        r["registered_after_idle"]
    );
    if let Some(why) = r.get("fanout_skipped").and_then(Value::as_str) {
        println!("  fan-out: skipped ({why})");
    }
    if f("fanout_p50_ms").is_some() {
        println!(
            "  fan-out + gather through the MUX ({} rounds): p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms",
            r["fanout_rounds"],
            f("fanout_p50_ms").unwrap_or(f64::NAN),
            f("fanout_p90_ms").unwrap_or(f64::NAN),
            f("fanout_max_ms").unwrap_or(f64::NAN)
        );
    }
    if let Some(c) = f("hub_cpu_ms_per_fanout") {
        println!("  hub CPU per fan-out + gather: {c:.1} ms");
    }
    if let Some(t) = r.get("tasks") {
        let g = |k: &str| t.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
        println!(
            "  load-balanced tasks: {} in {:.1} s ({:.0}/s, window {}), {} replies, {} failed; hub CPU {:.1} µs/task",
            t["n"],
            g("seconds"),
            g("per_second"),
            t["window"],
            t["replies"],
            t["failed"],
            g("hub_cpu_us_per_task")
        );
        if let Some(a) = t.get("hub_rss_mib").and_then(Value::as_array) {
            let pts: Vec<String> = a
                .iter()
                .map(|p| format!("{}: {:.1} MiB", p[0], p[1].as_f64().unwrap_or(f64::NAN)))
                .collect();
            println!("  hub RSS along the way: {}", pts.join(", "));
        }
    }
    if f("bcast_p50_ms").is_some() {
        println!(
            "  fan-out + gather through the broadcast scheduler ({} rounds): p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms",
            r["fanout_rounds"],
            f("bcast_p50_ms").unwrap_or(f64::NAN),
            f("bcast_p90_ms").unwrap_or(f64::NAN),
            f("bcast_max_ms").unwrap_or(f64::NAN)
        );
    }
    if let Some(c) = f("hub_cpu_ms_per_bcast") {
        println!("  hub CPU per broadcast + gather: {c:.1} ms");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: EnginesArgs,
    }

    fn args(argv: &[&str]) -> EnginesArgs {
        Cli::parse_from(std::iter::once("engines").chain(argv.iter().copied())).a
    }

    #[test]
    fn lean_connections_follow_via_and_tasks() {
        let per = |argv: &[&str]| 1 + Plan::lean_shell(&args(argv));
        assert_eq!(per(&["--sockets", "lean", "--via", "none"]), 1);
        assert_eq!(per(&["--sockets", "lean", "--via", "mux"]), 2);
        assert_eq!(per(&["--sockets", "lean", "--via", "broadcast"]), 2);
        assert_eq!(per(&["--sockets", "lean", "--via", "both"]), 3);
        assert_eq!(
            per(&["--sockets", "lean", "--via", "mux", "--tasks", "5"]),
            3
        );
    }

    #[test]
    fn open_files_needed_and_the_largest_n_that_fits() {
        let full = Plan {
            sockets: Sockets::Full,
            per_engine: 6,
            ping_group: PING_GROUP,
            register_at_once: 1,
        };
        assert_eq!(full.need(3000, 0), 6 * 3000 + FD_SLACK);
        assert_eq!(full.largest(20_000, None), 3162);
        let lean = Plan {
            sockets: Sockets::Lean,
            per_engine: 1,
            ..full
        };
        // pongs + 20 ping SUBs + registration sockets + slack
        assert_eq!(lean.need(10_000, 100), 10_000 + 20 + 100 + FD_SLACK);
        assert_eq!(lean.need(10, 100), 10 + 1 + 10 + FD_SLACK);
        let n = lean.largest(20_000, None);
        assert!(lean.need(n, MIN_REGISTER_AT_ONCE) <= 20_000);
        assert!(lean.need(n + 1, MIN_REGISTER_AT_ONCE) > 20_000);
        let mux = Plan {
            per_engine: 2,
            ..lean
        };
        assert_eq!(mux.largest(20_000, None), 9446);
        assert!(mux.largest(20_000, Some(2000)) < 9446);
    }

    #[test]
    fn bad_lean_options_are_refused_before_anything_starts() {
        let e = |argv: &[&str]| plan(&args(argv)).unwrap_err().to_string();
        assert!(
            e(&["--sockets", "lean", "--via", "none", "--tasks", "5"]).contains("--tasks needs")
        );
        assert!(e(&["--ping-group", "3"]).contains("only with --sockets lean"));
        assert!(e(&["--register-at-once", "3"]).contains("only with --sockets lean"));
        assert!(e(&["--sockets", "lean", "--register-at-once", "0"]).contains("at least 1"));
        assert!(e(&["-n", "0"]).contains("-n must be at least 1"));
    }
}
