"""The shared trainer on a tiny Llama: what it logs, determinism, every quantization mode, adapter reload."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from lora_efficiency.config import TrainConfig
from lora_efficiency.models import load_base_model, resolve_model
from lora_efficiency.settings import setting_fields
from lora_efficiency.trainer import train

STEP_METRICS = {
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "perf/tokens_per_second",
    "perf/step_time_ms",
    "memory/current_mb",
}
SUMMARY_METRICS = {
    "eval/loss",
    "eval/perplexity",
    "memory/peak_mb",
    "params/trainable",
    "params/total",
    "adapter/size_mb",
    "time/train_s",
    "perf/train_tokens_per_second",
}


class RecordingTracker:
    def __init__(self):
        self.params, self.tags, self.steps, self.summary, self.texts, self.artifacts = {}, {}, [], {}, {}, {}

    def log_params(self, params):
        self.params.update(params)

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_metrics(self, metrics, step=None):
        (self.steps.append((step, metrics)) if step is not None else self.summary.update(metrics))

    def log_text(self, text, artifact_file):
        self.texts[artifact_file] = text

    def log_artifacts(self, local_dir, artifact_path):
        self.artifacts[artifact_path] = sorted(os.listdir(local_dir))

    def log_table(self, data, artifact_file):
        self.texts[artifact_file] = data

    def log_data_inputs(self, manifest, prepared_path):
        self.inputs = (manifest["fingerprint"], prepared_path)


def run(tiny_model_dir, tiny_data_file, tmp_path, **overrides):
    kwargs = dict(
        model=resolve_model(str(tiny_model_dir)),
        data=str(tiny_data_file),
        max_steps=3,
        batch_size=2,
        seq_len=256,
        eval_samples=8,
        generate_samples=4,
        max_new_tokens=8,
        quantization="fp32",
        output_dir=str(tmp_path / "adapter"),
    )
    kwargs.update(overrides)
    tracker = kwargs.setdefault("tracker", RecordingTracker())
    return train(**kwargs), tracker


def test_logs_every_setting_metric_tag_and_artifact(tiny_model_dir, tiny_data_file, tmp_path):
    result, tracker = run(tiny_model_dir, tiny_data_file, tmp_path, quantization="nf4", exact_match="true")
    config_fields = {f.name for f, _ in setting_fields(TrainConfig)} - {"model", "device"}
    assert config_fields <= set(tracker.params)
    assert tracker.params["target_modules_resolved"] == "k_proj,o_proj,q_proj,v_proj"
    assert tracker.params["device_resolved"] == "cpu"
    assert [s for s, _ in tracker.steps] == [1, 2, 3]
    assert all(set(m) == STEP_METRICS for _, m in tracker.steps)
    assert set(tracker.summary) >= SUMMARY_METRICS
    assert {"config_hash", "base_model", "base_model_revision", "data_fingerprint", "device_name"} <= set(tracker.tags)
    assert tracker.artifacts["adapter"] == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "base_model.json",
        "chat_template.jinja",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    card = (Path(result.adapter_dir) / "README.md").read_text()
    assert "| `rank` | 16 |" in card and f"| `eval/loss` | {tracker.summary['eval/loss']:.6g} |" in card
    assert tracker.texts["memory_trace.csv"].startswith("seconds,memory_mb\n")
    table = tracker.texts["eval_samples.json"]
    assert len(table["prompt"]) == 4
    assert set(table) == {"prompt", "reference", "output", "correct", "correct_by_kind", "task"}
    assert tracker.summary["eval/exact_match"] == sum(table["correct"]) / 4
    assert tracker.summary["eval/exact_match_by_kind"] == sum(table["correct_by_kind"]) / 4
    # the eval subset is balanced over the file's task families: the 4 answers come from 4 families
    assert len(set(table["task"])) == 4
    for family in set(table["task"]):
        hits = [ok for ok, task in zip(table["correct_by_kind"], table["task"], strict=True) if task == family]
        assert tracker.summary[f"eval/exact_match_by_kind/{family}"] == sum(hits) / len(hits)
        assert tracker.summary[f"eval/perplexity/{family}"] == pytest.approx(
            math.exp(tracker.summary[f"eval/loss/{family}"])
        )
    assert json.loads(tracker.tags["eval_settings"])["eval_order"] == "balanced"
    assert tracker.summary["inference/decode_tokens_per_second"] > 0
    assert "inference/merged_decode_tokens_per_second" not in tracker.summary  # nf4 bases are not merged
    assert "eval_settings" in tracker.tags
    assert tracker.tags["memory_source"] == "rss"  # the CPU's resident set size
    # 2 layers x 4 modules x r16 x (in + out): q 64+64, k 64+32, v 64+32, o 64+64 -> 16 x 448 x 2 = 14,336
    assert tracker.summary["params/trainable"] == 14336
    assert tracker.summary["eval/perplexity"] == pytest.approx(math.exp(tracker.summary["eval/loss"]))
    assert tracker.summary["memory/peak_mb"] >= max(m["memory/current_mb"] for _, m in tracker.steps) > 0
    adapter_mb = tracker.summary["adapter/size_mb"]
    assert adapter_mb < 0.2  # adapter only: the tiny base alone is ~13 MB
    assert result.losses == [m["train/loss"] for _, m in tracker.steps]


def test_same_seed_same_loss_curve(tiny_model_dir, tiny_data_file, tmp_path):
    a, _ = run(tiny_model_dir, tiny_data_file, tmp_path / "a", seed=1, dropout=0.1)
    b, _ = run(tiny_model_dir, tiny_data_file, tmp_path / "b", seed=1, dropout=0.1)
    c, _ = run(tiny_model_dir, tiny_data_file, tmp_path / "c", seed=2, dropout=0.1)
    assert a.losses == b.losses
    assert a.losses != c.losses


@pytest.mark.parametrize(
    "quantization, layer_type",
    [
        ("nf4", "Linear4bit"),
        ("fp4", "Linear4bit"),
        ("int8", "Linear8bitLt"),
        ("bf16", "Linear"),
        ("fp16", "Linear"),
        ("fp32", "Linear"),
    ],
)
def test_every_quantization_mode_trains_on_the_cpu(tiny_model_dir, tiny_data_file, tmp_path, quantization, layer_type):
    result, tracker = run(tiny_model_dir, tiny_data_file, tmp_path, quantization=quantization, max_steps=2)
    assert all(math.isfinite(x) for x in result.losses)
    base = load_base_model(
        resolve_model(str(tiny_model_dir)), quantization=quantization, double_quant=True, device=torch.device("cpu")
    )
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == layer_type
    assert tracker.params["quantization"] == quantization


def test_quantized_bases_take_less_memory(tiny_model_dir):
    source = resolve_model(str(tiny_model_dir))
    size = {
        q: load_base_model(source, quantization=q, double_quant=True, device=torch.device("cpu")).get_memory_footprint()
        for q in ("nf4", "int8", "bf16", "fp32")
    }
    assert size["nf4"] < size["int8"] < size["bf16"] < size["fp32"]


def test_the_saved_adapter_reproduces_eval_loss(tiny_model_dir, tiny_data_file, tmp_path):
    from peft import PeftModel

    from lora_efficiency.data import unpacked
    from lora_efficiency.evaluation import evaluate_loss
    from lora_efficiency.models import load_tokenizer
    from lora_efficiency.prepare import load_prepared

    result, tracker = run(tiny_model_dir, tiny_data_file, tmp_path, quantization="fp32")
    source = resolve_model(str(tiny_model_dir))
    base = load_base_model(source, quantization="fp32", double_quant=True, device=torch.device("cpu"))
    model = PeftModel.from_pretrained(base, result.adapter_dir)
    tokenizer = load_tokenizer(source)
    rows = unpacked(load_prepared(tracker.params["data_path"]).eval)
    reloaded = evaluate_loss(
        model, rows, batch_size=8, pad_id=tokenizer.pad_token_id, device=torch.device("cpu"), autocast_dtype=None
    )
    assert reloaded["eval/loss"] == pytest.approx(result.metrics["eval/loss"], rel=1e-5)
    assert Path(result.adapter_dir, "adapter_model.safetensors").exists()
    assert not list(Path(result.adapter_dir).glob("*.bin"))


def test_a_module_name_the_model_lacks_fails_before_training(tiny_model_dir, tiny_data_file, tmp_path):
    from lora_efficiency.errors import UserError

    with pytest.raises(UserError, match="c_attn matches no linear module"):
        run(tiny_model_dir, tiny_data_file, tmp_path, target_modules="c_attn")


def test_unquantized_runs_also_time_the_merged_model(tiny_model_dir, tiny_data_file, tmp_path):
    result, tracker = run(tiny_model_dir, tiny_data_file, tmp_path, quantization="bf16", max_steps=1)
    assert tracker.summary["inference/merged_decode_tokens_per_second"] > 0
    assert "eval/exact_match" not in tracker.summary  # a local prompt/response file has no known references


def test_exact_match_on_plain_text_is_a_clear_error(tiny_model_dir, tmp_path):
    from lora_efficiency.errors import UserError

    with pytest.raises(UserError, match="exact_match=true but data='python-docs' .* is plain text"):
        run(tiny_model_dir, "python-docs", tmp_path, exact_match="true", max_steps=1)


def test_eval_every_logs_a_validation_curve_and_its_convergence(tiny_model_dir, tiny_data_file, tmp_path):
    result, tracker = run(tiny_model_dir, tiny_data_file, tmp_path, max_steps=5, eval_every=2, val_samples=3)
    # every 2 steps and always the last: a history the MLflow UI plots against the step
    curve = [(step, m) for step, m in tracker.steps if "val/loss" in m]
    assert [step for step, _ in curve] == [2, 4, 5]
    assert all(set(m) == {"val/loss", "val/perplexity"} for _, m in curve)
    assert all(m["val/perplexity"] == pytest.approx(math.exp(m["val/loss"])) for _, m in curve)
    # the declared test: the window starts at the last point at or before step 2.5 (step 2)
    start, end = curve[0][1]["val/loss"], curve[-1][1]["val/loss"]
    assert tracker.summary["val/window_improvement"] == pytest.approx((start - end) / start)
    fall = (start - end) / start
    expected = "improving" if fall >= 0.01 else "worsened" if fall < -0.01 else "converged"
    assert tracker.tags["converged"] == expected
    assert tracker.summary["val/converged"] == float(expected == "converged")
    assert tracker.summary["time/validation_s"] > 0 and tracker.summary["time/evaluation_s"] > 0
    # step metrics (train/...) are unchanged: the validation points come as separate log calls
    assert [s for s, m in tracker.steps if "train/loss" in m] == [1, 2, 3, 4, 5]


def test_without_eval_every_there_is_no_curve_and_no_verdict(tiny_model_dir, tiny_data_file, tmp_path):
    _, tracker = run(tiny_model_dir, tiny_data_file, tmp_path, max_steps=2)
    assert not any("val/loss" in m for _, m in tracker.steps)
    assert "converged" not in tracker.tags and "val/converged" not in tracker.summary


def test_validation_does_not_change_training(tiny_model_dir, tiny_data_file, tmp_path):
    a, _ = run(tiny_model_dir, tiny_data_file, tmp_path / "a", max_steps=4, dropout=0.1)
    b, _ = run(tiny_model_dir, tiny_data_file, tmp_path / "b", max_steps=4, dropout=0.1, eval_every=1)
    assert a.losses == b.losses
    assert a.metrics["eval/loss"] == pytest.approx(b.metrics["eval/loss"], rel=1e-6)


def test_full_fine_tuning_trains_every_weight_and_logs_no_adapter(tiny_model_dir, tiny_data_file, tmp_path):
    result, tracker = run(tiny_model_dir, tiny_data_file, tmp_path, method="full", output_dir=None, max_steps=2)
    source = resolve_model(str(tiny_model_dir))
    base = load_base_model(source, quantization="fp32", double_quant=True, device=torch.device("cpu"))
    n = sum(p.numel() for p in base.parameters())
    assert tracker.summary["params/trainable"] == tracker.summary["params/total"] == n
    assert tracker.summary["params/trainable_fraction"] == 1.0
    assert "adapter" not in tracker.artifacts and "adapter/size_mb" not in tracker.summary
    assert "memory/predicted_peak_mb" not in tracker.summary  # the planner models LoRA only
    assert tracker.params["method"] == "full" and tracker.tags["method"] == "full"
    assert tracker.params["target_modules_resolved"] == "*"
    assert math.isfinite(tracker.summary["eval/loss"]) and all(math.isfinite(x) for x in result.losses)
    lora, _ = run(tiny_model_dir, tiny_data_file, tmp_path / "lora", max_steps=2)
    assert tracker.tags["config_hash"] != lora.tags["config_hash"]


def test_the_base_provenance_is_recorded(tiny_model_dir, tiny_data_file, tmp_path):
    _, tracker = run(tiny_model_dir, tiny_data_file, tmp_path, max_steps=1)
    assert tracker.tags["base_gguf_type"] == ""  # an original checkpoint, saved by the fixture
    assert tracker.tags["base_checkpoint_dtype"] in ("float32", "bfloat16")
    assert "as published" in tracker.tags["base_provenance"]


@pytest.mark.parametrize("model_dir", ["tiny_granite_dir", "tiny_gemma2_dir"])
def test_a_run_on_scaled_logits_logs_the_models_own_eval_loss(model_dir, tiny_data_file, tmp_path, request):
    """Granite divides its logits by logits_scaling, Gemma-2 soft-caps them: the run's eval/loss is still
    model(**batch, labels=...)'s."""
    from peft import PeftModel

    from lora_efficiency.prepare import load_prepared

    folder = request.getfixturevalue(model_dir)
    result, tracker = run(folder, tiny_data_file, tmp_path, quantization="fp32")
    base = load_base_model(
        resolve_model(str(folder)), quantization="fp32", double_quant=True, device=torch.device("cpu")
    )
    model = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    held_out = load_prepared(tracker.params["data_path"]).eval
    total, count = 0.0, 0
    for ids, labels in zip(held_out.input_ids, held_out.labels, strict=True):
        n = sum(label != -100 for label in labels[1:])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        total, count = total + float(loss) * n, count + n
    assert result.metrics["eval/tokens"] == count
    assert result.metrics["eval/loss"] == pytest.approx(total / count, abs=1e-5)


@pytest.mark.parametrize("quantization", ["nf4", "bf16"])
def test_a_validation_during_training_leaves_the_training_unchanged(
    tiny_model_dir, tiny_data_file, tmp_path, quantization
):
    # bitsandbytes 0.50 repacks a 4-bit weight for its CPU inference kernel on the first forward in eval mode
    # (AVX512-BF16 CPUs) and never unpacks it; that kernel has no backward, so every later step trained on cut
    # gradients (the 2026-12-02/03 standard studies: QLoRA's validation loss rose after its first validation).
    kwargs = dict(quantization=quantization, max_steps=4, seed=3, val_samples=4, generate_samples=0)
    validated, tracker = run(tiny_model_dir, tiny_data_file, tmp_path / "a", eval_every=1, **kwargs)
    plain, _ = run(tiny_model_dir, tiny_data_file, tmp_path / "b", eval_every=4, **kwargs)
    assert [step for step, m in tracker.steps if "val/loss" in m] == [1, 2, 3, 4]
    assert validated.losses == plain.losses


def test_forgetting_compares_the_trained_model_with_the_base_alone(tiny_model_dir, tiny_data_file, tmp_path):
    from peft import PeftModel

    from lora_efficiency.evaluation import evaluate_loss, forgetting_rows
    from lora_efficiency.models import load_tokenizer

    result, _ = run(tiny_model_dir, tiny_data_file, tmp_path, forget_samples=4, lr=1e-2)
    m = result.metrics
    source = resolve_model(str(tiny_model_dir))
    tokenizer = load_tokenizer(source)
    rows = forgetting_rows(tokenizer, samples=4, seq_len=256)
    scoring = dict(batch_size=8, pad_id=tokenizer.pad_token_id, device=torch.device("cpu"), autocast_dtype=None)
    base = load_base_model(source, quantization="fp32", double_quant=True, device=torch.device("cpu"))
    # before the first step: the base alone (LoRA's B is zero); after: base + the trained adapter
    assert evaluate_loss(base, rows, **scoring)["eval/perplexity"] == pytest.approx(m["forget/base_perplexity"])
    trained = evaluate_loss(PeftModel.from_pretrained(base, result.adapter_dir), rows, **scoring)
    assert trained["eval/perplexity"] == pytest.approx(m["forget/perplexity"], rel=1e-5)
    assert m["forget/ratio"] == pytest.approx(m["forget/perplexity"] / m["forget/base_perplexity"])
    assert abs(m["forget/ratio"] - 1) > 1e-4  # three steps at lr 1e-2 moved it


def test_no_forgetting_is_measured_when_off_or_on_the_forgetting_text_itself(tiny_model_dir, tiny_data_file, tmp_path):
    result, _ = run(tiny_model_dir, tiny_data_file, tmp_path, forget_samples=0)
    assert not any(k.startswith("forget/") for k in result.metrics)
    result, _ = run(tiny_model_dir, "python-docs", tmp_path, forget_samples=4, exact_match="false")
    assert not any(k.startswith("forget/") for k in result.metrics)


def test_the_base_forgetting_score_is_scored_once_per_key_and_no_speed_pass_without_generation(
    tiny_model_dir, tiny_data_file, tmp_path, monkeypatch
):
    """The score before the first step is the base's: a second run with the same base, storage, forgetting set and
    batches reads it from the cache (one forgetting pass instead of two, the same number); a run on another key
    (seq_len: other passages) scores it again. generate_samples=0 asks for no answers: no generation-speed pass."""
    import lora_efficiency.trainer as trainer_module

    monkeypatch.setenv("LORA_EFFICIENCY_CACHE", str(tmp_path / "cache"))
    passes = []
    scored = trainer_module.evaluate_loss

    def counting(model, rows, **scoring):
        passes.append(len(rows))
        return scored(model, rows, **scoring)

    monkeypatch.setattr(trainer_module, "evaluate_loss", counting)
    kwargs = dict(forget_samples=2, max_steps=1, eval_samples=4, generate_samples=0)
    results = {}
    for name, overrides in (("first", {}), ("other_seed", {"seed": 1}), ("other_seq_len", {"seq_len": 128})):
        passes.clear()
        result, tracker = run(tiny_model_dir, tiny_data_file, tmp_path / name, **kwargs, **overrides)
        results[name] = (len(passes), tracker.tags["forget_base_cached"], result.metrics)
    assert results["first"][:2] == (2, "false")
    assert results["other_seed"][:2] == (1, "true")
    assert results["other_seq_len"][:2] == (2, "false")
    first, again = results["first"][2], results["other_seed"][2]
    assert again["forget/base_perplexity"] == first["forget/base_perplexity"]
    assert again["forget/ratio"] == pytest.approx(again["forget/perplexity"] / first["forget/base_perplexity"])
    assert len(list((tmp_path / "cache" / "scores").glob("forgetting-base-*.json"))) == 2
    for _, _, metrics in results.values():
        assert not any(k.startswith("inference/") for k in metrics)  # generate_samples=0: no speed pass
        # the phases of the report's time split, each logged
        assert all(metrics[f"time/{p}_s"] > 0 for p in ("setup", "train", "evaluation", "forgetting", "logging"))


@pytest.mark.slow
def test_compiled_layers_train_to_the_eager_loss(tiny_model_dir, tiny_data_file, tmp_path, monkeypatch):
    """compile=true: the decoder layers run through inductor in the training step, with the eager step's loss
    (fp32: measured 9e-7 apart on a loss of ~12, so 1e-5 relative); compile=false compiles nothing."""
    from torch._dynamo.utils import counters

    from lora_efficiency import models, trainer

    compiled: list[int] = []
    monkeypatch.setattr(trainer, "compile_layers", lambda m: compiled.append(models.compile_layers(m)))
    quick = dict(eval_samples=2, generate_samples=0, forget_samples=0, seq_len=128)
    eager, _ = run(tiny_model_dir, tiny_data_file, tmp_path / "eager", compile=False, **quick)
    assert compiled == []
    counters.clear()
    fused, tracker = run(tiny_model_dir, tiny_data_file, tmp_path / "compiled", compile=True, **quick)
    assert compiled == [2]  # the tiny Llama's two decoder layers
    assert counters["stats"]["unique_graphs"] > 0  # inductor compiled graphs, so the layers did not run eagerly
    assert fused.losses == pytest.approx(eager.losses, rel=1e-5)
    assert tracker.params["compile"] is True
    assert tracker.summary["time/first_step_s"] > 0
