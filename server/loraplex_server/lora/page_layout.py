"""Where an adapter version's weights sit in a run of pages of the unified pool.

Every LoRA layer of model layer ``l`` views the same two flat buffers of that layer: its K arena
(A blocks) and its V arena (Bt blocks), ``page_elems`` elements per page in each (one KV block of
K, or of V, in that layer: the KV cache tensors themselves, ``engine/kv_cache.py``). A version
holding pages ``p .. p + n - 1`` puts, in every layer, its modules' blocks back to back from
element ``p * page_elems``, modules in name order, each block start rounded up to ``ALIGN``
elements:

    cursor_a = cursor_b = p * page_elems
    for module in sorted(the layer's modules):
        r = rank of the module (0: the adapter skips it, nothing placed)
        a_offset[module] = align(cursor_a); cursor_a = a_offset + r * in
        b_offset[module] = align(cursor_b); cursor_b = b_offset + r * out

``n`` is the largest number of pages any layer's A or Bt blocks need. Each adapter is stored at its
true rank per module; the waste is the alignment and the rounding up of the last page.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping

from .weights import ModuleKey

ALIGN = 16  # elements: 64 bytes of fp32, two 16-byte vectors of bf16


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class PageLayout:
    def __init__(self, dims: Mapping[ModuleKey, tuple[int, int]], page_elems: int):
        """``dims``: (in, out) of every LoRA module; ``page_elems``: elements of a page per arena."""
        if page_elems < 1 or page_elems % ALIGN:
            raise ValueError(f"a page must hold a positive multiple of {ALIGN} elements, got {page_elems}")
        self.page_elems = page_elems
        self._layers: dict[int, list[tuple[ModuleKey, int, int]]] = defaultdict(list)
        for key in sorted(dims, key=lambda k: (k.layer, k.name)):
            self._layers[key.layer].append((key, *dims[key]))

    def _blocks(self, base: int, ranks: Mapping[ModuleKey, int]) -> Iterator[tuple[ModuleKey, int, int, int, int]]:
        """(module, A start, Bt start, A end, Bt end) in elements of every module with a rank, each
        layer's blocks back to back from ``base`` (the module docstring's loop)."""
        for modules in self._layers.values():
            end_a = end_b = base
            for key, fan_in, fan_out in modules:
                r = ranks.get(key, 0)
                if r:
                    a, b = _align(end_a), _align(end_b)
                    end_a, end_b = a + r * fan_in, b + r * fan_out
                    yield key, a, b, end_a, end_b

    def place(self, start_page: int, ranks: Mapping[ModuleKey, int]) -> dict[ModuleKey, tuple[int, int]]:
        """(A offset, Bt offset) in elements of every module with a rank, for a run at ``start_page``."""
        return {key: (a, b) for key, a, b, _, _ in self._blocks(start_page * self.page_elems, ranks)}

    def pages(self, ranks: Mapping[ModuleKey, int]) -> int:
        """Pages a version of these module ranks holds (at least one); every page starts aligned."""
        need = max((max(end_a, end_b) for *_, end_a, end_b in self._blocks(0, ranks)), default=0)
        return max(1, -(-need // self.page_elems))

    def pages_for_rank(self, rank: int) -> int:
        """Pages of a version that has ``rank`` on every module: the most any version of that rank holds."""
        return self.pages({key: rank for modules in self._layers.values() for key, _, _ in modules})
