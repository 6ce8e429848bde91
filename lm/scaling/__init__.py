"""Scaling laws: the fits (``laws``, re-exporting the routed law of ``routed``), the sweep that trains a grid of
models (``sweep``) and its results table (``runs``), and the fit report with its plots (``report``, ``plots``)."""
