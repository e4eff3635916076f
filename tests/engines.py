"""Real inference engines for tests: llama.cpp's `llama-server`, llama-cpp-python's server, and their models.

Everything comes from the per-machine cache that `scripts/build_llama_server.sh` (and
`scripts/build_llama_cpp_python.sh`) fill (${LOGPROB_CLI_CACHE:-~/.cache/logprob-cli}); nothing
here builds or downloads. Tests that
need an engine skip, with the command to run, when it is absent:

    from engines import llama_server_fixture
    tiny_server = llama_server_fixture("tiny")          # module-scoped fixture -> base URL

    def test_something(tiny_server):
        ...  # POST f"{tiny_server}/v1/chat/completions"

or, inside a test, `binary, model = require_llama_server("smollm2")` and
`with run_llama_server(model) as base_url: ...`. llama-cpp-python's server:
`python, model = require_llama_cpp_python("smollm2")`, then `with run_llama_cpp_python(model) as base_url:`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Literal

import pytest

LLAMA_SERVER_VERSION = "0.3.36"  # llama-cpp-python sdist the server is built from
BUILD_HINT = "run scripts/build_llama_server.sh"
MODEL_FILES = {
    "tiny": "tiny-random.gguf",  # random 2-layer llama, vocabulary 459
    "smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf",  # trained 135M, vocabulary 49,152
}
# `--no-repack`: on these VMs the CPU advertises AMX and `-march=native` compiles ggml's AMX
# kernels in, but the first AMX instruction (`tilezero`) dies with SIGILL when a quantized
# model (SmolLM2 Q4_1) is loaded with weight repacking on. Repacking is only a speed-up;
# with it off SmolLM2 gives the reference value (" Paris" -0.2484). See docs/llama-server.md.
# LOGPROB_CLI_LLAMA_THREADS overrides `-t 2`: with another process busy on one of the two
# cores, `-t 2` was measured 10-40x slower per request than `-t 1` (same numbers either way).
SERVER_ARGS = ("-c", "2048", "-t", os.environ.get("LOGPROB_CLI_LLAMA_THREADS", "2"), "--no-repack")
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_PYTHON_HINT = "run scripts/build_llama_cpp_python.sh"
STARTUP_TIMEOUT = 60.0
STOP_GRACE = 5.0


def cache_dir() -> Path:
    return Path(os.environ.get("LOGPROB_CLI_CACHE") or Path.home() / ".cache" / "logprob-cli")


def llama_server_binary() -> Path | None:
    """The cached llama-server binary, or None if it has not been built."""
    path = cache_dir() / f"llama-server-{LLAMA_SERVER_VERSION}" / "bin" / "llama-server"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def model_path(name: Literal["tiny", "smollm2"]) -> Path | None:
    """A cached GGUF model by short name, or None if it has not been fetched."""
    path = cache_dir() / "models" / MODEL_FILES[name]
    return path if path.is_file() else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:  # 503 while the model loads
        return e.code
    except OSError:
        return None


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def llama_cpp_python() -> Path | None:
    """The python of the cached llama-cpp-python venv (its server is `python -m llama_cpp.server`), or None if the
    build has not finished (its READY marker is written last)."""
    prefix = cache_dir() / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"
    python = prefix / "venv" / "bin" / "python"
    return python if (prefix / "READY").is_file() and python.is_file() else None


def require_llama_cpp_python(model: Literal["tiny", "smollm2"]) -> tuple[Path, Path]:
    """(the venv's python, model path), or skip the calling test with the command that provides them."""
    return _require(llama_cpp_python(), f"llama-cpp-python not built: {LLAMA_CPP_PYTHON_HINT}", model)


@contextlib.contextmanager
def run_llama_cpp_python(model: Path, *extra_args: str, timeout: float = STARTUP_TIMEOUT) -> Iterator[str]:
    """Start llama-cpp-python's server from the cached venv on 127.0.0.1 (free port, `--n_ctx 2048
    --n_threads 2`), yield its base URL once GET /v1/models answers 200; stopped on exit like `run_llama_server`.
    Raises RuntimeError (with the tail of its log) if it exits early or does not answer within `timeout`."""
    python = llama_cpp_python()
    if python is None:
        raise RuntimeError(f"llama-cpp-python not built: {LLAMA_CPP_PYTHON_HINT}")
    threads = os.environ.get("LOGPROB_CLI_LLAMA_THREADS", "2")
    with _serving("llama-cpp-python", lambda port: [
        str(python), "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", "2048", "--n_threads", threads, *extra_args,
    ], "/v1/models", timeout) as base_url:
        yield base_url


@contextlib.contextmanager
def run_llama_server(model: Path, *extra_args: str, timeout: float = STARTUP_TIMEOUT) -> Iterator[str]:
    """Start llama-server on 127.0.0.1 (free port, `-c 2048 -t 2 --no-repack`), yield its base URL.

    Waits until GET /health answers 200. The server is always stopped on exit:
    SIGTERM, then SIGKILL after a grace period. Raises RuntimeError (with the tail of the
    server's log) if it exits early or is not healthy within `timeout` seconds.
    """
    binary = llama_server_binary()
    if binary is None:
        raise RuntimeError(f"llama-server not built: {BUILD_HINT}")
    with _serving("llama-server", lambda port: [
        str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), *SERVER_ARGS, *extra_args,
    ], "/health", timeout) as base_url:
        yield base_url


@contextlib.contextmanager
def _serving(name: str, command, ready_path: str, timeout: float) -> Iterator[str]:
    """Run `command(port)` on a free port until GET `ready_path` answers 200, yield the base URL, and always
    stop the server on exit (SIGTERM, then SIGKILL after a grace period); a port taken between the probe
    and the bind is tried again, twice."""
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as tmp:
        log_path = Path(tmp) / "server.log"
        for attempt in range(3):  # the free port can be taken between probe and bind
            port = _free_port()
            base_url = f"http://127.0.0.1:{port}"
            cmd = command(port)
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            try:
                deadline = time.monotonic() + timeout
                while True:
                    if proc.poll() is not None:
                        break
                    if _status(base_url + ready_path) == 200:
                        yield base_url
                        return
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"{name} not ready after {timeout:.0f} s: {' '.join(cmd)}\n{_tail(log_path)}")
                    time.sleep(0.1)
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(STOP_GRACE)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
            log_text = _tail(log_path)
            if "bind" not in log_text.lower() or attempt == 2:  # uvicorn too: "error while attempting to bind"
                raise RuntimeError(f"{name} exited with code {proc.returncode}: {' '.join(cmd)}\n{log_text}")


def require_llama_server(model: Literal["tiny", "smollm2"]) -> tuple[Path, Path]:
    """(binary, model path), or skip the calling test with the command that provides them."""
    return _require(llama_server_binary(), f"llama-server not built: {BUILD_HINT}", model)


def _require(program: Path | None, missing: str, model: Literal["tiny", "smollm2"]) -> tuple[Path, Path]:
    """(program, model path), or skip the calling test: `missing` where the program is None, else the model's hint."""
    if program is None:
        pytest.skip(missing)
    path = model_path(model)
    if path is None:
        pytest.skip(f"model {model!r} ({MODEL_FILES[model]}) not in {cache_dir() / 'models'}: {BUILD_HINT}")
    return program, path


def llama_server_fixture(model: Literal["tiny", "smollm2"], *extra_args: str, scope: str = "module"):
    """A pytest fixture yielding the base URL of a running llama-server with `model`.

    Assign it to a name in a test module: `tiny_server = llama_server_fixture("tiny")`.
    Skips (not fails) when the binary or the model is missing.
    """

    @pytest.fixture(scope=scope)
    def _server() -> Iterator[str]:
        _, path = require_llama_server(model)
        with run_llama_server(path, *extra_args) as base_url:
            yield base_url

    return _server
