"""The fork server the inference processes are forked from (service/engine/worker.py): a process that has
imported the engine's process module, torch with it, once, so that each inference process starts in
milliseconds, not spawned afresh (seconds each), and not forked from the server itself (threads, event
loop, sockets). Torch-free, so that a server process can start it before it imports anything heavy.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing import forkserver

context = multiprocessing.get_context("forkserver")
context.set_forkserver_preload(["service.engine.process"])


def start() -> None:
    """Start the fork server now, rather than at the first model's load: its import of torch (1.2 s of a
    2.8 GHz core) then runs beside this process's own import of the app on another core, instead of after
    it. A no-op once it runs."""
    forkserver.ensure_running()
