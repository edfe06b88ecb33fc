"""Where speculation stops paying, measured: what a verification step costs against a decode step of
the same batch, timed on the device at start-up, and the acceptance the engine observes.

A step of B running requests, s of which may speculate with K drafts each:

    plain step       B tokens                      in t_decode(B)   (the decode graph of B)
    verifying step   B + s * a tokens on average   in t_verify(B)   (the verification graph of B: every
                                                                     sequence padded to 1 + K rows)

where a is the mean number of drafts accepted per verification. Speculating pays while

    (B + s * a) / t_verify(B) >= (1 + COST_MARGIN) * B / t_decode(B)
    <=>  1 + (s / B) * a >= (1 + COST_MARGIN) * t_verify(B) / t_decode(B)

At small B both steps are bound by reading the weights, so the ratio is near 1 and almost any
acceptance pays; as B grows the verification's (1 + K) * B rows make it compute-bound and the ratio
climbs until the observed acceptance no longer covers it. COST_MARGIN covers what the graphs do not
show: a verifying step runs synchronously (the host's work of scheduling and proposing no longer
overlaps the device), a few percent of a step.

The times come from the captured graphs themselves (`measure_step_costs` in
engine/worker/verify_graphs.py), replayed over a context of `context` tokens, once per verification
bucket; a batch above the largest bucket would verify eagerly and never speculates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

COST_MARGIN = 0.1
# The acceptance assumed before any verification was observed: every draft (so speculation is tried),
# then a moving average over steps with this weight.
ACCEPTED_EMA_WEIGHT = 0.1


@dataclass(frozen=True)
class StepCosts:
    """Seconds per replay of the decode and the verification graph, per verification bucket (ascending)."""
    buckets: tuple[int, ...]
    decode_s: tuple[float, ...]
    verify_s: tuple[float, ...]
    context: int                       # tokens of context each timed sequence attended to

    def __post_init__(self) -> None:
        if not self.buckets or not len(self.buckets) == len(self.decode_s) == len(self.verify_s):
            raise ValueError(f"step costs need one decode and one verify time per bucket, got buckets "
                             f"{self.buckets}, {len(self.decode_s)} decode and {len(self.verify_s)} verify times")
        if list(self.buckets) != sorted(set(self.buckets)) or self.buckets[0] < 1:
            raise ValueError(f"buckets must be ascending batch sizes >= 1, got {self.buckets}")
        if min(self.decode_s + self.verify_s) <= 0:
            raise ValueError(f"step times must be > 0 s, got decode {self.decode_s} and verify {self.verify_s}")

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def ratio(self, batch: int) -> Optional[float]:
        """t_verify / t_decode for a step of `batch` sequences (the graphs of its bucket); None above
        the largest bucket."""
        for bucket, decode, verify in zip(self.buckets, self.decode_s, self.verify_s):
            if bucket >= batch:
                return verify / decode
        return None

    def describe(self) -> str:
        """e.g. "verify / decode step time at 1024 tokens of context: batch 1 1.04x, 8 1.10x, ..."."""
        ratios = ", ".join(f"{bucket} {verify / decode:.2f}x"
                           for bucket, decode, verify in zip(self.buckets, self.decode_s, self.verify_s))
        return f"verify / decode step time at {self.context} tokens of context: batch {ratios}"


def speculation_pays(costs: StepCosts, batch: int, speculating: int, accepted_per_verification: float) -> bool:
    """The rule of the module docstring for a step of `batch` running requests, `speculating` of them
    able to speculate, at the observed mean acceptance."""
    ratio = costs.ratio(batch)
    if ratio is None or speculating < 1:
        return False
    return 1 + speculating / batch * accepted_per_verification >= (1 + COST_MARGIN) * ratio
