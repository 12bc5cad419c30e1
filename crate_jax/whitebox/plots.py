"""The one door to matplotlib for every figure the package writes (analysis, evaluators,
the autoencoder's decoder curves): headless (Agg), and imported only when a figure is drawn,
because matplotlib is slow to import and training never needs it."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files, no display)."""
    import matplotlib  # deferred: a heavy import that only figures need

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
