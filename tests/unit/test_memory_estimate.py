"""The planner's arithmetic on toy configs: weight bytes per storage, LoRA parameter counts, how activations and
the loss workspace scale. Real runs are compared in tests/integration/test_planner.py."""

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from lora_efficiency.models import resolve_target_modules
from lora_efficiency.planner import CPU_BASELINE_MB, CUDA_CONTEXT_MB, MB, estimate
from tests.conftest import tiny_llama_config

# tiny_llama_config(128): hidden 64, intermediate 128, 2 layers, 4 heads of 16, 2 kv heads, a tied 128 x 64
# embedding. A layer's linears: q 64x64 + k 64x32 + v 64x32 + o 64x64 + gate, up, down 3 x 64x128 = 36,864.
LINEAR = 2 * 36_864
OTHER = 128 * 64 + 5 * 64  # the tied embedding; 2 norms a layer and the final norm
OUT_ROWS = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)  # each linear's output rows get one fp32 int8 scale


def plan(config=None, **overrides):
    settings = dict(rank=8, target_modules="attention", quantization="nf4", batch_size=2, seq_len=64)
    settings.update(overrides)
    return estimate(config or tiny_llama_config(128), **settings)


@pytest.mark.parametrize(
    "quantization, double_quant, expected_bytes",
    [
        ("nf4", True, LINEAR * 4.127 / 8 + OTHER * 2),
        ("fp4", True, LINEAR * 4.127 / 8 + OTHER * 2),
        ("nf4", False, LINEAR * 4.5 / 8 + OTHER * 2),
        ("int8", True, LINEAR + OUT_ROWS * 4 + OTHER * 2),
        ("bf16", True, (LINEAR + OTHER) * 2),
        ("fp16", True, (LINEAR + OTHER) * 2),
        ("fp32", True, (LINEAR + OTHER) * 4),
    ],
)
def test_weight_bytes_by_storage(quantization, double_quant, expected_bytes):
    assert plan(quantization=quantization, double_quant=double_quant).weights_mb * MB == pytest.approx(expected_bytes)


def test_nf4_llama_7b_weights_from_a_meta_model():
    # Llama-2-7B: 32 x (4 x 4096^2 + 3 x 4096 x 11,008) = 6,476,005,376 linear weights at 4.127 bits, an untied
    # 32,000 x 4,096 embedding and head and 65 norms of 4,096 in bf16: 3,186 + 500 + 0.5 MB. Built on the meta
    # device, so the 7 B parameters are never allocated.
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        tie_word_embeddings=False,
    )
    expected = 6_476_005_376 * 4.127 / 8 + (2 * 32000 * 4096 + 65 * 4096) * 2
    assert plan(config).weights_mb * MB == pytest.approx(expected)
    assert plan(config).weights_mb == pytest.approx(3_687, abs=1)


@pytest.mark.parametrize("rank", [8, 64])
@pytest.mark.parametrize("preset", ["q_v", "attention", "mlp", "all_linear"])
def test_lora_parameters_match_peft(preset, rank):
    config = tiny_llama_config(128)
    model = AutoModelForCausalLM.from_config(config)
    lora = LoraConfig(r=rank, target_modules=resolve_target_modules(model, preset), task_type="CAUSAL_LM")
    trainable, _ = get_peft_model(model, lora).get_nb_trainable_parameters()
    result = plan(config, rank=rank, target_modules=preset)
    assert result.trainable_params == trainable
    # fp32 weight, grad and two AdamW states, and the bf16 copy autocast makes in the forward (nf4 here)
    assert result.lora_mb * MB == (16 + 2) * trainable
    assert plan(config, rank=rank, target_modules=preset, quantization="fp32").lora_mb * MB == 16 * trainable


def test_lora_parameters_of_gpt2_conv1d_match_peft():
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128)
    model = AutoModelForCausalLM.from_config(config)
    targets = resolve_target_modules(model, "attention")
    lora = LoraConfig(r=4, target_modules=targets, fan_in_fan_out=True, task_type="CAUSAL_LM")
    trainable, _ = get_peft_model(model, lora).get_nb_trainable_parameters()
    assert plan(config, rank=4).trainable_params == trainable == 2 * 4 * ((32 + 96) + (32 + 32))


def test_activations_double_with_the_batch():
    assert plan(batch_size=4).activations_mb == pytest.approx(2 * plan(batch_size=2).activations_mb)


def test_fp32_keeps_more_activations_and_checkpointing_fewer():
    bf16 = plan(quantization="bf16").activations_mb
    assert plan(quantization="fp32").activations_mb > 1.5 * bf16
    assert plan(quantization="bf16", gradient_checkpointing=True).activations_mb < bf16


def test_int8_keeps_every_linear_input():
    # per layer: the attention's and the MLP's normed inputs (64 wide) and down_proj's input (128), in bf16
    extra = 2 * (2 * 64 * (2 * 64 + 128) * 2)
    assert (plan(quantization="int8").activations_mb - plan(quantization="nf4").activations_mb) * MB == extra


def test_loss_workspace_is_three_fp32_chunks_capped_at_1024_tokens():
    # 2 x 64 positions, half of them targets: 3 fp32 [64, 128] tensors + the 64 targets' bf16 hidden states
    assert plan(target_fraction=0.5).loss_mb * MB == 3 * 64 * 128 * 4 + 64 * 64 * 2
    long_rows = plan(batch_size=4, seq_len=1024, target_fraction=1.0).loss_mb * MB  # 4,096 targets, 4 chunks
    assert long_rows == 3 * 1024 * 128 * 4 + 4096 * 64 * 2


def test_cuda_has_a_context_and_no_cpu_heap_terms():
    cpu, cuda = plan(device="cpu"), plan(device="cuda")
    assert (cpu.baseline_mb, cuda.baseline_mb) == (CPU_BASELINE_MB, CUDA_CONTEXT_MB)
    assert cuda.load_overhead_mb == cuda.heap_slack_mb == 0 < cpu.heap_slack_mb
    assert cuda.activations_mb < cpu.activations_mb  # CUDA's dropout keeps a 1-byte mask, the CPU's 4 bytes
    assert cpu.total_mb == pytest.approx(sum(cpu.components().values()))
