"""`python -m workers ...`: the shard worker entry point (started by `flowshard serve`)."""

import sys

from workers.worker import main

sys.exit(main())
