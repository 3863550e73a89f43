"""poolings: temporal pooling layers built on argminlayers, and the video application.

Every pooling shares one call, ``pool(V, lengths=None)``: ``V: (B, T, p)`` → ``(B, q)``.
"""

from .approx_rank import ApproxRankPool, approx_rank_pool, approx_rank_weights
from .avg import AvgPool
from .base import Pooling
from .max import MaxPool, max_pool

from .rank import RankPool, RankPoolObjective

POOLINGS = {
    "avg": "AvgPool",
    "max": "MaxPool",
    "rank": "RankPool",
    "approx_rank": "ApproxRankPool",
}


def get_pooling(name: str, **options) -> Pooling:
    """A pooling by name: ``avg``, ``max``, ``rank``, ``approx_rank``; ``options`` go to its constructor."""
    if name not in POOLINGS:
        raise ValueError(f"pooling={name!r} is not known; choose one of {sorted(POOLINGS)}")
    return globals()[POOLINGS[name]](**options)


__all__ = [
    "Pooling",
    "AvgPool",
    "MaxPool",
    "max_pool",
    "RankPool",
    "RankPoolObjective",
    "ApproxRankPool",
    "approx_rank_pool",
    "approx_rank_weights",
    "get_pooling",
]
