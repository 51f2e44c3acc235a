"""Checkpoints of a training run: save every N steps, resume with the same batches and the same loss curve."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lora_efficiency.errors import UserError

# A checkpoint folder holds no pickle: the adapter (peft's safetensors), optimizer state and RNG states as
# safetensors, optimizer hyper-parameters, scheduler and progress as JSON.
CHECKPOINT_STATE = "trainer_state.json"


def save_checkpoint(
    folder: Path,
    *,
    step: int,
    peft_model,
    optimizer,
    scheduler,
    scaler,
    losses: list[float],
    config_hash: str,
    seed: int,
    tokens_total: int,
    device: torch.device,
) -> Path:

    folder.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(folder, safe_serialization=True)
    opt = optimizer.state_dict()
    tensors = {f"state.{i}.{k}": v.detach().cpu().contiguous() for i, s in opt["state"].items() for k, v in s.items()}
    tensors["rng.cpu"] = torch.get_rng_state()
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    save_file(tensors, str(folder / "optimizer_rng.safetensors"))
    state = {
        "step": step,
        "seed": seed,
        "config_hash": config_hash,
        "losses": losses,
        "tokens_total": tokens_total,
        "param_groups": opt["param_groups"],
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
    }
    (folder / CHECKPOINT_STATE).write_text(json.dumps(state, indent=1))
    return folder


def load_checkpoint(
    folder: Path, *, peft_model, optimizer, scheduler, scaler, config_hash: str, seed: int, device: torch.device
) -> dict:
    """Restore adapter weights, optimizer, scheduler, scaler and RNG from `folder`; returns its trainer state."""
    try:
        state = json.loads((folder / CHECKPOINT_STATE).read_text())
        tensors = load_file(str(folder / "optimizer_rng.safetensors"))
        adapter = load_file(str(folder / "adapter_model.safetensors"))
    except (OSError, ValueError, SafetensorError) as exc:
        raise UserError(f"resume_from={str(folder)!r} is not a readable checkpoint: {exc}") from None
    if (state.get("config_hash"), state.get("seed")) != (config_hash, seed):
        raise UserError(
            f"resume_from={str(folder)!r} was trained with other settings (config_hash {state.get('config_hash')}, "
            f"seed {state.get('seed')}; this run: {config_hash}, seed {seed}): resume with the same settings"
        )
    set_peft_model_state_dict(peft_model, adapter)
    opt_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            opt_state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    return state


class Checkpointer:
    """A training callback: every `every` steps, save a checkpoint in `folder/step-NNNNNN/` (a temporary folder
    when None, deleted once logged) and log it as the artifact `checkpoints/step-NNNNNN`."""

    def __init__(self, session, *, every: int, folder: str | Path | None, tracker):
        self.session, self.every, self.tracker = session, every, tracker
        self.keep = folder is not None
        self.folder = Path(folder) if folder else None  # a temporary folder at the first checkpoint

    def __call__(self, stats) -> None:
        if stats.step % self.every:
            return
        s = self.session
        self.folder = self.folder or Path(tempfile.mkdtemp(prefix="checkpoints-"))
        saved = save_checkpoint(
            self.folder / f"step-{stats.step:06d}",
            step=stats.step,
            peft_model=s.peft_model,
            optimizer=s.optimizer,
            scheduler=s.scheduler,
            scaler=s.scaler,
            losses=s.losses,
            config_hash=s.tags["config_hash"],
            seed=s.cfg.seed,
            tokens_total=s.tokens_total,
            device=s.device,
        )
        self.tracker.log_artifacts(str(saved), f"checkpoints/{saved.name}")
        if not self.keep:  # logged; the temporary copy is not needed
            shutil.rmtree(saved, ignore_errors=True)
