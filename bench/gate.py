"""The proxy's gate (`PoolUtilization.saturation` with requests not yet sent), against the real picker.

`python -m bench.gate [--states N] [--seed S]`: in N random pools (1-8 backends; random waiting,
running, KV use and requests in flight) the gate admits requests while the pool's figure with them
counted is below a random ceiling; the real picker (`BackendPool.pick`) then sends them, and the
pool's figure once they are sent is compared with what the gate counted. Then the gate's cost per
grant (timeit) at 8 and 32 backends, as `Proxy.saturation` calls it.
"""

from __future__ import annotations

import argparse
import random
import timeit

from distributor.backends import BackendPool
from flowshard.utilization import PoolUtilization, Scraped


def _pool(rng: random.Random, n: int, threshold: int) -> tuple[PoolUtilization, BackendPool]:
    pool = PoolUtilization(n, queue_threshold=threshold, kv_threshold=0.8, staleness=10.0)
    picker = BackendPool([f"http://b{k}" for k in range(n)], 1.0, 10.0)
    for b in range(n):
        waiting, running, kv = rng.randint(0, 6), rng.randint(0, 20), rng.uniform(0.0, 0.75)
        inflight = rng.randint(0, waiting + running)  # (what is in flight there shows in its figures)
        for _ in range(inflight):
            pool.sent(b)
        picker.backends[b].inflight = inflight
        mark = pool.scrape_started(b)
        pool.scraped(b, 1.0, mark, Scraped(waiting, running, kv if running else 0.0))
    return pool, picker


def overshoot(seed: int) -> float:
    """The pool's figure once the admitted requests are sent, less what the gate counted for them."""
    rng = random.Random(seed)
    pool, picker = _pool(rng, rng.randint(1, 8), rng.choice([5, 8, 20]))
    ceiling = rng.uniform(0.2, 0.95)
    admitted = 0
    while pool.saturation(unsent=admitted) < ceiling and admitted < 5000:
        admitted += 1
    counted = pool.saturation(unsent=admitted)
    for _ in range(admitted):
        backend = picker.pick(0.0, full=pool.full)
        assert backend is not None
        pool.sent(backend.index)
        backend.inflight += 1
    return pool.saturation() - counted


def cost_per_grant(backends: int) -> float:
    """Seconds per call of the gate, its figures unchanged between calls (as within one plan)."""
    pool, _ = _pool(random.Random(1), backends, 8)
    pool.expire(1.5)
    step = [0]

    def grant() -> float:
        pool.expire(1.5)
        sats, rooms = pool.saturations_kept(), pool.rooms_kept()
        step[0] = step[0] % 20 + 1
        return pool.saturation(step[0], set(), sats, rooms)

    return min(timeit.repeat(grant, number=2000, repeat=5)) / 2000


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--states", type=int, default=3000, help="random pool states to compare (default 3000)")
    parser.add_argument("--seed", type=int, default=0, help="the states' random seed (default 0)")
    args = parser.parse_args()
    over = [overshoot(args.seed + k) for k in range(args.states)]
    print(f"{args.states} random pools: the figure once sent less the gate's, at most {max(over):+.3f}; "
          f"{sum(x > 0.05 for x in over)} over +0.05, {sum(x > 0.1 for x in over)} over +0.1")
    for backends in (8, 32):
        print(f"gate per grant, {backends} backends: {cost_per_grant(backends) * 1e6:.1f} µs")


if __name__ == "__main__":
    main()
