"""Micro-Expert-Router: run Mixture-of-Experts models with experts streamed from an SSD.

`mer.open(store, ram_budget=...)` is the entry point (see `mer.api`). Importing
`mer` itself loads nothing heavy; torch comes in with the first real use.
"""

__version__ = "0.1.0"
__all__ = ["open"]


def __getattr__(name: str):
    if name == "open":
        from mer.api import open as open_

        return open_
    raise AttributeError(f"module 'mer' has no attribute {name!r}")
