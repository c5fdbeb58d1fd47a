//! Local processes (ipyparallel's `LocalProcessLauncher` family): the
//! cluster-file state of one process, shared by the `local` and `mpi`
//! launchers (an mpiexec is one local process).

use serde_json::{Value, json};

/// `LocalProcessLauncher.to_dict()`: `profile_dir`, `cluster_id`, `state`,
/// `pid`, `output_file`, plus `n` for engine sets (`MPIEngineSetLauncher`).
pub fn process_dict(
    profile_dir: &str,
    cluster_id: &str,
    pid: i64,
    output_file: &str,
    state: &str,
    n: Option<u32>,
) -> Value {
    let mut d = json!({
        "cluster_id": cluster_id,
        "output_file": output_file,
        "pid": pid,
        "profile_dir": profile_dir,
        "state": state,
    });
    if let Some(n) = n {
        d["n"] = json!(n);
    }
    d
}

#[cfg(test)]
mod tests {
    #[test]
    fn fields() {
        let d = super::process_dict("/p", "c", 42, "/p/log/x.log", "running", Some(4));
        assert_eq!(
            d,
            serde_json::json!({"cluster_id": "c", "output_file": "/p/log/x.log", "pid": 42,
                               "profile_dir": "/p", "state": "running", "n": 4})
        );
    }
}
