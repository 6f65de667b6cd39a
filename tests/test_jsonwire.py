"""Reading MooncakeTransport's JSON control messages: an envelope that cannot be read
is MalformedMessage (the link is broken), a body travels exactly as it came, and
nothing else can come out of a message, whatever its bytes."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from resumekit.protocol.messages import (
    Cancel,
    Cancelled,
    Landed,
    RoundPost,
    SenderError,
    malformed_post,
    malformed_status,
)
from resumekit.transports.mooncake.jsonwire import (
    MAX_REASON_BYTES,
    MAX_RID_CHARS,
    VERSION,
    Hello,
    HelloRefused,
    MalformedMessage,
    cancel,
    cut_reason,
    dtype_name,
    hello,
    hi,
    key,
    post,
    read,
    refused,
    reply,
    status,
    wire_rid,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=12,
)
RID = (
    f"rid must be an int64 or a str of at most {MAX_RID_CHARS} characters over "
    "MooncakeTransport, not "
)
ENVELOPE = {"rid": "r1", "inc": 1, "epoch": 0}
LANDED = {"t": "landed", **ENVELOPE, "tokens": 8, "total": 24, "final": False}
POST = {
    "t": "post",
    **ENVELOPE,
    "sent": 0,
    "cap": 16,
    "expect": None,
    "blocks": [3, 4],
    "dst": [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]],
}


def decode(raw: bytes) -> Any:
    """What the receiver end's control thread makes of ``raw``."""
    message = read(raw)
    return "bye" if message["t"] in ("bye", "ping") else status(message)


def decode_post(m: dict[str, Any]) -> RoundPost | Cancel:
    """What the sender end's control thread makes of a post or a cancel."""
    return post(m)[0] if m["t"] == "post" else cancel(m)


@given(st.binary(max_size=64))
def test_any_bytes_are_a_message_or_malformed(raw: bytes) -> None:
    try:
        message = read(raw)
    except MalformedMessage:
        return
    assert type(message) is dict and type(message["t"]) is str


@given(st.dictionaries(st.sampled_from(sorted({*LANDED, *POST})), json_values), st.booleans())
def test_any_object_is_a_status_or_post_or_malformed(fields: dict[str, Any], poster: bool) -> None:
    """Whatever the fields hold: a message whose envelope is an int64-or-str rid and int
    inc and epoch, or MalformedMessage; never another exception."""
    fields.setdefault("t", "post" if poster else "landed")
    if poster and fields["t"] not in ("post", "cancel"):
        fields["t"] = "cancel"
    raw = json.dumps(fields).encode()
    try:
        m = read(raw)
        got = decode_post(m) if poster else status(m)
    except MalformedMessage:
        return
    assert type(got.rid) in (int, str)
    assert type(got.incarnation) is int and type(got.epoch) is int
    # The driver's own check then judges the body, as for any in-process message.
    (malformed_post if poster else malformed_status)(got)


@given(st.sampled_from(["tokens", "total", "final"]), json_values)
def test_a_landed_body_is_never_coerced(name: str, value: Any) -> None:
    got = status(read(json.dumps({**LANDED, name: value}).encode()))
    assert isinstance(got, Landed)
    assert json.dumps(getattr(got, name)) == json.dumps(value)  # same type and value, NaN too
    good = type(value) is bool if name == "final" else type(value) is int
    assert (malformed_status(got) is None) == good


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"[" * 100_000, "not JSON (RecursionError)"),
        (b"\xff\xfe", "not JSON (JSONDecodeError)"),
        (b"5", "not a JSON object with a kind 't'"),
        (b'{"t": 5}', "not a JSON object with a kind 't'"),
        (json.dumps({**LANDED, "rid": [1]}).encode(), f"'landed': {RID}[1]"),
        (json.dumps({**LANDED, "rid": 1.0}).encode(), f"'landed': {RID}1.0"),
        (json.dumps({**LANDED, "rid": 2**63}).encode(), f"'landed': {RID}{2**63}"),
        (json.dumps({**LANDED, "rid": -(2**63) - 1}).encode(), f"'landed': {RID}{-(2**63) - 1}"),
        (json.dumps({**LANDED, "rid": "x" * 1025}).encode(), f"'landed': {RID}'{'x' * 1025}'"),
        (json.dumps({**LANDED, "inc": True}).encode(), "'landed': inc and epoch must be ints"),
        (json.dumps({**LANDED, "epoch": 0.0}).encode(), "'landed': inc and epoch must be ints"),
        (json.dumps({"t": "landed", "rid": "r1", "inc": 1}).encode(), "'landed' without 'epoch'"),
        (json.dumps({**ENVELOPE, "t": "landed"}).encode(), "'landed' without 'tokens'"),
        (json.dumps({**ENVELOPE, "t": "error"}).encode(), "'error' without 'reason'"),
        (json.dumps({**LANDED, "t": "what"}).encode(), "unknown message 'what'"),
    ],
)
def test_an_unreadable_envelope_is_malformed(raw: bytes, why: str) -> None:
    with pytest.raises(MalformedMessage) as caught:
        decode(raw)
    assert str(caught.value) == why


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"tokens": 2.7}, "tokens and total must be ints"),
        ({"tokens": "8"}, "tokens and total must be ints"),
        ({"total": 1e999}, "tokens and total must be ints"),
        ({"final": "no"}, "final must be a bool"),
        ({"final": 0}, "final must be a bool"),
    ],
)
def test_a_bad_landed_body_reaches_the_receiver_as_it_came(
    fields: dict[str, Any], problem: str
) -> None:
    got = status(read(json.dumps({**LANDED, **fields}).encode()))
    assert malformed_status(got) == problem


def test_each_status_kind_reads_back_what_was_sent() -> None:
    assert decode(json.dumps(LANDED).encode()) == Landed("r1", 0, 8, 24, False, incarnation=1)
    assert decode(b'{"t":"cancelled","rid":7,"inc":2,"epoch":3}') == Cancelled(7, 3, incarnation=2)
    got = decode(json.dumps({**ENVELOPE, "t": "error", "reason": {"a": 1}}).encode())
    assert got == SenderError("r1", 0, {"a": 1}, incarnation=1)  # type: ignore[arg-type]
    assert malformed_status(got) == "reason is not a str"
    assert decode(b'{"t":"bye"}') == "bye"


def test_a_post_reads_back_with_its_addresses() -> None:
    got, dst = post(read(json.dumps({**POST, "expect": 16}).encode()))
    assert got == RoundPost("r1", 0, (3, 4), 16, 0, None, 16, incarnation=1)
    assert malformed_post(got) is None and dst == POST["dst"]
    assert cancel(read(b'{"t":"cancel","rid":"r1","inc":1,"epoch":3}')) == Cancel(
        "r1", 3, incarnation=1
    )


def test_the_extreme_request_ids_travel() -> None:
    for rid in (-(2**63), 2**63 - 1, "", "x" * MAX_RID_CHARS):
        assert wire_rid(rid) == rid
        assert key(read(json.dumps({**LANDED, "rid": rid}).encode()))[0] == rid


HELLO = {"t": "hello", "session": "10.0.0.2:7001", "hidden": 3584, "dtype": "bfloat16", "aux": 16}
AUX = "'hello': aux must be an int from 2 to 65536"


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"session": None}, "'hello' without 'session'"),
        ({"hidden": None}, "'hello' without 'hidden'"),
        ({"dtype": None}, "'hello' without 'dtype'"),
        ({"session": ""}, "'hello': session must be a non-empty str"),
        ({"session": 5}, "'hello': session must be a non-empty str"),
        ({"hidden": 0}, "'hello': hidden must be a positive int"),
        ({"hidden": True}, "'hello': hidden must be a positive int"),
        ({"hidden": 4.0}, "'hello': hidden must be a positive int"),
        ({"hidden": "4"}, "'hello': hidden must be a positive int"),
        ({"dtype": "int32"}, "'hello': dtype must name a floating torch dtype"),
        ({"dtype": "torch.bfloat16"}, "'hello': dtype must name a floating torch dtype"),
        ({"dtype": "__class__"}, "'hello': dtype must name a floating torch dtype"),
        ({"dtype": "nope"}, "'hello': dtype must name a floating torch dtype"),
        ({"dtype": 16}, "'hello': dtype must name a floating torch dtype"),
        ({"aux": None}, "'hello' without 'aux'"),
        ({"aux": 1}, AUX),
        ({"aux": 65537}, AUX),
        ({"aux": True}, AUX),
        ({"aux": 16.0}, AUX),
        ({"aux": "16"}, AUX),
    ],
)
def test_hello_names_where_rounds_go_and_what_a_token_is_there(
    change: dict[str, Any], why: str
) -> None:
    assert hello(read(json.dumps(HELLO).encode())) == Hello(
        "10.0.0.2:7001", 3584, torch.bfloat16, 16
    )
    assert hello(read(json.dumps({**HELLO, "hidden": 1}).encode())).hidden == 1
    for aux in (2, 65536):
        assert hello(read(json.dumps({**HELLO, "aux": aux}).encode())).aux == aux
    message = {k: v for k, v in {**HELLO, **change}.items() if v is not None}
    with pytest.raises(MalformedMessage) as caught:
        hello(read(json.dumps(message).encode()))
    assert str(caught.value) == why


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_a_dtype_travels_by_its_name(dtype: torch.dtype) -> None:
    assert hello({**HELLO, "dtype": dtype_name(dtype)}).dtype is dtype


MISMATCH = "the post's addresses do not match its blocks"
ROW = "each block needs 6 addresses, non-zero uint64s"


@pytest.mark.parametrize(
    ("dst", "why"),
    [
        (None, MISMATCH),
        ([[1, 2, 3, 4, 5, 6]], MISMATCH),  # one row for two blocks
        ([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11]], ROW),  # a row one address short
        ([[1, 2, 3, 4, 5, 6], 7], ROW),
        ([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, -1]], ROW),
        ([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 0]], ROW),  # a null address
        ([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 2**64]], ROW),
        ([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12.0]], ROW),
        ([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, True]], ROW),
    ],
)
def test_unusable_addresses_say_why_instead_of_failing_the_link(dst: Any, why: str) -> None:
    got, problem = post(read(json.dumps({**POST, "dst": dst}).encode()))
    assert malformed_post(got) is None  # the post itself is fine: its round is refused
    assert problem == why


def test_the_widest_addresses_are_usable() -> None:
    dst = [[1, 1, 1, 1, 1, 1], [2**64 - 1] * 6]
    assert post(read(json.dumps({**POST, "dst": dst}).encode()))[1] == dst


def test_bad_blocks_reach_the_sender_as_they_came() -> None:
    got, _ = post(read(json.dumps({**POST, "blocks": [3, "4"]}).encode()))
    assert malformed_post(got) == "blocks must be a tuple of ints"
    got, _ = post(read(json.dumps({**POST, "blocks": 5}).encode()))
    assert malformed_post(got) == "blocks must be a tuple of ints"
    assert key(read(json.dumps(POST).encode())) == ("r1", 1, 0)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b'{"t":"hi"}', "'hi' without 'to'"),
        (b'{"t":"hi","to":""}', "'hi': to must be a non-empty str"),
        (b'{"t":"hi","to":7001}', "'hi': to must be a non-empty str"),
    ],
)
def test_hi_names_the_session_the_sender_writes_to(raw: bytes, why: str) -> None:
    assert hi(read(b'{"t":"hi","to":"10.0.0.2:7001"}')) == "10.0.0.2:7001"
    with pytest.raises(MalformedMessage) as caught:
        hi(read(raw))
    assert str(caught.value) == why


# -- a hello the sender will not serve, and its answer ---------------------------------


def test_a_hello_of_another_version_is_refused_by_its_v_field() -> None:
    assert hello({**HELLO, "v": VERSION}).session == HELLO["session"]
    with pytest.raises(MalformedMessage, match=f"protocol version {VERSION + 1}; this sender"):
        hello({**HELLO, "v": VERSION + 1})
    with pytest.raises(MalformedMessage, match="v must be an int"):
        hello({**HELLO, "v": "1"})


def test_reply_is_where_the_hello_says_its_receiver_listens() -> None:
    assert reply({**HELLO, "reply": "10.0.0.2:7002"}) == "10.0.0.2:7002"
    assert reply(HELLO) is None
    assert reply({**HELLO, "reply": 7002}) is None


def test_a_refusal_reads_as_the_error_that_names_its_reason() -> None:
    error = refused({"t": "refused", "reason": "another version"})
    assert isinstance(error, HelloRefused)
    assert error.reason == "another version"
    assert str(error) == "the sender refused this receiver's hello: another version"
    with pytest.raises(MalformedMessage, match=r"^'refused' without 'reason'$"):
        refused({"t": "refused"})
    with pytest.raises(MalformedMessage, match=r"^'refused': reason must be a str$"):
        refused({"t": "refused", "reason": 5})


def test_a_reason_is_cut_to_whole_characters_and_never_empty() -> None:
    assert cut_reason("short") == "short"
    assert cut_reason("") == "?"
    long = "é" * MAX_REASON_BYTES  # two bytes each: the cut falls inside none
    assert cut_reason(long) == "é" * (MAX_REASON_BYTES // 2)
    odd = "a" + "é" * MAX_REASON_BYTES  # the cut falls inside a character: it is dropped
    cut = cut_reason(odd)
    assert cut == "a" + "é" * ((MAX_REASON_BYTES - 1) // 2)
    assert len(cut.encode()) <= MAX_REASON_BYTES
    assert refused({"t": "refused", "reason": odd}).reason == cut
