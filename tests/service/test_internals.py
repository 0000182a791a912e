"""The uvicorn and httptools internals the service extends, checked by name against what is installed.

service/edge/protocol.py subclasses uvicorn's httptools protocol and service/server/main.py its server and worker
process; both rely on attributes uvicorn does not document. pyproject.toml pins them exactly; this test
says which internal an upgrade removed, instead of a server that fails under load."""

from __future__ import annotations

import inspect
from importlib.metadata import version

import httptools
import pytest
import uvicorn
from uvicorn import config as uvicorn_config
from uvicorn.protocols.http import httptools_impl
from uvicorn.supervisors import multiprocess

PINNED = {"uvicorn": "0.54.0", "httptools": "0.9.0", "uvloop": "0.23.0", "fastapi": "0.165.0"}

# (owner, attribute): methods and module constants, checked on the class or module.
DEFINED = [
    (httptools_impl, "STATUS_LINE"), (httptools_impl, "HttpToolsProtocol"), (httptools_impl, "RequestResponseCycle"),
    (httptools_impl.HttpToolsProtocol, "connection_made"), (httptools_impl.HttpToolsProtocol, "connection_lost"),
    (httptools_impl.HttpToolsProtocol, "data_received"), (httptools_impl.HttpToolsProtocol, "on_message_begin"),
    (httptools_impl.HttpToolsProtocol, "on_headers_complete"),
    (httptools_impl.HttpToolsProtocol, "on_message_complete"),
    (httptools_impl.HttpToolsProtocol, "_unset_keepalive_if_required"),
    (httptools_impl.HttpToolsProtocol, "on_response_complete"), (httptools_impl, "FlowControl"),
    (httptools_impl.HttpToolsProtocol, "_start_asgi_task"),  # a request's cycle, before its task runs
    (httptools_impl.RequestResponseCycle, "send"), (httptools_impl.RequestResponseCycle, "run_asgi"),
    (uvicorn_config, "STARTUP_FAILURE"), (uvicorn.Config, "bind_socket"),
    (uvicorn.Server, "handle_exit"), (uvicorn.Server, "on_tick"), (uvicorn.Server, "startup"),
    (uvicorn.Server, "shutdown"),
    (multiprocess, "Process"), (multiprocess.Process, "target"), (multiprocess.Process, "is_ready"),
    (multiprocess.Process, "start"), (multiprocess.Process, "join"), (multiprocess.Process, "pid"),
    (multiprocess.Process, "exitcode"), (httptools, "HttpParserUpgrade"), (httptools, "HttpParserError"),
]
# Instance attributes: found where the class's own source assigns them.
ASSIGNED = {
    httptools_impl.HttpToolsProtocol: ["parser", "cycle", "connections", "tasks", "config", "server_state",
                                                "url", "headers", "loop", "transport", "flow", "app",
                                                "limit_concurrency"],
    httptools_impl.RequestResponseCycle: ["message_event", "disconnected", "response_complete",
                                                   "response_started", "more_body", "scope"],
    uvicorn.Server: ["servers", "should_exit", "started", "server_state", "lifespan"],
    uvicorn.Config: ["loaded_app", "http_protocol_class"],
    multiprocess.Process: ["process"],
}


@pytest.mark.parametrize("package", sorted(PINNED))
def test_installed_versions_are_the_pinned_ones(package: str) -> None:
    assert version(package) == PINNED[package], f"{package} {version(package)} is installed, pinned {PINNED[package]}"


@pytest.mark.parametrize("owner, name", DEFINED, ids=[f"{getattr(o, '__name__', o)}.{n}" for o, n in DEFINED])
def test_every_internal_the_service_extends_is_there(owner: object, name: str) -> None:
    assert hasattr(owner, name), f"uvicorn/httptools internal {getattr(owner, '__name__', owner)}.{name} is gone"


@pytest.mark.parametrize("cls", list(ASSIGNED), ids=[c.__qualname__ for c in ASSIGNED])
def test_every_attribute_the_service_reads_is_still_set(cls: type) -> None:
    source = inspect.getsource(cls)
    missing = [a for a in ASSIGNED[cls] if f"self.{a} =" not in source and f"self.{a}:" not in source]
    assert not missing, f"uvicorn's {cls.__qualname__} no longer sets {missing}"
