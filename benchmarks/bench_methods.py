"""Generation time per image at 32x32 for every method: ue_fast's generator vs a plain-PyTorch one.

Each method runs one *round* of its algorithm on the same demo images in both
variants (ue_fast: the method on ``ue_fast.generation.Runner`` with the method's own defaults except where
SCHEDULES cuts them down; plain: ``plain_methods.py`` / ``plain_miue.py``, the same
algorithm written the way research code is). For the surrogate methods a round is
one surrogate stage (an epoch, EM's 10 batches, or none for AP/TAP's frozen model,
whose clean pre-training is left out) and one PGD pass over every image; for the
training-free ones it is the whole generation. extra_info records ms per image for
that round, the schedule used, and ``rounds_default``: how many such rounds (x the
ratio of default to benchmarked PGD steps) the method's default run takes, so
``ms_per_image x rounds_default`` projects a full run (EM stops early, so its
figure is an upper bound).

Run:  pytest benchmarks/bench_methods.py --benchmark-json benchmarks/results/<device>-<date>-methods.json
"""
import pytest
import torch
import torch.nn.functional as F

import plain_methods as plain
from _common import demo_images, sync
from plain_miue import outer_epoch
from ue_fast.generation import Runner
from ue_fast.methods import METHODS, TrainingFreeMethod
from ue_fast.generation.transforms import CONTRASTIVE_DRAWS, contrastive_augment, shift_flip
from ue_fast.methods.training_free import AR, ARConfig, ops_search
from ue_fast.models import build_model

GPU = torch.cuda.is_available()
ARCH = "resnet18" if GPU else "cnn-small"
N = 1000 if GPU else 256
# Per method: (images, config overrides for the benchmark, default PGD steps / benchmarked, default rounds).
# The CPU cuts keep each round to seconds; the ratios let a reader project the full run.
SCHEDULES = {
    "miue": (N, dict(epochs=1), 1, 100),
    # grad_clip=None, restarts=1, the sign-step Bayes schedule: the algorithms of the plain versions
    "em": (N, dict(epochs=1, grad_clip=None), 1, 100),
    "em-classwise": (N, dict(epochs=1, grad_clip=None), 1, 100),
    "ap": (N, dict(pretrain_epochs=0, pgd_steps=25, restarts=1), 10, 1),
    "tap": (N, dict(pretrain_epochs=0, pgd_steps=25, restarts=1), 10, 1),
    "rem": (N // 4, dict(epochs=1, pgd_steps=2), 5, 13),
    "bayes": (N, dict(epochs=1, pgd_steps=10, ascent="sign", whole_set=False, retrain_epochs=0), 1, 100),
    "ops": (N, {}, 1, 1),
    "lsp": (N, {}, 1, 1),
    "ar": (64, {}, 1, 1),  # the plain AR recurrence runs pixel by pixel in Python
    "cuda": (N, dict(seed=7), 1, 1),
    "hypo": (N, dict(pretrain_epochs=0, pgd_steps=25), 4, 1),
    "pil": (N, dict(pretrain_epochs=0), 1, 1),  # the attack; PIL's clean training is a separate row (PIL_TRAIN)
    # SEP: members given (SEP_MEMBERS snapshots of freshly drawn weights) instead of trained; 3 of the 30 steps
    "sep": (N // 4, dict(pretrain_epochs=15, members=15, pgd_steps=3), 10, 1),
    "aue": (N, dict(epochs=1), 1, 60),
    "aap": (N, dict(pretrain_epochs=0, pgd_steps=25), 10, 1),
}
SEP_MEMBERS = 15


def _engine_run(name, cfg, images, labels, device):
    """Round 1 of the method (the first step of its first round stage; REM's final regeneration and
    AP's pre-training are left out); the perturbation in 1/255 units."""
    method = Runner(METHODS[name](cfg), images, labels, 10, device, progress=False).method
    if name == "sep":
        method.snapshots = [{k: v.to(device) for k, v in s.items()} for s in _snapshots(cfg, images.shape[-1])]
    stage = next(s for s in method.stages() if s.key == "epoch" and s.steps > 0)
    stage.run(1)
    sync(device)
    return method.perturbations() * 255


def _snapshots(cfg, size):
    """SEP's members for both variants: SEP_MEMBERS networks of freshly seeded weights."""
    out = []
    for k in range(SEP_MEMBERS):
        torch.manual_seed(100 + k)
        out.append(build_model(cfg.arch, 10, image_size=size).state_dict())
    return out


def _plain_run(name, cfg, images, labels, device):
    """One round of the plain implementation; the perturbation in 1/255 units."""
    x = images.float() / 255
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if name in ("ops", "lsp", "ar", "cuda"):
        if name == "cuda":  # the same filters (the key) in both variants
            return plain.cuda_plain(images, labels, METHODS["cuda"](cfg, 10).filters()) * 255
        if name == "ops":
            d = plain.ops_plain(images, labels, 10)
        elif name == "lsp":
            d = plain.lsp_plain(labels, 10, size=images.shape[-1], gen=gen).clamp(-cfg.eps, cfg.eps)
        else:  # the class processes are drawn by ue_fast's code in both variants
            weights = AR(cfg, 10)._class_weights(gen)
            d = plain.ar_plain(labels, weights, size=images.shape[-1], gen=gen).clamp(-cfg.eps, cfg.eps)
        return d * 255
    model = build_model(cfg.arch, 10, image_size=images.shape[-1]).to(device)
    if name == "sep":
        model = None  # its members are built below
    opt = None if model is None else torch.optim.SGD(model.parameters(), lr=cfg.learning_rate(1), momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    common = dict(device=device, eps=cfg.eps, alpha=cfg.step_size(1), steps=cfg.pgd_steps,
                  poison_batch_size=cfg.poison_batch_size, gen=gen)
    if name == "miue":
        poison = outer_epoch(model, opt, x, labels, torch.zeros_like(x), batch_size=cfg.batch_size, **common)
    elif name in ("em", "em-classwise"):
        cw = name == "em-classwise"
        poison, _ = plain.em_round(model, opt, x, labels, torch.zeros(10 if cw else len(x), *x.shape[1:]),
                                   train_steps=cfg.train_steps, batch_size=cfg.batch_size, classwise=cw, **common)
        if cw:
            poison = poison[labels]
    elif name in ("ap", "tap"):
        poison = plain.ap_round(model, x, labels, torch.zeros_like(x), targeted=name == "tap",
                                max_shift=cfg.max_shift, **common)
    elif name == "rem":
        poison = plain.rem_round(model, opt, x, labels, torch.zeros_like(x), batch_size=cfg.batch_size,
                                 adv_eps=cfg.adv_eps, adv_alpha=cfg.adv_alpha, adv_steps=cfg.adv_steps,
                                 eot_samples=cfg.eot_samples, padding=images.shape[-1] // 8, **common)
    elif name in ("hypo", "aap"):
        def loss(m, x, d, y):
            if name == "hypo":
                u = torch.rand(len(x), 3, generator=gen)
                return F.cross_entropy(m(shift_flip(x + d, u, cfg.max_shift))[1], y)
            u = torch.rand(len(x), CONTRASTIVE_DRAWS, generator=gen)
            return F.cross_entropy(m(contrastive_augment(x + d, u, cfg.strength))[1], (y + 1) % 10)
        poison = plain.frozen_attack(model, x, labels, torch.zeros_like(x), loss_fn=loss, descend=True, **common)
    elif name == "pil":
        start = plain._project((torch.rand(x.shape, generator=gen) * 2 - 1) * cfg.eps, x, cfg.eps)
        poison = plain.frozen_attack(model, x, labels, start, loss_fn=plain.pil_loss(cfg.lmd), descend=True, **common)
    elif name == "aue":
        def aug(xx):
            return contrastive_augment(xx, torch.rand(len(xx), CONTRASTIVE_DRAWS, generator=gen), cfg.strength)
        plain.train_on_poisoned(model, opt, x, labels, torch.zeros_like(x), device=device, batch_size=cfg.batch_size,
                                gen=gen, input_fn=lambda m, xx, y: aug(xx))
        poison = plain.frozen_attack(model, x, labels, torch.zeros_like(x), descend=True,
                                     loss_fn=lambda m, xx, d, y: F.cross_entropy(m(aug(xx + d))[1], y), **common)
    elif name == "sep":
        members = []
        for state in _snapshots(cfg, images.shape[-1]):
            m = build_model(cfg.arch, 10, image_size=images.shape[-1]).to(device)
            m.load_state_dict(state)
            members.append(m)
        poison = plain.sep_round(members, x, labels, torch.zeros_like(x), vr_steps=cfg.vr_steps, **common)
    elif name == "bayes":
        poison = plain.bayes_round(model, opt, x, labels, torch.zeros_like(x), batch_size=cfg.batch_size,
                                   sigma=cfg.sigma, **common)
    else:
        raise KeyError(name)
    sync(device)
    return poison * 255


def _check(name, d255, eps):
    """Within the budget (eps in [0, 1] units) and not all zero."""
    assert torch.isfinite(d255).all(), name
    assert float(d255.abs().max()) <= eps * 255 + 1e-3, name
    assert float(d255.abs().max()) > 0, name


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("variant", ["ue_fast", "plain"])
def test_method_round(benchmark, device, variant, name):
    n, overrides, step_ratio, rounds = SCHEDULES[name]
    images, labels = demo_images(n)
    cls = METHODS[name]
    free = issubclass(cls, TrainingFreeMethod)
    extra = {} if free or name == "pil" else dict(arch=ARCH)  # pil: its linear surrogate
    cfg = cls.config_class(**extra, **overrides)
    benchmark.group = f"{name} one round 32x32 N={n}" + ("" if free else f" {ARCH}")
    fn = _engine_run if variant == "ue_fast" else _plain_run

    def run():
        return fn(name, cfg, images, labels, device)

    _check(name, run(), cfg.eps)  # correctness first (also the warm-up)
    benchmark.pedantic(run, rounds=3, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: run once, nothing timed
        return
    per_image = benchmark.stats.stats.median / n
    benchmark.extra_info.update(
        variant=variant, method=name, images=n, image_size=32, arch=None if free else ARCH,
        schedule={} if free else {k: v for k, v in cfg.to_dict().items() if k in (
            "epochs", "pgd_steps", "pretrain_epochs", "train_steps", "eot_samples", "adv_steps")},
        ms_per_image=per_image * 1e3, rounds_default=rounds * step_ratio,
        projected_default_run_ms_per_image=per_image * 1e3 * rounds * step_ratio,
    )


def test_plain_training_free_agree_with_ue_fast():
    """The plain OPS search and AR recurrence give ue_fast's results (shared draws)."""
    images, labels = demo_images(200)
    pos, col = plain.ops_search_plain(images, labels, 10)
    pos2, col2 = ops_search(images, labels, 10)
    assert torch.equal(pos, pos2[:, 0]) and torch.equal(col, col2[:, 0])
    from ue_fast.methods.training_free import ar_process

    gen = torch.Generator().manual_seed(0)
    weights = AR(ARConfig(), 10)._class_weights(gen)[labels[:6]]
    start = torch.randn(6, 3, 20, 20, generator=gen)
    want = ar_process(weights, start)
    torch.testing.assert_close(plain.ar_process_plain(weights, start), want, rtol=1e-4, atol=1e-4 * want.abs().max())
