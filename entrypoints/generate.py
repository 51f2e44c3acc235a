"""Answer a prompt with a base model and an adapter from a train run or a folder.

python -m entrypoints.generate --run_id <train run id> --prompt "Compute 17 + 25. Answer with the number only."
python -m entrypoints.generate --adapter path/to/adapter --model smollm2-135m --prompt "..."
python -m entrypoints.generate --adapter none --prompt "What is the capital of France?"     # the base alone
"""

from __future__ import annotations

import argparse

from lora_efficiency.cli import run_cli
from lora_efficiency.errors import UserError


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_id", default="", help="a train run: its adapter, model and quantization")
    parser.add_argument("--adapter", default="", help="an adapter folder, or none for the base model alone")
    parser.add_argument("--model", default="", help="the base model (default: the run's, else smollm2-135m)")
    parser.add_argument("--quantization", default="", help="default: the run's, else bf16")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if bool(args.run_id) == bool(args.adapter):
        raise UserError("give exactly one of --run_id and --adapter (a folder, or none for the base model alone)")
    if args.max_new_tokens < 1:
        raise UserError(f"max_new_tokens={args.max_new_tokens} is invalid: an integer >= 1")

    from transformers.utils import logging as hf_logging

    from lora_efficiency.inference import (
        check_adapter_folder,
        download_adapter,
        generate,
        load_for_inference,
        train_run,
    )
    from lora_efficiency.models import BUNDLED_MODEL, QUANTIZATIONS
    from lora_efficiency.trainer import resolve_device

    hf_logging.disable_progress_bar()
    model, quantization, adapter = args.model, args.quantization, None
    if args.run_id:
        params = train_run(args.run_id).data.params
        model, quantization = model or params.get("model", ""), quantization or params.get("quantization", "")
        adapter = download_adapter(args.run_id)
    elif args.adapter != "none":
        adapter = check_adapter_folder(args.adapter)
    quantization = quantization or "bf16"
    if quantization not in QUANTIZATIONS:
        raise UserError(f"quantization={quantization!r} is invalid: one of {', '.join(QUANTIZATIONS)}")
    device = resolve_device(args.device)
    network, tokenizer, _ = load_for_inference(
        model=model or BUNDLED_MODEL, adapter=adapter, quantization=quantization, device=device
    )
    print(generate(network, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, device=device))


if __name__ == "__main__":
    run_cli(main)
