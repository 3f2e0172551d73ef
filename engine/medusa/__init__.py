"""Medusa speculative decoding: static trees (tree.py), prompt-lookup drafts (ngram.py), the propose / verify /
compact step (speculator.py) and its acceptance rules (acceptance.py). The heads themselves are a model module
(models.medusa)."""
from engine.medusa.speculator import Medusa
from engine.medusa.tree import DEFAULT_TREE, TREES, MedusaTree, load_tree

__all__ = ["Medusa", "MedusaTree", "DEFAULT_TREE", "TREES", "load_tree"]
