"""The data block (``ue_fast.generation.batches``): batches, clean images, the seeded generator."""
import pytest
import torch

from _helpers import demo_subset
from ue_fast.data import read_image_folder
from ue_fast.generation import Batches

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return read_image_folder(demo_subset(tmp_path_factory.mktemp("in"), per_class=8), progress=False)


def test_batches_shuffle_order_flip_and_state(data):
    b = Batches(data.images, data.labels, CPU, CPU, 0)
    n = b.n  # 24
    sh = b.shuffled(5)
    assert sorted(torch.cat(sh).tolist()) == list(range(n)) and [len(i) for i in sh] == [5, 5, 5, 5, 4]
    assert [len(i) for i in b.shuffled(23, merge_single=True)] == [24]
    assert [len(i) for i in b.shuffled(23)] == [23, 1]
    assert [len(i) for i in b.shuffled(10, drop_last=True)] == [10, 10]
    assert [len(i) for i in b.shuffled(30, drop_last=True)] == [24]  # the only batch is kept
    assert torch.equal(torch.cat(b.ordered(7)), torch.arange(n))
    x = b.clean(torch.arange(n))
    assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    state = b.state_dict()
    f1 = b.clean(torch.arange(n), flip=True)
    b.load_state_dict(state)
    f2 = b.clean(torch.arange(n), flip=True)
    assert torch.equal(f1, f2)  # the generator's state decides the draws
    flipped = (f1 == x.flip(-1)).flatten(1).all(1)
    kept = (f1 == x).flatten(1).all(1)
    assert bool((flipped | kept).all()) and 0 < int(flipped.sum()) < n


def test_same_seed_same_draws(data):
    a, b = Batches(data.images, data.labels, CPU, CPU, 3), Batches(data.images, data.labels, CPU, CPU, 3)
    assert all(torch.equal(x, y) for x, y in zip(a.shuffled(5), b.shuffled(5)))
    c = Batches(data.images, data.labels, CPU, CPU, 4)
    assert not all(torch.equal(x, y) for x, y in zip(a.shuffled(5), c.shuffled(5)))


def test_draws_of_a_part_are_the_global_batch_draws_at_its_positions():
    """Under torchrun a process draws for the whole global batch and keeps its samples' rows:
    its generator ends where one process's does, and each sample gets one process's draw
    (of every kind, and for view-major blocks of k views)."""
    from ue_fast.generation.batches import Draws
    from ue_fast.generation.distributed import Part

    def draws_of(gen_seed, part):
        d = Draws(torch.Generator().manual_seed(gen_seed), part)
        n = len(part.positions) if part is not None else 7
        out = [d.rand(n, 3), d.randn(n, 2, 2), d.randint(9, n), d.rand(3 * n, 4, views=3)]
        return out, d.gen.get_state()

    whole, state = draws_of(5, None)  # one process: a batch of 7
    part = Part(7, torch.tensor([1, 4, 6]))
    mine, state_part = draws_of(5, part)
    assert torch.equal(state, state_part)
    for w, m in zip(whole[:3], mine[:3]):
        assert torch.equal(m, w[part.positions])
    rows = torch.cat([k * 7 + part.positions for k in range(3)])  # block k: the k-th view of every sample
    assert torch.equal(mine[3], whole[3][rows])
    empty, state_empty = draws_of(5, Part(7, torch.tensor([], dtype=torch.int64)))  # none of the batch's samples
    assert torch.equal(state_empty, state) and all(len(e) == 0 for e in empty)
    with pytest.raises(ValueError, match="view"):
        Draws(torch.Generator(), part).rand(4)
