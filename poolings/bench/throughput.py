"""Training throughput: frames per second of one SGD step with each pooling.

Two settings, each with the same batch for every pooling and the poolings interleaved round
by round:

1. **end to end**: frames ``(B, T, 1, H, W)`` → the small CNN of
   :func:`poolings.video.models.build_backbone` (``"smallcnn"``) → ``(B, T, p)`` → pooling →
   LayerNorm → linear classifier → cross-entropy; backward through everything; one SGD step
   (lr 0.01, momentum 0.9, weight decay 5e-4, the paper's settings).
2. **pooling alone** at the paper's feature size ``p = 4096``: features ``(B, T, 4096)`` that
   require a gradient (as a backbone's output would) → pooling → linear classifier →
   cross-entropy; backward (including ``dL/dV``); SGD step. This isolates the pooling.

Poolings: ``avg``, ``max``, ``rank-diag`` (the paper's diagonal gradient) and ``rank-full``
(exact, Woodbury). Reported: step time (median), frames per second ``B·T / step time``, and
each pooling's step time over avg-pool's. The paper (Fernando & Gould, 2016) reports 50 vs 5
frames/s for its diagonal vs full gradient on a Titan-X, i.e. the full gradient 10× slower.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from .common import (
    BenchConfig,
    Stopwatch,
    environment,
    finish_environment,
    fmt_ratio,
    fmt_time,
    make_sequences,
    markdown_table,
    module_main,
    output_dir,
    plt_module,
    progress,
    save_figure,
    time_interleaved,
    write_json,
    write_markdown,
)

NAME = "throughput"
POOLINGS = ("avg", "max", "rank-diag", "rank-full")
NUM_CLASSES = 4
FULL = {"end_to_end": {"B": 4, "T": 32, "p": 256, "frame": 32}, "pooling_only": {"B": 4, "T": 50, "p": 4096}}
QUICK = {"end_to_end": {"B": 2, "T": 4, "p": 16, "frame": 16}, "pooling_only": {"B": 2, "T": 6, "p": 32}}
PAPER = {"diag_fps": 50.0, "full_fps": 5.0, "device": "Titan-X GPU"}


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)


def _step_case(model: nn.Module, inputs: tuple, labels: torch.Tensor, leaf: torch.Tensor | None = None):
    """One training step, timed as forward / backward / SGD step."""
    opt = _optimizer(model)
    loss_fn = nn.CrossEntropyLoss()

    def case(sw: Stopwatch) -> None:
        opt.zero_grad(set_to_none=True)
        if leaf is not None:
            leaf.grad = None
        sw.start()
        loss = loss_fn(model(*inputs), labels)
        sw.lap("forward")
        loss.backward()
        sw.lap("backward")
        opt.step()
        sw.lap("step")

    return case


class _PoolThenLinear(nn.Module):
    """``(B, T, p)`` → pooling → linear: the pooling alone in a trainable head."""

    def __init__(self, pooling: nn.Module, p: int, num_classes: int):
        super().__init__()
        self.pooling = pooling
        self.classifier = nn.Linear(pooling.output_dim(p) if hasattr(pooling, "output_dim") else p, num_classes)

    def forward(self, V: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooling(V))


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Frames per second of one training step with avg, max, rank-diag and rank-full pooling."""
    with cfg.applied():
        return _run(cfg)


def _run(cfg: BenchConfig) -> dict[str, Any]:
    from poolings.video.models import VideoClassifier, build_backbone, build_pooling

    started = time.perf_counter()
    env = environment(cfg)
    sizes = QUICK if cfg.quick else FULL
    repeats = cfg.n_repeats(10, quick=2)
    dtype, device = cfg.torch_dtype, cfg.torch_device
    results: dict[str, Any] = {}
    settings = list(sizes.items())
    for setting, size in progress(settings, desc=NAME, enabled=cfg.progress):
        B, T, p = size["B"], size["T"], size["p"]
        gen = torch.Generator().manual_seed(cfg.seed)
        labels = torch.randint(0, NUM_CLASSES, (B,), generator=gen).to(device)
        cases = {}
        if setting == "end_to_end":
            frames = torch.rand(B, T, 1, size["frame"], size["frame"], generator=gen, dtype=torch.float64)
            frames = frames.to(device=device, dtype=dtype)
            torch.manual_seed(cfg.seed)
            backbone, _ = build_backbone("smallcnn", in_channels=1, feature_dim=p, frame_size=size["frame"])
            for name in POOLINGS:
                model = VideoClassifier(copy.deepcopy(backbone), build_pooling(name), NUM_CLASSES, p,
                                        head_norm="layernorm").to(device=device, dtype=dtype)
                cases[name] = _step_case(model, (frames,), labels)
        else:
            V = make_sequences(B, T, p, kind=cfg.data, seed=cfg.seed, dtype=dtype, device=device)
            V.requires_grad_(True)
            for name in POOLINGS:
                torch.manual_seed(cfg.seed)
                model = _PoolThenLinear(build_pooling(name), p, NUM_CLASSES).to(device=device, dtype=dtype)
                cases[name] = _step_case(model, (V,), labels, leaf=V)
        t = time_interleaved(cases, repeats=repeats, warmup=cfg.warmup, device=device)
        avg = t["avg"]["total"].median
        rows = {}
        for name in POOLINGS:
            total = t[name]["total"]
            rows[name] = {
                "forward": t[name]["forward"], "backward": t[name]["backward"], "sgd_step": t[name]["step"],
                "total": total, "frames_per_second": B * T / total.median, "step_ratio_to_avg": total.median / avg,
            }
        results[setting] = {**size, "frames_per_step": B * T, "poolings": rows,
                            "full_over_diag": rows["rank-full"]["total"].median / rows["rank-diag"]["total"].median}

    env = finish_environment(env, started)
    payload = {
        "benchmark": NAME,
        "command": cfg.command(NAME),
        "environment": env,
        "settings": {"repeats": repeats, "warmup": cfg.warmup, "optimizer": "SGD(lr=0.01, momentum=0.9, "
                     "weight_decay=5e-4)", "rank_pool": "RankPool(C=1, eps=0.1)", "paper": PAPER},
        "results": results,
    }
    out = output_dir(cfg)
    write_json(out / f"{NAME}.json", payload)
    chart = _chart(payload, out)
    write_markdown(out / f"{NAME}.md", "Training throughput", payload["command"], env, _markdown(payload, chart))
    return payload


def _markdown(payload: dict[str, Any], chart: str) -> str:
    s = payload["settings"]
    parts = [
        f"One training step (forward, backward, `{s['optimizer']}` step) per pooling on the same batch; medians of "
        f"{s['repeats']} interleaved rounds after {s['warmup']} warm-up. Rank pooling: `{s['rank_pool']}`; "
        "rank-diag uses the paper's diagonal gradient, rank-full the exact one (Woodbury).",
    ]
    titles = {
        "end_to_end": "End to end: small CNN backbone (`build_backbone('smallcnn')`) + pooling + LayerNorm + linear",
        "pooling_only": "Pooling alone at the paper's feature size: features requiring a gradient + pooling + linear",
    }
    for setting, r in payload["results"].items():
        extra = f", frames {r['frame']}×{r['frame']}" if "frame" in r else ""
        parts.append(f"**{titles[setting]}** (B = {r['B']} videos × T = {r['T']} frames = {r['frames_per_step']} "
                     f"frames per step, p = {r['p']}{extra})")
        head = ["pooling", "forward", "backward", "SGD step", "step total", "frames/s", "step time / avg-pool"]
        body = [[name, fmt_time(_m(e["forward"])), fmt_time(_m(e["backward"])), fmt_time(_m(e["sgd_step"])),
                 fmt_time(_m(e["total"])), _fps(e["frames_per_second"]), fmt_ratio(e["step_ratio_to_avg"])]
                for name, e in r["poolings"].items()]
        parts.append(markdown_table(head, body))
    paper = s["paper"]
    lines = [f"**In the paper's terms:** the paper reports {paper['diag_fps']:g} vs {paper['full_fps']:g} frames/s "
             f"(diagonal vs full gradient, {paper['device']}): full {paper['diag_fps'] / paper['full_fps']:g}× slower."]
    for setting, r in payload["results"].items():
        pr = r["poolings"]
        lines.append(
            f"- {setting.replace('_', ' ')}: rank-diag {_fps(pr['rank-diag']['frames_per_second'])} vs rank-full "
            f"{_fps(pr['rank-full']['frames_per_second'])} frames/s: the exact gradient's step takes "
            f"{r['full_over_diag']:.3g}× the diagonal one's; rank-full {pr['rank-full']['step_ratio_to_avg']:.3g}× "
            f"and rank-diag {pr['rank-diag']['step_ratio_to_avg']:.3g}× avg-pool's step."
        )
    parts.append("\n".join(lines))
    parts.append(f"![{chart}]({chart})")
    return "\n\n".join(parts)


def _fps(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _m(t: Any) -> float:
    return t.median if hasattr(t, "median") else t["median"]


def _chart(payload: dict[str, Any], out) -> str:
    plt = plt_module()
    settings = list(payload["results"].items())
    fig, axes = plt.subplots(1, len(settings), figsize=(4.5 * len(settings), 3.4), squeeze=False)
    for ax, (setting, r) in zip(axes[0], settings):
        names = list(r["poolings"])
        fps = [r["poolings"][n]["frames_per_second"] for n in names]
        bars = ax.bar(names, fps, color=["C7", "C8", "C1", "C0"][: len(names)])
        for bar, n in zip(bars, names):
            ax.annotate(f"{r['poolings'][n]['step_ratio_to_avg']:.2g}×", (bar.get_x() + bar.get_width() / 2,
                        bar.get_height()), ha="center", va="bottom", fontsize=7)
        if ax is axes[0][0]:
            ax.set_ylabel("frames / s (one SGD step)")
        ax.set_title(f"{setting.replace('_', ' ')}: B={r['B']}, T={r['T']}, p={r['p']}", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Training throughput (labels: step time / avg-pool step time)", fontsize=9)
    name = f"{NAME}.png"
    save_figure(fig, out / name)
    return name


def main(argv: list[str] | None = None) -> int:
    return module_main(NAME, run, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
