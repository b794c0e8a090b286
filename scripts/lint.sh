#!/usr/bin/env bash
# The checks make test runs before the tests (and .pre-commit-config.yaml runs on commit): ruff, the
# import rules of pyproject.toml's [tool.importlinter] (the pipeline's layers, one home per heavy
# package), and mypy on the pure modules.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
.venv/bin/ruff check --quiet quantune_edge device_agent tests benchmarks
.venv/bin/lint-imports --no-cache >/dev/null || { .venv/bin/lint-imports --no-cache | sed -n '/Broken contracts/,$p' >&2; exit 1; }
.venv/bin/mypy --no-error-summary
echo "lint: ruff, import rules (lint-imports) and mypy passed" >&2
