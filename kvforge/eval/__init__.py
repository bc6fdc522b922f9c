"""Evaluation: generated long-context tasks, fidelity metrics, side-by-side runs, reports.

Imported lazily by ``kvforge eval``; nothing here is needed to build or query.
"""
