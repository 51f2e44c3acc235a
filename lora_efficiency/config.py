"""Typed settings of the entry points, read from configs/default.yaml plus overrides, checked when parsed."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from lora_efficiency.errors import ConfigError, UserError, invalid, shown
from lora_efficiency.inputs import load_yaml, path_kind, read_yaml_file  # noqa: F401 - load_yaml: kept for its callers
from lora_efficiency.names import KNOWN_SETS, PRESETS, QUANTIZATIONS, is_valid_target_spec, model_name_problem
from lora_efficiency.settings import (
    DEVICE,
    GROUPS,
    SEED_MAX,
    TrainConfig,
    flattened,
    from_flat,
    grouped,
    setting,
    setting_fields,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULTS_FILE = CONFIG_DIR / "default.yaml"
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}
RUN_ID = re.compile(r"[0-9a-f]{32}")  # an MLflow run id


def parse_bool(text: object) -> bool | None:
    """true/1/yes/on -> True, false/0/no/off -> False (any case), a bool as itself; anything else -> None."""
    if isinstance(text, bool):
        return text
    word = str(text).strip().lower()
    return True if word in _TRUE else False if word in _FALSE else None


def is_run_id(text: str) -> bool:
    return RUN_ID.fullmatch(text) is not None


# runs:/<run id>/<artifact path> and models:/<name>@<alias> or models:/<name>/<version>, as MLflow writes them
MODEL_URI = re.compile(r"runs:/[0-9a-f]{32}(/[\w.-]+)*/?|models:/[^/@]+(@[\w-]+|/\d+)")


def is_model_uri(text: str) -> bool:
    return MODEL_URI.fullmatch(text) is not None


def _checker(v: dict[str, Any], problems: list[str]):
    """check(name, ok, allowed): records a problem when field `name` was converted and fails `ok`."""

    def check(name: str, ok, allowed: str) -> None:
        if name in v and not ok(v[name]):
            problems.append(invalid(name, v[name], allowed))

    return check


def is_path(value: str | Path, kind: str) -> bool:
    """Whether `value` names an existing file, folder or either ("any"); False for a name the OS refuses (longer
    than NAME_MAX, a NUL byte) rather than an exception."""
    try:
        path = Path(value)
        return {"file": path.is_file, "dir": path.is_dir, "any": path.exists}[kind]()
    except (OSError, ValueError):
        return False


REPORTS_DIR = Path("reports")


def report_folder(experiment: str) -> Path:
    """reports/<experiment>, the name made one plain component: `../../x` or `..` stays inside reports/."""
    name = re.sub(r"[^\w.-]", "_", experiment).lstrip(".")[:100] or "_"
    return REPORTS_DIR / name


NAME_MAX, PATH_MAX = 255, 4096  # bytes of one path component and of a whole path (Linux)


def is_output_path(value: str, kind: str) -> bool:
    """Whether `value` can be created as an output of `kind` ("dir" or "file"): a name the OS takes (no NUL, no
    component over NAME_MAX bytes) that is not already something else (`--output /dev/null` for a folder)."""
    try:
        encoded = [len(part.encode("utf-8", "surrogateescape")) for part in Path(value).parts]
        if (
            "\x00" in value
            or len(value.encode("utf-8", "surrogateescape")) > PATH_MAX
            or max(encoded, default=0) > NAME_MAX
        ):
            return False
        path = Path(value)
        return not path.exists() or (path.is_dir() if kind == "dir" else path.is_file())
    except (OSError, ValueError):
        return False


INT_DIGITS = 18  # |n| < 10^18 fits int64 (torch, numpy, SQLite); Python refuses to parse ints of 4,300+ digits
FULL_FT_STORAGES = ("bf16", "fp16", "fp32")


def train_problems(v: dict[str, Any]) -> list[str]:
    """Checks of TrainConfig values: each group's own (settings.py, beside the fields), then the names, files and
    runs they name and what one setting allows of another. Fields that failed conversion are absent and skipped."""
    p: list[str] = []
    check = _checker(v, p)
    for group in GROUPS.values():
        for name, ok, allowed in group.checks():
            check(name, ok, allowed)
    check("quantization", lambda x: x in QUANTIZATIONS, f"one of {', '.join(QUANTIZATIONS)}")
    modules = f"one of {', '.join(PRESETS)} or a comma list of module names, none empty"
    check("target_modules", is_valid_target_spec, modules)
    if v.get("eval_every", 0) > v.get("max_steps", 1 << 62) >= 1:
        p.append(invalid("eval_every", v["eval_every"], f"0 or an integer from 1 to max_steps={v['max_steps']}"))
    if v.get("method") == "full" and (v.get("checkpoint_every") or v.get("resume_from")):
        p.append(
            f"method='full' is invalid with checkpoint_every={v.get('checkpoint_every')} or "
            f"resume_from={v.get('resume_from')!r}: checkpoints hold LoRA adapters only"
        )
    if v.get("method") == "full" and v.get("quantization") not in (None, *FULL_FT_STORAGES):
        p.append(
            f"method='full' is invalid with quantization={v['quantization']!r}: full fine-tuning trains every "
            f"weight, so the base must be stored in {', '.join(FULL_FT_STORAGES)} (4- and 8-bit weights cannot train)"
        )
    if v.get("num_processes", 1) > 1:
        if v.get("checkpoint_every") or v.get("resume_from"):
            p.append(
                f"num_processes={v['num_processes']} is invalid with checkpoint_every={v.get('checkpoint_every')} "
                f"or resume_from={v.get('resume_from')!r}: checkpoints are single-process only"
            )
        if re.fullmatch(r"cuda:\d+", v.get("device", "")):
            p.append(
                f"device={v['device']!r} is invalid with num_processes={v['num_processes']}: auto, cpu or cuda "
                "(each process takes the GPU of its local rank)"
            )
    if v.get("sharding") == "fsdp":
        p.extend(fsdp_problems(v))
    check(
        "resume_from",
        lambda x: not x or is_run_id(x) or is_path(Path(x) / "trainer_state.json", "file"),
        "empty, a train run's id (its latest checkpoint) or a checkpoint folder (with trainer_state.json)",
    )
    check(
        "data",
        data_reference_ok,
        "'' (the bundled set), a known set name, a data file, a prepared folder or a prepare run's id",
    )
    if "model" in v and (problem := model_name_problem(v["model"])):
        p.append(problem)
    return p


def fsdp_problems(v: dict[str, Any]) -> list[str]:
    """What sharding=fsdp cannot be combined with, each a line that says what is allowed."""
    p: list[str] = []
    if v.get("num_processes", 2) < 2:
        p.append(
            f"sharding='fsdp' is invalid with num_processes={v['num_processes']}: 2 to 256 processes (one process "
            "has nothing to shard over)"
        )
    if v.get("method", "lora") != "lora":
        p.append(f"sharding='fsdp' is invalid with method={v['method']!r}: lora (the base frozen, the adapter trains)")
    if v.get("quantization") == "int8":
        p.append(
            "sharding='fsdp' is invalid with quantization='int8': nf4, fp4, bf16, fp16 or fp32 (bitsandbytes keeps "
            "an int8 weight's scales on the parameter FSDP replaces: 'Parameter' object has no attribute 'CB')"
        )
    if v.get("eval_every"):
        p.append(
            f"sharding='fsdp' is invalid with eval_every={v['eval_every']}: 0 (the validation curve runs on rank 0 "
            "alone, which holds only a shard of the base)"
        )
    return p


def data_reference_ok(value: str) -> bool:
    return value == "" or value in KNOWN_SETS or is_path(value, "any") or is_run_id(value)


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """Settings of `prepare`; configs/default.yaml documents each field."""

    dataset: str
    model: str
    seq_len: int
    num_samples: int
    eval_fraction: float
    seed: int
    train_on_prompt: bool
    prompt_field: str
    response_field: str
    text_field: str
    trust_remote_code: bool


def prepare_problems(v: dict[str, Any]) -> list[str]:
    p: list[str] = []
    check = _checker(v, p)
    allowed = f"one of {', '.join(KNOWN_SETS)} or an existing .json, .jsonl, .csv or .parquet file"
    kind = path_kind(v["dataset"]) if v.get("dataset") and v["dataset"] not in KNOWN_SETS else None
    if kind not in (None, "a regular file"):  # a folder, a FIFO, a device: say which
        p.append(f"dataset={shown(v['dataset'])} is {kind}, not a file: {allowed}")
    else:
        check("dataset", lambda x: x in KNOWN_SETS or x == "" or is_path(x, "file"), allowed)
    check("seq_len", lambda x: 16 <= x <= 131072, "an integer from 16 to 131072")
    check("num_samples", lambda x: x >= 0, "an integer >= 0 (0: all)")
    check("eval_fraction", lambda x: 0 < x < 1, "a number in (0, 1)")
    check("seed", lambda x: 0 <= x <= SEED_MAX, f"an integer from 0 to {SEED_MAX}")
    if "model" in v and (problem := model_name_problem(v["model"])):
        p.append(problem)
    return p


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Settings of `evaluate`; configs/default.yaml documents each field."""

    run_id: str
    adapter: str
    model: str
    data: str
    quantization: str
    double_quant: bool
    seq_len: int
    eval_samples: int
    generate_samples: int
    max_new_tokens: int
    exact_match: str
    batch_size: int
    device: str
    trust_remote_code: bool


def _one_adapter_source(v: dict[str, Any], p: list[str], choices: str) -> None:
    """evaluate, generate and merge take the adapter from exactly one of a train run (run_id) and `adapter`."""
    run_id, adapter = v.get("run_id", ""), v.get("adapter", "")
    if bool(run_id) == bool(adapter):
        p.append(f"run_id={run_id!r} and adapter={adapter!r}: give exactly one ({choices})")
    _checker(v, p)(
        "run_id",
        lambda x: not x or is_run_id(x) or is_model_uri(x),
        "an MLflow run id (32 hexadecimal characters), runs:/<run id>/model or models:/<name>@<alias>",
    )


def evaluate_problems(v: dict[str, Any]) -> list[str]:
    p: list[str] = []
    check = _checker(v, p)
    _one_adapter_source(v, p, "a train run's id, an adapter folder, or adapter=none for the base model alone")
    check("adapter", lambda x: x in ("", "none") or is_path(x, "dir"), "an existing adapter folder, or none")
    check(
        "quantization", lambda x: not x or x in QUANTIZATIONS, f"empty (the run's) or one of {', '.join(QUANTIZATIONS)}"
    )
    check(
        "data",
        lambda x: not x or data_reference_ok(x),
        "empty (the run's data), a known set name, a data file, a prepared folder or a prepare run's id",
    )
    check("seq_len", lambda x: x == 0 or 16 <= x <= 131072, "0 (the run's) or an integer from 16 to 131072")
    for name in ("eval_samples", "max_new_tokens", "batch_size"):
        check(name, lambda x: x >= 1, "an integer >= 1")
    check("generate_samples", lambda x: x >= 0, "an integer >= 0")
    check("exact_match", lambda x: x in ("auto", "true", "false"), "auto, true or false")
    check("device", DEVICE.fullmatch, "auto, cpu, cuda or cuda:N")
    if v.get("model") and (problem := model_name_problem(v["model"])):
        p.append(problem)
    return p


@dataclasses.dataclass(frozen=True)
class Backend:
    """Where a sweep's children run: the settings `sweep` and `main` share (run_sweep takes them as they are)."""

    backend: str = setting("local (one child after another here) or ray (Ray tasks, concurrently)")
    ray_address: str = setting("backend=ray: empty starts a local Ray instance; auto or ray://host:10001 joins one")
    max_concurrent: int = setting("backend=ray: cap on children at once; 0: as many as the resources allow")
    cpus_per_trial: float = setting("backend=ray: CPUs each child reserves (per training process)")
    gpus_per_trial: str = setting("backend=ray: auto (1 per training process on a cluster with GPUs, else 0) or N")
    warm_children: bool = setting("backend=local: fork each child from a warm server (lora_efficiency.forkserver)")


def backend_options(cfg: Backend) -> dict[str, Any]:
    """The Backend fields of `cfg` (a SweepConfig or StudyConfig), as run_sweep's keyword arguments."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(Backend)}


@dataclasses.dataclass(frozen=True)
class SweepConfig(Backend):
    """Settings of `sweep`; configs/default.yaml documents each field."""

    config: str
    profile: str
    data: str
    device: str


def sweep_problems(v: dict[str, Any]) -> list[str]:
    p: list[str] = []
    check = _checker(v, p)
    kind = path_kind(v["config"]) if v.get("config") else None
    if kind not in (None, "a regular file"):  # a folder, a FIFO, a device: say which
        p.append(f"config={shown(v['config'])} is {kind}, not a file: an existing sweep file")
    check("config", lambda x: kind or is_path(x, "file"), "an existing sweep file, such as configs/sweeps/rank.yaml")
    check(
        "data",
        lambda x: not x or data_reference_ok(x),
        "empty (the sweep file's), a known set name, a data file, a prepared folder or a prepare run's id",
    )
    check("device", lambda x: not x or DEVICE.fullmatch(x), "empty (the sweep file's), auto, cpu, cuda or cuda:N")
    return p + backend_problems(v)


def backend_problems(v: dict[str, Any]) -> list[str]:
    """Where sweep children run: the settings `sweep` and `main` share."""
    p: list[str] = []
    check = _checker(v, p)
    check("backend", lambda x: x in ("local", "ray"), "local (one child after another here) or ray (Ray tasks)")
    if v.get("backend") == "local" and v.get("ray_address"):
        p.append(f"ray_address={v['ray_address']!r} is invalid with backend='local': empty, or set backend=ray")
    check("max_concurrent", lambda x: x >= 0, "an integer >= 0 (0: as many as the Ray cluster's resources allow)")
    check("cpus_per_trial", lambda x: 0 < x <= 1024, "a number of CPUs in (0, 1024]")
    check(
        "gpus_per_trial",
        lambda x: x == "auto" or (re.fullmatch(r"\d+(\.\d+)?", x) is not None and float(x) <= 64),
        "auto (1 per training process when the cluster has GPUs, else 0) or a number of GPUs from 0 to 64",
    )
    return p


@dataclasses.dataclass(frozen=True)
class StudyConfig(Backend):
    """Settings of the whole study (`main`); configs/default.yaml documents each field. Its Backend runs the
    sweeps' children as `sweep` runs them."""

    profile: str
    sweeps: str
    baselines: str
    data: str
    output: str


def is_profile(name: str) -> bool:
    """A profile's name (main's profile=, plan's design=): a file configs/profiles/<name>.yaml."""
    return bool(re.fullmatch(r"\w[\w.-]*", name)) and is_path(CONFIG_DIR / "profiles" / f"{name}.yaml", "file")


def profile_names() -> str:
    return ", ".join(sorted(f.stem for f in (CONFIG_DIR / "profiles").glob("*.yaml")))


def study_problems(v: dict[str, Any]) -> list[str]:
    p: list[str] = []
    check = _checker(v, p)
    check(
        "profile",
        lambda x: not x or is_profile(x),
        f"a profile in configs/profiles/: {profile_names()}",
    )
    check(
        "sweeps",
        lambda x: not x or all(is_path(s.strip(), "file") for s in x.split(",")),
        "empty (the profile's sweeps) or a comma list of sweep files",
    )
    check(
        "baselines",
        lambda x: all(q.strip() in QUANTIZATIONS for q in x.split(",")),
        f"a comma list of quantizations ({', '.join(QUANTIZATIONS)})",
    )
    check(
        "data",
        lambda x: not x or data_reference_ok(x),
        "empty (the bundled set), a known set name, a data file, a prepared folder or a prepare run's id",
    )
    check(
        "output",
        lambda x: not x or is_output_path(x, "dir"),
        f"a folder (empty: reports/<experiment>), not a file or device, no name over {NAME_MAX} bytes",
    )
    return p + backend_problems(v)


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """Settings of `report`; configs/default.yaml documents each field."""

    experiment: str
    sweep_run_id: str
    output: str
    budgets_mb: str
    margin: float
    alpha: float


def report_problems(v: dict[str, Any]) -> list[str]:
    p: list[str] = []
    check = _checker(v, p)
    check(
        "sweep_run_id",
        lambda x: not x or is_run_id(x),
        "empty (the latest study) or a sweep or study run's id (32 hexadecimal characters)",
    )
    check(
        "output",
        lambda x: not x or is_output_path(x, "dir"),
        f"a folder (empty: reports/<experiment>), not a file or device, no name over {NAME_MAX} bytes",
    )
    check(
        "budgets_mb",
        lambda x: all(re.fullmatch(r"\d+(\.\d+)?", b.strip()) and float(b) > 0 for b in x.split(",")) if x else True,
        "empty (round budgets over the measured peaks) or a comma list of MB > 0, such as 4000,8000",
    )
    check("margin", lambda x: x > 1, "a perplexity ratio > 1, the equivalence margin (1.02: within ±2%)")
    check("alpha", lambda x: 0 < x < 0.5, "a level between 0 and 0.5 (exclusive), such as 0.05")
    return p


@dataclasses.dataclass(frozen=True)
class SeedPlan:
    """`plan --design <profile>`: the seeds its declared contrasts need, from a spread given or measured."""

    design: str
    spread_experiment: str
    spread_run_id: str
    sd: float


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """Settings of `plan`: the train settings the estimate depends on, whose defaults are the `train` section's
    (BASE_SECTIONS), and two of its own in the `plan` section; configs/default.yaml documents each field."""

    model: str
    rank: int
    target_modules: str
    quantization: str
    double_quant: bool
    batch_size: int
    seq_len: int
    dropout: float
    gradient_checkpointing: bool
    device: str
    trust_remote_code: bool
    target_fraction: float
    budget_mb: float
    seeds: SeedPlan  # plan --design: the seeds a profile's contrasts need (read flat: --design, --sd)


def plan_problems(v: dict[str, Any]) -> list[str]:
    p = train_problems(v)  # the train fields, checked as train checks them (the others are not in v)
    check = _checker(v, p)
    check("target_fraction", lambda x: 0 < x <= 1, "a number in (0, 1]")
    check("budget_mb", lambda x: x >= 0, "a number of MB > 0, or 0 (the machine's: GPU memory, else available RAM)")
    check(
        "design",
        lambda x: not x or is_profile(x),
        "empty (plan memory) or a profile in configs/profiles/ whose declared contrasts to plan seeds for: "
        + profile_names(),
    )
    check(
        "spread_run_id",
        lambda x: not x or is_run_id(x),
        "empty (the latest study of spread_experiment) or a study or sweep run's id (32 hexadecimal characters)",
    )
    check("sd", lambda x: 0 <= x < 1, "a paired sd of ln-metric differences per seed, such as 0.0148; 0: measured")
    if v.get("design") and not v.get("sd") and not v.get("spread_experiment"):
        p.append(
            "design={!r} needs a spread: --sd (a paired sd of ln-metric differences, such as 0.0148) or "
            "--spread_experiment (an experiment whose earlier runs measured it)".format(v["design"])
        )
    return p


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """Settings of `generate`; configs/default.yaml documents each field."""

    run_id: str
    adapter: str
    model: str
    quantization: str
    prompt: str
    max_new_tokens: int
    device: str


def generate_problems(v: dict[str, Any]) -> list[str]:
    p: list[str] = []
    check = _checker(v, p)
    _one_adapter_source(v, p, "a train run's id, an adapter folder, or adapter=none for the base model alone")
    check(
        "quantization",
        lambda x: not x or x in QUANTIZATIONS,
        f"empty (the run's, else bf16) or one of {', '.join(QUANTIZATIONS)}",
    )
    check("prompt", lambda x: x != "", "a prompt to answer (required)")
    check("max_new_tokens", lambda x: x >= 1, "an integer >= 1")
    check("device", DEVICE.fullmatch, "auto, cpu, cuda or cuda:N")
    if v.get("model") and (problem := model_name_problem(v["model"])):
        p.append(problem)
    return p


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """Settings of `merge`; configs/default.yaml documents each field."""

    run_id: str
    adapter: str
    model: str
    output: str
    dtype: str


def merge_problems(v: dict[str, Any]) -> list[str]:
    p: list[str] = []
    check = _checker(v, p)
    _one_adapter_source(v, p, "a train run's id or an adapter folder")
    check(
        "output",
        lambda x: x != "" and is_output_path(x, "dir"),
        f"a new folder for the merged model (required), no name over {NAME_MAX} bytes",
    )
    check("dtype", lambda x: x in ("bf16", "fp16", "fp32"), "bf16, fp16 or fp32 (merged into unquantized weights)")
    if v.get("model") and (problem := model_name_problem(v["model"])):
        p.append(problem)
    return p


# The benchmark's base storages (lora_efficiency.bench takes them from here: nothing here may import it). No
# fp16: the reference loads an unquantized base in the compute dtype (bf16 on this CPU), so an fp16 table would
# compare unlike storages.
BENCH_MODES = ("bf16", "nf4", "fp4", "int8", "fp32")
# The benchmark's random-weight models of a real model's shape (their shapes: lora_efficiency.bench.recipe).
RANDOM_SHAPE_NAMES = ("llama-3.2-1b-shape",)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Settings of `bench` (`make bench`); configs/default.yaml documents each field."""

    modes: str
    steps: int
    warmup_steps: int
    repeats: int
    batch_size: int
    seq_len: int
    ref_batch_size: int
    model: str
    data: str
    device: str
    profile_steps: int
    startup_launches: int
    output: str
    json: str

    @property
    def mode_list(self) -> list[str]:
        return _bench_modes(self.modes)


def _bench_modes(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def bench_problems(v: dict[str, Any]) -> list[str]:
    p: list[str] = []
    check = _checker(v, p)
    for name in ("output", "json"):
        check(name, lambda x: is_output_path(x, "file"), f"a file to write, no name over {NAME_MAX} bytes")
    check(
        "modes",
        lambda x: _bench_modes(x) and all(m in BENCH_MODES for m in _bench_modes(x)),
        f"a comma list of {', '.join(BENCH_MODES)}",
    )
    for name in ("repeats", "batch_size", "warmup_steps"):
        check(name, lambda x: x >= 1, "an integer >= 1")
    for name in ("ref_batch_size", "profile_steps", "startup_launches"):
        check(name, lambda x: x >= 0, "an integer >= 0")
    if "warmup_steps" in v:
        check("steps", lambda x: x > v["warmup_steps"], f"more than warmup_steps={v['warmup_steps']}")
    check("seq_len", lambda x: 16 <= x <= 131072, "an integer from 16 to 131072")
    if "model" in v and v["model"] not in RANDOM_SHAPE_NAMES and (problem := model_name_problem(v["model"])):
        p.append(f"{problem}, or one of the random-weight shapes {', '.join(RANDOM_SHAPE_NAMES)}")
    check("data", data_reference_ok, "'' (the bundled set), a known set name, a data file or folder")
    check("device", DEVICE.fullmatch, "auto, cpu, cuda or cuda:N")
    return p


CHECKS = {
    ReportConfig: report_problems,
    StudyConfig: study_problems,
    SweepConfig: sweep_problems,
    TrainConfig: train_problems,
    PrepareConfig: prepare_problems,
    EvaluateConfig: evaluate_problems,
    PlanConfig: plan_problems,
    GenerateConfig: generate_problems,
    MergeConfig: merge_problems,
    BenchConfig: bench_problems,
}
# Entry points whose settings are partly another's: a field their own section leaves out takes that section's
# default (`plan` plans the default training run unless told otherwise).
BASE_SECTIONS = {PlanConfig: "train"}


def convert(field: str, raw: Any, kind: type) -> tuple[Any, str | None]:
    """Turn a YAML or command-line value into `kind`; returns (value, problem)."""
    if isinstance(raw, (list, tuple, dict, set)):  # checked before str(raw) builds it: every field is one value
        return None, invalid(field, raw, f"one {kind.__name__} value, not a {type(raw).__name__}")
    if isinstance(raw, int) and not isinstance(raw, bool) and abs(raw) >= 10**INT_DIGITS:  # from YAML
        return None, invalid(field, raw, f"an integer of at most {INT_DIGITS} digits")
    text = str(raw).strip()
    if kind is bool:
        value = parse_bool(raw)
        return (value, None) if value is not None else (None, invalid(field, raw, "true or false"))
    if kind is int:
        if isinstance(raw, bool) or not re.fullmatch(r"[+-]?\d+", text):
            return None, invalid(field, raw, "an integer")
        if len(text.lstrip("+-").lstrip("0")) > INT_DIGITS:
            return None, invalid(field, raw, f"an integer of at most {INT_DIGITS} digits")
        return int(text), None
    if kind is float:
        try:
            value = float(text)
        except ValueError:
            return None, invalid(field, raw, "a number")
        if value != value or value in (float("inf"), float("-inf")):
            return None, invalid(field, raw, "a finite number")
        return value, None
    if raw is None:
        return "", None
    return text if isinstance(raw, str) else str(raw), None


def read_mapping(path: str | Path, what: str) -> dict:
    """The one reader of this project's YAML files (defaults, settings files, sweep files, profiles): a regular file
    of at most 1 MiB holding YAML without aliases (inputs.read_yaml_file) whose document is a mapping, else one
    UserError line naming the setting `what` that named the file."""
    loaded = read_yaml_file(path, what)
    if not isinstance(loaded, dict):
        raise UserError(f"{what}={shown(str(path))} must hold a mapping, found {type(loaded).__name__}")
    return loaded


def read_defaults(section: str, path: Path = DEFAULTS_FILE) -> dict[str, Any]:
    loaded = read_mapping(path, "defaults")
    if not isinstance(loaded.get(section), dict):
        raise UserError(f"defaults={shown(str(path))} has no mapping named {section!r}")
    return loaded[section]


def build_config(cls: type, values: dict[str, Any]):
    """Convert and check every field; all problems are collected and raised together as one ConfigError."""
    hints = {f.name: kind for f, kind in setting_fields(cls)}
    names = list(hints)
    problems = [f"unknown setting {k!r}: allowed are {', '.join(names)}" for k in values if k not in hints]
    converted = {}
    for name in names:
        if name not in values:
            problems.append(f"{name} is missing: set it in {DEFAULTS_FILE.name} or pass --{name}")
            continue
        value, problem = convert(name, values[name], hints[name])
        if problem:
            problems.append(problem)
        else:
            converted[name] = value
    problems += CHECKS[cls](converted)
    if problems:
        raise ConfigError(problems)
    return from_flat(cls, converted)


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (`--rank` with no value) as one UserError line, not usage text and exit."""

    def error(self, message: str):
        raise UserError(f"{message}: every setting is --name value (--help lists them)")


# A run's settings file: every train setting it ran with (`train`) and what was found when it started
# (`resolved`: the base model's content revision, the data's fingerprint, config_hash), logged by every train run.
SETTINGS_FILE = "settings.yaml"


def settings_text(cfg: TrainConfig, resolved: dict[str, Any] | None = None, note: str = "") -> str:
    """A settings file for `cfg`: `python -m entrypoints.train --config <it>` trains the same run again (a
    `resolved` section is a record, not read back: what the model and data ARE when it ran)."""
    body: dict[str, Any] = {"train": grouped(cfg.flat())}
    if resolved:
        body["resolved"] = dict(resolved)
    header = f"# {note}\n" if note else ""
    header += "# Rerun: python -m entrypoints.train --config <this file> [--name value to change one setting]\n"
    return header + yaml.safe_dump(body, sort_keys=False, allow_unicode=True)


def read_settings_file(ref: str) -> dict[str, Any]:
    """The `train` settings of a settings file (by group, or flat), a path or runs:/<run id>/settings.yaml
    (downloaded), as flat values."""
    path = ref
    if ref.startswith("runs:/"):
        import mlflow.artifacts  # lazy: MLflow's import costs ~1 s and only this form of --config needs it

        try:
            path = mlflow.artifacts.download_artifacts(artifact_uri=ref)
        except Exception as exc:  # MlflowException, OSError: a missing run or artifact, an unreachable store
            raise UserError(f"config={ref!r} could not be downloaded: {str(exc).splitlines()[0]}") from None
    loaded = read_mapping(path, "config")
    unknown = sorted(set(loaded) - {"train", "resolved"})
    if unknown or not isinstance(loaded.get("train"), dict):
        raise UserError(
            f"config={ref!r} is invalid: a settings file holds a `train` mapping (and a `resolved` record), "
            f"found keys {', '.join(map(str, loaded)) or 'none'}"
        )
    values, problems = flattened(loaded["train"])
    if problems:
        raise ConfigError([f"config={ref!r}: {p}" for p in problems])
    return values


# Settings classes that take `--config FILE`: a settings file between the defaults and the flags
SETTINGS_FILES = (TrainConfig,)


def parse_args(cls: type, section: str, argv: list[str], description: str):
    """`--field value` for every dataclass field, over the defaults file (`--defaults FILE` to use another) and,
    for train, a settings file (`--config FILE`: a run's settings.yaml); a flag given wins over both."""
    parser = _Parser(description=description)
    parser.add_argument("--defaults", default=str(DEFAULTS_FILE), help=f"YAML file with a {section!r} section")
    if cls in SETTINGS_FILES:
        parser.add_argument("--config", default="", help=f"a run's {SETTINGS_FILE} (a path or runs:/<id>/...)")
    for f, kind in setting_fields(cls):
        help_text = f"{f.metadata.get('help', '')} (type {kind.__name__})".lstrip()
        parser.add_argument(f"--{f.name}", default=None, help=help_text)
    args, unknown = parser.parse_known_args(argv)
    given = vars(args)
    defaults_file = Path(given.pop("defaults"))
    settings_file = given.pop("config") if cls in SETTINGS_FILES else ""  # SweepConfig's `config` is a field
    if unknown:
        names = ", ".join(f.name for f, _ in setting_fields(cls))
        extra = "--defaults, --config" if cls in SETTINGS_FILES else "--defaults"
        raise UserError(f"unknown argument {' '.join(unknown)!r}: allowed are {extra} and --{{{names}}}")
    values = {}
    if cls in BASE_SECTIONS:
        base = read_defaults(BASE_SECTIONS[cls], defaults_file)
        values = {f.name: base[f.name] for f, _ in setting_fields(cls) if f.name in base}
    values.update(read_defaults(section, defaults_file))
    if settings_file:
        values.update(read_settings_file(settings_file))
    values.update({k: v for k, v in given.items() if v is not None})
    return build_config(cls, values)
