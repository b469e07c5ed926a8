"""Which level-2 entry becomes the submission: a declared default, replaced only
by an entry whose paired cross-validated advantage clearly exceeds its noise.

``final: auto`` keeps ``default`` unless another entry's paired advantage
over it exceeds ``switch_margin_se`` x its SE (``switch_se``: over rows, over
folds, or the larger); among those that do, the highest cross-validated
MAP@3 wins. ``best`` is the old rule (highest CV, noise and all); a name
forces that entry.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

from pipeline.config import ConfigError
from stacking.evaluate import Evaluation

log = logging.getLogger("stacking")


def finite_or_none(x) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


@dataclass
class Selection:
    """How the final learner was chosen, and the numbers behind it."""
    final: str
    rule: str                        # auto | best | forced
    default: str
    switched: bool                   # (auto) the default was replaced
    candidate: str | None            # the strongest challenger of the default (or the switch target)
    switch_margin_se: float
    switch_se: str
    default_cv: float
    default_cv_se: float
    candidate_cv: float | None = None
    candidate_diff: float | None = None
    candidate_diff_se: float | None = None
    final_diff: float | None = None
    final_diff_se: float | None = None

    def as_dict(self) -> dict:
        return {k: (finite_or_none(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def sentence(self) -> str:
        """One line: "default X (cv a ± se); candidate Y +d ± se_d: kept default / switched"."""
        text = f"default {self.default} (cv MAP@3 {self.default_cv:.4f} ± {self.default_cv_se:.4f})"
        if self.candidate is not None:
            text += (f"; candidate {self.candidate} {self.candidate_diff:+.4f} ± {self.candidate_diff_se:.4f} "
                     f"(paired, {self.switch_se} SE)")
        if self.rule == "auto":
            verdict = (f"switched to {self.final}" if self.switched else "kept the default")
            text += f": {verdict} (rule: switch only when the advantage exceeds {self.switch_margin_se:g} SE)"
        elif self.rule == "best":
            text += f": highest cross-validated MAP@3 (stacking.final: best) is {self.final}"
        else:
            text += f": forced by stacking.final: {self.final}"
            if self.final != self.default and self.final_diff is not None:
                text += f" ({self.final_diff:+.4f} ± {self.final_diff_se:.4f} vs the default)"
        return text


def resolve_default(settings: dict, names: list[str]) -> str:
    """The configured default when it is scored; else the first configured
    learner (a fixed choice, never one made by the scores)."""
    default = settings["default"]
    if default in names:
        return default
    fallback = next((n for n in settings["learners"] if n in names), names[0])
    log.warning("stacking.default %r is not among the scored names %s: the default is %r",
                default, names, fallback)
    return fallback


def select_final(ev: Evaluation, final: str = "auto", default: str | None = None,
                 switch_margin_se: float = 1.0, switch_se: str = "max") -> Selection:
    """The final learner by ``final``:

    - ``auto``: keep ``default`` unless some entry's paired cross-validated
      advantage over it exceeds ``switch_margin_se`` standard errors of that
      difference (``switch_se``: rows, folds or max); among those, the highest
      cross-validated MAP@3;
    - ``best``: the highest cross-validated MAP@3 (the old rule, for comparisons);
    - a name: that model/blend/learner.
    """
    scores = ev.scores.set_index("name")
    names = scores.index.tolist()
    if default is None:
        default = ev.reference or names[0]
    if default not in names:
        raise ConfigError(f"the default learner {default!r} is not one of {names}")
    if final not in (None, "auto", "best") and final not in names:
        raise ConfigError(f"stacking.final {final!r} is neither 'auto', 'best' nor one of {names}")
    diffs = {n: ev.difference(n, default) for n in names if n != default}
    se = {n: d.se(switch_se) for n, d in diffs.items()}
    cv = scores["map3_all"]
    # the strongest challenger / the switch target: highest cv MAP@3, ties to the earlier table row
    candidate = max(diffs, key=lambda n: (cv[n], -names.index(n))) if diffs else None
    switched = False
    if final in (None, "auto"):
        rule = "auto"
        passing = [n for n, d in diffs.items() if d.diff > switch_margin_se * se[n] and d.diff > 0]
        if passing:
            chosen = max(passing, key=lambda n: (cv[n], -names.index(n)))
            candidate, switched = chosen, True
        else:
            chosen = default
    elif final == "best":
        rule, chosen = "best", str(scores["map3_all"].idxmax())
    else:
        rule, chosen = "forced", final
    sel = Selection(final=chosen, rule=rule, default=default, switched=switched, candidate=candidate,
                    switch_margin_se=float(switch_margin_se), switch_se=switch_se,
                    default_cv=float(scores.loc[default, "map3_all"]),
                    default_cv_se=float(scores.loc[default, "map3_all_se"]))
    if candidate is not None:
        sel.candidate_cv = float(scores.loc[candidate, "map3_all"])
        sel.candidate_diff, sel.candidate_diff_se = diffs[candidate].diff, se[candidate]
    if chosen != default:
        sel.final_diff, sel.final_diff_se = diffs[chosen].diff, se[chosen]
    return sel


def choose_final(ev: Evaluation, final: str = "auto", default: str | None = None,
                 switch_margin_se: float = 1.0, switch_se: str = "max") -> str:
    """The name :func:`select_final` chooses."""
    return select_final(ev, final, default, switch_margin_se, switch_se).final
