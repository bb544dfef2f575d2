"""Depth growth: expansion plans and the grow command."""
