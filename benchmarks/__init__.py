"""Benchmarks: speed, memory and quality side by side with peers (run as `python -m benchmarks.NAME`)."""
