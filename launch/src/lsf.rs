//! LSF: `bsub < script` (LSF reads `#BSUB` lines only from stdin), `bkill`,
//! `bkill -s`, state from `bjobs -w`. Engines run as a job array
//! (`#BSUB -J parallax-engines[1-N]`). Untested against a live LSF: the
//! formats are LSF's documented ones.

use crate::JobState;
use crate::batch::{BatchSystem, Directive, DirectiveSpec};

pub static SYSTEM: BatchSystem = BatchSystem {
    kind: crate::LauncherKind::Lsf,
    prefix: "#BSUB",
    submit: &["bsub"],
    submit_args: &[],
    submit_via_stdin: true,
    delete: &["bkill"],
    signal: &["bkill", "-s"],
    script_name: "lsf_engines",
    engine_template: "#!/bin/sh
#BSUB -env all
{program_and_args}",
    directive,
    parse_job_id,
    state_commands,
    parse_state,
    gone_state,
};

fn directive(d: Directive) -> Option<DirectiveSpec> {
    let (line, flags): (&'static str, &'static [&'static str]) = match d {
        Directive::Tasks => ("#BSUB -J parallax-engines[1-{n}]", &["-J"]),
        Directive::Queue => ("#BSUB -q {queue}", &["-q"]),
        Directive::Account => ("#BSUB -P {account}", &["-P"]),
        Directive::Qos => return None,
        Directive::Time => ("#BSUB -W {timelimit}", &["-W"]),
        Directive::Output => (
            "#BSUB -o {output_file}\n#BSUB -e {output_file}",
            &["-o", "-oo"],
        ),
    };
    Some(DirectiveSpec {
        line,
        flags,
        at_end: false,
    })
}

/// `Job <123> is submitted to queue <normal>.`
pub fn parse_job_id(out: &str) -> Option<String> {
    let rest = &out[out.find("Job <")? + 5..];
    let id = &rest[..rest.find('>')?];
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())).then(|| id.to_owned())
}

fn state_commands(job_id: &str) -> Vec<Vec<String>> {
    vec![vec!["bjobs".into(), "-w".into(), job_id.into()]]
}

/// The `bjobs -w` table's STAT column for the job (one row per array
/// element): PEND, PSUSP, USUSP, SSUSP, RUN, DONE, EXIT, ZOMBI, UNKWN.
/// `Job <123> is not found` is `None`.
pub fn parse_state(job_id: &str, out: &str) -> Option<JobState> {
    let mut states = Vec::new();
    for line in out.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 3 || cols[0] != job_id {
            continue;
        }
        let state = cols[2].to_owned();
        states.push(match state.as_str() {
            "PEND" => JobState::Pending {
                state,
                reason: String::new(),
            },
            "PSUSP" | "USUSP" | "SSUSP" => JobState::Pending {
                state,
                reason: "suspended".into(),
            },
            "RUN" | "PROV" => JobState::Running { state },
            "DONE" => JobState::Done { state },
            _ => JobState::Failed {
                state,
                reason: String::new(),
            },
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
            parse_job_id("Job <123> is submitted to queue <normal>.\n").as_deref(),
            Some("123")
        );
        assert_eq!(
            parse_job_id("Job <9> is submitted to default queue <short>.\n").as_deref(),
            Some("9")
        );
        assert_eq!(parse_job_id("Bad queue name. Job not submitted.\n"), None);
    }

    #[test]
    fn states() {
        let table = "\
JOBID   USER    STAT  QUEUE      FROM_HOST   EXEC_HOST   JOB_NAME   SUBMIT_TIME
123     alice   RUN   normal     login1      node7       parallax-engines[1] Oct 22 10:00
123     alice   PEND  normal     login1                  parallax-engines[2] Oct 22 10:00
124     alice   PEND  normal     login1                  parallax-engines[1] Oct 22 10:01
125     alice   EXIT  normal     login1      node3       parallax-engines[1] Oct 22 10:02
126     alice   DONE  normal     login1      node3       parallax-engines[1] Oct 22 10:02
";
        let p = |id: &str| parse_state(id, table).map(|j| (j.is_active(), j.describe()));
        assert_eq!(p("123"), Some((true, "RUN".into())));
        assert_eq!(p("124"), Some((true, "PEND".into())));
        assert_eq!(p("125"), Some((false, "EXIT".into())));
        assert_eq!(p("126"), Some((false, "DONE".into())));
        assert_eq!(parse_state("127", "Job <127> is not found\n"), None);
    }

    #[test]
    fn script_goes_on_stdin() {
        let job = BatchJob {
            system: &SYSTEM,
            options: BatchOptions {
                queue: "normal".into(),
                ..Default::default()
            },
            n: 2,
            profile_dir: "/p".into(),
            cluster_id: "".into(),
            output_file: "/p/log/e.log".into(),
            program: vec!["parallax".into(), "engine".into()],
            program_args: vec![],
        };
        assert_eq!(job.submit_argv("/p/lsf_engines"), ["bsub"]);
        expect![[r#"
            #!/bin/sh
            #BSUB -J parallax-engines[1-2]
            #BSUB -q normal
            #BSUB -o /p/log/e.log
            #BSUB -e /p/log/e.log
            #BSUB -env all
            parallax engine
        "#]]
        .assert_eq(&job.script().unwrap());
    }
}
