//! ipyparallel's connection files: `ipcontroller[-CLUSTER]-client.json` and
//! `ipcontroller[-CLUSTER]-engine.json`, with the fields and field order
//! ipcontroller writes.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientConnectionInfo {
    pub ssh: String,
    pub interface: String,
    pub registration: u16,
    pub control: u16,
    pub mux: u16,
    pub task: u16,
    pub task_scheme: String,
    pub iopub: u16,
    pub notification: u16,
    pub broadcast: u16,
    pub key: String,
    pub curve_serverkey: Option<String>,
    pub location: String,
    pub pack: String,
    pub unpack: String,
    pub signature_scheme: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineConnectionInfo {
    pub ssh: String,
    pub interface: String,
    pub registration: u16,
    pub control: u16,
    pub mux: u16,
    pub task: u16,
    pub iopub: u16,
    pub hb_ping: u16,
    pub hb_pong: u16,
    pub broadcast: Vec<u16>,
    pub key: String,
    pub curve_serverkey: Option<String>,
    pub location: String,
    pub pack: String,
    pub unpack: String,
    pub signature_scheme: String,
}

/// The profile directory ipyparallel's applications would use: an explicit
/// `--profile-dir`, then `$IPP_PROFILE_DIR`, then
/// `IPYTHONDIR/profile_NAME` (`--ipython-dir`, `$IPYTHONDIR`, `~/.ipython`).
/// Pure: the caller passes the environment in.
pub fn resolve_profile_dir(
    explicit: Option<&std::path::Path>,
    ipython_dir: Option<&std::path::Path>,
    profile: &str,
    env: impl Fn(&str) -> Option<String>,
) -> std::path::PathBuf {
    use std::path::PathBuf;
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if let Some(p) = env("IPP_PROFILE_DIR").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let base = ipython_dir
        .map(|p| p.to_path_buf())
        .or_else(|| {
            env("IPYTHONDIR")
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| {
            env("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."))
                .join(".ipython")
        });
    base.join(format!("profile_{profile}"))
}

/// File names for a cluster id, as ipcontroller names them.
pub fn connection_file_names(cluster_id: &str) -> (String, String) {
    let base = if cluster_id.is_empty() {
        "ipcontroller".to_owned()
    } else {
        format!("ipcontroller-{cluster_id}")
    };
    (format!("{base}-client.json"), format!("{base}-engine.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_dir_resolution_order() {
        use std::path::Path;
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let all = env(&[
            ("IPP_PROFILE_DIR", "/ipp"),
            ("IPYTHONDIR", "/ipy"),
            ("HOME", "/h"),
        ]);
        assert_eq!(
            resolve_profile_dir(Some(Path::new("/x")), None, "default", all),
            Path::new("/x")
        );
        assert_eq!(
            resolve_profile_dir(None, None, "default", all),
            Path::new("/ipp")
        );
        let no_ipp = env(&[("IPYTHONDIR", "/ipy"), ("HOME", "/h")]);
        assert_eq!(
            resolve_profile_dir(None, None, "p", no_ipp),
            Path::new("/ipy/profile_p")
        );
        assert_eq!(
            resolve_profile_dir(None, Some(Path::new("/d")), "p", no_ipp),
            Path::new("/d/profile_p")
        );
        let home = env(&[("HOME", "/h")]);
        assert_eq!(
            resolve_profile_dir(None, None, "default", home),
            Path::new("/h/.ipython/profile_default")
        );
    }

    #[test]
    fn parses_ipcontroller_files() {
        let client = r#"{"ssh": "", "interface": "tcp://127.0.0.1", "registration": 43467,
            "control": 42185, "mux": 45585, "task": 33459, "task_scheme": "leastload",
            "iopub": 55407, "notification": 55249, "broadcast": 50575,
            "key": "720ef515-a5cd856d46a736d3d1d97bb3", "curve_serverkey": null,
            "location": "vm", "pack": "json", "unpack": "json", "signature_scheme": "hmac-sha256"}"#;
        let c: ClientConnectionInfo = serde_json::from_str(client).unwrap();
        assert_eq!(c.broadcast, 50575);
        let engine = r#"{"ssh": "", "interface": "tcp://127.0.0.1", "registration": 43467,
            "control": 34537, "mux": 47379, "task": 52507, "iopub": 60805, "hb_ping": 41839,
            "hb_pong": 36163, "broadcast": [45663, 46911], "key": "k", "curve_serverkey": null,
            "location": "vm", "pack": "json", "unpack": "json", "signature_scheme": "hmac-sha256"}"#;
        let e: EngineConnectionInfo = serde_json::from_str(engine).unwrap();
        assert_eq!(e.broadcast, vec![45663, 46911]);
        assert_eq!(
            connection_file_names("x"),
            (
                "ipcontroller-x-client.json".into(),
                "ipcontroller-x-engine.json".into()
            )
        );
    }
}
