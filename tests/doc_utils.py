"""The project's documentation as the tests read it: README.md, then every docs/*.md page."""

import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def documentation() -> str:
    """README.md and the docs/ pages, joined in a fixed order (README first)."""
    paths = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs",
                                                                               "*.md")))]
    texts = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
    return "\n\n".join(texts)
