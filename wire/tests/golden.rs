//! Golden tests against jupyter_client.
//!
//! * `data/golden.json` holds signed multipart messages made by jupyter_client
//!   8.10's own `Session` (generator: `data/gen_golden.py`). Every capture must
//!   split, authenticate with the same key (and not with another), decode to
//!   the values Python's json module parsed from the same frames, re-sign to
//!   the identical signature and rejoin byte for byte.
//! * `data/rust_emitted.json` is the other direction: messages built by our
//!   `Session::serialize`. `serializer_fixture_is_current` checks that the
//!   committed file is what the serializer produces now (rewrite it with
//!   `UPDATE_EXPECT=1 cargo test -p parallax-wire --test golden`), and
//!   `tests/wire/test_wire_interop.py` feeds the same frames to
//!   jupyter_client's `Session.deserialize`, so no test needs to run cargo
//!   from Python.

use std::path::PathBuf;

use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use parallax_wire::content::{
    DbRequest, Dependency, ErrorContent, RegistrationRequest, TaskMetadata,
};
use parallax_wire::{
    AuthError, Authenticator, DELIMITER, Limits, Message, RawMessage, Session, Signer, format_date,
};
use serde_json::{Value, json};

const KEY: &[u8] = b"parallax-golden-key";
const CLIENT_IDENT: &[u8] = b"\x00k\x8bEj";
const ENGINE_UUID: &str = "4f0e8c1a-3b2d-4e5f-9a6b-7c8d9e0f1a2b";
const UNICODE_TEXT: &str = "héllo wörld ✓ 🚀 并行\n";

struct Capture {
    name: String,
    frames: Vec<Bytes>,
    n_idents: usize,
    n_buffers: usize,
    signature: String,
    msg_id: String,
    msg_type: String,
    header: Value,
    parent_header: Value,
    metadata: Value,
    content: Value,
}

fn hex_frames(v: &Value) -> Vec<Bytes> {
    v.as_array()
        .expect("frames is a list")
        .iter()
        .map(|f| Bytes::from(hex::decode(f.as_str().expect("hex string")).expect("valid hex")))
        .collect()
}

fn captures() -> Vec<Capture> {
    let doc: Value = serde_json::from_str(include_str!("data/golden.json")).unwrap();
    assert_eq!(doc["key"].as_str().unwrap().as_bytes(), KEY);
    doc["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| Capture {
            name: m["name"].as_str().unwrap().to_owned(),
            frames: hex_frames(&m["frames"]),
            n_idents: m["n_idents"].as_u64().unwrap() as usize,
            n_buffers: m["n_buffers"].as_u64().unwrap() as usize,
            signature: m["signature"].as_str().unwrap().to_owned(),
            msg_id: m["msg_id"].as_str().unwrap().to_owned(),
            msg_type: m["msg_type"].as_str().unwrap().to_owned(),
            header: m["header"].clone(),
            parent_header: m["parent_header"].clone(),
            metadata: m["metadata"].clone(),
            content: m["content"].clone(),
        })
        .collect()
}

fn capture(name: &str) -> Capture {
    captures()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no capture named {name}"))
}

fn split(frames: &[Bytes]) -> RawMessage {
    RawMessage::from_frames(frames.to_vec(), &Limits::default()).unwrap()
}

/// Split, authenticate and decode a capture.
fn decode(c: &Capture) -> Message {
    let raw = split(&c.frames);
    Authenticator::new(Signer::new(KEY)).check(&raw).unwrap();
    Message::decode(&raw).unwrap()
}

#[test]
fn golden_file_covers_the_expected_kinds() {
    let names: Vec<String> = captures().into_iter().map(|c| c.name).collect();
    for want in [
        "registration_request",
        "registration_reply",
        "connection_request",
        "apply_request",
        "execute_request",
        "stream",
        "execute_reply",
        "db_reply",
        "execute_result",
    ] {
        assert!(names.iter().any(|n| n == want), "missing capture {want}");
    }
}

#[test]
fn every_capture_splits_authenticates_decodes_and_rejoins() {
    for c in captures() {
        let ctx = &c.name;
        let raw = split(&c.frames);
        assert_eq!(raw.idents.len(), c.n_idents, "{ctx}: idents");
        assert_eq!(raw.buffers.len(), c.n_buffers, "{ctx}: buffers");
        assert_eq!(raw.signature.as_ref(), c.signature.as_bytes(), "{ctx}");
        assert_eq!(c.frames[c.n_idents].as_ref(), DELIMITER, "{ctx}");
        let json_frames = &c.frames[c.n_idents + 2..c.n_idents + 6];
        assert_eq!(raw.header, json_frames[0], "{ctx}");
        assert_eq!(raw.parent, json_frames[1], "{ctx}");
        assert_eq!(raw.metadata, json_frames[2], "{ctx}");
        assert_eq!(raw.content, json_frames[3], "{ctx}");
        assert_eq!(
            raw.size(),
            c.frames[c.n_idents + 2..]
                .iter()
                .map(Bytes::len)
                .sum::<usize>(),
            "{ctx}: size"
        );

        // Same key: accepted once, then rejected as a replay.
        let mut auth = Authenticator::new(Signer::new(KEY));
        assert_eq!(auth.check(&raw), Ok(()), "{ctx}");
        assert_eq!(auth.check(&raw), Err(AuthError::Duplicate), "{ctx}");
        // Other keys: rejected, and a rejected message is not remembered.
        for wrong in [&b"parallax-golden-kez"[..], b"x", b"parallax-golden-key "] {
            let mut other = Authenticator::new(Signer::new(wrong));
            assert_eq!(other.check(&raw), Err(AuthError::InvalidSignature), "{ctx}");
            assert_eq!(other.check(&raw), Err(AuthError::InvalidSignature), "{ctx}");
        }

        // Re-signing the raw JSON frames gives Python's signature.
        let signer = Signer::new(KEY);
        assert_eq!(
            signer.sign(&raw.header, &raw.parent, &raw.metadata, &raw.content),
            c.signature,
            "{ctx}: signature"
        );

        // Our outgoing path, fed the same encoded frames, is byte-identical.
        let session = Session::new(signer, "unused".into(), "unused".into(), 1);
        let resent = session.serialize_frames(
            raw.idents.clone(),
            raw.header.clone(),
            raw.parent.clone(),
            raw.metadata.clone(),
            raw.content.clone(),
            raw.buffers.clone(),
        );
        assert_eq!(resent, c.frames, "{ctx}: serialize_frames");

        // Decoded values equal what Python's json module parsed.
        let msg = Message::decode(&raw).unwrap();
        assert_eq!(msg.msg_id(), c.msg_id, "{ctx}");
        assert_eq!(msg.msg_type(), c.msg_type, "{ctx}");
        assert_eq!(
            serde_json::to_value(&msg.header).unwrap(),
            c.header,
            "{ctx}"
        );
        assert!(msg.header.extra.is_empty(), "{ctx}: {:?}", msg.header.extra);
        // jupyter_client 8.10 speaks protocol 5.4, and so do our headers.
        let ours = Session::new(Signer::new(KEY), "s".into(), "u".into(), 1).header("t", "d");
        assert_eq!(msg.header.version, ours.version, "{ctx}: protocol version");
        assert_eq!(msg.parent_header, c.parent_header, "{ctx}");
        assert_eq!(Value::Object(msg.metadata.clone()), c.metadata, "{ctx}");
        assert_eq!(msg.content, c.content, "{ctx}");
        assert_eq!(msg.idents, c.frames[..c.n_idents], "{ctx}");
        assert_eq!(msg.buffers, c.frames[c.n_idents + 6..], "{ctx}");

        // jupyter_client's dates are what format_date writes.
        let date = DateTime::parse_from_rfc3339(&msg.header.date)
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(format_date(date), msg.header.date, "{ctx}: date");

        // And the frames come back out byte for byte.
        assert_eq!(raw.into_frames(), c.frames, "{ctx}: into_frames");
    }
}

#[test]
fn tampering_is_detected() {
    for c in captures() {
        let ctx = &c.name;
        let json_at = c.n_idents + 2;
        for i in json_at..json_at + 4 {
            let mut frames = c.frames.clone();
            let mut f = frames[i].to_vec();
            let last = f.len() - 1;
            f[last] ^= 0x01;
            frames[i] = Bytes::from(f);
            let mut auth = Authenticator::new(Signer::new(KEY));
            assert_eq!(
                auth.check(&split(&frames)),
                Err(AuthError::InvalidSignature),
                "{ctx}: frame {i}"
            );
        }
        // A signature with one flipped hex digit, an uppercase one, and none.
        let sig_at = c.n_idents + 1;
        let mut frames = c.frames.clone();
        let mut sig = frames[sig_at].to_vec();
        sig[0] = if sig[0] == b'0' { b'1' } else { b'0' };
        frames[sig_at] = Bytes::from(sig);
        let mut auth = Authenticator::new(Signer::new(KEY));
        assert_eq!(
            auth.check(&split(&frames)),
            Err(AuthError::InvalidSignature)
        );
        frames[sig_at] = Bytes::new();
        assert_eq!(auth.check(&split(&frames)), Err(AuthError::Unsigned));
        // The failures above recorded nothing: the genuine message still passes.
        assert_eq!(auth.check(&split(&c.frames)), Ok(()), "{ctx}");
        // Buffers are not signed (as in jupyter_client): changing them passes.
        if c.n_buffers > 0 {
            let mut frames = c.frames.clone();
            let last = frames.len() - 1;
            frames[last] = Bytes::from_static(b"swapped");
            let mut auth = Authenticator::new(Signer::new(KEY));
            assert_eq!(auth.check(&split(&frames)), Ok(()), "{ctx}");
        }
    }
}

#[test]
fn registration_request_fields() {
    let c = capture("registration_request");
    let m = decode(&c);
    assert_eq!(m.idents, vec![Bytes::from_static(ENGINE_UUID.as_bytes())]);
    assert_eq!(m.header.username, "engine");
    assert_eq!(m.header.session, "5e1f3d2a-golden-engine");
    assert_eq!(m.header.date, "2026-01-02T03:04:01.100001Z");
    assert_eq!(m.parent_msg_id(), None);
    let req: RegistrationRequest = serde_json::from_value(m.content).unwrap();
    assert_eq!(req.uuid, ENGINE_UUID);
    assert_eq!(req.id, Some(3));
}

#[test]
fn registration_reply_has_no_idents() {
    let m = decode(&capture("registration_reply"));
    assert!(m.idents.is_empty());
    assert_eq!(m.content["hb_period"], 3000);
}

#[test]
fn connection_request_keeps_binary_identity() {
    let c = capture("connection_request");
    assert_eq!(c.frames[0].as_ref(), CLIENT_IDENT);
    assert!(std::str::from_utf8(&c.frames[0]).is_err());
    let m = decode(&c);
    assert_eq!(m.idents, vec![Bytes::from_static(CLIENT_IDENT)]);
    assert_eq!(m.msg_type(), "connection_request");
    assert_eq!(m.content, json!({}));
    assert!(m.metadata.is_empty());
}

#[test]
fn apply_request_metadata_and_buffers() {
    let m = decode(&capture("apply_request"));
    let t = TaskMetadata::from_metadata(&m.metadata).unwrap();
    assert_eq!(t.targets, vec![ENGINE_UUID]);
    assert_eq!(t.retries, 2);
    assert_eq!(t.timeout, Some(2.5));
    assert_eq!(
        t.after,
        Dependency {
            ids: vec![
                "0b7c4a56-golden-client_4242_7".into(),
                "0b7c4a56-golden-client_4242_8".into()
            ],
            all: false,
            success: true,
            failure: true,
        }
    );
    assert_eq!(t.follow.ids, vec!["0b7c4a56-golden-client_4242_9"]);
    assert!(t.follow.all && t.follow.success && !t.follow.failure);
    assert_eq!(m.metadata["label"], Value::Null);
    assert_eq!(m.buffers.len(), 2);
    assert_eq!(
        m.buffers[0].as_ref(),
        b"\x80\x05\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94."
    );
    let mut big: Vec<u8> = (0..=255u8).cycle().take(1024).collect();
    big.extend_from_slice(b"\xff\x00");
    assert_eq!(m.buffers[1].as_ref(), &big[..]);
}

#[test]
fn execute_request_idents_and_unicode_code() {
    let m = decode(&capture("execute_request"));
    assert_eq!(
        m.idents,
        vec![
            Bytes::from_static(ENGINE_UUID.as_bytes()),
            Bytes::from_static(CLIENT_IDENT)
        ]
    );
    assert_eq!(m.content["code"], "print('héllo ✓')");
    assert_eq!(m.content["silent"], false);
    assert_eq!(m.content["stop_on_error"], true);
}

#[test]
fn stream_topic_and_text() {
    let c = capture("stream");
    // jupyter_client writes non-ASCII text as raw UTF-8 (ensure_ascii=False).
    let content = &c.frames[c.n_idents + 5];
    assert!(content.windows("🚀".len()).any(|w| w == "🚀".as_bytes()));
    let m = decode(&c);
    assert_eq!(m.idents, vec![Bytes::from_static(b"engine.0.stdout")]);
    assert_eq!(m.content["name"], "stdout");
    assert_eq!(m.content["text"], UNICODE_TEXT);
    assert_eq!(m.parent_msg_id(), Some("0b7c4a56-golden-client_4242_2"));
    assert_eq!(m.parent_header["msg_type"], "execute_request");
    assert_eq!(m.metadata["engine"], ENGINE_UUID);
}

#[test]
fn execute_reply_parent_and_metadata() {
    let request = decode(&capture("execute_request"));
    let m = decode(&capture("execute_reply"));
    assert_eq!(m.parent_msg_id(), Some(request.msg_id()));
    assert_eq!(
        m.parent_header,
        serde_json::to_value(&request.header).unwrap()
    );
    assert_eq!(m.metadata["dependencies_met"], true);
    assert_eq!(m.metadata["started"], "2026-01-02T03:04:05.000001Z");
    assert_eq!(m.content["status"], "ok");
    assert_eq!(m.content["execution_count"], 1);
}

#[test]
fn db_reply_records_and_buffers() {
    let m = decode(&capture("db_reply"));
    assert_eq!(m.parent_header["msg_type"], "db_request");
    assert_eq!(m.content["buffer_lens"], json!([2]));
    assert_eq!(m.content["result_buffer_lens"], json!([1]));
    let rec = &m.content["records"][0];
    assert_eq!(rec["stdout"], UNICODE_TEXT);
    assert_eq!(rec["completed"], Value::Null);
    assert_eq!(
        m.buffers,
        vec![
            Bytes::from_static(b"\x00\x01\x02"),
            Bytes::new(),
            Bytes::from_static(b"result \xf0\x9f\x9a\x80 \xff"),
        ]
    );
    // The db_request it answers, as sent, parses as our typed request.
    let q: DbRequest =
        serde_json::from_value(json!({"query": {"msg_id": {"$in": ["a"]}}, "keys": null})).unwrap();
    assert!(q.keys.is_none());
}

/// Python writes floats with `repr` (shortest round-trip form, often 17
/// digits); we must parse them to the same bits, and write them back so that
/// they parse to the same bits again. serde_json's default float parser is
/// off by an ULP for about one in seven such values; wire enables its
/// `float_roundtrip` feature.
#[test]
fn execute_result_floats_parse_exactly() {
    let doc: Value = serde_json::from_str(include_str!("data/golden.json")).unwrap();
    let rec = doc["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "execute_result")
        .unwrap();
    let want: Vec<u64> = rec["float_bits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| u64::from_str_radix(b.as_str().unwrap(), 16).unwrap())
        .collect();
    let m = decode(&capture("execute_result"));
    assert_eq!(
        m.idents,
        vec![Bytes::from_static(b"engine.0.execute_result")]
    );
    let got: Vec<u64> = m.content["metadata"]["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap().to_bits())
        .collect();
    assert_eq!(got, want);
    // And through our serializer and back.
    let text = serde_json::to_vec(&m.content).unwrap();
    let again: Value = serde_json::from_slice(&text).unwrap();
    let got: Vec<u64> = again["metadata"]["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap().to_bits())
        .collect();
    assert_eq!(got, want);
}

// ---------------------------------------------------------------------------
// The other direction: what our serializer emits, for jupyter_client to read.
// ---------------------------------------------------------------------------

fn fixed_date(second: u32, micros: u32) -> String {
    let t = Utc
        .with_ymd_and_hms(2026, 1, 2, 3, 5, second)
        .unwrap()
        .checked_add_signed(chrono::Duration::microseconds(micros.into()))
        .unwrap();
    format_date(t)
}

struct Emitted {
    name: &'static str,
    frames: Vec<Bytes>,
    n_idents: usize,
    header: Value,
    parent_header: Value,
    metadata: Value,
    content: Value,
}

fn emit() -> Vec<Emitted> {
    let mut session = Session::new(
        Signer::new(KEY),
        "c0ffee00-golden-parallax".into(),
        "parallax".into(),
        4242,
    );
    let registration = decode(&capture("registration_request"));
    let apply = decode(&capture("apply_request"));
    let execute = decode(&capture("execute_request"));
    // Python's floats from the golden execute_result, written back by us.
    let floats = decode(&capture("execute_result")).content["metadata"]["values"].clone();
    let mut out = Vec::new();
    let mut push = |session: &mut Session,
                    name: &'static str,
                    idents: Vec<Bytes>,
                    second: u32,
                    parent: Value,
                    metadata: Value,
                    content: Value,
                    buffers: Vec<Bytes>| {
        let header = session.header(name, &fixed_date(second, 123_456 + second));
        let n_idents = idents.len();
        let frames = session.serialize(idents, &header, &parent, &metadata, &content, buffers);
        out.push(Emitted {
            name,
            frames,
            n_idents,
            header: serde_json::to_value(&header).unwrap(),
            parent_header: parent,
            metadata,
            content,
        });
    };
    push(
        &mut session,
        "registration_reply",
        registration.idents.clone(),
        1,
        serde_json::to_value(&registration.header).unwrap(),
        json!({}),
        json!({"status": "ok", "id": 3, "hb_period": 3000}),
        vec![],
    );
    push(
        &mut session,
        "connection_reply",
        vec![Bytes::from_static(CLIENT_IDENT)],
        2,
        json!({}),
        json!({}),
        json!({"status": "ok", "engines": {"3": ENGINE_UUID}}),
        vec![],
    );
    // A hub-made error reply to the apply_request (e.g. an unmet dependency).
    push(
        &mut session,
        "apply_reply",
        vec![Bytes::from_static(CLIENT_IDENT)],
        3,
        serde_json::to_value(&apply.header).unwrap(),
        json!({"status": "error", "dependencies_met": false, "engine": ENGINE_UUID,
               "started": null, "completed": fixed_date(3, 7)}),
        ErrorContent::new("ImpossibleDependency", "cannot run \"f\" ✓ 🚀")
            .with_engine_info(ENGINE_UUID, Some(3), "apply")
            .to_value(),
        vec![],
    );
    // IOPub output relayed with its topic frame and non-ASCII text.
    push(
        &mut session,
        "stream",
        vec![Bytes::from_static(b"engine.3.stdout")],
        4,
        serde_json::to_value(&execute.header).unwrap(),
        json!({"engine": ENGINE_UUID}),
        json!({"name": "stdout", "text": UNICODE_TEXT}),
        vec![],
    );
    // A reply carrying binary buffers, one of them empty.
    push(
        &mut session,
        "db_reply",
        vec![Bytes::from_static(CLIENT_IDENT)],
        5,
        json!({}),
        json!({}),
        json!({"status": "ok", "records": [{"msg_id": apply.msg_id(), "stdout": UNICODE_TEXT,
               "completed": null, "floats": floats}], "buffer_lens": [2],
               "result_buffer_lens": [1]}),
        vec![
            Bytes::from_static(b"\x00\xff\x80"),
            Bytes::new(),
            Bytes::from_static(b"<IDS|MSG>"),
        ],
    );
    out
}

fn emitted_doc() -> Value {
    let messages: Vec<Value> = emit()
        .into_iter()
        .map(|e| {
            json!({
                "name": e.name,
                "frames": e.frames.iter().map(hex::encode).collect::<Vec<_>>(),
                "n_idents": e.n_idents,
                "header": e.header,
                "parent_header": e.parent_header,
                "metadata": e.metadata,
                "content": e.content,
            })
        })
        .collect();
    json!({
        "generator": "wire/tests/golden.rs (UPDATE_EXPECT=1 cargo test -p parallax-wire --test golden)",
        "reader": "tests/wire/test_wire_interop.py",
        "key": std::str::from_utf8(KEY).unwrap(),
        "messages": messages,
    })
}

fn emitted_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/rust_emitted.json")
}

#[test]
fn emitted_messages_round_trip_through_our_decoder() {
    for e in emit() {
        let raw = split(&e.frames);
        let mut auth = Authenticator::new(Signer::new(KEY));
        assert_eq!(auth.check(&raw), Ok(()), "{}", e.name);
        let m = Message::decode(&raw).unwrap();
        assert_eq!(m.idents.len(), e.n_idents);
        assert_eq!(serde_json::to_value(&m.header).unwrap(), e.header);
        assert_eq!(m.parent_header, e.parent_header);
        assert_eq!(Value::Object(m.metadata), e.metadata);
        assert_eq!(m.content, e.content);
        // A buffer that looks like the delimiter stays a buffer.
        if e.name == "db_reply" {
            assert_eq!(m.buffers.len(), 3);
            assert_eq!(m.buffers[2].as_ref(), DELIMITER);
        }
    }
}

/// The committed `rust_emitted.json` must describe what `Session::serialize`
/// produces now, so that the Python interop test reads current output.
/// Idents and buffers are compared byte for byte, the JSON frames as parsed
/// values (their key order may follow serde_json's features), and every
/// committed signature must verify against the committed frames.
#[test]
fn serializer_fixture_is_current() {
    let doc = emitted_doc();
    let path = emitted_path();
    if std::env::var_os("UPDATE_EXPECT").is_some() {
        let text = serde_json::to_string_pretty(&doc).unwrap() + "\n";
        std::fs::write(&path, text).unwrap();
        return;
    }
    let committed: Value = serde_json::from_str(
        &std::fs::read_to_string(&path).expect("rust_emitted.json is committed"),
    )
    .unwrap();
    let hint = "stale tests/data/rust_emitted.json: rerun with UPDATE_EXPECT=1 and \
                then run tests/wire/test_wire_interop.py";
    let want = doc["messages"].as_array().unwrap();
    let have = committed["messages"].as_array().unwrap();
    assert_eq!(want.len(), have.len(), "{hint}");
    for (w, h) in want.iter().zip(have) {
        let name = w["name"].as_str().unwrap();
        assert_eq!(w["name"], h["name"], "{hint}");
        for key in ["n_idents", "header", "parent_header", "metadata", "content"] {
            assert_eq!(w[key], h[key], "{hint}: {name}.{key}");
        }
        let wf = hex_frames(&w["frames"]);
        let hf = hex_frames(&h["frames"]);
        assert_eq!(wf.len(), hf.len(), "{hint}: {name}");
        let n = w["n_idents"].as_u64().unwrap() as usize;
        assert_eq!(wf[..=n], hf[..=n], "{hint}: {name} idents");
        assert_eq!(wf[n + 6..], hf[n + 6..], "{hint}: {name} buffers");
        for i in n + 2..n + 6 {
            let a: Value = serde_json::from_slice(&wf[i]).unwrap();
            let b: Value = serde_json::from_slice(&hf[i]).unwrap();
            assert_eq!(a, b, "{hint}: {name} frame {i}");
        }
        let raw = split(&hf);
        assert_eq!(
            Authenticator::new(Signer::new(KEY)).check(&raw),
            Ok(()),
            "{hint}: {name} signature"
        );
    }
}
