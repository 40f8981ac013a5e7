"""isae: identifiable sparse autoencoders, the study's library.

The package is grouped by role; imports run one way, from the top of this list down:

  cli        the ``isae`` console script: one thin module per subcommand
  study      the study's tables (T1, T2, ...) and figures, from collected Parquet tables
  analysis   metrics on trained dictionaries: matching, code consistency, restricted
             isometry, held-out reconstruction, downstream fidelity
  training   the trainer: streaming, schedule, dead latents, resume state
  data       formats on disk (activation sets, checkpoints, exports), streaming readers,
             activation sources (synthetic, text through a language model, vision)
  models     the SAE family and dictionary learning as plain maths, configs and presets
  gpu        the CUDA fast path: Triton kernels, fused autograd ops, CUDA graphs

``errors`` (UserError, the one-line failure) and ``progress`` (the progress bar) serve all.
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
