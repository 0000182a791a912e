"""`python -m bench.slow_service`: the service with a slow model, a fault that tests and benchmarks
inject (overload, deadlines, a batch killed while it runs, a queue held full) where production
settings have no such knob.

Every batch the inference process runs first sleeps `SLOW_BATCH_MS` milliseconds (an environment
variable of this entry point, not a setting). With `SLOW_LOOP_MS`, the server's event loop is stalled
that long every `STALL_PERIOD_MS` (10 ms; 0: at every turn of the loop, so that each turn takes that
long, as a loop saturated by more requests than it can read would be).
The inference processes are forked from a fork server that preloads the engine's process module;
preloading `bench.slow_batches` there too puts the slow batches into every one of them, and the server
imports no torch, as the service's does not. Spawned server workers (ERDE_WORKERS > 1) import this
module as their main, so it runs there too.
"""

from __future__ import annotations

import os
import time

from service.engine import worker

STALL_S = float(os.environ.get("SLOW_LOOP_MS", "0")) / 1000
STALL_PERIOD_S = float(os.environ.get("STALL_PERIOD_MS", "10")) / 1000
_start_lag = worker.LoopLag.start


def stalling_start(self: worker.LoopLag, loop) -> None:
    _start_lag(self, loop)

    def stall() -> None:
        time.sleep(STALL_S)  # the loop runs nothing else meanwhile
        loop.call_later(STALL_PERIOD_S, stall)

    if STALL_S:
        loop.call_later(STALL_PERIOD_S, stall)


worker.LoopLag.start = stalling_start
worker._context.set_forkserver_preload(["service.engine.process", "bench.slow_batches"])

if __name__ == "__main__":
    from service.server.main import run

    run()
