//! The `--restore` state file: the hub's engine table
//! ([`crate::restore::EngineState`]) as JSON beside the connection files
//! (`security/ipcontroller-<cluster>-engines-state.json`, or
//! `ipcontroller-engines-state.json` without a cluster id). Written
//! atomically (temporary file, then rename; mode 0600) whenever the table
//! changes, read once at start with `--restore`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::restore::EngineState;

/// The state file's path in `security` for `cluster_id`.
pub fn path(security: &Path, cluster_id: &str) -> PathBuf {
    let name = if cluster_id.is_empty() {
        "ipcontroller-engines-state.json".to_owned()
    } else {
        format!("ipcontroller-{cluster_id}-engines-state.json")
    };
    security.join(name)
}

/// Reads the state file; a missing file is an empty state (nothing to
/// restore), a file that cannot be parsed is an error.
pub fn load(path: &Path) -> Result<Option<EngineState>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let state = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a hub state file", path.display()))?;
    Ok(Some(state))
}

/// Writes the state file atomically with mode 0600 (no fsync: the file
/// must survive the hub's death, kill -9, which the page cache does; a
/// machine crash loses the engines anyway).
pub fn save(path: &Path, state: &EngineState) -> Result<()> {
    crate::driver::write_private(path, &serde_json::to_string(state)?, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing_file() {
        let dir = std::env::temp_dir().join(format!("parallax-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = path(&dir, "c1");
        assert!(p.ends_with("ipcontroller-c1-engines-state.json"));
        assert_eq!(load(&p).unwrap(), None);
        let mut s = EngineState {
            next_id: 7,
            ..Default::default()
        };
        s.engines.insert("3".into(), "u-3".into());
        save(&p, &s).unwrap();
        assert_eq!(load(&p).unwrap(), Some(s.clone()));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(s.pairs(), vec![(3, "u-3".to_owned())]);
        std::fs::write(&p, "not json").unwrap();
        assert!(load(&p).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
