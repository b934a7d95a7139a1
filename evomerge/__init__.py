"""evomerge: evolutionary merge search for Hugging Face causal language models."""

from evomerge.errors import EvomergeError
from evomerge.recipe import Recipe

__all__ = ["EvomergeError", "Recipe"]
__version__ = "0.1.0"
