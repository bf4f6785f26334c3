"""The Train page's live pictures as HTML: the loss curve (instance and prior terms, one point per logged step)
as an inline SVG, and the progress bar. Plain markup: nothing to install, and a browser test can count the
points. No Gradio here."""
from __future__ import annotations

import html
import math

W, H, PAD_L, PAD_R, PAD_T, PAD_B = 640, 240, 56, 12, 12, 28
SERIES = (("loss_instance", "instance", "#e8590c"), ("loss_prior", "prior", "#1c7ed6"))


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    return [lo + (hi - lo) * k / n for k in range(n + 1)]


def loss_svg(records: list[dict], max_steps: int | None = None) -> str:
    """An SVG of the logged losses; each point a <circle class="loss-point" data-series=...>."""
    pts = {key: [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))
                 and math.isfinite(r[key])] for key, _, _ in SERIES}
    every = [v for series in pts.values() for _, v in series]
    if not every:
        return ('<div class="loss-plot empty" style="padding:1em;color:#888">the loss curve appears here once the '
                'run logs its first step</div>')
    lo, hi = min(every), max(every)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * abs(lo or 1), hi + 0.5 * abs(hi or 1)
    last = max(s for series in pts.values() for s, _ in series)
    x_hi = max(max_steps or 0, last, 1)

    def x(step):
        return PAD_L + (W - PAD_L - PAD_R) * step / x_hi

    def y(v):
        return PAD_T + (H - PAD_T - PAD_B) * (hi - v) / (hi - lo)

    parts = [f'<svg class="loss-plot" viewBox="0 0 {W} {H}" width="100%" style="max-width:{W}px" '
             f'xmlns="http://www.w3.org/2000/svg" font-family="sans-serif" font-size="11">',
             f'<rect x="{PAD_L}" y="{PAD_T}" width="{W - PAD_L - PAD_R}" height="{H - PAD_T - PAD_B}" '
             f'fill="none" stroke="#ccc"/>']
    for v in _ticks(lo, hi):
        parts.append(f'<text x="{PAD_L - 4}" y="{y(v) + 4:.1f}" text-anchor="end" fill="#666">{v:.3g}</text>')
    for s in _ticks(0, x_hi):
        parts.append(f'<text x="{x(s):.1f}" y="{H - 8}" text-anchor="middle" fill="#666">{s:.0f}</text>')
    for key, label, colour in SERIES:
        series = pts[key]
        if not series:
            continue
        line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in series)
        parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        parts += [f'<circle class="loss-point" data-series="{label}" data-step="{s}" cx="{x(s):.1f}" '
                  f'cy="{y(v):.1f}" r="2" fill="{colour}"><title>step {s}: {label} {v:.4f}</title></circle>'
                  for s, v in series]
    legend = [(label, colour) for key, label, colour in SERIES if pts[key]]
    for k, (label, colour) in enumerate(legend):
        parts.append(f'<text x="{W - PAD_R - 6}" y="{PAD_T + 14 + 14 * k}" text-anchor="end" fill="{colour}">'
                     f'{label} loss</text>')
    parts.append("</svg>")
    return "".join(parts)


def progress_html(step: int, total: int | None, state: str) -> str:
    """A progress bar with 'step N of M' and the run's state (running, stopped, finished, failed)."""
    total = total or 0
    frac = min(1.0, step / total) if total else 0.0
    return (f'<div class="run-progress" data-step="{step}" data-total="{total}" data-state="{html.escape(state)}">'
            f'<progress value="{step}" max="{max(total, 1)}" style="width:100%;height:1.2em"></progress>'
            f'<div>step {step} of {total or "?"} ({100 * frac:.0f}%) &middot; {html.escape(state)}</div></div>')
