"""Poison generators, one per file, over the blocks of ``ue_fast.generation``.

``METHODS`` maps each ``--method`` name to its class; adding a generator is a new file
and a line here.
"""
from .ap import AP, TAP, APConfig
from .aue_aap import AAP, AUE, AAPConfig, AUEConfig
from .base import Method, SurrogateMethod, TrainingFreeMethod
from .bayes import Bayes, BayesConfig
from .cuda import CUDA, CUDAConfig
from .em import EM, EMClasswise, EMClasswiseConfig, EMConfig
from .hypo import HYPO, HYPOConfig
from .miue import MIUE, MIUEConfig
from .pil import PIL, PILConfig
from .rem import REM, REMConfig
from .salm import Sparse
from .sep import SEP, SEPConfig
from .settings import Config, SurrogateConfig
from .training_free import AR, LSP, OPS

METHODS = {"miue": MIUE, "em": EM, "em-classwise": EMClasswise, "ap": AP, "tap": TAP, "rem": REM, "bayes": Bayes,
           "ops": OPS, "lsp": LSP, "ar": AR, "cuda": CUDA, "hypo": HYPO, "pil": PIL, "sep": SEP, "aue": AUE,
           "aap": AAP}

__all__ = ["AAP", "AAPConfig", "AP", "APConfig", "AUE", "AUEConfig", "AR", "Bayes", "BayesConfig", "CUDA",
           "CUDAConfig", "Config", "EM", "EMClasswise", "EMClasswiseConfig", "EMConfig", "HYPO", "HYPOConfig", "LSP",
           "METHODS", "MIUE", "MIUEConfig", "Method", "OPS", "PIL", "PILConfig", "REM", "REMConfig", "SEP",
           "SEPConfig", "Sparse", "SurrogateConfig", "SurrogateMethod", "TAP", "TrainingFreeMethod"]
