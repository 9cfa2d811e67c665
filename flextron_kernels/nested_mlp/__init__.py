"""``nested_mlp``: per-token MLP widths over one set of prefix-nested weights.

``kernels`` (the Triton kernels), ``plan`` (the launch plan: tile configs per token count, dtype and device; and
``plan.override`` to run another), ``launch`` (the launchers and one call's forward and backward), ``op`` (autograd
and the public function), ``graphs`` (eager inference calls replayed from cached CUDA graphs).
"""

from . import graphs, plan
from .op import nested_mlp

__all__ = ["graphs", "nested_mlp", "plan"]
