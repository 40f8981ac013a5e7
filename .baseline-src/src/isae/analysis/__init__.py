"""Measurements on trained dictionaries, as functions of arrays and checkpoints: matching
(``matching``), code consistency (``consistency``), two checkpoints compared (``compare``,
with a synthetic set's truth as either side: ``truth``), restricted isometry
(``isometry``), held-out reconstruction (``reconstruction``) and downstream fidelity
(``fidelity``). The command line's analysis subcommands call these and write what they
return."""
