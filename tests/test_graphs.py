"""What the CUDA-graph machinery decides on the host (isae.gpu.cuda_graphs); the recordings
themselves are checked against eager steps in tests/test_fast_gpu.py."""

from isae.gpu.cuda_graphs import aux_bucket


def test_aux_widths_cover_the_dead_with_little_padding_and_few_graphs():
    n = 131072
    widths = [aux_bucket(d, n) for d in range(n + 1)]
    assert widths[0] == 0
    assert all(d <= w <= n for d, w in enumerate(widths))
    assert all(a <= b for a, b in zip(widths, widths[1:]))  # monotone
    # at most 1/8 more columns than dead latents once past the 512-column floor
    assert all(w - d <= max(511, d // 8) for d, w in enumerate(widths))
    assert len(set(widths)) < 100  # graphs a long run could record, at most
    assert aux_bucket(1229, 24576) == 1536 and aux_bucket(24576, 24576) == 24576


def test_environment_switches_graphs_off(monkeypatch):
    """Graph replay is an option of the fast op set, read from ISAE_CUDA_GRAPHS when the op
    set is chosen; the reference never replays."""
    import pytest

    from isae.errors import UserError
    from isae.models.compute import select_ops

    monkeypatch.delenv("ISAE_REFERENCE_OPS", raising=False)
    for value, want in (("0", False), ("1", True), ("", True)):
        monkeypatch.setenv("ISAE_CUDA_GRAPHS", value)
        assert select_ops("cuda").cuda_graphs is want
        assert select_ops("cpu").cuda_graphs is False
    monkeypatch.setenv("ISAE_CUDA_GRAPHS", "off")
    with pytest.raises(UserError, match="ISAE_CUDA_GRAPHS must be 0 or 1"):
        select_ops("cuda")


def test_a_failed_recording_stops_with_one_line_and_leaves_the_collector_on(monkeypatch):
    """No CUDA here: torch's recording context is replaced by one that fails as a voided
    capture does, to check what the user is told and that the cycle collector comes back."""
    import contextlib
    import gc

    import pytest
    import torch

    from isae.errors import UserError
    from isae.gpu import cuda_graphs as graphs

    @contextlib.contextmanager
    def failing(*a, **k):
        assert not gc.isenabled()  # off while recording
        yield
        raise RuntimeError("CUDA error: operation failed due to a previous error during capture\nmore")

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph", failing)
    sg = graphs.StepGraphs(lambda x, dead, width: {"x": x}, lambda: None)
    monkeypatch.setattr(sg, "_side", lambda device: None)
    assert gc.isenabled()
    with pytest.raises(UserError) as e:
        sg._record(torch.zeros(2, 3), torch.zeros(3, dtype=torch.bool), 0)
    msg = str(e.value)
    assert "previous error during capture" in msg and "ISAE_CUDA_GRAPHS=0" in msg and "\n" not in msg
    assert gc.isenabled()
    assert sg.graphs == {}
