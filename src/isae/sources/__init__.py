"""Activation sources: synthetic ground truth, language models, vision backbones.

Each module has ``extract(out, ...) -> dict`` writing one activation set (actset.py format)
and returning the JSON summary for the command line.
"""
