"""qerror.nn.seeds: the widths, modes and test images to measure are refused when empty or
repeated, before any work."""

from __future__ import annotations

import pytest
import torch

from qerror.nn.models import plain_chain
from qerror.nn.seeds import image_outcomes, network_statements


@pytest.mark.parametrize("how", [network_statements, image_outcomes])
@pytest.mark.parametrize("kw, match", [
    ({"bits": ()}, "bits is empty"),
    ({"modes": ()}, "modes is empty"),
    ({"bits": (8, 8)}, r"bits \[8, 8\] repeats a value"),
    ({"modes": ("floor", "FLOOR")}, r"modes \['floor', 'floor'\] repeats a value"),
    ({"n": 0}, "no test images"),
])
def test_an_empty_or_repeated_grid_is_refused(how, kw, match):
    """network_statements gave an empty table for no width or mode, and the same rows twice
    for a repeated one (a seed counted twice in the share of seeds: a Wilson interval too
    narrow); image_outcomes failed in torch.cat, as for no test images."""
    kw = dict(kw)  # the parameter's own dict is shared by both functions' cases
    n = kw.pop("n", 16)
    model = plain_chain(depth=2, width=4).eval()
    calib = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    args = {"bits": (8,), "modes": ("nearest_even",), **kw}
    with pytest.raises(ValueError, match=match):
        how(model, calib, calib[:n], torch.zeros(n, dtype=torch.long), **args)
