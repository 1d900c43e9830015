"""Shared-memory statistics layout (DESIGN.md §5): int64 counters laid over one buffer.

Pure core: this module never creates a segment or touches the OS. The distributor creates the
``SharedMemory`` segment and hands its ``buf`` here; tests hand a ``bytearray``.

Writers: shard ``n`` is writer ``n`` (0..N-1), the distributor is writer ``N``. Every cell has exactly
one writer (invariant 5), so counters are plain ``+=`` with no lock. Queued work is always derived as
``enq - deq`` of two monotonic counters written by different processes, which is why no update is lost.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import struct
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt

from flowshard.stats import WAIT_BUCKETS

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "ARRAY_NAMES",
    "HEADER_WORDS",
    "MAGIC",
    "VERSION",
    "ArraySpec",
    "Reconciliation",
    "ShmLayout",
    "ShmSnapshot",
    "ShmStats",
]

I64 = npt.NDArray[np.int64]

MAGIC: Final = int.from_bytes(b"FLOWSHM\0", "little")  # first header word: "this is a stats segment"
VERSION: Final = 6
HEADER_WORDS: Final = 8  # magic, version, F, N, B, O, H, nbytes
_ALIGN: Final = 64  # one cache line: arrays of different writers never share a line at their edges


class ArraySpec(NamedTuple):
    """Where one array lives in the buffer."""

    name: str
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the buffer

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.size * 8


# Arrays written by shards, then by the distributor; snapshot() copies in this order (see there why).
_SHARD_ARRAYS: Final = (
    "deq_bytes", "deq_items", "band_deq_bytes", "band_deq_items", "shard_deq_bytes", "shard_taken_bytes",
    "heartbeat_ns", "reported",
)
_DIST_ARRAYS: Final = (
    "enq_bytes", "enq_items", "band_enq_bytes", "band_enq_items", "shard_enq_bytes", "shard_sent_bytes", "band_waiting",
)
_SHARED_ROWS: Final = ("outcomes", "wait_hist", "wait_us", "dispatched", "inversions", "narrowed")  # row w: writer w
# The rows of a shard's counts it copies before each window of writes (`ShmStats.checkpoint`), in that
# order in its `ckpt_rows`; the copy and its marks are not snapshotted
_CHECKPOINTED: Final = ("outcomes", "wait_hist", "wait_us", "dispatched", "narrowed")
_CHECKPOINT_ARRAYS: Final = ("ckpt_rows", "ckpt_reported", "ckpt_valid")
ARRAY_NAMES: Final = ("seq", *_SHARD_ARRAYS, *_SHARED_ROWS, *_DIST_ARRAYS, *_CHECKPOINT_ARRAYS)
# What `ShmStats.snapshot` copies, in that order: built once. Built per call, a 20-tuple at each /metrics
# and /v1/stats read was parked on CPython 3.11-3.12's tuple free list, which never hands tuples of 20
# back (gh-121439), up to its 2,000: ~400 kB of a long-running distributor's memory (review 144)
_SNAPSHOT_ARRAYS: Final = (*_SHARD_ARRAYS, *_SHARED_ROWS, *_DIST_ARRAYS)


def _first_word(buf: Buffer) -> int:
    with memoryview(buf) as mv, mv.cast("B") as raw:
        if raw.nbytes < 8:
            return 0
        with raw[:8] as head, head.cast("q") as q:
            return int(q[0])


MIN_BACKLOG_BYTES: Final = 1024


def backlog_bytes(size: int) -> int:
    """What one request adds to its shard's input backlog: its bytes, at least `MIN_BACKLOG_BYTES`. A
    shard's work per request is mostly per request, not per byte, so requests declaring no bytes
    (HTTP's `bytes` is optional) must still show a shard that stops reading them falling behind."""
    return size if size > MIN_BACKLOG_BYTES else MIN_BACKLOG_BYTES


def pack_within_slack(shards: Iterable[int], backlogs: Sequence[int], slack: int) -> int:
    """JSQ-Bytes's slack (`ServiceConfig.jsq_slack_bytes` > 0): of `shards`, in index order, the first
    whose input backlog (`backlogs`, one per shard: `ShmStats.shard_backlog_bytes`) is within `slack`
    of the least. One rule for the service's pick (`ShmStats.jsq_pick`) and the N-shard simulation's."""
    bound = min(backlogs) + slack
    for s, t in zip(shards, backlogs, strict=True):  # a loop, not next() over a generator: ~2x faster (timeit)
        if t <= bound:
            return s
    raise ValueError("no shards")  # (only if there are none: the least is always within)


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclasses.dataclass(frozen=True)
class ShmLayout:
    """Shape and byte offsets of every array; identical in every process that builds it from the same dims.

    ``flow_slots`` F, ``shards`` N, ``bands`` B, ``outcomes`` O, ``hist_buckets`` H. Writer N (the
    distributor) has its own row in the per-writer tables (``outcomes``, ``wait_hist``, ``dispatched``,
    ``seq``) because it also decides outcomes (rejections, shard failures) itself.
    """

    flow_slots: int
    shards: int
    bands: int
    outcomes: int = 8
    hist_buckets: int = 17
    specs: tuple[ArraySpec, ...] = dataclasses.field(init=False, repr=False, compare=False)
    nbytes: int = dataclasses.field(init=False, compare=False)

    def __post_init__(self) -> None:
        dims = (self.flow_slots, self.shards, self.bands, self.outcomes, self.hist_buckets)
        if any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in dims):
            raise ValueError(f"layout dimensions must be positive ints, got {dims}")
        f, n, b, o, h = dims
        shapes: dict[str, tuple[int, ...]] = {
            "seq": (n + 1,),
            "deq_bytes": (f, n),
            "deq_items": (f, n),
            "band_deq_bytes": (b, n),
            "band_deq_items": (b, n),
            # each shard's bytes over all flows and bands (JSQ-Bytes's tie-break reads 2N cells, not 2BN)
            "shard_deq_bytes": (n,),
            # each shard's input read, in `backlog_bytes` units: shard_sent_bytes - this = its input backlog
            # (what was routed to it that it has not taken in yet), what JSQ-Bytes's slack packs by
            "shard_taken_bytes": (n,),
            "heartbeat_ns": (n,),
            "outcomes": (n + 1, b, o),
            "wait_hist": (n + 1, b, h),
            # the waits' exact sum, µs (the histogram's `_sum`; int64 µs overflows after ~290,000 years of waits)
            "wait_us": (n + 1, b),
            "dispatched": (n + 1,),
            "enq_bytes": (f, n),
            "enq_items": (f, n),
            "band_enq_bytes": (b, n),
            "band_enq_items": (b, n),
            "shard_enq_bytes": (n,),
            "shard_sent_bytes": (n,),  # input routed to each shard, in `backlog_bytes` units
            # strict priority at the moment of dispatch (see Distributor._publish_waiting, ShardWorker):
            "band_waiting": (b,),  # since when (ns) the band has queued work no grant covers; 0: none
            "inversions": (n + 1, b),  # priority inversions per band; only the distributor's row N is written
            "narrowed": (n + 1, b),  # grants of a band handed back because a higher band waited so
            # the frames each shard has written to the distributor (this worker's life: `reported_frames`)
            "reported": (n,),
            # each shard's `_CHECKPOINTED` rows before its latest window of writes (below), with its
            # `reported` then, and whether the copy is whole
            "ckpt_reported": (n,),
            "ckpt_valid": (n,),
        }
        # (a writer's row of a per-writer table is all of it but its first dimension)
        shapes["ckpt_rows"] = (n, sum(math.prod(shapes[name][1:]) for name in _CHECKPOINTED))
        specs: list[ArraySpec] = []
        offset = _align(HEADER_WORDS * 8)
        for name in ARRAY_NAMES:
            spec = ArraySpec(name, shapes[name], offset)
            specs.append(spec)
            offset = _align(offset + spec.nbytes)
        object.__setattr__(self, "specs", tuple(specs))
        object.__setattr__(self, "nbytes", offset)

    def spec(self, name: str) -> ArraySpec:
        for s in self.specs:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def writers(self) -> int:
        """N shards + the distributor."""
        return self.shards + 1

    @property
    def distributor(self) -> int:
        """The distributor's writer index (N)."""
        return self.shards

    def header(self) -> tuple[int, ...]:
        return (MAGIC, VERSION, self.flow_slots, self.shards, self.bands, self.outcomes, self.hist_buckets, self.nbytes)

    @classmethod
    def from_buffer(cls, buf: Buffer) -> ShmLayout:
        """Rebuild the layout from the header the creator wrote, so workers attach without the config."""
        with memoryview(buf) as mv, mv.cast("B") as raw:
            if raw.nbytes < HEADER_WORDS * 8:
                raise ValueError("buffer too small for a flowshard header")
            with raw[: HEADER_WORDS * 8] as head, head.cast("q") as q:
                words = q.tolist()
        if words[0] != MAGIC or words[1] != VERSION:
            raise ValueError(f"not a flowshard v{VERSION} stats segment (magic/version {words[:2]})")
        layout = cls(*words[2:7])
        if layout.nbytes != words[7]:
            raise ValueError(f"header nbytes {words[7]} does not match computed {layout.nbytes}")
        return layout


@dataclasses.dataclass
class ShmSnapshot:
    """A copy of every array; each writer's rows are internally consistent when ``consistent``.

    Rows of different writers are taken at slightly different instants (a seqlock is per writer); shard
    rows are copied before the distributor's, so ``enq - deq`` is never negative in a snapshot.
    """

    layout: ShmLayout
    arrays: dict[str, I64]
    consistent: bool
    inconsistent_writers: tuple[int, ...]

    def __getattr__(self, name: str) -> I64:
        # Only called for missing attributes: expose arrays as snap.enq_bytes etc.
        arrays: dict[str, I64] = self.__dict__.get("arrays", {})
        if name in arrays:
            return arrays[name]
        raise AttributeError(name)

    def __getitem__(self, name: str) -> I64:
        return self.arrays[name]


@dataclasses.dataclass(frozen=True)
class Reconciliation:
    """Queued bytes/items derived from the counters, at every level of DESIGN.md §4 invariant 4.

    ``flow_*`` and ``shard_*`` come from the per-flow table, ``band_*`` and ``band_shard_*`` from the
    per-band table; the two tables are written separately, so agreement between them is a real check.
    """

    flow_shard_bytes: I64  # [F, N]
    flow_shard_items: I64
    band_shard_bytes: I64  # [B, N]
    band_shard_items: I64
    flow_bytes: I64  # [F]
    flow_items: I64
    band_bytes: I64  # [B]
    band_items: I64
    shard_bytes: I64  # [N], from the flow table
    shard_items: I64
    global_bytes: int
    global_items: int
    shard_total_bytes: I64  # [N], from the per-shard totals (JSQ-Bytes's tie-break)

    def mismatches(self) -> list[str]:
        """Human-readable violations of invariant 4 (empty when the counters reconcile)."""
        out: list[str] = []
        tables = (
            ("flow/shard bytes", self.flow_shard_bytes),
            ("flow/shard items", self.flow_shard_items),
            ("band/shard bytes", self.band_shard_bytes),
            ("band/shard items", self.band_shard_items),
        )
        for what, arr in tables:
            if (arr < 0).any():
                out.append(f"negative queued {what} at {np.argwhere(arr < 0).tolist()}")
        for unit, by_flow, by_band in (
            ("bytes", self.flow_shard_bytes, self.band_shard_bytes),
            ("items", self.flow_shard_items, self.band_shard_items),
        ):
            per_shard_flow, per_shard_band = by_flow.sum(axis=0), by_band.sum(axis=0)
            if not np.array_equal(per_shard_flow, per_shard_band):
                out.append(
                    f"per-shard {unit}: flow table {per_shard_flow.tolist()} != band table {per_shard_band.tolist()}"
                )
        per_shard_band = self.band_shard_bytes.sum(axis=0)
        if not np.array_equal(self.shard_total_bytes, per_shard_band):
            out.append(f"per-shard bytes: totals {self.shard_total_bytes.tolist()} != band table "
                       f"{per_shard_band.tolist()}")
        totals = {
            "bytes": (
                int(self.flow_bytes.sum()),
                int(self.band_bytes.sum()),
                int(self.shard_bytes.sum()),
                self.global_bytes,
            ),
            "items": (
                int(self.flow_items.sum()),
                int(self.band_items.sum()),
                int(self.shard_items.sum()),
                self.global_items,
            ),
        }
        for unit, vals in totals.items():
            if len(set(vals)) != 1:
                out.append(
                    f"{unit}: per-flow {vals[0]}, per-band {vals[1]}, per-shard {vals[2]}, global {vals[3]} differ"
                )
        return out

    @property
    def balanced(self) -> bool:
        return not self.mismatches()

    @property
    def empty(self) -> bool:
        """True when nothing is queued anywhere, by either table."""
        return not (
            self.flow_shard_bytes.any()
            or self.flow_shard_items.any()
            or self.band_shard_bytes.any()
            or self.band_shard_items.any()
        )


class ShmStats:
    """Numpy views (for vectorised reads) and fast single-cell writers over one stats buffer.

    Hot-path writes go through ``memoryview.cast('q')`` with precomputed flat offsets: measured ~2-3x
    cheaper than numpy scalar indexing (DESIGN.md §5). Indices are not range-checked there (the
    memoryview only checks the whole buffer): callers pass slots, shards and bands they own.
    Call ``close()`` before closing the segment: numpy views and memoryviews pin the buffer.
    """

    seq: I64
    deq_bytes: I64
    deq_items: I64
    band_deq_bytes: I64
    band_deq_items: I64
    heartbeat_ns: I64
    outcomes: I64
    wait_hist: I64
    wait_us: I64
    dispatched: I64
    narrowed: I64
    reported: I64
    ckpt_rows: I64
    ckpt_reported: I64
    ckpt_valid: I64
    enq_bytes: I64
    enq_items: I64
    band_enq_bytes: I64
    band_enq_items: I64
    shard_enq_bytes: I64
    shard_deq_bytes: I64
    shard_taken_bytes: I64
    shard_sent_bytes: I64

    def __init__(self, buf: Buffer, layout: ShmLayout | None = None, *, init: bool = False) -> None:
        """View ``buf``. ``layout=None`` reads it from the header; ``init=True`` (creator only) writes it."""
        if layout is None:
            if init:
                raise ValueError("init=True needs an explicit layout")
            layout = ShmLayout.from_buffer(buf)
        elif not init and _first_word(buf) == MAGIC and ShmLayout.from_buffer(buf) != layout:
            raise ValueError("segment header describes a different layout")
        # A buffer without a header (first word 0) is accepted with an explicit layout: tests, scratch.
        with memoryview(buf) as mv, mv.cast("B") as raw:
            if raw.nbytes < layout.nbytes:
                raise ValueError(f"buffer of {raw.nbytes} bytes is smaller than the layout's {layout.nbytes}")
            self._raw = raw[: layout.nbytes]
        self.layout = layout
        self._q = self._raw.cast("q")
        self._views: dict[str, I64] = {}
        for spec in layout.specs:
            arr: I64 = np.ndarray(spec.shape, dtype=np.int64, buffer=self._raw, offset=spec.offset)
            self._views[spec.name] = arr
            setattr(self, spec.name, arr)
        if init:
            for k, word in enumerate(layout.header()):
                self._q[k] = word

        self._n = layout.shards
        self._o = layout.outcomes
        self._h = layout.hist_buckets
        w = {s.name: s.offset // 8 for s in layout.specs}  # word offsets
        self._w_seq = w["seq"]
        self._w_hb = w["heartbeat_ns"]
        self._w_enq_b = w["enq_bytes"]
        self._d_enq_i = w["enq_items"] - w["enq_bytes"]
        self._w_deq_b = w["deq_bytes"]
        self._d_deq_i = w["deq_items"] - w["deq_bytes"]
        self._w_benq_b = w["band_enq_bytes"]
        self._d_benq_i = w["band_enq_items"] - w["band_enq_bytes"]
        self._w_bdeq_b = w["band_deq_bytes"]
        self._d_bdeq_i = w["band_deq_items"] - w["band_deq_bytes"]
        self._w_senq = w["shard_enq_bytes"]
        self._w_sdeq = w["shard_deq_bytes"]
        self._w_stake = w["shard_taken_bytes"]
        self._w_ssent = w["shard_sent_bytes"]
        self._w_out = w["outcomes"]
        self._w_hist = w["wait_hist"]
        self._w_wait_us = w["wait_us"]
        self._w_disp = w["dispatched"]
        self._w_wait = w["band_waiting"]
        self._w_inv = w["inversions"]
        self._w_narrow = w["narrowed"]
        self._b = layout.bands
        # jsq_pick's reads: a row of N cells (native int64, as `_q`) at a byte offset, and its rows' offsets
        self._row_n = struct.Struct(f"{layout.shards}q").unpack_from
        self._b_enq, self._b_deq = 8 * self._w_enq_b, 8 * self._w_deq_b
        self._b_senq, self._b_sdeq = 8 * self._w_senq, 8 * self._w_sdeq
        self._b_ssent, self._b_stake = 8 * self._w_ssent, 8 * self._w_stake
        self._row_out = layout.bands * layout.outcomes
        self._row_hist = layout.bands * layout.hist_buckets
        self._w_reported = w["reported"]
        self._w_ckpt = w["ckpt_rows"]
        self._w_ckpt_reported = w["ckpt_reported"]
        self._w_ckpt_valid = w["ckpt_valid"]
        self._ckpt_row = layout.spec("ckpt_rows").shape[1]
        # each shard's `_CHECKPOINTED` rows, as (byte offset, bytes) spans in their order in `ckpt_rows`
        rows = {name: math.prod(layout.spec(name).shape[1:]) for name in _CHECKPOINTED}
        self._ckpt_spans = [[(8 * (w[name] + n * row), 8 * row) for name, row in rows.items()]
                            for n in range(layout.shards)]
        if init:
            for n in range(layout.shards):  # (a worker that dies before its first window took nothing back)
                self.checkpoint(n)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Drop every view so the owner can ``SharedMemory.close()`` (it refuses while exports exist)."""
        for name in list(self._views):
            if name in self.__dict__:
                delattr(self, name)
        self._views.clear()
        for mv in ("_q", "_raw"):
            v = self.__dict__.pop(mv, None)
            if isinstance(v, memoryview):
                v.release()

    # ------------------------------------------------------------------ hot-path writers

    def add_enq(self, slot: int, shard: int, band: int, nbytes: int) -> None:
        """Distributor only: count one request of ``nbytes`` routed to ``shard`` (flow and band tables, the
        shard's total). Its input backlog grows when the pass's Enqueues are written (`add_sent`)."""
        q = self._q
        i = self._w_enq_b + slot * self._n + shard
        q[i] += nbytes
        q[i + self._d_enq_i] += 1
        i = self._w_benq_b + band * self._n + shard
        q[i] += nbytes
        q[i + self._d_benq_i] += 1
        q[self._w_senq + shard] += nbytes

    def add_deq(self, slot: int, shard: int, band: int, nbytes: int, items: int = 1) -> None:
        """Shard ``shard`` only: count an item that left its queue, for any reason."""
        q = self._q
        i = self._w_deq_b + slot * self._n + shard
        q[i] += nbytes
        q[i + self._d_deq_i] += items
        i = self._w_bdeq_b + band * self._n + shard
        q[i] += nbytes
        q[i + self._d_bdeq_i] += items
        q[self._w_sdeq + shard] += nbytes

    def add_sent(self, shard: int, nbytes: int) -> None:
        """Distributor only: Enqueues of ``nbytes`` in all, in `backlog_bytes` units, are being written to
        ``shard`` (before the write, so the shard never takes more than was sent): its input backlog
        grows by what one pass routed to it, at the pass's end. So the picks of a pass see the backlog
        as it was when the pass began, and a pass that routes many new flows packs them on one shard
        rather than spilling within itself (JSQ-Bytes's slack)."""
        self._q[self._w_ssent + shard] += nbytes

    def add_taken(self, shard: int, nbytes: int) -> None:
        """Shard ``shard`` only: it has read Enqueues of ``nbytes`` in all, in `backlog_bytes` units (the sum
        of theirs): its input backlog shrinks."""
        self._q[self._w_stake + shard] += nbytes

    def add_outcome(self, writer: int, band: int, outcome: int, n: int = 1) -> None:
        """Writer ``writer`` only: count final outcomes (index per the outcome enum, < O)."""
        self._q[self._w_out + writer * self._row_out + band * self._o + outcome] += n

    def outcome_count(self, writer: int, band: int, outcome: int) -> int:
        """What writer ``writer`` has counted of ``outcome`` in ``band`` (one cell, as it is now)."""
        return int(self._q[self._w_out + writer * self._row_out + band * self._o + outcome])

    def observe_wait(self, writer: int, band: int, wait: float) -> None:
        """Writer ``writer`` only: count a dispatch's queue wait of ``wait`` seconds (>= 0) into its
        histogram bucket and the waits' sum (whole µs, rounded: the `_sum` is exact to that)."""
        q = self._q
        row = writer * self._b + band  # (writer, band) in both tables: the histogram's rows are H wide
        q[self._w_hist + row * self._h + bisect_left(WAIT_BUCKETS, wait)] += 1  # (`stats.wait_bucket`, inline)
        q[self._w_wait_us + row] += int(wait * 1e6 + 0.5)

    def observe_no_wait(self, writer: int, band: int) -> None:
        """`observe_wait(writer, band, 0.0)`, for the idle fast path's dispatches (the distributor's hot
        path): the first bucket; the sum does not move."""
        self._q[self._w_hist + writer * self._row_hist + band * self._h] += 1

    def add_dispatched(self, writer: int, n: int = 1) -> None:
        self._q[self._w_disp + writer] += n

    def set_waiting(self, band: int, since_ns: int) -> None:
        """Distributor only: ``band`` has queued (or in-transit) work that no live grant covers, since
        ``since_ns`` (CLOCK_MONOTONIC, system-wide); 0: it has none."""
        self._q[self._w_wait + band] = since_ns

    def waiting_above(self, band: int, ceilings: list[float], saturation: float) -> int:
        """The highest band above ``band`` (lower index) that waits uncovered and is eligible at
        ``saturation`` (its ceiling above it), or ``band`` itself if none does."""
        q, w = self._q, self._w_wait
        for h in range(band):
            if q[w + h] and ceilings[h] > saturation:
                return h
        return band

    def add_inversion(self, writer: int, band: int) -> None:
        """The distributor (writer N) only: a priority inversion of ``band`` (Ledger.close_window)."""
        self._q[self._w_inv + writer * self._b + band] += 1

    def add_narrowed(self, writer: int, band: int) -> None:
        self._q[self._w_narrow + writer * self._b + band] += 1

    # ------------------------------------------------------------------ counts that survive a worker's death

    def add_reported(self, shard: int, frames: int) -> None:
        """Shard ``shard`` only: it has written ``frames`` more frames to the distributor (counted in the
        window of writes that decided them, before they are handed to the kernel)."""
        self._q[self._w_reported + shard] += frames

    def reported_frames(self, shard: int) -> int:
        return int(self._q[self._w_reported + shard])

    def checkpoint(self, shard: int) -> None:
        """Shard ``shard`` only, before a window of writes that may count outcomes: copy its outcome,
        wait, dispatch and narrowing rows, with its `reported`, so that if it dies before the window's
        frames reach the distributor, what the window counted can be taken back
        (`take_back_unreported`). The copy is marked whole only once it is."""
        q, raw = self._q, self._raw
        q[self._w_ckpt_valid + shard] = 0
        dst = 8 * (self._w_ckpt + shard * self._ckpt_row)
        for src, size in self._ckpt_spans[shard]:
            raw[dst : dst + size] = raw[src : src + size]
            dst += size
        q[self._w_ckpt_reported + shard] = q[self._w_reported + shard]
        q[self._w_ckpt_valid + shard] = 1

    def take_back_unreported(self, shard: int, received: int) -> int | None:
        """Distributor only, once shard ``shard``'s worker is dead and its link read to the end, having
        read ``received`` frames of it: undo what the worker counted and the distributor never read (the
        outcomes of its last window, killed in it or before its frames reached the kernel), so that the
        distributor, which ends those requests itself, is the only one to count them. The number of
        outcomes taken back (0: nothing was owed), or None if that cannot be done exactly: the frames
        missing are not exactly the last window's (more than one window in flight, which the worker does
        not let happen, or a window cut into several frames, over `WINDOW_FRAMES` of them). Idempotent."""
        q, raw = self._q, self._raw
        reported = int(q[self._w_reported + shard])
        mid_window = q[self._w_seq + shard] % 2 == 1
        if reported == received and not mid_window:
            return 0
        if not q[self._w_ckpt_valid + shard] or q[self._w_ckpt_reported + shard] != received:
            return None
        before = int(self.outcomes[shard].sum())
        if not mid_window:
            self.begin_write(shard)
        src = 8 * (self._w_ckpt + shard * self._ckpt_row)
        for dst, size in self._ckpt_spans[shard]:
            raw[dst : dst + size] = raw[src : src + size]
            src += size
        q[self._w_reported + shard] = received
        q[self._w_seq + shard] += 1  # (even again: from odd if it died in its window, else begin_write's)
        return before - int(self.outcomes[shard].sum())

    def as_read(self, snap: ShmSnapshot, read: Sequence[int]) -> None:
        """Distributor only: `snap` with each shard's counts as of the frames the distributor has read
        of it (`read[n]`): a shard in a window, or whose last window's frames are not read yet, is shown
        as it was before that window (its checkpoint), so what a reader of the counters sees never
        includes what could still be taken back at the shard's death (review 182: Prometheus counters
        fell by the taken-back window, which `rate()` reads as a reset). The window shows once read."""
        for n in range(self._n):
            if snap["seq"][n] % 2 == 0 and snap["reported"][n] == read[n]:
                continue
            # (its copy holds what it counted before its latest window: the windows before it are in the
            # kernel if not read yet, and read before any take-back, so they are never taken back)
            mark = int(self.ckpt_reported[n])
            if not self.ckpt_valid[n] or mark < read[n]:
                continue
            row = self.ckpt_rows[n].copy()
            if not self.ckpt_valid[n] or int(self.ckpt_reported[n]) != mark:
                continue  # (copied while it was being written: shown as it is)
            at = 0
            for name in _CHECKPOINTED:
                shape = snap[name].shape[1:]
                size = math.prod(shape)
                snap[name][n] = row[at : at + size].reshape(shape)
                at += size

    def set_heartbeat(self, shard: int, now_ns: int) -> None:
        """Shard ``shard`` only; the caller supplies the clock (the core has none)."""
        self._q[self._w_hb + shard] = now_ns

    # ------------------------------------------------------------------ seqlock

    def begin_write(self, writer: int) -> None:
        """Make ``seq[writer]`` odd before a batch of writes, so readers retry our rows.

        Single writer per seq cell, so a plain increment is safe. Ordering relies on x86-64 TSO (stores
        are seen in program order); on weakly ordered CPUs snapshots are best-effort.
        """
        self._q[self._w_seq + writer] += 1

    def end_write(self, writer: int) -> None:
        """Make ``seq[writer]`` even again: the batch is complete."""
        self._q[self._w_seq + writer] += 1

    # ------------------------------------------------------------------ reads

    def queued_bytes(self, slot: int) -> I64:
        """Bytes of flow ``slot`` queued or in transit per shard: ``enq - deq`` (length N)."""
        out: I64 = self.enq_bytes[slot] - self.deq_bytes[slot]
        return out

    def queued_items(self, slot: int) -> I64:
        out: I64 = self.enq_items[slot] - self.deq_items[slot]
        return out

    def shard_queued_bytes(self) -> I64:
        """Total queued bytes per shard, over all flows and bands (length N)."""
        out: I64 = self.shard_enq_bytes - self.shard_deq_bytes
        return out

    def shard_backlog_bytes(self) -> I64:
        """Per shard, the requests routed to it that it has not read yet, in `backlog_bytes` units
        (length N): how far behind its input it is. Queued work waiting for budget is not in it
        (JSQ-Bytes's slack)."""
        out: I64 = self.shard_sent_bytes - self.shard_taken_bytes
        return out

    def flow_idle(self, slot: int) -> bool:
        """True when nothing of the flow is queued anywhere: its slot may be freed (DESIGN.md §5)."""
        return bool(
            np.array_equal(self.enq_items[slot], self.deq_items[slot])
            and np.array_equal(self.enq_bytes[slot], self.deq_bytes[slot])
        )

    def jsq_pick(self, slot: int, rr_counter: int, slack: int = 0, fresh: bool = False) -> int:
        """JSQ-Bytes: the shard holding the fewest queued bytes of flow ``slot``.

        Ties, with ``slack`` 0: the tied shard with the fewest total queued bytes (all flows and bands:
        the per-shard totals, written with the band table, so a pick reads 2N cells instead of 2BN);
        still tied: ``sorted(tied)[rr_counter % len(tied)]``, so a caller that increments the counter
        on every pick spreads new flows round robin. In-transit requests count as queued.

        With ``slack`` > 0 (`ServiceConfig.jsq_slack_bytes`, the default) the ties go instead to the
        lowest-numbered tied shard whose **input backlog** (`shard_backlog_bytes`: the requests routed
        to it that it has not read yet, each its bytes and at least 1 KiB) is within ``slack`` of the
        least: the work packs onto few shards
        while they keep up, and spills to the next one only when a shard falls behind its input. A
        deep queue waiting for budget is not load on its shard (a shard's work is per arrival and
        per dispatch, and dispatches are paced by the budget), so it does not spread the flows.
        Pure Python over the memoryview: for the handful of shards in a process this beats numpy's
        per-call overhead (measured).

        ``fresh``: the caller knows nothing of the flow is queued or in transit anywhere (the ledger's
        `slot_items`), so its counters agree and are not read: the same pick, ~0.5 µs less at 8 shards
        where every flow starts afresh (the matrix shape).
        """
        # N cells read as one `struct.unpack_from` each (a tuple): half the cost of a memoryview slice's
        # `tolist()` (timeit); a pick reads up to four rows, once per request of a flow that starts afresh
        raw, row, n = self._raw, self._row_n, self._n
        if not fresh:
            enq = row(raw, self._b_enq + 8 * slot * n)
            deq = row(raw, self._b_deq + 8 * slot * n)
            fresh = enq == deq
        if fresh:  # nothing of the flow anywhere (it starts afresh): every shard ties
            if slack:
                q = self._q
                if q[self._w_ssent] - q[self._w_stake] <= slack:  # shard 0 keeps up (every backlog is >= 0)
                    return 0
                # `pack_within_slack` inlined: once per flow starting afresh, 0.4 µs less at 8 shards (timeit)
                backlog = list(map(operator.sub, row(raw, self._b_ssent), row(raw, self._b_stake)))
                bound = min(backlog) + slack
                for s, t in enumerate(backlog):
                    if t <= bound:
                        return s
            # The shards with the fewest bytes in all, in index order, found by C calls (list.index and
            # count) rather than the loop below over every shard (once per request in the matrix shape,
            # where every flow starts afresh)
            totals = list(map(operator.sub, row(raw, self._b_senq), row(raw, self._b_sdeq)))
            low = min(totals)
            at = totals.index(low)
            for _ in range(rr_counter % totals.count(low)):
                at = totals.index(low, at + 1)
            return at
        best = enq[0] - deq[0]
        tied = [0]
        for s in range(1, n):
            v = enq[s] - deq[s]
            if v < best:
                best, tied = v, [s]
            elif v == best:
                tied.append(s)
        if len(tied) == 1:
            return tied[0]
        if slack:
            sent, taken = row(raw, self._b_ssent), row(raw, self._b_stake)
            return pack_within_slack(tied, [sent[s] - taken[s] for s in tied], slack)
        enq, deq = row(raw, self._b_senq), row(raw, self._b_sdeq)
        low_tied: list[int] = []
        low = 0
        for s in tied:
            t = enq[s] - deq[s]
            if not low_tied or t < low:
                low, low_tied = t, [s]
            elif t == low:
                low_tied.append(s)
        return low_tied[rr_counter % len(low_tied)]

    def jsq_pick_among(self, slot: int, shards: Sequence[int], rr_counter: int, slack: int = 0) -> int:
        """`jsq_pick`'s rule over ``shards`` only (in index order, not empty): the live shards, when a pick
        landed on one that is down. Rare, so written plainly (numpy reads)."""
        queued = self.queued_bytes(slot).tolist()
        best = min(queued[s] for s in shards)
        tied = [s for s in shards if queued[s] == best]
        if len(tied) == 1:
            return tied[0]
        if slack:
            backlog = self.shard_backlog_bytes().tolist()
            return pack_within_slack(tied, [backlog[s] for s in tied], slack)
        totals = self.shard_queued_bytes().tolist()
        low = min(totals[s] for s in tied)
        low_tied = [s for s in tied if totals[s] == low]
        return low_tied[rr_counter % len(low_tied)]

    def _writer_cells(self, writer: int) -> Iterator[tuple[str, Any]]:
        """The (array, index) pairs that belong to ``writer`` (its seqlock covers exactly these)."""
        if writer == self._n:
            for name in _DIST_ARRAYS:
                yield name, slice(None)
        else:
            col = (slice(None), writer)
            for name in ("deq_bytes", "deq_items", "band_deq_bytes", "band_deq_items"):
                yield name, col
            yield "shard_deq_bytes", writer
            yield "shard_taken_bytes", writer
            yield "heartbeat_ns", writer
            yield "reported", writer
        for name in _SHARED_ROWS:
            yield name, writer

    def snapshot(self, max_retries: int = 1000, on_retry: Callable[[int], bool | None] | None = None) -> ShmSnapshot:
        """A copy of every array, per-writer consistent under the seqlock.

        Copies everything once, then re-copies the rows of any writer whose seq was odd or moved, up to
        ``max_retries`` times each; a writer still busy after that (e.g. it died mid-batch) is taken as
        is and listed in ``inconsistent_writers``. Shard rows are copied before the distributor's so
        every deq seen has its enq seen too (enq is counted before the request is sent).
        ``on_retry(writer)`` runs before each retry (a hook for tests, or a pause); when it returns True
        that writer is given up on at once (a budget spent over the whole snapshot: each writer still
        gets its first look, with no retry).
        """
        nw = self.layout.writers
        seq = self.seq
        before = seq.copy()
        arrays = {name: self._views[name].copy() for name in _SNAPSHOT_ARRAYS}
        after = seq.copy()
        bad = [w for w in range(nw) if before[w] & 1 or before[w] != after[w]]
        if bad and bad[-1] != self._n and bad[0] < self._n:
            bad.append(self._n)  # a re-copied shard may show deqs newer than our enq copy
        inconsistent: list[int] = []
        final_seq = after
        for w in bad:
            ok = False
            for attempt in range(max_retries + 1):
                if attempt and on_retry is not None and on_retry(w):
                    break
                s1 = int(seq[w])
                if s1 & 1:
                    continue
                for name, idx in self._writer_cells(w):
                    arrays[name][idx] = self._views[name][idx]
                if int(seq[w]) == s1:
                    final_seq[w] = s1
                    ok = True
                    break
            if not ok:
                inconsistent.append(w)
                final_seq[w] = int(seq[w])
        arrays["seq"] = final_seq
        return ShmSnapshot(self.layout, arrays, not inconsistent, tuple(inconsistent))

    def reconcile(self, snap: ShmSnapshot | None = None) -> Reconciliation:
        """Queued bytes and items per flow, band, shard and globally (from ``snap``, or a fresh snapshot)."""
        s = self.snapshot() if snap is None else snap
        fb = s["enq_bytes"] - s["deq_bytes"]
        fi = s["enq_items"] - s["deq_items"]
        bb = s["band_enq_bytes"] - s["band_deq_bytes"]
        bi = s["band_enq_items"] - s["band_deq_items"]
        return Reconciliation(
            flow_shard_bytes=fb,
            flow_shard_items=fi,
            band_shard_bytes=bb,
            band_shard_items=bi,
            flow_bytes=fb.sum(axis=1),
            flow_items=fi.sum(axis=1),
            band_bytes=bb.sum(axis=1),
            band_items=bi.sum(axis=1),
            shard_bytes=fb.sum(axis=0),
            shard_items=fi.sum(axis=0),
            global_bytes=int(fb.sum()),
            global_items=int(fi.sum()),
            shard_total_bytes=s["shard_enq_bytes"] - s["shard_deq_bytes"],
        )

    # ------------------------------------------------------------------ recovery

    def reset_shard(self, n: int) -> None:
        """Distributor only, after shard ``n`` died: forget what it held (deq := enq in column n).

        With `take_back_unreported` (called first), the only writes to a shard's cells by another
        process; safe only because the dead shard no longer writes and its replacement must not start
        writing until this returns. The
        distributor answers the lost requests itself (``evicted: shard_failure``). Counters stay
        monotonic (deq only grows), so the new shard simply continues from here. The shard's seq is
        made odd for the reset (moved on by 2 if it died mid-batch with seq odd) and left even.
        """
        if not 0 <= n < self._n:
            raise IndexError(f"shard {n} out of range 0..{self._n - 1}")
        i = self._w_seq + n
        s = self._q[i]
        self._q[i] = s + 1 if s % 2 == 0 else s + 2
        self.deq_bytes[:, n] = self.enq_bytes[:, n]
        self.deq_items[:, n] = self.enq_items[:, n]
        self.band_deq_bytes[:, n] = self.band_enq_bytes[:, n]
        self.band_deq_items[:, n] = self.band_enq_items[:, n]
        self.shard_deq_bytes[n] = self.shard_enq_bytes[n]
        self.shard_taken_bytes[n] = self.shard_sent_bytes[n]
        self._q[self._w_reported + n] = 0  # (its successor counts its own frames)
        self.checkpoint(n)  # (what it has counted so far is the successor's to keep)
        self._q[i] += 1
