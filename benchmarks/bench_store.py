"""What the perturbation store's dtype costs: one MI-UE outer epoch per ``delta_dtype``.

The store holds every image's perturbation between PGD passes. float32 (the default,
as the authors keep it) costs 4 bytes a pixel; float16 2; int8 1, with a stochastic
rounding after every pass. The variants run the same outer epoch (a surrogate epoch,
then K = 10 PGD steps over every image) on the same images; ``ue_fast`` is the default
store. extra_info records the store's bytes here and projected to CIFAR-10 (50,000 x
3 x 32 x 32) and ImageNet-1k (1,281,167 x 3 x 224 x 224).

    pytest benchmarks/bench_store.py --benchmark-json benchmarks/results/<device>-<date>-store.json
"""
import pytest
import torch

from _common import TOY, demo_images, sync
from ue_fast.generation import Runner
from ue_fast.methods import MIUE, MIUEConfig

GPU = torch.cuda.is_available()
N = 64 if TOY else (2048 if GPU else 512)
ARCH = "resnet18" if GPU else "cnn-small"
PIXELS = {"cifar10": 50_000 * 3 * 32 * 32, "imagenet1k": 1_281_167 * 3 * 224 * 224}


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_outer_epoch_per_store(benchmark, device, dtype):
    benchmark.group = f"MI-UE outer epoch by perturbation store, {ARCH} 32x32 N={N} K=10"
    images, labels = demo_images(N)
    cfg = MIUEConfig(arch=ARCH, epochs=1, batch_size=min(128, N), poison_batch_size=min(512, N))

    def run():
        eng = Runner(MIUE(cfg), images, labels, 10, device, progress=False, delta_dtype=dtype)
        res = eng.run()
        sync(device)
        assert eng.method.store.dtype == getattr(torch, dtype)
        return res.delta * 255

    size = getattr(torch, dtype).itemsize  # bytes a pixel
    d = run()  # correctness first (also the warm-up): within budget, and it moved
    assert float(d.abs().max()) <= 8 + 1e-3 and float(d.abs().max()) > 0
    benchmark.pedantic(run, rounds=3, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: run once, nothing timed
        return
    benchmark.extra_info.update(
        variant="ue_fast" if dtype == "float32" else f"{dtype} store", delta_dtype=dtype, images=N, arch=ARCH,
        ms_per_image=benchmark.stats.stats.median / N * 1e3, store_bytes=N * 3 * 32 * 32 * size,
        **{f"store_gb_{k}": v * size / 1e9 for k, v in PIXELS.items()})
