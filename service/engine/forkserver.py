"""The fork server the inference processes are forked from (service/engine/worker.py): a process that has
imported the engine's process module, torch with it, once, so that each inference process starts in
milliseconds, not spawned afresh (seconds each), and not forked from the server itself (threads, event
loop, sockets). Torch-free, like the whole server (docs/architecture.md, "No torch in the server"), so
that a server process can start it before it imports anything heavy.
"""

from __future__ import annotations

import json
import multiprocessing
from multiprocessing import forkserver
from multiprocessing.context import BaseContext

from service.engine import wire

context = multiprocessing.get_context("forkserver")
context.set_forkserver_preload(["service.engine.process"])


def start() -> None:
    """Start the fork server now, rather than at the first model's load: its import of torch (1.2 s of a
    2.8 GHz core) then runs beside this process's own import of the app on another core, instead of after
    it. A no-op once it runs."""
    forkserver.ensure_running()


def resolve_device(name: str, via: BaseContext = context) -> str:
    """What ERDE_DEVICE `name` resolves to here ("auto": "cuda" or "cpu"), from a short-lived child with
    torch (of the fork server, or `via` another start method): the server asks instead of importing it.
    ValueError, saying what is missing, when the device is not on this machine."""
    answer, send = via.Pipe(duplex=False)
    child = via.Process(target=wire.run, args=("report_device", name, send), name="erde-device", daemon=True)
    child.start()
    send.close()
    try:
        if not answer.poll(wire.START_TIMEOUT_S):
            raise RuntimeError(f"no answer about device {name!r}")
        said = json.loads(answer.recv_bytes())
    except EOFError:
        raise RuntimeError(f"the process asked about device {name!r} ended without an answer") from None
    finally:
        answer.close()
        child.join()
    if "error" in said:
        raise ValueError(said["error"])
    return said["device"]
