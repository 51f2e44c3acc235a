"""The validation curve and its convergence test: a trainer callback that scores held-out loss every `eval_every`
steps (and at the last step) and logs it as the metric history val/loss, val/perplexity, which the MLflow UI plots.

Converged (declared before any data, configs/default.yaml `converge_tol`): over the last CONVERGENCE_WINDOW of
the training steps, the validation loss fell by less than converge_tol of its value at the window's start.
    improvement = (L(start of window) - L(last step)) / L(start of window)
    converged <=> -tol <= improvement < tol;  improving <=> improvement >= tol;  worsened <=> improvement < -tol
A run whose validation loss ROSE by more than tol over the window (too high a learning rate, or overfitting) is
"worsened", not "converged": it stopped improving, but not at its best.
The window's start is the last validation point at or before step (1 - CONVERGENCE_WINDOW) x max_steps. A curve
with no point there (eval_every > max_steps / 2, or a run resumed after it) is "unknown", never "converged".
The cosine schedule has decayed to half its peak at the window's start, so "converged" means: the second half of
training, at a falling learning rate, barely moved the validation loss; a longer run might still gain.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from lora_efficiency.evaluation import evaluate_loss

CONVERGENCE_WINDOW = 0.5  # the share of the training steps the test looks at: the last half


@dataclass(frozen=True)
class Convergence:
    status: str  # "converged", "improving", "worsened" or "unknown"
    improvement: float  # relative fall of val/loss over the window (NaN when unknown)

    def metrics(self) -> dict[str, float]:
        if self.status == "unknown":
            return {}
        return {"val/converged": float(self.status == "converged"), "val/window_improvement": self.improvement}


def convergence(curve: list[tuple[int, float]], *, max_steps: int, tol: float) -> Convergence:
    """The declared test (module docstring) on a curve of (step, val loss) points in step order."""
    start_step = (1 - CONVERGENCE_WINDOW) * max_steps
    before = [(step, loss) for step, loss in curve if step <= start_step]
    if not before or not curve or curve[-1][0] != max_steps or not all(math.isfinite(v) for _, v in curve):
        return Convergence("unknown", math.nan)
    start_loss, end_loss = before[-1][1], curve[-1][1]
    improvement = (start_loss - end_loss) / start_loss
    return Convergence(classify(improvement, tol), improvement)


def classify(improvement: float, tol: float) -> str:
    """The declared test's verdict on a window's relative improvement."""
    return "improving" if improvement >= tol else "worsened" if improvement < -tol else "converged"


@dataclass
class Validator:
    """A training callback (see trainer.StepStats): held-out loss on `rows` at every `every` steps and at the last
    one, logged with the step. Time spent here is kept apart (`elapsed_s`) so training speed excludes it."""

    model: object
    rows: object
    every: int
    max_steps: int
    tol: float
    tracker: object
    eval_kwargs: dict  # batch_size, pad_id, device, autocast_dtype: evaluation.evaluate_loss's
    curve: list[tuple[int, float]] = field(default_factory=list)
    elapsed_s: float = 0.0

    def __call__(self, stats) -> None:
        if stats.step % self.every and stats.step != self.max_steps:
            return
        t0 = time.perf_counter()
        scores = evaluate_loss(self.model, self.rows, **self.eval_kwargs)  # no_grad, eval mode, no random draws
        self.curve.append((stats.step, scores["eval/loss"]))
        self.tracker.log_metrics(
            {"val/loss": scores["eval/loss"], "val/perplexity": scores["eval/perplexity"]}, step=stats.step
        )
        self.elapsed_s += time.perf_counter() - t0

    def result(self) -> Convergence:
        return convergence(self.curve, max_steps=self.max_steps, tol=self.tol)
