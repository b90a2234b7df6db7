"""The generation layer's CUDA paths, on a GPU: bf16 autocast with a channels-last surrogate, CUDA graphs
(``compile="reduce-overhead"``), and images and perturbations streamed from host memory when
they do not fit the device.

Each runs a small MI-UE ``protect`` on demo images and checks what matters of its output: every
pixel of every protected image within eps of its input and in [0, 255], most pixels changed,
finite losses. The step size is raised to 1/255 so that 10 PGD steps reach the eps bound and
the clip is exercised. Marked ``gpu``: skipped without a CUDA device.
"""
import numpy as np
import pytest
import torch

import ue_fast
from ue_fast.data import demo_dir, read_image_folder

pytestmark = pytest.mark.gpu

PER_CLASS = 16
FAST = dict(method="miue", epochs=2, pgd_steps=10, alpha=1 / 255, alpha_end=1 / 255, device="cuda", progress=False)


@pytest.fixture(scope="module")
def demo():
    """160 demo images (16 per class, ordered by class), labels and class names."""
    data = read_image_folder(demo_dir() / "train", progress=False)
    idx = torch.cat([torch.nonzero(data.labels == c)[:PER_CLASS, 0] for c in range(len(data.classes))])
    return data.images[idx], data.labels[idx], data.classes


def check_output(out, images, manifest, eps_255=8):
    """The PNGs equal clean + poison, within eps of the input; most pixels moved; losses finite."""
    assert manifest["device"].startswith("cuda"), manifest["device"]
    prot = read_image_folder(out, progress=False)  # sorted by class, then index: the input's order here
    diff = prot.images.to(torch.int16) - images.to(torch.int16)  # [N, 3, H, W], grey levels
    assert int(diff.abs().max()) <= eps_255
    npy = np.load(out / manifest["perturbation_npy"])
    assert np.array_equal(npy.astype(np.int16), diff.numpy()), "the .npy is not what the PNGs carry"
    changed = float((diff != 0).float().mean())
    assert changed > 0.5, f"only {changed:.1%} of the pixels changed"
    for h in manifest["history"]:
        assert np.isfinite(h["poison_loss"]) and np.isfinite(h["train_loss"]), h


def test_eager_bf16_channels_last(demo, tmp_path):
    """The default CUDA path with the authors' surrogate, ResNet-18."""
    images, labels, classes = demo
    m = ue_fast.protect((images, labels, classes), tmp_path / "out", arch="resnet18", **FAST)
    check_output(tmp_path / "out", images, m)


def test_surrogate_runs_bf16_channels_last(demo):
    """The surrogate's convolutions run in bf16 on channels-last tensors, in training and in the PGD passes."""
    from ue_fast.generation import Runner
    from ue_fast.methods import MIUE, MIUEConfig

    images, labels, classes = demo
    cfg = MIUEConfig(arch="resnet18", epochs=1, pgd_steps=1)
    eng = Runner(MIUE(cfg), images, labels, len(classes), "cuda", progress=False)
    seen = []
    convs = [m for m in eng.method.surrogate.model.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks = [c.register_forward_hook(lambda mod, inp, out: seen.append(
        (mod.training, out.dtype, out.is_contiguous(memory_format=torch.channels_last)))) for c in convs]
    try:
        eng.run()
    finally:
        for h in hooks:
            h.remove()
    assert {training for training, _, _ in seen} == {True, False}, "no training or no PGD forward seen"
    assert {dtype for _, dtype, _ in seen} == {torch.bfloat16}
    assert all(cl for _, _, cl in seen), "a convolution returned a tensor that is not channels-last"


def test_cuda_graphs_reduce_overhead(demo, tmp_path):
    """compile="reduce-overhead" (torch.compile with CUDA graphs) gives a valid protection."""
    images, labels, classes = demo
    m = ue_fast.protect((images, labels, classes), tmp_path / "out", arch="cnn-small", compile="reduce-overhead",
                        **FAST)
    assert m["settings"]["compile"] == "reduce-overhead"
    check_output(tmp_path / "out", images, m)


def test_streams_from_host_memory(demo, tmp_path, monkeypatch):
    """With no free device memory reported, images and perturbations stay on the host and
    batches stream to the GPU; the output is as valid."""
    asked = []

    def no_free_memory(device=None):
        asked.append(device)
        return 0, 80 * 2**30

    monkeypatch.setattr(torch.cuda, "mem_get_info", no_free_memory)
    images, labels, classes = demo
    m = ue_fast.protect((images, labels, classes), tmp_path / "out", arch="cnn-small", **FAST)
    assert asked, "the store no longer asks torch.cuda.mem_get_info: force its host store another way here"
    check_output(tmp_path / "out", images, m)
