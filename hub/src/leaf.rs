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
use crate::records::RawResult;

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

/// An engine's reply, verified by its leaf and decoded only as far as the
/// hub needs it to find its broadcast and record it: the parent's msg_id,
/// the header's date, the metadata's start time and broadcast flags, the
/// content's status. Every frame is checked to be JSON (a header with
/// string `msg_id` and `msg_type`, object metadata), so the record can keep
/// the header, metadata and content as the JSON they came as
/// ([`RawResult`]) and decode them only if it is ever read — most records
/// of a broadcast to 1,000 engines are culled unread, and building their
/// maps was a fifth of the hub's CPU per broadcast.
#[derive(Debug, Clone)]
pub struct LeafReply {
    /// The frames as received (relayed as they are, or their buffers
    /// coalesced).
    pub raw: RawMessage,
    pub parent_msg_id: Option<String>,
    /// The header's `date` (`null` when absent).
    pub date: Value,
    /// The metadata's `started` (`null` when absent).
    pub started: Value,
    pub is_coalescing: bool,
    pub original_msg_id: Option<String>,
    /// The content's `status` is `"ok"`.
    pub status_ok: bool,
}

impl LeafReply {
    /// Decodes an authenticated reply (`raw`'s signature already checked).
    pub fn decode(raw: RawMessage) -> Result<LeafReply, DecodeError> {
        #[derive(Deserialize)]
        struct Header {
            #[allow(dead_code)]
            msg_id: String,
            #[allow(dead_code)]
            msg_type: String,
            #[serde(default)]
            date: Value,
        }
        #[derive(Deserialize)]
        struct Parent {
            msg_id: Option<String>,
        }
        #[derive(Deserialize)]
        struct Metadata {
            #[serde(default)]
            started: Value,
            #[serde(default)]
            is_coalescing: Value,
            #[serde(default)]
            original_msg_id: Value,
        }
        #[derive(Deserialize)]
        struct Content<'a> {
            #[serde(borrow, default)]
            status: Option<std::borrow::Cow<'a, str>>,
        }
        let json = |frame: &'static str| move |source| DecodeError::Json { frame, source };
        let object = |frame: &'static str, bytes: &[u8]| {
            // what a map-shaped struct refuses: anything but an object
            if bytes.trim_ascii_start().first() != Some(&b'{') {
                return Err(DecodeError::NotAnObject { frame });
            }
            Ok(())
        };
        object("header", &raw.header)?;
        let header: Header = serde_json::from_slice(&raw.header).map_err(json("header"))?;
        let parent: Parent = serde_json::from_slice(&raw.parent).map_err(json("parent_header"))?;
        object("metadata", &raw.metadata)?;
        let md: Metadata = serde_json::from_slice(&raw.metadata).map_err(json("metadata"))?;
        // Content: any JSON (an object in practice); only its status is read.
        let status_ok = match serde_json::from_slice::<Content>(&raw.content) {
            Ok(c) => c.status.as_deref() == Some("ok"),
            Err(_) => {
                serde_json::from_slice::<serde::de::IgnoredAny>(&raw.content)
                    .map_err(json("content"))?;
                false
            }
        };
        Ok(LeafReply {
            raw,
            parent_msg_id: parent.msg_id,
            date: header.date,
            started: md.started,
            is_coalescing: md.is_coalescing.as_bool().unwrap_or(false),
            original_msg_id: md.original_msg_id.as_str().map(str::to_owned),
            status_ok,
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
        self.status_ok
    }

    /// The metadata as a map (decoded now; `decode` checked it is one).
    pub fn metadata(&self) -> Map<String, Value> {
        serde_json::from_slice(&self.raw.metadata).unwrap_or_default()
    }

    /// The header and the content as JSON values (decoded now; `decode`
    /// checked they are JSON).
    pub fn header_and_content(&self) -> (Value, Value) {
        let value = |b: &[u8]| serde_json::from_slice(b).unwrap_or(Value::Null);
        (value(&self.raw.header), value(&self.raw.content))
    }

    /// The header, metadata and content, copied out of the receive buffer
    /// (a retained slice would pin all of it) into one allocation.
    pub fn raw_result(&self) -> RawResult {
        RawResult::new(&self.raw.header, &self.raw.metadata, &self.raw.content)
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
