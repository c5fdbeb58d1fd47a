//! What every batch system shares: a job script rendered from a template,
//! directives inserted for the options given, a submit command whose
//! output names the job, a delete and a signal command, and state commands
//! whose output maps to [`JobState`]. Each system (`slurm`, `pbs`, `sge`,
//! `lsf`, `htcondor`) is a [`BatchSystem`] value: data and pure parsers.

use std::collections::BTreeMap;

use crate::template::{self, Context, TemplateError, shell_join};
use crate::{JobState, LauncherKind};

/// An option that becomes a directive line in the job script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Directive {
    /// The number of engines (`--ntasks`, an array, `queue N`).
    Tasks,
    Queue,
    Account,
    Qos,
    Time,
    Output,
}

/// How a system spells a directive.
#[derive(Debug, Clone, Copy)]
pub struct DirectiveSpec {
    /// The line, a template (`#SBATCH --partition={queue}`).
    pub line: &'static str,
    /// Flags that mean the template already has it (`--partition`, `-p`).
    pub flags: &'static [&'static str],
    /// Appended at the end of the script (HTCondor's `queue N`) instead of
    /// after the first line.
    pub at_end: bool,
}

/// One batch system, as data.
#[derive(Debug)]
pub struct BatchSystem {
    pub kind: LauncherKind,
    /// The directive prefix (`#SBATCH`, `#PBS`, `#$`, `#BSUB`; empty for
    /// HTCondor submit files).
    pub prefix: &'static str,
    pub submit: &'static [&'static str],
    /// Submit options rendered with the job's fields and put before the
    /// script (PBS: `-j oe -o {output_file}`: Slurm's PBS wrappers ignore
    /// `#PBS -o` and write `<script>.o<id>` into the working directory).
    pub submit_args: &'static [&'static str],
    /// `bsub < script`: LSF honours `#BSUB` lines only from stdin.
    pub submit_via_stdin: bool,
    pub delete: &'static [&'static str],
    /// Followed by the signal and the job id (`scancel -s SIG ID`).
    pub signal: &'static [&'static str],
    /// The script name written in the profile's directory.
    pub script_name: &'static str,
    /// The engines' job script, before the directives for the options.
    pub engine_template: &'static str,
    pub directive: fn(Directive) -> Option<DirectiveSpec>,
    /// The job id in the submit command's output.
    pub parse_job_id: fn(&str) -> Option<String>,
    /// Commands that report a job's state, tried in order until one's
    /// output parses (the live queue first, then history).
    pub state_commands: fn(&str) -> Vec<Vec<String>>,
    /// A state command's output (and the job id, for tables of all jobs)
    /// → the job's state, `None` if it does not know the job (e.g. it left
    /// the queue).
    pub parse_state: fn(&str, &str) -> Option<JobState>,
    /// The state a job has once no state command knows it any more.
    pub gone_state: fn() -> JobState,
}

impl BatchSystem {
    /// Does `script` already have the directive (a line `PREFIX FLAG…`)?
    pub fn has_directive(&self, script: &str, flags: &[&str]) -> bool {
        script.lines().any(|line| {
            let Some(rest) = line.trim_start().strip_prefix(self.prefix) else {
                return false;
            };
            let rest = rest.trim_start();
            flags.iter().any(|f| {
                rest.strip_prefix(f).is_some_and(|after| {
                    after.is_empty()
                        || after.starts_with(['=', ' ', '\t'])
                        || (f.len() == 2 && !f.starts_with("--"))
                })
            })
        })
    }

    /// `LINE` as a directive of this system: `--mem=1G` → `#SBATCH --mem=1G`;
    /// a line that already starts with the prefix is kept.
    pub fn directive_line(&self, line: &str) -> String {
        let t = line.trim();
        if self.prefix.is_empty() || t.starts_with(self.prefix) {
            t.to_owned()
        } else {
            format!("{} {t}", self.prefix)
        }
    }

    pub fn delete_argv(&self, job_id: &str) -> Vec<String> {
        self.delete
            .iter()
            .map(|s| s.to_string())
            .chain([job_id.to_owned()])
            .collect()
    }

    pub fn signal_argv(&self, sig: &str, job_id: &str) -> Vec<String> {
        self.signal
            .iter()
            .map(|s| s.to_string())
            .chain([sig.to_owned(), job_id.to_owned()])
            .collect()
    }
}

/// The options of a batch launch (ipyparallel's traits of the same names).
#[derive(Debug, Clone, Default)]
pub struct BatchOptions {
    pub queue: String,
    pub account: String,
    pub qos: String,
    /// `--time`: the scheduler's own format (Slurm `1:00:00`, PBS
    /// `walltime=…` is written by the template).
    pub timelimit: String,
    /// Directive lines added as given (`--extra-directive`).
    pub extra_directives: Vec<String>,
    /// A template replacing the system's default (`--template FILE`).
    pub template: Option<String>,
    /// Extra template fields (ipyparallel's `namespace`).
    pub namespace: BTreeMap<String, String>,
}

/// One job to submit: what the script is made of.
#[derive(Debug, Clone)]
pub struct BatchJob {
    pub system: &'static BatchSystem,
    pub options: BatchOptions,
    pub n: u32,
    pub profile_dir: String,
    pub cluster_id: String,
    pub output_file: String,
    /// The program (`[parallax, engine]`) and its arguments.
    pub program: Vec<String>,
    pub program_args: Vec<String>,
}

impl BatchJob {
    /// The template fields (ipyparallel's `context` plus ours).
    pub fn context(&self) -> Context {
        let mut c = Context::new();
        let o = &self.options;
        let mut put = |k: &str, v: String| {
            c.insert(k.to_owned(), v);
        };
        put("n", self.n.to_string());
        put("queue", o.queue.clone());
        put("account", o.account.clone());
        put("qos", o.qos.clone());
        put("timelimit", o.timelimit.clone());
        put("profile_dir", self.profile_dir.clone());
        put("cluster_id", self.cluster_id.clone());
        put("output_file", self.output_file.clone());
        put("program", shell_join(&self.program));
        put("program_args", shell_join(&self.program_args));
        let all: Vec<&String> = self.program.iter().chain(&self.program_args).collect();
        put("program_and_args", shell_join(&all));
        // HTCondor's submit files name the executable and its arguments apart
        let (exe, rest) = all
            .split_first()
            .map_or((String::new(), &[][..]), |(e, r)| {
                (template::shell_quote(e), r)
            });
        put("executable", exe);
        put("arguments", shell_join(rest));
        for (k, v) in &o.namespace {
            c.insert(k.clone(), v.clone());
        }
        c
    }

    fn value_of(&self, d: Directive) -> String {
        let o = &self.options;
        match d {
            Directive::Tasks => self.n.to_string(),
            Directive::Queue => o.queue.clone(),
            Directive::Account => o.account.clone(),
            Directive::Qos => o.qos.clone(),
            Directive::Time => o.timelimit.clone(),
            Directive::Output => self.output_file.clone(),
        }
    }

    fn field_of(d: Directive) -> &'static str {
        match d {
            Directive::Tasks => "n",
            Directive::Queue => "queue",
            Directive::Account => "account",
            Directive::Qos => "qos",
            Directive::Time => "timelimit",
            Directive::Output => "output_file",
        }
    }

    /// The template with a directive for every option given that it does
    /// not already have (by flag) or use (by field). Unlike ipyparallel,
    /// which adds them to its default template only, `--queue` also
    /// reaches a `--template` that lacks it.
    pub fn template(&self) -> String {
        let sys = self.system;
        let base = self
            .options
            .template
            .clone()
            .unwrap_or_else(|| sys.engine_template.to_owned());
        let mut head = Vec::new();
        let mut tail = Vec::new();
        for d in [
            Directive::Tasks,
            Directive::Queue,
            Directive::Account,
            Directive::Qos,
            Directive::Time,
            Directive::Output,
        ] {
            let Some(spec) = (sys.directive)(d) else {
                continue;
            };
            if self.value_of(d).is_empty()
                || sys.has_directive(&base, spec.flags)
                || template::uses_field(&base, Self::field_of(d))
            {
                continue;
            }
            if spec.at_end {
                tail.push(spec.line.to_owned());
            } else {
                head.push(spec.line.to_owned());
            }
        }
        for extra in &self.options.extra_directives {
            // a literal line: braces are not template fields
            head.push(
                sys.directive_line(extra)
                    .replace('{', "{{")
                    .replace('}', "}}"),
            );
        }
        let mut lines: Vec<&str> = base.lines().collect();
        let at = usize::from(lines.first().is_some_and(|l| l.starts_with("#!")));
        let head_refs: Vec<&str> = head.iter().map(String::as_str).collect();
        lines.splice(at..at, head_refs);
        let mut out = lines.join("\n");
        for t in &tail {
            out.push('\n');
            out.push_str(t);
        }
        out.push('\n');
        out
    }

    /// The job script.
    pub fn script(&self) -> Result<String, TemplateError> {
        template::render(&self.template(), &self.context())
    }

    /// The submit command for a script written at `path` (for LSF the
    /// script goes on stdin instead).
    pub fn submit_argv(&self, path: &str) -> Vec<String> {
        let mut v: Vec<String> = self.system.submit.iter().map(|s| s.to_string()).collect();
        let ctx = self.context();
        v.extend(
            self.system
                .submit_args
                .iter()
                .map(|a| template::render(a, &ctx).unwrap_or_else(|_| a.to_string())),
        );
        if !self.system.submit_via_stdin {
            v.push(path.to_owned());
        }
        v
    }
}

/// One state for a job of several tasks (an array): a failure wins, then
/// running, then pending; done only if all are.
pub fn aggregate(states: Vec<JobState>) -> Option<JobState> {
    let rank = |s: &JobState| match s {
        JobState::Failed { .. } => 0,
        JobState::Running { .. } => 1,
        JobState::Pending { .. } => 2,
        JobState::Done { .. } => 3,
    };
    states.into_iter().min_by_key(rank)
}

/// The first run of ASCII digits in `s` (ipyparallel's default `\d+`).
pub fn first_number(s: &str) -> Option<String> {
    let start = s.find(|c: char| c.is_ascii_digit())?;
    let rest = &s[start..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    Some(rest[..end].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_numbers() {
        assert_eq!(
            first_number("Submitted batch job 12\n").as_deref(),
            Some("12")
        );
        assert_eq!(first_number("no digits"), None);
    }

    #[test]
    fn has_directive_matches_flags_not_prefixes() {
        let s = &crate::slurm::SYSTEM;
        let script = "#!/bin/sh\n#SBATCH --partition=debug\n#SBATCH -A proj\n";
        assert!(s.has_directive(script, &["--partition", "-p"]));
        assert!(s.has_directive(script, &["--account", "-A"]));
        assert!(!s.has_directive(script, &["--qos"]));
        assert!(!s.has_directive("#SBATCH --partitionx=1", &["--partition"]));
        assert!(s.has_directive("#SBATCH -pdebug", &["-p"]));
    }
}
