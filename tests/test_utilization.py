"""The utilization detector (flowshard.utilization), its seam in the ledger, and the backend picker.

No sockets: the detector and the picker take the clock as an argument, so staleness, back-off and
the between-scrapes correction are tested with exact times.
"""

from __future__ import annotations

import math

import pytest
from conftest import make_config
from hypothesis import example, given, settings
from hypothesis import strategies as st

from distributor.backends import SUSPECT_FOR, BackendPool
from flowshard.config import ServiceConfig
from flowshard.ledger import Ledger, Pending
from flowshard.utilization import PoolUtilization, Scraped, ScrapeError, parse_metrics

VLLM = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 4.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="1",model_name="m"} 1.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 17.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="m"} 0.0
"""


def test_parse_vllm_sums_queues_and_takes_the_fullest_kv_cache() -> None:
    assert parse_metrics(VLLM) == Scraped(waiting=4.0, running=6.0, kv=0.5)


def test_parse_older_vllm_sglang_and_unlabelled_lines() -> None:
    old = b"vllm:num_requests_waiting 2\nvllm:gpu_cache_usage_perc 0.9 1700000000000\n"
    assert parse_metrics(old) == Scraped(2.0, 0.0, 0.9, both=False)  # (no running count)
    sglang = (b'sglang:num_queue_reqs{model_name="m"} 7\nsglang:num_running_reqs{model_name="m"} 3\n'
              b'sglang:token_usage{model_name="m"} 0.4\n')
    assert parse_metrics(sglang) == Scraped(7.0, 3.0, 0.4)
    assert parse_metrics(b"vllm:kv_cache_usage_perc 1.7\n").kv == 1.0  # clamped


@pytest.mark.parametrize(
    ("page", "says"),
    [
        (b"# nothing here\nprocess_cpu_seconds_total 3\n", "no known saturation metric"),
        (b"vllm:num_requests_waiting{a=\"b\"} lots\n", "not a number"),
        (b"vllm:num_requests_waiting -1\n", "non-negative"),
        (b"vllm:kv_cache_usage_perc NaN\n", "non-negative"),
    ],
)
def test_parse_errors(page: bytes, says: str) -> None:
    with pytest.raises(ScrapeError, match=says):
        parse_metrics(page)


def _parse_by_lines(text: bytes) -> Scraped | str:
    """The parse as it was, a split of the page into lines: the oracle for the search by name."""
    from flowshard.utilization import _PREFIXES, read_lines

    try:
        return read_lines([line for line in text.split(b"\n") if line.startswith(_PREFIXES)])
    except ScrapeError:
        return "error"


_LINES = st.sampled_from([
    b"vllm:num_requests_waiting 0.1", b"sglang:num_queue_reqs 0.2", b'vllm:num_requests_waiting{a="c"} 0.3',
    b"vllm:num_requests_waiting 3", b'vllm:num_requests_waiting{m="a"} 2.5', b"vllm:num_requests_running 4",
    b"vllm:kv_cache_usage_perc 0.5", b'vllm:gpu_cache_usage_perc{e="1"} 0.25', b"sglang:num_queue_reqs 1",
    b"sglang:token_usage 0.75", b"tgi_queue_size 6", b"# HELP vllm:num_requests_waiting waiting",
    b"# TYPE vllm:num_requests_waiting gauge", b"vllm:num_requests_waiting_total 9",
    b'other{label="vllm:num_requests_waiting 5"} 1', b"xvllm:num_requests_waiting 7", b"", b"junk",
    b"vllm:num_requests_waiting", b"vllm:kv_cache_usage_perc NaN", b"vllm:num_requests_waiting\t8",
    b"vllm:num_requests_running -1", b'vllm:num_requests_waiting{a="b"} lots',
])


@settings(max_examples=400, deadline=None)
@given(st.lists(_LINES, max_size=12), st.sampled_from([b"\n", b"\r\n"]), st.booleans())
def test_the_parse_by_name_reads_what_a_parse_line_by_line_reads(lines: list[bytes], end: bytes, last: bool) -> None:
    """The known metrics are found by a search for their names, not a split of the page into lines (a
    review: 18 ms a parse for a 0.9 MiB page of short lines, now ~1 ms): the same figures, and an
    error where the line-by-line parse had one, on pages of every kind of line."""
    page = end.join(lines) + (end if last else b"")
    want = _parse_by_lines(page)
    if want == "error":
        with pytest.raises(ScrapeError):
            parse_metrics(page)
    else:
        assert parse_metrics(page) == want


def scraped(pool: PoolUtilization, backend: int, at: float, waiting: float = 0, running: float = 0,
            kv: float = 0) -> bool:
    mark = pool.scrape_started(backend)
    return pool.scraped(backend, at, mark, Scraped(waiting, running, kv))


def test_saturation_is_the_mean_of_max_queue_or_kv_and_stale_counts_as_saturated() -> None:
    pool = PoolUtilization(2, queue_threshold=5, kv_threshold=0.8, staleness=0.2)
    assert pool.saturation() == 1.0  # never scraped: stale
    scraped(pool, 0, 10.0, waiting=1, kv=0.6)  # max(0.2, 0.75)
    scraped(pool, 1, 10.0, waiting=10, kv=0.0)  # max(2.0, 0)
    pool.expire(10.1)
    assert pool.backend_saturation(0) == pytest.approx(0.75)
    assert pool.backend_saturation(1) == pytest.approx(2.0)
    # each backend's counts at most 1 (review 108: one far past its threshold held the pool while the
    # other had room): 1 only when every one is full
    assert pool.saturation() == pytest.approx((0.75 + 1.0) / 2)
    assert pool.full(1) and not pool.full(0)
    pool.expire(10.21)
    assert pool.stale(0) and pool.full(0) and pool.saturation() == 1.0


def test_requests_not_yet_sent_fill_the_backends_with_room() -> None:
    """Review 109: spread over every backend, the unsent requests' shares on full backends vanished under
    the cap, so a burst took N / (N - full) times the room there was (10 where one backend of two had
    room for 5). They go where the picker sends them: to the backends with room."""
    pool = PoolUtilization(4, queue_threshold=5, kv_threshold=0.8, staleness=10.0)
    for b in range(3):
        scraped(pool, b, 1.0, waiting=25)  # 5.0: full
    scraped(pool, 3, 1.0, waiting=0)
    assert pool.saturation() == pytest.approx(3 / 4)
    assert pool.saturation(unsent=2) == pytest.approx((3 + 2 / 5) / 4)
    assert pool.saturation(unsent=5) == 1.0  # the room of the one backend, and no more
    assert pool.saturation(unsent=5, out={0, 1, 2}) == 1.0
    assert pool.saturation(unsent=2, out={0}) == pytest.approx((2 + 2 / 5) / 3)


def _admitted(pool: PoolUtilization) -> int:
    """How many requests the gate lets through (a grant while the pool's saturation is below 1)."""
    n = 0
    while pool.saturation(unsent=n) < 1.0 and n <= 1000:
        n += 1
    return n


def test_requests_not_yet_sent_fill_the_room_of_all_the_backends_with_room() -> None:
    """Review 117: spread evenly and capped backend by backend, the share past one backend's room
    vanished, though the picker sends it to another with room: rooms of 2 and 1 (`queue_threshold`
    2) let 4 through, and the fake backend's queue reached 3; at `queue_threshold` 5, rooms of 5, 1,
    1 and 1 let 20 through where there was room for 8."""
    pool = PoolUtilization(2, queue_threshold=2, kv_threshold=0.8, staleness=10.0)
    scraped(pool, 0, 1.0, waiting=0, running=4)
    scraped(pool, 1, 1.0, waiting=1, running=4)
    assert pool.saturation(unsent=2) < 1.0 <= pool.saturation(unsent=3)
    assert _admitted(pool) == 3
    four = PoolUtilization(4, queue_threshold=5, kv_threshold=0.8, staleness=10.0)
    for b, waiting in enumerate((0, 4, 4, 4)):
        scraped(four, b, 1.0, waiting=waiting, running=4)
    assert _admitted(four) == 8


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 8), st.lists(st.integers(0, 12), min_size=1, max_size=8))
def test_the_gate_lets_through_the_room_there_is_and_no_more(threshold: int, waiting: list[int]) -> None:
    """Whatever the backends hold, the requests the gate lets through fill the room their figures
    leave (the sum over the backends of `queue_threshold` less what waits there, where positive),
    exactly: one more would wait past the threshold at some backend, one less leaves room unused.
    The pool is at 1 with no room left, and never above it."""
    pool = PoolUtilization(len(waiting), queue_threshold=threshold, kv_threshold=0.8, staleness=10.0)
    for b, w in enumerate(waiting):
        scraped(pool, b, 1.0, waiting=w, running=4)
    room = sum(max(0, threshold - w) for w in waiting)
    assert _admitted(pool) == room
    assert pool.saturation(unsent=room + 3) == 1.0


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8), st.integers(0, 60), st.floats(0.0, 0.95)), min_size=1, max_size=6))
@example([(0, 7, 0.7)])  # (0.7 + 0.1 is 0.7999999999999999: a room of 1 by arithmetic takes 2)
def test_with_kv_caches_the_gate_lets_through_what_the_backends_take_before_they_are_full(
    backends: list[tuple[int, int, float]],
) -> None:
    """Review 119: their shares summed, a backend whose few running requests held most of its KV cache
    took the room of the others (2 let through where the picker would place 21), and one near its KV
    threshold with many running let 10 through for a room of 7. Whatever each holds (waiting, running,
    KV use), what the gate lets through can each be sent to a backend not yet full, as the picker
    sends them, and then every backend is full: not one more, not one less."""
    pool = PoolUtilization(len(backends), queue_threshold=5, kv_threshold=0.8, staleness=10.0)
    for b, (waiting, running, kv) in enumerate(backends):
        scraped(pool, b, 1.0, waiting=waiting, running=running, kv=kv)
    admitted = _admitted(pool)
    for _ in range(admitted):  # sent one by one, each to a backend with room, the roomiest first
        roomy = [b for b in range(len(backends)) if not pool.full(b)]
        assert roomy, (admitted, [pool.room(b) for b in range(len(backends))])
        pool.sent(max(roomy, key=pool.room))
    assert all(pool.full(b) for b in range(len(backends))), (admitted, [pool.room(b) for b in range(len(backends))])


def test_below_1_the_requests_not_yet_sent_are_counted_as_the_picker_spreads_them() -> None:
    """Review 121: counted in proportion to each backend's room, the pool's figure with the unsent
    below 1 was not what the picker (fewest in flight) makes of them: a band with a ceiling of 0.5 was
    let 10 through, and the pool was at 0.65 once they were sent. They are spread evenly now, what a
    backend has no room for going to the others, as the picker spreads them."""
    pool = PoolUtilization(2, queue_threshold=20, kv_threshold=0.9, staleness=10.0)
    scraped(pool, 0, 1.0, waiting=0, running=4, kv=0.06)
    scraped(pool, 1, 1.0, waiting=0, running=1, kv=0.2)
    admitted = 0
    while pool.saturation(unsent=admitted) < 0.5:
        admitted += 1
    picker = BackendPool(["http://a", "http://b"], 1.0, 10.0)
    for _ in range(admitted):
        backend = picker.pick(0.0, full=pool.full)
        assert backend is not None
        pool.sent(backend.index)
        backend.inflight += 1
    assert admitted == 6 and pool.saturation() == pytest.approx(0.519, abs=0.001)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 12), st.floats(0.0, 0.85), st.integers(0, 12)),
                min_size=1, max_size=5), st.integers(0, 7))
@example([(0, 8, 0.0, 8), (0, 0, 0.0, 0)], 0)  # review 122's shape: one backend busy with streams, one idle
@example([(0, 0, 0.0, 0), (0, 1, 0.4, 1)], 1)  # review 127's: the tie goes to the one it raises most
def test_below_1_the_requests_not_yet_sent_are_counted_where_the_picker_sends_them(
    backends: list[tuple[int, int, float, int]], start: int,
) -> None:
    """Review 122: spread evenly over the backends with room, the unsent requests were not where the
    picker sends them when the backends had unequal requests in flight (it fills the one with the
    fewest first): a band's ceiling below 1 was passed by up to 0.37. Sent one by one by the real
    picker from those in-flight counts (its round robin starting anywhere), the pool's figure is never
    above the one the gate counted for them before they were sent (review 127: sharing the requests
    the picker may send to any of several tied backends, the gate was below it by up to 0.10), and
    wherever the picker had no tie left to break (no backend not full is at the level it last sent
    from), it is that figure."""
    n = len(backends)
    pool = PoolUtilization(n, queue_threshold=5, kv_threshold=0.8, staleness=10.0)
    picker = BackendPool([f"http://b{k}" for k in range(n)], 1.0, 10.0)
    for b, (waiting, running, kv, inflight) in enumerate(backends):
        inflight = min(inflight, waiting + running)  # (what is in flight there shows in its figures)
        for _ in range(inflight):
            pool.sent(b)
        picker.backends[b].inflight = inflight
        scraped(pool, b, 1.0, waiting=waiting, running=running, kv=kv if running else 0.0)
    picker._rr = start % n
    admitted = _admitted(pool) - 1  # (the last one the gate lets through fills the pool to 1)
    counted = [pool.saturation(unsent=k) for k in range(admitted + 1)]
    assert counted == sorted(counted)  # (more unsent, never a lower figure)
    for k in range(1, admitted + 1):
        backend = picker.pick(0.0, full=pool.full)
        assert backend is not None and not pool.full(backend.index)
        level = backend.inflight  # (the levels it sends from never fall: the fewest in flight first)
        pool.sent(backend.index)
        backend.inflight += 1
        assert pool.saturation() <= counted[k] + 1e-12, (k, [b.inflight for b in picker.backends])
        if all(b.inflight > level for b in picker.backends if not pool.full(b.index)):
            assert pool.saturation() == pytest.approx(counted[k], abs=1e-9), (k, [b.inflight for b in picker.backends])


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(1, 20)), min_size=1, max_size=8), st.data())
def test_the_spread_is_the_water_filling_of_the_rooms_from_the_counts_in_flight(
    backends: list[tuple[int, int]], data: st.DataObject,
) -> None:
    """`_spread` against its definition, level by level: the highest level L whose filling (each backend
    raised to L from its count in flight, by at most its room) takes no more than the requests; the
    rest left to those that the next level would raise."""
    inflight, rooms = [f for f, _ in backends], [r for _, r in backends]
    unsent = data.draw(st.integers(0, sum(rooms) - 1))
    def fill(level: int) -> list[int]:
        return [min(r, max(0, level - f)) for f, r in backends]
    level = 0
    while sum(fill(level + 1)) <= unsent:
        level += 1
    whole = fill(level)
    raised = [k for k, more in enumerate(fill(level + 1)) if more > whole[k]]
    assert PoolUtilization._spread(inflight, rooms, unsent) == (whole, raised, unsent - sum(whole))


def test_a_backend_below_1_keeps_the_pool_below_1_whatever_the_rounding() -> None:
    """(1 + 0.9999999999999999) / 2 is 1.0 in floating point: the pool read full, and held every
    request, while the picker still had a backend below 1 to send one to (found by a random search
    against the picker, this round)."""
    pool = PoolUtilization(2, queue_threshold=5, kv_threshold=0.8, staleness=10.0)
    scraped(pool, 0, 1.0, waiting=5)  # full
    scraped(pool, 1, 1.0, waiting=0, running=1, kv=math.nextafter(0.8, 0.0))  # 0.9999999999999999
    assert not pool.full(1)
    assert pool.saturation() < 1.0 and pool.saturation(unsent=1) == 1.0


_EVENTS = st.one_of(
    st.tuples(st.just("sent"), st.integers(0, 2)), st.tuples(st.just("finished"), st.integers(0, 2)),
    st.tuples(st.just("held"), st.integers(0, 2)), st.tuples(st.just("add"), st.integers(0, 2)),
    st.tuples(st.just("scraped"), st.integers(0, 2)), st.tuples(st.just("expire"), st.floats(0.0, 3.0)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_EVENTS, max_size=40))
def test_the_figures_kept_between_events_are_the_figures_now(events: list[tuple[str, float]]) -> None:
    """`saturations_kept` and `rooms_kept` keep the figures until an event changes them or a backend's
    scrape turns stale: after any events and any clock, asked for or not, they are what they would
    be computed afresh."""
    pool = PoolUtilization(3, queue_threshold=4, kv_threshold=0.8, staleness=2.0)
    clock = 1.0
    for kind, arg in events:
        b = int(arg) % 3
        if kind == "sent":
            pool.sent(b)
        elif kind == "finished":
            pool.finished(b)
        elif kind == "held":
            pool.held(b)
        elif kind == "add":
            pool.add(b, sent=2, finished=1, held=1, held_finished=0)
            pool.add(b)  # (nothing: no change)
        elif kind == "scraped":
            mark = pool.scrape_started(b)
            pool.scraped(b, clock, mark, Scraped(float(b), 2.0, 0.3), clock + 0.25)
        else:
            clock += arg
            pool.expire(clock)
        if int(arg * 7) % 3:  # (not every time: some events pass between two questions)
            assert pool.saturations_kept() == pool.saturations()
            if int(arg * 5) % 2:
                assert pool.rooms_kept() == [pool.room(k) for k in range(3)]
    assert pool.saturations_kept() == pool.saturations()
    assert pool.rooms_kept() == [pool.room(k) for k in range(3)]


def test_a_scrapes_age_counts_from_its_arrival() -> None:
    """Review 108: counted from its sending, a backend whose metrics took half of `staleness` to come was
    stale between scrapes, and one taking `staleness` always (every request held to its TTL, nothing
    said). From its arrival, as upstream's; the requests sent since still count from its sending."""
    pool = PoolUtilization(1, queue_threshold=5, kv_threshold=0.8, staleness=0.2)
    mark = pool.scrape_started(0)
    pool.sent(0)  # on its way while the scrape was: counted
    assert pool.scraped(0, 10.0, mark, Scraped(0, 1, 0.1), arrived_at=10.15) is True  # (stale 1.0 before)
    assert pool.loads[0].duration == pytest.approx(0.15)
    pool.expire(10.3)  # 0.3 s after it was sent, 0.15 after it came
    assert not pool.stale(0) and pool.age(0) == pytest.approx(0.15)
    assert pool.backend_saturation(0) == pytest.approx(max(1 / 5, (0.1 + 0.1) / 0.8))
    pool.expire(10.36)
    assert pool.stale(0) and pool.saturation() == 1.0


def test_requests_sent_since_the_scrape_count_until_the_next_one_shows_them() -> None:
    """Upstream's overshoot: between scrapes the scraped queue does not show what was let through."""
    pool = PoolUtilization(1, queue_threshold=5, kv_threshold=0.8, staleness=1.0)
    scraped(pool, 0, 0.0, waiting=0, running=4, kv=0.4)
    assert pool.saturation() == pytest.approx(0.5)  # kv 0.4 / 0.8
    for _ in range(3):
        pool.sent(0)
    # 3 more waiting (3 / 5) and 3 more average running requests' KV (0.4 + 3 * 0.1 = 0.7 / 0.8)
    assert pool.saturation() == pytest.approx(0.875)
    pool.finished(0)
    assert pool.saturation() == pytest.approx(max(2 / 5, (0.4 + 2 * 0.1) / 0.8))
    # grants still on their way: room for 2 more by its KV cache (0.4 + 4 * 0.1 = 0.8), 3 by its queue
    assert pool.room(0) == pytest.approx(2)
    assert pool.saturation(unsent=1) < 1.0 <= pool.saturation(unsent=2)
    assert pool.saturation(unsent=3) == 1.0
    # the next scrape sees them (and they are no longer counted twice)
    mark = pool.scrape_started(0)
    pool.sent(0)  # sent while the scrape was in flight: counted, it may not be in the figures
    assert pool.scraped(0, 0.5, mark, Scraped(0, 6, 0.66)) is False  # 0.875 before, 0.9625 after: no fall
    assert pool.saturation() == pytest.approx((0.66 + 0.11) / 0.8)


def test_requests_in_flight_that_a_scrape_does_not_show_count_as_waiting() -> None:
    """A review (the flaky out-of-rotation test): 5 requests sent just before a scrape left, the backend
    had read 1 of them when it answered (waiting 0, running 1); counted idle, 5 more went, and its
    queue reached 9 at a threshold of 5. What the proxy had in flight there counts at least."""
    pool = PoolUtilization(1, queue_threshold=5, kv_threshold=0.8, staleness=1.0)
    scraped(pool, 0, 0.0)
    for _ in range(5):
        pool.sent(0)
    assert pool.backend_saturation(0) == pytest.approx(5 / 5)
    scraped(pool, 0, 0.1, waiting=0, running=1)
    assert pool.backend_saturation(0) == pytest.approx(4 / 5)  # the 4 it did not show, as waiting (was 0)
    pool.sent(0)
    assert pool.backend_saturation(0) == pytest.approx(5 / 5)
    # once the backend shows them, they are not counted twice
    scraped(pool, 0, 0.2, waiting=5, running=1)
    assert pool.backend_saturation(0) == pytest.approx(5 / 5)
    # other clients' requests there: more than the proxy's, nothing unseen
    scraped(pool, 0, 0.3, waiting=9, running=4)
    assert pool.backend_saturation(0) == pytest.approx(9 / 5)
    # a page without the running count cannot say what it misses: nothing added (a KV-only page would
    # otherwise count every request in flight as waiting)
    for kv_only in (True, False):
        pool = PoolUtilization(1, queue_threshold=5, kv_threshold=0.8, staleness=1.0)
        scraped(pool, 0, 0.0)
        for _ in range(20):
            pool.sent(0)
        page = b"vllm:kv_cache_usage_perc 0.4\n" + (b"" if kv_only else b"vllm:num_requests_running 6\n"
                                                                       b"vllm:num_requests_waiting 0\n")
        pool.scraped(0, 0.1, pool.scrape_started(0), parse_metrics(page))
        # (both: the 14 it misses, as waiting)
        assert pool.backend_saturation(0) == pytest.approx(0.4 / 0.8 if kv_only else 14 / 5)


def test_a_stream_held_on_its_client_is_not_taken_as_unseen() -> None:
    """Review 91: a stream whose relay waits on a slow client stays in flight here after the backend is
    done with it (no longer in its figures). Taken as unseen, five such streams held every request
    for 12 s with the backend idle; and five of them with non-streamed requests running kept the
    backend near its threshold. Once it has waited on its client it is not counted as unseen."""
    pool = PoolUtilization(1, queue_threshold=5, kv_threshold=0.8, staleness=10.0)
    scraped(pool, 0, 0.0)
    for _ in range(5):
        pool.sent(0)
        pool.held(0)  # streaming; the client reads slowly, the backend is done
    scraped(pool, 0, 0.1, waiting=0, running=0)
    assert pool.backend_saturation(0) == 0.0  # (taken as unseen: 5 / 5)
    for _ in range(4):
        pool.sent(0)  # non-streamed, all running there
    scraped(pool, 0, 0.2, waiting=0, running=4, kv=0.2)
    assert pool.backend_saturation(0) == pytest.approx(0.25)  # kv 0.2 / 0.8, nothing unseen
    for _ in range(3):
        pool.sent(0)  # on their way when a scrape shows 1 of them: 2 unseen
    scraped(pool, 0, 0.3, waiting=0, running=5, kv=0.2)
    assert pool.backend_saturation(0) == pytest.approx(2 / 5)


def test_the_end_of_a_stream_held_on_its_client_does_not_hide_a_request_sent_since() -> None:
    """Review 93: held streams the backend was done with (not in its figures) that ended here after the
    scrape were taken off the estimate, each hiding a request sent since: 5 such ends and 5 new
    requests read 0.0 against a true 1.0."""
    pool = PoolUtilization(1, queue_threshold=5, kv_threshold=0.8, staleness=10.0)
    scraped(pool, 0, 0.0)
    for _ in range(5):
        pool.sent(0)
        pool.held(0)
    scraped(pool, 0, 0.1)  # (the backend is done with them)
    for _ in range(5):
        pool.finished(0, held=True)  # the clients caught up: they end here
        pool.sent(0)
    assert pool.backend_saturation(0) == pytest.approx(5 / 5)  # (taken off: 0.0)
    scraped(pool, 0, 0.2, waiting=4, running=1)
    assert pool.backend_saturation(0) == pytest.approx(4 / 5)


def test_a_request_slow_to_show_counts_until_it_does() -> None:
    """Review 95: a bound on what a scrape may miss (what was sent since the scrape before, tried for a
    load-balanced URL) let bursts through where a backend takes longer than a scrape interval to
    count a request (150 ms: its queue reached 10 at a threshold of 5), and, at saturation, took a
    request done before the scrape answered off twice. Missing is missing, however long ago sent."""
    pool = PoolUtilization(1, queue_threshold=5, kv_threshold=0.8, staleness=10.0)
    scraped(pool, 0, 0.0)
    for _ in range(5):
        pool.sent(0)
    for at in (0.05, 0.10, 0.15):  # three scrapes before the backend counts them
        scraped(pool, 0, at, waiting=0, running=0)
        assert pool.backend_saturation(0) == pytest.approx(5 / 5)
    scraped(pool, 0, 0.2, waiting=4, running=1)
    assert pool.backend_saturation(0) == pytest.approx(4 / 5)


def test_scrapes_that_keep_missing_requests_not_on_their_way_are_told_apart() -> None:
    """A backend URL must be one server: behind a load balancer each scrape shows one server's figures,
    the others' requests count as unseen for ever, and the pool is held. Requests on their way were
    sent lately; more unseen than were sent in the last MISSING_RECENT seconds, for MISSING_PERSISTS
    seconds, is what `missing_for` reports (the shell warns). Bursts on their way, and a steady flow
    with some always on its way, are not reported."""
    from flowshard.utilization import MISSING_PERSISTS

    def at(t: float) -> float:
        return round(t, 3)

    lb = PoolUtilization(1, queue_threshold=5, kv_threshold=0.8, staleness=10.0)
    for _ in range(40):
        lb.sent(0)
    for k in range(140):  # 7 s of scrapes, each one replica's 10 running; nothing more sent
        scraped(lb, 0, at(0.05 * k), waiting=0, running=10)
    assert lb.missing_for(0) >= MISSING_PERSISTS
    scraped(lb, 0, 7.0, waiting=10, running=30)  # (one that shows them all: reported no more)
    assert lb.missing_for(0) == 0.0

    transit = PoolUtilization(1, queue_threshold=5, kv_threshold=0.8, staleness=10.0)
    steady = PoolUtilization(1, queue_threshold=5, kv_threshold=0.8, staleness=10.0)
    running = 0
    for k in range(200):  # 10 s
        t = at(0.05 * k)
        if k % 40 == 0:  # a burst every 2 s that the backend counts 0.3 s late
            for _ in range(5):
                transit.sent(0)
            running = 0
        elif k % 40 == 6:
            running = 5
        elif k % 40 == 20:
            for _ in range(5):
                transit.finished(0)
            running = 0
        scraped(transit, 0, t, waiting=0, running=running)
        for _ in range(10):
            steady.sent(0)
        for _ in range(10 if k else 0):
            steady.finished(0)
        scraped(steady, 0, t, waiting=0, running=7)  # 3 of its 10 always still on their way
        assert transit.missing_for(0) == 0.0 and steady.missing_for(0) == 0.0, k


def test_a_request_done_before_the_scrape_answered_is_not_taken_off_twice() -> None:
    """Done at the backend while the scrape was on its way (not in its figures) and seen done here after
    it came back: it must come off the estimate once, not twice."""
    pool = PoolUtilization(1, queue_threshold=5, kv_threshold=0.8, staleness=1.0)
    scraped(pool, 0, 0.0)
    for _ in range(6):
        pool.sent(0)
    scraped(pool, 0, 0.1, waiting=4, running=1)  # one of the six already done there
    pool.finished(0)  # ...and now seen done here
    assert pool.backend_saturation(0) == pytest.approx(4 / 5)  # (taken off twice: 3 / 5)
    pool.finished(0)  # the running one ends; one waiting starts
    assert pool.backend_saturation(0) == pytest.approx(3 / 5)


def test_a_scrape_that_shows_room_reports_the_fall_and_an_overtaken_one_is_ignored() -> None:
    pool = PoolUtilization(1, queue_threshold=5, kv_threshold=0.8, staleness=1.0)
    scraped(pool, 0, 0.0, waiting=10)
    old_mark = pool.scrape_started(0)
    assert scraped(pool, 0, 0.2, waiting=0) is True  # a newer scrape came back first
    assert pool.scraped(0, 0.1, old_mark, Scraped(50, 0, 0)) is False
    assert pool.saturation() == 0.0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["sent", "finished", "scrape"]), max_size=40),
       st.floats(min_value=0, max_value=20), st.floats(min_value=0, max_value=1))
def test_the_correction_never_lowers_saturation_below_what_was_scraped_minus_finished(
    events: list[str], waiting: float, kv: float
) -> None:
    """Sending more never lowers the estimate; the estimate stays finite and non-negative."""
    pool = PoolUtilization(1, queue_threshold=5, kv_threshold=0.8, staleness=100.0)
    scraped(pool, 0, 0.0, waiting=waiting, running=3, kv=kv)
    t = 0.0
    for event in events:
        before = pool.saturation()
        if event == "sent":
            pool.sent(0)
            assert pool.saturation() >= before
        elif event == "finished":
            pool.finished(0)
            assert pool.saturation() <= before
        else:
            t += 0.01
            scraped(pool, 0, t, waiting=waiting, running=3, kv=kv)
        assert 0 <= pool.saturation() < math.inf


def ledger_with(budget: int = 100) -> Ledger:
    config = make_config(None, service=ServiceConfig(fast_path=True))
    config.budget.max_inflight_requests = budget
    return Ledger(config, shards=1)


def test_ledger_grants_only_while_the_external_detector_has_room_and_counts_each_grant() -> None:
    ledger = ledger_with(budget=100)
    pool = PoolUtilization(1, queue_threshold=5, kv_threshold=0.8, staleness=10.0)
    scraped(pool, 0, 0.0, waiting=2)
    ledger.external_saturation = pool.saturation
    for i in range(10):
        ledger.enqueue(Pending(i, "f", 0, 10), 0)
    grants = ledger.plan_grants()
    # waiting 2 + each grant counted as one more waiting: room for 3 before 5 / 5 = 1.0
    assert len(grants) == 3
    assert ledger.saturation() == pytest.approx(1.0)
    assert not ledger.can_dispatch_now(Pending(99, "g", 0, 10))
    # the next scrape shows the backend drained: the grants may go on
    assert scraped(pool, 0, 0.1, waiting=0) is True
    assert len(ledger.plan_grants()) == 2  # 3 outstanding grants + 2 = 5 waiting-equivalents
    ledger.external_saturation = None
    assert len(ledger.plan_grants()) == 5  # negative control: the concurrency budget alone lets the rest go


def test_ledger_without_an_external_detector_is_unchanged() -> None:
    ledger = ledger_with(budget=2)
    for i in range(5):
        ledger.enqueue(Pending(i, "f", 0, 10), 0)
    assert len(ledger.plan_grants()) == 2
    assert ledger.saturation() == ledger.budget.saturation() == 0.0  # grants are not in-flight yet


def test_picker_fewest_in_flight_ties_round_robin_and_passive_health_backoff() -> None:
    pool = BackendPool(["http://a", "http://b", "http://c"], backoff=1.0, max_backoff=3.0)
    a, b, c = pool.backends
    picks = [pool.pick(0.0) for _ in range(6)]
    assert {p.index for p in picks if p} == {0, 1, 2}  # ties go round robin
    a.inflight, b.inflight, c.inflight = 2, 1, 3
    assert pool.pick(0.0) is b
    pool.failed(b, 0.0, "connect", "refused")
    assert pool.pick(0.5) is a and pool.next_up(0.5) == 0.0
    pool.failed(b, 1.0, "connect", "refused")  # second failure in a row: out for 2 s
    assert not pool.up(b, 2.9) and pool.up(b, 3.0)
    for _ in range(5):
        pool.failed(b, 10.0, "http_503", "HTTP 503")
    assert b.down_until == 13.0  # capped at max_backoff
    assert b.errors == {"connect": 2, "http_503": 5}
    pool.succeeded(b)
    assert pool.up(b, 10.0) and b.failures == 0
    for x in pool.backends:
        pool.failed(x, 0.0, "connect", "")
    assert pool.pick(0.5) is None and pool.next_up(0.5) == pytest.approx(0.5) and not pool.any_up(0.5)
    assert pool.any_up(1.0) and not pool.any_up(1.0, exclude={0, 1, 2})
    assert pool.pick(0.5, exclude={0}) is None


def test_while_every_backend_is_out_one_is_probed_once_per_backoff_and_not_twice_at_once() -> None:
    """(The detector off) while no backend is up, `probe` gives the one back first, no sooner than
    `backoff` after its take-out or its last probe, never one being probed; a failure to connect while
    it is out doubles nothing; with one up there is no probing; with `probes` off (the detector on,
    whose scrapes bring a backend back) never."""
    pool = BackendPool(["http://a", "http://b"], backoff=1.0, max_backoff=30.0)
    a, b = pool.backends
    pool.failed(a, 0.0, "connect", "")
    assert pool.probe(0.5) is None  # probes off
    pool.probes = True
    assert pool.probe(0.5) is None and not pool.probe_ready(0.5)  # b is up
    for t in (1.0, 3.0, 7.0):  # a's back-off doubling as each ended: 2, 4, 8 s (out until 15.0)
        pool.failed(a, t, "connect", "")
    for t in (0.5, 1.5, 3.5, 7.5):  # b's: 1, 2, 4, 8 s (out until 15.5)
        pool.failed(b, t, "connect", "")
    assert (a.down_until, b.down_until, a.failures) == (15.0, 15.5, 4)
    assert not pool.probe_ready(7.9) and pool.probe(7.9) is None  # none sooner than `backoff` after its take-out
    assert pool.next_up(7.9) == pytest.approx(0.1)  # (a try may come then: Retry-After, the retry's sleep)
    assert pool.probe_ready(8.0) and pool.probe(8.0, by="r1") is a and a.prober == "r1"
    assert pool.probe(8.5, by="r2") is b  # (a is being tried)
    assert pool.probe(8.6) is None and not pool.probe_ready(8.6)
    # while both are being tried: back a `backoff` from now at the soonest (review 156: not 0, review 157:
    # not their whole back-offs)
    assert pool.next_up(8.6) == pytest.approx(1.0)
    pool.failed(a, 8.7, "connect", "")  # its try failed: out as it was, nothing doubled
    pool.unprobe(a, "r2", 8.7)  # (not its prober: nothing)
    assert a.prober == "r1"
    pool.unprobe(a, "r1", 8.7)  # (ended: the next no sooner than `backoff` from now, review 157)
    assert (a.down_until, a.failures, a.prober, a.probe_after) == (15.0, 4, None, 9.7)
    assert pool.probe(9.5) is None  # tried until 8.7: not before 9.7
    assert pool.probe(9.7, exclude={0}) is None and pool.probe(9.7, by="r3") is a
    pool.answered(a)  # it answered: back, and no longer being probed (review 156: held for its whole answer)
    assert a.prober is None and pool.pick(9.8) is a and pool.probe(9.8) is None and not pool.probe_ready(9.8)
    pool.unprobe(a, "r3", 20.0)  # (its answer ended: nothing)
    assert a.probe_after == 9.7 + 1.0
    pool.failed(a, 10.0, "connect", "")  # out again during it: probed again after `backoff`
    assert pool.probe(10.9) is None and pool.probe(11.0) is a


def test_a_suspect_backend_is_picked_after_the_others_as_good_and_not_for_long() -> None:
    """Between a stream's head and its first bytes, the backends its request failed on before are
    `suspected`: picked after the others as good by the ranks before it (review 157: not before a
    full or stale one), and only for `SUSPECT_FOR` (review 157: for a hung answering backend's whole
    `read_timeout` every request went to it) or until one answers a request whole."""
    pool = BackendPool(["http://a", "http://b"], backoff=1.0, max_backoff=30.0)
    a, b = pool.backends
    a.suspected, a.suspect_since = 1, 10.0
    b.inflight = 5
    assert [pool.pick(10.0) for _ in range(3)] == [b, b, b]  # (fewer in flight, a would win every time)
    assert pool.pick(10.0, full={1}.__contains__) is a  # b full: a suspect beats a full one
    assert pool.pick(10.0 + SUSPECT_FOR) is a  # its suspicion has had its time
    pool.completed(a)  # a whole answer there: no longer suspect, whatever was suspected
    assert pool.pick(10.1) is a and a.suspected == 1  # (the count is the held request's to undo)


def test_acceptors_pickers_start_their_round_robins_apart() -> None:
    """Review 131: each acceptor's picker breaks ties by its own round robin, and starting alike they
    stepped in lockstep: two clients on two acceptors, each with one request at a time, went to the
    same backend 99 % of the time while the other sat idle. Staggered by the acceptor's index, equal
    backends get one each."""
    pools = [BackendPool(["http://a", "http://b"], 1.0, 10.0) for _ in range(2)]
    for index, pool in enumerate(pools):
        pool.stagger(index)
    for _ in range(5):  # each acceptor sends one, both finish, again
        picked = [pool.pick(0.0) for pool in pools]
        assert picked[0] is not None and picked[1] is not None
        assert {picked[0].index, picked[1].index} == {0, 1}
    # a round with one backend out of reach (out in the other acceptors here; down alike) sends both to
    # the other, and they stay apart after it (review 142: a round robin set to the backend picked fell
    # into lockstep after any such round)
    picked = [pool.pick(0.0, shun=frozenset({0})) for pool in pools]
    assert [p.index for p in picked if p] == [1, 1]
    for _ in range(5):
        picked = [pool.pick(0.0) for pool in pools]
        assert {p.index for p in picked if p} == {0, 1}


def test_a_backend_url_is_shown_without_its_password() -> None:
    from distributor.backends import BackendPool, redacted

    assert redacted("http://u:s3cret@10.0.0.5:8000") == "http://u:***@10.0.0.5:8000"
    assert redacted("http://token@h:1/v1") == "http://***@h:1/v1"  # a lone user part may be the secret
    assert redacted("http://h:8000/a@b") == "http://h:8000/a@b"  # an @ in the path is not user-info
    assert redacted("http://10.0.0.5:8000") == "http://10.0.0.5:8000"
    pool = BackendPool(["http://u:s3cret@127.0.0.1:9"], 1.0, 2.0)
    assert pool.backends[0].url == "http://u:s3cret@127.0.0.1:9"  # still used to connect
    assert "s3cret" not in pool.backends[0].name


def test_a_backend_out_of_rotation_does_not_count_in_the_pool_figure() -> None:
    """Review 81: a backend taken out after failed requests, its metrics still idle, kept the pool at
    0.8 while the one left took everything at 1.6. It takes no request, so it does not count; with
    none in rotation the mean is over all (their requests fail at once: `no_backend`)."""
    pool = PoolUtilization(2, queue_threshold=5, kv_threshold=0.8, staleness=10.0)
    scraped(pool, 0, 1.0, waiting=0)  # idle, but out
    scraped(pool, 1, 1.0, waiting=8)  # 1.6
    assert pool.backend_saturation(1) == pytest.approx(1.6)
    assert pool.saturation() == pytest.approx(0.5)  # (each counted at most 1)
    assert pool.saturation(out={0}) == 1.0
    assert pool.saturation(out={0, 1}) == pytest.approx(0.5)
    scraped(pool, 1, 1.0, waiting=2)  # 0.4
    assert pool.saturation(out={0}) == pytest.approx(0.4)
    assert pool.saturation(2, out={0}) == pytest.approx(0.8)  # admitted, not sent: all on the one left
