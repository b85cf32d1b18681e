"""The norm screen: which of a round's updates are too large to merge, and what is done with them.

A scaled attacker (an update multiplied by -100, say) is caught by its norm: it sits far above
the round's other updates. The yardstick is the round's median update norm, which attackers
cannot drag while they are fewer than half. But once the model has converged most updates are
tiny, and the median shrinks faster than the honest tail: on digits an honest update reached
10-50x its round's median after round 50, and a bound of 10x the median dropped 5 to 10
honest updates per 100-round run of 20 nodes ([FIMI]'s reproduction: 4 to 41). What an honest
update hardly ever outgrows is the size of the steps the model took while it was learning
(3 of 11,000 recorded did, by 4.0-5.8x, none in the first 40 rounds), so the rules here
(fedfill.config.NORM_SCREENS, measured side by side by bench/bench_robust.py, figures in
docs/running.md#robust-aggregation):

- **median**: drop an update above `bound` x the round's median norm.
- **clip**: scale an update above `bound` x the median down to that norm: nothing is dropped.
- **adaptive** (the default): clip an update above `bound` x the round's median, and drop it
  only when it is also above `floor` x the largest round median so far (`peak_median`, which
  attackers fewer than half cannot raise either). Early in training the two bounds agree and a
  x100 update is dropped; once the updates shrink, an honest straggler 10-30x the median is
  merged at the bound instead of lost, while an update larger than `floor` of the steps the
  model took while learning is still dropped.

Under every rule no merged update moves the model further than `bound` x the median: an
attacker that knows the rule can always send an update just under it, so the bound is what
limits the harm, and the rules differ in what becomes of the updates above it.

An update whose norm is not finite is always dropped. No rule judges fewer than
NORM_SCREEN_MIN_UPDATES updates (a median of one or two says nothing
about which is the odd one), nor a round whose median is 0. Free of Flower and torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedfill.config import check_norm_screen

NORM_SCREEN_MIN_UPDATES = 3
ADAPTIVE_FLOOR = 4.0  # x the peak median: at 2 an honest update 2.65x it was lost within 40 rounds


@dataclass
class Verdict:
    """What the screen does with one update: `scale` 1 (merged as it is), 0 (dropped) or in
    between (clipped), and why, for the node's row ("" where it passed)."""

    scale: float
    reason: str = ""


@dataclass
class NormScreen:
    """One run's screen; `judge` is called once per round with that round's update norms and
    remembers the round's median for the adaptive rule."""

    rule: str = "adaptive"
    bound: float = 10.0  # x the round's median; 0: no screening
    floor: float = ADAPTIVE_FLOOR
    peak_median: float = 0.0  # the largest round median so far (a resumed run sets it from its report)
    last: dict = field(default_factory=dict)  # the last round's figures: median, bound

    def __post_init__(self) -> None:
        check_norm_screen(self.rule, self.bound)

    def judge(self, norms: list[float]) -> list[Verdict]:
        norms = [float(n) for n in norms]
        self.last = {}
        verdicts = [Verdict(1.0) if np.isfinite(n) else Verdict(0.0, f"update norm {n} is not finite") for n in norms]
        finite = [n for n in norms if np.isfinite(n)]
        if not self.bound or len(finite) < NORM_SCREEN_MIN_UPDATES:
            return verdicts
        median = float(np.median(finite))
        if not median > 0:
            return verdicts
        self.peak_median = max(self.peak_median, median)
        bound = self.bound * median
        drop_above = max(bound, self.floor * self.peak_median) if self.rule == "adaptive" else bound
        self.last = {"norm-median": median, "norm-bound": bound}
        why = f"{self.bound:g} x the round's median update norm {median:.4g}"
        for k, norm in enumerate(norms):
            if not np.isfinite(norm) or norm <= bound:
                continue
            if self.rule == "clip" or (self.rule == "adaptive" and norm <= drop_above):
                verdicts[k] = Verdict(bound / norm, f"update norm {norm:.4g} clipped to {bound:.4g} ({why})")
            elif self.rule == "adaptive" and drop_above > bound:
                verdicts[k] = Verdict(0.0, f"update norm {norm:.4g} exceeds the bound {drop_above:.4g} "
                                           f"({self.floor:g} x the largest round median so far, "
                                           f"{self.peak_median:.4g})")
            else:
                verdicts[k] = Verdict(0.0, f"update norm {norm:.4g} exceeds the bound {bound:.4g} ({why})")
        return verdicts
