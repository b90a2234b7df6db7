"""SEP's hot spot: every member's input gradient at once, batched (vmap) vs a Python loop.

``ue_fast.generation.ensemble.Ensemble.grads`` on M snapshots of one architecture (the
members of SEP's ensemble), for the feature-alignment loss SEP-FA(-VR) descends: one
``torch.func.vmap`` over ``grad`` of ``functional_call`` on the stacked weights
(``batched``) against M forward/backward passes one after the other (``loop``), same
inputs, same result to float rounding (checked first). Groups are (arch, M, batch); the
ratio of the two medians is the figure; SEP's default run takes 30 steps x (1 such call +
16 single-member gradients) per batch of images.

Run:  pytest benchmarks/bench_ensemble.py --benchmark-json benchmarks/results/<device>-<date>-ensemble.json
"""
import pytest
import torch
import torch.nn.functional as F

from _common import sync
from ue_fast.generation.ensemble import Ensemble
from ue_fast.models import build_model

GPU = torch.cuda.is_available()
CASES = ([("resnet18", 15, 512), ("resnet18", 5, 512), ("cnn-small", 15, 512)] if GPU else
         [("cnn-small", 5, 64), ("cnn-small", 15, 64), ("resnet18", 5, 32)])


def _fa(features, logits, target, centroids):
    return F.mse_loss(features.float(), centroids[target])


@pytest.mark.parametrize("arch, members, batch", CASES)
@pytest.mark.parametrize("variant", ["batched", "loop"])
def test_member_gradients(benchmark, device, variant, arch, members, batch):
    g = torch.Generator().manual_seed(0)
    snaps = []
    for k in range(members):
        torch.manual_seed(k)
        snaps.append({n: v.to(device) for n, v in build_model(arch, 10).state_dict().items()})
    model = build_model(arch, 10).to(device)
    ens = Ensemble(model, snaps, batched=variant == "batched")
    x = torch.rand(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    cents = torch.randn(members, 10, model.feature_dim, generator=g).to(device)
    other = Ensemble(model, snaps, batched=variant != "batched")
    want, _ = other.grads(x, y, _fa, cents)
    got, _ = ens.grads(x, y, _fa, cents)
    assert float((got - want).norm() / want.norm()) < 1e-2  # the same gradients (float rounding)
    benchmark.group = f"ensemble gradients {arch} M={members} batch={batch}"

    def run():
        ens.grads(x, y, _fa, cents)
        sync(device)

    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:
        benchmark.extra_info.update(variant=variant, arch=arch, members=members, batch=batch,
                                    ms_per_member_image=benchmark.stats.stats.median / (members * batch) * 1e3)
