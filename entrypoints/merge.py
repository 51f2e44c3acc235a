"""Merge a LoRA adapter into its (unquantized) base and write one model folder, loadable without peft.

python -m entrypoints.merge --run_id <train run id> --output merged/
python -m entrypoints.merge --adapter path/to/adapter --model smollm2-135m --output merged/ --dtype fp32
"""

from __future__ import annotations

import argparse

from lora_efficiency.cli import run_cli
from lora_efficiency.errors import UserError


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_id", default="", help="a train run: its adapter and model")
    parser.add_argument("--adapter", default="", help="an adapter folder")
    parser.add_argument("--model", default="", help="the base model (default: the run's, else smollm2-135m)")
    parser.add_argument("--output", required=True, help="a new folder for the merged model")
    parser.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32")
    args = parser.parse_args(argv)
    if bool(args.run_id) == bool(args.adapter):
        raise UserError("give exactly one of --run_id and --adapter")

    from transformers.utils import logging as hf_logging

    from lora_efficiency.inference import check_adapter_folder, download_adapter, merge, train_run
    from lora_efficiency.models import BUNDLED_MODEL

    hf_logging.disable_progress_bar()
    model = args.model
    if args.run_id:
        model = model or train_run(args.run_id).data.params.get("model", "")
        adapter = download_adapter(args.run_id)
    else:
        adapter = check_adapter_folder(args.adapter)
    out = merge(model=model or BUNDLED_MODEL, adapter=adapter, output_dir=args.output, dtype=args.dtype)
    print(f"merged model written to {out}")


if __name__ == "__main__":
    run_cli(main)
