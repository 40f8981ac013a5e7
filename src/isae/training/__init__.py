"""Training: the streaming loop, the learning-rate schedule, dead-latent bookkeeping, the
resume state and the final checkpoint (``trainer``)."""
