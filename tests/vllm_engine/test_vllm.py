"""DSAS in a vLLM engine on ``shapes-lm``: steered greedy continuations equal
``DSASLanguageModel``'s, alone and in a batch of requests at different strengths, with gates
reading the output and with gates reading the context (the shipped example steering), offline
(``vllm.LLM``, prompts split over steps, requests preempted) and through the
OpenAI-compatible server with two clients at once.

Run by ``make test-vllm`` in its own environment (``.venv-vllm``: vLLM's CPU build pins another
torch and transformers than ``.venv``); skipped where vLLM is not installed.
"""

from __future__ import annotations

import concurrent.futures
import gc
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

vllm = pytest.importorskip("vllm")

from lm_reference import log_probs  # noqa: E402
from lm_rounding import assert_texts_agree, rounding_jitter  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402

from dsas_diffusion import DSASLanguageModel  # noqa: E402
from dsas_diffusion.config import FitConfig  # noqa: E402
from dsas_diffusion.prompts import read_prompts  # noqa: E402
from dsas_diffusion.shapes import resolve_model_path, text_concept_files  # noqa: E402
from dsas_diffusion.shapes.examples import text_example_steerings  # noqa: E402
from dsas_diffusion.steering import SteeringError  # noqa: E402
from dsas_diffusion.vllm import load_steering  # noqa: E402

STRENGTHS = [0.0, 8.0, 16.0, 4.0, 16.0, 0.0, 8.0, 16.0]
#: for the shipped example, whose gates read the context (the language models' default)
CONTEXT_STRENGTHS = [0.0, 16.0, 32.0, 16.0, 32.0, 16.0, 32.0, 16.0]
TOKENS = 20


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """DSASLanguageModel's greedy continuations, each prompt alone: with a steering of the negative
    register whose gates read the output (the published gates), fitted and saved here, and with the
    shipped example, whose gates read the context; a steering with sample gates, to be refused."""
    files = text_concept_files("negative")
    lm = DSASLanguageModel.from_pretrained("shapes-lm", dtype=torch.float32)
    sets = [read_prompts(files[key])[:64] for key in ("source", "target", "control")]
    lm.fit_steering(*sets, FitConfig(map="caa", gate_threshold=None, n_components=20, support_quantiles=None),
                    progress=False)  # fmt: skip
    directory = tmp_path_factory.mktemp("steering")
    lm.steerers["default"].save_pretrained(directory)
    # the first sentence of a document with the register, and the next sentence's first word (a
    # greedy continuation of the sentence alone is the end of the document); prefixes of controls
    prompts = [f"{p} the" for p in read_prompts(files["eval_concept"])[:4]] + read_prompts(files["eval_control"])[:4]
    greedy = {"max_new_tokens": TOKENS, "do_sample": False}
    alone = [lm.generate([p], steering_strength=s, **greedy).texts[0] for p, s in zip(prompts, STRENGTHS, strict=True)]
    plain = lm.generate(prompts, steering_strength=0.0, **greedy).texts
    assert sum(a != p for a, p in zip(alone, plain, strict=True)) >= 4  # the steering changes continuations
    sample = tmp_path_factory.mktemp("sample-gates")
    lm.fit_steering(*sets, FitConfig(map="caa", sample_gate=True), name="sample", progress=False)
    lm.steerers["sample"].save_pretrained(sample)
    # the shipped example of the register, with the defaults' gates reading the context, alone in
    # its model; the first words of documents with the register, then control documents
    example = text_example_steerings()[("negative", "caa")]
    lm = DSASLanguageModel.from_pretrained("shapes-lm", dtype=torch.float32)
    lm.load_steering(example)
    short = [" ".join(p.split()[:4]) for p in read_prompts(files["eval_concept"])[:6]] + prompts[4:6]
    context = [lm.generate([p], steering_strength=s, **greedy).texts[0] for p, s in
               zip(short, CONTEXT_STRENGTHS, strict=True)]  # fmt: skip
    context_plain = lm.generate(short, steering_strength=0.0, **greedy).texts
    assert sum(a != p for a, p in zip(context, context_plain, strict=True)) >= 4
    # to tell a tie that rounding decides from a difference (:mod:`lm_rounding`): both steerings
    judge = DSASLanguageModel.from_pretrained("shapes-lm", dtype=torch.float32)
    judge.load_steering(directory, name="negative")
    judge.load_steering(example, name="example")
    return {"dir": directory, "sample": sample, "prompts": prompts, "alone": alone, "plain": plain,
            "example": example, "short": short, "context": context, "judge": judge}  # fmt: skip


def _agree(reference, prompts, served, expected, strengths, name):
    """vLLM's greedy continuations (texts) are ``DSASLanguageModel``'s, token for token up to a tie
    that rounding decides, each prompt at its strength of steering ``name``."""
    for prompt, one, other, strength in zip(prompts, expected, served, strengths, strict=True):
        assert_texts_agree(reference["judge"], prompt, one, other, {name: strength})


@pytest.fixture(scope="module")
def llm(reference):
    """An engine that splits prompts over steps (8 tokens a step, chunked prefill)."""
    engine = vllm.LLM(model=str(resolve_model_path("shapes-lm")), dtype="float32", enforce_eager=True,
                      max_model_len=128, max_num_seqs=8, enable_prefix_caching=False, max_num_batched_tokens=8)  # fmt: skip
    load_steering(engine, reference["dir"], name="negative")
    load_steering(engine, reference["example"], name="example")
    return engine


def _params(strength, name="negative"):
    extra = {"dsas": {name: strength}} if strength else None
    return vllm.SamplingParams(max_tokens=TOKENS, temperature=0.0, extra_args=extra)


def _texts(outputs):
    return [output.outputs[0].text.strip() for output in outputs]


def test_steered_continuations_equal_dsas_language_model_alone_and_in_a_mixed_batch(llm, reference):
    prompts, expected = reference["prompts"], reference["alone"]
    mixed = _texts(llm.generate(prompts, [_params(s) for s in STRENGTHS]))
    _agree(reference, prompts, mixed, expected, STRENGTHS, "negative")  # eight requests at four strengths
    alone = [_texts(llm.generate([p], _params(s)))[0] for p, s in zip(prompts, STRENGTHS, strict=True)]
    _agree(reference, prompts, alone, expected, STRENGTHS, "negative")
    for_all = [
        vllm.SamplingParams(max_tokens=TOKENS, temperature=0.0, extra_args={"dsas:negative": s}) for s in STRENGTHS
    ]
    served = _texts(llm.generate(prompts, for_all))  # the "dsas:<name>" form of vllm_xargs
    _agree(reference, prompts, served, expected, STRENGTHS, "negative")


def test_gates_reading_the_context_equal_dsas_language_model_with_prompts_split_over_steps(llm, reference):
    """The shipped example steering (gates reading the context), in an engine that splits prompts
    over steps: each request's context is its own tokens so far."""
    prompts, expected = reference["short"], reference["context"]
    mixed = _texts(llm.generate(prompts, [_params(s, "example") for s in CONTEXT_STRENGTHS]))
    _agree(reference, prompts, mixed, expected, CONTEXT_STRENGTHS, "example")
    alone = [
        _texts(llm.generate([p], _params(s, "example")))[0] for p, s in zip(prompts, CONTEXT_STRENGTHS, strict=True)
    ]
    _agree(reference, prompts, alone, expected, CONTEXT_STRENGTHS, "example")


def test_a_preempted_request_reads_its_context_again_from_its_first_token(reference):
    """Three requests of 100 tokens in a cache of five blocks of 32: vLLM preempts them and
    recomputes each from its first token, and their log-probabilities stay DSASLanguageModel's."""
    engine = vllm.LLM(model=str(resolve_model_path("shapes-lm")), dtype="float32", enforce_eager=True,
                      max_model_len=128, enable_prefix_caching=False, block_size=32, num_gpu_blocks_override=5,
                      disable_log_stats=False)  # fmt: skip
    try:
        load_steering(engine, str(reference["example"]))
        sampling = vllm.SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True, logprobs=0,
                                       extra_args={"dsas": 16.0})  # fmt: skip
        outputs = engine.generate(reference["short"][1:4], sampling)
        preempted = next(metric.value for metric in engine.get_metrics() if metric.name == "vllm:num_preemptions")
    finally:
        del engine
        gc.collect()
    assert preempted >= 1
    lm = DSASLanguageModel.from_pretrained("shapes-lm", dtype=torch.float32)
    lm.load_steering(reference["example"])
    for output in outputs:
        ids, tokens = list(output.prompt_token_ids), list(output.outputs[0].token_ids)
        served = torch.tensor([step[t].logprob for step, t in zip(output.outputs[0].logprobs, tokens, strict=True)])
        index = torch.tensor(tokens)[:, None]
        one_pass = log_probs(lm, ids + tokens, len(ids), 16.0, cached=False).gather(1, index)[:, 0]
        # within what rounding can move them (lm_rounding); a context read from a restarted
        # request's old sum moves them far more
        tolerance = 10 * rounding_jitter(lm, ids + tokens, len(ids), 16.0) + 1e-5
        assert torch.all((served - one_pass).abs() <= tolerance), float((served - one_pass).abs().max())


def test_requests_without_steering_get_the_unsteered_continuations(llm, reference):
    served = _texts(llm.generate(reference["prompts"], _params(0.0)))
    _agree(reference, reference["prompts"], served, reference["plain"], [0.0] * len(served), "negative")


def test_what_this_version_cannot_steer_is_refused(llm, reference):
    with pytest.raises(SteeringError, match="sample gates"):
        load_steering(llm, reference["sample"], name="sample")
    # a request asking for what the engine cannot give is refused alone, as it arrives
    for extra, message in [({"dsas:red": 8.0}, r"\['red'\], which this engine has not loaded"),
                           ({"dsas": {"negative": "strong"}}, "must be a number"),
                           ({"dsas": float("nan")}, "must be finite")]:  # fmt: skip
        with pytest.raises(VLLMValidationError, match=message):
            llm.generate(reference["prompts"][:1], vllm.SamplingParams(max_tokens=2, extra_args=extra))
    with pytest.raises(SteeringError, match="already loaded"):
        load_steering(llm, reference["dir"], name="negative")
    served = _texts(llm.generate(reference["prompts"], _params(0.0)))  # the engine serves on
    _agree(reference, reference["prompts"], served, reference["plain"], [0.0] * len(served), "negative")


def _post(url, body):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def test_the_openai_server_steers_each_request_by_its_vllm_xargs(reference, tmp_path):
    """``vllm serve`` with ``DSAS_VLLM_STEERING``: two clients at once, each request at its own
    strength (``vllm_xargs``), get DSASLanguageModel's continuations."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    model = str(resolve_model_path("shapes-lm"))
    env = {**os.environ, "DSAS_VLLM_STEERING": f"negative={reference['dir']},example={reference['example']}"}
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", "float32",
               "--enforce-eager", "--no-enable-prefix-caching", "--max-model-len", "128", "--max-num-seqs", "8",
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    log = open(tmp_path / "server.log", "w")  # (closed below)
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start in 5 minutes"
                time.sleep(2)

        def client(name, prompts, strengths):
            texts = []
            for prompt, strength in zip(prompts, strengths, strict=True):
                body = {"model": model, "prompt": prompt, "max_tokens": TOKENS, "temperature": 0.0}
                if strength:
                    body["vllm_xargs"] = {f"dsas:{name}": strength}
                texts.append(_post(f"{base}/v1/completions", body)["choices"][0]["text"].strip())
            return texts

        bad = {"model": model, "prompt": "a red", "max_tokens": 2, "vllm_xargs": {"dsas:red": 8}}
        with pytest.raises(urllib.error.HTTPError) as refused:  # a steering this server has not loaded
            _post(f"{base}/v1/completions", bad)
        assert refused.value.code == 400 and "has not loaded" in refused.value.read().decode()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two clients, eight requests each
            output = pool.submit(client, "negative", reference["prompts"], STRENGTHS)
            context = pool.submit(client, "example", reference["short"], CONTEXT_STRENGTHS)
            _agree(reference, reference["prompts"], output.result(), reference["alone"], STRENGTHS, "negative")
            _agree(reference, reference["short"], context.result(), reference["context"], CONTEXT_STRENGTHS, "example")
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def test_the_documented_example_runs_and_prints_what_the_docs_show(tmp_path, monkeypatch, capsys):
    from test_readme import README, _example, _lines

    code, documented = _example("## Serving with vLLM", README.parent / "docs" / "text.md")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/text.md vLLM", "exec"), {"__name__": "__main__"})
    printed = [line for line in _lines(capsys.readouterr().out) if line.startswith("'")]  # (not vLLM's log)
    assert printed == _lines(documented)
