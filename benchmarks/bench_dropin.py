"""ue_fast as a drop-in backend of the MI-UE authors' code: their formulation, theirs with our
two ops, and ue_fast's own engine, side by side on the same images.

The authors' gen_miue.py (hala64/mi-ue) computes, per PGD step, the documented loss
``nt_xent_l2`` (``nt_xent + zeta * l2sim``, zeta = 0 by default) and the update in four
lines (sign step, ``delta.grad = None``, L-inf clamp, pixel-range clamp); see
plain_miue.py. The variants of one MI-UE outer epoch (a surrogate epoch, then K PGD
steps over every image):

- ``authors``: their loss (the dead l2 term included) and their four-line update;
- ``authors+supcon``: ``nt_xent`` replaced by ``ue_fast.supcon_loss``, the zeta * l2sim term
  kept (what replacing the one call gives);
- ``authors+ops``: ``supcon_loss`` with the dead term dropped, and ``ue_fast.pgd_step_`` for
  the sign step and both clamps (then ``delta.grad = None``);
- ``ue_fast``: ``ue_fast.generation.Runner`` with MI-UE (images and perturbations on the
  device, fused ops, no host sync per step; it also flips inputs, as the authors' post
  augmentation does).

The loss group times one forward + backward of each loss alone at B = D = 512. Every
variant is checked first: the loss values agree, and the update with ``pgd_step_`` equals
the authors' four lines bit for bit.

On a CPU, run it with glibc's allocator pinned:

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 \
        pytest benchmarks/bench_dropin.py --benchmark-json benchmarks/results/<device>-<date>-dropin.json

With the default, glibc raises its mmap threshold after the first large block freed, so a
variant timed after one that freed large tensors (the authors' B x B x D ones) runs up to
30% faster than the same code timed first (measured interleaving the engine and
``authors+ops``: 3.8 s each under the default, 2.65 s each pinned, 4.75 s each with the
threshold pinned low). extra_info records the setting.
"""
import os

import pytest
import torch

import ue_fast
from _common import TOY, demo_images, sync
from plain_miue import authors_l2sim, authors_loss, authors_update, outer_epoch, pairwise_loss
from ue_fast.generation import Runner
from ue_fast.methods import MIUE, MIUEConfig
from ue_fast.models import build_model

GPU = torch.cuda.is_available()
K = 10
# (arch, images): 512 is the authors' PGD batch, where their loss's B x B x D tensors weigh most.
# On the CPU a ResNet-18 outer epoch of 512 images takes minutes: it is timed once, unwarmed.
SIZES = [("cnn-small", 64)] if TOY else [("cnn-small", 1000 if GPU else 512), ("resnet18", 1000 if GPU else 512)]
LOSS_B = 64 if TOY else 512
MALLOC = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}


def supcon_with_dead_term(features, labels):
    return ue_fast.supcon_loss(features, labels, 0.1) + 0.0 * authors_l2sim(features, labels)


def supcon_only(features, labels):
    return ue_fast.supcon_loss(features, labels, 0.1)


def ops_update(delta, data, eps, alpha):
    ue_fast.pgd_step_(delta.data, delta.grad, data, eps=eps, step_size=alpha)
    delta.grad = None


LOSSES = {"authors": authors_loss, "authors+supcon": supcon_with_dead_term, "authors+ops": supcon_only}
UPDATES = {"authors": authors_update, "authors+supcon": authors_update, "authors+ops": ops_update}


def test_update_is_the_authors_bit_for_bit(device):
    g = torch.Generator().manual_seed(0)
    data = torch.rand(64, 3, 32, 32, generator=g).to(device)
    start = ((torch.rand(64, 3, 32, 32, generator=g) * 2 - 1) * 8 / 255).to(device)
    grad = torch.randn(64, 3, 32, 32, generator=g).to(device)
    grad[0, 0, 0, :4] = 0  # sign(0) = 0: no move
    out = {}
    for name, update in (("authors", authors_update), ("ops", ops_update)):
        delta = torch.nn.Parameter(start.clone())
        delta.grad = grad.clone()
        update(delta, data, 8 / 255, 0.4 / 255)
        assert delta.grad is None
        out[name] = delta.data
    assert torch.equal(out["authors"], out["ops"])


@pytest.mark.parametrize("variant", ["authors", "authors+supcon", "authors+ops"])
def test_loss_fwd_bwd(benchmark, device, variant):
    benchmark.group = f"MI-UE loss fwd+bwd B={LOSS_B} D=512 (zeta = 0)"
    g = torch.Generator().manual_seed(0)
    f0 = torch.randn(LOSS_B, 512, generator=g).to(device)
    y = torch.randint(0, 10, (LOSS_B,), generator=g).to(device)
    fn = LOSSES[variant]
    ref = float(pairwise_loss(f0.double(), y))
    assert abs(float(fn(f0, y)) - ref) <= 1e-6 + 1e-5 * abs(ref)

    def step():
        f = f0.clone().requires_grad_(True)
        fn(f, y).backward()
        sync(device)

    step()
    benchmark.pedantic(step, rounds=3 if variant == "authors" else 10, iterations=1)
    if benchmark.stats is not None:
        benchmark.extra_info.update(variant=variant, batch=LOSS_B, malloc=MALLOC)


@pytest.mark.parametrize("arch,n", SIZES, ids=[f"{a}-N{n}" for a, n in SIZES])
@pytest.mark.parametrize("variant", ["ue_fast", "authors", "authors+supcon", "authors+ops"])
def test_outer_epoch(benchmark, device, variant, arch, n):
    benchmark.group = f"MI-UE outer epoch, drop-in, {arch} N={n} K={K}"
    images, labels = demo_images(n)
    cfg = MIUEConfig(arch=arch, epochs=1, pgd_steps=K, poison_batch_size=min(512, n), batch_size=min(128, n))
    if variant == "ue_fast":
        def run():
            res = Runner(MIUE(cfg), images, labels, 10, device, progress=False).run()
            sync(device)
            return res.delta * 255
    else:
        def run():
            torch.manual_seed(cfg.seed)
            model = build_model(arch, 10).to(device)
            opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=1e-4)
            poison = outer_epoch(model, opt, images.float() / 255, labels, torch.zeros(images.shape), device=device,
                                 eps=cfg.eps, alpha=cfg.step_size(1), steps=K, batch_size=cfg.batch_size,
                                 poison_batch_size=cfg.poison_batch_size, gen=torch.Generator().manual_seed(0),
                                 loss_fn=LOSSES[variant], update=UPDATES[variant])
            sync(device)
            return poison * 255

    rounds = 3 if GPU or arch == "cnn-small" else 1
    delta = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1 if GPU else 0)
    assert 0 < float(delta.abs().max()) <= 8 + 1e-3  # the last timed run's result
    if benchmark.stats is not None:
        benchmark.extra_info.update(variant=variant, arch=arch, images=n, pgd_steps=K,
                                    ms_per_image=1000 * benchmark.stats.stats.median / n, malloc=MALLOC)


def test_em_update_drop_in(device):
    """The EM code (HanxunH/Unlearnable-Examples toolbox.py, and APBench's attack/basic/em_utils.py)
    keeps the perturbed image, not the perturbation: a sign step on the image, the L-inf clamp of
    its difference to the clean image, the pixel-range clamp. ``pgd_step_`` on the difference gives
    the same images up to the float32 rounding of (x + delta) - x."""
    g = torch.Generator().manual_seed(1)
    images = torch.rand(64, 3, 32, 32, generator=g).to(device)
    noise = ((torch.rand(64, 3, 32, 32, generator=g) * 2 - 1) * 8 / 255).to(device)
    grad = torch.randn(64, 3, 32, 32, generator=g).to(device)
    eps, step = 8 / 255, 0.8 / 255
    perturb_img = torch.clamp(images + noise, 0, 1)
    # theirs
    eta = step * grad.sign() * (-1)
    theirs = perturb_img + eta
    eta = torch.clamp(theirs - images, -eps, eps)
    theirs = torch.clamp(images + eta, 0, 1)
    # ours
    delta = perturb_img - images
    ue_fast.pgd_step_(delta, grad, images, eps=eps, step_size=step)
    ours = images + delta
    assert float((ours - theirs).abs().max()) <= 2.0**-23
