//! Typed contents and metadata of the ipyparallel messages the hub handles.
//!
//! Field names follow ipyparallel 9 (`docs/source/reference/messages.md` and
//! `controller/hub.py`). Unknown fields are ignored on input.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// `registration_request` (engine → hub, query socket).
#[derive(Debug, Clone, Deserialize)]
pub struct RegistrationRequest {
    pub uuid: String,
    #[serde(default)]
    pub id: Option<i64>,
}

/// `unregistration_request` (engine or nanny → hub).
#[derive(Debug, Clone, Deserialize)]
pub struct UnregistrationRequest {
    pub id: Option<i64>,
}

/// `queue_request` / `load_request`.
#[derive(Debug, Clone, Deserialize)]
pub struct QueueRequest {
    #[serde(default)]
    pub targets: Value,
    #[serde(default)]
    pub verbose: bool,
}

/// `result_request`.
#[derive(Debug, Clone, Deserialize)]
pub struct ResultRequest {
    pub msg_ids: Vec<String>,
    #[serde(default)]
    pub status_only: bool,
}

/// `db_request`.
#[derive(Debug, Clone, Deserialize)]
pub struct DbRequest {
    #[serde(default = "empty_object")]
    pub query: Value,
    #[serde(default)]
    pub keys: Option<Vec<String>>,
}

fn empty_object() -> Value {
    Value::Object(Map::new())
}

/// `purge_request`: `msg_ids` is a list or the string `"all"`.
#[derive(Debug, Clone, Deserialize)]
pub struct PurgeRequest {
    #[serde(default)]
    pub msg_ids: Value,
    #[serde(default)]
    pub engine_ids: Vec<i64>,
}

/// `resubmit_request`.
#[derive(Debug, Clone, Deserialize)]
pub struct ResubmitRequest {
    pub msg_ids: Vec<String>,
}

/// The error content ipyparallel builds with `error.wrap_exception()`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorContent {
    pub status: String,
    pub ename: String,
    pub evalue: String,
    pub traceback: Vec<String>,
    #[serde(default)]
    pub engine_info: Map<String, Value>,
}

impl ErrorContent {
    /// An error raised by the hub itself. The traceback is a short
    /// Python-style text so `RemoteError` renders it readably.
    pub fn new(ename: &str, evalue: impl Into<String>) -> Self {
        let evalue = evalue.into();
        ErrorContent {
            status: "error".into(),
            ename: ename.into(),
            traceback: vec![
                "Traceback (most recent call last):\n".into(),
                "  raised by the Parallax hub\n".into(),
                format!("{ename}: {evalue}\n"),
            ],
            evalue,
            engine_info: Map::new(),
        }
    }

    pub fn with_engine_info(mut self, uuid: &str, id: Option<i64>, method: &str) -> Self {
        self.engine_info.insert("engine_uuid".into(), json!(uuid));
        if let Some(id) = id {
            self.engine_info.insert("engine_id".into(), json!(id));
        }
        self.engine_info.insert("method".into(), json!(method));
        self
    }

    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("error content serializes")
    }
}

/// A task dependency (`after` / `follow`), as `Dependency.as_dict()` or a
/// bare list of msg_ids.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Dependency {
    pub ids: Vec<String>,
    pub all: bool,
    pub success: bool,
    pub failure: bool,
}

impl Dependency {
    pub fn from_value(v: Option<&Value>) -> Result<Dependency, String> {
        let mut dep = Dependency {
            ids: Vec::new(),
            all: true,
            success: true,
            failure: false,
        };
        let ids = match v {
            None | Some(Value::Null) => return Ok(dep),
            Some(Value::Object(m)) => {
                if let Some(b) = m.get("all").and_then(Value::as_bool) {
                    dep.all = b;
                }
                if let Some(b) = m.get("success").and_then(Value::as_bool) {
                    dep.success = b;
                }
                if let Some(b) = m.get("failure").and_then(Value::as_bool) {
                    dep.failure = b;
                }
                m.get("dependencies")
                    .cloned()
                    .unwrap_or(Value::Array(vec![]))
            }
            Some(other) => other.clone(),
        };
        match ids {
            Value::String(s) => dep.ids.push(s),
            Value::Array(a) => {
                for x in a {
                    match x {
                        Value::String(s) => {
                            if !dep.ids.contains(&s) {
                                dep.ids.push(s)
                            }
                        }
                        other => return Err(format!("invalid dependency: {other}")),
                    }
                }
            }
            Value::Null => {}
            other => return Err(format!("invalid dependency: {other}")),
        }
        if !(dep.success || dep.failure) {
            return Err("must depend on at least one of successes or failures".into());
        }
        Ok(dep)
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// The scheduling metadata of a load-balanced request.
#[derive(Debug, Clone, Default)]
pub struct TaskMetadata {
    pub targets: Vec<String>,
    pub retries: u32,
    pub after: Dependency,
    pub follow: Dependency,
    pub timeout: Option<f64>,
}

impl TaskMetadata {
    pub fn from_metadata(md: &Map<String, Value>) -> Result<TaskMetadata, String> {
        let targets = match md.get("targets") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .map(|t| match t {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(format!("invalid target: {other}")),
                })
                .collect::<Result<_, _>>()?,
            Some(other) => return Err(format!("invalid targets: {other}")),
        };
        let retries = match md.get("retries") {
            None | Some(Value::Null) => 0,
            Some(v) => v
                .as_u64()
                .map(|r| r.min(u32::MAX as u64) as u32)
                .ok_or_else(|| format!("invalid retries: {v}"))?,
        };
        let timeout = match md.get("timeout") {
            None | Some(Value::Null) => None,
            Some(v) => {
                let t = v.as_f64().ok_or_else(|| format!("invalid timeout: {v}"))?;
                if t > 0.0 { Some(t) } else { None }
            }
        };
        Ok(TaskMetadata {
            targets,
            retries,
            after: Dependency::from_value(md.get("after"))?,
            follow: Dependency::from_value(md.get("follow"))?,
            timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependency_forms() {
        let d = Dependency::from_value(Some(&json!(["a", "b", "a"]))).unwrap();
        assert_eq!(d.ids, vec!["a", "b"]);
        assert!(d.all && d.success && !d.failure);
        let d = Dependency::from_value(Some(
            &json!({"dependencies": ["x"], "all": false, "success": false, "failure": true}),
        ))
        .unwrap();
        assert_eq!(d.ids, vec!["x"]);
        assert!(!d.all && !d.success && d.failure);
        assert!(
            Dependency::from_value(Some(
                &json!({"dependencies": [], "success": false, "failure": false})
            ))
            .is_err()
        );
        assert!(Dependency::from_value(Some(&json!([1]))).is_err());
    }

    #[test]
    fn task_metadata() {
        let md =
            json!({"targets": ["u1"], "retries": 2, "timeout": 0.5, "after": [], "follow": null});
        let t = TaskMetadata::from_metadata(md.as_object().unwrap()).unwrap();
        assert_eq!(t.targets, vec!["u1"]);
        assert_eq!(t.retries, 2);
        assert_eq!(t.timeout, Some(0.5));
        assert!(t.after.is_empty());
        let bad = json!({"retries": "x"});
        assert!(TaskMetadata::from_metadata(bad.as_object().unwrap()).is_err());
    }
}
