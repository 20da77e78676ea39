"""Structured outputs: constraints compiled by a grammar engine, applied as per-row token masks.

``backend.py`` is the only module that imports the grammar engine (xgrammar); ``cache.py`` compiles
off the engine thread with a bounded LRU; ``guide.py`` is one request's matcher and the sampler's
masking helper.
"""

from .backend import GrammarBackend
from .cache import GrammarCache
from .guide import Guide, mask_constrained_rows

__all__ = ["GrammarBackend", "GrammarCache", "Guide", "mask_constrained_rows"]
