//! Grid Engine (SGE, Son of Grid Engine, Univa/Altair GE): `qsub` /
//! `qdel` / `qsig -s` (ipyparallel's; SGE itself has no general signal
//! command), state from the `qstat` table. Engines run as a job array
//! (`#$ -t 1-N`), one engine per task.

use crate::JobState;
use crate::batch::{BatchSystem, Directive, DirectiveSpec};

pub static SYSTEM: BatchSystem = BatchSystem {
    kind: crate::LauncherKind::Sge,
    prefix: "#$",
    submit: &["qsub"],
    submit_args: &[],
    submit_via_stdin: false,
    delete: &["qdel"],
    signal: &["qsig", "-s"],
    script_name: "sge_engines",
    engine_template: "#!/bin/sh
#$ -V
#$ -S /bin/sh
#$ -N parallax-engines
{program_and_args}",
    directive,
    parse_job_id,
    state_commands,
    parse_state,
    gone_state,
};

fn directive(d: Directive) -> Option<DirectiveSpec> {
    let (line, flags): (&'static str, &'static [&'static str]) = match d {
        Directive::Tasks => ("#$ -t 1-{n}", &["-t"]),
        Directive::Queue => ("#$ -q {queue}", &["-q"]),
        Directive::Account => ("#$ -A {account}", &["-A"]),
        Directive::Qos => return None,
        Directive::Time => ("#$ -l h_rt={timelimit}", &["-l h_rt"]),
        Directive::Output => ("#$ -j y\n#$ -o {output_file}", &["-o"]),
    };
    Some(DirectiveSpec {
        line,
        flags,
        at_end: false,
    })
}

/// `Your job 5 ("x") has been submitted`, `Your job-array 6.1-4:1 ("x")
/// has been submitted`, or `-terse`'s `5` / `6.1-4:1`.
pub fn parse_job_id(out: &str) -> Option<String> {
    for line in out.lines() {
        let line = line.trim();
        let token = line
            .strip_prefix("Your job-array ")
            .or_else(|| line.strip_prefix("Your job "))
            .map(|rest| rest.split_whitespace().next().unwrap_or(""))
            .unwrap_or(line);
        let id = token.split('.').next().unwrap_or("");
        if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) {
            return Some(id.to_owned());
        }
    }
    None
}

fn state_commands(_job_id: &str) -> Vec<Vec<String>> {
    vec![vec!["qstat".into()]]
}

/// The `qstat` table: the state column of the job's rows (`qw`, `hqw`,
/// `r`, `t`, `Eqw`, `dr`, …; one row per running array task).
pub fn parse_state(job_id: &str, out: &str) -> Option<JobState> {
    let mut states = Vec::new();
    for line in out.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 5 || cols[0] != job_id {
            continue;
        }
        let state = cols[4].to_owned();
        states.push(if state.contains('E') {
            JobState::Failed {
                state,
                reason: "error state (qstat -explain E)".into(),
            }
        } else if state.contains('h') {
            JobState::Pending {
                state,
                reason: "hold".into(),
            }
        } else if state.contains("qw") {
            JobState::Pending {
                state,
                reason: String::new(),
            }
        } else {
            JobState::Running { state }
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

    #[test]
    fn job_ids() {
        assert_eq!(
            parse_job_id("Your job 5 (\"parallax-engines\") has been submitted\n").as_deref(),
            Some("5")
        );
        assert_eq!(
            parse_job_id("Your job-array 6.1-4:1 (\"parallax-engines\") has been submitted\n")
                .as_deref(),
            Some("6")
        );
        assert_eq!(parse_job_id("7\n").as_deref(), Some("7"));
        assert_eq!(parse_job_id("8.1-6:1\n").as_deref(), Some("8"));
        assert_eq!(
            parse_job_id("Unable to run job: denied: host \"x\" is no submit host.\n"),
            None
        );
    }

    #[test]
    fn states() {
        let table = "\
job-ID  prior   name       user         state submit/start at     queue                          slots ja-task-ID 
-----------------------------------------------------------------------------------------------------------------
      5 0.55500 parallax-e root         r     12/04/2026 17:30:00 all.q@host1                        1 1
      5 0.55500 parallax-e root         qw    12/04/2026 17:30:00                                    1 2-4:1
      6 0.00000 parallax-e root         qw    12/04/2026 17:30:01                                    1        
      7 0.00000 parallax-e root         Eqw   12/04/2026 17:30:02                                    1        
      8 0.00000 parallax-e root         hqw   12/04/2026 17:30:02                                    1        
";
        let p = |id: &str| parse_state(id, table).map(|j| (j.is_active(), j.describe()));
        assert_eq!(p("5"), Some((true, "r".into())));
        assert_eq!(p("6"), Some((true, "qw".into())));
        assert_eq!(
            p("7"),
            Some((false, "Eqw (error state (qstat -explain E))".into()))
        );
        assert_eq!(p("8"), Some((true, "hqw (hold)".into())));
        assert_eq!(p("9"), None);
        assert_eq!(parse_state("5", ""), None);
    }
}
