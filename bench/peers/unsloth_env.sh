#!/usr/bin/env bash
# Unsloth for bench/peers/peers.py on the GPU machine (carry .gpu and .whl): the site folder that
# ../shared/tools/unsloth_site.sh packs (Unsloth 2026.10.9 with its own trl/datasets pins), unpacked into
# /tmp/site_u with the bitsandbytes and liger-kernel wheels beside it; peers.py puts it first on the Unsloth
# worker's PYTHONPATH only.
set -euo pipefail
[ -f /tmp/site_u/.installed ] && exit 0
mkdir -p /tmp/site_u
tar xzf .gpu/site_unsloth.tgz -C /tmp/site_u
python3 -m pip install -q --no-index --no-deps --target /tmp/site_u .whl/bitsandbytes-*.whl .whl/liger_kernel-*.whl
touch /tmp/site_u/.installed
