//! Slurm: `sbatch` / `scancel` / `scancel -s`, state from `squeue`, then
//! `scontrol show job` (jobs that left the queue within `MinJobAge`), then
//! `sacct` (with accounting).

use crate::JobState;
use crate::batch::{BatchSystem, Directive, DirectiveSpec};

pub static SYSTEM: BatchSystem = BatchSystem {
    kind: crate::LauncherKind::Slurm,
    prefix: "#SBATCH",
    submit: &["sbatch"],
    submit_args: &[],
    submit_via_stdin: false,
    delete: &["scancel"],
    signal: &["scancel", "-s"],
    script_name: "slurm_engine.sbatch",
    // srun starts the engines as the job's tasks: each asks for the id of
    // its SLURM_PROCID
    engine_template: "#!/bin/sh
#SBATCH --export=ALL
#SBATCH --job-name=parallax-engines-{cluster_id}
srun {program_and_args}",
    directive,
    parse_job_id,
    state_commands,
    parse_state,
    gone_state,
};

fn directive(d: Directive) -> Option<DirectiveSpec> {
    let (line, flags): (&'static str, &'static [&'static str]) = match d {
        Directive::Tasks => ("#SBATCH --ntasks={n}", &["--ntasks", "-n"]),
        Directive::Queue => ("#SBATCH --partition={queue}", &["--partition", "-p"]),
        Directive::Account => ("#SBATCH --account={account}", &["--account", "-A"]),
        Directive::Qos => ("#SBATCH --qos={qos}", &["--qos", "-q"]),
        Directive::Time => ("#SBATCH --time={timelimit}", &["--time", "-t"]),
        Directive::Output => ("#SBATCH --output={output_file}", &["--output", "-o"]),
    };
    Some(DirectiveSpec {
        line,
        flags,
        at_end: false,
    })
}

/// `Submitted batch job 12`, `Submitted batch job 12 on cluster c`,
/// `--parsable`'s `12` or `12;c`.
pub fn parse_job_id(out: &str) -> Option<String> {
    for line in out.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("Submitted batch job ") {
            return rest.split_whitespace().next().map(str::to_owned);
        }
        let id = line.split(';').next().unwrap_or("");
        if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) {
            return Some(id.to_owned());
        }
    }
    None
}

fn state_commands(job_id: &str) -> Vec<Vec<String>> {
    let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        v(&["squeue", "-h", "-j", job_id, "-o", "%T|%r"]),
        v(&["scontrol", "show", "job", "-o", job_id]),
        v(&[
            "sacct",
            "-n",
            "-X",
            "-P",
            "-j",
            job_id,
            "-o",
            "State,Reason",
        ]),
    ]
}

/// Pending reasons that never clear by themselves: the request cannot fit
/// the partition, or names something that does not exist. Slurm keeps such
/// a job PENDING forever; the launcher reports it as failed.
pub const NEVER_CLEARING_REASONS: &[&str] = &[
    "PartitionConfig",
    "PartitionNodeLimit",
    "PartitionTimeLimit",
    "BadConstraints",
    "InvalidAccount",
    "InvalidQOS",
    "DependencyNeverSatisfied",
    "QOSMaxCpuPerJobLimit",
    "QOSMaxNodePerJobLimit",
    "QOSMaxWallDurationPerJobLimit",
    "AssocMaxCpuPerJobLimit",
    "AssocMaxNodePerJobLimit",
    "AssocMaxWallDurationPerJobLimit",
];

/// A job's state from Slurm's words (`PENDING` + `Resources`, …).
pub fn classify(state: &str, reason: &str) -> JobState {
    // sacct writes "CANCELLED by 0"
    let state = state.split_whitespace().next().unwrap_or("").to_owned();
    let reason = reason.trim().to_owned();
    match state.as_str() {
        "PENDING" | "CONFIGURING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED" | "RESIZING"
        | "SUSPENDED" | "STOPPED" => {
            if NEVER_CLEARING_REASONS.contains(&reason.as_str()) {
                JobState::Failed { state, reason }
            } else {
                JobState::Pending { state, reason }
            }
        }
        "RUNNING" | "COMPLETING" | "STAGE_OUT" | "SIGNALING" => JobState::Running { state },
        "COMPLETED" => JobState::Done { state },
        _ => JobState::Failed { state, reason },
    }
}

/// Output of `squeue -h -o '%T|%r'` (`PENDING|Resources`), `scontrol show
/// job -o` (`… JobState=PENDING Reason=PartitionConfig …`) or `sacct -n -X
/// -P -o State,Reason` (`FAILED|NonZeroExitCode`). Empty output (the job
/// left the queue) is `None`.
pub fn parse_state(_job_id: &str, out: &str) -> Option<JobState> {
    let line = out.lines().map(str::trim).find(|l| !l.is_empty())?;
    if line.contains("JobState=") {
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(k))
                .unwrap_or("")
                .to_owned()
        };
        let state = field("JobState=");
        let mut reason = field("Reason=");
        if reason == "None" {
            // a finished job's Reason is None; its exit code says more
            let code = field("ExitCode=");
            if !code.is_empty() && code != "0:0" {
                reason = format!("ExitCode={code}");
            }
        }
        return Some(classify(&state, &reason));
    }
    let mut parts = line.splitn(2, '|');
    let state = parts.next().unwrap_or("").trim();
    if state.is_empty() || !state.starts_with(|c: char| c.is_ascii_uppercase()) {
        return None;
    }
    Some(classify(state, parts.next().unwrap_or("")))
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

    fn job(options: BatchOptions) -> BatchJob {
        BatchJob {
            system: &SYSTEM,
            options,
            n: 4,
            profile_dir: "/home/u/.ipython/profile_default".into(),
            cluster_id: "c1".into(),
            output_file: "/home/u/.ipython/profile_default/log/engines-c1.log".into(),
            program: vec!["/opt/parallax".into(), "engine".into()],
            program_args: vec!["--file=/p/ipcontroller-c1-engine.json".into()],
        }
    }

    #[test]
    fn job_ids() {
        assert_eq!(
            parse_job_id("Submitted batch job 12\n").as_deref(),
            Some("12")
        );
        assert_eq!(
            parse_job_id("Submitted batch job 4242 on cluster c2\n").as_deref(),
            Some("4242")
        );
        assert_eq!(parse_job_id("77\n").as_deref(), Some("77"));
        assert_eq!(parse_job_id("78;cluster2\n").as_deref(), Some("78"));
        assert_eq!(
            parse_job_id("sbatch: error: Batch job submission failed: Invalid account\n"),
            None
        );
    }

    #[test]
    fn states() {
        let p = |s: &str| parse_state("12", s).map(|j| (j.is_active(), j.describe()));
        // squeue -h -j ID -o '%T|%r' (captured from Slurm 22.05)
        assert_eq!(
            p("PENDING|Resources\n"),
            Some((true, "PENDING (Resources)".into()))
        );
        assert_eq!(
            p("PENDING|Priority\n"),
            Some((true, "PENDING (Priority)".into()))
        );
        assert_eq!(
            p("PENDING|PartitionConfig\n"),
            Some((false, "PENDING (PartitionConfig)".into()))
        );
        assert_eq!(p("RUNNING|None\n"), Some((true, "RUNNING".into())));
        assert_eq!(p("COMPLETING|None\n"), Some((true, "COMPLETING".into())));
        assert_eq!(p(""), None);
        // scontrol show job -o ID
        let sc = "JobId=12 JobName=parallax-engines-c1 UserId=root(0) GroupId=root(0) \
                  Priority=1 JobState=FAILED Reason=NonZeroExitCode Dependency=(null) \
                  Requeue=1 Restarts=0 BatchFlag=1 ExitCode=1:0 RunTime=00:00:01";
        assert_eq!(p(sc), Some((false, "FAILED (NonZeroExitCode)".into())));
        let cancelled = "JobId=13 JobName=x JobState=CANCELLED Reason=None ExitCode=0:15";
        assert_eq!(
            p(cancelled),
            Some((false, "CANCELLED (ExitCode=0:15)".into()))
        );
        // captured from Slurm 22.05 (scontrol show job -o, cut): a job that
        // could never fit, pending, then cancelled; a script that exited 3
        let never = "JobId=2 JobName=wrap UserId=root(0) GroupId=root(0) MCS_label=N/A \
                     Priority=4294901758 Nice=0 Account=(null) QOS=(null) JobState=PENDING \
                     Reason=PartitionConfig Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 \
                     Reboot=0 ExitCode=0:0 RunTime=00:00:00 TimeLimit=UNLIMITED TimeMin=N/A";
        assert_eq!(p(never), Some((false, "PENDING (PartitionConfig)".into())));
        let gone = never.replace("JobState=PENDING", "JobState=CANCELLED");
        assert_eq!(
            p(&gone),
            Some((false, "CANCELLED (PartitionConfig)".into()))
        );
        let failed = "JobId=3 JobName=wrap JobState=FAILED Reason=NonZeroExitCode ExitCode=3:0";
        assert_eq!(p(failed), Some((false, "FAILED (NonZeroExitCode)".into())));
        // squeue -j of a job that left the queue prints nothing (rc 0)
        assert_eq!(p("\n"), None);
        let pend = "JobId=14 JobName=x JobState=PENDING Reason=PartitionConfig ExitCode=0:0";
        assert_eq!(p(pend), Some((false, "PENDING (PartitionConfig)".into())));
        // sacct -n -X -P -o State,Reason
        assert_eq!(
            p("CANCELLED by 0|None\n"),
            Some((false, "CANCELLED".into()))
        );
        assert_eq!(
            p("TIMEOUT|TimeLimit\n"),
            Some((false, "TIMEOUT (TimeLimit)".into()))
        );
        assert_eq!(p("COMPLETED|None\n"), Some((false, "COMPLETED".into())));
        assert_eq!(p("NODE_FAIL|None\n"), Some((false, "NODE_FAIL".into())));
        // noise is not a state
        assert_eq!(p("slurm_load_jobs error: Invalid job id specified\n"), None);
    }

    #[test]
    fn default_script() {
        let script = job(BatchOptions::default()).script().unwrap();
        expect![[r#"
            #!/bin/sh
            #SBATCH --ntasks=4
            #SBATCH --output=/home/u/.ipython/profile_default/log/engines-c1.log
            #SBATCH --export=ALL
            #SBATCH --job-name=parallax-engines-c1
            srun /opt/parallax engine --file=/p/ipcontroller-c1-engine.json
        "#]]
        .assert_eq(&script);
    }

    #[test]
    fn options_become_directives() {
        let script = job(BatchOptions {
            queue: "debug".into(),
            account: "proj1".into(),
            qos: "high".into(),
            timelimit: "1:00:00".into(),
            extra_directives: vec!["--mem=1G".into(), "#SBATCH --constraint={x}".into()],
            ..Default::default()
        })
        .script()
        .unwrap();
        expect![[r#"
            #!/bin/sh
            #SBATCH --ntasks=4
            #SBATCH --partition=debug
            #SBATCH --account=proj1
            #SBATCH --qos=high
            #SBATCH --time=1:00:00
            #SBATCH --output=/home/u/.ipython/profile_default/log/engines-c1.log
            #SBATCH --mem=1G
            #SBATCH --constraint={x}
            #SBATCH --export=ALL
            #SBATCH --job-name=parallax-engines-c1
            srun /opt/parallax engine --file=/p/ipcontroller-c1-engine.json
        "#]]
        .assert_eq(&script);
    }

    #[test]
    fn a_template_keeps_its_own_directives() {
        let t = "#!/bin/bash\n#SBATCH -p {queue}\n#SBATCH -n {n}\n#SBATCH -t 10\nmpiexec {program_and_args}\n";
        let script = job(BatchOptions {
            queue: "gpu".into(),
            timelimit: "5".into(),
            template: Some(t.into()),
            ..Default::default()
        })
        .script()
        .unwrap();
        expect![[r#"
            #!/bin/bash
            #SBATCH --output=/home/u/.ipython/profile_default/log/engines-c1.log
            #SBATCH -p gpu
            #SBATCH -n 4
            #SBATCH -t 10
            mpiexec /opt/parallax engine --file=/p/ipcontroller-c1-engine.json
        "#]]
        .assert_eq(&script);
    }

    #[test]
    fn commands() {
        assert_eq!(SYSTEM.delete_argv("12"), ["scancel", "12"]);
        assert_eq!(
            SYSTEM.signal_argv("SIGINT", "12"),
            ["scancel", "-s", "SIGINT", "12"]
        );
        assert_eq!(
            job(BatchOptions::default()).submit_argv("/p/s.sbatch"),
            ["sbatch", "/p/s.sbatch"]
        );
        assert_eq!(
            state_commands("12")[0],
            ["squeue", "-h", "-j", "12", "-o", "%T|%r"]
        );
    }
}
