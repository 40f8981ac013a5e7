"""Measurements on trained dictionaries, as functions of arrays and checkpoints: matching
(``matching``), code consistency (``consistency``), restricted isometry (``isometry``),
held-out reconstruction (``reconstruction``) and downstream fidelity (``fidelity``)."""
