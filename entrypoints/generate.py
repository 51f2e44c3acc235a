"""Answer a prompt with a base model and an adapter from a train run or a folder.

python -m entrypoints.generate --run_id models:/<experiment>@best --prompt "..."   # a winner; or runs:/<id>/model
python -m entrypoints.generate --run_id <train run id> --prompt "Compute 17 + 25. Answer with the number only."
python -m entrypoints.generate --adapter path/to/adapter --model smollm2-135m --prompt "..."
python -m entrypoints.generate --adapter none --prompt "What is the capital of France?"     # the base alone
"""

from __future__ import annotations

from lora_efficiency.cli import run_cli
from lora_efficiency.config import GenerateConfig, parse_args
from lora_efficiency.errors import UserError, printable_lines


def main(argv: list[str]) -> None:
    cfg = parse_args(GenerateConfig, "generate", argv, description=__doc__)
    # lazy: after parsing: bad input exits in ~0.3 s, before torch, transformers and MLflow load (~6 s)
    from transformers.utils import logging as hf_logging

    from lora_efficiency.devices import resolve_device
    from lora_efficiency.inference import (
        check_adapter_folder,
        download_adapter,
        generate,
        load_for_inference,
        resolve_run_ref,
        train_run,
    )
    from lora_efficiency.names import BUNDLED_MODEL, QUANTIZATIONS
    from lora_efficiency.tracking import check_tracking_store

    hf_logging.disable_progress_bar()
    model, quantization, adapter = cfg.model, cfg.quantization, None
    if cfg.run_id:
        check_tracking_store()  # an unreachable server: one line in ~3 s, not MLflow's ~4 min of retries
        run_id = resolve_run_ref(cfg.run_id)  # a run id, runs:/<id>/model or models:/<name>@<alias>
        params = train_run(run_id).data.params
        model, quantization = model or params.get("model", ""), quantization or params.get("quantization", "")
        adapter = download_adapter(run_id)
    elif cfg.adapter != "none":
        adapter = check_adapter_folder(cfg.adapter)
    quantization = quantization or "bf16"
    if quantization not in QUANTIZATIONS:  # the run's, checked like a given one
        raise UserError(f"quantization={quantization!r} is invalid: one of {', '.join(QUANTIZATIONS)}")
    device = resolve_device(cfg.device)
    network, tokenizer, _ = load_for_inference(
        model=model or BUNDLED_MODEL, adapter=adapter, quantization=quantization, device=device
    )
    answer = generate(network, tokenizer, cfg.prompt, max_new_tokens=cfg.max_new_tokens, device=device)
    print(printable_lines(answer))  # a model's text may hold escape sequences like any stored string


if __name__ == "__main__":
    run_cli(main)
