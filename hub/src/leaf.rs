//! The leaves of the broadcast tree, without I/O.
//!
//! ipyparallel's controller runs `2**depth` leaf schedulers, each bound to
//! its own engine-facing ROUTER; an engine connects to leaf `id % leaves`.
//! Parallax keeps that shape (so a stock ipengine, which picks its leaf from
//! the registration reply's `broadcast` list, works unchanged) but the tree
//! has one level: the core ([`crate::core::Hub`]) splits a broadcast by leaf
//! and hands each leaf one [`FanOut`]; the leaf, on its own task, builds and
//! signs each engine's copy and verifies and decodes the replies
//! ([`LeafCodec`]), then hands the core the replies that were ready as one
//! batch. The per-engine work that does not touch the hub's state (JSON
//! encoding, HMAC, parsing) is thus spread over the leaves, and the core
//! does only bookkeeping.
//!
//! An engine's copy differs from the others only in its header (`msg_id` is
//! `{original}_{engine uuid}`, which the stock Client needs to match a
//! non-coalescing reply to its engine) and so in its signature; parent,
//! metadata, content and buffers are the same `Bytes` in every copy. The
//! metadata carries the broadcast flags and `original_msg_id` but no
//! `targets`: engines read only the flags (ipengine's `init_metadata`), and
//! the leaf's full list in every copy (what an ipyparallel leaf sends) is
//! O(N²) bytes per broadcast.

use bytes::Bytes;
use parallax_wire::{Authenticator, DecodeError, Header, Limits, RawMessage, Signer};
use serde::Deserialize;
use serde_json::{Map, Value};
use tracing::warn;

use crate::core::peer;

/// One leaf's share of a broadcast: what every engine on it gets.
#[derive(Debug, Clone, PartialEq)]
pub struct FanOut {
    /// Which leaf (index into the engine connection info's `broadcast` list).
    pub leaf: usize,
    /// The client's routing identity (second identity of each copy).
    pub client: Bytes,
    /// The client's header; each copy's `msg_id` is `{original}_{uuid}`.
    pub header: Header,
    pub original: String,
    pub parent: Bytes,
    pub metadata: Bytes,
    pub content: Bytes,
    pub buffers: Vec<Bytes>,
    /// Engine uuids on this leaf, in the client's target order.
    pub targets: Vec<String>,
}

impl FanOut {
    /// The msg_id of `uuid`'s copy, as ipyparallel's leaves name it.
    pub fn sub_msg_id(original: &str, uuid: &str) -> String {
        format!("{original}_{uuid}")
    }
}

/// An engine's reply, verified and decoded by its leaf. Decoded for what
/// the hub does with it — record it and find its broadcast: the header,
/// metadata and content as JSON values (they become the record's
/// `result_*` fields as they are), the parent header only for its msg_id.
#[derive(Debug, Clone)]
pub struct LeafReply {
    /// The frames as received (relayed as they are, or their buffers
    /// coalesced).
    pub raw: RawMessage,
    pub header: Map<String, Value>,
    pub parent_msg_id: Option<String>,
    pub metadata: Map<String, Value>,
    pub content: Value,
}

impl LeafReply {
    /// Decodes an authenticated reply (`raw`'s signature already checked).
    pub fn decode(raw: RawMessage) -> Result<LeafReply, DecodeError> {
        #[derive(Deserialize)]
        struct Parent {
            msg_id: Option<String>,
        }
        let obj = |frame: &'static str, bytes: &[u8]| match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(_) => Err(DecodeError::NotAnObject { frame }),
            Err(source) => Err(DecodeError::Json { frame, source }),
        };
        let header = obj("header", &raw.header)?;
        if !header.get("msg_id").is_some_and(Value::is_string)
            || !header.get("msg_type").is_some_and(Value::is_string)
        {
            return Err(DecodeError::Json {
                frame: "header",
                source: serde::de::Error::custom("no msg_id or msg_type string"),
            });
        }
        let parent: Parent =
            serde_json::from_slice(&raw.parent).map_err(|source| DecodeError::Json {
                frame: "parent_header",
                source,
            })?;
        let metadata = obj("metadata", &raw.metadata)?;
        let content: Value =
            serde_json::from_slice(&raw.content).map_err(|source| DecodeError::Json {
                frame: "content",
                source,
            })?;
        Ok(LeafReply {
            raw,
            header,
            parent_msg_id: parent.msg_id,
            metadata,
            content,
        })
    }

    /// The engine's routing identity (its uuid).
    pub fn engine(&self) -> String {
        self.raw
            .idents
            .first()
            .map(|i| String::from_utf8_lossy(i).into_owned())
            .unwrap_or_default()
    }

    pub fn status_ok(&self) -> bool {
        self.content.get("status").and_then(Value::as_str) == Some("ok")
    }
}

/// Builds and signs the engines' copies; verifies and decodes their replies.
/// One per leaf (replay protection is per leaf, as each engine talks to one).
#[derive(Debug, Clone)]
pub struct LeafCodec {
    signer: Signer,
    auth: Authenticator,
    limits: Limits,
}

impl LeafCodec {
    pub fn new(key: &[u8], limits: Limits) -> LeafCodec {
        let signer = Signer::new(key);
        LeafCodec {
            auth: Authenticator::new(signer.clone()),
            signer,
            limits,
        }
    }

    /// Every engine's frames, `[uuid, client, <IDS|MSG>, sig, header, …]`,
    /// in target order.
    pub fn frames(&self, job: &FanOut) -> Vec<Vec<Bytes>> {
        // The header is encoded once with the original msg_id; each copy
        // splices its own msg_id in (the value is the first field: `Header`
        // serialises `msg_id` first), so the rest is a memcpy.
        let mut header = job.header.clone();
        header.msg_id = String::new();
        let encoded = serde_json::to_vec(&header).expect("headers serialize");
        let empty = br#"{"msg_id":"""#;
        debug_assert!(encoded.starts_with(empty));
        let rest = &encoded[empty.len()..];
        job.targets
            .iter()
            .map(|uuid| {
                let id = serde_json::to_vec(&FanOut::sub_msg_id(&job.original, uuid))
                    .expect("strings serialize");
                let mut h = Vec::with_capacity(10 + id.len() + rest.len());
                h.extend_from_slice(br#"{"msg_id":"#);
                h.extend_from_slice(&id);
                h.extend_from_slice(rest);
                let header = Bytes::from(h);
                let sig = self
                    .signer
                    .sign(&header, &job.parent, &job.metadata, &job.content);
                let mut f = Vec::with_capacity(8 + job.buffers.len());
                f.push(Bytes::copy_from_slice(uuid.as_bytes()));
                f.push(job.client.clone());
                f.push(Bytes::from_static(parallax_wire::frames::DELIMITER));
                f.push(Bytes::from(sig));
                f.push(header);
                f.push(job.parent.clone());
                f.push(job.metadata.clone());
                f.push(job.content.clone());
                f.extend(job.buffers.iter().cloned());
                f
            })
            .collect()
    }

    /// An engine's reply `[uuid, client, <IDS|MSG>, …]`: framing limits,
    /// signature, replay check, JSON — in that order, as every input of the
    /// hub. `None` (logged) for one that fails.
    pub fn reply(&mut self, frames: Vec<Bytes>) -> Option<LeafReply> {
        let raw = match RawMessage::from_frames(frames, &self.limits) {
            Ok(raw) => raw,
            Err(e) => {
                warn!(channel = "broadcast(engine)", reason = %e, "dropping malformed message");
                return None;
            }
        };
        if let Err(e) = self.auth.check(&raw) {
            warn!(channel = "broadcast(engine)", peer = %peer(&raw.idents), reason = %e, "dropping message that failed authentication");
            return None;
        }
        match LeafReply::decode(raw) {
            Ok(r) => Some(r),
            Err(e) => {
                warn!(channel = "broadcast(engine)", reason = %e, "dropping undecodable message");
                None
            }
        }
    }
}
