"""The generation layer's runner and building blocks (methods live in ``ue_fast.methods``).

- :mod:`.runner`: stages, checkpoints, exact resume, progress, timings, history;
- :mod:`.context`: run options shared by the blocks;
- :mod:`.batches`: the data set on the device and the run's seeded generator;
- :mod:`.store`: the perturbation store;
- :mod:`.surrogate`: the surrogate network (fit, re-init, accuracy);
- :mod:`.passes`: PGD passes (per batch, class-wise, whole set);
- :mod:`.transforms`: differentiable input transforms and the inner adversary;
- :mod:`.saliency`: SALM's saliency mask.
"""
from .batches import Batches
from .context import COMPILE_MODES, RunContext, Timer
from .passes import PGD
from .runner import Runner, RunResult, Stage, fingerprint
from .store import DELTA_DTYPES, PerturbationStore
from .surrogate import Surrogate

__all__ = ["Batches", "COMPILE_MODES", "DELTA_DTYPES", "PGD", "PerturbationStore", "RunContext", "RunResult",
           "Runner", "Stage", "Surrogate", "Timer", "fingerprint"]
