"""The process model: `erde serve` (`cli`), one worker or a supervisor of several that drains on
SIGTERM and reloads on SIGHUP (`main`), every queued connection accepted at each turn of the loop
(`accept`), the metrics directory the workers share (`multiproc`), and
the app factory (`app`) that assembles the API, the edge and the engine. May import every layer."""
