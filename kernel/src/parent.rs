//! Whether the process that started the kernel is still there (ipykernel's
//! `ParentPollerUnix`, plus `JPY_PARENT_PID`).
//!
//! A frontend that dies without a shutdown_request (SIGKILL, a closed
//! terminal: `tmux kill-session` SIGHUPs jupyter console) leaves the kernel
//! in a session of its own (jupyter_client starts kernels with
//! `start_new_session`), so no signal reaches it: the kernel has to notice.
//! The parent is gone when
//!
//! * the kernel was re-parented (`getppid()` changed: to init or to a
//!   subreaper);
//! * the parent is a zombie (dead, but its own parent has not reaped it yet,
//!   so `getppid()` has not changed);
//! * the process named by `JPY_PARENT_PID` (jupyter_client sets it to the
//!   process that launched the kernel, which may not be the direct parent:
//!   a wrapper script, `conda run`) is gone, a zombie, or a new process with
//!   the same pid (its start time differs).
//!
//! Not `PR_SET_PDEATHSIG` on the kernel itself: it fires when the *thread*
//! that forked the kernel ends, and frontends launch kernels from worker
//! threads that end while the process lives on.

use std::fs;

/// A process identified by pid and start time (pids are reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proc {
    pub pid: u32,
    start: Option<u64>,
}

impl Proc {
    pub fn new(pid: u32) -> Proc {
        Proc {
            pid,
            start: stat(pid).map(|s| s.start),
        }
    }

    /// Why this process is gone, or None while it lives.
    pub fn gone(&self) -> Option<&'static str> {
        match stat(self.pid) {
            None => Some("it exited"),
            Some(s) if s.state == 'Z' || s.state == 'X' => Some("it exited (a zombie)"),
            Some(s) if self.start.is_some_and(|t| t != s.start) => {
                Some("it exited (its pid now belongs to another process)")
            }
            Some(_) => None,
        }
    }
}

/// What the kernel watches.
#[derive(Debug, Clone)]
pub struct ParentWatch {
    /// The direct parent at start.
    pub parent: Proc,
    /// `JPY_PARENT_PID`, if set and a process other than the direct parent.
    pub launcher: Option<Proc>,
}

impl ParentWatch {
    /// None when there is nothing to watch: the kernel was started by init
    /// (as a daemon, deliberately detached).
    pub fn from_env() -> Option<ParentWatch> {
        let ppid = std::os::unix::process::parent_id();
        let launcher = std::env::var("JPY_PARENT_PID")
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .filter(|&p| p > 1 && p != ppid && p != std::process::id())
            .map(Proc::new)
            // a stale value inherited from an older frontend is not a parent
            .filter(|p| p.gone().is_none());
        (ppid > 1).then(|| ParentWatch {
            parent: Proc::new(ppid),
            launcher,
        })
    }

    /// Why the kernel's frontend is gone, or None while it is there.
    pub fn check(&self) -> Option<String> {
        let now = std::os::unix::process::parent_id();
        if now != self.parent.pid {
            return Some(format!(
                "the kernel's parent (pid {}) exited: re-parented to pid {now}",
                self.parent.pid
            ));
        }
        if let Some(why) = self.parent.gone() {
            return Some(format!(
                "the kernel's parent (pid {}): {why}",
                self.parent.pid
            ));
        }
        if let Some(l) = &self.launcher
            && let Some(why) = l.gone()
        {
            return Some(format!("JPY_PARENT_PID {}: {why}", l.pid));
        }
        None
    }
}

struct Stat {
    state: char,
    /// Clock ticks since boot at which the process started.
    start: u64,
}

/// `/proc/<pid>/stat`'s state and start time.
fn stat(pid: u32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<Stat> {
    // `pid (comm) state ppid …`: comm may hold spaces and parentheses, so
    // the fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // after comm: state is field 3 of the line, starttime field 22
    Some(Stat {
        state: fields.first()?.chars().next()?,
        start: fields.get(19)?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_line() {
        let s = parse_stat(
            "4242 (a (weird) name) Z 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 0 0",
        )
        .unwrap();
        assert_eq!((s.state, s.start), ('Z', 987654));
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn a_child_that_exits_is_gone_before_and_after_it_is_reaped() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let p = Proc::new(child.id());
        assert!(p.start.is_some());
        assert_eq!(p.gone(), None);
        child.kill().unwrap();
        // not reaped yet: a zombie
        let t0 = std::time::Instant::now();
        while p.gone().is_none() && t0.elapsed().as_secs() < 10 {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(p.gone(), Some("it exited (a zombie)"));
        child.wait().unwrap();
        assert_eq!(p.gone(), Some("it exited"));
    }

    #[test]
    fn this_process_is_watched_through_its_parent() {
        let w = ParentWatch::from_env().expect("the test runner is not init");
        assert_eq!(w.check(), None);
    }
}
