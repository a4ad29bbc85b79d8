"""Policy networks: LRU layers, the reset-aware linear scan, actor-critics, normaliser.

Imports nothing else of this project (docs/design.md §1).
"""

from policies.lru import LRU, LRUBlock, LRUStack
from policies.normalizer import RunningNormalizer
from policies.scan import linear_scan

__all__ = ["LRU", "LRUBlock", "LRUStack", "RunningNormalizer", "linear_scan"]
