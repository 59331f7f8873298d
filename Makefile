# ddpm-lightning: every command a user types is here and in the README.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp
PYTEST := $(BIN)/python -m pytest
# one test process per CPU core (pytest-xdist), each test file in one process: its module fixtures are built once
PARALLEL := -n auto --dist loadfile

.PHONY: install test test-slow test-all lint format demo demo-cond train ablation sweep guidance bench gpu-check clean

install: $(STAMP)

# reinstall only when pyproject.toml changes (the stamp records its hash)
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if [ "$$(cat $(STAMP) 2>/dev/null)" != "$$(sha256sum pyproject.toml | cut -d' ' -f1)" ]; then \
		echo "installing ddpm-lightning and its dependencies (torch, lightning, ...) into $(VENV): a few minutes the first time"; \
		$(BIN)/pip install --disable-pip-version-check -e '.[dev]' && \
		sha256sum pyproject.toml | cut -d' ' -f1 > $(STAMP); \
	else touch $(STAMP); fi

test: install  ## unit + integration + ddp tiers, minus the slow ones (about 4 min on 2 AVX2 CPU cores)
	$(PYTEST) $(PARALLEL) -m "not slow" --durations=15

test-slow: install  ## the slow tier only
	$(PYTEST) $(PARALLEL) -m slow --durations=15

test-all: install
	$(PYTEST) $(PARALLEL) --durations=15

lint: install
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

format: install
	$(BIN)/ruff check --fix src tests benchmarks scripts
	$(BIN)/ruff format src tests benchmarks scripts

DEMO_STEPS ?= 1100
DEMO_TIME ?=
# DEMO_TIME: the run measures its own step rate after a short warm-up and fixes its step count (TrainingBudget), so
# that the lr schedule and the guide know the run's length
BUDGET = --trainer.max_steps=-1 '--trainer.callbacks+={"class_path": "ddpm_lightning.callbacks.TrainingBudget", "init_args": {"seconds": "$(DEMO_TIME)"}}'
demo: install  ## a small DDPM on the embedded MNIST digits, DEMO_STEPS optimizer steps (or DEMO_TIME=dd:hh:mm:ss): runs/demo/
	$(BIN)/ddpm fit -c configs/demo.yaml $(if $(DEMO_TIME),$(BUDGET),--trainer.max_steps=$(DEMO_STEPS)) $(ARGS)

DEMO_COND_STEPS ?= 1100
demo-cond: install  ## the demo, class-conditional (classifier-free guidance), DEMO_COND_STEPS or DEMO_TIME: runs/demo_cond/
	$(BIN)/ddpm fit -c configs/demo.yaml -c configs/demo_cond.yaml $(if $(DEMO_TIME),$(BUDGET),--trainer.max_steps=$(DEMO_COND_STEPS)) $(ARGS)

train: install  ## the paper's CIFAR-10 run (needs data/cifar-10-batches-py or data/cifar-10-python.tar.gz)
	$(BIN)/ddpm fit -c configs/cifar10.yaml $(ARGS)

ablation: install  ## linear vs cosine on the embedded digits (CPU, ~15 min; ARGS="--axis variance=..." for other axes): results/ablation/
	$(BIN)/ddpm ablate -c configs/demo.yaml -c configs/ablation/demo.yaml $(ARGS)

sweep: install  ## each sampler's quality and images/s at 1000..10 network evaluations on the demo model: results/samplers/
	$(BIN)/ddpm sampler-sweep --ckpt runs/demo/demo.ckpt $(ARGS)

guidance: install  ## accuracy of the requested class and Frechet distance at guidance scales 1 2 3 5: results/guidance/
	$(BIN)/ddpm guidance-sweep --ckpt runs/demo_cond/demo.ckpt $(ARGS)

BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,bench]' && touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)  ## our U-Net vs diffusers and denoising-diffusion-pytorch, then the hot path: benchmarks/results/
	$(BIN)/python benchmarks/suite.py $(ARGS)
	$(BIN)/python benchmarks/hot_path.py

gpu-check:  ## on a GPU, at most ~5 min: training, sampling and 256x256 memory figures (docs/gpu_check.md): benchmarks/results/gpu_check.*
	timeout 330 $(PYTHON) benchmarks/gpu_check.py $(ARGS)

clean:
	rm -rf runs results/ablation results/guidance .pytest_cache .ruff_cache build src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
