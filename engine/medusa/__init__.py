"""Medusa speculative decoding: static trees (tree.py), prompt-lookup drafts (ngram.py), the propose / verify /
compact step (speculator.py) and its acceptance rules (acceptance.py). The heads themselves are a model module
(models.medusa)."""
from engine.medusa.speculator import Medusa

__all__ = ["Medusa"]
