"""A small tracking store in the shape the study leaves, with known metric values, for the report's tests.

One study run holds a baseline (nf4, no adapter) and two sweeps. The rank sweep trains r4, r8 and r16 on the
attention matrices of an nf4 base, three seeds each; the quantization sweep trains bf16 at r16 (three seeds),
skips nf4 at r16 (the rank sweep FINISHED it) and loses fp4 seed 0 to a failure. bf16 runs log no exact match;
r4 seed 2 names a model folder that is gone.

    perplexity by seed      mean   95% interval (t = 4.303 for 2 degrees of freedom)   peak memory (MB)
    r4   4.00 4.10 4.20     4.10   [3.852, 4.348]                                       990 1000 1010
    r8   3.50 3.60 3.70     3.60   [3.352, 3.848]                                      1005 1010 1015
    r16  3.52 3.62 3.72     3.62   [3.372, 3.868]                                      1015 1020 1025
    bf16 3.55 3.57 3.59     3.57   [3.520, 3.620]                                      1490 1500 1510

Pareto front of perplexity against peak memory: r4 -> r8 -> bf16 (r16 costs more memory than r8 and is not
better). r8 vs r16 differs by 0.02, far inside the noise; r4 vs r16 by 0.48, beyond it.
"""

from __future__ import annotations

import hashlib
import time

from mlflow.entities import Metric, Param, RunTag

PERPLEXITY = {
    "r4": [4.00, 4.10, 4.20],
    "r8": [3.50, 3.60, 3.70],
    "r16": [3.52, 3.62, 3.72],
    "bf16": [3.55, 3.57, 3.59],
}
PEAK_MB = {"r4": [990, 1000, 1010], "r8": [1005, 1010, 1015], "r16": [1015, 1020, 1025], "bf16": [1490, 1500, 1510]}
EXACT_MATCH = {"r4": [0.1, 0.2, 0.3], "r8": [0.3, 0.4, 0.5], "r16": [0.3, 0.4, 0.5]}  # bf16: not measured
SETTINGS = {"r4": (4, "nf4"), "r8": (8, "nf4"), "r16": (16, "nf4"), "bf16": (16, "bf16"), "fp4": (16, "fp4")}
EVAL_SETTINGS = '{"data_fingerprint": "fp0", "eval_samples": 8, "generate_samples": 4, "max_new_tokens": 4}'
BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def train_params(
    rank: int, quantization: str, seed: int, *, model: str = "smollm2-135m", max_steps: int = 3, lr: float = 0.0002
) -> dict:
    """What a train run logs as params (the settings the report reads)."""
    return {
        "model": model,
        "data": "",
        "rank": rank,
        "alpha": 32.0,
        "dropout": 0.05,
        "target_modules": "attention",
        "target_modules_resolved": "k_proj,o_proj,q_proj,v_proj",
        "quantization": quantization,
        "double_quant": True,
        "use_rslora": False,
        "use_dora": False,
        "max_steps": max_steps,
        "batch_size": 4,
        "grad_accum": 1,
        "lr": lr,
        "warmup_ratio": 0.1,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "seq_len": 256,
        "packing": True,
        "train_on_prompt": False,
        "gradient_checkpointing": False,
        "seed": seed,
        "trust_remote_code": False,
        "device_resolved": "cpu",
        "base_model": BASE_MODEL,
        "data_fingerprint": "fp0",
    }


def _log(client, run_id: str, *, params=None, metrics=None, tags=None, history=None) -> None:
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()]
        + [Metric("train/loss", v, now, step) for step, v in enumerate(history or [], 1)],
        params=[Param(k, str(v)) for k, v in (params or {}).items()],
        tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
    )


def add_child(client, experiment_id: str, parent_id: str, name: str, seed: int, *, status="FINISHED", **extra):
    """One sweep child: config `name` (r4, r8, r16, bf16, fp4) at `seed`, with its known metrics."""
    rank, quantization = SETTINGS[name]
    params = train_params(rank, quantization, seed, **extra)
    config_hash = hashlib.sha256(f"{rank}-{quantization}-{params['max_steps']}".encode()).hexdigest()[:16]
    tags = {
        "mlflow.parentRunId": parent_id,
        "sweep_name": "rank" if name in ("r4", "r8", "r16") else "quantization",
        "sweep_key": hashlib.sha256(f"{config_hash}-{seed}".encode()).hexdigest()[:16],
        "sweep_configuration": f"rank={rank},seed={seed}"
        if quantization == "nf4"
        else f"quantization={quantization},seed={seed}",
        "seed": str(seed),
    }
    run = client.create_run(experiment_id, run_name=f"r{rank}-attention-{quantization}-s{seed}", tags=tags)
    run_id = run.info.run_id
    if status != "FINISHED":
        _log(client, run_id, tags={"error": "killed by signal 9 (out of memory?)"})
        client.set_terminated(run_id, status)
        return run_id
    metrics = {
        "eval/perplexity": PERPLEXITY[name][seed],
        "memory/peak_mb": PEAK_MB[name][seed],
        "params/trainable": 115_200 * rank,
        "perf/train_tokens_per_second": 500 + 10 * seed,
    }
    if name in EXACT_MATCH:
        metrics["eval/exact_match"] = EXACT_MATCH[name][seed]
    run_tags = {
        "config_hash": config_hash,
        "eval_settings": EVAL_SETTINGS,
        "device_name": "cpu (test)",
        "quantization": quantization,
        "base_model": BASE_MODEL,
    }
    _log(client, run_id, params=params, metrics=metrics, tags=run_tags, history=[2.0, 1.5 - 0.1 * seed, 1.2])
    client.set_terminated(run_id, "FINISHED")
    return run_id


def build_study(client, experiment: str) -> dict[str, str]:
    """The study above in a new experiment; returns the ids of the study run and the sweep parents."""
    experiment_id = client.create_experiment(experiment)
    study = client.create_run(
        experiment_id,
        run_name="study-test",
        tags={"entry_point": "main", "study_profile": "test", "data_fingerprint": "fp0"},
    ).info.run_id
    baseline = client.create_run(
        experiment_id,
        run_name="baseline-nf4",
        tags={
            "mlflow.parentRunId": study,
            "baseline": "true",
            "quantization": "nf4",
            "eval_settings": EVAL_SETTINGS,
            "base_model": BASE_MODEL,
        },
    ).info.run_id
    _log(client, baseline, metrics={"eval/perplexity": 6.0, "eval/exact_match": 0.0}, params={"quantization": "nf4"})
    client.set_terminated(baseline, "FINISHED")
    ids = {"study": study}
    for sweep, names, counts in (
        ("rank", ("r4", "r8", "r16"), (9, 9, 0, 0)),
        ("quantization", ("bf16",), (9, 3, 3, 1)),
    ):
        parent = client.create_run(
            experiment_id,
            run_name=f"sweep-{sweep}",
            tags={"mlflow.parentRunId": study, "entry_point": "sweep", "sweep_name": sweep, "data_fingerprint": "fp0"},
        ).info.run_id
        for name in names:
            for seed in range(3):
                # one run whose model folder is gone: the memory estimate skips it with a note
                extra = {"model": "/nonexistent/model"} if (name, seed) == ("r4", 2) else {}
                add_child(client, experiment_id, parent, name, seed, **extra)
        if sweep == "quantization":
            add_child(client, experiment_id, parent, "fp4", 0, status="FAILED")
        names_of_counts = ("children_total", "children_finished", "children_skipped", "children_failed")
        tags = dict(zip(names_of_counts, counts, strict=True))
        _log(client, parent, tags=tags)
        client.set_terminated(parent, "FINISHED")
        ids[sweep] = parent
    client.set_terminated(study, "FINISHED")
    return ids


# a declared contrast as a profile writes it (tests of lora_efficiency.design and of the report built on it)
CONTRAST = {
    "name": "rank r4 vs r16 (all linear)",
    "a": {"rank": 4, "target_modules": "all_linear"},
    "b": {"rank": 16, "target_modules": "all_linear"},
    "test": "equivalence",
    "margin": 0.02,
}
