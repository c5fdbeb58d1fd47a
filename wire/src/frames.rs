//! Multipart framing: `[idents…, <IDS|MSG>, signature, header, parent, metadata,
//! content, buffers…]`.
//!
//! Splitting is a cheap check over frame boundaries: no JSON is parsed and no
//! frame is copied (frames are `Bytes`, so slicing is reference counting).

use bytes::Bytes;

/// The delimiter between routing identities and the message proper.
pub const DELIMITER: &[u8] = b"<IDS|MSG>";

/// Size limits applied before anything else is done with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Maximum size of each of the four JSON frames.
    pub max_json_frame: usize,
    /// Maximum total size of the message including buffers.
    pub max_total: usize,
    /// Maximum number of routing identities before the delimiter.
    pub max_idents: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // ipyparallel puts payloads in buffers; JSON frames stay small, but
            // db_reply records and result_request contents can be large.
            max_json_frame: 256 * 1024 * 1024,
            max_total: 2 * 1024 * 1024 * 1024 - 1,
            max_idents: 16,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("no <IDS|MSG> delimiter among {frames} frames")]
    NoDelimiter { frames: usize },
    #[error("truncated message: {have} frames after the delimiter, need at least 5")]
    Truncated { have: usize },
    #[error("too many routing identities ({count} > {max})")]
    TooManyIdents { count: usize, max: usize },
    #[error("oversized message: {size} bytes exceeds the limit of {limit}")]
    Oversized { size: usize, limit: usize },
}

/// A message split into its frames; nothing has been verified or parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawMessage {
    pub idents: Vec<Bytes>,
    pub signature: Bytes,
    pub header: Bytes,
    pub parent: Bytes,
    pub metadata: Bytes,
    pub content: Bytes,
    pub buffers: Vec<Bytes>,
}

impl RawMessage {
    /// Split frames at the delimiter, enforcing `limits`.
    pub fn from_frames(frames: Vec<Bytes>, limits: &Limits) -> Result<Self, FrameError> {
        let total: usize = frames.iter().map(Bytes::len).sum();
        if total > limits.max_total {
            return Err(FrameError::Oversized {
                size: total,
                limit: limits.max_total,
            });
        }
        let n = frames.len();
        let delim = frames
            .iter()
            .position(|f| f.as_ref() == DELIMITER)
            .ok_or(FrameError::NoDelimiter { frames: n })?;
        if delim > limits.max_idents {
            return Err(FrameError::TooManyIdents {
                count: delim,
                max: limits.max_idents,
            });
        }
        let after = n - delim - 1;
        if after < 5 {
            return Err(FrameError::Truncated { have: after });
        }
        let mut it = frames.into_iter();
        let idents: Vec<Bytes> = it.by_ref().take(delim).collect();
        it.next(); // the delimiter
        let mut next = || it.next().expect("length checked above");
        let signature = next();
        let header = next();
        let parent = next();
        let metadata = next();
        let content = next();
        for f in [&header, &parent, &metadata, &content] {
            if f.len() > limits.max_json_frame {
                return Err(FrameError::Oversized {
                    size: f.len(),
                    limit: limits.max_json_frame,
                });
            }
        }
        let buffers = it.collect();
        Ok(RawMessage {
            idents,
            signature,
            header,
            parent,
            metadata,
            content,
            buffers,
        })
    }

    /// The frames in wire order.
    pub fn into_frames(self) -> Vec<Bytes> {
        let mut out = Vec::with_capacity(self.idents.len() + 6 + self.buffers.len());
        out.extend(self.idents);
        out.push(Bytes::from_static(DELIMITER));
        out.push(self.signature);
        out.push(self.header);
        out.push(self.parent);
        out.push(self.metadata);
        out.push(self.content);
        out.extend(self.buffers);
        out
    }

    /// Total size in bytes of the signed part and buffers.
    pub fn size(&self) -> usize {
        self.header.len()
            + self.parent.len()
            + self.metadata.len()
            + self.content.len()
            + self.buffers.iter().map(Bytes::len).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn splits_and_rejoins() {
        let frames = vec![
            b("id1"),
            b("id2"),
            b("<IDS|MSG>"),
            b("sig"),
            b("{}"),
            b("{}"),
            b("{}"),
            b("{}"),
            b("buf"),
        ];
        let raw = RawMessage::from_frames(frames.clone(), &Limits::default()).unwrap();
        assert_eq!(raw.idents.len(), 2);
        assert_eq!(raw.buffers, vec![b("buf")]);
        assert_eq!(raw.into_frames(), frames);
    }

    #[test]
    fn rejects_missing_delimiter_and_truncation() {
        let l = Limits::default();
        assert_eq!(
            RawMessage::from_frames(vec![b("a"), b("b")], &l),
            Err(FrameError::NoDelimiter { frames: 2 })
        );
        assert_eq!(
            RawMessage::from_frames(vec![b("<IDS|MSG>"), b("s"), b("{}")], &l),
            Err(FrameError::Truncated { have: 2 })
        );
    }

    #[test]
    fn rejects_oversized() {
        let l = Limits {
            max_json_frame: 4,
            max_total: 100,
            max_idents: 2,
        };
        let big = vec![
            b("<IDS|MSG>"),
            b("s"),
            b("{\"a\":1}"),
            b("{}"),
            b("{}"),
            b("{}"),
        ];
        assert!(matches!(
            RawMessage::from_frames(big, &l),
            Err(FrameError::Oversized { .. })
        ));
        let many = vec![b("a"), b("b"), b("c"), b("<IDS|MSG>")];
        assert!(matches!(
            RawMessage::from_frames(many, &l),
            Err(FrameError::TooManyIdents { .. })
        ));
    }
}
