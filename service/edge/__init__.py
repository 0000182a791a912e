"""The HTTP edge: uvicorn's protocol with the limits an exposed server needs and lingering close
(`protocol`), request accounting and the Host check (`middleware`), refusals decided from the request
line and headers (`admission`), and the body parser that reads every option (`multipart`). May import
the engine (admission asks a model's queue) and the base modules; never the API or `server`."""
