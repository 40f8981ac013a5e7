"""isae: identifiable sparse autoencoders, the study's library.

The package is grouped by role; imports run one way, from the top of this list down:

  cli        the ``isae`` console script: one thin module per subcommand
  study      the study's tables (T1, T2, ...), figures and pages, from what analysis made
  analysis   metrics on trained dictionaries: matching, code consistency, restricted
             isometry, held-out reconstruction, downstream fidelity, the feature browser
  training   the trainer: streaming, schedule, dead latents, resume state (analysis and
             training never import each other)
  data       formats on disk (activation sets, checkpoints, exports), streaming readers,
             activation sources (synthetic, text through a language model, vision)
  models     the SAE family and dictionary learning as plain maths, configs and presets,
             and the choice of compute path (``models.compute.select_ops``)
  gpu        the CUDA fast path, an op set the models run on: Triton kernels, fused
             autograd ops, CUDA graphs
  models.reference  the reference maths every other path is checked against (and falls
             back to)

``errors`` (UserError, the one-line failure) and ``progress`` (the progress bar) serve all.
tests/test_walls.py checks that the imports keep to this order.
``api`` is the Python entrance beside ``cli``: ``isae.load``, ``isae.match``, ``isae.ric``,
``isae.evaluate``, ``isae.load_model`` and ``isae.splice`` are its functions, imported on
first use so that ``import isae`` (and the console script's start) stays cheap.
"""

__version__ = "0.1.0"

#: The Python API (isae.api), resolved lazily.
API = ("SAE", "load", "match", "ric", "evaluate", "load_model", "splice")
__all__ = ["__version__", *API]


def __getattr__(name: str):
    if name in API:
        from isae import api

        return getattr(api, name)
    raise AttributeError(f"module 'isae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(API))
