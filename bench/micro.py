"""Micro-benchmarks behind single figures of reports/service-profile.md and the README's design
notes, each measured in isolation (best of several repeats, one torch thread):

- decoding a 28x28 Fashion-MNIST PNG: PIL open + load, torchvision.io.decode_png (not used by the service:
  it crashes the process on a corrupt PNG), normalising one image, and the service's whole decode_image
  (checks, mode, normalise), alone and under the decode budget, its handler set per image or per batch;
- encoding a typical /classify reply: orjson against json.dumps;
- each stage of the served network at batch 1 and 32: its share of a full pass against its share
  of the MACs, and oneDNN against torch's native convolutions.

Usage: .venv/bin/python -m bench.micro
"""

from __future__ import annotations

import argparse
import io
import json
import timeit

import numpy as np
import orjson
import torch
import torchvision.io
from PIL import Image

from bench.common import default_artifact, sample_images, table
from erde.nets import fuse_for_inference
from service.engine.compute import _set_mkldnn
from service.engine.decode import _normalization_table, decode_budget, decode_image
from service.engine.limits import ImageLimits

REPLY = {"model": "fashion-mnist", "version": "1", "label": "Ankle boot", "class_id": 9, "confidence": 0.9871,
         "top_k": [{"label": "Ankle boot", "class_id": 9, "probability": 0.9871}], "exit": 0, "exits": 3,
         "entropy": 0.0712, "threshold": 0.7834399, "budget": 0.25, "budget_clamped": False,
         "expected_accuracy": 0.9065, "macs": 979712, "macs_fraction": 0.1603, "max_exit": None,
         "latency_ms": {"decode": 0.08, "queue": 1.2, "inference": 0.9, "total": 2.6}}


def best_us(fn, number: int = 2000, repeat: int = 5) -> float:
    """Fastest of `repeat` runs, in µs per call."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    torch.set_num_threads(1)
    art = default_artifact()
    buf = io.BytesIO()
    sample_images(1, art.spec.size)[0].save(buf, "PNG")
    png = buf.getvalue()
    png_tensor = torch.frombuffer(bytearray(png), dtype=torch.uint8)
    limits = ImageLimits(16_000_000, 8, ("PNG",))
    lookup = _normalization_table(art.spec.mean, art.spec.std)
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert(art.spec.mode))
    def budget_per_image() -> None:
        with decode_budget(0.25) as budget, budget:
            decode_image(png, art.spec, limits)

    def budget_per_batch() -> None:  # 32 images, as the inference process decodes a batch
        with decode_budget(0.25) as budget:
            for _ in range(32):
                with budget:
                    decode_image(png, art.spec, limits)

    calls = [("PNG decode: PIL open + load", lambda: Image.open(io.BytesIO(png)).load(), 2000, 1),
             ("PNG decode: torchvision.io.decode_png", lambda: torchvision.io.decode_png(png_tensor), 2000, 1),
             ("normalise one image (the lookup table decode_image uses)",
              lambda: torch.from_numpy(lookup[0][pixels][None]), 20000, 1),
             ("service decode_image (checks, mode, normalise)", lambda: decode_image(png, art.spec, limits), 2000, 1),
             ("decode_image under the decode budget, its handler set per image", budget_per_image, 2000, 1),
             ("decode_image under the decode budget, its handler set per batch (per image)", budget_per_batch, 100, 32),
             ("reply: orjson.dumps", lambda: orjson.dumps(REPLY), 20000, 1),
             ("reply: json.dumps", lambda: json.dumps(REPLY), 20000, 1)]  # (what, call, calls timed, images a call)
    rows = [[what, f"{best_us(fn, number) / per:.2f}"] for what, fn, number, per in calls]
    print(f"# Micro-benchmarks: {art.name}/{art.version}, torch threads 1\n")
    print(table(["what", "µs per call"], rows))

    model = fuse_for_inference(art.model)
    macs = art.macs_per_exit
    stage_macs = [b - a for a, b in zip([0, *macs[:-1]], macs, strict=True)]
    for batch in (1, 32):
        h = torch.zeros(batch, art.spec.channels, art.spec.size, art.spec.size)
        times: dict[bool, list[float]] = {True: [], False: []}
        with torch.inference_mode():
            for i in range(model.num_exits):
                for onednn in (True, False):
                    _set_mkldnn(onednn)
                    times[onednn].append(best_us(lambda i=i, h=h: model.exit(i, model.stage(i, h)), 10 + 200 // batch))
                _set_mkldnn(True)
                h = model.stage(i, h)
        best = [min(times[True][i], times[False][i]) for i in range(model.num_exits)]
        stage_rows = [[i, f"{best[i]:.0f}", f"{best[i] / sum(best):.0%}", f"{stage_macs[i] / macs[-1]:.0%}",
                       f"{times[True][i] / times[False][i]:.2f}x"] for i in range(model.num_exits)]
        print(f"\nStages of the served network at batch {batch} (stage + its exit head, faster backend):\n")
        print(table(["stage", "µs", "share of the pass", "share of the MACs", "oneDNN / native time"], stage_rows))


if __name__ == "__main__":
    main()
