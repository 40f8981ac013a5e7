"""The CUDA fast path of the TopK family's training step: Triton kernels (``kernels``), the
autograd functions built on them and the op set that hands them to a model (``ops``,
``FastOps``), and CUDA-graph replay of a whole step (``cuda_graphs``). Every piece has a
plain-torch reference in ``isae.models.reference``, which the kernels fall back to."""
