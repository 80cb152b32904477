#!/usr/bin/env python
"""Peak memory and time of checkpoint conversion, on a random Llama-3.2-1B-shaped model.

    python benchmarks/bench_convert.py [--model llama3.2-1b] [--workdir DIR] [--keep]

Writes random bf16 HF safetensors shards for the registry model (untied embeddings, as
megatron-prolong trains them), then runs HF -> Megatron and Megatron -> HF, each in a fresh
process, and reports each one's peak RSS (``ru_maxrss``) next to the model's size. The ratio
is what says whether an 8B model (16 GB bf16) fits a 24 GB machine. Finally the exported
weights are compared with the originals, tensor by tensor (bitwise).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_random_hf_model(spec, out: Path, shard_bytes: int = 1_000_000_000) -> int:
    """A random bf16 HF Llama folder, written tensor by tensor; returns its weight bytes."""
    import torch

    from megatron_prolong.convert.adapter import LlamaWeightAdapter
    from megatron_prolong.convert.hf_config import hf_config_from_spec
    from megatron_prolong.convert.safetensors_stream import SafetensorsShardWriter, plan_shards

    adapter = LlamaWeightAdapter(spec)
    shapes = {}
    for g in adapter.groups:
        for layer in (range(spec.num_layers) if g.per_layer else [None]):
            shapes.update(zip(adapter.hf_names(g, layer), adapter.hf_shapes(g)))
    specs = [(n, tuple(shapes[n]), torch.bfloat16) for n in adapter.all_hf_names()]
    shards = plan_shards(specs, shard_bytes)
    out.mkdir(parents=True)
    weight_map, total = {}, 0
    gen = torch.Generator().manual_seed(0)
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        writer = SafetensorsShardWriter(out / name, shard)
        for tensor_name, shape, dtype in shard:
            if tensor_name.endswith("norm.weight"):
                t = torch.rand(shape, generator=gen).add_(0.5).to(dtype)
            else:
                t = torch.randn(shape, generator=gen).mul_(0.02).to(dtype)
            writer.write(tensor_name, t)
            weight_map[tensor_name] = name
            total += t.numel() * t.element_size()
            del t
        writer.close()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg = hf_config_from_spec(spec, torch_dtype="bfloat16")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return total


def peak_rss_bytes() -> int:
    """This process's peak RSS. VmHWM, not ``ru_maxrss``: Linux carries ``ru_maxrss`` across
    fork/exec, so a child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux


def child(direction: str, src: str, dst: str) -> None:
    """Run one conversion in this (fresh) process; print a JSON line with its measurements."""
    from megatron_prolong.convert import hf_to_megatron, megatron_to_hf
    from megatron_prolong.training import checkpoint  # noqa: F401  (imports count as baseline)

    baseline = peak_rss_bytes()  # interpreter + torch + megatron-core imports
    start = time.perf_counter()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if direction == "hf-to-megatron":
        hf_to_megatron(Path(src), Path(dst), log=log)
    else:
        megatron_to_hf(Path(src), Path(dst), log=log)
    seconds = time.perf_counter() - start
    print(json.dumps({"direction": direction, "seconds": seconds, "peak_rss": peak_rss_bytes(),
                      "baseline_rss": baseline}))


def run_child(direction: str, src: Path, dst: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", direction, str(src), str(dst)],
                          stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def verify_bitwise(a: Path, b: Path) -> int:
    """Compare two HF folders tensor by tensor (one tensor in memory at a time)."""
    import torch

    from megatron_prolong.convert.hf_to_megatron import index_hf_checkpoint
    from megatron_prolong.convert.safetensors_stream import read_tensor

    ea, eb = index_hf_checkpoint(a), index_hf_checkpoint(b)
    assert sorted(ea) == sorted(eb), set(ea) ^ set(eb)
    for name in ea:
        x, y = read_tensor(ea[name]), read_tensor(eb[name])
        assert x.dtype == y.dtype and torch.equal(x, y), name
    return len(ea)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3.2-1b", help="registry model whose shapes to use")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--child", nargs=3, metavar=("DIRECTION", "SRC", "DST"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return

    from megatron_prolong.models import get_model_spec

    spec = get_model_spec(args.model)
    work = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        size = write_random_hf_model(spec, work / "hf")
        print(f"{args.model}: {spec.num_parameters() / 1e9:.2f}B parameters, {size / 1e9:.2f} GB bf16 "
              f"(random weights written in {time.perf_counter() - t0:.0f}s)")
        results = [run_child("hf-to-megatron", work / "hf", work / "meg"),
                   run_child("megatron-to-hf", work / "meg", work / "hf_out")]
        print(f"{'direction':<16} {'time':>8} {'peak RSS':>10} {'after imports':>14} {'peak/model':>11} "
              f"{'(peak-imports)/model':>21}")
        for r in results:
            print(f"{r['direction']:<16} {r['seconds']:7.1f}s {r['peak_rss'] / 1e9:8.2f}GB {r['baseline_rss'] / 1e9:12.2f}GB "
                  f"{r['peak_rss'] / size:11.2f} {(r['peak_rss'] - r['baseline_rss']) / size:21.2f}")
        n = verify_bitwise(work / "hf", work / "hf_out")
        print(f"round trip: {n} tensors bitwise identical")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
