//! The engine id an engine asks for when none is given: its rank under
//! mpiexec or srun, so `PARALLAX_ENGINE_ID` is the MPI rank.

/// Where launchers put the rank, in the order they are read: OpenMPI,
/// MPICH (and srun --mpi=pmi2), PMIx (OpenMPI ≥ 4, srun --mpi=pmix),
/// srun.
pub const RANK_VARS: [&str; 4] = [
    "OMPI_COMM_WORLD_RANK",
    "PMI_RANK",
    "PMIX_RANK",
    "SLURM_PROCID",
];

/// The first of [`RANK_VARS`] that is set to a non-negative integer.
pub fn rank_from_env(get: impl Fn(&str) -> Option<String>) -> Option<i64> {
    RANK_VARS.iter().find_map(|k| {
        get(k)
            .and_then(|v| v.trim().parse::<i64>().ok())
            .filter(|r| *r >= 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn rank_order() {
        assert_eq!(rank_from_env(env(&[])), None);
        // OpenMPI sets both its own and PMIx's
        assert_eq!(
            rank_from_env(env(&[("PMIX_RANK", "3"), ("OMPI_COMM_WORLD_RANK", "3")])),
            Some(3)
        );
        assert_eq!(rank_from_env(env(&[("PMI_RANK", "5")])), Some(5));
        assert_eq!(
            rank_from_env(env(&[("SLURM_PROCID", "7"), ("PMI_RANK", "2")])),
            Some(2)
        );
        assert_eq!(rank_from_env(env(&[("SLURM_PROCID", "7")])), Some(7));
        // unusable values are skipped, not fatal
        assert_eq!(
            rank_from_env(env(&[("OMPI_COMM_WORLD_RANK", "x"), ("PMI_RANK", "1")])),
            Some(1)
        );
        assert_eq!(rank_from_env(env(&[("PMI_RANK", "-1")])), None);
    }
}
