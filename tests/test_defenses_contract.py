"""The contract every registered defence keeps (``ue_fast.evaluate.defenses.DEFENSES``): built
by name, bad options refused when built (before any training), the same result from the same
seed, images' shape, dtype and device kept, labels never changed, a differentiable loss, bf16
autocast, and a GPU tensor in and out when there is a GPU. A new defence is a file and a
registry line; these tests then cover it, and ``BAD_OPTIONS`` must name one of its bad options."""
import math

import pytest
import torch

from _defense_fixtures import batch, ce, clone, demo, model, small  # noqa: F401 (fixtures)
from conftest import HAS_CUDA
from ue_fast.evaluate.defenses import DEFENSES, Defense, Grayscale, JPEG, Cutout, Mixup, UEraser, get_defense

# one bad value per defence at least: the registry test below requires every name here
BAD_OPTIONS = [
    ("none", {"eps": 0.1}, TypeError, "'eps'"),
    ("jpeg", {"quality": 0}, ValueError, "got 0"),
    ("jpeg", {"quality": 10.5}, TypeError, "10.5"),
    ("grayscale", {"bits": 2}, TypeError, "'bits'"),
    ("gaussian", {"kernel_size": 4}, ValueError, "odd"),
    ("gaussian", {"sigma": 0}, ValueError, "sigma"),
    ("bdr", {"bits": 9}, ValueError, "bits"),
    ("cutout", {"size": True}, TypeError, "True"),
    ("cutmix", {"alpha": 0}, ValueError, "alpha"),
    ("cutmix", {"quality": 10}, TypeError, "'quality'"),
    ("mixup", {"alpha": float("nan")}, ValueError, "nan"),
    ("adv-train", {"eps": 0.0}, ValueError, "eps"),
    ("adv-train", {"eps": 2.0}, ValueError, "got 2.0"),
    ("adv-train", {"steps": 0}, ValueError, "steps"),
    ("adv-train", {"norm": "l1"}, ValueError, "norm"),
    ("ueraser-lite", {"repeats": 0}, ValueError, "repeats"),
    ("ueraser", {"repeats": 0}, ValueError, "repeats"),
    ("ueraser", {"max_epochs": -1}, ValueError, "max_epochs"),
    ("ueraser-max", {"max_epochs": 1.5}, TypeError, "max_epochs"),
    ("op", {"epochs": 0}, ValueError, "epochs"),
    ("op", {"lr": -0.1}, ValueError, "lr"),
    ("op", {"batch_size": "all"}, TypeError, "batch_size"),
    ("coin", {"severity": 8}, ValueError, "severity"),
    ("coin", {"severity": 0}, ValueError, "severity"),
    ("coin", {"alpha": 2.0}, TypeError, "'alpha'"),
    ("dvae", {"epochs": 0}, ValueError, "epochs"),
    ("dvae", {"batch_size": 1.5}, TypeError, "batch_size"),
]


def test_registry_builds_every_defense():
    assert DEFENSES == ("none", "jpeg", "grayscale", "gaussian", "bdr", "cutout", "cutmix", "mixup", "adv-train",
                        "ueraser-lite", "ueraser", "ueraser-max", "op", "coin", "dvae")
    for name in DEFENSES:
        d = get_defense(name)
        assert isinstance(d, Defense) and d.name == name
    assert {case[0] for case in BAD_OPTIONS} == set(DEFENSES), "every defence needs a bad-option case"


def test_unknown_defense_names_the_choices():
    with pytest.raises(ValueError, match="'nope'") as info:
        get_defense("nope")
    assert all(name in str(info.value) for name in DEFENSES)


@pytest.mark.parametrize("name, options, error, text", BAD_OPTIONS)
def test_bad_options_are_refused_when_built(name, options, error, text):
    with pytest.raises(error, match=text):
        get_defense(name, **options)


def test_bad_inputs_are_refused(batch, demo, model, gen):
    x, y = batch
    images, labels = demo
    with pytest.raises(TypeError, match="uint8"):
        JPEG().prepare(x, gen)
    with pytest.raises(ValueError, match=r"\(10, 1, 32, 32\)"):
        Grayscale().prepare(images[:10, :1], gen)
    with pytest.raises(TypeError, match="int64"):
        Cutout().loss(model, x, y.float(), gen)
    with pytest.raises(ValueError, match=r"\(9,\)"):
        Mixup().loss(model, x, y[:9], gen)
    with pytest.raises(TypeError, match="floating"):
        Defense().loss(model, (x * 255).to(torch.uint8), y, gen)
    with pytest.raises(TypeError, match="Generator"):
        UEraser().loss(model, x, y, None)
    with pytest.raises(ValueError, match=r"labels must have shape \[20\]"):
        JPEG().prepare(images, gen, labels[:5])
    with pytest.raises(TypeError, match="int64"):
        JPEG().prepare(images, gen, labels.float())
    with pytest.raises(ValueError, match="pass labels"):
        get_defense("op").prepare(images, gen)


@pytest.mark.parametrize("name", DEFENSES)
def test_same_seed_same_result_and_nothing_else_changed(name, demo, batch, model):
    images, labels = demo
    x, y = batch
    kept = images.clone(), labels.clone(), x.clone(), y.clone()
    d = small(name)
    runs = [(d.prepare(images, torch.Generator().manual_seed(s), labels),
             d.loss(model, x, y, torch.Generator().manual_seed(s))[0]) for s in (3, 3, 4)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    for prepared, _ in runs:  # shape, dtype and device kept
        assert prepared.shape == images.shape and prepared.dtype == torch.uint8 and prepared.device == images.device
    for before, after in zip(kept, (images, labels, x, y)):  # inputs, labels above all, untouched
        assert torch.equal(before, after)
    if not torch.equal(runs[0][1], ce(model, x, y)):  # a batch-level defence draws anew from another seed
        assert not torch.equal(runs[0][1], runs[2][1])


@pytest.mark.parametrize("name", DEFENSES)
def test_loss_is_differentiable(name, batch, model, gen):
    x, y = batch
    d = small(name)
    model.zero_grad(set_to_none=True)
    loss, logits = d.loss(model, x, y, gen)
    assert loss.dim() == 0 and math.isfinite(loss.item()) and logits.shape == (len(x), 10)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert model.classifier.weight.grad.abs().sum() > 0


def test_defenses_run_under_bf16_autocast(demo, batch, model, gen):
    # The victim loop calls ``loss`` under bf16 autocast on CUDA; CPU autocast takes the same paths.
    x, y = batch
    images, labels = demo
    for name in DEFENSES:
        d = small(name)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            prepared = d.prepare(images, clone(gen), labels)
            loss, logits = d.loss(model, x.contiguous(memory_format=torch.channels_last), y, gen)
        # data-level work keeps full precision: the same images as without autocast
        assert torch.equal(prepared, d.prepare(images, clone(gen), labels)), name
        assert math.isfinite(loss.item()) and logits.shape == (len(x), 10), name
        loss.backward()
    # Augmentation keeps full precision (sharpness's smoothing convolution would otherwise
    # run in bf16); 144 samples all but surely draw that op.
    x = x.repeat(16, 1, 1, 1)
    plain = [UEraser().augment(x, twin) for twin in [clone(gen)] for _ in range(3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for expected in plain:
            torch.testing.assert_close(UEraser().augment(x, gen), expected, atol=1e-6, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("name", DEFENSES)
def test_defenses_on_cuda(name, demo, batch, model):
    (images, labels), (x, y) = demo, batch
    model = model.cuda()
    d = small(name)
    prepared = d.prepare(images.cuda(), torch.Generator().manual_seed(0), labels.cuda())
    assert prepared.is_cuda and prepared.dtype == torch.uint8
    on_cpu = d.prepare(images, torch.Generator().manual_seed(0), labels)
    if name == "op":  # its fit is float32 arithmetic in another order on the GPU: rounding may differ
        assert (prepared.cpu().float() - on_cpu.float()).abs().mean() < 1
    elif name == "dvae":  # its latent noise comes from a generator on the device: another stream on the GPU
        assert torch.equal(prepared, d.prepare(images.cuda(), torch.Generator().manual_seed(0), labels.cuda()))
    else:
        assert torch.equal(prepared.cpu(), on_cpu)
    losses = [d.loss(model, x.cuda(), y.cuda(), torch.Generator().manual_seed(5)) for _ in range(2)]
    assert losses[0][1].is_cuda and torch.equal(losses[0][0], losses[1][0])
    losses[0][0].backward()
