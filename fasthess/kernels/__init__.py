"""Kernel families, each a pure-torch ``reference.py`` plus faster backends.

One registry for all of them (:mod:`fasthess.kernels.registry`): ``backend="auto"``
takes the fastest available implementation and falls back quietly; an explicit
backend that is not available raises.
"""
