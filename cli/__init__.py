"""Thin click front-ends: parse, build a frozen config, call the typed API, turn SoraError into one line."""
