//! Decoded messages and the outgoing [`Session`].
//!
//! Decoding happens only after [`crate::sign::Authenticator::check`] accepted
//! the raw frames. Outgoing messages are serialized to compact JSON and signed.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::frames::{DELIMITER, RawMessage};
use crate::sign::Signer;

/// A Jupyter message header. Unknown fields are kept so that relayed or
/// stored headers round-trip.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub msg_id: String,
    pub msg_type: String,
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub session: String,
    #[serde(default)]
    pub date: String,
    #[serde(default)]
    pub version: String,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("{frame} frame is not valid JSON: {source}")]
    Json {
        frame: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{frame} frame is not a JSON object")]
    NotAnObject { frame: &'static str },
}

/// An authenticated message with its JSON parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub idents: Vec<Bytes>,
    pub header: Header,
    /// The parent header as sent (`{}` when there is none). Kept as a value
    /// because fabricated parents (ipyparallel's stranded-task replies) carry
    /// only some header fields.
    pub parent_header: Value,
    pub metadata: Map<String, Value>,
    pub content: Value,
    pub buffers: Vec<Bytes>,
}

fn parse_obj(frame: &'static str, bytes: &[u8]) -> Result<Map<String, Value>, DecodeError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(DecodeError::NotAnObject { frame }),
        Err(source) => Err(DecodeError::Json { frame, source }),
    }
}

impl Message {
    /// Parse the JSON frames of an (already authenticated) raw message.
    pub fn decode(raw: &RawMessage) -> Result<Message, DecodeError> {
        let header: Header =
            serde_json::from_slice(&raw.header).map_err(|source| DecodeError::Json {
                frame: "header",
                source,
            })?;
        let parent_header = Value::Object(parse_obj("parent", &raw.parent)?);
        let metadata = parse_obj("metadata", &raw.metadata)?;
        let content: Value =
            serde_json::from_slice(&raw.content).map_err(|source| DecodeError::Json {
                frame: "content",
                source,
            })?;
        Ok(Message {
            idents: raw.idents.clone(),
            header,
            parent_header,
            metadata,
            content,
            buffers: raw.buffers.clone(),
        })
    }

    pub fn msg_type(&self) -> &str {
        &self.header.msg_type
    }

    pub fn msg_id(&self) -> &str {
        &self.header.msg_id
    }

    /// The parent's msg_id, if the message has a parent.
    pub fn parent_msg_id(&self) -> Option<&str> {
        self.parent_header.get("msg_id").and_then(Value::as_str)
    }
}

/// jupyter_client's date format: ISO 8601 with microseconds and `Z`.
pub fn format_date(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// Builds and signs outgoing messages, like jupyter_client's `Session`.
#[derive(Debug, Clone)]
pub struct Session {
    signer: Signer,
    pub session_id: String,
    pub username: String,
    pid: u32,
    counter: u64,
}

impl Session {
    pub fn new(signer: Signer, session_id: String, username: String, pid: u32) -> Self {
        Session {
            signer,
            session_id,
            username,
            pid,
            counter: 0,
        }
    }

    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// A fresh msg_id: `{session}_{pid}_{n}` as jupyter_client makes them.
    pub fn new_msg_id(&mut self) -> String {
        let id = format!("{}_{}_{}", self.session_id, self.pid, self.counter);
        self.counter += 1;
        id
    }

    /// A header for a new message of `msg_type` sent at `date`.
    pub fn header(&mut self, msg_type: &str, date: &str) -> Header {
        Header {
            msg_id: self.new_msg_id(),
            msg_type: msg_type.to_owned(),
            username: self.username.clone(),
            session: self.session_id.clone(),
            date: date.to_owned(),
            version: "5.4".to_owned(),
            extra: Map::new(),
        }
    }

    /// Serialize and sign a message into frames.
    pub fn serialize(
        &self,
        idents: Vec<Bytes>,
        header: &Header,
        parent: &Value,
        metadata: &Value,
        content: &Value,
        buffers: Vec<Bytes>,
    ) -> Vec<Bytes> {
        let enc = |v: &dyn erased::Ser| Bytes::from(v.to_json());
        self.serialize_frames(
            idents,
            enc(header),
            enc(parent),
            enc(metadata),
            enc(content),
            buffers,
        )
    }

    /// Sign already-encoded JSON frames.
    pub fn serialize_frames(
        &self,
        idents: Vec<Bytes>,
        header: Bytes,
        parent: Bytes,
        metadata: Bytes,
        content: Bytes,
        buffers: Vec<Bytes>,
    ) -> Vec<Bytes> {
        let sig = self.signer.sign(&header, &parent, &metadata, &content);
        let mut out = Vec::with_capacity(idents.len() + 6 + buffers.len());
        out.extend(idents);
        out.push(Bytes::from_static(DELIMITER));
        out.push(Bytes::from(sig));
        out.push(header);
        out.push(parent);
        out.push(metadata);
        out.push(content);
        out.extend(buffers);
        out
    }
}

mod erased {
    /// Object-safe "serialize to JSON bytes" so `serialize` can take a header
    /// and values through one closure.
    pub trait Ser {
        fn to_json(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Ser for T {
        fn to_json(&self) -> Vec<u8> {
            serde_json::to_vec(self).expect("JSON values always serialize")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::Limits;
    use crate::sign::Authenticator;
    use serde_json::json;

    #[test]
    fn serialize_then_decode() {
        let mut s = Session::new(Signer::new(b"k"), "sess".into(), "u".into(), 42);
        let h = s.header("connection_request", "2026-01-01T00:00:00.000000Z");
        assert_eq!(h.msg_id, "sess_42_0");
        let frames = s.serialize(
            vec![Bytes::from_static(b"peer")],
            &h,
            &json!({}),
            &json!({"a": 1}),
            &json!({"x": [1, 2]}),
            vec![Bytes::from_static(b"buf")],
        );
        let raw = RawMessage::from_frames(frames, &Limits::default()).unwrap();
        Authenticator::new(Signer::new(b"k")).check(&raw).unwrap();
        let m = Message::decode(&raw).unwrap();
        assert_eq!(m.header, h);
        assert_eq!(m.parent_msg_id(), None);
        assert_eq!(m.metadata["a"], 1);
        assert_eq!(m.content, json!({"x": [1, 2]}));
        assert_eq!(m.buffers.len(), 1);
        assert_eq!(m.idents[0].as_ref(), b"peer");
    }

    #[test]
    fn decode_errors_name_the_frame() {
        let frames: Vec<Bytes> = [
            "<IDS|MSG>",
            "",
            "{\"msg_id\":\"a\",\"msg_type\":\"t\"}",
            "[]",
            "{}",
            "{}",
        ]
        .iter()
        .map(|s| Bytes::copy_from_slice(s.as_bytes()))
        .collect();
        let raw = RawMessage::from_frames(frames, &Limits::default()).unwrap();
        let e = Message::decode(&raw).unwrap_err();
        assert_eq!(e.to_string(), "parent frame is not a JSON object");
        let bad_utf8 = vec![
            Bytes::from_static(b"<IDS|MSG>"),
            Bytes::new(),
            Bytes::from_static(b"{\"msg_id\":\"\xff\",\"msg_type\":\"t\"}"),
            Bytes::from_static(b"{}"),
            Bytes::from_static(b"{}"),
            Bytes::from_static(b"{}"),
        ];
        let raw = RawMessage::from_frames(bad_utf8, &Limits::default()).unwrap();
        assert!(Message::decode(&raw).is_err());
    }

    #[test]
    fn date_format() {
        let t = DateTime::parse_from_rfc3339("2026-11-22T00:23:30.088123Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(format_date(t), "2026-11-22T00:23:30.088123Z");
    }
}
