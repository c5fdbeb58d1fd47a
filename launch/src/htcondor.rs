//! HTCondor: a submit description (not a shell script) with `queue N` at
//! the end; `condor_submit` / `condor_rm`; state from `condor_q -af`, then
//! `condor_history -af`. HTCondor has no command to signal a job: signal
//! is refused. Untested against a live HTCondor: the formats are its
//! documented ones.

use crate::JobState;
use crate::batch::{BatchSystem, Directive, DirectiveSpec};

pub static SYSTEM: BatchSystem = BatchSystem {
    kind: crate::LauncherKind::HtCondor,
    prefix: "",
    submit: &["condor_submit"],
    submit_args: &[],
    submit_via_stdin: false,
    delete: &["condor_rm"],
    signal: &[],
    script_name: "htcondor_engines",
    // {executable} is the program's first word, {arguments} the rest, in
    // HTCondor's quoting (single quotes group, as shlex writes them)
    engine_template: "universe = vanilla
executable = {executable}
arguments = \"{arguments}\"
# by default we expect a shared file system
transfer_executable = False
getenv = True",
    directive,
    parse_job_id,
    state_commands,
    parse_state,
    gone_state,
};

fn directive(d: Directive) -> Option<DirectiveSpec> {
    let (line, flags, at_end): (&'static str, &'static [&'static str], bool) = match d {
        Directive::Tasks => ("queue {n}", &["queue"], true),
        Directive::Account => ("accounting_group = {account}", &["accounting_group"], false),
        Directive::Output => (
            "output = {output_file}.$(Process)\nerror = {output_file}.$(Process)",
            &["output"],
            false,
        ),
        Directive::Queue | Directive::Qos | Directive::Time => return None,
    };
    Some(DirectiveSpec {
        line,
        flags,
        at_end,
    })
}

/// `1 job(s) submitted to cluster 42.`
pub fn parse_job_id(out: &str) -> Option<String> {
    let rest = &out[out.find("submitted to cluster ")? + "submitted to cluster ".len()..];
    let id: String = rest.chars().take_while(char::is_ascii_digit).collect();
    (!id.is_empty()).then_some(id)
}

fn state_commands(job_id: &str) -> Vec<Vec<String>> {
    let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        v(&["condor_q", job_id, "-af", "JobStatus", "HoldReason"]),
        v(&["condor_history", job_id, "-af", "JobStatus", "HoldReason"]),
    ]
}

/// `-af JobStatus HoldReason` lines, one per process: 1 Idle, 2 Running,
/// 3 Removed, 4 Completed, 5 Held (failed, with the hold reason: engines
/// held never start by themselves), 6 Transferring Output, 7 Suspended.
pub fn parse_state(_job_id: &str, out: &str) -> Option<JobState> {
    let mut states = Vec::new();
    for line in out.lines() {
        let line = line.trim();
        let (code, reason) = line.split_once(' ').unwrap_or((line, ""));
        let reason = if reason == "undefined" { "" } else { reason }.to_owned();
        let named = |s: &str| s.to_owned();
        states.push(match code {
            "1" => JobState::Pending {
                state: named("Idle"),
                reason,
            },
            "7" => JobState::Pending {
                state: named("Suspended"),
                reason,
            },
            "2" | "6" => JobState::Running {
                state: named("Running"),
            },
            "4" => JobState::Done {
                state: named("Completed"),
            },
            "3" => JobState::Failed {
                state: named("Removed"),
                reason,
            },
            "5" => JobState::Failed {
                state: named("Held"),
                reason,
            },
            _ => continue,
        });
    }
    crate::batch::aggregate(states)
}

fn gone_state() -> JobState {
    JobState::Done {
        state: "GONE".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{BatchJob, BatchOptions};
    use expect_test::expect;

    #[test]
    fn job_ids() {
        assert_eq!(
            parse_job_id("Submitting job(s)....\n4 job(s) submitted to cluster 42.\n").as_deref(),
            Some("42")
        );
        assert_eq!(parse_job_id("ERROR: Failed to parse command file\n"), None);
    }

    #[test]
    fn states() {
        let p = |s: &str| parse_state("42", s).map(|j| (j.is_active(), j.describe()));
        assert_eq!(p("1 undefined\n1 undefined\n"), Some((true, "Idle".into())));
        assert_eq!(
            p("2 undefined\n1 undefined\n"),
            Some((true, "Running".into()))
        );
        assert_eq!(
            p("5 Error from slot1@node3: Failed to execute '/opt/parallax'\n2 undefined\n"),
            Some((
                false,
                "Held (Error from slot1@node3: Failed to execute '/opt/parallax')".into()
            ))
        );
        assert_eq!(p("4 undefined\n"), Some((false, "Completed".into())));
        assert_eq!(p(""), None);
    }

    #[test]
    fn submit_file() {
        let job = BatchJob {
            system: &SYSTEM,
            options: BatchOptions::default(),
            n: 4,
            profile_dir: "/p".into(),
            cluster_id: "".into(),
            output_file: "/p/log/e.log".into(),
            program: vec!["/opt/parallax".into(), "engine".into()],
            program_args: vec!["--file=/p/security/ipcontroller-engine.json".into()],
        };
        expect![[r#"
            output = /p/log/e.log.$(Process)
            error = /p/log/e.log.$(Process)
            universe = vanilla
            executable = /opt/parallax
            arguments = "engine --file=/p/security/ipcontroller-engine.json"
            # by default we expect a shared file system
            transfer_executable = False
            getenv = True
            queue 4
        "#]]
        .assert_eq(&job.script().unwrap());
        assert_eq!(SYSTEM.delete_argv("42"), ["condor_rm", "42"]);
    }
}
