"""The quantune-edge command line (typer + rich), thin over the Python API."""
from quantune_edge.cli.app import app, main

__all__ = ["app", "main"]
