.PHONY: test demo clean env

PYTHON := .venv/bin/python

env:
	bash scripts/setup_env.sh

test: env
	$(PYTHON) -m pytest tests -q -n 2 --dist loadfile

demo: env
	$(PYTHON) -m fusiontrain demo

clean:
	rm -rf .venv build dist *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
