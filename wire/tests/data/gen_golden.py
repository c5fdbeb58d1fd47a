#!/usr/bin/env python3
"""Generate wire/tests/data/golden.json: signed multipart messages made by
jupyter_client's own `Session`, as ipyparallel peers put them on the wire.

Run from the repository root with the project's venv:

    .venv/bin/python wire/tests/data/gen_golden.py

The output is deterministic (fixed key, session id, msg_ids and dates), so
re-running it with the pinned jupyter_client gives the same file. Each capture
is stored as the hex of every frame, exactly as `Session.serialize` returns
them plus the buffers that `Session.send` appends, together with the values
Python's json module parses out of the JSON frames, for the Rust test
(wire/tests/golden.rs) to compare against.
"""

from __future__ import annotations

import json
import pathlib
import struct
from datetime import datetime, timezone

import jupyter_client
from jupyter_client.session import Session

KEY = b"parallax-golden-key"
SESSION_ID = "0b7c4a56-golden-client"
ENGINE_SESSION_ID = "5e1f3d2a-golden-engine"
HUB_SESSION_ID = "9a8b7c6d-golden-hub"
ENGINE_UUID = "4f0e8c1a-3b2d-4e5f-9a6b-7c8d9e0f1a2b"
# A zmq-generated ROUTER identity: 5 bytes, not UTF-8.
CLIENT_IDENT = b"\x00k\x8bEj"
ENGINE_IDENT = ENGINE_UUID.encode()
# Non-ASCII text: Latin-1 range, a BMP symbol, an astral-plane emoji, CJK.
UNICODE_TEXT = "h\u00e9llo w\u00f6rld \u2713 \U0001f680 \u5e76\u884c\n"

# Floats whose shortest repr needs 17 digits or a far exponent: a parser
# that is not correctly rounded (serde_json without float_roundtrip) gets
# some of them wrong by an ULP.
FLOATS = [
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

OUT = pathlib.Path(__file__).with_name("golden.json")


def date(second: int, micro: int) -> datetime:
    # Non-zero microseconds: isoformat() drops them when they are zero.
    return datetime(2026, 1, 2, 3, 4, second, micro, tzinfo=timezone.utc)


def session(session_id: str, username: str) -> Session:
    return Session(key=KEY, session=session_id, username=username)


def header(s: Session, msg_type: str, n: int, when: datetime) -> dict:
    h = s.msg_header(msg_type)
    # msg_header() numbers ids with os.getpid(); pin them for determinism.
    h["msg_id"] = f"{s.session}_4242_{n}"
    h["date"] = when
    return h


def capture(
    name: str,
    s: Session,
    msg_type: str,
    n: int,
    when: datetime,
    *,
    content: dict,
    idents: list[bytes],
    parent: dict | None = None,
    metadata: dict | None = None,
    buffers: list[bytes] | None = None,
) -> tuple[dict, dict]:
    msg = s.msg(
        msg_type,
        content=content,
        parent=parent,
        header=header(s, msg_type, n, when),
        metadata=metadata,
    )
    frames = s.serialize(msg, ident=idents) + list(buffers or [])
    # Python's own view of what is on the wire, for the Rust side to compare.
    _, rest = s.feed_identities(frames)
    check = Session(key=KEY).deserialize(rest)
    assert [bytes(b) for b in check["buffers"]] == list(buffers or [])
    delim = frames.index(b"<IDS|MSG>")
    record = {
        "name": name,
        "frames": [f.hex() for f in frames],
        "n_idents": delim,
        "n_buffers": len(buffers or []),
        "signature": frames[delim + 1].decode(),
        "msg_id": msg["header"]["msg_id"],
        "msg_type": msg_type,
        "header": json.loads(frames[delim + 2]),
        "parent_header": json.loads(frames[delim + 3]),
        "metadata": json.loads(frames[delim + 4]),
        "content": json.loads(frames[delim + 5]),
    }
    return record, msg


def main() -> None:
    client = session(SESSION_ID, "alice")
    engine = session(ENGINE_SESSION_ID, "engine")
    hub = session(HUB_SESSION_ID, "parallax")
    records = []

    # Engine -> hub registration, as the hub's ROUTER receives it: the engine's
    # DEALER identity is its uuid.
    rec, _ = capture(
        "registration_request",
        engine,
        "registration_request",
        0,
        date(1, 100001),
        content={"uuid": ENGINE_UUID, "id": 3},
        idents=[ENGINE_IDENT],
    )
    records.append(rec)

    # Hub -> engine reply, as the engine's DEALER receives it: no identities.
    rec, _ = capture(
        "registration_reply",
        hub,
        "registration_reply",
        0,
        date(1, 200002),
        content={"status": "ok", "id": 3, "hb_period": 3000},
        idents=[],
    )
    records.append(rec)

    # Client -> hub connection request from a zmq-assigned identity.
    rec, _ = capture(
        "connection_request",
        client,
        "connection_request",
        0,
        date(2, 300003),
        content={},
        idents=[CLIENT_IDENT],
    )
    records.append(rec)

    # Load-balanced apply_request with the scheduling metadata a
    # LoadBalancedView sends (Dependency.as_dict() and a bare id list), and
    # two binary buffers (canned pickle-like bytes, incl. NUL and 0xff).
    rec, _ = capture(
        "apply_request",
        client,
        "apply_request",
        1,
        date(3, 400004),
        content={},
        idents=[CLIENT_IDENT],
        metadata={
            "after": {
                "dependencies": [f"{SESSION_ID}_4242_7", f"{SESSION_ID}_4242_8"],
                "all": False,
                "success": True,
                "failure": True,
            },
            "follow": [f"{SESSION_ID}_4242_9"],
            "timeout": 2.5,
            "targets": [ENGINE_UUID],
            "retries": 2,
            "label": None,
        },
        buffers=[
            b"\x80\x05\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94.",
            bytes(range(256)) * 4 + b"\xff\x00",
        ],
    )
    records.append(rec)

    # execute_request as the task scheduler forwards it to an engine: engine
    # identity first, then the client's non-UTF-8 identity.
    rec, execute = capture(
        "execute_request",
        client,
        "execute_request",
        2,
        date(4, 500005),
        content={
            "code": "print('h\u00e9llo \u2713')",
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        },
        idents=[ENGINE_IDENT, CLIENT_IDENT],
    )
    records.append(rec)

    # IOPub stream output with ipyparallel's topic frame and non-ASCII text.
    rec, _ = capture(
        "stream",
        engine,
        "stream",
        1,
        date(5, 600006),
        content={"name": "stdout", "text": UNICODE_TEXT},
        idents=[b"engine.0.stdout"],
        parent=execute,
        metadata={"engine": ENGINE_UUID},
    )
    records.append(rec)

    # execute_reply with the parent header and ipyparallel's engine metadata,
    # as the hub's ROUTER receives it from the engine.
    rec, _ = capture(
        "execute_reply",
        engine,
        "execute_reply",
        2,
        date(6, 700007),
        content={
            "status": "ok",
            "execution_count": 1,
            "user_expressions": {},
            "payload": [],
        },
        idents=[ENGINE_IDENT, CLIENT_IDENT],
        parent=execute,
        metadata={
            "started": date(5, 1).isoformat().replace("+00:00", "Z"),
            "dependencies_met": True,
            "engine": ENGINE_UUID,
            "status": "ok",
            "is_broadcast": False,
            "is_coalescing": False,
        },
    )
    records.append(rec)

    # db_reply from the hub with records whose buffers travel as frames.
    db_request = client.msg(
        "db_request",
        content={"query": {"msg_id": {"$in": [f"{SESSION_ID}_4242_1"]}}, "keys": None},
        header=header(client, "db_request", 3, date(7, 800008)),
    )
    rec, _ = capture(
        "db_reply",
        hub,
        "db_reply",
        1,
        date(7, 900009),
        content={
            "status": "ok",
            "records": [
                {
                    "msg_id": f"{SESSION_ID}_4242_1",
                    "engine_uuid": ENGINE_UUID,
                    "submitted": date(3, 400004).isoformat().replace("+00:00", "Z"),
                    "completed": None,
                    "stdout": UNICODE_TEXT,
                    "result_content": None,
                }
            ],
            "buffer_lens": [2],
            "result_buffer_lens": [1],
        },
        idents=[CLIENT_IDENT],
        parent=db_request,
        buffers=[b"\x00\x01\x02", b"", b"result \xf0\x9f\x9a\x80 \xff"],
    )
    records.append(rec)

    # IOPub execute_result carrying floats; their exact IEEE bits are
    # recorded so the Rust side can check it parses them correctly rounded.
    rec, _ = capture(
        "execute_result",
        engine,
        "execute_result",
        3,
        date(8, 100010),
        content={
            "execution_count": 1,
            "data": {"text/plain": repr(FLOATS)},
            "metadata": {"values": FLOATS},
        },
        idents=[b"engine.0.execute_result"],
        parent=execute,
    )
    rec["float_bits"] = [struct.pack(">d", x).hex() for x in FLOATS]
    records.append(rec)

    doc = {
        "generator": "wire/tests/data/gen_golden.py",
        "jupyter_client": jupyter_client.__version__,
        "key": KEY.decode(),
        "messages": records,
    }
    OUT.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    print(f"wrote {len(records)} captures to {OUT}")


if __name__ == "__main__":
    main()
