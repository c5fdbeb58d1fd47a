"""jupyter_client reads what Parallax's wire layer writes.

wire/tests/data/rust_emitted.json holds messages built by the Rust
`Session::serialize` (the Rust test `serializer_fixture_is_current` in
wire/tests/golden.rs keeps the committed file equal to the serializer's
current output). Here jupyter_client's own `Session` splits, verifies and
unpacks the same frames, so this test needs no cargo and no running binary.
The other direction (Rust reading jupyter_client's frames) is
wire/tests/golden.rs with data from wire/tests/data/gen_golden.py.
"""

from __future__ import annotations

import json
import pathlib
import struct
from datetime import datetime, timezone

import pytest
from jupyter_client.session import Session

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "wire" / "tests" / "data" / "rust_emitted.json"
DOC = json.loads(FIXTURE.read_text())
KEY = DOC["key"].encode()
MESSAGES = DOC["messages"]


def frames_of(m: dict) -> list[bytes]:
    return [bytes.fromhex(f) for f in m["frames"]]


def parse_date(s: str) -> datetime:
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


def test_fixture_has_messages():
    names = {m["name"] for m in MESSAGES}
    assert {"registration_reply", "connection_reply", "apply_reply", "stream", "db_reply"} <= names


@pytest.mark.parametrize("m", MESSAGES, ids=[m["name"] for m in MESSAGES])
def test_jupyter_client_deserializes_rust_frames(m):
    session = Session(key=KEY)
    idents, rest = session.feed_identities(frames_of(m))
    assert len(idents) == m["n_idents"]

    # jupyter_client computes the same HMAC over our JSON bytes.
    assert session.sign(rest[1:5]) == rest[0]

    msg = session.deserialize(rest)
    assert msg["msg_id"] == m["header"]["msg_id"]
    assert msg["msg_type"] == m["name"]
    assert msg["content"] == m["content"]
    assert msg["metadata"] == m["metadata"]

    # Our dates are recognised by jupyter_client's date parsing. (Importing
    # ipyparallel switches Session's automatic date extraction off for the
    # whole process, so parse explicitly when an earlier test did that.)
    header = msg["header"]
    date = header["date"]
    if isinstance(date, str):
        date = parse_date(date)
    assert isinstance(date, datetime)
    assert date == parse_date(m["header"]["date"])
    assert header["version"] == "5.4"
    assert header["session"] == m["header"]["session"]
    assert header["username"] == "parallax"
    if m["parent_header"]:
        parent = msg["parent_header"]
        assert parent["msg_id"] == m["parent_header"]["msg_id"]
        pdate = parent["date"]
        assert isinstance(pdate if not isinstance(pdate, str) else parse_date(pdate), datetime)
    else:
        assert msg["parent_header"] == {}

    n = m["n_idents"]
    assert [bytes(b) for b in msg["buffers"]] == frames_of(m)[n + 6 :]

    # The same frames again are a replay for jupyter_client too.
    with pytest.raises(ValueError, match="Duplicate Signature"):
        session.deserialize(rest)


@pytest.mark.parametrize("m", MESSAGES, ids=[m["name"] for m in MESSAGES])
def test_jupyter_client_rejects_with_wrong_key(m):
    session = Session(key=KEY + b"-wrong")
    _, rest = session.feed_identities(frames_of(m))
    with pytest.raises(ValueError, match="Invalid Signature"):
        session.deserialize(rest)


def test_specific_contents():
    by_name = {m["name"]: m for m in MESSAGES}
    session = Session(key=KEY)

    def load(name):
        idents, rest = session.feed_identities(frames_of(by_name[name]))
        return idents, session.deserialize(rest)

    idents, msg = load("connection_reply")
    assert idents == [b"\x00k\x8bEj"]

    idents, msg = load("stream")
    assert idents == [b"engine.3.stdout"]
    assert msg["content"]["text"] == "h\u00e9llo w\u00f6rld \u2713 \U0001f680 \u5e76\u884c\n"

    _, msg = load("apply_reply")
    content = msg["content"]
    assert content["status"] == "error"
    assert content["ename"] == "ImpossibleDependency"
    assert "\U0001f680" in content["evalue"]
    assert content["engine_info"]["engine_id"] == 3

    _, msg = load("db_reply")
    assert [bytes(b) for b in msg["buffers"]] == [b"\x00\xff\x80", b"", b"<IDS|MSG>"]
    # Floats that went Python -> Rust (golden execute_result) -> Python keep
    # their exact bits, including -0.0 and the subnormal.
    floats = msg["content"]["records"][0]["floats"]
    expected = [
        0.30000000000000004,
        1767323045.1234567,
        1.3436424411240121e-09,
        223221110.21323866,
        4161799.3889434612,
        9.522444552911937e-11,
        5e-324,
        1.7976931348623157e308,
        -0.0,
        2.5,
    ]
    assert [struct.pack(">d", x) for x in floats] == [struct.pack(">d", x) for x in expected]
