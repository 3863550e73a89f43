"""Video models: a per-frame backbone, a temporal pooling, a linear classifier.

The pipeline of Fernando & Gould (ICML 2016)::

    frames x_t (B, T, C, H, W) --backbone psi--> v_t (B, T, p) --pool--> u (B, q) --linear--> logits (B, K)

:class:`VideoClassifier` runs the backbone once per batch on the valid frames of all videos,
gathered into one ``(N, C, H, W)`` tensor (``N = sum(lengths)``), and scatters the features back
into a zero-padded ``(B, T, p)`` tensor for the pooling. Padded frames never reach the backbone,
so they cannot influence the output (nor batch-norm statistics).

:func:`build_backbone` returns ``(module, p)`` for a torchvision classification model with its
head removed (``weights=`` follows torchvision's API, e.g. ``"DEFAULT"``), for ``"smallcnn"``
(a few convolutions, fast on a CPU), or for ``"identity"`` (inputs are already features).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from argminlayers import lengths_to_mask

__all__ = [
    "SmallCNN",
    "TorchvisionBackbone",
    "VideoClassifier",
    "average_frame_scores",
    "build_backbone",
    "build_pooling",
    "POOLINGS",
]

# ImageNet statistics used by torchvision's pretrained weights.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

# pooling names a user can type -> (name in ``poolings.get_pooling``, fixed keyword arguments)
POOLINGS: dict[str, tuple[str, dict]] = {
    "avg": ("avg", {}),
    "max": ("max", {}),
    "rank": ("rank", {}),
    "rank-full": ("rank", {"backward": "woodbury"}),
    "rank-diag": ("rank", {"backward": "diagonal"}),
    "approx-rank": ("approx_rank", {}),
    "approx_rank": ("approx_rank", {}),
}

_RANK_OPTIONS = ("C", "eps", "backward", "smoothing", "signed_sqrt", "normalize", "bidirectional", "tol")


def build_pooling(name: str, **options) -> nn.Module:
    """Build a pooling from its name (see :data:`POOLINGS`) through ``poolings.get_pooling``.

    ``options`` (``C``, ``eps``, ``backward``, ``smoothing``, ``signed_sqrt``, ``normalize``,
    ``bidirectional``, ``tol``; ``None`` means the pooling's default) go to :class:`~poolings.RankPool` and are ignored by the other poolings,
    so one configuration can describe every pooling. ``"rank-full"`` / ``"rank-diag"`` fix
    ``backward`` to the exact (Woodbury) or the paper's diagonal gradient.
    """
    if name not in POOLINGS:
        raise ValueError(f"pooling: unknown name {name!r}; expected one of {sorted(POOLINGS)}")
    unknown = sorted(set(options) - set(_RANK_OPTIONS))
    if unknown:
        raise TypeError(f"build_pooling: unexpected options {unknown}; expected some of {list(_RANK_OPTIONS)}")
    from poolings import get_pooling

    base, fixed = POOLINGS[name]
    kwargs = {k: v for k, v in options.items() if v is not None} if base == "rank" else {}
    kwargs.update(fixed)
    return get_pooling(base, **kwargs)


# --------------------------------------------------------------------------- backbones


class SmallCNN(nn.Module):
    """A small CNN for small frames: three conv blocks, then a linear layer to ``feature_dim``.

    ``Tensor[N, C, H, W] -> Tensor[N, feature_dim]``. The last feature map is flattened (not
    globally pooled), so the features keep where things are in the frame; ``H`` and ``W`` must
    be multiples of 8 once fixed at construction (``frame_size``).
    """

    def __init__(self, in_channels: int = 1, feature_dim: int = 64, *, frame_size: int = 32, width: int = 16):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if feature_dim < 1:
            raise ValueError(f"feature_dim must be >= 1, got {feature_dim}")
        if frame_size < 8 or frame_size % 8:
            raise ValueError(f"frame_size must be a positive multiple of 8, got {frame_size}")

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(block(in_channels, width), block(width, 2 * width), block(2 * width, 2 * width))
        s = frame_size // 8
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * s * s, feature_dim), nn.ReLU(inplace=True))
        self.in_channels, self.feature_dim, self.frame_size = in_channels, feature_dim, frame_size

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[-2:] != (self.frame_size, self.frame_size):
            raise ValueError(
                f"SmallCNN expects frames of shape (N, {self.in_channels}, {self.frame_size}, {self.frame_size}), "
                f"got {tuple(x.shape)}"
            )
        return self.fc(self.features(x))


class TorchvisionBackbone(nn.Module):
    """A torchvision classifier with its last linear layer replaced by the identity.

    ``Tensor[N, C, H, W]`` in ``[0, 1]`` → ImageNet normalisation (one input channel is repeated
    to three) → ``Tensor[N, p]`` where ``p`` is the removed layer's ``in_features``
    (4096 for alexnet / vgg, 512 for resnet18, 2048 for resnet50).
    """

    def __init__(self, net: nn.Module, in_channels: int = 3):
        super().__init__()
        last = None
        for name, module in net.named_modules():
            if isinstance(module, nn.Linear):
                last = name
        if last is None:
            raise ValueError(f"{type(net).__name__} has no linear classifier layer to remove")
        parent_name, _, child = last.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        self.feature_dim = int(getattr(parent, child).in_features)
        setattr(parent, child, nn.Identity())
        self.net = net
        self.in_channels = in_channels
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected frames of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        out = self.net((x - self.mean) / self.std)
        if hasattr(out, "logits"):  # inception/googlenet in training mode return a named tuple
            out = out.logits
        return out.flatten(1)


def build_backbone(
    name: str,
    *,
    weights: str | None = None,
    in_channels: int = 3,
    feature_dim: int = 64,
    frame_size: int = 32,
) -> tuple[nn.Module, int]:
    """Build a per-frame feature extractor: returns ``(module, p)``, module ``(N, C, H, W) -> (N, p)``.

    - ``"smallcnn"``: :class:`SmallCNN` with ``feature_dim`` outputs on ``frame_size``-square frames.
    - ``"identity"``: the inputs are already ``(N, p)`` features; ``p = feature_dim``.
    - any torchvision classification model name (``"alexnet"``, ``"vgg16"``, ``"resnet18"``,
      ``"resnet50"``, ...): built with ``torchvision.models.get_model(name, weights=weights)``;
      ``weights`` is torchvision's weight name (``"DEFAULT"``, ``"IMAGENET1K_V1"``) or ``None``
      for random initialisation. Its last linear layer is removed (see :class:`TorchvisionBackbone`).
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    key = name.lower()
    if key == "smallcnn":
        if weights is not None:
            raise ValueError("weights: 'smallcnn' has no pretrained weights (pretrain it with `table1`)")
        net = SmallCNN(in_channels, feature_dim, frame_size=frame_size)
        return net, feature_dim
    if key == "identity":
        return nn.Identity(), feature_dim
    try:
        import torchvision
    except ImportError as exc:  # pragma: no cover
        raise ImportError("torchvision backbones need torchvision: pip install torchvision") from exc
    available = set(torchvision.models.list_models(module=torchvision.models))
    if key not in available:
        raise ValueError(f"name: unknown backbone {name!r}; use 'smallcnn', 'identity' or a torchvision model "
                         f"such as {sorted(n for n in available if n in {'alexnet', 'vgg16', 'resnet18', 'resnet50'})}")
    try:
        net = torchvision.models.get_model(key, weights=weights)
    except OSError as exc:  # urllib's URLError and the like: no network, or a refused download
        hub = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise OSError(f"weights: could not download the torchvision weights {weights!r} of {key} "
                      f"({type(exc).__name__}: {' '.join(str(exc).split())[:100]}); without internet access, "
                      f"copy the weights file into {hub} first, or leave --weights out for a random "
                      "initialisation") from exc
    backbone = TorchvisionBackbone(net, in_channels=in_channels)
    return backbone, backbone.feature_dim


# --------------------------------------------------------------------------- classifiers


def _check_frames(frames: Tensor, lengths: Tensor | None) -> Tensor:
    if not isinstance(frames, Tensor):
        raise TypeError(f"frames must be a Tensor, got {type(frames).__name__}")
    if frames.dim() < 3:
        raise ValueError(f"frames must have shape (B, T, ...), got {tuple(frames.shape)}")
    B, T = frames.shape[:2]
    if lengths is None:
        return torch.full((B,), T, dtype=torch.long, device=frames.device)
    if not isinstance(lengths, Tensor) or lengths.shape != (B,):
        raise ValueError(f"lengths must be a tensor of shape ({B},), got "
                         f"{tuple(lengths.shape) if isinstance(lengths, Tensor) else type(lengths).__name__}")
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
    if bool((lengths < 1).any()) or bool((lengths > T).any()):
        raise ValueError(f"lengths must lie in [1, T={T}], got min {int(lengths.min())}, max {int(lengths.max())}")
    return lengths.to(device=frames.device, dtype=torch.long)


class VideoClassifier(nn.Module):
    """Backbone per frame, temporal pooling, linear classifier.

    Args:
        backbone: ``(N, *frame_shape) -> (N, p)``.
        pooling: ``pool(V, lengths)`` with ``V: (B, T, p)`` → ``(B, q)``, ``q = pooling.output_dim(p)``.
        num_classes: ``K``.
        feature_dim: ``p``.
        head_norm: ``"none"``, ``"layernorm"`` (affine-free LayerNorm over the pooled vector) or
            ``"batchnorm"`` (BatchNorm1d, needs batches of 2 or more in training). The rank-pool
            vector's scale depends on the feature scale (u is fitted to targets ``1..T``), so a
            normalisation before the classifier keeps the classifier's input scale fixed.
        dropout: dropout probability on the pooled vector.

    Shapes: ``frames: Tensor[B, T, *frame_shape]``, ``lengths: Tensor[B]`` (or ``None`` for full
    length) → logits ``Tensor[B, K]``.

    Example::

        >>> from poolings import RankPool
        >>> backbone, p = build_backbone("smallcnn", in_channels=1, feature_dim=32)
        >>> model = VideoClassifier(backbone, RankPool(C=1.0), num_classes=4, feature_dim=p)
        >>> model(torch.rand(2, 10, 1, 32, 32), torch.tensor([10, 7])).shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        backbone: nn.Module,
        pooling: nn.Module,
        num_classes: int,
        feature_dim: int,
        *,
        head_norm: str = "none",
        dropout: float = 0.0,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if feature_dim < 1:
            raise ValueError(f"feature_dim must be >= 1, got {feature_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.backbone = backbone
        self.pooling = pooling
        self.feature_dim = feature_dim
        q = pooling.output_dim(feature_dim) if hasattr(pooling, "output_dim") else feature_dim
        self.pooled_dim = int(q)
        if head_norm == "none":
            self.head_norm = nn.Identity()
        elif head_norm == "layernorm":
            self.head_norm = nn.LayerNorm(q, elementwise_affine=False)
        elif head_norm == "batchnorm":
            self.head_norm = nn.BatchNorm1d(q, affine=False)
        else:
            raise ValueError(f"head_norm must be 'none', 'layernorm' or 'batchnorm', got {head_norm!r}")
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(q, num_classes)

    def frame_features(self, frames: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-frame features ``V: (B, T, p)``, zero on padded frames, and the checked lengths ``(B,)``."""
        lengths = _check_frames(frames, lengths)
        B, T = frames.shape[:2]
        mask = lengths_to_mask(lengths, T)                     # (B, T)
        flat = frames[mask]                               # (N, *frame_shape), N = sum(lengths)
        feats = self.backbone(flat)                       # (N, p)
        if feats.dim() != 2 or feats.shape[1] != self.feature_dim:
            raise ValueError(f"backbone returned shape {tuple(feats.shape)}; expected (N, {self.feature_dim})")
        V = feats.new_zeros(B, T, self.feature_dim)
        V = V.index_put((mask,), feats)                   # (B, T, p), zero-padded
        return V, lengths

    def pooled(self, frames: Tensor, lengths: Tensor | None = None) -> Tensor:
        """The pooled video representation ``u: (B, q)`` (before normalisation and classifier).

        Under ``torch.autocast`` the backbone runs in reduced precision, but the pooling runs
        outside autocast on float32 features: an argmin layer's solve and implicit backward need
        float32 at least.
        """
        V, lengths = self.frame_features(frames, lengths)
        if torch.is_autocast_enabled(V.device.type):
            with torch.autocast(V.device.type, enabled=False):
                return self.pooling(V.float() if V.dtype in (torch.float16, torch.bfloat16) else V, lengths)
        return self.pooling(V, lengths)

    def forward(self, frames: Tensor, lengths: Tensor | None = None) -> Tensor:
        u = self.pooled(frames, lengths)                  # (B, q)
        return self.classifier(self.dropout(self.head_norm(u)))   # (B, K)


def average_frame_scores(model: VideoClassifier, frames: Tensor, lengths: Tensor | None = None, *,
                         probabilities: bool = True) -> Tensor:
    """Frame-level prediction of a video: the mean over its valid frames of per-frame scores.

    Each frame's feature ``v_t`` is classified on its own, ``s_t = W v_t + b`` (``model.classifier``
    applied before any pooling), turned into class probabilities ``softmax(s_t)`` when
    ``probabilities`` is true, and averaged over ``t < lengths[b]``:
    ``Tensor[B, T, ...] -> Tensor[B, K]``. This is the test-time rule of frame-level fine-tuning,
    where the model was trained on single frames (videos of length 1).
    """
    if model.pooled_dim != model.feature_dim or not isinstance(model.head_norm, nn.Identity):
        raise ValueError("average_frame_scores needs a model whose classifier takes one frame's features "
                         "(pooled_dim == feature_dim, head_norm='none')")
    V, lengths = model.frame_features(frames, lengths)   # (B, T, p), zero-padded
    scores = model.classifier(V)                          # (B, T, K)
    if probabilities:
        scores = scores.softmax(-1)
    mask = lengths_to_mask(lengths, V.shape[1]).to(scores.dtype)        # (B, T)
    return (scores * mask[..., None]).sum(1) / lengths[:, None].to(scores.dtype)
