//! `mpiexec -n N [mpi args] program args…` (ipyparallel's
//! `MPIEngineSetLauncher`). Each rank is a `parallax engine` that asks the
//! hub for the id equal to its rank (`OMPI_COMM_WORLD_RANK`, `PMI_RANK`,
//! `PMIX_RANK`, `SLURM_PROCID`; see `parallax_engine::rank`), and the
//! engine's Python runs as that rank's child with its environment, so
//! mpi4py works on the engines.

/// The command line of an MPI launch.
#[derive(Debug, Clone)]
pub struct MpiCommand {
    /// `mpiexec` (or `mpiexec.mpich`, `mpirun`, `srun`…).
    pub mpi_cmd: Vec<String>,
    pub mpi_args: Vec<String>,
    pub n: u32,
    pub program: Vec<String>,
}

impl MpiCommand {
    pub fn argv(&self) -> Vec<String> {
        let mut v = self.mpi_cmd.clone();
        v.push("-n".into());
        v.push(self.n.to_string());
        v.extend(self.mpi_args.iter().cloned());
        v.extend(self.program.iter().cloned());
        v
    }
}

/// The part of mpiexec's output that explains a failure: OpenMPI's
/// `-----` blocks (and what follows them), MPICH's `=====` block and the
/// two lines after it. Empty when there is none.
pub fn error_lines(output: &str) -> String {
    let mut out = Vec::new();
    let mut in_block = false;
    let mut tail = None::<usize>;
    for line in output.lines() {
        if line.starts_with("=====") {
            if in_block {
                out.push(line);
                in_block = false;
                tail = Some(2);
                continue;
            }
            in_block = true;
        } else if !in_block && tail.is_none() && line.starts_with("-----") {
            in_block = true;
        }
        if in_block {
            out.push(line);
        } else if let Some(t) = tail.as_mut() {
            if *t == 0 {
                break;
            }
            *t -= 1;
            out.push(line);
        }
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv() {
        let c = MpiCommand {
            mpi_cmd: vec!["mpiexec".into()],
            mpi_args: vec!["--oversubscribe".into()],
            n: 4,
            program: vec!["/bin/parallax".into(), "engine".into(), "--file=/f".into()],
        };
        assert_eq!(
            c.argv(),
            [
                "mpiexec",
                "-n",
                "4",
                "--oversubscribe",
                "/bin/parallax",
                "engine",
                "--file=/f"
            ]
        );
    }

    #[test]
    fn error_blocks() {
        let ompi = "engine log line\n\
--------------------------------------------------------------------------\n\
There are not enough slots available in the system to satisfy the 64\n\
slots that were requested by the application:\n\
--------------------------------------------------------------------------\n";
        assert!(error_lines(ompi).starts_with("-----"));
        assert!(error_lines(ompi).contains("not enough slots"));
        assert!(!error_lines(ompi).contains("engine log line"));
        let mpich = "x\n=====\n= BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES\n=====\nYOUR APPLICATION TERMINATED WITH THE EXIT STRING: Killed\nThis typically refers to a problem\nlast\n";
        let e = error_lines(mpich);
        assert!(e.contains("BAD TERMINATION"));
        assert!(e.contains("EXIT STRING"));
        assert!(!e.contains("last"));
        assert_eq!(error_lines("all fine\n"), "");
    }
}
