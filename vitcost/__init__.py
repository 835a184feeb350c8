"""vitcost: will this Vision Transformer configuration fit, and what will it cost, on this GPU?

Closed-form counts and a tensor-by-tensor memory replay of a timm-style ViT, checked
against what PyTorch allocates. The analytic core never imports torch.
"""

from vitcost.api import compare, plan, transfer
from vitcost.estimate import Report

__version__ = "0.1.0"
__all__ = ["plan", "compare", "transfer", "Report", "__version__"]
