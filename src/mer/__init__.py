"""Micro-Expert-Router: run Mixture-of-Experts models with experts streamed from an SSD."""

__version__ = "0.1.0"
