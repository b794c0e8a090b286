# Two commands do all the set-up (see README): `make demo` and `make test`.
.PHONY: setup demo test

setup:
	@bash scripts/bootstrap.sh

demo: setup
	.venv/bin/quantune-edge demo

test:
	@bash scripts/test.sh
