"""Resilient AI gateway: a stable prediction API in front of Triton model servers."""

__version__ = "0.1.0"
