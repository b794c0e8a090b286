"""Stage 2, analyze: per-layer local metrics from one float and one int8 run, the sensitivity ranking, its oracle."""
