"""What the user sees while an epoch runs: the current phase, a running loss and images/s on a tqdm bar
(main process, terminal only), and the image count behind the epoch's images/s."""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    """Per-phase progress of one run. The bar stays quiet off a terminal (CI logs) and on other ranks."""

    def __init__(self, epochs: int, *, show: bool) -> None:
        self.epochs = epochs
        self.show = show
        self.phase = ""
        self.epoch_images = 0
        self.running_loss: float | None = None
        self._bar: Any = None
        self._phase_start = 0.0
        self._phase_images = 0

    def start_epoch(self) -> None:
        self.epoch_images = 0

    def start_phase(self, epoch: int, phase: str, total: int) -> None:
        self.phase = phase
        self.running_loss = None
        self._phase_start = time.perf_counter()
        self._phase_images = 0
        self.close()
        if self.show and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, desc=f"epoch {epoch + 1}/{self.epochs} {phase}", leave=False, dynamic_ncols=True
            )

    def step(self, loss: float, images: int) -> None:
        """One optimisation step over `images` images (all ranks together)."""
        self.epoch_images += images
        self._phase_images += images
        self.running_loss = loss if self.running_loss is None else 0.9 * self.running_loss + 0.1 * loss
        if self._bar is not None:
            elapsed = max(time.perf_counter() - self._phase_start, 1e-9)
            self._bar.update(1)
            self._bar.set_postfix(
                loss=f"{self.running_loss:.4f}", img_s=f"{self._phase_images / elapsed:.0f}", refresh=False
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
