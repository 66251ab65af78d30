"""Recipes: ways of using methods (data, inference engines, evaluations). Methods never import recipes.

``retune``: recursive tuning, the model calls itself on smaller problems. ``dit``: diff interpretation, an adapter
that makes a model say what a weight diff taught it.
"""
