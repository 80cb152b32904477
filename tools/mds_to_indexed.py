#!/usr/bin/env python
"""Convert ProLong-style MDS shards (mosaicml-streaming) into Megatron indexed datasets.

Each original document becomes one document of the output: packed samples are split back by their
``indices`` (start/end pairs). Tokens are stored as int32 (Llama-3's 128256 vocabulary). Where the
shards carry an SFT ``mask``, an aligned loss-mask dataset ``PREFIX_mask`` (uint8) is written too.

Outputs (written under temporary names, renamed only on success):

    PREFIX.bin / PREFIX.idx                 all documents (default)
    PREFIX.<domain>.bin / .idx              one dataset per domain (--split-by-domain)
    PREFIX[.<domain>]_mask.bin / .idx       SFT loss masks, if the shards have a 'mask' column
    PREFIX.summary.json                     documents, tokens, length histogram per domain

Examples:

    python tools/mds_to_indexed.py --input data/prolong-data-64K --output-prefix out/prolong64k \\
        --split-by-domain --workers 8
    python tools/mds_to_indexed.py --input data/book-524288 --output-prefix out/books --min-length 65536
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_prolong.data.indexed import (LLAMA3_VOCAB_SIZE, DataError,  # noqa: E402
                                           quiet_library_warnings)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="DIR",
                   help="MDS folder(s) with index.json, or parent folder(s) whose sub-folders are MDS folders")
    p.add_argument("--output-prefix", required=True, help="output path prefix (no .bin/.idx)")
    p.add_argument("--split-by-domain", action="store_true",
                   help="write one dataset per 'domain' value: PREFIX.<domain>")
    p.add_argument("--min-length", type=int, default=1, help="drop documents shorter than N tokens")
    p.add_argument("--max-length", type=int, default=None, help="drop documents longer than N tokens")
    p.add_argument("--vocab-size", type=int, default=LLAMA3_VOCAB_SIZE,
                   help="fail on token ids >= this (default: %(default)s, Llama-3)")
    p.add_argument("--workers", type=int, default=1, help="shards converted in parallel")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_library_warnings()
    from megatron_prolong.data.mds import ConvertOptions, convert_mds

    opts = ConvertOptions(vocab_size=args.vocab_size, min_length=args.min_length,
                          max_length=args.max_length, split_by_domain=args.split_by_domain)
    progress = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        summary = convert_mds(args.input, args.output_prefix, opts, workers=args.workers,
                              progress=progress)
    except DataError as e:
        print(f"mds_to_indexed: error: {e}", file=sys.stderr)
        return 1
    for d, s in summary["domains"].items():
        print(f"{d}: {s['documents']:,} documents, {s['tokens']:,} tokens -> {s['prefix']}")
    print(f"wrote {', '.join(summary['outputs'])} and {args.output_prefix}.summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
