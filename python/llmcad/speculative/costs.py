"""Online models the ``llmcad`` policy decides with: how often the target accepts a draft token given
the draft's probability for it, and what a draft forward and a target pass cost on this machine.

Part of llmcad.speculative: must not import llmcad.streaming, llmcad.models, llmcad.bench or the engine.
"""
from __future__ import annotations

import collections
import math
import statistics


class AcceptanceCalibration:
    """P(target accepts a draft token | the draft gave it probability p), learned from verified nodes.

    ``buckets`` equal-width bins of p, each a Beta posterior whose prior is ``prior_weight`` pseudo-
    observations at the bin's midpoint (a calibrated draft, until the data says otherwise). Always
    strictly inside (0, 1), so a path's value shrinks with every token.
    """

    def __init__(self, buckets: int = 10, prior_weight: float = 4.0):
        self.buckets = buckets
        self.prior_weight = prior_weight
        self.reset()

    def reset(self) -> None:
        self.accepted = [0.0] * self.buckets
        self.seen = [0.0] * self.buckets

    def _bin(self, p: float) -> int:
        return min(self.buckets - 1, max(0, int(p * self.buckets)))

    def __call__(self, p: float) -> float:
        """Calibrated acceptance of a draft token of probability ``p``."""
        b = self._bin(p)
        mid = (b + 0.5) / self.buckets
        return (self.accepted[b] + self.prior_weight * mid) / (self.seen[b] + self.prior_weight)

    def observe(self, p: float, accepted: bool) -> None:
        b = self._bin(p)
        self.seen[b] += 1.0
        self.accepted[b] += 1.0 if accepted else 0.0

    def observe_tree(self, tree, accepted) -> None:
        """Every node whose parent was accepted was tested by the target: accepted or not. A node of draft
        probability 0 is no draft proposal (only prompt lookup proposed it): :class:`LookupCalibration`."""
        for node, accepted_node in tested_nodes(tree, accepted):
            if tree.probs[node] > 0 or tree.lookup[node] is None:
                self.observe(tree.probs[node], accepted_node)


class LookupCalibration:
    """P(target accepts a prompt-lookup token | its key), learned from verified nodes like
    :class:`AcceptanceCalibration`. Key: (length of the matched suffix, place along the copied
    continuation, from 1), places beyond ``places`` pooled. Beta posteriors with a prior of
    ``prior_weight`` pseudo-observations at ``prior``."""

    def __init__(self, places: int = 8, prior: float = 0.3, prior_weight: float = 2.0):
        self.places, self.prior, self.prior_weight = places, prior, prior_weight
        self.reset()

    def reset(self) -> None:
        self.counts = {}  # key -> [accepted, seen]

    def _key(self, key) -> tuple:
        n, place = key
        return int(n), min(int(place), self.places)

    def __call__(self, key) -> float:
        accepted, seen = self.counts.get(self._key(key), (0.0, 0.0))
        return (accepted + self.prior_weight * self.prior) / (seen + self.prior_weight)

    def observe(self, key, accepted: bool) -> None:
        counts = self.counts.setdefault(self._key(key), [0.0, 0.0])
        counts[0] += 1.0 if accepted else 0.0
        counts[1] += 1.0

    def observe_tree(self, tree, accepted) -> None:
        """Every lookup node whose parent was accepted: accepted or not."""
        for node, accepted_node in tested_nodes(tree, accepted):
            if tree.lookup[node] is not None:
                self.observe(tree.lookup[node], accepted_node)


def tested_nodes(tree, accepted):
    """(node, whether the target accepted it) for every node the target tested: those whose parent it
    accepted."""
    on_path = {int(a) for a in accepted}
    return [(node, node in on_path) for node in range(1, len(tree)) if tree.parents[node] in on_path]


class LinearCost:
    """Seconds as ``fixed + per_row * rows``, a robust fit of the last ``window`` measurements.

    The slope is the median of the slopes between measurements whose rows differ by at least
    ``SPREAD`` times (Theil-Sen on pairs far enough apart that a slope is not their noise), the fixed
    cost the median of what each measurement leaves beside it. One odd measurement (a pass slowed by
    another job) moves neither; a lasting change of the machine's load takes over once it holds most
    of the window (about three quarters).

    With fewer than ``MIN_SLOPES`` such pairs, or a median slope <= 0 (no work gets cheaper with more
    rows: the sizes are too alike to tell), the prior's shape is kept and scaled to the measurements:
    the prior's line times the median of the measurements' seconds over the prior's for their rows. So
    same-size measurements set the level and never a zero slope; before any, the prior (``fixed``,
    ``per_row``) itself.
    """

    SPREAD = 1.25
    MIN_SLOPES = 3

    def __init__(self, fixed: float, per_row: float, window: int = 12):
        if not (fixed >= 0 and per_row >= 0 and fixed + per_row > 0):
            raise ValueError(f"LinearCost prior fixed={fixed}, per_row={per_row}: expected both >= 0, "
                             "one > 0")
        self._prior = (fixed, per_row)
        self.window = window
        self._recent = collections.deque(maxlen=window)  # (rows, seconds), oldest first
        self.observations = 0
        self._fit = None  # cached (fixed, per_row, how) (None: to compute)

    def observe(self, rows: int, seconds: float) -> None:
        if not (rows > 0 and seconds > 0 and math.isfinite(seconds)):
            return
        self._recent.append((float(rows), float(seconds)))
        self.observations += 1
        self._fit = None

    def _spread_slopes(self, points) -> list:
        return [(y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(points) for x2, y2 in points[i + 1:]
                if max(x1, x2) >= self.SPREAD * min(x1, x2)]

    def _fitted(self) -> tuple[float, float, str]:
        points = list(self._recent)
        if not points:
            return (*self._prior, "prior")
        slopes = self._spread_slopes(points)
        slope = statistics.median(slopes) if len(slopes) >= self.MIN_SLOPES else 0.0
        if slope > 0:
            return max(statistics.median(y - slope * x for x, y in points), 0.0), slope, "measured"
        fixed, per_row = self._prior
        scale = statistics.median(y / (fixed + per_row * x) for x, y in points)
        return scale * fixed, scale * per_row, "prior shape"

    def coefficients(self) -> tuple[float, float]:
        """(fixed seconds, seconds per row), both >= 0."""
        if self._fit is None:
            self._fit = self._fitted()
        return self._fit[:2]

    def __call__(self, rows: int) -> float:
        fixed, per_row = self.coefficients()
        return fixed + per_row * rows

    def reshape_prior(self, per_row: float) -> None:
        """The prior's seconds per row become ``per_row`` (a probe's measurement), its fixed cost kept."""
        if not (per_row > 0 and math.isfinite(per_row)):
            raise ValueError(f"LinearCost prior per_row={per_row}: expected a finite number > 0")
        self._prior = (self._prior[0], float(per_row))
        self._fit = None

    def describe(self) -> dict:
        """The fit and what it rests on (JSON-ready): measurements seen and in the window, and whether
        the slope was ``measured``, the ``prior shape`` scaled to the measurements, or the ``prior``."""
        fixed, per_row = self.coefficients()
        return {"fixed": fixed, "per_row": per_row, "slope_from": self._fit[2],
                "observations": self.observations, "window": len(self._recent)}


def ema(old, sample, weight: float = 0.3):
    """Exponential moving average: ``sample`` when there is no ``old`` value yet."""
    return sample if old is None else (1 - weight) * old + weight * sample


class BesideCompute:
    """Whether the draft should step while the target computes (beside it, on what the target leaves of
    the device), decided on this run's own measurements.

    A *probe* pass lets the draft step beside the target's first half of streamed layers (the layers of
    one pass do the same work): the target's slowdown is the median compute of a layer with a draft step
    beside it over the median of one alone, in that pass; the draft's slowdown the median over steps
    beside compute of their seconds over the draft cost model's (alone) seconds for as many rows. Medians
    of the pass ratios and step ratios: one odd layer or step moves neither.

    A step beside compute is worth the serial draft time it saves: its rows' cost alone times the
    probability that they start the next tree (``weight``: their mean path value); it costs the target
    the compute it loses while the step runs: the step's seconds beside x (1 - 1 / target slowdown). So it
    pays when ``weight > draft slowdown * (1 - 1 / target slowdown)`` (:meth:`pays`). A probe pass that
    compares nothing (too few layers of a kind: the draft ran out of candidates, or the pass was short)
    does not count towards ``PROBE_PASSES``; without measurements after ``PROBE_TRIES`` probes in all,
    the draft stays beside the IO waits only.
    """

    PROBE_PASSES = 2  # probes that compared layers
    PROBE_TRIES = 6  # probes in all, the ones that compared nothing included
    MIN_LAYERS = 3  # layers of each kind a probe pass needs
    WINDOW = 16

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.forget()

    def forget(self) -> None:
        self.target_ratios = collections.deque(maxlen=self.WINDOW)  # per probe pass: beside / alone layer
        self.draft_ratios = collections.deque(maxlen=self.WINDOW)  # per step beside: seconds / alone model
        self.probes = 0  # probe passes that compared layers
        self.probe_tries = 0  # probe passes in all
        self.steps_beside = 0  # draft steps taken beside compute
        self.steps_declined = 0  # steps the rule kept beside the IO waits (their weight did not pay)

    def mode(self) -> str:
        """"probe", "on" (steps beside compute when they pay), "off" (they never would, or not measured
        after the probes) or "disabled"."""
        if not self.enabled:
            return "disabled"
        threshold = self.threshold()
        if threshold is None:
            return "probe" if self.probes < self.PROBE_PASSES and self.probe_tries < self.PROBE_TRIES else "off"
        return "on" if threshold < 1.0 else "off"

    def observe_probe(self, alone: list, beside: list, probe: bool = True) -> None:
        """A pass's layer compute seconds, alone and with a draft step beside each: a probe, or a pass
        of drafting beside compute (its declined steps leave layers alone: the ratio keeps up with the
        machine's load)."""
        self.probe_tries += probe
        if len(alone) >= self.MIN_LAYERS and len(beside) >= self.MIN_LAYERS:
            self.target_ratios.append(statistics.median(beside) / max(statistics.median(alone), 1e-9))
            self.probes += probe

    def observe_step(self, seconds: float, alone_seconds: float) -> None:
        """A draft step beside compute took ``seconds``; the draft cost model expects ``alone_seconds``."""
        if seconds > 0 and alone_seconds > 0:
            self.draft_ratios.append(seconds / alone_seconds)

    def slowdowns(self):
        """(target slowdown, draft slowdown), None where not measured yet."""
        target = statistics.median(self.target_ratios) if self.target_ratios else None
        draft = statistics.median(self.draft_ratios) if self.draft_ratios else None
        return target, draft

    def threshold(self):
        """The path value a step beside compute must beat (None: not measured). A target no slower
        beside a step loses nothing to it, so any step pays whatever the draft's own slowdown (which
        needs steps that overlapped the target's compute to be measured at all)."""
        target, draft = self.slowdowns()
        if target is not None and target <= 1.0:
            return 0.0
        if target is None or draft is None:
            return None
        return draft * max(0.0, 1.0 - 1.0 / target)

    def pays(self, weight: float) -> bool:
        """Whether a step whose rows' mean path value is ``weight`` should run beside compute now."""
        mode = self.mode()
        if mode == "probe":
            return True
        return mode == "on" and weight > self.threshold()

    def describe(self) -> dict:
        target, draft = self.slowdowns()
        return {"mode": self.mode(), "target_slowdown": target, "draft_slowdown": draft,
                "threshold": self.threshold(), "probe_passes": self.probes, "probe_tries": self.probe_tries,
                "target_measurements": len(self.target_ratios), "draft_measurements": len(self.draft_ratios),
                "steps_beside": self.steps_beside, "steps_declined": self.steps_declined}
