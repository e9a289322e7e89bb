"""metaopt: learn pre-training hyperparameters by gradient descent on the fine-tuned result.

An implementation of "Meta-Learning to Improve Pre-Training" (Raghu et al., NeurIPS 2021) as a
wrapper around an existing PyTorch training loop: mark meta-parameters with :class:`Param`,
wrap the PT optimizer in :class:`MetaPTOptimizer`, and call ``hyperstep`` beside ``step``.
"""

from ._estimators import (
    ConjugateGradient,
    ExactSolve,
    FirstOrder,
    Neumann,
    PTEstimator,
    SolveInfo,
    UnrolledPT,
)
from ._finetune import FineTune
from ._optimizer import HyperstepRecord, MetaOptWarning, MetaPTOptimizer
from ._param import Param, is_meta, mark_module

__all__ = [
    "Param",
    "mark_module",
    "is_meta",
    "MetaPTOptimizer",
    "FineTune",
    "HyperstepRecord",
    "MetaOptWarning",
    "PTEstimator",
    "Neumann",
    "ConjugateGradient",
    "FirstOrder",
    "ExactSolve",
    "UnrolledPT",
    "SolveInfo",
]

__version__ = "0.1.0"
