"""scalable-shampoo: Shampoo second-order optimization for PyTorch.

``Shampoo`` is a ``torch.optim.Optimizer``; ``ShampooConfig`` documents and validates
its hyperparameters; ``help(Shampoo)`` describes the algorithm.
"""

from .config import ShampooConfig
from .optimizer import Shampoo

__all__ = ["Shampoo", "ShampooConfig"]
__version__ = "0.1.0"
