"""Is a checkpoint folder readable? Checked from its own index, without megatron-core or ranks.

A megatron ``torch_dist`` folder is PyTorch DCP: ``.metadata`` lists every stored tensor chunk
and object with the file, byte offset and length that hold it (``__R_I.distcp``, written by rank R),
plus ``common.pt`` and megatron's ``metadata.json``. Two levels of checking:

- ``storage_problems``: the index is readable and every file it names exists and is long enough
  for its records (missing or truncated files). Stat calls only: the trainer runs it on every
  rank before each load, so a damaged checkpoint fails on all ranks at once, naming the file.
- ``verify``: reads every record, one at a time, and checks that each tensor chunk loads with its
  recorded shape and dtype and holds only finite values; objects must at least be present.
  What ``tools/checkpoint_info.py --verify`` reports. Corruption that leaves finite values
  (a flipped mantissa bit) is not detectable: the format stores no checksums.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

DCP_INDEX_FILE = ".metadata"
REQUIRED_FILES = (DCP_INDEX_FILE, "metadata.json", "common.pt")


def read_index(ckpt_dir: str | Path):
    """The DCP index (``torch.distributed.checkpoint.metadata.Metadata``) of a checkpoint folder."""
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(ckpt_dir)).read_metadata()


def storage_problems(ckpt_dir: str | Path) -> list[str]:
    """Missing or truncated files of a checkpoint folder, one message per file (empty: fine)."""
    ckpt_dir = Path(ckpt_dir)
    problems = [f"{ckpt_dir / name}: missing" for name in REQUIRED_FILES if not (ckpt_dir / name).is_file()]
    if not (ckpt_dir / DCP_INDEX_FILE).is_file():
        return problems
    try:
        index = read_index(ckpt_dir)
    except Exception as e:  # a damaged index: any unpickling error
        return problems + [f"{ckpt_dir / DCP_INDEX_FILE}: unreadable index ({type(e).__name__}: {e})"]
    needed: dict[str, int] = {}
    for info in index.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(needed.items()):
        path = ckpt_dir / name
        if not path.is_file():
            problems.append(f"{path}: missing (the index has records in it)")
        elif path.stat().st_size < end:
            problems.append(f"{path}: truncated ({path.stat().st_size} bytes, records need {end})")
    return problems


@dataclass
class VerifyReport:
    tensors: int = 0
    """Stored tensors (global keys) in the index."""
    chunks_read: int = 0
    objects: int = 0
    bytes_read: int = 0
    problems: list[str] = field(default_factory=list)
    bad_files: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.problems


def data_files(ckpt_dir: str | Path) -> list[str]:
    """The files the index has records in (relative names), sorted."""
    return sorted({info.relative_path for info in read_index(ckpt_dir).storage_data.values()})


def verify(ckpt_dir: str | Path, on_file: Optional[Callable[[str], None]] = None,
           files: Optional[set[str]] = None) -> VerifyReport:
    """Read every record of a checkpoint folder (see module doc); collects every problem found.
    ``files``: read only the records in these files (relative names; a share of the work)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    ckpt_dir = Path(ckpt_dir)
    report = VerifyReport()
    for message in storage_problems(ckpt_dir):
        report.problems.append(message)
        report.bad_files.add(message.split(": ", 1)[0])
    try:
        index = read_index(ckpt_dir)
    except Exception:
        return report  # reported by storage_problems
    tensors = {k: md for k, md in index.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)}
    report.tensors = len(tensors)
    by_file: dict[str, list] = {}
    for idx, info in index.storage_data.items():
        by_file.setdefault(info.relative_path, []).append((idx, info))
    stored = {idx.fqn for idx in index.storage_data}
    for key in sorted(set(index.state_dict_metadata) - stored):
        report.problems.append(f"{key}: in the index but stored in no file")
    for name, records in sorted(by_file.items()):
        path = ckpt_dir / name
        if files is not None and name not in files:
            continue
        if str(path) in report.bad_files:
            continue  # missing / truncated: already reported
        if on_file is not None:
            on_file(str(path))
        with open(path, "rb") as f:
            for idx, info in sorted(records, key=lambda r: r[1].offset):
                f.seek(info.offset)
                data = f.read(info.length)
                report.bytes_read += len(data)
                if info.transform_descriptors:
                    report.problems.append(f"{path}: {idx.fqn} uses storage transforms "
                                           f"{list(info.transform_descriptors)}; not checked")
                    continue
                md = tensors.get(idx.fqn)
                if md is None:
                    report.objects += 1
                    continue
                message = _check_chunk(data, idx, md)
                report.chunks_read += 1
                if message:
                    report.problems.append(f"{path}: {idx.fqn} at offset {tuple(idx.offset or ())}: {message}")
                    report.bad_files.add(str(path))
    return report


def _check_chunk(data: bytes, idx, md) -> Optional[str]:
    try:
        tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        return f"unreadable record ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    if not isinstance(tensor, torch.Tensor):
        return f"holds a {type(tensor).__name__}, not a tensor"
    offsets = tuple(idx.offset or ())
    chunk = next((c for c in md.chunks if tuple(c.offsets) == offsets), None)
    if chunk is not None and tuple(tensor.shape) != tuple(chunk.sizes):
        return f"shape {tuple(tensor.shape)}, the index says {tuple(chunk.sizes)}"
    if tensor.dtype != md.properties.dtype:
        return f"dtype {tensor.dtype}, the index says {md.properties.dtype}"
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        return f"{bad} of {tensor.numel()} values are not finite"
    return None


def total_size(ckpt_dir: str | Path) -> int:
    """Bytes of the files in a checkpoint folder."""
    return sum(e.stat().st_size for e in os.scandir(ckpt_dir) if e.is_file())
