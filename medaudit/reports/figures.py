"""Report figures (matplotlib, Agg backend), written to ``figures/`` in the run directory.

Figures are made once, when results are built, from the run directory's records and
saved examples; results.json lists them with a caption saying what they show and from
which data, and the HTML embeds them as data URIs (the report stays one file).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from medaudit.audits.records import load_examples
from medaudit.audits.spec import NO_DEFENSE, WORST_CASE
from medaudit.core.segmentation import case_mean, dice_per_class


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


def _class_cmap(num_classes: int):
    from matplotlib.colors import ListedColormap

    palette = ["#000000", "#8c8c8c", "#3a7bd5", "#f2f2f2", "#e8452c", "#2ca02c", "#ff7f0e", "#9467bd", "#17becf", "#bcbd22"]
    return ListedColormap([palette[i % len(palette)] for i in range(num_classes)])


def robustness_figure(rows: list[dict], metric: str, label: str, path: Path) -> dict[str, Any] | None:
    """Metric against epsilon, one line per attack, the worst case in bold (undefended model)."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        value = (row["metrics"].get(metric) or {}).get("value")
        if row["defense"] == NO_DEFENSE and value is not None:
            curves.setdefault(row["attack"], []).append((row["epsilon"] * 255, value))
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for attack, points in curves.items():
        xs, ys = zip(*sorted(points))
        worst = attack == WORST_CASE
        ax.plot(xs, ys, marker="o", lw=3 if worst else 1.2, color="black" if worst else None, label=attack, zorder=3 if worst else 2)
    ax.set_xlabel("epsilon (grey levels of 255)")
    ax.set_ylabel(label)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return {
        "id": path.stem,
        "title": f"{label} against the attack budget",
        "caption": f"{label} of the undefended model at each epsilon of the threat model, per attack; the bold "
        f"black line is the worst case over the attacks (per case). Data: the {metric} rows of results.json.",
        "path": f"figures/{path.name}",
    }


def overlay_figure(run_dir: Path, jobs: list, eps: float, class_names: list[str], num_classes: int, path: Path) -> dict[str, Any] | None:
    """Per attack at ``eps``: the saved case whose Dice dropped most, as image, truth, clean
    prediction, adversarial image and adversarial prediction (plus the target, if any)."""
    clean_job = next(j for j in jobs if j.defense == NO_DEFENSE and j.is_clean)
    clean = load_examples(run_dir, clean_job.id)
    attacked = [j for j in jobs if j.defense == NO_DEFENSE and not j.is_clean and abs(j.epsilon - eps) < 1e-12]
    panels = []
    for job in attacked:
        adv = load_examples(run_dir, job.id)
        if clean is None or adv is None:
            continue
        d_clean = dice_per_class(clean["prediction"], clean["truth"], num_classes)
        d_adv = dice_per_class(adv["prediction"], adv["truth"], num_classes)
        drops = [case_mean(a) - case_mean(b) for a, b in zip(d_clean.tolist(), d_adv.tolist())]
        i = max(range(len(drops)), key=drops.__getitem__)
        panels.append((job.attack, i, clean, adv, case_mean(d_clean[i].tolist()), case_mean(d_adv[i].tolist())))
    if not panels:
        return None
    plt = _pyplot()
    columns = ["image", "truth", "clean prediction", "adversarial image", "adversarial prediction", "target"]
    has_target = any("target" in p[3] for p in panels)
    ncols = 6 if has_target else 5
    fig, axes = plt.subplots(len(panels), ncols, figsize=(2.1 * ncols, 2.2 * len(panels)), squeeze=False)
    cmap = _class_cmap(num_classes)
    for r, (attack, i, clean, adv, dc, da) in enumerate(panels):
        maps = [clean["image"][i], clean["truth"][i], clean["prediction"][i], adv["adversarial"][i], adv["prediction"][i]]
        if has_target:
            maps.append(adv["target"][i] if "target" in adv else None)
        for c, m in enumerate(maps):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if m is None:
                ax.axis("off")
                continue
            if c in (0, 3):
                ax.imshow(m.float().numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(m.numpy(), cmap=cmap, vmin=0, vmax=num_classes - 1, interpolation="nearest")
            if r == 0:
                ax.set_title(columns[c], fontsize=8)
        axes[r][0].set_ylabel(attack, fontsize=8)
        axes[r][4].set_xlabel(f"Dice {dc:.2f} -> {da:.2f}", fontsize=8)
    from matplotlib.patches import Patch

    names = class_names if len(class_names) == num_classes else [f"class {k}" for k in range(num_classes)]
    fig.legend(
        handles=[Patch(color=cmap(k), label=n) for k, n in enumerate(names)],
        loc="lower center", ncol=min(num_classes, 6), fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.02),
    )
    _save(fig, path)
    return {
        "id": path.stem,
        "title": "Clean and adversarial segmentations",
        "caption": f"One row per attack at epsilon {eps * 255:g}/255: of the first cases of the data set, the one whose "
        "Dice the attack lowered most, with the image, the ground truth, the clean prediction, the adversarial image "
        "and the prediction on it" + (", and the attacker's target mask" if has_target else "") + ". 3D cases show "
        "the slice where their smallest structure is largest. Data: examples/ in the run directory.",
        "path": f"figures/{path.name}",
    }


def segmentation_figures(run_dir: Path, rows: list[dict], jobs: list, epsilons: list[float], class_names: list[str], num_classes: int) -> list[dict]:
    figures = [
        robustness_figure(rows, "robust_dice", "Mean Dice", run_dir / "figures" / "robust-dice.png"),
        overlay_figure(run_dir, jobs, max(epsilons), class_names, num_classes, run_dir / "figures" / "overlays.png"),
    ]
    return [f for f in figures if f is not None]


def classification_figures(run_dir: Path, rows: list[dict]) -> list[dict]:
    figure = robustness_figure(rows, "robust_accuracy", "Robust accuracy", run_dir / "figures" / "robust-accuracy.png")
    return [figure] if figure else []


def data_uri(run_dir: Path, relative: str) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode((Path(run_dir) / relative).read_bytes()).decode("ascii")

