"""The LLM Surgeon: K-FAC structured pruning with correlated weight updates over several shots.

``costs`` (one layer's second-order costs and updates), ``curvature`` (K-FAC factors),
``threshold`` (one global threshold), ``shot`` (one pruning shot over the model).
"""
