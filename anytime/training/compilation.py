"""torch.compile of the training steps (`--compile`): fewer, fused kernels for the network's forward and
backward, and for DR-MGF's gated forward, whose per-layer gate arithmetic (lateral normalisation, gate,
slice norms; about ten small kernels per gated conv and step) is what made a gated epoch cost far more
than T + 1 joint epochs on a GPU (docs/drmgf.md).

The model is compiled in place (`nn.Module.compile`): its parameter names, state dict, checkpoints and
saved weights are those of the plain model, and `functional_call` with substituted weights (DR-MGF's
gated and fused networks) runs the compiled graph without recompiling, the weights being graph inputs.
A method compiles its own step functions through `TrainingContext.compiled`.

A compiled graph is differentiated correctly once per forward only: a second backward through it
(`retain_graph=True`, one per exit) returned wrong gradients, their error as large as the gradients
themselves (relative error of the norm: median 1.0 for the second exit's; test-convnet, torch 2.13, CPU),
while the first matched eager to 1e-7. Methods that take one backward per exit through a shared forward
(the TorchJD aggregators) set `compilable = False` and are refused under `--compile`.

Modes are torch.compile's: "default"; "reduce-overhead" (CUDA graphs on a GPU, default elsewhere);
"max-autotune" (longer compilation, autotuned kernels). Compilation numerics differ from eager ones by
float rounding only, so `--resume` may switch it on or off.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from anytime.errors import ConfigError

COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
_CPP_COMPILERS = ("c++", "g++", "clang++")

F = TypeVar("F", bound=Callable[..., object])


def check_compile(mode: str, device: torch.device) -> None:
    """Refuse, in one line, a `--compile` that this machine cannot run: before any data is read, not as
    a compiler traceback in the middle of the first step. `mode` is one of COMPILE_MODES (`TrainConfig`
    checks that)."""
    if mode == "off":
        return
    if not torch._dynamo.is_dynamo_supported():
        raise ConfigError(
            f"--compile {mode}: torch.compile is not supported by this Python/torch build "
            f"(Python {'.'.join(map(str, sys.version_info[:3]))}, torch {torch.__version__}); "
            "drop --compile"
        )
    if device.type == "cpu":
        wanted = os.environ.get("CXX")
        candidates = (wanted,) if wanted else _CPP_COMPILERS
        if not any(shutil.which(c) for c in candidates if c):
            raise ConfigError(
                f"--compile {mode} on the CPU needs a C++ compiler for torch.compile's kernels and found "
                f"{'CXX=' + wanted if wanted else 'none of ' + ', '.join(_CPP_COMPILERS)} on PATH; install one "
                "(e.g. apt install g++) or drop --compile"
            )
    elif device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise ConfigError(
            f"--compile {mode} on a GPU needs triton, which this torch install lacks; install torch's CUDA "
            "build (it ships triton) or drop --compile"
        )


def _torch_mode(mode: str) -> str | None:
    return None if mode == "default" else mode


def compile_model(model: nn.Module, mode: str, num_exits: int) -> None:
    """Compile `model`'s forward in place (nothing when `mode` is "off")."""
    if mode == "off":
        return
    # One graph per exit for a method that differentiates each exit's network apart (DR-MGF's gated
    # passes), and train, no-grad and eval variants of the plain forward: more than dynamo's default 8
    # specialisations of one function, past which it silently falls back to eager.
    limit = 2 * num_exits + 8
    if torch._dynamo.config.recompile_limit < limit:
        torch._dynamo.config.recompile_limit = limit
    model.compile(mode=_torch_mode(mode))


def compile_function(fn: F, mode: str) -> F:
    """`fn` compiled with `mode`, or `fn` itself when "off"."""
    if mode == "off":
        return fn
    return torch.compile(fn, mode=_torch_mode(mode))  # type: ignore[return-value]
