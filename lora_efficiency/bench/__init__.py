"""The benchmark: this project's trainer against the reference a user would write (HF `Trainer` + PEFT).

make bench
python -m entrypoints.bench --modes bf16,nf4,int8 --steps 8 --warmup_steps 2 --repeats 3     # = make bench

Both sides train the same model, data, LoRA config (r=16, alpha 32, dropout 0.05 on q,k,v,o), learning-rate
schedule and number of optimizer steps (recipe.py). Every measurement runs in its own process (`python -m
lora_efficiency.bench WORKER SPEC OUT`, started by orchestration.run_benchmark), so each peak memory belongs to
one run:

- setup (workers.py): bf16 and fp32 matmul rates of the device, facts about the data, model FLOPs per real token
  (figures.py);
- reference (reference.py): `Trainer` + PEFT with `DataCollatorForLanguageModeling` padding each micro-batch to
  its longest example, loaded and wrapped as the PEFT/QLoRA guides show;
- project (workers.py): `lora_efficiency.trainer.train`, with MLflow tracking and memory sampling on (as every run
  has them), and again with both off, for their overhead. It goes through the trainer's hooks: a step callback
  (StepStats) times the steps and counts their tokens, a tracker wrapper times the logging call, and a memory
  sampler factory that never wakes up turns sampling off.

Batch budget: both sides train on the same examples per optimizer step, one forward and backward per step. The
project packs them into batch_size rows of seq_len tokens (4 x 512 hold ~24 examples of the bundled set); the
reference takes as many examples as its per_device_train_batch_size, padded to their longest, so the real
(non-padding) tokens a step are about equal and the padding is the reference's own. ref_batch_size > 0 splits the
reference's step into gradient-accumulation micro-batches of that many examples instead (less memory, more time).

Real tokens: non-padding input tokens, on both sides (the reference's attention_mask sum, counted by the
Trainer's own include_num_input_tokens_seen="non_padding"; the project's packed-row lengths). A step's time is
the wall clock from one optimizer step's end to the next's, so data loading, logging and callbacks count.

Startup (startup.py): `python -m entrypoints.train` launched as a sweep launches a child; the trainer's
`time/startup_s` (process start to first step) is read back from the launch's MLflow run. render.py writes
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
