"""What the report measures: each metric's label, unit, direction and how its values are written."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricSpec:
    name: str
    label: str
    unit: str  # "" for a pure number; fractions are shown in % (and their differences in points)
    higher_is_better: bool
    digits: int = 3
    fraction: bool = False

    @property
    def axis(self) -> str:
        return f"{self.label} ({self.unit})" if self.unit else self.label

    def show(self, value: float) -> str:
        if self.fraction:
            return f"{value * 100:.1f}"
        return f"{value:,.{self.digits}f}"


METRICS = {
    m.name: m
    for m in (
        MetricSpec("eval/perplexity", "perplexity", "", higher_is_better=False),
        MetricSpec("eval/exact_match", "exact match", "%", higher_is_better=True, fraction=True),
        MetricSpec("eval/exact_match_normalized", "exact match, normalised", "%", True, fraction=True),
        # answers compared by kind (lora_efficiency.evaluation.answers_match); runs before it show "not measured"
        MetricSpec("eval/exact_match_by_kind", "exact match by kind", "%", True, fraction=True),
        MetricSpec("memory/peak_mb", "peak memory", "MB", higher_is_better=False, digits=0),
        MetricSpec("params/trainable", "trainable parameters", "", higher_is_better=False, digits=0),
        MetricSpec("perf/train_tokens_per_second", "training speed", "tokens/s", higher_is_better=True, digits=0),
        # a fixed-length pass, end of sequence suppressed (lora_efficiency.evaluation.SPEED_NEW_TOKENS)
        MetricSpec("inference/decode_tokens_per_second", "generation speed", "tokens/s", True, digits=1),
        # what runs before it logged: the exact-match pass's timing, which answer lengths change
        MetricSpec(
            "inference/tokens_per_second", "generation speed, answer-length dependent (older runs)", "tokens/s", True, 1
        ),
        MetricSpec("time/train_s", "training time", "s", higher_is_better=False, digits=0),
    )
}
PERPLEXITY, EXACT_MATCH, PEAK_MB = "eval/perplexity", "eval/exact_match", "memory/peak_mb"
PREDICTED_MB = "memory/predicted_peak_mb"  # the memory planner's figure, logged by a run beside its PEAK_MB
QUALITY = (PERPLEXITY, EXACT_MATCH)
# compared in every finding: quality, then what it costs
FINDING_METRICS = (PERPLEXITY, EXACT_MATCH, PEAK_MB, "perf/train_tokens_per_second")
