//! PBS (Torque/OpenPBS, and Slurm's PBS wrappers): `qsub` / `qdel` /
//! `qsig -s`, state from `qstat -f`. Engines run as a job array
//! (`#PBS -t 1-N`), one engine per array task, as ipyparallel does.

use crate::JobState;
use crate::batch::{BatchSystem, Directive, DirectiveSpec};

pub static SYSTEM: BatchSystem = BatchSystem {
    kind: crate::LauncherKind::Pbs,
    prefix: "#PBS",
    submit: &["qsub"],
    submit_args: &["-j", "oe", "-o", "{output_file}"],
    submit_via_stdin: false,
    delete: &["qdel"],
    signal: &["qsig", "-s"],
    script_name: "pbs_engines",
    engine_template: "#!/bin/sh
#PBS -V
#PBS -N parallax-engines
{program_and_args}",
    directive,
    parse_job_id,
    state_commands,
    parse_state,
    gone_state,
};

fn directive(d: Directive) -> Option<DirectiveSpec> {
    let (line, flags): (&'static str, &'static [&'static str]) = match d {
        Directive::Tasks => ("#PBS -t 1-{n}", &["-t", "-J"]),
        Directive::Queue => ("#PBS -q {queue}", &["-q"]),
        Directive::Account => ("#PBS -A {account}", &["-A"]),
        Directive::Qos => return None,
        Directive::Time => ("#PBS -l walltime={timelimit}", &["-l walltime"]),
        Directive::Output => ("#PBS -j oe\n#PBS -o {output_file}", &["-o"]),
    };
    Some(DirectiveSpec {
        line,
        flags,
        at_end: false,
    })
}

/// qsub prints the full job id (`12.server`, arrays `12[].server`); qdel
/// and qstat want it whole.
pub fn parse_job_id(out: &str) -> Option<String> {
    let id = out.lines().map(str::trim).find(|l| !l.is_empty())?;
    (id.starts_with(|c: char| c.is_ascii_digit()) && !id.contains(' ')).then(|| id.to_owned())
}

fn state_commands(job_id: &str) -> Vec<Vec<String>> {
    vec![vec!["qstat".into(), "-f".into(), job_id.into()]]
}

/// `qstat -f`'s `job_state = R` lines (one per array task with `-t`).
pub fn parse_state(_job_id: &str, out: &str) -> Option<JobState> {
    let mut states = Vec::new();
    let mut exit_status: Option<String> = None;
    for line in out.lines() {
        let line = line.trim();
        if let Some(v) = line.strip_prefix("exit_status = ") {
            exit_status = Some(v.trim().to_owned());
        }
        let Some(code) = line.strip_prefix("job_state = ") else {
            continue;
        };
        let state = code.trim().to_owned();
        states.push(match state.as_str() {
            "Q" | "W" | "T" | "S" | "B" => JobState::Pending {
                state,
                reason: String::new(),
            },
            "H" => JobState::Pending {
                state,
                reason: "held".into(),
            },
            "R" | "E" => JobState::Running { state },
            "C" | "F" | "X" => JobState::Done { state },
            _ => JobState::Failed {
                state,
                reason: "unknown PBS state".into(),
            },
        });
    }
    let mut s = crate::batch::aggregate(states)?;
    if let (JobState::Done { state }, Some(code)) = (&s, &exit_status)
        && code != "0"
    {
        s = JobState::Failed {
            state: state.clone(),
            reason: format!("exit_status={code}"),
        };
    }
    Some(s)
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
            parse_job_id("12.pbs-server\n").as_deref(),
            Some("12.pbs-server")
        );
        assert_eq!(
            parse_job_id("1234[].head\n").as_deref(),
            Some("1234[].head")
        );
        assert_eq!(parse_job_id("42\n").as_deref(), Some("42"));
        assert_eq!(parse_job_id("qsub: Unknown queue\n"), None);
    }

    #[test]
    fn states() {
        let p = |s: &str| parse_state("12.server", s).map(|j| (j.is_active(), j.describe()));
        let queued = "Job Id: 12.server\n    Job_Name = parallax-engines\n    job_state = Q\n    queue = batch\n";
        assert_eq!(p(queued), Some((true, "Q".into())));
        assert_eq!(
            p("Job Id: 12.server\n    job_state = R\n"),
            Some((true, "R".into()))
        );
        assert_eq!(p("    job_state = H\n"), Some((true, "H (held)".into())));
        assert_eq!(
            p("    job_state = C\n    exit_status = 0\n"),
            Some((false, "C".into()))
        );
        assert_eq!(
            p("    job_state = C\n    exit_status = 271\n"),
            Some((false, "C (exit_status=271)".into()))
        );
        assert_eq!(p("qstat: Unknown Job Id 12.server\n"), None);
    }

    #[test]
    fn script() {
        let job = BatchJob {
            system: &SYSTEM,
            options: BatchOptions {
                queue: "batch".into(),
                timelimit: "01:00:00".into(),
                ..Default::default()
            },
            n: 3,
            profile_dir: "/p".into(),
            cluster_id: "".into(),
            output_file: "/p/log/e.log".into(),
            program: vec!["parallax".into(), "engine".into()],
            program_args: vec!["--file=/p/security/ipcontroller-engine.json".into()],
        };
        expect![[r#"
            #!/bin/sh
            #PBS -t 1-3
            #PBS -q batch
            #PBS -l walltime=01:00:00
            #PBS -j oe
            #PBS -o /p/log/e.log
            #PBS -V
            #PBS -N parallax-engines
            parallax engine --file=/p/security/ipcontroller-engine.json
        "#]]
        .assert_eq(&job.script().unwrap());
        assert_eq!(
            job.submit_argv("/p/pbs_engines"),
            ["qsub", "-j", "oe", "-o", "/p/log/e.log", "/p/pbs_engines"]
        );
        assert_eq!(SYSTEM.delete_argv("12.server"), ["qdel", "12.server"]);
        assert_eq!(
            SYSTEM.signal_argv("SIGINT", "12.server"),
            ["qsig", "-s", "SIGINT", "12.server"]
        );
    }
}
