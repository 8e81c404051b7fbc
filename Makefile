# The two commands of the quick start, and the rest of the developer loop.
#   make demo   - install what is needed into .venv, then train the embedded default (2 CPU processes, FSDP)
#   make test   - install, then run the test suite (CI runs it, then `make test-slurm`)
# torch is installed first and pinned, so pip never pulls a CUDA build on a CPU machine. Elsewhere pick your
# build, e.g.  make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1

.PHONY: install demo test test-fast test-slow test-slurm test-gpu lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/accelerate launch --config_file fsdp_configs/cpu_2proc.yaml recipes/tiny.py \
		train.run_name=tiny-$$(date +%Y%m%d-%H%M%S) $(ARGS)

test: $(STAMP)
	$(BIN)/pytest -q -m "not slurm" --durations=40 tests

# the real-Slurm tests: start a local cluster (needs root and apt), about 12 minutes
test-slurm: $(STAMP)
	$(BIN)/pytest -q -m slurm tests

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow" tests

test-slow: $(STAMP)
	$(BIN)/pytest -q -m "slow and not slurm" tests

# GPU checks (2+ GPUs): in the environment's own Python, whose torch has CUDA (the venv's is the pinned CPU
# build); on the bench machines `source bench/gpu_env.sh` first (it installs the wheels the image lacks)
test-gpu:
	$(PYTHON) -m pytest -q tests/gpu

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
