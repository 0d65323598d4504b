.PHONY: test test-fast demo demo-audio-vision clean env

PYTHON := .venv/bin/python
# Both use 2 pytest-xdist workers that steal work from each other when idle; the expensive
# training runs several files compare against are made once per session (tests/helpers/shared.py).
PYTEST := $(PYTHON) -m pytest tests -q -n 2 --dist worksteal
# The repository's own modules, byte-compiled before each run on every core: where
# PYTHONDONTWRITEBYTECODE is set (CI here), Python never caches them, and each of the suite's few
# hundred processes (torchrun ranks, CLI runs) would compile what it imports (about 0.15 CPU-s).
COMPILE := $(PYTHON) -m compileall -q -j 0 fusiontrain tests > /dev/null

env:
	bash scripts/setup_env.sh

# Everything (what CI runs).
test: env
	$(COMPILE)
	$(PYTEST)

# For iteration: leaves out the files marked slow in tests/conftest.py (SLOW_FILES).
test-fast: env
	$(COMPILE)
	$(PYTEST) -m "not slow"

demo: env
	$(PYTHON) -m fusiontrain demo

# The demo of a model with two encoders: a tiny Llama with SigLIP and Whisper.
demo-audio-vision: env
	$(PYTHON) -m fusiontrain demo --audio-vision

clean:
	rm -rf .venv build dist *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
