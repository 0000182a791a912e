"""`python -m service`: the metrics directory first (when one is named), then the server."""

from service.server.multiproc import prepare_metrics_dir

prepare_metrics_dir()  # before any metric exists: a named directory must be there, and empty

from service.server.main import run  # noqa: E402

run()
