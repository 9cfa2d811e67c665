"""flextron: one trained LLM, many deployable sub-networks (Flextron, Cai et al., ICML 2024)."""

from .layers import ElasticLinear
from .model import SUPPORTED, FlextronModel
from .space import ElasticSpace, Subnet

__all__ = ["SUPPORTED", "ElasticLinear", "ElasticSpace", "FlextronModel", "Subnet"]
__version__ = "0.1.0"
