"""flextron: one trained LLM, many deployable sub-networks (Flextron, Cai et al., ICML 2024)."""

# budget, export, io and ranking implement FlextronModel's set_budget/calibrate_adaptive, extract,
# save_pretrained/from_pretrained and rank/permute: importing them registers those (see flextron.model.implements).
from . import budget, export, io, ranking  # noqa: F401
from .layers import ElasticLinear
from .model import SUPPORTED, FlextronModel
from .space import ElasticSpace, Subnet

__all__ = ["SUPPORTED", "ElasticLinear", "ElasticSpace", "FlextronModel", "Subnet"]
__version__ = "0.1.0"
