"""pyplot for the figures runs and tools write, on machines without a display."""

from __future__ import annotations


def headless_pyplot():  # -> the matplotlib.pyplot module
    """pyplot on the Agg backend: runs and writes PNGs on machines without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
