"""The internal links' batch frames (flowshard.codec.BatchWriter / BatchReader): every message arrives
once, in order, however the stream is cut into reads; a bad stream is an error, never a silent loss."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowshard.codec import (
    BATCH_MESSAGES,
    BatchReader,
    BatchWriter,
    Done,
    Enqueue,
    FrameError,
    FromWorker,
    Grant,
    GrantBack,
    ToWorker,
)

_enqueue = st.builds(
    Enqueue,
    id=st.integers(0, 2**62),
    flow=st.text(max_size=20),
    slot=st.integers(0, 1000),
    priority=st.integers(-(2**31), 2**31),
    size=st.integers(0, 2**40),
    ttl=st.floats(0, 1e6),
    slo=st.floats(0, 1e6),
    tokens=st.integers(0, 2**31),
    weight=st.floats(0, 1e3),
    arrived=st.floats(0, 1e9),
)
_grant = st.builds(Grant, band=st.integers(0, 7), max_bytes=st.integers(-1, 2**40), saturation=st.floats(0, 2),
                   count=st.integers(1, 100))


@settings(max_examples=200, deadline=None)
@given(passes=st.lists(st.lists(st.one_of(_enqueue, _grant), max_size=30), max_size=8), cuts=st.data())
def test_every_message_arrives_once_in_order_however_the_reads_are_cut(
    passes: list[list[object]], cuts: st.DataObject
) -> None:
    writer, reader = BatchWriter(), BatchReader(ToWorker)
    stream = b""
    for messages in passes:
        for m in messages:
            writer.add(m)
        assert len(writer) == len(messages)
        stream += writer.take()
        assert not writer and writer.take() == b""
    got: list[object] = []
    pos = 0
    while pos < len(stream):
        step = cuts.draw(st.integers(1, max(1, len(stream) - pos)))
        got += reader.feed(stream[pos : pos + step])
        pos += step
    assert got == [m for messages in passes for m in messages]
    assert reader.pending == 0


def test_a_big_pass_is_cut_into_bounded_frames() -> None:
    writer = BatchWriter()
    messages = [Done(i, 0, 0.0, 0.0, 0) for i in range(2 * BATCH_MESSAGES + 5)]
    for m in messages:
        writer.add(m)
    data = writer.take()
    frames, pos = [], 0
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 4], "big")
        frames.append(msgspec.msgpack.decode(data[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    assert [len(f) for f in frames] == [BATCH_MESSAGES, BATCH_MESSAGES, 5]
    assert BatchReader(FromWorker).feed(data) == messages


def test_a_message_that_cannot_be_encoded_loses_only_itself() -> None:
    dropped: list[object] = []
    writer = BatchWriter(on_drop=lambda message, exc: dropped.append(message))
    for m in (GrantBack(0, 1), GrantBack(0, 2**70), GrantBack(1, 3)):  # 2**70: no msgpack integer holds it
        writer.add(m)
    data = writer.take()
    assert BatchReader(FromWorker).feed(data) == [GrantBack(0, 1), GrantBack(1, 3)]
    assert dropped == [GrantBack(0, 2**70)] and writer.dropped == 1


@pytest.mark.parametrize(
    "stream, problem",
    [
        (b"\x00\x00\x00\x03\x93\x01\x02", "malformed batch frame"),  # truncated array inside a frame
        (b"\x00\x00\x00\x02\x91\xc1", "malformed batch frame"),  # 0xc1 is never valid msgpack
        (b"\x00\x00\x00\x03\x91\x91\x63", "malformed batch frame"),  # tag 99: no such message
        (b"\x7f\xff\xff\xff", "exceeds"),  # a length past the bound
    ],
)
def test_a_malformed_stream_is_an_error(stream: bytes, problem: str) -> None:
    reader = BatchReader(ToWorker, max_frame=1 << 20)
    with pytest.raises(FrameError, match=problem):
        reader.feed(stream)
