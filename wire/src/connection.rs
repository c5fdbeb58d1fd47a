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
