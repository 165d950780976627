"""Tensor math only (no transformers import): attention, value fits, scorers, methods, budget rules.

Every function takes and returns plain tensors; shapes are in the docstrings. ``H`` is the number of KV
heads solved together, ``n`` the context length, ``N`` the number of reference queries, ``m`` a budget.
"""
