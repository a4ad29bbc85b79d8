"""Gymnasium MuJoCo tasks: registry with presets, vector-env factory, POMDP wrappers.

Imports nothing else of this project (see DESIGN.md §1).
"""
