"""The probe reports only what it observed, learns the top-k cap it may ask for, and auto then recovers
values wherever a method can; servers that are not LLM APIs get one short message, never a table."""

import asyncio
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from logprob_cli.endpoints._base import EndpointError, EndpointRejected, EndpointUnsuitable, Prompt
from logprob_cli.run._estimate import probe_calls
from logprob_cli.run._probe import PROBE_CALLS, ProbeReport, expected_calls, probe
from logprob_cli.run._runner import extract_batch
from logprob_cli.endpoints._simulator import SimulatedEndpoint, SimulatorConfig

VOCAB = 1000
PROMPT = Prompt(id=0, line=1, prompt="The capital of France is")
README = Path(__file__).parent.parent / "README.md"


def probed(endpoint) -> ProbeReport:
    return asyncio.run(probe(endpoint, PROMPT))


class Refusing(SimulatedEndpoint):
    """The simulator, refusing some requests the way a stricter server does."""

    def __init__(self, config: SimulatorConfig, refuse, error=EndpointRejected):
        super().__init__(config)
        self.refuse, self.error, self.asked = refuse, error, []

    async def ask(self, prompt, query):
        self.asked.append(query)
        message = self.refuse(query)
        if message:
            raise self.error(message)
        return await super().ask(prompt, query)


def openai_like(query):
    """OpenAI's limits: biases beyond +-100 are rejected."""
    if any(abs(b) > 100 for _, b in query.bias):
        return "logit_bias values must be between -100 and 100"
    return ""


# --- the top-k cap, learnt ---------------------------------------------------------------------


@pytest.mark.parametrize("after", [True, False])
def test_call_count_is_what_the_simulator_answered_for_every_cap(after):
    for cap in range(1, 21):
        endpoint = SimulatedEndpoint(SimulatorConfig(vocab_size=VOCAB, top_logprobs_cap=cap, logprobs_after_bias=after))
        report = probed(endpoint)
        assert report.top_logprobs_cap == cap
        assert endpoint.calls == report.calls == expected_calls(report) == probe_calls(report), cap
        assert report.rejected_calls >= 1  # the vocabulary asked for first


def test_the_advertised_count_is_what_an_openai_like_endpoint_answers():
    endpoint = Refusing(SimulatorConfig(vocab_size=VOCAB, logprobs_after_bias=False, sampled_logprob="sentinel", max_draws=128), openai_like)
    report = probed(endpoint)
    assert report.bias_above_100 == report.bias_entries_over_300 == "rejected"
    assert endpoint.calls == report.calls == PROBE_CALLS
    assert len(endpoint.asked) == report.calls + report.rejected_calls
    numbers = re.findall(r"(\d+) answered calls", README.read_text())
    assert numbers and {int(n) for n in numbers} == {PROBE_CALLS}, "README states the probe's count"
    simulator = SimulatedEndpoint(SimulatorConfig(vocab_size=VOCAB))
    assert f"{probed(simulator).calls} on the simulator" in " ".join(README.read_text().split())


@pytest.mark.parametrize("cap", [3, 7, 13])
def test_a_refusal_that_names_no_cap_is_searched_and_nothing_beyond_it_is_answered(cap):
    config = SimulatorConfig(vocab_size=VOCAB, top_logprobs_cap=cap)
    endpoint = Refusing(config, lambda q: "invalid top_logprobs" if q.top_logprobs > cap else "")
    report = probed(endpoint)
    assert report.top_logprobs_cap == cap and report.recommended == "topk"
    assert endpoint.calls == report.calls and len(endpoint.asked) == report.calls + report.rejected_calls
    later = [q for q in endpoint.asked if q.bias]
    assert later and all(q.top_logprobs <= cap for q in later), "every measurement asks within the cap"


def test_every_request_refused_is_not_an_answer():
    endpoint = Refusing(SimulatorConfig(vocab_size=VOCAB), lambda q: "this model does not support logprobs")
    with pytest.raises(EndpointUnsuitable, match="by hand with method"):
        probed(endpoint)
    assert endpoint.calls == 0


def test_requests_that_keep_failing_are_not_taken_for_a_cap():
    endpoint = Refusing(SimulatorConfig(vocab_size=VOCAB), lambda q: "kept failing (8 tries); last: 500", EndpointError)
    with pytest.raises(EndpointError, match="nothing could be measured"):
        probed(endpoint)
    assert len(endpoint.asked) == 1 and endpoint.calls == 0


# --- unknowns are reported as unknown, and never chosen on ---------------------------------------


@pytest.mark.parametrize("error, said", [(EndpointRejected, "rejected"), (EndpointError, "failed")])
def test_a_bias_request_that_is_refused_or_fails_leaves_the_bias_unknown(error, said):
    endpoint = Refusing(SimulatorConfig(vocab_size=VOCAB), lambda q: "logit_bias is not supported" if q.bias else "", error)
    report = probed(endpoint)
    assert report.bias_steers_sampling is None and report.logprobs_after_bias is None
    assert report.forced_logprob == "unknown" and said in report.unknown["bias_steers_sampling"]
    assert report.recommended == "visible"
    assert any("could not tell what the bias does" in reason for reason in report.reasons)
    rows = dict(report.rows())
    assert rows["bias steers sampling"].startswith("could not tell (") and "logit_bias is not supported" in rows["bias steers sampling"]
    saved = json.loads(json.dumps(report.to_dict()))
    assert saved["bias_steers_sampling"] is None and "bias_steers_sampling" in saved["unknown"]
    assert ProbeReport.from_dict(saved) == report


def test_a_forced_token_that_is_refused_leaves_forced_out_but_bisection_in():
    def refuse(query):
        return "bias too large" if any(b >= 100 for _, b in query.bias) else ""

    config = SimulatorConfig(vocab_size=VOCAB, logprobs_after_bias=False)
    report = probed(Refusing(config, refuse))
    assert report.bias_steers_sampling is True and report.forced_logprob == "unknown"
    assert report.recommended == "bisection", "forced is never picked on an unobserved property"


def test_reports_saved_by_the_previous_version_still_load():
    old = {
        "top_logprobs_cap": 20, "whole_vocabulary": False, "bias_steers_sampling": True, "logprobs_after_bias": True,
        "forced_logprob": "wrong", "bias_above_100": "accepted", "bias_entries_over_300": "rejected",
        "precision": "float32", "deterministic": True, "concurrent_agree": True, "identity": ["ids"],
        "vocab_size": 2000, "calls": 13, "recommended": "topk", "estimated_calls": 107,
        "reasons": ["returned logprobs move with the bias"],
    }
    report = ProbeReport.from_dict({**old, "a_key_from_elsewhere": 1})
    assert report.recommended == "topk" and report.limits().top_logprobs == 20
    assert report.unknown == {} and dict(report.rows())["bias steers sampling"] == "yes"


# --- auto recovers values wherever a method can ----------------------------------------------------


@pytest.mark.parametrize(
    "cap, after, sampled, method",
    [
        (1, True, "report", "bisection"),
        (1, False, "report", "forced"),
        (2, True, "report", "topk"),
        (3, True, "report", "topk"),
        (3, False, "report", "forced"),
        (5, False, "sentinel", "bisection"),
        (20, True, "report", "topk"),
        (20, False, "report", "forced"),
    ],
)
def test_auto_recovers_every_value_at_every_cap(tmp_path, cap, after, sampled, method):
    config = SimulatorConfig(vocab_size=VOCAB, top_logprobs_cap=cap, logprobs_after_bias=after, sampled_logprob=sampled)
    endpoint = SimulatedEndpoint(config)
    prompts = [PROMPT, Prompt(id=1, line=2, prompt="1, 2, 3, 4,")]
    summary = extract_batch(prompts, tmp_path / "out.parquet", endpoint, "auto")
    assert not summary.failures and summary.finished == 2
    for row, prompt in zip(pq.read_table(tmp_path / "out.parquet").to_pylist(), prompts):
        assert row["method"] == method and row["unrecovered_count"] == 0
        error = np.abs(np.array(row["logprobs"], dtype=float) - endpoint.true_logprobs(prompt)).max()
        assert error <= row["precision_nats"] + 1e-5, (error, row["precision_nats"])


@pytest.mark.parametrize("cap", [1, 2])
def test_without_steering_a_post_bias_endpoint_still_gives_topk_where_k_allows(cap):
    config = SimulatorConfig(vocab_size=VOCAB, top_logprobs_cap=cap, bias_steers_sampling=False)
    report = probed(SimulatedEndpoint(config))
    assert report.bias_steers_sampling is False and report.logprobs_after_bias is True
    assert report.recommended == ("topk" if cap >= 2 else "visible")


# --- servers that are not LLM APIs --------------------------------------------------------------


@contextmanager
def http_server(handler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1"
    finally:
        server.shutdown()
        server.server_close()


def answering(status: int, body: bytes, kind: str):
    class Handler(http.server.BaseHTTPRequestHandler):
        def send(self):
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self.send()

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send()

        def log_message(self, *args):
            pass

    return Handler


def file_server(directory: Path):
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(directory), **kwargs)

        def log_message(self, *args):
            pass

    return Handler


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "logprob_cli.cli", *map(str, args)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "OPENAI_API_KEY": "unused"},
    )


def endpoint_args(url: str):
    return ("--model", "some-model", "--tokenizer", f"simulator:{VOCAB}", "--base-url", url)


def assert_one_short_message(run, *words):
    assert run.returncode == 1, (run.stdout, run.stderr)
    assert "Traceback" not in run.stderr and "<html" not in run.stderr.lower() and "<!doctype" not in run.stderr.lower()
    assert "error: " in run.stderr, run.stderr
    message = run.stderr[run.stderr.index("error: "):]
    assert len(message) < 400 and len(run.stderr) < 800, run.stderr
    assert "top_logprobs honoured" not in run.stdout, "no made-up table"
    flat = " ".join(message.split())
    for word in words:
        assert word in flat, flat


def test_a_file_server_is_not_an_api(tmp_path):
    """python -m http.server: GET /models is a 404 page, every POST a 501 page."""
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    with http_server(file_server(tmp_path)) as url:
        run = cli("probe", *endpoint_args(url))
        assert_one_short_message(run, f"{url} does not look like an OpenAI-compatible API",
                                 "POST /chat/completions answered 501 with an HTML page")
        run = cli("extract", tmp_path / "p.jsonl", "-o", tmp_path / "p.parquet", *endpoint_args(url))
        assert_one_short_message(run, "does not look like an OpenAI-compatible API", "501")
    assert not (tmp_path / "p.parquet").exists()


@pytest.mark.parametrize(
    "body, kind, said",
    [
        (b"{}", "application/json", "JSON that is not a completion"),
        (b"[1, 2]", "application/json", "JSON that is not a completion"),
        (b"<!DOCTYPE html><html><head><title>Welcome</title></head><body>" + b"x" * 5000 + b"</body></html>",
         "text/html", "HTML page titled 'Welcome'"),
        (b"OK", "text/plain", "plain text"),
    ],
)
def test_a_server_answering_200_with_something_else_gets_no_table(body, kind, said):
    with http_server(answering(200, body, kind)) as url:
        run = cli("probe", *endpoint_args(url))
    assert_one_short_message(run, "does not look like an OpenAI-compatible API", said)


def test_error_pages_are_described_not_printed():
    from logprob_cli.endpoints._transport import _message

    page = b"<html><head><title>502 Bad Gateway</title></head><body>" + b"<p>nginx</p>" * 2000 + b"</body></html>"
    assert _message(page, 502) == "an HTML page titled '502 Bad Gateway'"
    long = json.dumps({"error": {"message": "no " * 1000}}).encode()
    assert len(_message(long, 400)) <= 500
    assert _message(b"", 400) == "HTTP 400 with no body"


def test_probe_names_the_image_method_auto_runs_with_the_image(tmp_path):
    """With --image, the report names the image method auto would run and its calls per prompt (as estimate and
    extract pick it); without, a line says the image methods need --image; an unreadable image stops before a call."""
    from logprob_cli.methods import SPECS

    np.save(tmp_path / "w.npy", SimulatedEndpoint(SimulatorConfig(vocab_size=VOCAB)).sim.output_matrix())
    run = cli("probe", "--sim", f"vocab_size={VOCAB}", "--image", tmp_path / "w.npy", "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["recommended"] == "topk" and report["image_method"] == "topk+image"
    k = report["top_logprobs_cap"]
    assert report["image_calls_per_prompt"] == SPECS["topk+image"].calls(VOCAB, k, 1e-3, ProbeReport(**{
        key: value for key, value in report.items() if not key.startswith("image_")}).limits(), 0, rank=66)
    assert report["image_calls_per_prompt"] < report["estimated_calls"] / 5  # 7 against 54
    pre_bias = ("--sim", "logprobs_after_bias=false")
    for args, said in [
        (("--image", tmp_path / "w.npy"), "forced+image (~"),
        (("--image", "auto"), "forced+image once the run has learned the image"),
        ((), "forced+image reads through the model's image: give --image auto|PATH"),
    ]:
        run = cli("probe", "--sim", f"vocab_size={VOCAB}", *pre_bias, *args)
        assert run.returncode == 0, run.stderr
        shown = " ".join(run.stdout.replace("│", " ").split())
        assert said in shown, run.stdout
        if args and args[1] != "auto":  # about r + a few calls, against forced's ~V
            assert 66 < int(re.search(r"forced\+image \(~(\d+) calls per prompt", shown)[1]) < VOCAB / 5
    run = cli("probe", "--sim", f"vocab_size={VOCAB}", "--image", tmp_path / "missing.npy")
    assert run.returncode == 2 and "Traceback" not in run.stderr and "missing.npy" in run.stderr
