"""Turn the SmolLM2 GGUF into a Hugging Face model folder (weights in float32, tokenizer, config).

    python scripts/convert_smollm2_hf.py [--gguf FILE] [--out DIR]

Defaults: the GGUF that scripts/build_llama_server.sh fetches into the cache,
${LOGPROB_CLI_CACHE:-~/.cache/logprob-cli}/models/SmolLM2-135M-Instruct.Q4_1.gguf, and the folder
models/SmolLM2-135M-Instruct-hf beside it (vLLM's tests and the Hugging Face backend both read that
path: keep it stable). Needs a Python with torch, transformers and gguf (the venv of
scripts/install_vllm.sh has them). Transformers' GGUF loading dequantizes the weights
(`from_pretrained(folder, gguf_file=...)`, model and tokenizer); the folder is written to a temporary
sibling and renamed into place, so it is either complete or absent, and a complete one is left as it is
(the script prints its path and exits 0 at once). Exit 1 with the reason when it cannot convert.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_NAME = "SmolLM2-135M-Instruct-hf"
# what a complete folder holds (save_pretrained's safetensors weights, the tokenizer, the config)
COMPLETE = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def models_dir() -> Path:
    cache = os.environ.get("LOGPROB_CLI_CACHE") or str(Path.home() / ".cache" / "logprob-cli")
    return Path(cache) / "models"


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in COMPLETE)


def convert(gguf: Path, out: Path) -> None:
    """Write the HF folder for `gguf` at `out` (absent before), through a temporary sibling renamed into place."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantized as they load; only the quantizer's mark stays, and it forbids saving.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not is_complete(tmp):
            missing = [name for name in COMPLETE if not (tmp / name).is_file()]
            raise RuntimeError(f"the converted folder lacks {', '.join(missing)}")
        tmp.chmod(0o755)  # mkdtemp made it private; the folder is for every user of the cache
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=models_dir() / GGUF_NAME, help="the SmolLM2 GGUF file")
    parser.add_argument("--out", type=Path, default=models_dir() / HF_NAME, help="the Hugging Face folder to write")
    args = parser.parse_args(argv)
    out = args.out.expanduser()
    if is_complete(out):
        print(out)
        return 0
    gguf = args.gguf.expanduser()
    if not gguf.is_file():
        print(f"convert_smollm2_hf: {gguf} not found: run scripts/build_llama_server.sh first", file=sys.stderr)
        return 1
    if out.exists():
        print(f"convert_smollm2_hf: {out} exists but is incomplete: remove it and run again", file=sys.stderr)
        return 1
    try:
        convert(gguf, out)
    except ImportError as error:
        print(f"convert_smollm2_hf: needs torch, transformers and gguf ({error}): run it with the python of "
              "scripts/install_vllm.sh's venv", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
