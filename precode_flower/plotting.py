"""Figures (matplotlib, Agg canvas; no pyplot, so no global state and no display needed).

Reconstructions are private data: every file that shows them is written through
:func:`private_file`, which creates it readable and writable by its owner only (0o600).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from torch import Tensor

from .attacks.base import reconstructs_images
from .metrics import to_pixels

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(**kwargs: object) -> Figure:
    """A new matplotlib Figure (imported here: clients and the server import this module, and
    most processes never draw)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


PRIVATE_MODE = 0o600


def private_file(path: str | os.PathLike[str]) -> BinaryIO:
    """Open ``path`` for binary writing with owner-only permissions (0o600).

    The mode is set at creation (no window in which others could read the file) and
    re-applied when the file already existed with looser permissions. Parent folders are
    created as needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_MODE)
    try:
        os.fchmod(fd, PRIVATE_MODE)
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise


def save_figure(fig: Figure, path: str | os.PathLike[str], *, dpi: int = 150) -> Path:
    """Render ``fig`` with the Agg canvas to a private (0o600) PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with private_file(path) as fh:
        fig.savefig(fh, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


def image_grid(
    rows: Mapping[str, Tensor],
    mean: Sequence[float],
    std: Sequence[float],
    path: str | os.PathLike[str],
    title: str | None = None,
) -> Path:
    """Save a grid of images: one row per entry of ``rows``, labelled on the left.

    By convention the first entry holds the originals and each further entry one attack's
    reconstructions, in the originals' order. Images are (N, C, H, W) in the normalised
    space given by ``mean``/``std``; they are de-normalised and clamped to [0, 1]. Rows may
    have different lengths (missing cells stay blank). The PNG is written with mode 0o600.
    """
    if not rows:
        raise ValueError("image_grid: no rows to draw")
    pixels = {name: to_pixels(images, mean, std) for name, images in rows.items()}
    n_cols = max(max(len(x) for x in pixels.values()), 1)
    n_rows = len(pixels)
    fig = _figure(figsize=(1.2 * n_cols + 1.2, 1.2 * n_rows + (0.4 if title else 0.0)))
    axes = fig.subplots(n_rows, n_cols, squeeze=False, gridspec_kw={"wspace": 0.05, "hspace": 0.1})
    for r, (name, images) in enumerate(pixels.items()):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(images):
                img = images[c]
                if img.shape[0] == 1:
                    ax.imshow(img[0].numpy(), cmap="gray", vmin=0.0, vmax=1.0)
                else:
                    ax.imshow(img.permute(1, 2, 0).numpy())
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_leakage(
    rows: Sequence[Mapping[str, object]],
    attacks: Sequence[str],
    path: str | os.PathLike[str],
    *,
    success_ssim: float = 0.6,
    title: str | None = None,
) -> Path:
    """Leakage over rounds per attack, from the auditor's ``leakage.jsonl`` rows.

    With ground truth: mean SSIM (with the success threshold), mean PSNR and label accuracy
    per round. Without (deployment): the attacks' final loss per round, the only
    reference-free quantity. Rounds where an attack run failed are marked with an x.
    Like every figure here, the PNG is owner-only.
    """
    ok = [r for r in rows if r.get("status") == "ok"]
    scored = [r for r in ok if r.get("scored")]
    if scored:
        panels = [
            ("ssim", "mean SSIM"),
            ("psnr", "mean PSNR (dB)"),
            ("label_accuracy", "label accuracy"),
        ]
        use = scored
    else:
        panels, use = [("loss", "final attack loss")], ok
    colors = {a: f"C{i % 10}" for i, a in enumerate(attacks)}
    fig = _figure(figsize=(4.5 * len(panels), 3.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, label) in zip(axes, panels, strict=True):
        for attack in attacks:
            if key in ("ssim", "psnr") and not reconstructs_images(attack):
                continue  # recovers labels only: no image to score
            by_round: dict[int, list[float]] = {}
            for r in use:
                value = r.get(key)
                if r.get("attack") == attack and value is not None:
                    by_round.setdefault(int(r["round"]), []).append(float(value))
            if by_round:
                xs = sorted(by_round)
                ys = [sum(by_round[x]) / len(by_round[x]) for x in xs]
                ax.plot(xs, ys, marker="o", color=colors[attack], label=attack)
        if key == "ssim":
            ax.axhline(success_ssim, color="red", linestyle="--", linewidth=1, label="success")
        if key in ("ssim", "label_accuracy"):
            ax.set_ylim(-0.05, 1.05)
        if key == "loss":
            ax.set_yscale("symlog", linthresh=1e-6)
        bottom = ax.get_ylim()[0]
        for attack in attacks:
            mine = [r for r in rows if r.get("attack") == attack]
            failed = sorted({int(r["round"]) for r in mine if r.get("status") != "ok"})
            if failed:
                ax.plot(failed, [bottom] * len(failed), "x", color=colors[attack], clip_on=False)
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    default = "leakage per round" if scored else "attack loss per round (no ground truth)"
    fig.suptitle(title or default)
    return save_figure(fig, path, dpi=110)


def plot_accuracy(
    rows: Sequence[Mapping[str, object]],
    path: str | os.PathLike[str],
    *,
    initial_accuracy: float | None = None,
    title: str | None = None,
) -> Path:
    """Test accuracy per round of a federation, from its ``rounds.jsonl`` rows.

    Plots ``test_accuracy`` (the global model on the whole test split; ``initial_accuracy``
    is drawn at round 0) and, where present, ``client_eval_accuracy`` (the weighted mean of
    the clients' evaluations on their test shares).
    """
    fig = _figure(figsize=(5, 3.4), layout="constrained")
    ax = fig.subplots()
    xs = [int(r["round"]) for r in rows]  # type: ignore[call-overload]
    central = [float(r["test_accuracy"]) for r in rows]  # type: ignore[arg-type]
    if initial_accuracy is not None:
        xs, central = [0, *xs], [float(initial_accuracy), *central]
    ax.plot(xs, central, marker="o", label="global model, test split")
    client = [(int(r["round"]), r.get("client_eval_accuracy")) for r in rows]  # type: ignore[call-overload]
    client = [(x, float(y)) for x, y in client if y is not None]  # type: ignore[arg-type]
    if client:
        ax.plot(
            [x for x, _ in client],
            [y for _, y in client],
            marker="s",
            linestyle="--",
            label="clients' test shares (weighted)",
        )
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize="small")
    fig.suptitle(title or "test accuracy per round")
    return save_figure(fig, path, dpi=110)


#: PSNR values above this are drawn at it (exact reconstructions score up to 200 dB).
PSNR_AXIS_CAP = 50.0


def plot_privacy_utility(
    points: Sequence[Mapping[str, object]],
    path: str | os.PathLike[str],
    *,
    success_ssim: float = 0.6,
    title: str | None = None,
) -> Path:
    """Accuracy against leakage, one marker per defense, one row of panels per setting.

    Each point is a mapping with ``panel`` (the setting, e.g. ``"mnist convnet fedsgd B=1"``),
    ``label`` (the defense), ``accuracy`` (final test accuracy), ``success`` (fraction of
    audited updates the strongest attack reconstructed, SSIM >= ``success_ssim``) and
    ``psnr`` (that attack's mean PSNR in dB); ``attack`` (its name) and, for DP runs,
    ``epsilon`` (the budget spent) are added to the label.
    Points missing a value are left out of that panel. PSNR above :data:`PSNR_AXIS_CAP` is
    drawn at the cap with an upward triangle. The same defense has the same colour everywhere.
    """
    if not points:
        raise ValueError("plot_privacy_utility: no points")
    panels = list(dict.fromkeys(str(p["panel"]) for p in points))
    labels = list(dict.fromkeys(str(p["label"]) for p in points))
    colors = {name: f"C{i % 10}" for i, name in enumerate(labels)}
    markers = "osD^vP*Xhp<>"
    shapes = {name: markers[(i // 10) % len(markers)] for i, name in enumerate(labels)}
    fig = _figure(figsize=(10.5, 3.3 * len(panels) + 0.6), layout="constrained")
    axes = fig.subplots(len(panels), 2, squeeze=False)
    for row, panel in zip(axes, panels, strict=True):
        mine = [p for p in points if str(p["panel"]) == panel]
        for ax, key in zip(row, ("success", "psnr"), strict=True):
            for p in mine:
                acc, value = p.get("accuracy"), p.get(key)
                if acc is None or value is None:
                    continue
                x, marker = float(value), shapes[str(p["label"])]
                if key == "success":
                    x *= 100.0
                elif x > PSNR_AXIS_CAP:
                    x, marker = PSNR_AXIS_CAP, "^"
                ax.scatter(
                    x, float(acc), color=colors[str(p["label"])], marker=marker, s=40, zorder=3
                )
                text = str(p["label"]) + (f" ({p['attack']})" if p.get("attack") else "")
                if p.get("epsilon") is not None:  # DP runs: the privacy budget spent
                    text += f", \u03b5={float(p['epsilon']):.3g}"
                ax.annotate(
                    text, (x, float(acc)), fontsize=7, xytext=(4, 3), textcoords="offset points"
                )
            if key == "success":
                ax.set_xlabel(
                    f"strongest attack: updates reconstructed (%, SSIM >= {success_ssim})"
                )
                ax.set_xlim(-5, 105)
            else:
                ax.set_xlabel(f"strongest attack: mean PSNR (dB, > {PSNR_AXIS_CAP:g} drawn at it)")
                ax.set_xlim(0, PSNR_AXIS_CAP + 4)
            ax.set_ylabel("final test accuracy")
            ax.set_title(panel, fontsize=9)
            ax.grid(alpha=0.3)
    fig.suptitle(title or "privacy-utility trade-off per defense (upper left is better)")
    return save_figure(fig, path, dpi=110)
