"""Convert ProLong-style MDS shards (mosaicml-streaming) into Megatron indexed datasets.

Each original document becomes one document of the output: packed samples are split back by their
``indices`` (start/end pairs). Tokens are stored as int32 (Llama-3's 128256 vocabulary). Where the
shards carry an SFT ``mask``, an aligned loss-mask dataset ``PREFIX_mask`` (uint8) is written too.
Compressed shards (``.mds.zstd``, ``.gz``, ``.br``, ``.snappy``, ``.bz2``) are read directly.

``--input`` is an MDS folder (with index.json) or a root of domain folders, such as a clone of
princeton-nlp/prolong-data-64K (``long-context-65536/book-65536/...``). A root gives one dataset
per domain folder, named after the folder (the names the recipe mixtures use).

Outputs (written under temporary names, renamed only on success):

    PREFIX.<folder>.bin / .idx              one dataset per domain folder (--split-by folder;
                                            the default for a root or several inputs)
    PREFIX.<domain>.bin / .idx              one per value of the samples' 'domain' field
                                            (--split-by field; folders sharing a value merge)
    PREFIX.bin / .idx                       everything in one dataset (--split-by none; the default
                                            for a single MDS folder)
    PREFIX[.<name>]_mask.bin / .idx         SFT loss masks, if the shards have a 'mask' column
    PREFIX.summary.json                     per output: folders, 'domain' values, documents,
                                            tokens, longest document, length histogram

Examples:

    python tools/mds_to_indexed.py --input datasets/long-context-65536 \\
        --output-prefix data/prolong/long-context-65536 --mixture prolong-64k --workers 8
    python tools/mds_to_indexed.py --input datasets/long-context-524288/book-524288 --output-prefix out/books
"""

from __future__ import annotations

import argparse
import sys


from megatron_prolong.data.indexed import LLAMA3_VOCAB_SIZE, DataError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="DIR",
                   help="MDS folder(s) with index.json, or root(s) of domain folders (a clone of prolong-data-64K)")
    p.add_argument("--output-prefix", required=True, help="output path prefix (no .bin/.idx)")
    p.add_argument("--split-by", choices=("auto", "folder", "field", "none"), default=None,
                   help="folder: one dataset per domain folder, PREFIX.<folder>; field: one per value "
                        "of the samples' 'domain' field; none: one dataset. Default (auto): folder "
                        "for a root of domain folders or several inputs, else none")
    p.add_argument("--split-by-domain", action="store_true",
                   help="one dataset per domain: per folder for a root of domain folders, else per "
                        "'domain' field value (kept for older commands; prefer --split-by)")
    p.add_argument("--mixture", default=None, metavar="NAME",
                   help="convert only the domain folders this recipe mixture reads (e.g. prolong-64k) "
                        "and fail if one is missing")
    p.add_argument("--min-length", type=int, default=1, help="drop documents shorter than N tokens")
    p.add_argument("--max-length", type=int, default=None, help="drop documents longer than N tokens")
    p.add_argument("--vocab-size", type=int, default=LLAMA3_VOCAB_SIZE,
                   help="fail on token ids >= this (default: %(default)s, Llama-3)")
    p.add_argument("--workers", type=int, default=1, help="shards converted in parallel")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_prolong.data.mds import ConvertOptions, convert_mds
    from megatron_prolong.data.mixtures import MIXTURES

    if args.split_by is not None and args.split_by_domain:
        print("mds_to_indexed: error: give --split-by or --split-by-domain, not both", file=sys.stderr)
        return 2
    if args.mixture is not None and args.mixture not in MIXTURES:
        print(f"mds_to_indexed: error: unknown --mixture {args.mixture!r}; known: {sorted(MIXTURES)}",
              file=sys.stderr)
        return 2
    split_by = args.split_by or ("domain" if args.split_by_domain else "auto")
    only = list(MIXTURES[args.mixture]) if args.mixture else None
    progress = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        opts = ConvertOptions(vocab_size=args.vocab_size, min_length=args.min_length,
                              max_length=args.max_length, split_by=split_by, only=only)
        summary = convert_mds(args.input, args.output_prefix, opts, workers=args.workers,
                              progress=progress)
    except DataError as e:
        print(f"mds_to_indexed: error: {e}", file=sys.stderr)
        return 1
    for d, s in summary["domains"].items():
        values = ", ".join(s["domain_field"])
        print(f"{d or '(all)'}: {s['documents']:,} documents, {s['tokens']:,} tokens, longest "
              f"{s['longest_document']:,} ('domain' field: {values}) -> {s['prefix']}")
        if len(s["folders"]) > 1 and summary["split_by"] == "field":
            print(f"  note: {d} merges {len(s['folders'])} folders: {', '.join(s['folders'])}")
    print(f"wrote {', '.join(summary['outputs'])} and {args.output_prefix}.summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
