"""Pruning: block importance, base selection and the prune command."""
