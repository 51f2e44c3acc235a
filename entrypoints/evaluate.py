"""Evaluate a train run, an adapter folder, or the base model alone: perplexity, exact match, inference speed.

mlflow run . -e evaluate --env-manager local -P run_id=<train run id>
mlflow run . -e evaluate --env-manager local -P adapter=none            # the baseline: no adapter
python -m entrypoints.evaluate --adapter path/to/adapter --data python-docs
"""

from __future__ import annotations

import time
from pathlib import Path

from lora_efficiency.cli import run_cli
from lora_efficiency.config import EvaluateConfig, parse_args


def main(argv: list[str]) -> None:
    cfg = parse_args(EvaluateConfig, "evaluate", argv, description=__doc__)
    import mlflow
    from mlflow.entities import Metric
    from transformers.utils import logging as hf_logging

    from lora_efficiency.data import TokenizedSplit, unpacked
    from lora_efficiency.evaluation import eval_settings_tag, evaluate_model, use_exact_match
    from lora_efficiency.inference import check_adapter_folder, download_adapter, load_for_inference, train_run
    from lora_efficiency.models import BUNDLED_MODEL, compute_dtype, load_tokenizer, resolve_model
    from lora_efficiency.prepare import resolve_data
    from lora_efficiency.tracking import check_tracking_store, start_run
    from lora_efficiency.trainer import resolve_device

    hf_logging.disable_progress_bar()
    check_tracking_store()
    # What to evaluate: everything not given comes from the train run, else from the train defaults.
    model, data, quantization, seq_len, double_quant = (
        cfg.model,
        cfg.data,
        cfg.quantization,
        cfg.seq_len,
        cfg.double_quant,
    )
    adapter = None
    if cfg.run_id:
        params = train_run(cfg.run_id).data.params
        model = model or params.get("model") or BUNDLED_MODEL
        quantization = quantization or params.get("quantization", "nf4")
        seq_len = seq_len or int(params.get("seq_len", 512))
        double_quant = params.get("double_quant", "true").lower() == "true"
        data_path = params.get("data_path", "")
        data = data or (data_path if data_path and Path(data_path).is_dir() else params.get("data", ""))
    elif cfg.adapter != "none":
        adapter = check_adapter_folder(cfg.adapter)
    model, quantization, seq_len = model or BUNDLED_MODEL, quantization or "nf4", seq_len or 512

    device = resolve_device(cfg.device)
    source = resolve_model(model)
    prepared = resolve_data(data, model=source, tokenizer=load_tokenizer(source), seq_len=seq_len)
    do_exact_match = use_exact_match(cfg.exact_match, prepared.manifest, data)
    if cfg.run_id:  # downloaded once every setting is known to be good
        adapter = download_adapter(cfg.run_id)
    network, tokenizer, _ = load_for_inference(
        model=source,
        adapter=adapter,
        quantization=quantization,
        device=device,
        double_quant=double_quant,
        trust_remote_code=cfg.trust_remote_code,
    )
    settings = eval_settings_tag(
        data_fingerprint=prepared.manifest["fingerprint"],
        eval_samples=cfg.eval_samples,
        generate_samples=cfg.generate_samples if do_exact_match else 0,
        max_new_tokens=cfg.max_new_tokens,
    )
    kind = "run" if cfg.run_id else ("baseline" if adapter is None else "adapter")
    name = {
        "run": f"eval-{cfg.run_id[:8]}",
        "baseline": f"baseline-{source.model_id.split('/')[-1]}-{quantization}",
        "adapter": f"eval-{getattr(adapter, 'name', 'adapter')}",
    }[kind]
    with start_run(run_name=name, entry_point="evaluate", system_metrics=False) as tracker:
        tracker.log_params(
            {
                **vars(cfg),
                "model_resolved": source.name,
                "quantization_resolved": quantization,
                "data_path": str(prepared.path),
            }
        )
        tracker.set_tags(
            {
                "eval_kind": kind,
                "eval_settings": settings,
                "base_model": source.model_id,
                "data_fingerprint": prepared.manifest["fingerprint"],
                "quantization": quantization,
                **({"baseline": "true"} if kind == "baseline" else {}),
                **({"evaluated_run_id": cfg.run_id} if cfg.run_id else {}),
            }
        )
        amp = None if quantization == "fp32" else compute_dtype(device)
        n = cfg.eval_samples
        result = evaluate_model(
            network,
            tokenizer,
            eval_rows=unpacked(TokenizedSplit(prepared.eval.input_ids[:n], prepared.eval.labels[:n])),
            eval_examples=prepared.eval_examples[:n],
            exact_match=do_exact_match,
            generate_samples=cfg.generate_samples,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size,
            pad_id=tokenizer.pad_token_id,
            device=device,
            autocast_dtype=amp,
            measure_merged=adapter is not None and quantization in ("bf16", "fp16", "fp32"),
        )
        tracker.log_metrics(result.metrics)
        if result.samples["prompt"]:
            tracker.log_table(result.samples, "eval_samples.json")
        if cfg.run_id:  # same metric names in the train run; the same settings twice write nothing
            client = mlflow.MlflowClient()
            if client.get_run(cfg.run_id).data.tags.get("eval_settings") == settings:
                print(f"run {cfg.run_id} already holds an evaluation with these settings: left as it is")
            else:
                now = int(time.time() * 1000)
                client.log_batch(cfg.run_id, metrics=[Metric(k, v, now, 0) for k, v in result.metrics.items()])
                client.set_tag(cfg.run_id, "eval_settings", settings)
                if result.samples["prompt"]:
                    mlflow.log_table(result.samples, "eval_samples.json", run_id=cfg.run_id)
    m = result.metrics
    em = f", exact match {m['eval/exact_match']:.1%}" if "eval/exact_match" in m else ""
    print(f"{name}: eval/loss {m['eval/loss']:.4f}, eval/perplexity {m['eval/perplexity']:.3f}{em}")


if __name__ == "__main__":
    run_cli(main)
