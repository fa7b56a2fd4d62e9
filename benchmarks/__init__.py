"""Benchmarks, each run as a module from the project root (`python -m benchmarks.load`), each
writing its JSON to outputs/benchmarks/. Speed and memory are measured here, never in tests."""
