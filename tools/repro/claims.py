"""The paper's claims (He et al. 2019) and their verdicts here, computed from the numbers.

Also the win counts and the better / worse / tie wording that the discussion reuses.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import CHANNEL, GSVD_ASYM, GSVD_SYM, SVD, TIE_POINTS
from .formatting import compare, fmt_pct
from .results import Results


@dataclass(frozen=True)
class Claim:
    claim: str
    verdict: str  # "holds", "does not hold", "partly", "inconclusive"
    evidence: str


def claims(res: Results) -> list[Claim]:
    """The paper's claims, each with a verdict computed from the numbers."""
    out: list[Claim] = []
    big = max(res.calib_sizes)
    asym = res.top1(GSVD_ASYM.key, big)
    sym = res.top1(GSVD_SYM.key, big)
    chan = res.top1(CHANNEL.key, big)
    svd = res.top1(SVD.key, None)

    # 1. The decomposed regular net keeps its accuracy (issue: loses at most 1 point), and the
    #    paper's stronger form: it beats the same architecture trained from scratch.
    if asym is not None:
        loss = res.regular_top1 - asym
        keeps = loss <= 0.01 + 1e-12
        ft = res.finetune.get(GSVD_ASYM.key)
        ev = (f"gsvd asymmetric, {big} images: {fmt_pct(asym)} vs regular {fmt_pct(res.regular_top1)} "
              f"({100 * loss:.1f} points lost); standard trained from scratch {fmt_pct(res.standard_top1)}")
        if ft is not None:
            ev += f"; after the short fine-tune {fmt_pct(ft)} ({versus(ft, res.standard_top1)} the standard net)"
        out.append(Claim("decomposed regular net keeps the regular net's accuracy (≤ 1 point lost)",
                         "holds" if keeps else "does not hold", ev))
        best = max(asym, ft if ft is not None else -1.0)
        verdict = {"better": "holds", "tie": "inconclusive", "worse": "does not hold"}[
            compare(best, res.standard_top1)]
        out.append(Claim("decomposed regular net beats the standard net trained from scratch",
                         verdict, f"best decomposed {fmt_pct(best)} vs standard {fmt_pct(res.standard_top1)}; "
                                  f"ties are within {TIE_POINTS} points (1,000 test digits)"))

    # 2. Depth-wise beats channel decomposition at equal cost.
    if asym is not None and chan is not None:
        wins = [compare(res.top1(GSVD_ASYM.key, n) or 0.0, res.top1(CHANNEL.key, n) or 0.0)
                for n in res.calib_sizes]
        iso = layer_wins(res, "gsvd", "channel")
        verdict = "holds" if all(w == "better" for w in wins) else (
            "partly" if any(w == "better" for w in wins) else "does not hold")
        out.append(Claim("depth-wise (gsvd) beats channel decomposition at equal MACs", verdict,
                         f"top-1 gsvd asymmetric vs channel at N = {', '.join(map(str, res.calib_sizes))}: "
                         + ", ".join(f"{fmt_pct(res.top1(GSVD_ASYM.key, n))} vs {fmt_pct(res.top1(CHANNEL.key, n))}"
                                     for n in res.calib_sizes)
                         + f"; isolated layers with lower error: {iso}"))

    # 3. Data-driven beats data-free.
    if asym is not None and svd is not None:
        iso = layer_wins(res, "gsvd", "svd")
        out.append(Claim("data-driven (gsvd) beats data-free (svd)",
                         {"better": "holds", "tie": "inconclusive", "worse": "does not hold"}[compare(asym, svd)],
                         f"top-1 {fmt_pct(asym)} vs {fmt_pct(svd)}; isolated layers with lower error: {iso}"))

    # 4. Asymmetric beats symmetric.
    if asym is not None and sym is not None:
        wins = [compare(res.top1(GSVD_ASYM.key, n) or 0.0, res.top1(GSVD_SYM.key, n) or 0.0)
                for n in res.calib_sizes]
        seq = sequence_wins(res, GSVD_ASYM.key, GSVD_SYM.key, big)
        verdict = "holds" if all(w == "better" for w in wins) else (
            "partly" if any(w == "better" for w in wins) and not any(w == "worse" for w in wins)
            else "inconclusive" if all(w == "tie" for w in wins) else "does not hold")
        out.append(Claim("asymmetric (multi-layer) correction beats symmetric", verdict,
                         "top-1 asymmetric vs symmetric at N = " + ", ".join(map(str, res.calib_sizes)) + ": "
                         + ", ".join(f"{fmt_pct(res.top1(GSVD_ASYM.key, n))} vs {fmt_pct(res.top1(GSVD_SYM.key, n))}"
                                     for n in res.calib_sizes)
                         + f"; layers with lower error in sequence ({big} images, r=1): {seq}"))
    return out


def versus(a: float, b: float) -> str:
    """'better than', 'worse than' or 'a tie with' (:func:`compare`'s tie band)."""
    return {"better": "better than", "worse": "worse than", "tie": "a tie with"}[compare(a, b)]


def layer_wins(res: Results, a: str, b: str) -> str:
    """'k/n (r=1), k/n (r=2)' — isolated layers where method a's error is below method b's."""
    parts = []
    for r in res.multipliers:
        pairs = [(res.isolated.get((ly, a, r)), res.isolated.get((ly, b, r))) for ly in res.layers]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
        if pairs:
            parts.append(f"{sum(x < y for x, y in pairs)}/{len(pairs)} (r={r})")
    return ", ".join(parts) or "—"


def sequence_wins(res: Results, a: str, b: str, calib_size: int, multiplier: int = 1) -> str:
    """'k/n' — layers where run a's in-sequence error is below run b's."""
    ra, rb = res.run(a, calib_size, multiplier), res.run(b, calib_size, multiplier)
    if ra is None or rb is None:
        return "—"
    common = [ly for ly in res.layers if ly in ra.layer_errors and ly in rb.layer_errors]
    return f"{sum(ra.layer_errors[ly] < rb.layer_errors[ly] for ly in common)}/{len(common)}"
