"""The slow model of `bench.slow_service`, on the inference side: every batch first sleeps `SLOW_BATCH_MS`.

Imported only where the network runs: the fork server preloads it beside the engine's process module, so
every inference process forked from it runs the slow batches, while the server itself still imports no
torch (docs/architecture.md, "No torch in the server").
"""

from __future__ import annotations

import os
import time

from service.engine import process
from service.engine.compute import Shadows

SLOW_S = float(os.environ.get("SLOW_BATCH_MS", "0")) / 1000
_run_rows = process.run_rows


def slow_run_rows(*args, **kwargs) -> Shadows | None:
    time.sleep(SLOW_S)
    return _run_rows(*args, **kwargs)


process.run_rows = slow_run_rows
