"""Export the demo page's bundled images: a dozen real Fashion-MNIST test images, as PNG files.

Which ones: the first test image of every class, then the next Shirt and Pullover (the classes the
network finds hardest, so some samples run deeper than the first exit). Written to
service/api/static/samples/ with samples.json (file, true label, index in the test split), which the
page lists. Needs `apt-get install -y dataset-fashion-mnist`.

Usage: .venv/bin/python scripts/export_ui_samples.py [--out service/api/static/samples]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from PIL import Image

from erde.data import load_fashion_mnist

EXTRA = ("Shirt", "Pullover")  # a second image of each of these, after one of every class


def pick(labels: list[int], classes: list[str]) -> list[int]:
    """Test-split indices: the first of each class in class order, then the next of each EXTRA class."""
    firsts = [labels.index(c) for c in range(len(classes))]
    seconds = [labels.index(classes.index(name), firsts[classes.index(name)] + 1) for name in EXTRA]
    return firsts + seconds


def export(out: Path) -> list[dict]:
    data = load_fashion_mnist("test")
    labels = data.labels.tolist()
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for n, index in enumerate(pick(labels, data.classes)):
        label = data.classes[labels[index]]
        name = f"{n:02d}-{re.sub(r'[^a-z0-9]+', '-', label.lower()).strip('-')}.png"
        Image.fromarray(data.images[index, 0].numpy()).save(out / name, optimize=True)
        entries.append({"file": name, "label": label, "test_index": index})
    (out / "samples.json").write_text(json.dumps(entries, indent=1) + "\n")
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "service/api/static/samples")
    args = parser.parse_args()
    for entry in export(args.out):
        print(f"{entry['file']:<22} test[{entry['test_index']}] {entry['label']}")


if __name__ == "__main__":
    main()
