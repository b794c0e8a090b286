"""Shared plumbing every stage uses: JSON records, the console, numeric metrics, preprocessing, what may be replaced."""
