"""qerror.nn.seeds: image_outcomes refuses the labels network_statements refuses."""

from __future__ import annotations

import pytest
import torch

from qerror.nn.models import plain_chain
from qerror.nn.seeds import image_outcomes, network_statements


@pytest.mark.parametrize("how", [network_statements, image_outcomes])
@pytest.mark.parametrize("labels, error, match", [
    (torch.full((16,), 10), ValueError, "not class indices of the 10 classes"),
    (torch.full((16,), -1), ValueError, "not class indices"),
    (torch.zeros(16, dtype=torch.float64), TypeError, "integer class indices"),
    (torch.zeros(16, 1, dtype=torch.long), ValueError, "one-dimensional"),
])
def test_labels_outside_the_classes_are_refused_by_both(how, labels, error, match):
    """image_outcomes counted an image labelled 10 (or -1, or 3.5 as a float) wrong under
    every mode, where network_statements (measure) refuses it: its accuracies and N4's
    crossed test were then those of labels the network cannot predict."""
    model = plain_chain(depth=2, width=4).eval()
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(error, match=match):
        how(model, x, x, labels, bits=(8,), modes=("nearest_even",))


def test_labels_as_a_numpy_array_are_taken():
    model = plain_chain(depth=2, width=4).eval()
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1))
    got = image_outcomes(model, x, x, y.numpy(), bits=(8,), modes=("nearest_even",))
    assert got.equals(image_outcomes(model, x, x, y, bits=(8,), modes=("nearest_even",)))
