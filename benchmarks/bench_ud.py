"""The UD metric's per-layer sharpness (``ue_fast.evaluate.ud``): one epoch's measurement, batched
copies under ``torch.func.vmap`` vs the one-copy-at-a-time loop of the definition.

Variants, on the same data, layers and passes (so the same values, checked first):

- ``loop``: ``layer_sharpness_reference``, one model copy per layer and direction;
- ``batched-2``: ``layer_sharpness``'s default, a layer's descent and ascent copies in one pass;
- ``batched-all``: every copy of every measured layer in one batched model (wider kernels, and
  weight gradients of every layer in every copy).

Floor: none computed; both do the same forward and backward work per copy except the weight
gradients ``batched-all`` adds, so on a CPU, where a batch of 64-256 CIFAR images already keeps
the cores busy, the variants should be within tens of percent, and the gain is for a GPU, where one
copy's batch leaves most of it idle. The measurement's real saving is the data: UD's default
subset of 2,048 images is 1/24 of CIFAR-10's training set (docs/ud.md, "The unlearnable distance").
"""
import pytest
import torch

from _common import TOY, record
from ue_fast.evaluate.ud import layer_sharpness, layer_sharpness_reference, sharpness_layers
from ue_fast.models import build_model

# arch -> (images, batch size, which layers: None = all)
CASES = {"cnn-small": (32 if TOY else 256, 16 if TOY else 128, None),
         "resnet18": (8 if TOY else 128, 8 if TOY else 64, (20,) if TOY else (0, 8, 20))}


def _setup(arch, device):
    n, batch, pick = CASES[arch]
    torch.manual_seed(0)
    model = build_model(arch, 10).to(device).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8).to(device)
    y = torch.randint(0, 10, (n,), generator=gen).to(device)
    names = sharpness_layers(model)
    layers = names if pick is None else [names[i] for i in pick]
    return model, x, y, layers, dict(iters=1, batch_size=batch, seed=0)


VARIANTS = {
    "loop": lambda m, x, y, layers, kw: layer_sharpness_reference(m, x, y, layers, **kw),
    "batched-2": lambda m, x, y, layers, kw: layer_sharpness(m, x, y, layers, group=2, **kw),
    "batched-all": lambda m, x, y, layers, kw: layer_sharpness(m, x, y, layers, group=2 * len(layers), **kw),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.benchmark(group=f"UD sharpness {a}"))
                                  for a in CASES])
def test_ud_sharpness(benchmark, device, arch, variant):
    model, x, y, layers, kw = _setup(arch, device)
    run = lambda: VARIANTS[variant](model, x, y, layers, kw)  # noqa: E731
    ref = layer_sharpness_reference(model, x, y, layers, **kw)
    torch.testing.assert_close(run(), ref, rtol=1e-3, atol=1e-4)
    record(benchmark, run, device, variant=variant, op="ud_layer_sharpness", arch=arch, images=len(x),
           batch_size=kw["batch_size"], layers=len(layers), copies=2 * len(layers), iters=kw["iters"])
