"""Prepare a data set: format with the model's template, tokenize once (cached), split, and record a manifest.

mlflow run . -e prepare --env-manager local -P dataset=python-docs -P seq_len=512
python -m entrypoints.prepare --dataset my_data.jsonl --num_samples 1000
"""

from __future__ import annotations

import json
import sys

from lora_efficiency.cli import run_cli
from lora_efficiency.config import PrepareConfig, parse_args
from lora_efficiency.errors import printable


def main(argv: list[str]) -> None:
    cfg = parse_args(PrepareConfig, "prepare", argv, description=__doc__)
    # lazy: after parsing: bad input exits in ~0.3 s, before torch, transformers and MLflow load (~6 s)
    from transformers.utils import logging as hf_logging

    from lora_efficiency.models import load_tokenizer, resolve_model
    from lora_efficiency.prepare import prepare_data
    from lora_efficiency.tracking import check_tracking_store, start_run

    hf_logging.disable_progress_bar()
    check_tracking_store()  # before the model and data: an early exit below leaves no killed run RUNNING either
    source = resolve_model(cfg.model)
    tokenizer = load_tokenizer(source, trust_remote_code=cfg.trust_remote_code)
    description = (
        f"Prepares data {cfg.dataset or 'bundled-instruct'} for {source.model_id}: formatted, tokenized to "
        f"seq_len {cfg.seq_len}, split (eval fraction {cfg.eval_fraction}), cached; the splits are its dataset inputs"
    )
    with start_run(
        run_name=f"prepare-{cfg.dataset or 'instruct'}", entry_point="prepare", description=description
    ) as t:
        t.log_params({**vars(cfg), "model_id": source.model_id, "model_revision": source.revision})
        prepared = prepare_data(
            dataset=cfg.dataset,
            model=source,
            tokenizer=tokenizer,
            seq_len=cfg.seq_len,
            num_samples=cfg.num_samples,
            eval_fraction=cfg.eval_fraction,
            seed=cfg.seed,
            train_on_prompt=cfg.train_on_prompt,
            prompt_field=cfg.prompt_field,
            response_field=cfg.response_field,
            text_field=cfg.text_field,
        )
        m = prepared.manifest
        for warning in m["warnings"]:
            print(f"warning: {printable(warning)}", file=sys.stderr)
        t.set_tags(
            {
                "prepared_path": str(prepared.path),
                "data_fingerprint": m["fingerprint"],
                "data_kind": m["kind"],
                "cached": str(prepared.cached).lower(),
                **({"warnings": " | ".join(m["warnings"])} if m["warnings"] else {}),
            }
        )
        stats = {f"data/{split}_{k}": float(v) for split in ("train", "eval") for k, v in m[split].items()}
        stats.update({f"data/{k}": float(v) for k, v in m["packing"].items()})
        stats["data/skipped_records"] = float(m["skipped_records"])
        t.log_metrics(stats)
        t.log_text(json.dumps(m, indent=2), "manifest.json")
        t.log_data_inputs(m, str(prepared.path))
    print(
        f"prepared {printable(m['dataset'])}: {m['train']['count']} train / {m['eval']['count']} eval examples, "
        f"{m['train']['truncated']} truncated, padding {m['packing']['padding_fraction_unpacked']:.0%} unpacked -> "
        f"{m['packing']['padding_fraction_packed']:.0%} packed{' (cached)' if prepared.cached else ''}\n"
        f"  {printable(prepared.path)}"
    )


if __name__ == "__main__":
    run_cli(main)
