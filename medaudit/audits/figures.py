"""Report figures (matplotlib, Agg backend), written to ``figures/`` in the run directory.

Figures are made once, when results are built, from the run directory's records, saved
examples and penultimate features (and, for Grad-CAM, the undefended model); results.json
lists them with a caption saying what they show and from which data, and the HTML embeds
them as data URIs (the report stays one file). Grad-CAM uses the last ``nn.Conv2d`` and
the embedding the input of the last ``nn.Linear``, both in module order (see
:mod:`medaudit.core.probes`); a model without one gets no such figure, and a log line
(INFO) says why. Class names and attack labels are cut to
:data:`medaudit.core.text.LABEL_LENGTH` characters (:func:`~medaudit.core.text.label`):
matplotlib lays out every character of a label, and a 100 KB class name took it most of an
hour; the report's data section lists the names in full.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import torch

from medaudit.audits.records import FEATURE_CASES, load_examples, load_features, read_records
from medaudit.audits.rundir import write_atomic
from medaudit.core.segmentation import case_mean, dice_per_class
from medaudit.core.spec import NO_DEFENSE, WORST_CASE
from medaudit.core.text import label as short


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


log = logging.getLogger(__name__)


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    write_atomic(path, buf.getvalue())


def _class_cmap(num_classes: int):
    from matplotlib.colors import ListedColormap

    palette = ["#000000", "#8c8c8c", "#3a7bd5", "#f2f2f2", "#e8452c", "#2ca02c", "#ff7f0e", "#9467bd", "#17becf", "#bcbd22"]
    return ListedColormap([palette[i % len(palette)] for i in range(num_classes)])


def robustness_figure(rows: list[dict], metric: str, label: str, path: Path, budget: str = "") -> dict[str, Any] | None:
    """Metric against epsilon, one line per attack, the worst case in bold (undefended model).
    With ``budget``: against the levels of the attacks sized by that budget (a corruption's
    severity) instead, which share no axis with the norm-bounded attacks."""
    curves: dict[str, list[tuple[float, float]]] = {}
    ticks: dict[float, str] = {}  # each budget labelled as the tables write it (grey levels for L-inf only)
    for row in rows:
        value = (row["metrics"].get(metric) or {}).get("value")
        if row["defense"] == NO_DEFENSE and value is not None and row.get("budget", "") == budget:
            curves.setdefault(row["attack"], []).append((row["epsilon"], value))
            ticks[row["epsilon"]] = row["epsilon_label"]
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for attack, points in curves.items():
        xs, ys = zip(*sorted(points))
        worst = attack == WORST_CASE
        ax.plot(xs, ys, marker="o", lw=3 if worst else 1.2, color="black" if worst else None, label=short(attack), zorder=3 if worst else 2)
    ax.set_xticks(list(ticks), [t.removeprefix(f"{budget} ") for t in ticks.values()], fontsize=8)
    ax.set_xlabel(budget or "epsilon")
    ax.set_ylabel(label)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    if budget:
        return {
            "id": path.stem,
            "title": f"{label} against the {budget}",
            "caption": f"{label} of the undefended model at each {budget} level, per attack sized by its {budget} "
            f"(these are not bounded by the threat model's norm, so they have their own axis and no worst case). "
            f"Data: the {metric} rows of results.json whose budget is {budget!r}.",
            "path": f"figures/{path.name}",
            "section": "shift",
        }
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
    attacked = _attack_jobs(jobs, eps)
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
    columns = [
        "image", "truth", "clean prediction", "adversarial image", "perturbation (\u00d7k)", "adversarial prediction", "target",
    ]
    has_target = any("target" in p[3] for p in panels)
    ncols = 7 if has_target else 6
    fig, axes = plt.subplots(len(panels), ncols, figsize=(1.9 * ncols + 0.3, 2.1 * len(panels) + 0.9), squeeze=False)
    cmap = _class_cmap(num_classes)
    for r, (attack, i, clean, adv, dc, da) in enumerate(panels):
        shown, factor = amplified(adv["adversarial"][i].float() - adv["image"][i].float())
        maps = [clean["image"][i], clean["truth"][i], clean["prediction"][i], adv["adversarial"][i], shown, adv["prediction"][i]]
        if has_target:
            maps.append(adv["target"][i] if "target" in adv else None)
        for c, m in enumerate(maps):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c], fontsize=8)
            if m is None:  # a blank panel of the same size keeps the column header in line
                ax.imshow(torch.ones(maps[0].shape[-2:]).numpy(), cmap="gray", vmin=0, vmax=1)
                for spine in ax.spines.values():
                    spine.set_visible(False)
                continue
            if c in (0, 3, 4):
                ax.imshow(m.float().numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(m.numpy(), cmap=cmap, vmin=0, vmax=num_classes - 1, interpolation="nearest")
        _factor_label(axes[r][4], factor)
        axes[r][0].set_ylabel(short(attack), fontsize=8)
        axes[r][5].set_xlabel(f"Dice {dc:.2f} -> {da:.2f}", fontsize=8)
    from matplotlib.patches import Patch

    names = class_names if len(class_names) == num_classes else [f"class {k}" for k in range(num_classes)]
    width, height = fig.get_size_inches()  # margins in inches, whatever the number of rows
    fig.subplots_adjust(
        left=0.3 / width, right=1 - 0.05 / width, bottom=0.6 / height, top=1 - 0.3 / height, wspace=0.06, hspace=0.3
    )
    fig.legend(
        handles=[Patch(color=cmap(k), label=short(n)) for k, n in enumerate(names)],
        loc="lower center", ncol=min(num_classes, 6), fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.0),
    )
    _save(fig, path)
    return {
        "id": path.stem,
        "title": "Clean and adversarial segmentations",
        "caption": f"One row per attack at epsilon {eps * 255:g}/255: of the first cases of the data set, the one whose "
        "Dice the attack lowered most, with the image, the ground truth, the clean prediction, the adversarial image, "
        "the perturbation (adversarial minus original image, amplified by the factor printed on it, mid grey = no "
        "change) and the prediction on the adversarial image" + (", and the attacker's target mask" if has_target else "")
        + ". 3D cases show the slice where their smallest structure is largest. Data: examples/ in the run directory.",
        "path": f"figures/{path.name}",
    }


def amplified(delta: torch.Tensor) -> tuple[torch.Tensor, float | None]:
    """A perturbation made visible: ``0.5 + k * delta`` with ``k = 0.5 / max |delta|``, so mid
    grey is no change and the largest change reaches black or white. Returns the image and
    ``k`` (None, and plain mid grey, when nothing changed)."""
    peak = float(delta.abs().max()) if delta.numel() else 0.0
    if peak == 0:
        return torch.full_like(delta, 0.5), None
    factor = 0.5 / peak
    return (0.5 + factor * delta).clamp(0, 1), factor


def _factor_text(factor: float | None) -> str:
    if factor is None:
        return "no change"
    return f"\u00d7{factor:.0f}" if factor >= 10 else f"\u00d7{factor:.1f}"


def _factor_label(ax, factor: float | None) -> None:
    ax.text(0.03, 0.97, _factor_text(factor), transform=ax.transAxes, ha="left", va="top", fontsize=9,
            color="black", bbox=dict(boxstyle="round,pad=0.2", facecolor="white", edgecolor="none", alpha=0.85))


def _name(class_names: list[str], k: int) -> str:
    return short(class_names[k]) if 0 <= k < len(class_names) else f"class {k}"


def _imshow(ax, image: torch.Tensor, **kwargs) -> None:
    """A ``C x H x W`` image in [0, 1]: RGB when it has three channels, else its first channel in grey."""
    image = image.float()
    if image.shape[0] == 3:
        ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy(), **kwargs)
    else:
        ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1, **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])


def _attack_jobs(jobs: list, eps: float) -> list:
    """The undefended model's norm-bounded attack jobs at ``eps``."""
    return [j for j in jobs if j.defense == NO_DEFENSE and not j.is_clean and not j.budget and abs(j.epsilon - eps) < 1e-12]


def budget_figures(rows: list[dict], metric: str, label: str, figures_dir: Path) -> list[dict]:
    """One curve figure per budget of the attacks not bounded by the norm (see
    :func:`robustness_figure`), and the corruptions' heat map."""
    budgets = sorted({r["budget"] for r in rows if r.get("budget")})
    found = [robustness_figure(rows, metric, label, figures_dir / f"{metric.replace('_', '-')}-{b}.png", budget=b)
             for b in budgets]
    found.append(corruption_heatmap(rows, metric, label, figures_dir / f"{metric.replace('_', '-')}-corruptions.png"))
    return [f for f in found if f is not None]


def corruption_heatmap(rows: list[dict], metric: str, label: str, path: Path) -> dict[str, Any] | None:
    """Corruption x severity: the metric of the undefended model in each cell (worst of the
    draws), so the operations and levels that hurt stand out at a glance."""
    cells = {(r["attack"], r["epsilon"]): r["metrics"][metric]["value"] for r in rows
             if r.get("corruption") and r["defense"] == NO_DEFENSE and (r["metrics"].get(metric) or {}).get("value") is not None}
    if not cells:
        return None
    import numpy as np

    names = sorted({a for a, _ in cells}, key=lambda a: min(v for (b, _), v in cells.items() if b == a))
    levels = sorted({e for _, e in cells})
    grid = np.array([[cells.get((a, e), np.nan) for e in levels] for a in names])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.75 * len(levels), 0.9 + 0.32 * len(names)))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for i in range(len(names)):
        for j in range(len(levels)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if 0.25 < grid[i, j] < 0.85 else "white")
    ax.set_xticks(range(len(levels)), [f"{e:g}" for e in levels], fontsize=8)
    ax.set_yticks(range(len(names)), [short(a) for a in names], fontsize=8)
    ax.set_xlabel("severity")
    fig.colorbar(image, ax=ax, label=label, fraction=0.05)
    _save(fig, path)
    return {
        "id": path.stem,
        "title": f"{label} under each corruption and severity",
        "caption": f"{label} of the undefended model under each corruption (rows, most harmful first) at each "
        "severity (columns); a random corruption's cell is its worst of the spec's draws per case. Data: the "
        f"{metric} rows of results.json with a corruption entry.",
        "path": f"figures/{path.name}",
        "section": "shift",
    }


def strongest_job(run_dir: Path, jobs: list, eps: float):
    """The undefended model's attack job at ``eps`` with the lowest robust accuracy (the first
    in plan order on ties), from its records; None when there is none."""
    best, best_acc = None, None
    for job in _attack_jobs(jobs, eps):
        rows = read_records(run_dir, job.id)
        acc = sum(r["adv_correct"] for r in rows) / max(len(rows), 1)
        if best_acc is None or acc < best_acc:
            best, best_acc = job, acc
    return best


def examples_figure(run_dir: Path, jobs: list, eps: float, class_names: list[str], path: Path) -> dict[str, Any] | None:
    """One row per attack at ``eps``: original, adversarial and amplified perturbation of one
    saved case (the survey's Figure 6 layout), with the truth and the predictions."""
    saved = [(job, load_examples(run_dir, job.id)) for job in _attack_jobs(jobs, eps)]
    saved = [(job, ex) for job, ex in saved if ex is not None and "clean_prediction" in ex and len(ex["truth"])]
    if not saved:
        return None
    # One case for every row, so the attacks can be compared: the saved case that the most
    # attacks fool, among those classified correctly when clean (the first case if none is).
    k = min(len(ex["truth"]) for _, ex in saved)
    first = saved[0][1]
    attacked = (first["clean_prediction"][:k] == first["truth"][:k]).tolist()
    fooled = [sum(int(ex["prediction"][i] != ex["truth"][i]) for _, ex in saved) for i in range(k)]
    candidates = [i for i in range(k) if attacked[i]] or [0]
    case = max(candidates, key=lambda i: (fooled[i], -i))
    plt = _pyplot()
    fig, axes = plt.subplots(len(saved), 3, figsize=(7.2, 2.9 * len(saved)), squeeze=False, layout="constrained")
    for r, (job, ex) in enumerate(saved):
        x, x_adv = ex["image"][case].float(), ex["adversarial"][case].float()
        truth, clean, adv = (int(ex[key][case]) for key in ("truth", "clean_prediction", "prediction"))
        delta = x_adv - x
        shown, factor = amplified(delta if x.shape[0] == 3 else delta[:1])
        ax_orig, ax_adv, ax_delta = axes[r]
        _imshow(ax_orig, x)
        _imshow(ax_adv, x_adv)
        _imshow(ax_delta, shown)
        head = ("original\n", "adversarial\n", "perturbation, amplified\n") if r == 0 else ("", "", "")
        ax_orig.set_title(f"{head[0]}truth: {_name(class_names, truth)}\npredicted: {_name(class_names, clean)}", fontsize=8)
        if clean != truth:
            ax_adv.set_title(f"{head[1]}not attacked\n(clean prediction wrong)", fontsize=8)
        else:
            ax_adv.set_title(f"{head[1]}predicted: {_name(class_names, adv)}", fontsize=8,
                             color="#c0392b" if adv != truth else "black")
        ax_delta.set_title(f"{head[2]}max |change| {float(delta.abs().max()) * 255:.2g}/255", fontsize=8)
        _factor_label(ax_delta, factor)
        ax_orig.set_ylabel(f"{short(job.attack)} {job.epsilon_label}", fontsize=9)
    _save(fig, path)
    return {
        "id": path.stem,
        "title": "Original, adversarial and perturbation",
        "caption": f"One row per attack at epsilon {saved[0][0].epsilon_label} on the undefended model, all on the same case: "
        "of the first cases of the data set that the model classifies correctly, the one that the most attacks fool. "
        "Columns: the original image with its true class and the clean prediction, the adversarial image with the "
        "prediction on it (red: the attack changed it), and the perturbation (adversarial minus original), amplified "
        "by the factor printed on it so that its largest change reaches black or white, mid grey meaning no change. "
        "Data: examples/ in the run directory.",
        "path": f"figures/{path.name}",
    }


#: Cases the smallest-perturbation figure shows.
SMALLEST_CASES = 4


def smallest_flip_figure(run_dir: Path, jobs: list, eps: float, class_names: list[str], path: Path) -> dict[str, Any] | None:
    """A minimum-norm attack's smallest flipping perturbation for a few saved cases: one
    column per case, the original, the adversarial image and the amplified perturbation,
    with its size in the threat norm and its PSNR. None without a minimum-norm attack that
    flipped a saved case."""
    from medaudit.core.components import Facet

    for job in _attack_jobs(jobs, eps):
        records = read_records(run_dir, job.id)
        ex = load_examples(run_dir, job.id)
        if Facet.MINIMUM_NORM not in records.facets or ex is None or "clean_prediction" not in ex:
            continue
        flipped = [i for i in range(len(ex["truth"]))
                   if ex["clean_prediction"][i] == ex["truth"][i] != ex["prediction"][i] and records[i]["min_norm"] is not None]
        if flipped:
            break
    else:
        return None
    cases, norm = flipped[:SMALLEST_CASES], job.config.get("norm", "linf")
    plt = _pyplot()
    fig, axes = plt.subplots(3, len(cases), figsize=(2.3 * len(cases) + 0.4, 7.0), squeeze=False, layout="constrained")
    for col, i in enumerate(cases):
        x, x_adv = ex["image"][i].float(), ex["adversarial"][i].float()
        shown, factor = amplified((x_adv - x) if x.shape[0] == 3 else (x_adv - x)[:1])
        size = records[i]["min_norm"]
        size_text = f"{size * 255:.2g}/255" if norm == "linf" else f"{size:.3g}"
        decibels = records[i].get("psnr")
        _imshow(axes[0][col], x)
        _imshow(axes[1][col], x_adv)
        _imshow(axes[2][col], shown)
        _factor_label(axes[2][col], factor)
        truth, adv = int(ex["truth"][i]), int(ex["prediction"][i])
        axes[0][col].set_title(f"case {i + 1} of the data set\ntruth: {_name(class_names, truth)}", fontsize=8)
        axes[1][col].set_title(f"predicted: {_name(class_names, adv)}", fontsize=8, color="#c0392b")
        axes[2][col].set_title(f"{norm} {size_text}" + (f", PSNR {decibels:.1f} dB" if decibels else ""), fontsize=8)
    axes[0][0].set_ylabel("original", fontsize=9)
    axes[1][0].set_ylabel("smallest flip found", fontsize=9)
    axes[2][0].set_ylabel("perturbation, amplified", fontsize=9)
    _save(fig, path)
    return {
        "id": path.stem,
        "title": "The smallest perturbation that flips each case",
        "caption": f"{short(job.attack)} (a minimum-norm attack) on the undefended model: for up to {SMALLEST_CASES} of "
        "the first cases that it flips, the original image, the adversarial image at the smallest perturbation it found "
        "and that perturbation amplified (mid grey: no change), with its size in the threat model's norm and the PSNR "
        "of the adversarial image. How small a change suffices, seen case by case. Data: examples/ and records/ in "
        "the run directory.",
        "path": f"figures/{path.name}",
    }


def grad_cam_figure(run_dir: Path, job, model, class_names: list[str], path: Path) -> dict[str, Any] | None:
    """Grad-CAM of the predicted class on the clean (top row) and adversarial (bottom row)
    images of ``job``'s saved cases, overlaid on the images (the survey's Figure 2)."""
    from medaudit.core.probes import grad_cam

    ex = load_examples(run_dir, job.id)
    if ex is None or "clean_prediction" not in ex or "volume_slice" in ex or not len(ex["truth"]):
        log.info("Grad-CAM figure left out: the job %s kept no 2D example images", job.id)
        return None
    n = len(ex["truth"])
    images = torch.cat([ex["image"], ex["adversarial"]]).float()
    cams = grad_cam(model, images, torch.cat([ex["clean_prediction"], ex["prediction"]]))
    if cams is None:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(2, n, figsize=(2.1 * n + 0.6, 4.9), squeeze=False)
    for i in range(n):
        truth, clean, adv = int(ex["truth"][i]), int(ex["clean_prediction"][i]), int(ex["prediction"][i])
        for r, (image, cam) in enumerate(((images[i], cams[i]), (images[n + i], cams[n + i]))):
            ax = axes[r][i]
            _imshow(ax, image)
            overlay = ax.imshow(cam.numpy(), cmap="jet", vmin=0, vmax=1, alpha=0.45)
        axes[0][i].set_title(f"truth: {_name(class_names, truth)}\nclean pred.: {_name(class_names, clean)}", fontsize=8)
        if clean != truth:
            axes[1][i].set_title("not attacked\n(clean prediction wrong)", fontsize=8)
        else:
            axes[1][i].set_title(f"adversarial pred.: {_name(class_names, adv)}", fontsize=8,
                                 color="#c0392b" if adv != truth else "black")
    axes[0][0].set_ylabel("clean", fontsize=9)
    axes[1][0].set_ylabel(f"{short(job.attack)} {job.epsilon_label}", fontsize=9)
    fig.tight_layout()
    bar = fig.colorbar(overlay, ax=axes, fraction=0.025, pad=0.02)
    bar.set_label("Grad-CAM (each map / its max)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    _save(fig, path)
    return {
        "id": path.stem,
        "title": "Where the model looks: Grad-CAM, clean and adversarial",
        "caption": f"Grad-CAM of the predicted class at the model's last Conv2d layer (in module order), on the first "
        f"{n} cases of the data set: clean images (top) and their adversarial versions under {short(job.attack)} at epsilon "
        f"{job.epsilon_label} (bottom), the attack that left the undefended model the lowest robust accuracy "
        "at the largest budget. Each map is upsampled to the image and scaled to its own maximum (red: most "
        "attention). Data: examples/ in the run directory and the audited model.",
        "path": f"figures/{path.name}",
    }


def embed_2d(points: torch.Tensor) -> tuple[torch.Tensor, str]:
    """2D embedding of ``m x d`` points: t-SNE (scikit-learn, random_state 0, perplexity
    ``min(30, (m - 1) / 3)``, PCA initialisation), or PCA (``torch.pca_lowrank``) for fewer
    than 30 points. Returns the ``m x 2`` coordinates and the method's description."""
    points = points.float()
    m = len(points)
    if m < 30:
        centred = points - points.mean(0, keepdim=True)
        q = min(2, *centred.shape)
        _, _, v = torch.pca_lowrank(centred, q=q, center=False)
        coords = centred @ v[:, :q]
        if q < 2:
            coords = torch.cat([coords, torch.zeros(m, 2 - q)], 1)
        return coords, "PCA"
    from sklearn.manifold import TSNE

    perplexity = min(30.0, (m - 1) / 3)
    coords = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=0, max_iter=TSNE_ITERATIONS).fit_transform(
        points.double().numpy()
    )
    return torch.from_numpy(coords).float(), f"t-SNE (perplexity {perplexity:.3g})"


#: t-SNE iterations (the first 250 with early exaggeration); 500 keeps the figure under a
#: second or two for a thousand points on one CPU core.
TSNE_ITERATIONS = 500
#: Cases the feature embedding shows at most (each twice: clean and adversarial).
EMBEDDING_CASES = 256
#: The model-explaining figures ``report.figures`` may ask for.
EXPLAINING = ("grad_cam", "embedding")


def paired_features(run_dir: Path, jobs: list, job) -> dict[str, torch.Tensor] | None:
    """Clean and adversarial penultimate features of the cases ``job`` attacked (among the
    first ones of the data set), row for row: ``clean``, ``adversarial``, ``truth``, ``position``."""
    clean_job = next(j for j in jobs if j.defense == job.defense and j.is_clean)
    clean, adv = load_features(run_dir, clean_job.id), load_features(run_dir, job.id)
    if clean is None or adv is None or not len(adv["position"]):
        return None
    lookup = torch.full((int(max(clean["position"].max(), adv["position"].max())) + 1,), -1, dtype=torch.long)
    lookup[clean["position"]] = torch.arange(len(clean["position"]))
    rows = lookup[adv["position"]]
    have = rows >= 0
    return {
        "clean": clean["features"][rows[have]],
        "adversarial": adv["features"][have],
        "truth": adv["truth"][have],
        "position": adv["position"][have],
    }


def embedding_figure(run_dir: Path, jobs: list, job, class_names: list[str], path: Path) -> dict[str, Any] | None:
    """Clean and adversarial penultimate features of the same cases, embedded jointly in 2D
    (the survey's Figure 3): colour = clean or adversarial, marker = true class."""
    pairs = paired_features(run_dir, jobs, job)
    if pairs is None:
        log.info("feature embedding figure left out: no penultimate features were kept for job %s", job.id)
        return None
    n = min(len(pairs["truth"]), EMBEDDING_CASES)  # the first ones: t-SNE's time grows with the square of the points
    coords, method = embed_2d(torch.cat([pairs["clean"][:n], pairs["adversarial"][:n]]))
    truth = torch.cat([pairs["truth"][:n], pairs["truth"][:n]])
    plt = _pyplot()
    from matplotlib.lines import Line2D

    markers = ["o", "^", "s", "D", "v", "P", "X", "*", "<", ">"]
    colours = {"clean": "#3a7bd5", "adversarial": "#e8452c"}
    fig, ax = plt.subplots(figsize=(6.2, 4.6))
    classes = sorted(set(truth.tolist()))
    for part, (lo, hi) in (("clean", (0, n)), ("adversarial", (n, 2 * n))):
        for k in classes:
            sel = (truth[lo:hi] == k).nonzero().flatten() + lo
            if len(sel):
                ax.scatter(coords[sel, 0].numpy(), coords[sel, 1].numpy(), s=16, marker=markers[k % len(markers)],
                           c=colours[part], alpha=0.7, linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"{method}, dimension 1", fontsize=8)
    ax.set_ylabel(f"{method}, dimension 2", fontsize=8)
    handles = [Line2D([], [], ls="", marker="o", color=c, label=part) for part, c in colours.items()]
    handles += [
        Line2D([], [], ls="", marker=markers[k % len(markers)], color="#555555", label=_name(class_names, k)) for k in classes
    ]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    _save(fig, path)
    return {
        "id": path.stem,
        "title": "Deep features, clean and adversarial",
        "caption": f"{method.split(' (')[0]} embedding in 2D of the undefended model's penultimate features (the input "
        f"of its last Linear layer) for {n} cases: of the first {FEATURE_CASES} of the data set, the first "
        f"{EMBEDDING_CASES} at most of those "
        f"{short(job.attack)} attacked at epsilon {job.epsilon_label} (the cases classified correctly when clean; "
        "the attack that left the lowest robust accuracy at the largest budget). Each case appears twice, clean "
        f"(blue) and adversarial (red), embedded jointly ({2 * n} points); the marker gives its true class. Axes "
        "have no units. Data: examples/*.features.pt in the run directory.",
        "path": f"figures/{path.name}",
    }


def convergence_figure(convergence: dict[str, dict], path: Path) -> dict[str, Any] | None:
    """The convergence evidence (Carlini et al. 2019, C6), one row per model: the margin of a
    few cases at every model call of the strongest attack's re-run (below 0: fooled), and the
    share of the re-run cases still robust after each restart beside the audit's own run.
    None when the re-run did not run."""
    ran = {label: c for label, c in convergence.items() if c.get("traces") is not None}
    if not ran:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(ran), 2, figsize=(9.0, 3.0 * len(ran)), squeeze=False, layout="constrained")
    for row, (label, c) in enumerate(ran.items()):
        loss, restarts = axes[row]
        for i, trace in enumerate(c["traces"]):
            if trace:
                loss.plot([p[0] for p in trace], [p[1] for p in trace], lw=1.2, label=f"case {i + 1}")
        loss.axhline(0, color="#c0392b", lw=0.8, ls="--")
        loss.set_xlabel("model call")
        loss.set_ylabel("margin z_y - max other")
        loss.set_title(f"{'undefended' if label == 'none' else label}: {c['attack']} at {c['epsilon_label']}, "
                       f"{c['factor']}x iterations", fontsize=9)
        if any(c["traces"]):
            loss.legend(fontsize=7)
        counts = list(range(1, len(c["robust_after_restart"]) + 1))
        restarts.plot(counts, c["robust_after_restart"], marker="o", label="re-run, cumulative")
        restarts.axhline(c["robust_before"], color="grey", ls="--", label="the audit's run")
        restarts.set_xticks(counts)
        restarts.set_ylim(-0.02, 1.02)
        restarts.set_xlabel("restarts")
        restarts.set_ylabel("robust accuracy")
        restarts.set_title(f"{c['cases']} cases", fontsize=9)
        restarts.legend(fontsize=7)
    _save(fig, path)
    return {
        "id": path.stem,
        "title": "Convergence of the strongest attack",
        "caption": "For each model, the strongest iterative attack at the budget where the worst case is nearest half the "
        "clean accuracy, re-run on the first cases it attacked with more iterations and fresh restarts. Left: the logit "
        "margin z_y - max_{i != y} z_i of a few cases (those the audit left robust first) at every model call of the "
        "re-run's first restart; a margin that is still falling at the end means the attack had not converged. Right: "
        "the share of the cases still robust after each restart, against the audit's own run on them (dashed); a drop "
        "means more search breaks more cases. Data: results.json, soundness.convergence.",
        "path": f"figures/{path.name}",
        "section": "validity",
    }


def certified_figure(certified: dict[str, dict], rows: list[dict], metric: str, norm: str,
                     path: Path) -> dict[str, Any] | None:
    """Certified accuracy against the L2 radius for each certifying defense, beside the
    empirical worst-case robust accuracy of the same defense when the threat model is L2
    (the certificate is a lower bound on it, the attacks an upper bound)."""
    from medaudit.core.spec import WORST_CASE

    if not certified:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    for label, c in certified.items():
        line, = ax.step([p[0] for p in c["curve"]], [p[1] for p in c["curve"]], where="post",
                        label=f"{label}: certified (sigma {c['sigma']:g})")
        if norm == "l2":
            empirical = sorted((r["epsilon"], r["metrics"][metric]["value"]) for r in rows
                               if r["defense"] == label and r["attack"] == WORST_CASE and r["metrics"].get(metric))
            if empirical:
                ax.plot(*zip(*empirical), marker="o", ls="--", color=line.get_color(),
                        label=f"{label}: empirical, worst case of the attacks")
    ax.set_xlabel("L2 radius (image in [0, 1])")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    _save(fig, path)
    return {
        "id": path.stem,
        "title": "Certified accuracy against the L2 radius",
        "caption": "The share of cases the smoothed classifier certifies correct at each L2 radius or beyond "
        "(randomized smoothing, Cohen et al. 2019: each certificate fails with probability at most alpha), a lower bound "
        "on its robust accuracy; where the threat model is L2, dashed, the attacks' worst case at each budget, an upper "
        "bound. The truth lies between them. Data: results.json, certified; certified/ in the run directory.",
        "path": f"figures/{path.name}",
        "section": "certified",
    }


def _optional(what: str, build, *args) -> dict[str, Any] | None:
    """A figure that must not cost the audit its report: a failure is logged and the figure left out."""
    try:
        return build(*args)
    except Exception as exc:  # noqa: BLE001 - the verdict and the other figures stand
        log.warning("%s figure left out: %s: %s", what, type(exc).__name__, exc)
        return None


def segmentation_figures(run_dir: Path, rows: list[dict], jobs: list, epsilons: list[float], class_names: list[str], num_classes: int) -> list[dict]:
    figures = [
        robustness_figure(rows, "robust_dice", "Mean Dice", run_dir / "figures" / "robust-dice.png"),
        overlay_figure(run_dir, jobs, max(epsilons), class_names, num_classes, run_dir / "figures" / "overlays.png"),
        *budget_figures(rows, "robust_dice", "Mean Dice", run_dir / "figures"),
    ]
    return [f for f in figures if f is not None]


def classification_figures(
    run_dir: Path, rows: list[dict], jobs: list = (), epsilons: list[float] = (), class_names: list[str] = (), model=None,
    explaining: tuple[str, ...] | list[str] = EXPLAINING,
) -> list[dict]:
    """The robustness curve; with the jobs, also example triptychs, and with the undefended
    :class:`LoadedModel` (``model``), the ``explaining`` figures (:func:`explaining_figures`)."""
    figures = [robustness_figure(rows, "robust_accuracy", "Robust accuracy", run_dir / "figures" / "robust-accuracy.png"),
               *budget_figures(rows, "robust_accuracy", "Robust accuracy", run_dir / "figures")]
    if jobs and epsilons:
        eps, names = max(epsilons), list(class_names)
        out = run_dir / "figures"
        figures.append(_optional("examples", examples_figure, run_dir, jobs, eps, names, out / "examples.png"))
        figures.append(_optional("smallest perturbations", smallest_flip_figure, run_dir, jobs, eps, names,
                                 out / "smallest-perturbations.png"))
        if model is not None:
            figures += explaining_figures(run_dir, jobs, eps, names, model, explaining)
    return [f for f in figures if f is not None]


def explaining_figures(run_dir: Path, jobs: list, eps: float, class_names: list[str], model,
                       explaining: tuple[str, ...] | list[str] = EXPLAINING) -> list[dict]:
    """Grad-CAM and the feature embedding (those named in ``explaining``) of the undefended
    :class:`LoadedModel` for the attack that left the lowest robust accuracy at ``eps``, from
    what the run directory kept: drawn at the end of a run, or later by ``medaudit report
    --figures``. A model without ``nn.Conv2d`` (``nn.Linear``) or without gradient access gets
    no Grad-CAM (embedding) figure; a log line says why."""
    from torch import nn

    from medaudit.core.components import Access
    from medaudit.core.probes import last_layer

    job = strongest_job(run_dir, jobs, eps)
    if job is None:
        return []
    out, figures = run_dir / "figures", []
    if "grad_cam" not in explaining:
        log.info("Grad-CAM figure left out: not in report.figures")
    elif last_layer(model.module, nn.Conv2d) is None:
        log.info("Grad-CAM figure left out: the model has no nn.Conv2d layer")
    elif Access.GRADIENTS not in model.access:
        log.info("Grad-CAM figure left out: the model gives no gradients")
    else:
        figures.append(_optional("Grad-CAM", grad_cam_figure, run_dir, job, model.module, class_names, out / "grad-cam.png"))
    if "embedding" not in explaining:
        log.info("feature embedding figure left out: not in report.figures")
    elif last_layer(model.module, nn.Linear) is None:
        log.info("feature embedding figure left out: the model has no nn.Linear layer")
    else:
        figures.append(_optional("feature embedding", embedding_figure, run_dir, jobs, job, class_names,
                                 out / "feature-embedding.png"))
    return [f for f in figures if f is not None]


def task_figures(task, run_dir: Path, rows: list[dict], jobs: list, epsilons: list[float], data, model,
                 explaining: tuple[str, ...] | list[str] = EXPLAINING) -> list[dict]:
    """The report's figures of ``task``, from the results rows and the run directory."""
    from medaudit.core.components import Task

    if task is Task.SEGMENTATION:
        return segmentation_figures(run_dir, rows, jobs, epsilons, data.mask_class_names or [], model.num_classes)
    return classification_figures(run_dir, rows, jobs, epsilons, data.class_names, model, explaining)


def data_uri(run_dir: Path, relative: str) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode((Path(run_dir) / relative).read_bytes()).decode("ascii")

