"""Generation time per image: one MI-UE outer epoch, ue_fast's runner vs the plain implementation.

Both run the same algorithm (a surrogate epoch, then K = 10 PGD steps over every
image) on the same images; the plain one is written the way research code is
(benchmarks/plain_miue.py). extra_info records seconds per image per outer epoch
and the projection to the authors' full CIFAR-10 schedule (100 outer epochs x
50,000 images). On the CPU the sizes are cut down (see SIZES) and the projection
is only indicative; the GPU targets are for the full sizes.
"""
import pytest
import torch

from _common import demo_images, sync
from plain_miue import outer_epoch
from ue_fast.generation import Runner
from ue_fast.methods import MIUE, MIUEConfig
from ue_fast.models import build_model

GPU = torch.cuda.is_available()
# (arch, image size, images in the run): CPU sizes keep each round to seconds.
SIZES = [("cnn-small", 32, 1000 if GPU else 256), ("resnet18", 32, 1000 if GPU else 32),
         ("resnet18", 224, 256 if GPU else 2)]
K = 10
FULL = 100 * 50_000  # image-epochs of the authors' CIFAR-10 schedule


def _check(delta_255):
    """Perturbations within the budget. (The pixel-range clip is checked on protect()'s
    outputs in the tests: with post-augmentation flips the PGD pass clips against the
    flipped image, and protect() clamps the final image.)"""
    assert float(delta_255.abs().max()) <= 8 + 1e-3
    assert float(delta_255.abs().max()) > 0


@pytest.mark.parametrize("arch,size,n", SIZES, ids=[f"{a}-{s}px" for a, s, _ in SIZES])
@pytest.mark.parametrize("variant", ["ue_fast", "plain"])
def test_outer_epoch(benchmark, device, variant, arch, size, n):
    benchmark.group = f"MI-UE outer epoch {arch} {size}x{size} N={n} K={K}"
    images, labels = demo_images(n, size)
    cfg = MIUEConfig(arch=arch, epochs=1, pgd_steps=K, poison_batch_size=min(512, n), batch_size=min(128, n))
    if variant == "ue_fast":
        def run():
            eng = Runner(MIUE(cfg), images, labels, 10, device, progress=False)
            res = eng.run()
            sync(device)
            return res.delta * 255  # in 1/255 units
    else:
        def run():
            torch.manual_seed(cfg.seed)
            model = build_model(arch, 10, image_size=size).to(device)
            opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=1e-4)
            poison = torch.zeros(images.shape)
            poison = outer_epoch(model, opt, images.float() / 255, labels, poison, device=device, eps=cfg.eps,
                                 alpha=cfg.step_size(1), steps=K, batch_size=cfg.batch_size,
                                 poison_batch_size=cfg.poison_batch_size, gen=torch.Generator().manual_seed(0))
            sync(device)
            return torch.round(poison * 255)

    _check(run())  # correctness first (also the warm-up)
    benchmark.pedantic(run, rounds=3 if GPU else 1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: run once, nothing timed
        return
    per_image = benchmark.stats.stats.median / n
    benchmark.extra_info.update(variant=variant, arch=arch, image_size=size, images=n, pgd_steps=K,
                                s_per_image_per_outer_epoch=per_image,
                                projected_full_schedule_min=per_image * FULL / 60)
