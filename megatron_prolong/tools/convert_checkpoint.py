"""Convert Llama checkpoints between Hugging Face safetensors and megatron-prolong (megatron-core
dist checkpoints). Single process, CPU only, streamed: memory holds about one layer.

  python tools/convert_checkpoint.py hf-to-megatron --input HF_DIR --output MEG_DIR [--rope-theta X] [--model NAME]
  python tools/convert_checkpoint.py megatron-to-hf --input MEG_DIR --output HF_DIR [--iteration N]
                                                    [--tokenizer DIR] [--dtype bf16|fp32]

See docs/convert.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path



def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for u, m in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * m)
    return int(t)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    h2m = sub.add_parser("hf-to-megatron", help="HF Llama folder -> model-only trainer checkpoint (iteration 0)")
    h2m.add_argument("--input", required=True, type=Path, help="HF folder with config.json and *.safetensors")
    h2m.add_argument("--output", required=True, type=Path, help="new (or empty) folder for the dist checkpoint")
    h2m.add_argument("--rope-theta", type=float, default=None,
                     help="override rope_theta (ProLong: 8e6 for the 64K stage, 1.28e8 for 512K)")
    h2m.add_argument("--model", default=None,
                     help="registry name (e.g. llama3-8b) to check the HF config against; also the spec's name")
    h2m.add_argument("--untie-embeddings", action="store_true",
                     help="accept tie_word_embeddings=true models (output layer starts as a copy of the embedding)")

    m2h = sub.add_parser("megatron-to-hf", help="trainer checkpoint (any TP/PP) -> HF LlamaForCausalLM folder")
    m2h.add_argument("--input", required=True, type=Path, help="trainer checkpoint folder (with iter_*/)")
    m2h.add_argument("--output", required=True, type=Path, help="new (or empty) folder for the HF model")
    m2h.add_argument("--iteration", type=int, default=None, help="iteration to export (default: latest)")
    m2h.add_argument("--tokenizer", type=Path, default=None,
                     help="folder whose tokenizer files are copied (the original HF model folder also "
                          "supplies token ids and generation_config.json)")
    m2h.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                     help="weights dtype (default: bf16 if the checkpoint holds bf16, else as stored)")
    m2h.add_argument("--max-shard-size", type=_size, default="5GB", help="largest safetensors shard (default 5GB)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_prolong.convert import ConversionError, UnsupportedModelError, hf_to_megatron, megatron_to_hf
    from megatron_prolong.checkpoint_layout import CheckpointError

    try:
        if args.command == "hf-to-megatron":
            hf_to_megatron(args.input, args.output, model_name=args.model, rotary_base=args.rope_theta,
                           untie_embeddings=args.untie_embeddings)
        else:
            megatron_to_hf(args.input, args.output, iteration=args.iteration, tokenizer_dir=args.tokenizer,
                           dtype=args.dtype, max_shard_bytes=args.max_shard_size)
    except (ConversionError, UnsupportedModelError, CheckpointError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
