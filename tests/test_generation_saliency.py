"""SALM's saliency mask (``ue_fast.generation.saliency``)."""
import pytest
import torch

from _helpers import demo_subset
from ue_fast.data import read_image_folder
from ue_fast.generation import Batches, RunContext, Surrogate
from ue_fast.generation.saliency import dataset_saliency, saliency_mask


def test_saliency_mask_keeps_the_largest_input_gradients(gen):
    w = torch.zeros(3, 4, 4)
    w[0, 1, 2], w[2, 3, 0] = 5.0, -2.0  # the loss depends on two pixels only

    def forward(x):
        s = (x * w).sum((1, 2, 3))
        return None, torch.stack([s, -s], 1)

    x = torch.rand(2, 3, 4, 4, generator=gen)
    m = saliency_mask(forward, x, torch.tensor([0, 1]), 2 / 16 * 100)
    assert m.shape == (2, 1, 4, 4) and m.dtype == torch.bool
    assert m.sum((1, 2, 3)).tolist() == [2, 2]
    assert bool(m[:, 0, 1, 2].all()) and bool(m[:, 0, 3, 0].all())
    with pytest.raises(ValueError, match="percent"):
        saliency_mask(forward, x, torch.tensor([0, 1]), 0)


def test_dataset_saliency_covers_every_image_in_order(tmp_path):
    data = read_image_folder(demo_subset(tmp_path / "in", per_class=4), progress=False)
    cpu = torch.device("cpu")
    b = Batches(data.images, data.labels, cpu, cpu, 0)
    s = Surrogate(RunContext("cpu", progress=False), "cnn-small", 3, 32, seed=0, lr=0.1, momentum=0.9,
                  weight_decay=0.0)
    m = dataset_saliency(s, b, 10, batch_size=5)
    assert m.shape == (12, 1, 32, 32) and m.flatten(1).sum(1).tolist() == [round(0.1 * 1024)] * 12
    one = saliency_mask(s.model.eval(), b.clean(torch.arange(3, 4)), b.labels[3:4], 10)
    assert torch.equal(m[3:4], one)
