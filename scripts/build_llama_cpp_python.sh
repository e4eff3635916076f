#!/usr/bin/env bash
# Build llama-cpp-python (its OpenAI-compatible server) into a per-machine cached venv.
#
#   scripts/build_llama_cpp_python.sh
#
# Cache: ${LOGPROB_CLI_CACHE:-$HOME/.cache/logprob-cli}/llama-cpp-python-0.3.36/
#   venv/                 a venv with llama-cpp-python[server] installed from the wheel below
#   wheels/               the wheel built here (tuned to THIS CPU: never commit or share it)
#   READY                 written last; when it exists the script exits 0 at once
#   BUILD-INFO            version, date, build seconds
#
# Start the server with
#   .../venv/bin/python -m llama_cpp.server --model MODEL.gguf --host 127.0.0.1 --port PORT \
#       --n_ctx 2048 --n_threads 2
# The models come from scripts/build_llama_server.sh (run it first; CI does).
#
# Exits nonzero, saying why, when the build cannot be done here (no compiler, no cmake, no
# network to PyPI). Lean build: only the shared libraries the Python package loads (no tools,
# examples, tests, server binary or multimodal library). The native build leaves AMX out
# (-mno-amx-*): the server cannot turn weight repacking off (llama-server's --no-repack), and
# on CPUs that advertise AMX a quantized model then dies with SIGILL (docs/llama-server.md).
# Measured: 665 s (11 min wall, 6m39s CPU) with the 2 cores shared (load average ~5); real-engines.md says
# 4-5 min on idle cores. The venv is 173 MB, the wheel 20 MB.
set -euo pipefail

VERSION=0.3.36
PYTHON=${PYTHON:-python3}
CACHE=${LOGPROB_CLI_CACHE:-$HOME/.cache/logprob-cli}
PREFIX=$CACHE/llama-cpp-python-$VERSION
VENV=$PREFIX/venv
WHEELS=$PREFIX/wheels
READY=$PREFIX/READY

log() { printf '[build_llama_cpp_python] %s\n' "$*" >&2; }
die() { printf '[build_llama_cpp_python] ERROR: %s\n' "$*" >&2; exit 1; }
report() { echo "llama-cpp-python $VERSION server: $VENV/bin/python -m llama_cpp.server"; }

if [ -f "$READY" ]; then
    report
    exit 0
fi

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set PYTHON=...)"
missing=()
for tool in cmake cc c++; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    die "missing build tools: ${missing[*]}. Install them first, e.g. apt-get install -y cmake build-essential"
fi

mkdir -p "$PREFIX"
# One build at a time per cache (a second invocation waits, then finds READY).
exec 9>"$PREFIX/.build.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
    if [ -f "$READY" ]; then report; exit 0; fi
fi

start=$(date +%s)
rm -rf "$VENV" "$WHEELS"
log "creating the venv $VENV"
"$PYTHON" -m venv "$VENV" || die "could not create a venv with $PYTHON (on Debian: apt-get install -y python3-venv)"

no_amx=""
if echo 'int main(void){return 0;}' | cc -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 -x c -o /dev/null - 2>/dev/null; then
    no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
export CFLAGS="${CFLAGS:-} $no_amx" CXXFLAGS="${CXXFLAGS:-} $no_amx"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
export CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF \
-DLLAMA_USE_PREBUILT_UI=OFF"

log "building the llama-cpp-python==$VERSION wheel from source with -j$CMAKE_BUILD_PARALLEL_LEVEL (5-11 minutes on 2 cores)"
"$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
"$VENV/bin/python" -m pip wheel --quiet --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$VERSION" -w "$WHEELS" >&2 \
    || die "building the llama-cpp-python==$VERSION wheel failed (see the pip output above)"
wheel=$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1)
[ -n "$wheel" ] || die "pip wheel finished but left no llama_cpp_python-$VERSION wheel in $WHEELS"

log "installing $wheel with the [server] extra"
"$VENV/bin/python" -m pip install --quiet "$wheel[server]" >&2 \
    || die "installing $wheel[server] failed (see the pip output above)"
"$VENV/bin/python" -c "import llama_cpp, llama_cpp.server.app; assert llama_cpp.__version__ == '$VERSION', llama_cpp.__version__" \
    || die "the installed llama_cpp does not import or is not version $VERSION"

end=$(date +%s)
{
    echo "llama-cpp-python: $VERSION"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), $(nproc) cores"
    echo "build seconds (venv + download + compile + install): $((end - start))"
} >"$PREFIX/BUILD-INFO"
touch "$READY"
log "built in $((end - start)) s"
report
