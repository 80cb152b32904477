"""What a checkpoint directory holds, and whether an iteration of it is readable.

    python tools/checkpoint_info.py runs/stage1                 # iterations, leftovers, latest's config
    python tools/checkpoint_info.py runs/stage1 --verify        # ... and read every tensor of latest
    python tools/checkpoint_info.py runs/stage1 -i 2000 --verify --json

Lists the complete iterations (with samples / tokens consumed and save time), leftovers of
interrupted saves (``.iter_N.partial``), where ``latest_checkpointed_iteration.txt`` points, and
for one iteration (``--iteration``, default the latest) its stored model spec and training
configuration. ``--verify`` reads every stored tensor chunk from the files and checks it is
present, has its recorded shape and dtype, and holds only finite values; problems name the file.
Needs no GPU, no process group and not the layout the checkpoint was written at (a model-only
checkpoint from the Hugging Face converter works too). Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


from megatron_prolong.checkpoint_layout import (LATEST_FILE, CheckpointError, iteration_dir,
                                                list_iterations, list_partials, read_checkpoint_meta)


def describe(root: Path, iteration: int | None, verify: bool) -> dict:
    """Everything the tool prints, as one dict (what ``--json`` prints)."""
    from megatron_prolong.training import checkpoint_integrity as integrity

    info: dict = {"save_dir": str(root), "latest": None, "latest_error": None, "iterations": [],
                  "partials": [], "problems": []}
    marker = root / LATEST_FILE
    if marker.is_file():
        text = marker.read_text().strip()
        info["latest"] = int(text) if text.isdigit() else None
        if info["latest"] is None:
            info["latest_error"] = f"{marker} holds {text!r}, not an iteration number"
    for number in list_iterations(root):
        meta = read_checkpoint_meta(root, number)
        state = meta.get("train_state", {})
        seq_length = state.get("config", {}).get("train", {}).get("seq_length")
        samples = state.get("consumed_samples")
        path = iteration_dir(root, number)
        info["iterations"].append({
            "iteration": number, "path": str(path), "bytes": integrity.total_size(path),
            "has_optimizer": meta.get("has_optimizer"), "optimizer_format": meta.get("optimizer_format"),
            "parallel": meta.get("parallel"), "consumed_samples": samples,
            "tokens": samples * seq_length if samples is not None and seq_length else None,
            "save_seconds": state.get("timing", {}).get("save_seconds"),
            "written": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(path.stat().st_mtime)),
        })
    for path in list_partials(root):
        info["partials"].append({"path": str(path), "bytes": integrity.total_size(path)})
    complete = [entry["iteration"] for entry in info["iterations"]]
    if info["latest"] is not None and info["latest"] not in complete:
        info["latest_error"] = f"{marker} points at iteration {info['latest']}, which is not complete"
    chosen = iteration if iteration is not None else (info["latest"] if info["latest"] in complete else None)
    if chosen is None and complete:
        chosen = complete[-1]
    if chosen is None:
        return info
    if chosen not in complete:
        raise CheckpointError(f"iteration {chosen} is not a complete checkpoint in {root}; complete: {complete}")
    meta = read_checkpoint_meta(root, chosen)
    info["chosen"] = {"iteration": chosen, "model_spec": meta.get("model_spec"),
                      "config": meta.get("train_state", {}).get("config"),
                      "consecutive_skipped": meta.get("train_state", {}).get("consecutive_skipped", 0)}
    path = iteration_dir(root, chosen)
    info["problems"] = integrity.storage_problems(path)
    if verify:
        report = integrity.verify(path)
        info["verify"] = {"ok": report.ok, "tensors": report.tensors, "chunks_read": report.chunks_read,
                          "objects": report.objects, "bytes_read": report.bytes_read,
                          "bad_files": sorted(report.bad_files)}
        info["problems"] = report.problems
    return info


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def print_report(info: dict) -> None:
    print(f"checkpoint directory {info['save_dir']}")
    latest = info["latest"]
    print(f"  latest: {latest if latest is not None else 'none'}"
          + (f"  (problem: {info['latest_error']})" if info["latest_error"] else ""))
    if info["iterations"]:
        print("  complete iterations:")
        for e in info["iterations"]:
            tokens = f"{e['tokens']:,} tokens" if e["tokens"] is not None else "tokens unknown"
            samples = f"{e['consumed_samples']:,} samples" if e["consumed_samples"] is not None else "model only"
            save = f", saved in {e['save_seconds']:.1f} s" if e.get("save_seconds") else ""
            layout = e["parallel"] or {}
            print(f"    {e['iteration']:>8}  {_gb(e['bytes']):>10}  {samples}, {tokens}  "
                  f"TP{layout.get('tensor', '?')} PP{layout.get('pipeline', '?')} CP{layout.get('context', '?')} "
                  f"DP{layout.get('data', '?')}  optimizer: {e['optimizer_format'] or 'none'}  "
                  f"written {e['written']}{save}")
    else:
        print("  complete iterations: none")
    if info["partials"]:
        print("  leftovers of interrupted saves (never used; safe to delete):")
        for p in info["partials"]:
            print(f"    {p['path']}  {_gb(p['bytes'])}")
    chosen = info.get("chosen")
    if chosen is None:
        return
    print(f"\niteration {chosen['iteration']}:")
    spec = chosen["model_spec"] or {}
    print("  model spec: " + ", ".join(f"{k}={v}" for k, v in spec.items()))
    if chosen["consecutive_skipped"]:
        print(f"  saved after {chosen['consecutive_skipped']} consecutive skipped (non-finite) steps")
    if chosen["config"]:
        import yaml

        print("  stored config:")
        for line in yaml.safe_dump(chosen["config"], sort_keys=False).splitlines():
            print("    " + line)
    verify = info.get("verify")
    if verify is not None:
        status = "readable" if verify["ok"] else "DAMAGED"
        print(f"  verify: {status}: {verify['tensors']} tensors, {verify['chunks_read']} chunks and "
              f"{verify['objects']} objects read ({_gb(verify['bytes_read'])})")
    for problem in info["problems"]:
        print(f"  problem: {problem}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("save_dir", help="a checkpoint.save_dir (or a converter's output directory)")
    parser.add_argument("-i", "--iteration", type=int, help="the iteration to describe (default: latest)")
    parser.add_argument("--verify", action="store_true", help="read every tensor of that iteration")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    root = Path(args.save_dir)
    if not root.is_dir():
        print(f"error: {root} is not a directory", file=sys.stderr)
        return 2
    try:
        info = describe(root, args.iteration, args.verify)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print_report(info)
    return 1 if info["problems"] or info["latest_error"] else 0


if __name__ == "__main__":
    sys.exit(main())
