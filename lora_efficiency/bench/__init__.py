"""The benchmark: this project's trainer against two references written with HF `Trainer` + PEFT.

make bench
python -m entrypoints.bench --modes bf16,nf4,int8 --steps 8 --warmup_steps 2 --repeats 3     # = make bench

Every side trains the same model, data, LoRA config (r=16, alpha 32, dropout 0 on q,k,v,o), learning-rate
schedule and number of optimizer steps (recipe.py). Every measurement runs in its own process (`python -m
lora_efficiency.bench WORKER SPEC OUT`, started by orchestration.run_benchmark), so each peak memory belongs to
one run; the sides of a mode are interleaved repeat by repeat (orchestration.SIDES):

- setup (workers.py): bf16 and fp32 matmul rates of the device, facts about the data, FLOPs per weight and per
  attention pair, and the rate of the model's own frozen products at the project's step shape, the MFU's
  ceiling (figures.py);
- reference (reference.py): the naive one (random micro-batches padded by `DataCollatorForLanguageModeling`, loss
  on every token, `prepare_model_for_kbit_training` with checkpointing on k-bit bases) and the strong one
  (completion-only labels, `group_by_length`, checkpointing as the project: off);
- project (workers.py): `lora_efficiency.trainer.train`, with MLflow tracking and memory sampling on (as every run
  has them), again with both off (their overhead, paired repeat by repeat), and off with `attention=sdpa` (the
  per-example attention lever). It goes through the trainer's hooks: a step callback (StepStats) times the steps
  and counts their tokens, a tracker wrapper times the logging call, and a memory sampler factory that never
  wakes up turns sampling off.

MFU: the FLOPs each side performs per real token (figures.performed_flops_per_token: its padding, where its
head runs, its attention pairs, its recompute) x its real tokens/s / the measured bf16 matmul rate. The
ceiling (mfu_ceiling): figures.model_matmul_rate over the same rate, what a step of nothing but those products
would reach.

Batch budget: both sides train on the same examples per optimizer step, one forward and backward per step. The
project packs them into batch_size rows of seq_len tokens (4 x 512 hold ~24 examples of the bundled set); the
reference takes as many examples as its per_device_train_batch_size, padded to their longest, so the real
(non-padding) tokens a step are about equal and the padding is the reference's own. ref_batch_size > 0 splits the
reference's step into gradient-accumulation micro-batches of that many examples instead (less memory, more time).

Real tokens: non-padding input tokens, on both sides (the reference's attention_mask sum, counted by the
Trainer's own include_num_input_tokens_seen="non_padding"; the project's packed-row lengths). A step's time is
the wall clock from one optimizer step's end to the next's, so data loading, logging and callbacks count.

Startup (startup.py): a one-step training launched as a local sweep launches a child, forked from the warm server
(children.WarmChildren) and as a fresh `python -m entrypoints.train`; the trainer's `time/startup_s` (process
start, or fork, to first step) is read back from the launch's MLflow run. render.py writes
docs/bench-results.json and the block of docs/benchmarks.md.
"""

from lora_efficiency.bench.figures import import_times, machine, matmul_rates, training_flops_per_token, versions
from lora_efficiency.bench.orchestration import mode_results, run_benchmark, run_worker
from lora_efficiency.bench.recipe import MODES, RANDOM_SHAPES, random_model_path
from lora_efficiency.bench.render import block_key, render_benchmarks_block, write_json, write_markdown
from lora_efficiency.bench.startup import measure_startup

__all__ = [
    "MODES",
    "RANDOM_SHAPES",
    "block_key",
    "import_times",
    "machine",
    "matmul_rates",
    "measure_startup",
    "mode_results",
    "random_model_path",
    "render_benchmarks_block",
    "run_benchmark",
    "run_worker",
    "training_flops_per_token",
    "versions",
    "write_json",
    "write_markdown",
]
