//! The wire layer of Parallax: Jupyter/ipyparallel multipart messages with no I/O.
//!
//! * [`frames`] splits `[idents…, <IDS|MSG>, signature, header, parent, metadata,
//!   content, buffers…]` into a [`RawMessage`] without parsing any JSON.
//! * [`sign`] computes and verifies the HMAC-SHA256 signature over the four JSON
//!   frames (constant-time compare) and rejects replays with a bounded digest
//!   history, like jupyter_client's `Session`.
//! * [`message`] turns authenticated raw frames into typed headers and JSON
//!   values, and builds signed outgoing messages ([`Session`]).
//! * [`content`] has typed contents for the messages the hub handles.
//! * [`connection`] has ipyparallel's connection-file formats.
//!
//! Architecture invariant: nothing here does I/O or reads a clock; dates are
//! passed in by the caller.

pub mod connection;
pub mod content;
pub mod frames;
pub mod message;
pub mod sign;

pub use frames::{DELIMITER, FrameError, Limits, RawMessage};
pub use message::{DecodeError, Header, Message, Session, format_date};
pub use sign::{AuthError, Authenticator, DigestHistory, Signer};
