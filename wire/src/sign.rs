//! HMAC-SHA256 message signing, verification and replay rejection.
//!
//! The signature is the lowercase hex HMAC-SHA256 of header ‖ parent ‖ metadata ‖
//! content (buffers are not signed), as in jupyter_client's `Session`.
//! Verification runs on the raw frames before any JSON is parsed, compares in
//! constant time, and only then records the digest so that a replayed message
//! is rejected.

use std::collections::{HashSet, VecDeque};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::frames::RawMessage;

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("unsigned message")]
    Unsigned,
    #[error("malformed signature (expected 64 hex digits)")]
    MalformedSignature,
    #[error("invalid signature")]
    InvalidSignature,
    #[error("duplicate signature (replayed message)")]
    Duplicate,
}

/// Signs and verifies messages with one key. An empty key disables signing
/// (jupyter_client's `Session(key=b"")`): messages go out with an empty
/// signature and any signature is accepted.
#[derive(Clone)]
pub struct Signer {
    mac: Option<HmacSha256>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Signer")
            .field("enabled", &self.mac.is_some())
            .finish()
    }
}

impl Signer {
    pub fn new(key: &[u8]) -> Self {
        let mac = if key.is_empty() {
            None
        } else {
            Some(HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length"))
        };
        Signer { mac }
    }

    pub fn is_enabled(&self) -> bool {
        self.mac.is_some()
    }

    fn digest(&self, parts: [&[u8]; 4]) -> Option<[u8; 32]> {
        let mut mac = self.mac.clone()?;
        for p in parts {
            mac.update(p);
        }
        let out = mac.finalize().into_bytes();
        let mut d = [0u8; 32];
        d.copy_from_slice(&out);
        Some(d)
    }

    /// Hex signature over the four JSON frames (empty when signing is off).
    pub fn sign(&self, header: &[u8], parent: &[u8], metadata: &[u8], content: &[u8]) -> String {
        match self.digest([header, parent, metadata, content]) {
            Some(d) => hex::encode(d),
            None => String::new(),
        }
    }

    /// Verify a raw message's signature; returns the 32-byte digest (for replay
    /// tracking) when signing is on.
    pub fn verify(&self, raw: &RawMessage) -> Result<Option<[u8; 32]>, AuthError> {
        let Some(expected) = self.digest([&raw.header, &raw.parent, &raw.metadata, &raw.content])
        else {
            return Ok(None);
        };
        if raw.signature.is_empty() {
            return Err(AuthError::Unsigned);
        }
        let mut given = [0u8; 32];
        hex::decode_to_slice(&raw.signature, &mut given)
            .map_err(|_| AuthError::MalformedSignature)?;
        if bool::from(given.ct_eq(&expected)) {
            Ok(Some(expected))
        } else {
            Err(AuthError::InvalidSignature)
        }
    }
}

/// Bounded history of the digests already seen. When full, the oldest tenth
/// is forgotten (jupyter_client culls a random tenth of 2^16 entries; oldest
/// first is deterministic and forgets the least likely replays first).
#[derive(Debug, Clone)]
pub struct DigestHistory {
    // The first 128 bits of each HMAC: collisions are out of reach and the
    // full history (2^16 entries) stays near 2.5 MiB.
    seen: HashSet<u128>,
    order: VecDeque<u128>,
    capacity: usize,
}

impl Default for DigestHistory {
    fn default() -> Self {
        Self::with_capacity(1 << 16)
    }
}

impl DigestHistory {
    pub fn with_capacity(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        // Grow on demand: an idle hub should not hold the full history.
        DigestHistory {
            seen: HashSet::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    /// Record a digest; false if it was already present.
    pub fn insert(&mut self, digest: [u8; 32]) -> bool {
        let mut head = [0u8; 16];
        head.copy_from_slice(&digest[..16]);
        let digest = u128::from_le_bytes(head);
        if self.seen.contains(&digest) {
            return false;
        }
        if self.order.len() >= self.capacity {
            let cull = (self.capacity / 10).max(1);
            for _ in 0..cull {
                if let Some(old) = self.order.pop_front() {
                    self.seen.remove(&old);
                }
            }
        }
        self.seen.insert(digest);
        self.order.push_back(digest);
        true
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// A signer plus replay protection: what every receiving socket runs first.
#[derive(Debug, Clone)]
pub struct Authenticator {
    pub signer: Signer,
    history: DigestHistory,
}

impl Authenticator {
    pub fn new(signer: Signer) -> Self {
        Authenticator {
            signer,
            history: DigestHistory::default(),
        }
    }

    pub fn with_history(signer: Signer, history: DigestHistory) -> Self {
        Authenticator { signer, history }
    }

    /// Verify the signature, then reject a digest seen before.
    pub fn check(&mut self, raw: &RawMessage) -> Result<(), AuthError> {
        match self.signer.verify(raw)? {
            Some(d) if !self.history.insert(d) => Err(AuthError::Duplicate),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::Limits;
    use bytes::Bytes;

    fn raw(sig: &str, header: &str) -> RawMessage {
        RawMessage::from_frames(
            vec![
                Bytes::from_static(b"<IDS|MSG>"),
                Bytes::copy_from_slice(sig.as_bytes()),
                Bytes::copy_from_slice(header.as_bytes()),
                Bytes::from_static(b"{}"),
                Bytes::from_static(b"{}"),
                Bytes::from_static(b"{}"),
            ],
            &Limits::default(),
        )
        .unwrap()
    }

    #[test]
    fn known_vector() {
        // python: hmac.new(b"key", b'{"a":1}{}{}{}', hashlib.sha256).hexdigest()
        let s = Signer::new(b"key");
        let sig = s.sign(br#"{"a":1}"#, b"{}", b"{}", b"{}");
        assert_eq!(
            sig,
            "f1128388193e4dd1aa760827bd756a1b40b627676b5efe22c0e8297919bfa218"
        );
        assert!(s.verify(&raw(&sig, r#"{"a":1}"#)).is_ok());
    }

    #[test]
    fn rejects_bad_unsigned_malformed_and_replayed() {
        let s = Signer::new(b"secret");
        let good = s.sign(b"{}", b"{}", b"{}", b"{}");
        let mut auth = Authenticator::new(s.clone());
        assert_eq!(auth.check(&raw("", "{}")), Err(AuthError::Unsigned));
        assert_eq!(
            auth.check(&raw("zz", "{}")),
            Err(AuthError::MalformedSignature)
        );
        let wrong = Signer::new(b"other").sign(b"{}", b"{}", b"{}", b"{}");
        assert_eq!(
            auth.check(&raw(&wrong, "{}")),
            Err(AuthError::InvalidSignature)
        );
        assert_eq!(auth.check(&raw(&good, "{}")), Ok(()));
        assert_eq!(auth.check(&raw(&good, "{}")), Err(AuthError::Duplicate));
        // a valid signature over different frames is not accepted
        assert_eq!(
            auth.check(&raw(&good, "{ }")),
            Err(AuthError::InvalidSignature)
        );
    }

    #[test]
    fn empty_key_accepts_everything() {
        let mut auth = Authenticator::new(Signer::new(b""));
        assert_eq!(auth.check(&raw("", "{}")), Ok(()));
        assert_eq!(auth.check(&raw("", "{}")), Ok(()));
    }

    #[test]
    fn history_is_bounded() {
        let mut h = DigestHistory::with_capacity(100);
        for i in 0..1000u32 {
            let mut d = [0u8; 32];
            d[..4].copy_from_slice(&i.to_le_bytes());
            assert!(h.insert(d));
        }
        assert!(h.len() <= 100);
        let mut last = [0u8; 32];
        last[..4].copy_from_slice(&999u32.to_le_bytes());
        assert!(!h.insert(last));
    }
}
