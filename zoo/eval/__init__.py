"""Evaluation of any encoder: the one linear probe / kNN evaluator and its feature cache."""
