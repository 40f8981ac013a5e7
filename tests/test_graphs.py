"""What the CUDA-graph machinery decides on the host (graphs.py); the recordings themselves
are checked against eager steps in tests/test_fast_gpu.py."""

import os
import subprocess
import sys

from isae.graphs import aux_bucket


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


def test_environment_switches_graphs_off():
    code = "from isae import graphs; print(graphs.ENABLED)"
    for value, want in (("0", "False"), ("1", "True")):
        env = {**os.environ, "ISAE_CUDA_GRAPHS": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.stdout.strip() == want, out.stderr
