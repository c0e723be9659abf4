"""Rebuild tests/data/pattern-bundle with the current exporter (needs torch): python tests/data/make_pattern_bundle.py"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from conftest import export_pattern_bundle, train_pattern_convnet  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = export_pattern_bundle(Path(tmp), train_pattern_convnet())
        target = HERE / "pattern-bundle"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(bundle, target)
    print(f"wrote {target}")
