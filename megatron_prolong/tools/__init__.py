"""The command-line tools' code. Each runs as ``python tools/<name>.py`` from the repository
(Megatron's convention; under torchrun: ``torchrun ... tools/<name>.py``), as the console script
``prolong-<name>`` that the install puts on PATH (``_`` written ``-``), or as
``python -m megatron_prolong.tools.<name>``; all three call the module's ``main()``:

- ``mds_to_indexed``: ProLong MDS shards (raw or compressed) -> indexed datasets, one per domain
- ``tokenize_to_indexed``: raw text (jsonl / parquet / text) -> indexed dataset
- ``make_sft_data``: chat jsonl -> Llama-3 chat template + assistant-only loss mask
- ``make_demo_data``: the corpus ``make demo`` trains on
- ``convert_checkpoint``: Hugging Face <-> trainer checkpoints
- ``checkpoint_info``: what a save dir holds; ``--verify`` reads every tensor
- ``evaluate``: perplexity by position and needle retrieval of a checkpoint
- ``plan_memory``: per-GPU memory of a layout, and layouts that fit
- ``dry_run``: one step of one rank of a GPU job on this CPU, fake tensors (memory, FLOPs, collectives)
"""

from ..platform import quiet_known_warnings

# Every entry to a tool imports this package first: library notices that tell a user nothing are
# quieted here, once, before a tool loads torch or megatron-core.
quiet_known_warnings()

TOOLS = ("mds_to_indexed", "tokenize_to_indexed", "make_sft_data", "make_demo_data", "convert_checkpoint",
         "checkpoint_info", "evaluate", "plan_memory", "dry_run")
