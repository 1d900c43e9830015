"""Own strict-priority oracle on bench records (arrival=service receive, dispatch=commit, done=end of service).
Usage: python analyze_prio_records.py FILE BUDGET"""
import sys, json
sys.path.insert(0, "/work/wt-rev53")
from flowshard.records import decode_runs
import oracles
fn, B = sys.argv[1], int(sys.argv[2])
for head, rows in decode_runs(open(fn, "rb").read()):
    bands = sorted({r["band"] for r in rows})
    recs = []
    for r in rows:
        if r["arrival"] is None:
            continue
        recs.append({"flow": r["flow"], "band": r["band"], "seq": r["seq"], "received": r["arrival"], "enqueued": r["arrival"],
                     "decided": r["dispatch"], "dispatched": r["dispatch"], "released": r["done"], "outcome": r["outcome"],
                     "got": r["done"], "shard": r["shard"]})
    print(head.get("label"), "bands seen", bands)
    yield_ = None
    EOF_MARK = None
