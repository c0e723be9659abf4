"""Write the sample images shipped with the embedded default model.

Takes the first N test images of each class from the Fashion-MNIST npz (never training or
validation images) and writes them as PNG files into class-named folders, so that
`anytime serve --budget 50%` has something real to classify and can report accuracy.
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def folder_name(class_name: str) -> str:
    # Class names may hold characters that are not allowed in a path ("T-shirt/top").
    return re.sub(r"[^\w\- ]+", "_", class_name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--npz", default="../shared/data/fashion-mnist.npz")
    parser.add_argument("--out", default="anytime/assets/samples")
    parser.add_argument("--per-class", type=int, default=10)
    args = parser.parse_args()

    data = np.load(args.npz)
    x, y = data["x_test"], data["y_test"]
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    for label, name in enumerate(FASHION_MNIST_CLASSES):
        folder = out / folder_name(name)
        folder.mkdir(parents=True)
        for index in np.flatnonzero(y == label)[: args.per_class]:
            Image.fromarray(x[index], mode="L").save(folder / f"test{index:05d}.png", optimize=True)
    print(f"wrote {args.per_class * len(FASHION_MNIST_CLASSES)} images to {out}")


if __name__ == "__main__":
    main()
