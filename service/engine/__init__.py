"""The engine: the served models (`registry`, `runtime`), what a budget means (`policy`) and how
load degrades it (`overload`, `adaptive`), the queue and micro-batches (`worker`, `batcher`), and the
inference process that decodes (`decode`) and runs each batch stage by stage (`process`, `compute`).
May import `erde` and the base modules of `service`; never the edge, the API or `server`."""
