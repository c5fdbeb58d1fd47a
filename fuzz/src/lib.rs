//! The decode harness shared by the cargo-fuzz target (`fuzz_targets/decode.rs`,
//! nightly) and the stable smoke fuzz test (`wire/tests/fuzz_smoke.rs`, which
//! includes this file as a module), so both exercise exactly the same code.
//!
//! It uses only `parallax_wire`, `bytes` and `serde_json`, which the wire
//! crate's integration tests can use too.
//!
//! # Input format
//!
//! `[control][frame]*`, where each frame is a LEB128 length (at most four
//! bytes) followed by that many bytes; a length running past the end of the
//! input takes what is left. Control bits:
//!
//! * bit 0: split with small [`Limits`] so the size checks are reached;
//! * all other bits are reserved and ignored.
//!
//! # What must hold (besides "never panics")
//!
//! * splitting then `into_frames()` gives back the input frames;
//! * a message re-signed with the key is accepted once, then is a replay;
//! * an empty-key authenticator accepts everything, so decoding is reached;
//! * whatever decodes re-serializes through `Session::serialize` into frames
//!   that split, verify and decode to the same message.

use bytes::Bytes;
use parallax_wire::content::{
    DbRequest, Dependency, ErrorContent, PurgeRequest, QueueRequest, RegistrationRequest,
    ResubmitRequest, ResultRequest, TaskMetadata, UnregistrationRequest,
};
use parallax_wire::{AuthError, Authenticator, Limits, Message, RawMessage, Session, Signer};
use serde_json::Value;

/// The key the harness signs with (the golden tests' key).
pub const FUZZ_KEY: &[u8] = b"parallax-golden-key";

/// Limits small enough for fuzz inputs to exceed.
pub const SMALL_LIMITS: Limits = Limits {
    max_json_frame: 256,
    max_total: 2048,
    max_idents: 3,
};

/// Control bit: use [`SMALL_LIMITS`].
pub const CTRL_SMALL_LIMITS: u8 = 1;

/// Decode the fuzz input format into a control byte and frames.
pub fn split_input(data: &[u8]) -> Option<(u8, Vec<Bytes>)> {
    let (&ctrl, mut rest) = data.split_first()?;
    let mut frames = Vec::new();
    while !rest.is_empty() {
        let mut len = 0usize;
        let mut used = 0;
        for (i, &b) in rest.iter().take(4).enumerate() {
            len |= usize::from(b & 0x7f) << (7 * i);
            used = i + 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        rest = &rest[used..];
        let take = len.min(rest.len());
        frames.push(Bytes::copy_from_slice(&rest[..take]));
        rest = &rest[take..];
    }
    Some((ctrl, frames))
}

/// Encode frames into the fuzz input format (for seeds and the smoke test).
pub fn encode_input(ctrl: u8, frames: &[Bytes]) -> Vec<u8> {
    let mut out = vec![ctrl];
    for f in frames {
        let mut len = f.len();
        loop {
            let b = (len & 0x7f) as u8;
            len >>= 7;
            if len == 0 {
                out.push(b);
                break;
            }
            out.push(b | 0x80);
        }
        out.extend_from_slice(f);
    }
    out
}

/// How far an input got (for the smoke test's coverage statistics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Empty input, or the frames did not split.
    NotSplit,
    /// Split and authenticated, but the JSON did not decode.
    NotDecoded,
    /// Decoded, but the signature as given was not valid for [`FUZZ_KEY`].
    DecodedBadSignature,
    /// Decoded and validly signed with [`FUZZ_KEY`].
    DecodedSigned,
}

/// The fuzz entry point: never panics on any input.
pub fn run(data: &[u8]) -> Outcome {
    match split_input(data) {
        Some((ctrl, frames)) => run_frames(ctrl, frames),
        None => Outcome::NotSplit,
    }
}

/// Run the whole receive path on `frames` and check its invariants.
pub fn run_frames(ctrl: u8, frames: Vec<Bytes>) -> Outcome {
    let limits = if ctrl & CTRL_SMALL_LIMITS != 0 {
        SMALL_LIMITS
    } else {
        Limits::default()
    };
    let Ok(raw) = RawMessage::from_frames(frames.clone(), &limits) else {
        return Outcome::NotSplit;
    };
    assert_eq!(
        raw.clone().into_frames(),
        frames,
        "split/rejoin changed frames"
    );
    assert!(raw.idents.len() <= limits.max_idents);
    assert!(raw.size() <= limits.max_total);

    let signer = Signer::new(FUZZ_KEY);

    // The frames as given, with the real key: usually a bad signature.
    let mut keyed = Authenticator::new(signer.clone());
    let first = keyed.check(&raw);
    if first.is_ok() {
        assert_eq!(keyed.check(&raw), Err(AuthError::Duplicate));
    } else {
        // A rejected message is not remembered.
        assert_eq!(keyed.check(&raw), first);
    }

    // Re-signed with the key: accepted once, then a replay.
    let mut resigned = raw.clone();
    resigned.signature =
        Bytes::from(signer.sign(&raw.header, &raw.parent, &raw.metadata, &raw.content));
    let mut auth = Authenticator::new(signer.clone());
    assert_eq!(auth.check(&resigned), Ok(()));
    assert_eq!(auth.check(&resigned), Err(AuthError::Duplicate));

    // An empty key accepts everything, so decoding is always reached.
    let mut open = Authenticator::new(Signer::new(b""));
    assert_eq!(open.check(&raw), Ok(()));

    let Ok(msg) = Message::decode(&raw) else {
        return Outcome::NotDecoded;
    };
    let _ = TaskMetadata::from_metadata(&msg.metadata);
    let _ = Dependency::from_value(msg.metadata.get("after"));
    let _ = msg.parent_msg_id();
    typed_contents(&msg.content);

    // Re-serialize through the outgoing path; it must come back the same.
    let session = Session::new(signer.clone(), "fuzz".into(), "fuzz".into(), 1);
    let out = session.serialize(
        msg.idents.clone(),
        &msg.header,
        &msg.parent_header,
        &Value::Object(msg.metadata.clone()),
        &msg.content,
        msg.buffers.clone(),
    );
    let raw2 =
        RawMessage::from_frames(out, &Limits::default()).expect("re-serialized message splits");
    Authenticator::new(signer)
        .check(&raw2)
        .expect("re-serialized message verifies");
    let msg2 = Message::decode(&raw2).expect("re-serialized message decodes");
    assert_eq!(msg2, msg, "serialize/decode round trip changed the message");
    if first.is_ok() {
        Outcome::DecodedSigned
    } else {
        Outcome::DecodedBadSignature
    }
}

fn typed_contents(content: &Value) {
    macro_rules! try_as {
        ($($t:ty),*) => {$(
            let _ = serde_json::from_value::<$t>(content.clone());
        )*};
    }
    try_as!(
        RegistrationRequest,
        UnregistrationRequest,
        QueueRequest,
        ResultRequest,
        DbRequest,
        PurgeRequest,
        ResubmitRequest,
        ErrorContent
    );
    if let Value::Object(m) = content {
        let _ = TaskMetadata::from_metadata(m);
    }
}
