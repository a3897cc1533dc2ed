"""The benchmark's outputs: the JSON of every row and a Markdown table, rewritten after each row."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def _fmt(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _sec(v) -> str:
    """Seconds with 3-4 significant digits and no exponent above 1 s."""
    if v is None or math.isnan(v):
        return "-"
    return f"{v:.0f}" if v >= 1000 else f"{v:.4g}"


def _rate(v) -> str:
    """A rate (images per hour) without exponent: whole numbers from 100 up, 3 significant digits below."""
    if v is None or math.isnan(v):
        return "-"
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def _batch(row: dict) -> int:
    return row.get("batch_size", 1)  # rows written before the batch axis: batch 1


def ratio_lines(rows: list[dict]) -> list[str]:
    """G2D2 peak memory / DPS peak memory, per precision, batch size and DPS prior."""
    ok = [r for r in rows if r["status"] == "ok" and r.get("peak_gpu_mib")]
    lines = []
    for g in (r for r in ok if r["solver"] == "g2d2"):
        same = (r for r in ok if r["solver"] == "dps" and (r["precision"], _batch(r)) == (g["precision"], _batch(g)))
        for d in same:
            ratio = g["peak_gpu_mib"] / d["peak_gpu_mib"]
            batch = "" if _batch(g) == 1 else f", batch {_batch(g)}"
            lines.append(
                f"G2D2 / DPS peak GPU memory ({g['precision']}{batch}, DPS on {d['prior'].split(':')[0]}): "
                f"{g['peak_gpu_mib']:.0f} / {d['peak_gpu_mib']:.0f} MiB = {ratio:.2f}"
            )
    return lines


def markdown(result: dict) -> str:
    """The table of `result` (meta + rows) with how it was measured and the G2D2 / DPS memory ratios."""
    meta = result["meta"]
    lines = [
        f"# Solver cost benchmark ({meta['scale']} scale)",
        "",
        f"Device: {meta['device_name']} | torch {meta['torch']} | diffusers {meta['diffusers']} | "
        f"transformers {meta['transformers']} | task {meta['task']} | "
        f"batch {', '.join(map(str, meta.get('batch_sizes', [1])))} | random weights | "
        f"TF32 matmul {meta['tf32_matmul']}, cuDNN {meta['tf32_cudnn']}",
        "",
        f"Timed {meta['measure_steps']} outer steps (G2D2) or {meta.get('measure_steps_pixel', '-')} (DPS, RED-Diff) "
        f"after {meta['warmup_steps']} warm-up, the device synchronised only at the two edges of the timed window "
        "(the solver runs asynchronously in between, as the bare prior does); batch = run.py's batch_size, "
        "images solved together (s/step and peak are per batch); s/image = s/step x steps / batch "
        "(extrapolated; loading, prompt encoding and the final decode excluded), images/h = 3600 / s/image. Peak = "
        "torch.cuda.max_memory_allocated over the solve, weights included. Bare prior: G2D2 = guided transformer "
        "pass + inner iters x relaxed decode fwd+bwd; DPS = UNet fwd+bwd w.r.t. x; RED-Diff = UNet fwd; mean of "
        f"{meta['bare_reps']} back-to-back calls (pixel priors: at least as many as their timed steps). "
        "overhead = s/step / bare prior s/step - 1. Host syncs/step: synchronising CUDA calls per timed step "
        "(torch.cuda.set_sync_debug_mode warnings in the timed window; CUDA only). "
        "Timed: outer steps timed (pinv: calls). Each row's solver, noise schedule and prior are composed from "
        "conf/ as `python scripts/run.py <the row's overrides>` composes them (JSON: overrides, config).",
        "",
        "| solver | prior shape | precision | batch | peak GPU MiB | s/step | steps | timed | s/image (extrap.) "
        "| images/h | bare prior s/step | overhead | host syncs/step | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        steps = r.get("num_steps", "-")
        if r.get("inner_iters"):
            steps = f"{steps} x {r['inner_iters']}"
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')[:100]}"
        if r.get("note") or r.get("bare_error"):
            status += f" ({r.get('note') or r.get('bare_error')})"
        overhead = None if r.get("overhead") is None else 100 * r["overhead"]
        lines.append(
            f"| {r['solver']} | {r['prior']} | {r['precision']} | {_batch(r)} | {_fmt(r.get('peak_gpu_mib'), '.0f')} "
            f"| {_sec(r.get('s_per_step'))} | {steps} | {r.get('steps_timed', '-')} | {_sec(r.get('s_per_image'))} "
            f"| {_rate(r.get('images_per_hour'))} "
            f"| {_sec(r.get('bare_s_per_step'))} | {_fmt(overhead, '+.1f')}{'' if overhead is None else ' %'} "
            f"| {_fmt(r.get('host_syncs_per_step'), '.4g')} | {status} |"
        )
    notes = list(result["ratios"])
    for r in result["rows"]:
        if r["solver"] == "g2d2" and "transformer_s" in r:
            notes.append(
                f"G2D2 bare prior ({r['precision']}, batch {_batch(r)}): guided transformer "
                f"{_sec(r['transformer_s'])} s + "
                f"{r['inner_iters']} x relaxed decode fwd+bwd {_sec(r['decode_fwd_bwd_s'])} s per step"
            )
    lines += [""] + [f"- {line}" for line in notes]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, json_path: str | Path, markdown_path: str | Path) -> None:
    """Rewrite the JSON (atomically) and the Markdown table with every row so far."""
    result["ratios"] = ratio_lines(result["rows"])
    out = Path(json_path)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    Path(markdown_path).write_text(markdown(result))
