# Two commands matter: `make demo` and `make test`. Both set up .venv first when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# onnxruntime and onnxruntime-gpu install the same module: choose exactly one.
ORT_EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(ORT_EXTRA)

# KServe's Python client for its REST test lives in a venv of its own, outside the repository: kserve pins
# protobuf<7 and brings kubernetes, fastapi and pandas, none of which our extras should carry.
KSERVE_VENV ?= $(or $(LSTM_ONNX_KSERVE_VENV),/tmp/kserve-venv)

.PHONY: setup demo test protos reliability bench clean kserve-venv mlserver-venv mutation

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[train,serve,test,$(ORT_EXTRA)]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q -p no:cacheprovider -rs

protos: setup
	$(PY) -m lstm_onnx.protos.generate

# Mutation testing of the critical modules (docs/testing.md), one module at a time with the tests that cover it;
# not part of `make test`. MODULES="lstm_onnx/protocol/errors.py ..." narrows it.
mutation: setup
	$(PY) -c "import mutmut" 2>/dev/null || $(PY) -m pip install -q -e ".[mutation]"
	$(PY) tests/mutation/run.py $(MODULES)

reliability: setup
	PYTHONPATH=tests $(PY) -m reliability

bench: setup
	$(PY) -m bench.suite

kserve-venv:
	test -x $(KSERVE_VENV)/bin/python || $(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/python -m pip install -q "kserve==0.21.0"

# MLServer (the bench's Python peer, and tests/test_bench_smoke.py's comparison with it) has its own venv too:
# $$LSTM_ONNX_MLSERVER_VENV or <temp dir>/mlserver-venv. bench/mlserver.py owns the place and the pinned version
# (the bench installs the same venv on first use), so this target runs it; it fails when the install does.
mlserver-venv:
	$(PYTHON) -m bench.mlserver

clean:
	rm -rf $(VENV) demo runs build/mutation
