"""`urm-jax eval`: RewardBench-style accuracy on preference pairs, with uncertainty.

Input: JSONL pairs. Each line has ``chosen`` and ``rejected`` and optionally ``prompt``,
``subset`` and ``id``. A side is one of
  * a string: the assistant reply to ``prompt`` (a string, or a list of messages), as in
    RewardBench (``allenai/reward-bench``: prompt/chosen/rejected strings + subset);
  * a list of messages: the whole conversation (Skywork / UltraFeedback style; ``prompt`` is
    then ignored), or, when it starts with an assistant turn, the continuation of ``prompt``;
  * an object accepted by `render_ids` (``messages``, ``prompt``+``response`` or ``input_ids``).
A line without ``subset`` counts under ``"default"``.

A pair is correct when reward(chosen) > reward(rejected), strictly: RewardBench's rule
(``run_rm.py``), so a tie counts as wrong; ties are reported. With several models (URME) the
reward is the members' mean.

Scores (`rewardbench_scores`) follow RewardBench v1: a section's score is the mean of its subset
accuracies weighted by RewardBench's fixed EXAMPLE_COUNTS (`calculate_scores_per_section`),
which up-weights math-prm (447 pairs) to 984 = 6 x 164 so it weighs as much as the six hep-*
code subsets together; the overall score is the unweighted mean of the four sections (the v1
leaderboard "Score"; Prior Sets are not part of it). Deviations, for files that are not the
full benchmark: a section with no subset present is reported as null and left out of the mean
(RewardBench would count it as 0), and subsets RewardBench does not know (Prior Sets included)
go to an "Other" group, reported with its pair-weighted accuracy and never in the score.

Uncertainty: a pair's uncertainty is the sum of both responses' uncertainty under the chosen
measure (aleatoric: sum_k exp(2 log_std_k), averaged over ensemble members; or the ensemble's
reward_gap / cov_frobenius). Accuracy is reported over the x% least uncertain pairs for
x = 10..100 (ties in uncertainty keep file order), and a reliability table bins pairs by
|margin| into equal-count bins and compares accuracy with the Bradley-Terry probability
sigmoid(|margin|) the reward model implies.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from urm_jax.checkpoint import weights_fingerprint
from urm_jax.compile_cache import CompileMeter, CompileTotals
from urm_jax.io_utils import atomic_dir, check_outputs
from urm_jax.scoring import UNCERTAINTY_MEASURES, Ensemble, EnsembleScores, Scores, least_uncertain
from urm_jax.jsonl import BadLines, chunked, count_lines, dumps, iter_jsonl

SECTIONS: dict[str, tuple[str, ...]] = {
    "Chat": ("alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy",
             "mt-bench-med"),
    "Chat Hard": ("mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor",
                  "llmbar-adver-GPTInst", "llmbar-adver-GPTOut", "llmbar-adver-manual"),
    "Safety": ("refusals-dangerous", "refusals-offensive", "xstest-should-refuse",
               "xstest-should-respond", "donotanswer"),
    "Reasoning": ("math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"),
}
# RewardBench v1's EXAMPLE_COUNTS (rewardbench/constants.py): the filtered subset sizes, except
# math-prm, whose 447 pairs are counted as 984 to weigh as much as the 6 x 164 code pairs.
EXAMPLE_COUNTS: dict[str, int] = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28,
    "mt-bench-med": 40, "mt-bench-hard": 37, "llmbar-natural": 100, "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46,
    "refusals-dangerous": 100, "refusals-offensive": 100, "xstest-should-refuse": 154,
    "xstest-should-respond": 250, "donotanswer": 136, "math-prm": 984, "hep-cpp": 164,
    "hep-go": 164, "hep-java": 164, "hep-js": 164, "hep-python": 164, "hep-rust": 164,
}
SECTION_OF = {subset: section for section, subsets in SECTIONS.items() for subset in subsets}
OTHER = "Other"
DEFAULT_SUBSET = "default"
KEEP_PERCENTS = tuple(range(10, 101, 10))


def bundled_pairs_path() -> Path:
    """A small RewardBench-format pair file shipped with the package (24 pairs, all 4 sections),
    so `urm-jax eval` runs in the demo; written for this project, not taken from RewardBench."""
    return Path(str(resources.files("urm_jax.data").joinpath("reward_pairs.jsonl")))


# --- parsing ----------------------------------------------------------------------------------


def _side(value: Any, prompt: Any, name: str) -> dict:
    """One side of a pair as a `render_ids` example."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        if isinstance(prompt, str):
            return {"prompt": prompt, "response": value}
        if isinstance(prompt, list):
            return {"messages": [*prompt, {"role": "assistant", "content": value}]}
        raise ValueError(f"'{name}' is a string, so 'prompt' must be a string or a list of messages"
                         f"{'' if prompt is None else f', got {type(prompt).__name__}'}")
    if isinstance(value, list):
        starts_with_reply = bool(value) and isinstance(value[0], dict) and value[0].get("role") == "assistant"
        if starts_with_reply:
            if not isinstance(prompt, list):
                raise ValueError(f"'{name}' starts with an assistant turn, so 'prompt' must be a "
                                 "list of messages")
            return {"messages": [*prompt, *value]}
        return {"messages": value}
    raise ValueError(f"'{name}' must be a string, a list of messages or an object, "
                     f"got {type(value).__name__}")


def parse_pair(obj: Any) -> tuple[Any, str, dict, dict]:
    """(id or None, subset, chosen example, rejected example); ValueError for a bad pair."""
    if not isinstance(obj, dict):
        raise ValueError(f"a pair must be a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in obj]
    if missing:
        raise ValueError(f"pair has no {' or '.join(repr(k) for k in missing)} (keys: {sorted(obj)})")
    subset = obj.get("subset", DEFAULT_SUBSET)
    if not isinstance(subset, str) or not subset:
        raise ValueError(f"'subset' must be a non-empty string, got {subset!r}")
    prompt = obj.get("prompt")
    return (obj.get("id"), subset, _side(obj["chosen"], prompt, "chosen"),
            _side(obj["rejected"], prompt, "rejected"))


# --- metrics (pure NumPy) ---------------------------------------------------------------------


def subset_accuracies(subsets: list[str], correct: np.ndarray) -> dict[str, dict]:
    """Per subset name: {'section' (RewardBench section, or 'Other'), 'pairs', 'correct', 'accuracy',
    'weight' (RewardBench's example count, None outside it)}; `correct` [N] bool per pair."""
    out: dict[str, dict] = {}
    for name in sorted(set(subsets)):
        mask = np.array([s == name for s in subsets])
        n, c = int(mask.sum()), int(correct[mask].sum())
        out[name] = {"section": SECTION_OF.get(name, OTHER), "pairs": n, "correct": c,
                     "accuracy": c / n, "weight": EXAMPLE_COUNTS.get(name)}
    return out


def rewardbench_scores(per_subset: dict[str, dict]) -> dict:
    """Section scores (EXAMPLE_COUNTS-weighted subset accuracies) and their mean."""
    sections: dict[str, dict] = {}
    for section, names in SECTIONS.items():
        present = [n for n in names if n in per_subset]
        total = sum(EXAMPLE_COUNTS[n] for n in present)
        score = sum(per_subset[n]["accuracy"] * EXAMPLE_COUNTS[n] for n in present) / total if present else None
        sections[section] = {"score": score, "subsets": present,
                             "missing_subsets": [n for n in names if n not in present]}
    scored = [s["score"] for s in sections.values() if s["score"] is not None]
    other = {n: v for n, v in per_subset.items() if v["section"] == OTHER}
    other_pairs = sum(v["pairs"] for v in other.values())
    return {
        "score": float(np.mean(scored)) if scored else None,
        "complete": len(scored) == len(SECTIONS),
        "missing_sections": [n for n, s in sections.items() if s["score"] is None],
        "sections": sections,
        "other": {"subsets": sorted(other), "pairs": other_pairs,
                  "accuracy": (sum(v["correct"] for v in other.values()) / other_pairs) if other_pairs else None},
    }


def uncertainty_filter(correct: np.ndarray, uncertainty: np.ndarray,
                       percents=KEEP_PERCENTS) -> list[dict]:
    """Accuracy over the x% least uncertain pairs (at least one pair; stable on ties)."""
    out = []
    for p in percents:
        kept = least_uncertain(uncertainty, p / 100)
        out.append({"keep_percent": p, "pairs": len(kept), "accuracy": float(correct[kept].mean()),
                    "max_uncertainty": float(uncertainty[kept].max())})
    return out


def reliability(margin: np.ndarray, bins: int = 10) -> dict:
    """Accuracy against the Bradley-Terry confidence sigmoid(|margin|), in equal-count bins of
    |margin|. A pair is right when margin > 0 (ties are wrong, as in the accuracy)."""
    absm = np.abs(margin)
    order = np.argsort(absm, kind="stable")
    rows, ece = [], 0.0
    for idx in np.array_split(order, min(bins, len(order))):
        conf = float(np.mean(1.0 / (1.0 + np.exp(-absm[idx]))))
        acc = float(np.mean(margin[idx] > 0))
        ece += len(idx) / len(order) * abs(acc - conf)
        rows.append({"pairs": len(idx), "abs_margin_min": float(absm[idx].min()),
                     "abs_margin_max": float(absm[idx].max()),
                     "abs_margin_mean": float(absm[idx].mean()), "confidence": conf, "accuracy": acc})
    return {"bins": rows, "ece": ece}


def compute_metrics(subsets: list[str], reward_chosen, reward_rejected, uncertainty,
                    *, bins: int = 10) -> dict:
    """Every eval metric from per-pair rewards [N] (chosen, rejected) and uncertainty [N]: accuracy
    (a pair is right when chosen > rejected; ties count as wrong, as RewardBench), tie count,
    RewardBench section scores (Lambert et al. 2024, EXAMPLE_COUNTS-weighted), per-subset accuracies,
    accuracy of the least-uncertain x% (`uncertainty_filter`) and margin reliability in `bins`
    equal-count bins with its ECE. Computed in float64."""
    rc, rr = np.asarray(reward_chosen, np.float64), np.asarray(reward_rejected, np.float64)
    margin = rc - rr
    correct = margin > 0  # strict, as RewardBench: a tie is not a win
    per_subset = subset_accuracies(subsets, correct)
    return {
        "pairs": int(len(margin)), "accuracy": float(correct.mean()), "ties": int(np.sum(margin == 0)),
        "rewardbench": rewardbench_scores(per_subset), "subsets": per_subset,
        "uncertainty_filter": uncertainty_filter(correct, np.asarray(uncertainty, np.float64)),
        "reliability": reliability(margin, bins),
    }


# --- running ----------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalRun:
    """The result of `run_eval`: the `metrics` dict (as written to metrics.json), the skipped bad
    lines, the output directory, wall `seconds` and the compile totals within them."""
    metrics: dict
    skipped: BadLines
    out_dir: Path
    seconds: float
    compile: CompileTotals = dataclasses.field(default_factory=CompileTotals)  # within `seconds`


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("drawing the eval plots needs matplotlib: pip install matplotlib") from None


def run_eval(ensemble: Ensemble, pairs_path, out_dir, *, measure: str = "aleatoric",
             chunk_size: int = 256, on_bad_line: str = "error", bins: int = 10,
             overwrite: bool = False, progress: bool = True, meta: dict | None = None) -> EvalRun:
    """Score every pair (streamed in chunks of `chunk_size` pairs) and write
    ``out_dir/{metrics.json, pairs.jsonl, uncertainty_filter.png, reliability.png}``, atomically."""
    if measure not in UNCERTAINTY_MEASURES:
        raise ValueError(f"uncertainty measure must be one of {UNCERTAINTY_MEASURES}, got {measure!r}")
    if measure == "reward_gap" and len(ensemble) == 1:
        raise ValueError("uncertainty 'reward_gap' needs an ensemble (give --model several times)")
    if bins < 1 or chunk_size < 1:
        raise ValueError("bins and chunk_size must be at least 1")
    check_outputs([("--pairs", pairs_path)], [("--output-dir", out_dir, "dir")], overwrite=overwrite)
    _require_matplotlib()
    started = time.perf_counter()
    bad = BadLines(str(pairs_path))

    def parse(obj):
        pair_id, subset, chosen, rejected = parse_pair(obj)
        sides = []
        for name, example in (("chosen", chosen), ("rejected", rejected)):
            try:
                sides.append(ensemble.encode_with_info(example))
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
        return pair_id, subset, sides[0], sides[1]

    def rows(chunk):  # the chosen sides, then the rejected ones
        return ([c[2][0] for _, c in chunk] + [c[3][0] for _, c in chunk],
                [c[2][1] for _, c in chunk] + [c[3][1] for _, c in chunk])

    cols: dict[str, list] = {k: [] for k in ("subset", "rc", "rr", "uc", "ur")}
    seen_bad = 0
    total = count_lines(pairs_path) if progress else None
    chunks = chunked(iter_jsonl(pairs_path, parse, on_bad_line=on_bad_line, bad=bad), chunk_size)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp, open(tmp / "pairs.jsonl", "w") as out, \
            CompileMeter() as meter, tqdm(total=total, desc="eval", unit="pair", file=sys.stderr, disable=not progress) as bar:
        for chunk, scores in ensemble.score_chunks(chunks, rows):
            k = len(chunk)
            # every statistic is per row, so the halves of the chunk's scores are the sides'
            reward, unc = np.asarray(scores.reward), scores.measure(measure)
            rc, rr, uc, ur = reward[:k], reward[k:], unc[:k], unc[k:]
            for i, (line, (pair_id, subset, (_, tc), (_, tr))) in enumerate(chunk):
                rec = {"line": line, **({} if pair_id is None else {"id": pair_id}), "subset": subset,
                       "section": SECTION_OF.get(subset, OTHER),
                       "reward_chosen": float(rc[i]), "reward_rejected": float(rr[i]),
                       "margin": float(rc[i]) - float(rr[i]), "correct": bool(rc[i] > rr[i]),
                       "uncertainty_chosen": float(uc[i]), "uncertainty_rejected": float(ur[i]),
                       "uncertainty": float(uc[i] + ur[i]), "truncated": bool(tc or tr)}
                out.write(dumps(rec) + "\n")
                cols["subset"].append(subset)
            cols["rc"].append(np.asarray(rc, np.float64))
            cols["rr"].append(np.asarray(rr, np.float64))
            cols["uc"].append(uc)
            cols["ur"].append(ur)
            bar.update(k + len(bad) - seen_bad)  # skipped lines are progress too
            seen_bad = len(bad)
        out.flush()

        rc, rr = np.concatenate(cols["rc"]), np.concatenate(cols["rr"])
        unc = np.concatenate(cols["uc"]) + np.concatenate(cols["ur"])
        metrics = compute_metrics(cols["subset"], rc, rr, unc, bins=bins)
        metrics = {**(meta or {}), "pairs_file": str(pairs_path), "skipped_lines": len(bad),
                   # what identifies each member (to_hf --eval checks these against the
                   # checkpoint it exports): its path, its weights' fingerprint, and its
                   # attribute set (what its means, log-stds and gate are over)
                   "models": [str(Path(s.path).absolute()) for s in ensemble.scorers],
                   "weights_sha256": [weights_fingerprint(s.path) for s in ensemble.scorers],
                   "attributes": [list(s.cfg.attributes) for s in ensemble.scorers],
                   "uncertainty_measure": measure, "pair_uncertainty": "chosen + rejected", **metrics}
        (tmp / "metrics.json").write_text(dumps(metrics, indent=2) + "\n")
        if len(bad):
            bad.write(tmp / "skipped_lines.jsonl")
        plot_uncertainty_filter(metrics, tmp / "uncertainty_filter.png")
        plot_reliability(metrics, tmp / "reliability.png")
    return EvalRun(metrics, bad, Path(out_dir), time.perf_counter() - started, meter.totals)


# --- plots (matplotlib's object API: no global pyplot state, no display needed) ---------------


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def plot_uncertainty_filter(metrics: dict, path: Path) -> None:
    """Write the accuracy vs least-uncertain-x% plot of `metrics` as a PNG at `path`."""
    fig, ax = _figure()
    pts = metrics["uncertainty_filter"]
    ax.plot([p["keep_percent"] for p in pts], [100 * p["accuracy"] for p in pts], "o-", color="C0")
    ax.axhline(100 * metrics["accuracy"], color="0.5", ls="--", lw=1, label="all pairs")
    ax.set_xlabel(f"pairs kept: the x% least uncertain ({metrics['uncertainty_measure']})")
    ax.set_ylabel("accuracy (%)")
    ax.set_xticks(list(KEEP_PERCENTS))
    ax.set_title(f"Accuracy vs uncertainty filtering ({metrics['pairs']} pairs)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path)


def plot_reliability(metrics: dict, path: Path) -> None:
    """Write the reliability plot of `metrics` (bin accuracy vs sigmoid(|margin|), with the ECE) as a
    PNG at `path`."""
    fig, ax = _figure()
    rows = metrics["reliability"]["bins"]
    x = [r["abs_margin_mean"] for r in rows]
    ax.plot(x, [100 * r["accuracy"] for r in rows], "o-", color="C0", label="observed accuracy")
    grid = np.linspace(0, max(x) if x and max(x) > 0 else 1.0, 100)
    ax.plot(grid, 100 / (1 + np.exp(-grid)), color="C1", lw=1, label="sigmoid(|margin|)")
    for r, xi in zip(rows, x):
        ax.annotate(str(r["pairs"]), (xi, 100 * r["accuracy"]), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize=7, color="0.4")
    ax.set_xlabel("|reward margin| (bin mean)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-5, 105)
    ax.set_title(f"Reliability: margin vs accuracy (ECE {metrics['reliability']['ece']:.3f})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def format_summary(run: EvalRun) -> str:
    """The lines `urm-jax eval` prints: pairs and accuracy, RewardBench sections and score, Other
    subsets, accuracy of the least uncertain x%, ECE, and where the outputs went."""
    m = run.metrics
    rb = m["rewardbench"]
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = [f"{m['pairs']} pairs ({m['skipped_lines']} skipped), accuracy {pct(m['accuracy'])}% "
             f"({m['ties']} ties count as wrong)"]
    sec = " | ".join(f"{name} {pct(s['score'])}" for name, s in rb["sections"].items())
    lines.append(f"RewardBench: {sec} | Score {pct(rb['score'])}"
                 + ("" if rb["complete"] else f" (over present sections; missing: {', '.join(rb['missing_sections'])})"))
    if rb["other"]["pairs"]:
        lines.append(f"Other ({', '.join(rb['other']['subsets'])}): {rb['other']['pairs']} pairs, "
                     f"accuracy {pct(rb['other']['accuracy'])}% (not in the score)")
    lines.append("least-uncertain x%: " + " ".join(
        f"{p['keep_percent']}%:{pct(p['accuracy'])}" for p in m["uncertainty_filter"]))
    lines.append(f"reliability: ECE {m['reliability']['ece']:.3f} over {len(m['reliability']['bins'])} bins")
    lines.append(f"-> {run.out_dir}/ (metrics.json, pairs.jsonl, uncertainty_filter.png, reliability.png)"
                 f" in {run.seconds:.1f} s ({run.compile.describe()})")
    return "\n".join(lines)


__all__ = ["SECTIONS", "EXAMPLE_COUNTS", "parse_pair", "compute_metrics", "rewardbench_scores",
           "uncertainty_filter", "reliability", "run_eval", "bundled_pairs_path", "format_summary",
           "Scores", "EnsembleScores"]
