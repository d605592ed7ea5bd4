.PHONY: demo setup test

# Run as `make test ARGS="-k lease -x"` to pass options to pytest.
ARGS ?=

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/python examples/demo.py

test: setup
	.venv/bin/python -m pytest $(ARGS)
