"""Standalone benchmarks that do what `packrunner bench` does not: overload/soak and serving."""
