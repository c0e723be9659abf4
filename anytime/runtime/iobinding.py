"""IO binding: stage state tensors stay on the execution device between stages; only logits come to the host.

ONNX Runtime cannot index an `OrtValue`, yet early exit must drop the rows that left (compaction) and the
refilling scheduler must join and split queued rows. Both are done by tiny ONNX graphs (one Gather, or one
Concat, over all state tensors of a stage boundary) run on the same device. The serving install has no
`onnx` package, so the graphs are written here directly in protobuf's wire format: a ModelProto needs a
dozen fields, and building them at load time keeps every bundle, old or new, working without re-export.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from anytime.errors import ConfigError
from anytime.runtime.threadpool import configure_threads

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# Providers whose outputs we know how to bind to their device: provider -> onnxruntime device type.
BINDABLE = {CUDA: "cuda", CPU: "cpu"}
IO_BINDING_CHOICES = ("auto", True, False)
MAX_CONCAT_INPUTS = 8  # more chunks are joined as a tree of 8-input Concat graphs (few graphs to build)

# onnx TensorProto.DataType for onnxruntime's type strings (ORT's NodeArg.type).
_ELEM_TYPES = {
    "tensor(float)": 1,
    "tensor(uint8)": 2,
    "tensor(int8)": 3,
    "tensor(uint16)": 4,
    "tensor(int16)": 5,
    "tensor(int32)": 6,
    "tensor(int64)": 7,
    "tensor(bool)": 9,
    "tensor(float16)": 10,
    "tensor(double)": 11,
    "tensor(bfloat16)": 16,
}
_INT64 = 7
_IR_VERSION = 8
_OPSET = 13


# --- protobuf wire format (only what a ModelProto with a few nodes needs) ------------------------------
def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # negative int64 values are ten-byte two's complement varints
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def _str_field(number: int, text: str) -> bytes:
    return _bytes_field(number, text.encode("utf-8"))


def _value_info(name: str, elem_type: int, rank: int) -> bytes:
    # ValueInfoProto{name=1, type=2: TypeProto{tensor_type=1: {elem_type=1, shape=2: {dim=1: {dim_param=2}}}}}:
    # a known rank, every size symbolic (rows vary; the rest is whatever the stage graph gives).
    shape = b"".join(_bytes_field(1, _str_field(2, f"{name}_d{i}")) for i in range(rank))
    tensor = _int_field(1, elem_type) + _bytes_field(2, shape)
    return _str_field(1, name) + _bytes_field(2, _bytes_field(1, tensor))


def _node(op_type: str, inputs: Sequence[str], outputs: Sequence[str], name: str, axis: int | None) -> bytes:
    # NodeProto{input=1, output=2, name=3, op_type=4, attribute=5: AttributeProto{name=1, i=3, type=20 (INT=2)}}
    body = b"".join(_str_field(1, i) for i in inputs) + b"".join(_str_field(2, o) for o in outputs)
    body += _str_field(3, name) + _str_field(4, op_type)
    if axis is not None:
        body += _bytes_field(5, _str_field(1, "axis") + _int_field(3, axis) + _int_field(20, 2))
    return body


def _model(nodes: list[bytes], inputs: list[bytes], outputs: list[bytes], name: str) -> bytes:
    graph = b"".join(_bytes_field(1, n) for n in nodes) + _str_field(2, name)
    graph += b"".join(_bytes_field(11, i) for i in inputs) + b"".join(_bytes_field(12, o) for o in outputs)
    opset = _str_field(1, "") + _int_field(2, _OPSET)
    # ModelProto{ir_version=1, producer_name=2, graph=7, opset_import=8}
    return _int_field(1, _IR_VERSION) + _str_field(2, "anytime") + _bytes_field(7, graph) + _bytes_field(8, opset)


def elem_type(type_string: str) -> int:
    if type_string not in _ELEM_TYPES:
        raise ConfigError(f"IO binding cannot move state tensors of type {type_string}; use io_binding=False")
    return _ELEM_TYPES[type_string]


def gather_graph(names: Sequence[str], elem_types: Sequence[int], ranks: Sequence[int]) -> bytes:
    """Inputs `names` + `rows` (int64); outputs `<name>:rows` = Gather(name, rows, axis=0) for each name."""
    nodes = [_node("Gather", [n, "rows"], [f"{n}:rows"], f"gather_{i}", None) for i, n in enumerate(names)]
    typed = list(zip(names, elem_types, ranks))
    inputs = [_value_info(n, t, r) for n, t, r in typed] + [_value_info("rows", _INT64, 1)]
    outputs = [_value_info(f"{n}:rows", t, r) for n, t, r in typed]
    return _model(nodes, inputs, outputs, "anytime_gather_rows")


def concat_graph(names: Sequence[str], elem_types: Sequence[int], ranks: Sequence[int], parts: int) -> bytes:
    """Inputs `<name>:<j>` for j < parts; outputs `name` = Concat(<name>:0, ..., axis=0) for each name."""
    nodes = [_node("Concat", [f"{n}:{j}" for j in range(parts)], [n], f"concat_{i}", 0) for i, n in enumerate(names)]
    typed = list(zip(names, elem_types, ranks))
    inputs = [_value_info(f"{n}:{j}", t, r) for n, t, r in typed for j in range(parts)]
    outputs = [_value_info(n, t, r) for n, t, r in typed]
    return _model(nodes, inputs, outputs, "anytime_concat_rows")


# --- the device side of the executor -------------------------------------------------------------------
def resolve_io_binding(io_binding: Any, providers_in_use: Sequence[str]) -> str | None:
    """The device type to bind state tensors to, or None for the plain (host) path.

    "auto": on with CUDA (state tensors stay on the GPU), off on CPU where host arrays already are the
    device's. True: on, for CUDA and also CPU (tests compare it with the plain path); another provider
    first in line is an error. False: off.
    """
    if isinstance(io_binding, str) and io_binding.lower() in ("true", "on", "false", "off"):
        io_binding = io_binding.lower() in ("true", "on")
    if not (io_binding == "auto" or isinstance(io_binding, bool)):
        raise ConfigError(f"io_binding={io_binding!r}: use 'auto', True or False")
    first = providers_in_use[0] if providers_in_use else CPU
    if io_binding is False or (io_binding == "auto" and first != CUDA):
        return None
    if first not in BINDABLE:
        raise ConfigError(
            f"io_binding=True supports {' and '.join(BINDABLE)}, but onnxruntime runs this bundle on {first}; "
            "use io_binding='auto' or False"
        )
    return BINDABLE[first]


class DeviceRows:
    """Row operations (gather, concat) on the `OrtValue` state tensors of one stage boundary, on the device.

    `names`, `types`, `ranks`: the state tensors that stage k hands to stage k+1, their onnxruntime type
    strings and ranks.
    """

    def __init__(
        self,
        ort: Any,
        names: Sequence[str],
        types: Sequence[str],
        ranks: Sequence[int],
        device: str,
        device_id: int,
        providers: list[Any],
    ) -> None:
        self.ort = ort
        self.names = list(names)
        self.elem_types = [elem_type(t) for t in types]
        self.ranks = list(ranks)
        self.device = device
        self.device_id = device_id
        self.providers = providers
        self._gather = self._session(gather_graph(self.names, self.elem_types, self.ranks))
        self._concat: dict[int, Any] = {}

    def _session(self, graph: bytes) -> Any:
        options = self.ort.SessionOptions()
        options.log_severity_level = 3
        configure_threads(options, 1)
        return self.ort.InferenceSession(graph, sess_options=options, providers=self.providers)

    def _run(self, session: Any, feeds: dict[str, Any], outputs: Sequence[str]) -> list[Any]:
        binding = session.io_binding()
        for name, value in feeds.items():
            bind_input(binding, name, value)
        for name in outputs:
            binding.bind_output(name, self.device, self.device_id)
        session.run_with_iobinding(binding)
        return list(binding.get_outputs())

    def gather(self, state: dict[str, Any], rows: np.ndarray) -> dict[str, Any]:
        feeds = {n: state[n] for n in self.names}
        feeds["rows"] = np.ascontiguousarray(rows, dtype=np.int64)
        outs = self._run(self._gather, feeds, [f"{n}:rows" for n in self.names])
        return dict(zip(self.names, outs))

    def concat(self, states: Sequence[dict[str, Any]]) -> dict[str, Any]:
        parts = list(states)
        while len(parts) > 1:
            joined = []
            for start in range(0, len(parts), MAX_CONCAT_INPUTS):
                group = parts[start : start + MAX_CONCAT_INPUTS]
                joined.append(group[0] if len(group) == 1 else self._concat_group(group))
            parts = joined
        return parts[0]

    def _concat_group(self, group: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if len(group) not in self._concat:
            self._concat[len(group)] = self._session(concat_graph(self.names, self.elem_types, self.ranks, len(group)))
        feeds = {f"{n}:{j}": part[n] for j, part in enumerate(group) for n in self.names}
        return dict(zip(self.names, self._run(self._concat[len(group)], feeds, self.names)))


def bind_input(binding: Any, name: str, value: Any) -> None:
    if isinstance(value, np.ndarray):
        binding.bind_cpu_input(name, np.ascontiguousarray(value))
    else:
        binding.bind_ortvalue_input(name, value)


def rows_of(value: Any) -> int:
    return int(value.shape[0]) if isinstance(value, np.ndarray) else int(value.shape()[0])
