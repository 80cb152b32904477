"""Streaming safetensors reading and writing: one tensor in memory at a time.

Why not ``safetensors.torch.save_file`` / ``safe_open``: ``save_file`` needs every tensor of a
shard in memory at once (up to 5 GB per shard), and ``safe_open`` memory-maps the file, so every
page it touched counts as resident memory until the file is closed. The format is simple
(8-byte little-endian header length, a JSON header with dtype/shape/byte range per tensor, then
the raw little-endian bytes), so we read a tensor with one positioned ``readinto`` and write a
shard by planning its header up front (all shapes are known before any data is produced) and
appending tensors in that order. Files written here are read back by the ``safetensors``
library in the tests, and by ``transformers``.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

import torch

# safetensors dtype names <-> torch dtypes (those a Llama checkpoint can contain).
DTYPE_TO_TORCH: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_DTYPE: dict[torch.dtype, str] = {v: k for k, v in DTYPE_TO_TORCH.items()}

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library refuses larger headers too


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a safetensors file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    """Absolute byte offset of the first byte of data in ``file``."""
    nbytes: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse a safetensors header without touching the tensor data."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > _MAX_HEADER_BYTES:
            raise ValueError(f"{path}: not a safetensors file (header length {header_len})")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    data_start = 8 + header_len
    file_size = os.path.getsize(path)
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPE_TO_TORCH:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        if data_start + end > file_size:
            raise ValueError(f"{path}: tensor {name} runs past the end of the file (truncated download?)")
        entries[name] = TensorEntry(
            file=path, dtype=DTYPE_TO_TORCH[info["dtype"]], shape=tuple(info["shape"]),
            begin=data_start + begin, nbytes=end - begin,
        )
    return entries


def read_tensor(entry: TensorEntry, handle: BinaryIO | None = None) -> torch.Tensor:
    """Read one tensor into fresh (anonymous, not file-mapped) memory."""
    out = torch.empty(entry.shape, dtype=entry.dtype)
    buf = out.view(-1).view(torch.uint8).numpy() if out.numel() else memoryview(bytearray(0))
    if len(buf) != entry.nbytes:
        raise ValueError(f"{entry.file}: byte size {entry.nbytes} does not match shape {entry.shape} {entry.dtype}")

    def _read(f: BinaryIO) -> None:
        f.seek(entry.begin)
        got = f.readinto(buf)
        if got != entry.nbytes:
            raise ValueError(f"{entry.file}: short read ({got} of {entry.nbytes} bytes)")

    if handle is not None:
        _read(handle)
    else:
        with open(entry.file, "rb") as f:
            _read(f)
    return out


class SafetensorsShardWriter:
    """Write one safetensors file whose tensor list is fixed in advance, one tensor at a time.

    ``specs`` is the ordered list of ``(name, shape, dtype)``; ``write(name, tensor)`` must then
    be called in exactly that order. The header is written first, so nothing has to be buffered.
    """

    def __init__(self, path: Path, specs: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._expected = list(specs)
        self._next = 0
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, shape, dtype in self._expected:
            nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": TORCH_TO_DTYPE[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the reference writer aligns data to 8 bytes
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)))
        self._file.write(encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._expected):
            raise RuntimeError(f"{self.path}: unexpected extra tensor {name}")
        exp_name, exp_shape, exp_dtype = self._expected[self._next]
        if (name, tuple(tensor.shape), tensor.dtype) != (exp_name, tuple(exp_shape), exp_dtype):
            raise RuntimeError(
                f"{self.path}: expected {exp_name} {tuple(exp_shape)} {exp_dtype} next, "
                f"got {name} {tuple(tensor.shape)} {tensor.dtype}")
        data = tensor.detach().cpu().contiguous()
        if data.numel():
            self._file.write(data.view(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._expected):
            missing = [n for n, _, _ in self._expected[self._next:]]
            self._file.close()
            raise RuntimeError(f"{self.path}: closed before writing {missing[:3]}...")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def plan_shards(specs: Sequence[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int
                ) -> list[list[tuple[str, tuple[int, ...], torch.dtype]]]:
    """Split the ordered tensor list into consecutive shards of at most ``max_shard_bytes``
    (a single tensor larger than that gets a shard of its own, as transformers does)."""
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = _numel(spec[1]) * torch.empty((), dtype=spec[2]).element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards
