"""A finished sweep's outputs: the table of every trial (Parquet and markdown), the best config
as ready-to-run YAML, and plots (PNG, drawn with PIL): the metric against each swept key, and
the learning curves of the best trials."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image, ImageDraw


@dataclass
class TrialRow:
    trial_id: str
    status: str                       # finished | error
    params: dict[str, Any]
    last: float | None                # the metric at the trial's last report
    best: float | None                # its best over the reports (in the sweep's mode)
    steps: int | None
    seconds: float | None
    run: str                          # the trial's run directory (display URI)
    error: str = ""
    curve: list[tuple[int, float]] = field(default_factory=list)   # (step, metric)


def best_trial(rows: list[TrialRow], mode: str) -> TrialRow | None:
    scored = [r for r in rows if r.best is not None and math.isfinite(r.best)]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r.best)


def table_bytes(rows: list[TrialRow], keys: list[str], metric: str) -> bytes:
    """The trials as Parquet: one column per swept key, then the outcome."""
    columns: dict[str, list] = {"trial_id": [r.trial_id for r in rows],
                                "status": [r.status for r in rows]}
    for key in keys:
        columns[key] = [str(r.params.get(key)) for r in rows]
    columns |= {f"{metric} (last)": [r.last for r in rows],
                f"{metric} (best)": [r.best for r in rows],
                "steps": [r.steps for r in rows], "seconds": [r.seconds for r in rows],
                "run": [r.run for r in rows], "error": [r.error for r in rows]}
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return buffer.getvalue()


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(rows: list[TrialRow], keys: list[str], metric: str, mode: str) -> str:
    """The trials, best first, as a markdown table."""
    sign = -1 if mode == "max" else 1
    order = sorted(rows, key=lambda r: (r.best is None, sign * (r.best or 0.0)))
    lines = ["| trial | status | " + " | ".join(keys) + f" | {metric} best | {metric} last | "
             "steps | seconds | run |", "|" + "---|" * (len(keys) + 7)]
    for r in order:
        lines.append(f"| {r.trial_id} | {r.status}{': ' + r.error[:60] if r.error else ''} | "
                     + " | ".join(_fmt(r.params.get(k)) for k in keys)
                     + f" | {_fmt(r.best)} | {_fmt(r.last)} | {_fmt(r.steps)} | "
                     f"{_fmt(None if r.seconds is None else round(r.seconds, 1))} | {r.run} |")
    return "\n".join(lines) + "\n"


def nested(dotted: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


def best_yaml(base: dict[str, Any], best: TrialRow, job: str, metric: str, sweep: str) -> str:
    """The sweep's base settings of the job with the best trial's values: `partlift JOB -c`."""
    header = (f"# best trial {best.trial_id} of sweep {sweep}: {metric} = {_fmt(best.best)}\n"
              f"# partlift {job} -c this-file --name NAME\n")
    values = {k: (v.item() if hasattr(v, "item") else v) for k, v in best.params.items()}
    return header + yaml.safe_dump(merge(base, nested(values)), sort_keys=True)


# ------------------------------------------------------------------------------ plots

W, H, PAD = 320, 220, 36
COLOURS = [(214, 39, 40), (31, 119, 180), (44, 160, 44), (255, 127, 14), (148, 103, 189)]


def _axes(draw: ImageDraw.ImageDraw, x0: int, title: str, xlabel: str, ylabel: str) -> None:
    draw.rectangle([x0 + PAD, PAD, x0 + W - 8, H - PAD], outline=(0, 0, 0))
    draw.text((x0 + PAD, 6), title, fill=(0, 0, 0))
    draw.text((x0 + PAD, H - PAD + 14), xlabel, fill=(0, 0, 0))
    draw.text((x0 + 2, PAD - 14), ylabel, fill=(0, 0, 0))


def _scale(values: list[float], log: bool = False) -> tuple[float, float]:
    v = [math.log10(x) if log else x for x in values]
    low, high = min(v), max(v)
    return (low - 0.5, high + 0.5) if high - low < 1e-12 else (low, high)


def _to_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def metric_vs_params(rows: list[TrialRow], keys: list[str], metric: str,
                     log_keys: set[str]) -> bytes:
    """One panel per swept key: each finished trial's best metric against its value
    (categorical values at even spacing, log-scaled keys on a log axis)."""
    scored = [r for r in rows if r.best is not None and math.isfinite(r.best)]
    image = Image.new("RGB", (W * max(len(keys), 1), H), "white")
    draw = ImageDraw.Draw(image)
    if not scored:
        draw.text((10, H // 2), "no finished trial", fill=(0, 0, 0))
        return _to_png(image)
    y_low, y_high = _scale([r.best for r in scored])
    for i, key in enumerate(keys):
        x0 = i * W
        values = [r.params.get(key) for r in scored]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        log = key in log_keys and numeric
        _axes(draw, x0, f"{metric} vs {key}", key + (" (log)" if log else ""), metric)
        if numeric:
            x_low, x_high = _scale([float(v) for v in values], log)
            xs = [((math.log10(v) if log else v) - x_low) / (x_high - x_low) for v in values]
        else:
            labels = sorted({str(v) for v in values})
            xs = [(labels.index(str(v)) + 0.5) / len(labels) for v in values]
            for j, label in enumerate(labels):
                draw.text((x0 + PAD + (j + 0.5) / len(labels) * (W - PAD - 8) - 10, H - PAD + 2),
                          label[:12], fill=(80, 80, 80))
        for x, r in zip(xs, scored):
            px = x0 + PAD + x * (W - PAD - 8)
            py = H - PAD - (r.best - y_low) / (y_high - y_low) * (H - 2 * PAD)
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=COLOURS[0])
        draw.text((x0 + 2, PAD), f"{y_high:.3g}", fill=(80, 80, 80))
        draw.text((x0 + 2, H - PAD - 10), f"{y_low:.3g}", fill=(80, 80, 80))
    return _to_png(image)


def learning_curves(rows: list[TrialRow], metric: str, mode: str, top: int = 5) -> bytes:
    """The validation metric over steps of the `top` best trials."""
    best = [r for r in sorted(rows, key=lambda r: (r.best is None,
                                                   -(r.best or 0) if mode == "max" else
                                                   (r.best or 0)))
            if r.curve][:top]
    image = Image.new("RGB", (2 * W, H), "white")
    draw = ImageDraw.Draw(image)
    _axes(draw, 0, f"{metric} of the best trials", "step", metric)
    points = [p for r in best for p in r.curve]
    if not points:
        draw.text((PAD + 10, H // 2), "no validation yet", fill=(0, 0, 0))
        return _to_png(image)
    x_low, x_high = _scale([float(s) for s, _ in points])
    y_low, y_high = _scale([float(v) for _, v in points])
    for colour, r in zip(COLOURS, best):
        xy = [(PAD + (s - x_low) / (x_high - x_low) * (W - PAD - 8),
               H - PAD - (v - y_low) / (y_high - y_low) * (H - 2 * PAD)) for s, v in r.curve]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for px, py in xy:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        draw.text((W + 10, 20 + 14 * best.index(r)),
                  f"{r.trial_id}: {_fmt(r.best)}", fill=colour)
    return _to_png(image)
