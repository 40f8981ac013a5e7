"""What lives on disk and how it is read and written: activation sets (``activations``) and
their streaming reader (``stream``), checkpoints (``checkpoints``), the SAELens / sparsify
layouts (``export``), atomic writes (``atomic``), language models and text
(``language_models``), and the sources that make activation sets (``sources``)."""
