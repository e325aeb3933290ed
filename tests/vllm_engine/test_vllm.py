"""DSAS in a vLLM engine on ``shapes-lm``: steered greedy continuations equal
``DSASLanguageModel``'s, alone and in a batch of requests at different strengths, offline
(``vllm.LLM``) and through the OpenAI-compatible server with two clients at once.

Run by ``make test-vllm`` in its own environment (``.venv-vllm``: vLLM's CPU build pins another
torch and transformers than ``.venv``); skipped where vLLM is not installed.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

vllm = pytest.importorskip("vllm")

from dsas_diffusion import DSASLanguageModel  # noqa: E402
from dsas_diffusion.config import FitConfig  # noqa: E402
from dsas_diffusion.prompts import read_prompts  # noqa: E402
from dsas_diffusion.shapes import resolve_model_path, text_concept_files  # noqa: E402
from dsas_diffusion.steering import SteeringError  # noqa: E402
from dsas_diffusion.vllm import load_steering  # noqa: E402

STRENGTHS = [0.0, 8.0, 16.0, 4.0, 16.0, 0.0, 8.0, 16.0]
TOKENS = 20


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A steering of the negative register with the published gates (read the output), saved,
    and DSASLanguageModel's greedy continuations with it: alone and as one mixed batch."""
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
    context = tmp_path_factory.mktemp("context-gates")
    lm.fit_steering(*sets, FitConfig.for_text(), name="context", progress=False)
    lm.steerers["context"].save_pretrained(context)
    return {"dir": directory, "context": context, "prompts": prompts, "alone": alone, "plain": plain}


@pytest.fixture(scope="module")
def llm(reference):
    engine = vllm.LLM(model=str(resolve_model_path("shapes-lm")), dtype="float32", enforce_eager=True,
                      max_model_len=128, max_num_seqs=8, enable_prefix_caching=False)  # fmt: skip
    load_steering(engine, reference["dir"], name="negative")
    return engine


def _params(strength):
    return vllm.SamplingParams(max_tokens=TOKENS, temperature=0.0, extra_args={"dsas": strength} if strength else None)


def _texts(outputs):
    return [output.outputs[0].text.strip() for output in outputs]


def test_steered_continuations_equal_dsas_language_model_alone_and_in_a_mixed_batch(llm, reference):
    prompts, expected = reference["prompts"], [text.strip() for text in reference["alone"]]
    mixed = _texts(llm.generate(prompts, [_params(s) for s in STRENGTHS]))
    assert mixed == expected  # eight requests at four strengths in one batch
    alone = [_texts(llm.generate([p], _params(s)))[0] for p, s in zip(prompts, STRENGTHS, strict=True)]
    assert alone == expected
    named = _texts(llm.generate(prompts, [_params({"negative": s}) for s in STRENGTHS]))
    assert named == expected  # the strength given by the steering's name


def test_requests_without_steering_get_the_unsteered_continuations(llm, reference):
    assert _texts(llm.generate(reference["prompts"], _params(0.0))) == [t.strip() for t in reference["plain"]]


def test_what_this_version_cannot_steer_is_refused(llm, reference):
    with pytest.raises(SteeringError, match="gate_reads='output'"):
        load_steering(llm, reference["context"], name="context")
    with pytest.raises(SteeringError, match="already loaded"):
        load_steering(llm, reference["dir"], name="negative")
    assert _texts(llm.generate(reference["prompts"], _params(0.0))) == [t.strip() for t in reference["plain"]]


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
    env = {**os.environ, "DSAS_VLLM_STEERING": f"negative={reference['dir']}"}
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

        def client(indices):
            texts = {}
            for i in indices:
                body = {"model": model, "prompt": reference["prompts"][i], "max_tokens": TOKENS, "temperature": 0.0}
                if STRENGTHS[i]:
                    body["vllm_xargs"] = {"dsas:negative": STRENGTHS[i]}
                texts[i] = _post(f"{base}/v1/completions", body)["choices"][0]["text"].strip()
            return texts

        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two clients, four requests each
            results = [pool.submit(client, range(0, 8, 2)), pool.submit(client, range(1, 8, 2))]
            texts = {**results[0].result(), **results[1].result()}
        assert [texts[i] for i in range(8)] == [text.strip() for text in reference["alone"]]
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
