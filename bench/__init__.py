"""Benchmarks of cairn side by side with restic and borg (``python -m bench``).

Modules: :mod:`bench.corpus` (deterministic test data), :mod:`bench.runner` (runs the
tools), :mod:`bench.measure` (time, CPU, memory), :mod:`bench.report` (Markdown, JSON).
"""
