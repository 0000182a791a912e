"""The API: thin routes (`routes`), the Open Inference Protocol v2 (`oip`), the demo page and
`/stats` (`ui`), and the request path as named steps (`pipeline`: read, resolve, infer, encode).
May import the edge (to read a request's body), the engine and the base modules; never `server`."""
