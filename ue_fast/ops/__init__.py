"""Public differentiable ops, each with a pure-PyTorch reference that is also its CPU fallback.

Importing this package registers the torch.library ops the public functions call
(``torch.ops.ue_fast``: ``supcon_loss``, ``centroid_class_sums``, ``pgd_step_``,
``class_covariance``, and the backward ops of the first two), so that
``torch.compile(fullgraph=True)`` traces the public functions without a graph break.
"""
from ._dispatch import BackendFallbackWarning, BackendUnavailableError, available_backends
from .centroid import centroid_loss, centroid_loss_ref
from .covariance import class_covariance, class_covariance_ref
from .pgd import pgd_step_, pgd_step_ref_
from .supcon import supcon_loss, supcon_loss_ref

__all__ = [
    "BackendFallbackWarning",
    "BackendUnavailableError",
    "available_backends",
    "centroid_loss",
    "centroid_loss_ref",
    "class_covariance",
    "class_covariance_ref",
    "pgd_step_",
    "pgd_step_ref_",
    "supcon_loss",
    "supcon_loss_ref",
]
