"""Read what the runtime needs from an ONNX file without the `onnx` package or a session.

An ONNX model is a protobuf ``ModelProto``. Its metadata (``metadata_props``), its graph's inputs
and outputs (names and shapes) and its operators can be read at the wire level: walk the fields,
and seek past the ones not needed (the weights, which are nearly all of the file). Opening a
model folder this way costs well under a millisecond per graph, where an ONNX Runtime session
costs ~12 ms: `aae_runtime.model` reads every graph this way at load and creates a session only
for the graphs a command runs.

Field numbers are those of onnx/onnx.proto (stable since IR version 3).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path

from aae_runtime.contract.errors import ModelError

# ModelProto
_MODEL_GRAPH, _MODEL_METADATA = 7, 14
# GraphProto; TensorProto's name and raw_data
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT = 1, 5, 11, 12
_TENSOR_NAME, _TENSOR_RAW = 8, 9
# NodeProto, ValueInfoProto, TypeProto, TypeProto.Tensor, TensorShapeProto, its Dimension
_NODE_OP_TYPE, _NODE_DOMAIN = 4, 7
_VALUE_NAME, _VALUE_TYPE = 1, 2
_TYPE_TENSOR, _TENSOR_SHAPE, _SHAPE_DIM, _DIM_VALUE, _DIM_PARAM = 1, 2, 1, 1, 2
_ENTRY_KEY, _ENTRY_VALUE = 1, 2  # StringStringEntryProto


# The operators aae-export emits (every family, architecture, score and variant: fp32, the int8
# QDQ graphs, fp16 with its Casts), in the default ONNX domain. A graph with any other operator,
# or an operator of another domain, was not written by aae-export: `check_operators` refuses it
# before ONNX Runtime sees it (no Loop, If or Scan that could run for ever, no custom ops).
EXPORTED_OPERATORS = frozenset({
    "Abs", "Add", "ArgMin", "AveragePool", "Cast", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv",
    "ConvTranspose", "DequantizeLinear", "Div", "Equal", "Exp", "Expand", "Flatten", "Gather", "GatherND", "Gemm",
    "Identity", "Log", "MatMul", "Max", "Min", "Mul", "Neg", "Pad", "Pow", "QuantizeLinear", "Range", "ReduceMean",
    "ReduceMin", "Relu", "Reshape", "Shape", "Sigmoid", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Transpose",
    "Unsqueeze", "Where", "Greater",
    "InstanceNormalization", "MaxPool", "Resize",  # the draem family's segmenter (group norm, U-Net halvings and doublings)
})


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


@dataclass(frozen=True)
class Arg:
    """A graph input or output, as ONNX Runtime's NodeArg describes it: name and shape (ints,
    names of symbolic dimensions, None where unknown)."""

    name: str
    shape: list


@dataclass
class GraphFile:
    """What the runtime reads from one ONNX file: metadata, inputs, outputs, operators. Its
    ``get_inputs``/``get_outputs``/``custom_metadata_map`` mirror ONNX Runtime's session API."""

    path: Path
    custom_metadata_map: dict[str, str] = field(default_factory=dict)
    inputs: list[Arg] = field(default_factory=list)
    outputs: list[Arg] = field(default_factory=list)
    operators: set[tuple[str, str]] = field(default_factory=set)  # (domain, op_type); "" = the default domain
    # raw_data of the initializers named in `read_graph_file(..., initializers=...)`
    initializers: dict[str, bytes] = field(default_factory=dict)

    def get_inputs(self) -> list[Arg]:
        return self.inputs

    def get_outputs(self) -> list[Arg]:
        return self.outputs


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value) for each field in buf[start:end]; the value is an int
    for varints and fixed-width fields, a (start, end) span for length-delimited ones."""
    for _, number, wire, value in _spans(buf, start, end):
        yield number, wire, value


def _spans(buf, start: int, end: int):
    """`_fields` with each field's first byte (its key) in front."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire == 1:
            value, pos = 0, pos + 8
        elif wire == 5:
            value, pos = 0, pos + 4
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            value, pos = (pos, pos + length), pos + length
        else:
            raise WireError(f"unsupported wire type {wire}")
        if pos > end or number == 0:
            raise WireError("a field runs past the end of its message")
        yield first, number, wire, value


def _text(buf, span) -> str:
    try:
        return bytes(buf[span[0]:span[1]]).decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("a string is not UTF-8") from None


def _arg(buf, span) -> Arg:
    name, shape = "", []
    for number, wire, value in _fields(buf, *span):
        if number == _VALUE_NAME and wire == 2:
            name = _text(buf, value)
        elif number == _VALUE_TYPE and wire == 2:
            shape = _shape(buf, value)
    return Arg(name, shape)


def _shape(buf, type_span) -> list:
    for number, wire, tensor in _fields(buf, *type_span):
        if number != _TYPE_TENSOR or wire != 2:
            continue
        for n, w, shape in _fields(buf, *tensor):
            if n != _TENSOR_SHAPE or w != 2:
                continue
            dims = []
            for dn, dw, dim in _fields(buf, *shape):
                if dn != _SHAPE_DIM or dw != 2:
                    continue
                size = None
                for kn, kw, v in _fields(buf, *dim):
                    if kn == _DIM_VALUE and kw == 0:
                        size = v
                    elif kn == _DIM_PARAM and kw == 2:
                        size = _text(buf, v)
                dims.append(size)
            return dims
    return []


def _tensor(buf, span) -> tuple[str, tuple[int, int] | None]:
    """A TensorProto's name and the span of its raw_data (None if it has none)."""
    name, raw = "", None
    for number, wire, value in _fields(buf, *span):
        if number == _TENSOR_NAME and wire == 2:
            name = _text(buf, value)
        elif number == _TENSOR_RAW and wire == 2:
            raw = value
    return name, raw


def _graph(buf, span, out: GraphFile, wanted: frozenset = frozenset()) -> None:
    initialized = set()
    for number, wire, value in _fields(buf, *span):
        if wire != 2:
            continue
        if number == _GRAPH_INITIALIZER:
            name, raw = _tensor(buf, value)
            initialized.add(name)
            if name in wanted and raw is not None:
                out.initializers[name] = bytes(buf[raw[0]:raw[1]])
        elif number == _GRAPH_INPUT:
            out.inputs.append(_arg(buf, value))
        elif number == _GRAPH_OUTPUT:
            out.outputs.append(_arg(buf, value))
        elif number == _GRAPH_NODE:
            op, domain = "", ""
            for n, w, v in _fields(buf, *value):
                if n == _NODE_OP_TYPE and w == 2:
                    op = _text(buf, v)
                elif n == _NODE_DOMAIN and w == 2:
                    domain = _text(buf, v)
            out.operators.add(("" if domain == "ai.onnx" else domain, op))
    # an input with an initializer of its name is optional (the initializer is its default): ONNX
    # Runtime does not list it among the inputs a caller must feed, and neither does this
    out.inputs = [a for a in out.inputs if a.name not in initialized]


def read_graph_file(path: str | Path, initializers: frozenset = frozenset()) -> GraphFile:
    """Metadata, inputs, outputs and operators of the ONNX file at ``path`` (and the raw data of
    the ``initializers`` named). Raises ModelError naming the file when it cannot be read or is
    not a well-formed ONNX model."""
    path = Path(path)
    out = GraphFile(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            seen_graph = False
            for number, wire, value in _fields(buf, 0, len(buf)):
                if number == _MODEL_GRAPH and wire == 2:
                    _graph(buf, value, out, frozenset(initializers))
                    seen_graph = True
                elif number == _MODEL_METADATA and wire == 2:
                    entry = dict((n, _text(buf, v)) for n, w, v in _fields(buf, *value) if w == 2)
                    out.custom_metadata_map[entry.get(_ENTRY_KEY, "")] = entry.get(_ENTRY_VALUE, "")
    except (OSError, ValueError) as exc:  # ValueError: mmap of an empty file, WireError
        raise ModelError(f"cannot load {path.name} as an ONNX model ({exc}): re-export it") from None
    if not seen_graph:
        raise ModelError(f"cannot load {path.name} as an ONNX model (it holds no graph): re-export it")
    return out


def check_operators(graph: GraphFile) -> None:
    """Raise ModelError unless every operator of ``graph`` is one aae-export emits."""
    foreign = sorted(f"{domain}.{op}" if domain else op for domain, op in graph.operators
                     if domain or op not in EXPORTED_OPERATORS)
    if foreign:
        raise ModelError(f"{graph.path.name} uses operators aae-export never writes ({', '.join(foreign[:5])}"
                         f"{', ...' if len(foreign) > 5 else ''}): it is not a model of this tool; export the model again")


def replace_initializers(model: bytes, values: dict[str, bytes]) -> bytes:
    """``model`` (a serialized ModelProto) with the raw_data of the named initializers replaced
    by ``values`` of the same length, every other byte kept. Raises ModelError when one is
    missing or of another size."""
    buf = memoryview(model)
    out = bytearray(model)
    found = set()
    for number, wire, graph in _fields(buf, 0, len(buf)):
        if number != _MODEL_GRAPH or wire != 2:
            continue
        for n, w, tensor in _fields(buf, *graph):
            if n != _GRAPH_INITIALIZER or w != 2:
                continue
            name, raw = _tensor(buf, tensor)
            if name in values and raw is not None and raw[1] - raw[0] == len(values[name]):
                out[raw[0]:raw[1]] = values[name]
                found.add(name)
    missing = set(values) - found
    if missing:
        raise ModelError(f"the graph has no initializer {sorted(missing)[0]!r} of the expected size: export the model again")
    return bytes(out)


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _encode_field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def set_metadata_prop(model: bytes, key: str, value: str) -> bytes:
    """A serialized ONNX ModelProto with its ``metadata_props[key]`` set to ``value``: the entries
    with this key dropped, the new one appended, every other byte kept as it was."""
    buf = memoryview(model)
    out = bytearray()
    try:
        for first, number, wire, value_ in _spans(buf, 0, len(buf)):
            end = value_[1] if wire == 2 else None
            if number == _MODEL_METADATA and wire == 2:
                entry = dict((n, _text(buf, v)) for n, w, v in _fields(buf, *value_) if w == 2)
                if entry.get(_ENTRY_KEY) == key:
                    continue
            if end is None:  # a scalar field: up to the next field's key
                continue_at = _next_start(buf, first)
                out += buf[first:continue_at]
            else:
                out += buf[first:end]
    except WireError as exc:
        raise ModelError(f"not an ONNX model ({exc}): re-export it") from None
    entry = _encode_field(_ENTRY_KEY, key.encode()) + _encode_field(_ENTRY_VALUE, value.encode())
    return bytes(out + _encode_field(_MODEL_METADATA, entry))


def _next_start(buf, first: int) -> int:
    """The offset just past the scalar field starting at ``first``."""
    key, pos = _varint(buf, first, len(buf))
    wire = key & 7
    if wire == 0:
        return _varint(buf, pos, len(buf))[1]
    return pos + (8 if wire == 1 else 4)
