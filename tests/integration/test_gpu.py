"""The CUDA path: quantized training on the GPU and the memory figures it reports (skipped on the CPU)."""

import pytest
import torch

from lora_efficiency.models import resolve_model
from lora_efficiency.trainer import train

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("quantization", ["nf4", "int8", "bf16"])
def test_trains_on_cuda_and_reports_nvml_and_torch_peaks(tiny_model_dir, tiny_data_file, tmp_path, quantization):
    result = train(
        model=resolve_model(str(tiny_model_dir)),
        data=str(tiny_data_file),
        quantization=quantization,
        max_steps=3,
        batch_size=2,
        seq_len=256,
        eval_samples=8,
        device=torch.device("cuda"),
        output_dir=str(tmp_path / "adapter"),
    )
    m = result.metrics
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert m["memory/torch_peak_allocated_mb"] > 0
    # NVML counts the CUDA context and the allocator's cache on top of live tensors
    assert m["memory/sampled_peak_mb"] >= m["memory/torch_peak_allocated_mb"]
    assert m["memory/peak_mb"] == max(m["memory/sampled_peak_mb"], m["memory/torch_peak_allocated_mb"])
    assert not result.tags["device_name"].startswith("cpu")


def test_a_sweep_child_from_the_warm_server_can_use_cuda(tmp_path, monkeypatch):
    """On a GPU machine the imports may load the CUDA driver (bitsandbytes counts devices): the server must then
    refuse to fork (forkserver._why_unsafe), and the child, fresh or forked, computes on the GPU."""
    from lora_efficiency import children
    from lora_efficiency.subprocesses import child_env

    (tmp_path / "cuda_child.py").write_text(
        "import torch\nassert (torch.ones(2, device='cuda') * 2).sum().item() == 4\nprint('cuda ok')\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(children, "TRAIN_MODULE", "cuda_child")
    with children.WarmChildren() as launch:
        code, err = launch([], child_env())
        assert code == 0, err
        print("forked" if launch.server is not None else f"fresh: {launch.unsafe}")
