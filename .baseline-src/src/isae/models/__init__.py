"""The SAE family as maths, with no I/O: configs and presets (``config``), the plain-torch
operations every faster path is checked against (``reference``), the choice of op set a
model runs on (``compute``), the sparse coder (``sparse_coder``) and classical dictionary
learning (``dictionary_learning``)."""
