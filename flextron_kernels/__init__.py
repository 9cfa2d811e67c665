"""Triton kernels for Flextron's prefix-nested sub-networks.

Every op reads weight prefixes in place (no copies) and has a plain-torch definition in
``flextron_kernels.reference``. On CUDA tensors the Triton kernels run; on CPU tensors they run under
``TRITON_INTERPRET=1`` (the tests) and otherwise the reference runs; inside ``with cpu_reference():`` CPU
tensors run the reference even under the interpreter.
"""

from . import _ops  # noqa: F401  (registers the ops' custom ops for torch.compile)
from ._runtime import cpu_reference
from .distill_loss import distill_cross_entropy
from .elastic_attention import attention_backend, elastic_attention
from .elastic_attention_decode import elastic_attention_decode
from .nested_mlp import nested_mlp
from .sliced_linear import sliced_linear

__all__ = [
    "attention_backend", "cpu_reference", "distill_cross_entropy", "elastic_attention", "elastic_attention_decode",
    "nested_mlp", "sliced_linear",
]
__version__ = "0.1.0"
