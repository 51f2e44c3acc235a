"""Evaluate a train run, an adapter folder, or the base model alone: perplexity, exact match, inference speed.

mlflow run . -e evaluate --env-manager local -P run_id=<train run id>
mlflow run . -e evaluate --env-manager local -P adapter=none            # the baseline: no adapter
python -m entrypoints.evaluate --adapter path/to/adapter --data python-docs
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from lora_efficiency.cli import run_cli
from lora_efficiency.config import EvaluateConfig, parse_args, parse_bool, read_defaults
from lora_efficiency.errors import printable


@dataclass
class _Target:
    """What is evaluated: every setting not given comes from the train run, else from the train defaults."""

    model: str
    data: str
    quantization: str
    seq_len: int
    double_quant: bool
    adapter: Path | None  # None: the base model alone (or, with run_id, downloaded once the data is known)


def main(argv: list[str]) -> None:
    cfg = parse_args(EvaluateConfig, "evaluate", argv, description=__doc__)
    # lazy: after parsing: bad input exits in ~0.3 s, before torch, transformers and MLflow load (~6 s)
    from transformers.utils import logging as hf_logging

    from lora_efficiency.devices import resolve_device
    from lora_efficiency.evaluation import PER_EXAMPLE_LOSSES, Scoring
    from lora_efficiency.inference import download_adapter, load_for_inference, resolve_run_ref
    from lora_efficiency.models import load_tokenizer, resolve_model
    from lora_efficiency.prepare import resolve_data
    from lora_efficiency.tracking import check_tracking_store, start_run

    hf_logging.disable_progress_bar()
    check_tracking_store()
    given = cfg.run_id
    cfg = dataclasses.replace(cfg, run_id=resolve_run_ref(cfg.run_id)) if cfg.run_id else cfg  # runs:/, models:/
    target = _target(cfg)
    device = resolve_device(cfg.device)
    source = resolve_model(target.model)
    prepared = resolve_data(target.data, model=source, tokenizer=load_tokenizer(source), seq_len=target.seq_len)
    scoring = Scoring.of(
        prepared,
        data=target.data,
        exact_match=cfg.exact_match,
        eval_samples=cfg.eval_samples,
        generate_samples=cfg.generate_samples,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
    )
    if cfg.run_id:  # downloaded once every setting is known to be good
        target.adapter = download_adapter(cfg.run_id)
    network, tokenizer, _ = load_for_inference(
        model=source,
        adapter=target.adapter,
        quantization=target.quantization,
        device=device,
        double_quant=target.double_quant,
        trust_remote_code=cfg.trust_remote_code,
    )
    settings = scoring.tag
    kind = "run" if cfg.run_id else ("baseline" if target.adapter is None else "adapter")
    name = _run_name(kind, cfg, source, target)
    what = {
        "run": f"train run {cfg.run_id}",
        "baseline": "the base model alone",
        "adapter": f"adapter {target.adapter}",
    }
    description = (
        f"Evaluates {what[kind]} on {source.model_id} ({target.quantization}): held-out loss, exact match and "
        f"generation speed on the eval split of {prepared.manifest['dataset']}"
    )
    with start_run(run_name=name, entry_point="evaluate", description=description) as tracker:
        _log_what_is_evaluated(tracker, cfg, kind, settings, source, target, prepared)
        if given != cfg.run_id:
            tracker.set_tags({"evaluated_model_uri": given})
        tracker.log_data_inputs(prepared.manifest, str(prepared.path), splits=("eval",))  # the split it scores
        result = _evaluate(scoring, network, tokenizer, target, device)
        tracker.log_metrics(result.metrics)
        if result.samples["prompt"]:
            tracker.log_table(result.samples, "eval_samples.json")
        tracker.log_table(result.per_example, PER_EXAMPLE_LOSSES)
        if cfg.run_id:
            _into_train_run(cfg.run_id, settings, result)
    m = result.metrics
    em = f", exact match {m['eval/exact_match']:.1%}" if "eval/exact_match" in m else ""
    print(f"{printable(name)}: eval/loss {m['eval/loss']:.4f}, eval/perplexity {m['eval/perplexity']:.3f}{em}")


def _target(cfg: EvaluateConfig) -> _Target:
    """What is evaluated: each setting given, else the train run's, else the train defaults (configs/default.yaml)."""
    # lazy: as main's (after parsing)
    from lora_efficiency.inference import check_adapter_folder, train_run

    target = _Target(cfg.model, cfg.data, cfg.quantization, cfg.seq_len, cfg.double_quant, None)
    if cfg.run_id:
        params = train_run(cfg.run_id).data.params
        target.model = target.model or params.get("model", "")
        target.quantization = target.quantization or params.get("quantization", "")
        target.seq_len = target.seq_len or int(params.get("seq_len", 0))
        if "double_quant" in params:  # the run's, always
            target.double_quant = bool(parse_bool(params["double_quant"]))
        data_path = params.get("data_path", "")
        target.data = target.data or (data_path if data_path and Path(data_path).is_dir() else params.get("data", ""))
    elif cfg.adapter != "none":
        target.adapter = check_adapter_folder(cfg.adapter)
    train = read_defaults("train")
    target.model, target.quantization = target.model or train["model"], target.quantization or train["quantization"]
    target.seq_len = target.seq_len or int(train["seq_len"])
    return target


def _run_name(kind: str, cfg: EvaluateConfig, source, target: _Target) -> str:
    if kind == "run":
        return f"eval-{cfg.run_id[:8]}"
    if kind == "baseline":
        return f"baseline-{source.model_id.split('/')[-1]}-{target.quantization}"
    return f"eval-{getattr(target.adapter, 'name', 'adapter')}"


def _log_what_is_evaluated(tracker, cfg: EvaluateConfig, kind: str, settings: str, source, target, prepared) -> None:
    tracker.log_params(
        {
            **vars(cfg),
            "model_resolved": source.name,
            "quantization_resolved": target.quantization,
            "data_path": str(prepared.path),
        }
    )
    tracker.set_tags(
        {
            "eval_kind": kind,
            "eval_settings": settings,
            "base_model": source.model_id,
            "data_fingerprint": prepared.manifest["fingerprint"],
            "quantization": target.quantization,
            **({"baseline": "true"} if kind == "baseline" else {}),
            **({"evaluated_run_id": cfg.run_id} if cfg.run_id else {}),
        }
    )


def _evaluate(scoring, network, tokenizer, target: _Target, device):
    # lazy: as main's (after parsing)
    from lora_efficiency.models import compute_dtype, keep_adapter_inputs_in_compute_dtype

    autocast_dtype = None if target.quantization == "fp32" else compute_dtype(device)
    if autocast_dtype is not None:  # every forward below runs under it: as the train run scored its adapter
        keep_adapter_inputs_in_compute_dtype(network)
    return scoring.run(
        network,
        tokenizer,
        device=device,
        autocast_dtype=autocast_dtype,
        measure_merged=target.adapter is not None and target.quantization in ("bf16", "fp16", "fp32"),
    )


def _into_train_run(run_id: str, settings: str, result) -> None:
    """Same metric names in the train run; the same settings twice write nothing."""
    # lazy: as main's (after parsing)
    import mlflow
    from mlflow.entities import Metric

    from lora_efficiency.evaluation import PER_EXAMPLE_LOSSES

    client = mlflow.MlflowClient()
    if client.get_run(run_id).data.tags.get("eval_settings") == settings:
        print(f"run {run_id} already holds an evaluation with these settings: left as it is")
        return
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in result.metrics.items()])
    client.set_tag(run_id, "eval_settings", settings)
    if result.samples["prompt"]:
        mlflow.log_table(result.samples, "eval_samples.json", run_id=run_id)
    mlflow.log_table(result.per_example, PER_EXAMPLE_LOSSES, run_id=run_id)


if __name__ == "__main__":
    run_cli(main)
