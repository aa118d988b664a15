"""Reports from evaluation results: `report.md`, a self-contained `report.html` (plots inlined as base64 PNG) and
the plots as PNG files, all written from the results dict (results.json) alone.

    write_report(results, "outputs/demo/report")      # -> {"md": ..., "html": ..., "plots": [...]}

Sections: Models, Scores (one table of models x metrics, each cell with its delta against the baseline and the
full fine-tune; general-suite drops beyond the threshold flagged), Forgetting, Preference, Win rate, Plots
(general suite per model, training curves of each stage from its trainer_state.json log_history).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os

FLAG = "⚠"
_SKIP_LOG_KEYS = ("epoch", "step", "total_flos", "train_runtime", "train_samples_per_second",
                  "train_steps_per_second", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second")


# ------------------------------------------------------------------------------------------------ training logs


def kind_label(model: dict) -> str:
    """`base`, `adapter`, ...; `base (4bit)` for a plain model loaded quantized."""
    return model["kind"] + (f" ({model['quantization']})" if model.get("quantization") else "")


def _latest_state(path: str) -> str | None:
    state = os.path.join(path, "trainer_state.json")
    if os.path.isfile(state):
        return state
    checkpoints = [d for d in os.listdir(path) if d.startswith("checkpoint-") and d[11:].isdigit()] if os.path.isdir(
        path) else []
    for d in sorted(checkpoints, key=lambda d: int(d[11:]), reverse=True):
        state = os.path.join(path, d, "trainer_state.json")
        if os.path.isfile(state):
            return state
    return None


def read_training_log(path: str) -> dict | None:
    """{"stage", "log_history": [{"step", <numeric metrics>}]} from a stage's trainer_state.json (or its latest
    checkpoint's); None where there is none (a base model)."""
    state_path = _latest_state(path)
    if state_path is None:
        return None
    with open(state_path) as fh:
        history = json.load(fh).get("log_history") or []
    rows = []
    for entry in history:
        row = {k: v for k, v in entry.items() if k not in _SKIP_LOG_KEYS and isinstance(v, (int, float))
               and not isinstance(v, bool) and math.isfinite(v)}
        if row and "step" in entry:
            rows.append({"step": entry["step"], **row})
    stage = None
    run_path = os.path.join(path, "run.json")
    if os.path.isfile(run_path):
        with open(run_path) as fh:
            stage = json.load(fh).get("stage")
    return {"stage": stage, "source": state_path, "log_history": rows}


# ----------------------------------------------------------------------------------------------------- columns


def _task_columns(results: dict) -> list[dict]:
    """One column per suite task: its headline metric, and whether forgetting checks count it."""
    suite = results.get("suite") or {}
    return [{"key": t["name"], "label": f"{t['name']} ({t['metric']})", "metric": t["metric"],
             "general": t["general"] and t["metric"] not in ("perplexity", "bits_per_byte"),
             "higher": t["metric"] not in ("perplexity", "bits_per_byte")} for t in suite.get("tasks", [])]


def _general_average(results: dict, model: str) -> float | None:
    values = [results["scores"][model][c["key"]][c["metric"]] for c in _task_columns(results)
              if c["general"] and c["key"] in results["scores"].get(model, {})
              and c["metric"] in results["scores"][model][c["key"]]]
    return sum(values) / len(values) if values else None


def table_rows(results: dict) -> tuple[list[str], list[dict]]:
    """Header labels and, per model, {"model", "kind", "cells": [{"value", "d_base", "d_full", "flag"}]}."""
    columns = _task_columns(results)
    models = list(results["models"])
    base, full = results.get("baseline"), results.get("full")
    threshold = results.get("forgetting_threshold", 0.02)

    def value(model: str, column: str):
        if column == "general_avg":
            return _general_average(results, model) if model in results["scores"] else None
        if column == "preference":
            p = results["preference"].get(model) or {}
            return p.get("implicit_reward_accuracy", p.get("pairwise_accuracy"))
        if column == "win_rate":
            return (results["win_rate"].get(model) or {}).get("win_rate")
        task = next(c for c in columns if c["key"] == column)
        return ((results["scores"].get(model) or {}).get(column) or {}).get(task["metric"])

    keys = [c["key"] for c in columns]
    labels = [c["label"] for c in columns]
    if any(c["general"] for c in columns):
        keys.append("general_avg"), labels.append("general avg")
    if results["preference"]:
        keys.append("preference"), labels.append("pref. acc")
    if results["win_rate"]:
        keys.append("win_rate"), labels.append(f"win rate vs {base}")
    general_keys = {c["key"] for c in columns if c["general"]} | {"general_avg"}
    rows = []
    for model in models:
        cells = []
        for key in keys:
            v = value(model, key)
            b = value(base, key) if base and base != model else None
            f = value(full, key) if full and full != model else None
            d_base = v - b if v is not None and b is not None else None
            d_full = v - f if v is not None and f is not None else None
            flag = key in general_keys and d_base is not None and -d_base > threshold
            cells.append({"key": key, "value": v, "d_base": d_base, "d_full": d_full, "flag": flag})
        rows.append({"model": model, "kind": kind_label(results["models"][model]), "cells": cells})
    return labels, rows


def _fmt(v, signed: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan"
    if abs(v) >= 100:
        return f"{v:+.1f}" if signed else f"{v:.1f}"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def _delta_text(cell: dict) -> str:
    parts = []
    if cell["d_base"] is not None:
        parts.append(f"Δbase {_fmt(cell['d_base'], True)}")
    if cell["d_full"] is not None:
        parts.append(f"Δfull {_fmt(cell['d_full'], True)}")
    return ", ".join(parts)


# -------------------------------------------------------------------------------------------------------- plots


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def plot_scores(results: dict) -> bytes | None:
    """Grouped bars: headline metric of each general task per model, with standard errors."""
    columns = [c for c in _task_columns(results) if c["general"]]
    models = [m for m in results["models"] if m in results["scores"]]
    if not columns or not models:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(columns) * max(1, len(models)) / 2), 3.6))
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        scores = results["scores"][model]
        ys = [(scores.get(c["key"]) or {}).get(c["metric"], float("nan")) for c in columns]
        errs = [(scores.get(c["key"]) or {}).get(f"{c['metric']}_stderr", 0.0) for c in columns]
        ax.bar([j + i * width for j in range(len(columns))], ys, width, yerr=errs, label=model, capsize=2)
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(columns))])
    ax.set_xticklabels([c["key"] for c in columns], rotation=30, ha="right")
    ax.set_ylabel("score")
    ax.set_title("General suite (headline metric, ± standard error)")
    ax.legend(fontsize="small")
    return _png(fig)


def _is_loss(key: str) -> bool:
    return key.endswith("loss")


def plot_training(name: str, log: dict) -> bytes | None:
    """Losses (train and eval) and, where logged, reward / accuracy curves of one stage against the step."""
    rows = log.get("log_history") or []
    keys = sorted({k for r in rows for k in r if k != "step" and k not in ("learning_rate", "grad_norm")})
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [[k for k in keys if _is_loss(k)], [k for k in keys if not _is_loss(k)]]
    groups = [g for g in groups if g]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 3.2), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for key in group[:8]:
            points = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 20 else None,
                    markersize=3, label=key)
        ax.set_xlabel("step")
        ax.legend(fontsize="x-small")
    fig.suptitle(f"{name} ({log.get('stage') or 'training'})")
    return _png(fig)


def make_plots(results: dict) -> list[tuple[str, str, bytes]]:
    """[(file name, title, png bytes)]."""
    plots = []
    scores = plot_scores(results)
    if scores:
        plots.append(("general_suite.png", "General suite", scores))
    for name, log in (results.get("training") or {}).items():
        png = plot_training(name, log)
        if png:
            plots.append((f"training_{name}.png", f"Training curves: {name}", png))
    return plots


# ------------------------------------------------------------------------------------------------------ sections


def _header_lines(results: dict) -> list[str]:
    suite = results.get("suite") or {}
    lines = [f"Created {results.get('created', '')}."]
    if suite:
        lines.append(f"Suite `{suite.get('name')}` ({suite.get('path')}), {len(suite.get('tasks', []))} tasks.")
    lines.append(f"Baseline for deltas: `{results.get('baseline')}`"
                 + (f"; full fine-tune: `{results['full']}`." if results.get("full") else "; no full fine-tune."))
    lines.append(f"{FLAG} marks a general-suite drop of more than {results.get('forgetting_threshold', 0.02):g} "
                 "against the baseline.")
    limit = (results.get("settings") or {}).get("limit")
    if limit:
        lines.append(f"At most {limit} examples per task (`--limit`): one example moves a task's score by "
                     f"{1 / limit:.3f}; each score's standard error is in results.json.")
    return lines


def average_drop_stderr(results: dict, name: str, tasks) -> float | None:
    """Standard error of `name`'s average general-suite drop against the baseline: the per-task standard errors of
    both models combined as independent (an upper bound: both saw the same examples); None when one is missing."""
    metric = {t["name"]: t.get("metric") for t in (results.get("suite") or {}).get("tasks", [])}
    scores = results.get("scores") or {}
    variance = 0.0
    for task in tasks:
        for model in (results.get("baseline"), name):
            se = ((scores.get(model) or {}).get(task) or {}).get(f"{metric.get(task)}_stderr")
            if se is None:
                return None
            variance += float(se) ** 2
    return math.sqrt(variance) / len(tasks) if tasks else None


def _forgetting_lines(results: dict) -> list[str]:
    out = []
    for name, f in (results.get("forgetting") or {}).items():
        verdict = f"{FLAG} exceeds" if f["exceeded"] else "within"
        se = average_drop_stderr(results, name, list(f["drops"]))
        noise = ""
        if se is not None:
            noise = f"; standard error {se:.3f}"
            if abs(f["average_drop"]) < 2 * se:
                noise += ", so within noise of no change (more examples per task would tell)"
        out.append(f"`{name}`: average drop {_fmt(f['average_drop'], True)} over {len(f['drops'])} general tasks "
                   f"({verdict} the threshold {f['threshold']:g}){noise}; largest drop: {f['worst_task']} "
                   f"({_fmt(f['drops'][f['worst_task']], True)})")
    return out


def _accuracy_stderr(accuracy: float, n: int) -> str:
    """The binomial standard error of an accuracy over `n` pairs, as report text."""
    return f"standard error {math.sqrt(accuracy * (1 - accuracy) / n):.3f}" if n else ""


def _preference_rows(results: dict) -> list[list[str]]:
    rows = []
    for name, p in (results.get("preference") or {}).items():
        if "implicit_reward_accuracy" in p:
            acc = p["implicit_reward_accuracy"]
            details = [_accuracy_stderr(acc, p["n"]), f"margin {_fmt(p['reward_margin'], True)}",
                       f"beta {p['beta']:g}", f"reference {p['reference']}"]
            rows.append([name, "implicit reward accuracy (DPO)", _fmt(acc), str(p["n"]), ", ".join(filter(None, details))])
        else:
            acc = p["pairwise_accuracy"]
            rows.append([name, "pairwise accuracy (reward model)", _fmt(acc), str(p["n"]),
                         _accuracy_stderr(acc, p["n"])])
    return rows


def _win_rows(results: dict) -> list[list[str]]:
    return [[name, _fmt(w["win_rate"]), str(w["n"]), _fmt(w["reward"]), _fmt(w["baseline_reward"]), w["baseline"]]
            for name, w in (results.get("win_rate") or {}).items()]


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header)] + [line(r) for r in rows]


def _models_rows(results: dict) -> list[list[str]]:
    return [[name, kind_label(m), m.get("stage") or "", m["path"], m.get("base") or ""]
            for name, m in results["models"].items()]


def render_markdown(results: dict, plot_files: list[tuple[str, str]]) -> str:
    labels, rows = table_rows(results)
    md = ["# Evaluation report", "", *_header_lines(results), "", "## Models", ""]
    md += _md_table(["model", "kind", "stage", "path", "base"], _models_rows(results))
    md += ["", "## Scores", ""]
    cells = []
    for r in rows:
        out = [r["model"], r["kind"]]
        for c in r["cells"]:
            text = _fmt(c["value"])
            delta = _delta_text(c)
            text += f" ({delta})" if delta else ""
            out.append(f"**{text}** {FLAG}" if c["flag"] else text)
        cells.append(out)
    md += _md_table(["model", "kind"] + labels, cells)
    md += ["", "## Forgetting", ""]
    md += [f"- {line}" for line in _forgetting_lines(results)] or ["No tuned model was compared with the baseline."]
    md += ["", "## Preference", ""]
    pref = _preference_rows(results)
    md += _md_table(["model", "metric", "value", "pairs", "details"], pref) if pref else [
        "No preference evaluation (give --preference_data; DPO adapters and reward models are scored)."]
    md += ["", "## Win rate", ""]
    wins = _win_rows(results)
    md += _md_table(["model", "win rate", "prompts", "mean reward", "baseline reward", "baseline"], wins) if wins else [
        "No win rate (give --reward_model and --preference_data)."]
    md += ["", "## Plots", ""]
    md += [f"### {title}\n\n![{title}]({path})\n" for path, title in plot_files] or ["No plots."]
    return "\n".join(md) + "\n"


def _html_table(header: list[str], rows: list[list[str]], raw: bool = False) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if raw else html.escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f3f3f3}
td.forget{background:#fbd5d5;font-weight:bold}.delta{color:#555;font-size:85%}img{max-width:100%}"""


def render_html(results: dict, plots: list[tuple[str, str, bytes]]) -> str:
    labels, rows = table_rows(results)
    e = html.escape
    parts = [(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Evaluation report</title>"
              f"<style>{_CSS}</style></head><body><h1>Evaluation report</h1>")]
    parts += [f"<p>{e(line)}</p>" for line in _header_lines(results)]
    parts.append("<h2>Models</h2>" + _html_table(["model", "kind", "stage", "path", "base"], _models_rows(results)))
    body = []
    for r in rows:
        tds = [f"<td>{e(r['model'])}</td><td>{e(r['kind'])}</td>"]
        for c in r["cells"]:
            delta = _delta_text(c)
            cls = " class='forget'" if c["flag"] else ""
            flag = f" {FLAG}" if c["flag"] else ""
            tds.append(f"<td{cls}>{e(_fmt(c['value']))}{flag}"
                       + (f"<br><span class='delta'>{e(delta)}</span>" if delta else "") + "</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    head = "".join(f"<th>{e(h)}</th>" for h in ["model", "kind"] + labels)
    parts.append(f"<h2>Scores</h2><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
    forgetting = _forgetting_lines(results)
    parts.append("<h2>Forgetting</h2>" + ("<ul>" + "".join(f"<li>{e(x)}</li>" for x in forgetting) + "</ul>"
                                          if forgetting else "<p>No tuned model was compared with the baseline.</p>"))
    pref = _preference_rows(results)
    parts.append("<h2>Preference</h2>" + (_html_table(["model", "metric", "value", "pairs", "details"], pref)
                                          if pref else "<p>No preference evaluation.</p>"))
    wins = _win_rows(results)
    parts.append("<h2>Win rate</h2>" + (
        _html_table(["model", "win rate", "prompts", "mean reward", "baseline reward", "baseline"], wins)
        if wins else "<p>No win rate.</p>"))
    parts.append("<h2>Plots</h2>")
    for _, title, png in plots:
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<h3>{e(title)}</h3><img alt='{e(title)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(results: dict, output_dir: str) -> dict:
    """Write report.md, report.html and plots/*.png to `output_dir`; returns their paths."""
    os.makedirs(os.path.join(output_dir, "plots"), exist_ok=True)
    plots = make_plots(results)
    files = []
    for name, _, png in plots:
        path = os.path.join(output_dir, "plots", name)
        with open(path, "wb") as fh:
            fh.write(png)
        files.append(path)
    md_path, html_path = os.path.join(output_dir, "report.md"), os.path.join(output_dir, "report.html")
    with open(md_path, "w", encoding="utf-8") as fh:
        fh.write(render_markdown(results, [(f"plots/{n}", t) for n, t, _ in plots]))
    with open(html_path, "w", encoding="utf-8") as fh:
        fh.write(render_html(results, plots))
    return {"md": md_path, "html": html_path, "plots": files}
