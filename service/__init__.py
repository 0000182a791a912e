"""The HTTP service, in four layers that import only downwards (docs/architecture.md):

- `service.server`: processes, signals and drain; the app factory that assembles the rest;
- `service.api`: routes, the Open Inference Protocol, the page, and the request path (`pipeline`);
- `service.edge`: the HTTP edge, from bytes to a request, and the refusals made before the body;
- `service.engine`: models, budgets, queues and the inference processes.

Beneath them all, usable by any layer: `settings` (the one settings class), `metrics` (every
collector), `errors` (domain errors and the error body per protocol), `record` (what one request
did), `endpoints` (the one endpoint table), `schemas` (typed options and replies) and `numbers`
(the one parser of the numbers a client sends).
"""
