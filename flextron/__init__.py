"""flextron: one trained LLM, many deployable sub-networks (Flextron, Cai et al., ICML 2024)."""

from .layers import ElasticLinear

__all__ = ["ElasticLinear"]
__version__ = "0.1.0"
