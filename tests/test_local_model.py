"""A local transformers model as an endpoint (`model="hf:PATH"`, issue 11 part 5): its vector is torch's float32
log_softmax of the model's own logits, every position of a text comes from one forward pass, and biased methods
match that ground truth. On a tiny randomly initialised Llama built here, and on SmolLM2 converted to a Hugging
Face folder where that folder exists (scripts/convert_smollm2_hf.py)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from engines import cache_dir

from logprob_cli import extract_file, extract_logprobs
from logprob_cli.cli import app
from logprob_cli.endpoints import EndpointSettings, Prompt, Query, SettingsError, build_endpoint
from logprob_cli.endpoints._local_model import load_local_model
from logprob_cli.io import read_metadata

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'logprob-cli[hf]')")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'logprob-cli[hf]')")
tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is not installed (it comes with transformers)")

SMOLLM2 = cache_dir() / "models" / "SmolLM2-135M-Instruct-hf"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TEXT = "the cat sat on the mat. the dog ate the bone. a bird sang in the tree by the old house."


def save_tiny_model(folder: Path, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """A randomly initialised 2-layer Llama and a byte-level BPE tokenizer of 300 tokens, saved as save_pretrained
    writes them. The logits are scaled up (a larger output layer) so the distribution is far from uniform."""
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT] * 20, vocab_size=300, min_frequency=1, special_tokens=["<s>"])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>")
    if chat_template:
        tokenizer.chat_template = chat_template
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def reference(tiny):
    """The tiny model and tokenizer as a user loads them, the ground truth's source."""
    return (transformers.AutoModelForCausalLM.from_pretrained(tiny).float().eval(),
            transformers.AutoTokenizer.from_pretrained(tiny))


def truth(reference, ids) -> np.ndarray:
    """torch's float32 log_softmax of the model's logits after `ids`, one forward pass over them alone."""
    model, _ = reference
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([list(ids)]), use_cache=False).logits[0, -1].float()
    return torch.log_softmax(logits, dim=-1).numpy()


def endpoint_for(folder: Path, **settings):
    return build_endpoint(EndpointSettings(model=f"hf:{folder}", **settings))


def test_the_vector_is_torchs_log_softmax_of_the_models_logits_exactly_in_one_call(tiny, reference):
    endpoint = endpoint_for(tiny, api="completions")
    prompt = "the cat sat on the"
    ids = reference[1](prompt)["input_ids"]
    for method in ("direct", "auto"):
        extraction = extract_logprobs(prompt, method=method, endpoint=endpoint)
        assert np.array_equal(extraction.logprobs.astype(np.float32), truth(reference, ids))
        assert extraction.calls - (extraction.probe.calls if extraction.probe else 0) == 1
    spread = truth(reference, ids)
    assert spread.max() - spread.min() > 10  # a distribution a wrong id or position would change visibly


def test_a_chat_prompt_is_rendered_by_the_tokenizers_chat_template(tiny, reference):
    endpoint = endpoint_for(tiny, system="be brief")
    messages = [{"role": "user", "content": "the dog"}]
    rendered = "<|system|>be brief\n<|user|>the dog\n<|assistant|>"
    ids = reference[1](rendered, add_special_tokens=False)["input_ids"]
    extraction = extract_logprobs("the dog", method="direct", endpoint=endpoint)
    assert np.array_equal(extraction.logprobs.astype(np.float32), truth(reference, ids))
    as_messages = extract_logprobs([{"role": "system", "content": "be brief"}, *messages], "direct", endpoint)
    assert np.array_equal(as_messages.logprobs, extraction.logprobs)


def test_every_position_of_a_text_comes_from_one_forward_pass_and_equals_its_prefixs_pass(tiny, reference, tmp_path):
    endpoint = endpoint_for(tiny, api="completions")
    prompt, completion = "the cat", " sat on the mat."
    completion_ids = reference[1](completion, add_special_tokens=False)["input_ids"]
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "a", "prompt": prompt, "completion": completion}) + "\n")
    summary = extract_file(tmp_path / "in.jsonl", tmp_path / "out.parquet", "direct", endpoint)
    assert summary.finished == len(completion_ids) + 1 and not summary.failures
    assert endpoint.forward_passes == 1
    base = reference[1](prompt)["input_ids"]
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["position"] for r in rows] == list(range(len(completion_ids) + 1))
    for row in rows:
        k = row["position"]
        expected = truth(reference, base + completion_ids[:k])
        assert row["context_tokens"] == completion_ids[:k]
        assert np.abs(np.array(row["logprobs"]) - expected).max() < 1e-4
        if k < len(completion_ids):
            assert row["next_token_logprob"] == pytest.approx(float(expected[completion_ids[k]]), abs=1e-4)


def test_a_text_whose_rows_do_not_fit_the_cache_is_read_in_passes_of_as_many_positions_as_fit(tiny, reference):
    vocab_size = reference[0].config.vocab_size
    endpoint = load_local_model(f"hf:{tiny}", api="completions", cache_bytes=2 * 4 * vocab_size)  # 2 rows fit
    assert endpoint.rows_per_pass == 2
    base, completion = tuple(reference[1]("the")["input_ids"]), (5, 17, 200, 42, 9)
    for k in range(len(completion) + 1):
        unit = Prompt("a", 1, "the", completion_ids=completion, position=k, context_ids=completion[:k])
        answer = endpoint.answer(unit, Query.make(top_logprobs=endpoint.vocab_size))
        got = np.full(endpoint.vocab_size, np.nan, dtype=np.float32)
        got[list(answer.top_ids)] = answer.top_logprobs
        assert np.abs(got - truth(reference, base + completion[:k])).max() < 1e-4
    assert endpoint.forward_passes == 3  # ceil(6 positions / 2 a pass)
    assert len(endpoint._rows) == 1


def test_targets_and_biased_methods_match_the_ground_truth(tiny, reference):
    endpoint = endpoint_for(tiny, api="completions")
    prompt = "a bird sang in"
    expected = truth(reference, reference[1](prompt)["input_ids"])
    cat = reference[1](" cat", add_special_tokens=False)["input_ids"]
    assert len(cat) == 1
    chosen = extract_logprobs(prompt, targets=[" cat", 7], model=f"hf:{tiny}", api="completions")  # as a user calls it
    assert [t.logprob for t in chosen.targets] == pytest.approx([float(expected[cat[0]]), float(expected[7])], abs=1e-6)
    for method in ("topk", "exact"):
        extraction = extract_logprobs(prompt, method=method, endpoint=endpoint)
        visible = expected > np.log(1e-6)
        assert np.abs(extraction.logprobs[visible] - expected[visible]).max() < 1e-3, method
        assert extraction.calls > 1


def test_the_greedy_token_follows_the_bias_and_the_logprobs_are_the_biased_ones(tiny, reference):
    endpoint = endpoint_for(tiny, api="completions")
    prompt = Prompt("p", 1, "the cat")
    plain = endpoint.answer(prompt, Query.make(top_logprobs=3))
    lifted = int(np.argsort(truth(reference, reference[1]("the cat")["input_ids"]))[0])  # the least likely token
    biased = endpoint.answer(prompt, Query.make({lifted: 100.0}, top_logprobs=3))
    assert plain.sampled == plain.top_ids[0] != lifted and biased.sampled == biased.top_ids[0] == lifted
    logits = endpoint.logits(prompt).clone()
    logits[lifted] += 100.0
    assert biased.top_logprobs[0] == float(torch.log_softmax(logits, dim=-1)[lifted])


def test_cli_extract_writes_parquet_from_the_local_model(tiny, reference, tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "p", "prompt": "the dog ate"}) + "\n")
    result = CliRunner().invoke(app, [
        "extract", str(tmp_path / "p.jsonl"), "-o", str(tmp_path / "p.parquet"), "--model", f"hf:{tiny}",
        "--api", "completions", "--quiet",
    ])
    assert result.exit_code == 0, result.output
    (row,) = pq.read_table(tmp_path / "p.parquet").to_pylist()
    expected = truth(reference, reference[1]("the dog ate")["input_ids"])
    assert np.array_equal(np.array(row["logprobs"], dtype=np.float32), expected)
    assert read_metadata(tmp_path / "p.parquet")["endpoint"]["backend"] == "hf"


@pytest.mark.parametrize("make, words", [
    (lambda tmp: tmp / "nowhere", "there is no such folder"),
    (lambda tmp: tmp, "not a transformers model folder (it has no config.json"),
])
def test_a_missing_folder_or_one_without_a_model_is_refused_cleanly(tmp_path, make, words):
    with pytest.raises(SettingsError, match="hf:") as caught:
        endpoint_for(make(tmp_path))
    assert words in str(caught.value)
    result = CliRunner().invoke(app, ["estimate", "-", "--model", f"hf:{make(tmp_path)}"], input='{"prompt": "x"}\n')
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and words in output and "Traceback" not in output


def test_a_model_without_a_chat_template_refuses_the_chat_api_saying_what_works(tmp_path):
    folder = save_tiny_model(tmp_path / "base", chat_template=None)
    with pytest.raises(SettingsError, match='no chat template.*api="completions"'):
        endpoint_for(folder)
    assert endpoint_for(folder, api="completions").describe().backend == "hf"


def test_settings_only_a_server_takes_are_refused(tiny):
    with pytest.raises(SettingsError, match="base_url, tokenizer apply to a server"):
        endpoint_for(tiny, base_url="http://localhost:1", tokenizer="cl100k_base")


def test_without_the_extra_installed_hf_says_how_to_install_it(tiny, monkeypatch):
    real = importlib.import_module

    def missing(name, *args):
        if name in ("torch", "transformers"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(SettingsError, match=r"pip install 'logprob-cli\[hf\]'"):
        endpoint_for(tiny)


def test_importing_the_package_imports_neither_torch_nor_transformers():
    code = "import sys, logprob_cli, logprob_cli.cli; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.fixture(scope="module")
def smollm2():
    if not (SMOLLM2 / "config.json").is_file():
        pytest.skip(f"{SMOLLM2} does not exist: make it with scripts/convert_smollm2_hf.py")
    return SMOLLM2


def test_smollm2_matches_its_own_log_softmax_and_answers_paris(smollm2):
    endpoint = endpoint_for(smollm2, api="completions")
    model = endpoint.network
    prompt = "The capital of France is"
    ids = endpoint.tokenizer(prompt)["input_ids"]
    with torch.inference_mode():
        expected = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), dim=-1).numpy()
    extraction = extract_logprobs(prompt, method="direct", endpoint=endpoint)
    assert np.array_equal(extraction.logprobs.astype(np.float32), expected)
    best = int(np.argmax(extraction.logprobs))
    assert endpoint.token_text(best) == " Paris" and extraction.logprobs[best] > np.log(0.5)


def test_estimate_times_the_local_model_on_this_machine_and_prices_it_free(tiny, tmp_path):
    line = {"id": "a", "prompt": "the cat", "completion": " sat on the mat."}
    (tmp_path / "c.jsonl").write_text(json.dumps(line) + "\n")
    shown = CliRunner().invoke(app, [
        "estimate", str(tmp_path / "c.jsonl"), "--model", f"hf:{tiny}", "--api", "completions", "--method", "direct",
        "--json",
    ])
    assert shown.exit_code == 0, shown.output
    estimate = json.loads(shown.stdout)
    (row,) = estimate["rows"]
    positions = len(transformers.AutoTokenizer.from_pretrained(tiny)(line["completion"], add_special_tokens=False)["input_ids"]) + 1
    assert row["calls"] == positions and row["cost"] == 0 and row["seconds"] > 0
    assert estimate["assumptions"]["concurrency"] == 1
