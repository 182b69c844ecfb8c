#!/usr/bin/env bash
# On a machine that reaches the package index: download the wheels of scripts/gpu_wheels.txt (python 3.12,
# manylinux x86-64, no dependencies) into .gpu/whl/, and stage the SmolLM2-135M config and tokenizer (no
# weights: the 98 MB GGUF is over the device tool's 64 MiB carry limit) into .gpu/smollm2/ when a local copy
# exists. .gpu/ is ignored by git (.git/info/exclude); carry it with the device tool: carry=[".gpu"].
#   bash scripts/fetch_wheels.sh [DEST]      (DEST defaults to .gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.gpu}; mkdir -p "$dest/whl"
grep -qxF "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
grep -v '^\s*#' scripts/gpu_wheels.txt | sed 's/#.*//' | awk 'NF' | while read -r spec; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest/whl" "$spec"
done
src=${TOKENSEL_CACHE:-$HOME/.cache/tokensel}/models/HuggingFaceTB--SmolLM2-135M-Instruct
if [ -f "$src/config.json" ]; then
  mkdir -p "$dest/smollm2"
  for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
    [ -f "$src/$f" ] && cp "$src/$f" "$dest/smollm2/"
  done
fi
du -sh "$dest"; ls "$dest/whl"
