"""isae: identifiable sparse autoencoders, the study's library.

Modules, one job each:
  errors      UserError, the one-line failure the CLI turns into exit code 2
  actset      activation sets on disk (meta.json + Parquet shards), streaming readers
  checkpoint  checkpoint folders (sae.safetensors + cfg.json), atomic writes
  config      SAEConfig / TrainConfig dataclasses and the presets
  sae         the SAE family (topk, relu, the iSAE switches) as one module
  dl          classical dictionary learning with OMP codes (the reference)
  trainer     streaming trainer with resume
  evaluate    held-out reconstruction metrics
  export      SAELens / sparsify layouts
"""

__version__ = "0.1.0"
