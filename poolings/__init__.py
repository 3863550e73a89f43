"""poolings: temporal pooling layers built on argminlayers, and the video application.

Every pooling shares one call, ``pool(V, lengths=None)``: ``V: (B, T, p)`` → ``(B, q)``.
"""

from .approx_rank import ApproxRankPool, approx_rank_pool, approx_rank_weights
from .avg import AvgPool
from .base import Pooling
from .constrained import ProjectedAvgPool, SphereRankPool
from .max import MaxPool, max_pool

from .rank import RankPool, RankPoolObjective

POOLINGS = {
    "avg": "AvgPool",
    "max": "MaxPool",
    "rank": "RankPool",
    "approx_rank": "ApproxRankPool",
    "sphere_rank": "SphereRankPool",
    "projected_avg": "ProjectedAvgPool",
}


def get_pooling(name: str, **options) -> Pooling:
    """A pooling by name: ``avg``, ``max``, ``rank``, ``approx_rank``, ``sphere_rank``, ``projected_avg``;
    ``options`` go to its constructor."""
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
    "SphereRankPool",
    "ProjectedAvgPool",
    "get_pooling",
]
