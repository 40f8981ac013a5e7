"""Training: the pass over the data with its learning-rate schedule, logging, resume state
and final checkpoints (``trainer``), what one optimisation step does (``steppers``), where
batches come from (``batches``) and the resume state on disk (``resume``)."""
