"""The pipeline's report: figures and tables from the stages' results, each target marked met or missed.

Pure: it takes the numbers (`ReportInputs`, gathered by `steerlm.stages.report`) and writes `report.md`,
`report.json` and `figures/*.png`. Nothing here runs a model, and nothing changes a figure to meet a target:
a missed target is printed with its figure. The output depends only on the inputs (no times, no dates), so a
pipeline killed and rerun writes the same report.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from steerlm.data.attribute_lines import from_json
from steerlm.data.label_fit import LinearFit
from steerlm.files import atomic_write_text

SURFACE = ("toxicity", "humor", "creativity", "complexity", "verbosity")
KNOWLEDGE = ("helpfulness", "correctness")
FIGURES = "figures"


@dataclass
class ReportInputs:
    """Everything the report shows (JSON-like values as the stages wrote them)."""

    world: dict  # data/summary.json
    fact_recall: dict[str, float]  # base LM: wording tier → share of the world's facts it completes correctly
    base: dict  # base/summary.json
    apm: dict  # apm/eval.json
    apm_vs_oracle: dict[str, list[list[int]]]  # attribute → 5x5 counts [APM label][oracle level] on annotated data
    apm_vs_oracle_pearson: dict[str, float]  # raw APM score vs oracle level
    annotate: dict  # annotate's summary
    steering: dict[str, dict]  # "sft", "bootstrap", "plain" → evaluate_steering's output
    bootstrap: dict  # bootstrap/eval.json
    curves: dict[str, dict[str, list[tuple[int, float]]]]  # stage → {"train": [(step, loss)], "validation": [...]}
    targets: dict[str, float]  # PipelineConfig.targets
    sft: dict = field(default_factory=dict)  # sft/eval.json
    sft_plain: dict = field(default_factory=dict)
    # with pipeline.judge: judged or refit attribute → the labels annotation writes for the held-out ratings,
    # against them and the oracle: {"pearson", "pearson_oracle", "exact_match", "rows", "judged"}
    labels_held_out: dict[str, dict] = field(default_factory=dict)


@dataclass(frozen=True)
class TargetResult:
    name: str
    model: str
    figure: float
    target: float
    met: bool


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def top_setting(steering: dict) -> tuple[float, float]:
    """(mean oracle quality, mean exact-match share over the requested attributes) at the base request."""
    at_base = steering["at_base"]
    exact = at_base.get("exact_match", {})
    return at_base["mean_measured"]["quality"], float(np.mean(list(exact.values()))) if exact else float("nan")


def judge_targets(measured: dict[str, dict], targets: dict[str, float]) -> list[TargetResult]:
    """The labeller of a judged attribute is the judge: the Pearson of the labels it writes (given the APM's other
    labels, as in annotation) with the held-out ratings (rows neither it nor the APM trained on) is held to the
    APM's target for that attribute. The APM's rows stay, so a judge never hides the APM's miss; refit attributes
    are reported, not targets."""
    results = []
    for name, figures in measured.items():
        if not figures["judged"]:
            continue
        value = figures["pearson"]
        target = targets["apm_pearson_surface" if name in SURFACE else "apm_pearson_knowledge"]
        results.append(TargetResult(f"judge Pearson {name}", "judge", value, target, value >= target))
    return results


def evaluate_targets(inputs: ReportInputs) -> list[TargetResult]:
    """Each of the issue's figures against its target (the APM's on held-out human ratings, steering on the
    oracle's measurement of generated answers)."""
    t, results = inputs.targets, []
    apm = inputs.apm["metrics"]["attributes"]
    for name in SURFACE:
        value = apm[name]["pearson"]
        results.append(
            TargetResult(
                f"APM Pearson {name}", "apm", value, t["apm_pearson_surface"], value >= t["apm_pearson_surface"]
            )
        )
    for name in KNOWLEDGE:
        value = apm[name]["pearson"]
        results.append(
            TargetResult(
                f"APM Pearson {name}", "apm", value, t["apm_pearson_knowledge"], value >= t["apm_pearson_knowledge"]
            )
        )
    results.extend(judge_targets(inputs.labels_held_out, t))
    for model in ("sft", "bootstrap"):
        sweeps = inputs.steering[model]["attributes"]
        for name in SURFACE:
            rho, exact = sweeps[name]["spearman"], sweeps[name]["min_exact_match"]
            results.append(
                TargetResult(
                    f"steering Spearman {name}",
                    model,
                    rho,
                    t["steer_spearman_surface"],
                    rho >= t["steer_spearman_surface"],
                )
            )
            results.append(
                TargetResult(
                    f"steering exact match {name} (worst level)",
                    model,
                    exact,
                    t["steer_exact_match_surface"],
                    exact >= t["steer_exact_match_surface"],
                )
            )
        for name in KNOWLEDGE:
            rho = sweeps[name]["spearman"]
            results.append(
                TargetResult(
                    f"steering Spearman {name}",
                    model,
                    rho,
                    t["steer_spearman_knowledge"],
                    rho >= t["steer_spearman_knowledge"],
                )
            )
    sft_quality, sft_exact = top_setting(inputs.steering["sft"])
    boot_quality, boot_exact = top_setting(inputs.steering["bootstrap"])
    gain = max(boot_quality - sft_quality, boot_exact - sft_exact)
    results.append(
        TargetResult(
            "bootstrap gain at the top setting (quality or exact match)",
            "bootstrap",
            gain,
            t["bootstrap_gain"],
            gain >= t["bootstrap_gain"],
        )
    )
    plain_quality, _ = top_setting(inputs.steering["plain"])
    results.append(
        TargetResult(
            "SteerLM − plain SFT oracle quality at the top setting",
            "sft",
            sft_quality - plain_quality,
            0.0,
            sft_quality > plain_quality,
        )
    )
    return results


def _plot_steering(inputs: ReportInputs, path: Path) -> None:
    import matplotlib.pyplot as plt

    sweeps = {model: inputs.steering[model]["attributes"] for model in ("sft", "bootstrap")}
    names = list(sweeps["sft"])
    cols = 3
    rows = math.ceil(len(names) / cols)
    figure, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for model, style in (("sft", "o-"), ("bootstrap", "s--")):
            levels = sweeps[model][name]["levels"]
            xs = [float(level) for level in levels]
            ax.plot(xs, [levels[k]["mean_measured"] for k in levels], style, label=model)
        ax.plot([0, 4], [0, 4], color="0.7", linewidth=1)
        ax.set_title(
            f"{name} (ρ={_fmt(sweeps['sft'][name]['spearman'])} / {_fmt(sweeps['bootstrap'][name]['spearman'])})"
        )
        ax.set_xlabel("requested")
        ax.set_ylabel("oracle-measured")
        ax.set_xlim(-0.2, 4.2)
        ax.set_ylim(-0.2, 4.2)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(figure)


def _plot_apm(inputs: ReportInputs, path: Path) -> None:
    import matplotlib.pyplot as plt

    names = list(inputs.apm_vs_oracle)
    cols = 3
    rows = math.ceil(len(names) / cols)
    figure, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        counts = np.array(inputs.apm_vs_oracle[name], dtype=float)
        ax.imshow(counts / max(counts.sum(), 1), origin="lower", cmap="viridis")
        ax.set_title(f"{name} (r={_fmt(inputs.apm_vs_oracle_pearson[name])})")
        ax.set_xlabel("oracle level")
        ax.set_ylabel("APM label")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(figure)


def _plot_curves(inputs: ReportInputs, path: Path) -> None:
    import matplotlib.pyplot as plt

    stages = list(inputs.curves)
    figure, axes = plt.subplots(1, len(stages), figsize=(3.6 * len(stages), 3), squeeze=False)
    for ax, stage in zip(axes.flat, stages):
        for kind, style in (("train", "-"), ("validation", "o--")):
            points = inputs.curves[stage].get(kind, [])
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], style, label=kind)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
    axes.flat[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(figure)


def _judge_line(judge: dict | None) -> str:
    """What the Bayes judge labelled instead of the APM (its scores are the table's "vs oracle" figures)."""
    if judge is None:
        return ""
    fits = "".join(f" Re-predicted after it: {LinearFit(**fit).describe()}." for fit in judge["fits"])
    return (
        f" {', '.join(judge['attributes'])}: judged by Bayes' rule with the stage-3 style model trained on the "
        f"rated data (`judge/`, step {judge['checkpoint']['step']}), not by the APM.{fits}"
    )


def _starts_line(sft: dict, sft_plain: dict) -> str:
    """What stage 3 and plain SFT started from and how many updates each trained: the comparison's terms."""
    parts = [
        f"{label} started from `{Path(str(run['init_from'])).name}/` and trained {run['last_step']:,} updates"
        for label, run in (("Stage 3", sft), ("plain SFT", sft_plain))
        if run.get("init_from")
    ]
    return f" {'; '.join(parts)}." if parts else ""


def _trained_lines_line(sft: dict, base: dict[str, float]) -> str:
    """How many of stage 3's trained attribute lines carry each value of the base request: a value on none of them
    is a request the model never saw, and the steering figures are measured at it."""
    recorded = sft.get("attribute_lines")
    if recorded is None:
        return ""
    lines = from_json(recorded, "sft/eval.json")
    parts = []
    for name, value in base.items():
        count = lines.count(name, value)
        parts.append(
            f"{name}:{value:g} on **none** (its values there: {lines.values(name)})"
            if count == 0
            else f"{name}:{value:g} on {count:,}"
        )
    listed = "; ".join(parts)
    return f" Of the {lines.lines:,} attribute lines stage 3 trained on, the base request's values are on: {listed}."


def _headroom_line(sft: tuple[float, float], top_level: float) -> str:
    """How far stage 3 is from the ceiling at the top setting: the most the bootstrap's gain target can measure."""
    quality, exact = sft
    return (
        f"Stage 3 is {top_level - quality:.3f} oracle quality below the top level and "
        f"{_fmt(1.0 - exact)} exact match below 1 here: the most the bootstrap can gain at this setting."
    )


def _labels_held_out_line(measured: dict[str, dict]) -> str:
    """The judged and refit labels on the held-out ratings neither the judge nor the APM trained on, beside the
    APM's table."""
    if not measured:
        return ""
    parts = [
        f"{name} ({'judged' if m['judged'] else 'refit'}) Pearson {_fmt(m['pearson'])} over {m['rows']:,} rows "
        f"(vs oracle {_fmt(m['pearson_oracle'])}, label exact {_fmt(m['exact_match'])})"
        for name, m in measured.items()
    ]
    return (
        " Annotation's labels of the held-out ratings neither the judge nor the APM trained on (the judge given the"
        f" APM's other labels, as for any conversation): {'; '.join(parts)}."
    )


def _steering_table(steering: dict) -> list[str]:
    lines = [
        "| attribute | "
        + " | ".join(f"level {lvl}" for lvl in ("0", "1", "2", "3", "4"))
        + " | Spearman | others' change (max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, sweep in steering["attributes"].items():
        cells = []
        for level in ("0", "1", "2", "3", "4"):
            entry = sweep["levels"].get(level)
            cells.append("–" if entry is None else f"{entry['mean_measured']:.2f} ({entry['exact_match']:.0%})")
        change = max(entry["others_mean_abs_change"] for entry in sweep["levels"].values())
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt(sweep['spearman'])} | {change:.2f} |")
    return lines


def _base_line(inputs: ReportInputs) -> str:
    base = inputs.base
    recall = ", ".join(f"tier {tier} {value:.3f}" for tier, value in inputs.fact_recall.items())
    return (
        f"Validation loss {base['initial_valid_loss']:.3f} → {base['final_valid_loss']:.3f} (unigram "
        f"{base['unigram_baseline']:.3f}) after {base['last_step']} steps on {base['train_tokens']:,} corpus tokens. "
        "Facts it completes correctly (argmax over the relation's values, chance 0.125), by wording tier: "
        f"{recall}."
    )


def write_report(inputs: ReportInputs, out_dir: Path, command: str) -> dict:
    """`report.md`, `report.json` and `figures/` in `out_dir`; returns report.json's content."""
    figures = out_dir / FIGURES
    figures.mkdir(parents=True, exist_ok=True)
    _plot_steering(inputs, figures / "steering.png")
    _plot_apm(inputs, figures / "apm_vs_oracle.png")
    _plot_curves(inputs, figures / "loss_curves.png")
    targets = evaluate_targets(inputs)
    sizes = inputs.world["sizes"]
    apm = inputs.apm["metrics"]["attributes"]
    tops = {model: top_setting(inputs.steering[model]) for model in ("plain", "sft", "bootstrap")}
    missed = [t for t in targets if not t.met]
    md = [
        "# SteerLM on the synthetic world",
        "",
        f"`{command}` — world seed {sizes['seed']}: {sizes['num_entities']} creatures, {sizes['annotated_rows']} "
        f"human-rated rows, {sizes['unlabelled_rows']} unlabelled conversations, {sizes['eval_prompts']} eval prompts, "
        f"{sizes.get('knowledge_errors', 'random')} knowledge errors. Stage times: `timings.json`.",
        "",
        f"**Targets: {len(targets) - len(missed)} of {len(targets)} met**"
        + (f" ({len(missed)} missed, marked **no** below; the figures are as measured)." if missed else "."),
        "",
        "| target | model | figure | target | met |",
        "|---|---|---|---|---|",
        *(
            f"| {t.name} | {t.model} | {_fmt(t.figure)} | {t.target:g} | {'yes' if t.met else '**no**'} |"
            for t in targets
        ),
        "",
        "## Stage 0: the base LM",
        "",
        _base_line(inputs),
        "",
        "## Stage 1: the APM (held-out human ratings) and its labels against the oracle",
        "",
        "| attribute | Pearson (held-out ratings) | MAE | exact | Pearson vs oracle (annotated data) |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {_fmt(m['pearson'])} | {_fmt(m['mae'])} | {_fmt(m['exact_match'])} | "
            f"{_fmt(inputs.apm_vs_oracle_pearson.get(name, float('nan')))} |"
            for name, m in apm.items()
        ),
        "",
        "![APM label vs oracle level](figures/apm_vs_oracle.png)",
        "",
        f"Stage 2 annotated {inputs.annotate['annotated_turns']:,} assistant turns of {inputs.annotate['rows_out']:,} "
        "conversations." + _judge_line(inputs.annotate.get("judge")) + _labels_held_out_line(inputs.labels_held_out),
        "",
        "## Steering: requested level → oracle-measured level (exact-match share)",
        "",
        "Stage 3 (attribute-conditioned SFT):",
        "",
        *_steering_table(inputs.steering["sft"]),
        "",
        "After the bootstrap (stage 4):",
        "",
        *_steering_table(inputs.steering["bootstrap"]),
        "",
        "![requested vs measured](figures/steering.png)",
        "",
        "## At the top setting: plain SFT vs SteerLM vs bootstrap",
        "",
        "The base request "
        + ", ".join(f"{k}:{v:g}" for k, v in inputs.steering["sft"]["base"].items())
        + " for every eval prompt (the plain-SFT model sees no attributes)."
        + _starts_line(inputs.sft, inputs.sft_plain)
        + _trained_lines_line(inputs.sft, inputs.steering["sft"]["base"]),
        "",
        "| model | oracle quality | exact match (mean over attributes) | words |",
        "|---|---|---|---|",
        *(
            f"| {label} | {tops[model][0]:.3f} | {_fmt(tops[model][1]) if model != 'plain' else '–'} | "
            f"{inputs.steering[model]['at_base']['mean_words']:.1f} |"
            for model, label in (("plain", "plain SFT"), ("sft", "SteerLM (stage 3)"), ("bootstrap", "bootstrap"))
        ),
        "",
        _headroom_line(tops["sft"], max(inputs.steering["sft"]["levels"])),
        "",
        "## Loss curves",
        "",
        "![loss curves](figures/loss_curves.png)",
        "",
    ]
    payload = {
        "targets": [asdict(t) for t in targets],
        "met": len(targets) - len(missed),
        "total": len(targets),
        "top_setting": {m: {"quality": q, "exact_match": e} for m, (q, e) in tops.items()},
    }
    atomic_write_text(out_dir / "report.md", "\n".join(md))
    atomic_write_text(out_dir / "report.json", json.dumps(payload, indent=2) + "\n")
    return payload
