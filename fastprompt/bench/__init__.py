"""`fastprompt bench`: training-step throughput and peak memory per method, four ways.

For each method (and `coop-text`, the CoOp text step alone) and each variant
- `reference`: `backend="reference"`, the eager oracle;
- `fast`: `backend="fast"`, the default;
- `fast+compile`: the fast backend under `torch.compile` (`fastprompt.training.compiled`);
- `anchor`: the method computed the way CoOp / MaPLe / DPT research code does
  (`fastprompt.bench.anchor`; whole-model fp16 on GPU),
a training step is: forward, backward and an SGD (momentum 0.9) step on random images of
the model's input size with random labels (zeroshot has nothing to train: forward only).
Every variant starts from the same frozen CLIP and the same prompt initialisation; CAVPT
gets the zero-shot top-K of the batch precomputed (the default `topk_source="cached"`), in
every variant. On CUDA the reference, fast and compiled variants run under bf16 autocast.

`coop-text` times CoOp's text side alone: text features of all `classes` class prompts
through the learnable context, the cosine cross-entropy of a batch of cached (random,
normalised) image features against them, backward and SGD step; no image tower.

One module per concern:
- `config`: `BenchConfig` (what to measure), the variant and method names;
- `workloads`: the model, inputs and step function of one (method, variant);
- `anchor`: the anchor-style baselines (research-code style computation of every method);
- `measure`: timing and peak memory of interleaved steps (`measure_method`, `run_bench`);
- `flops`: useful FLOPs of a step (FlopCounterMode with fastprompt's custom ops) and GPU peaks;
- `report`: speed-up ratios, the line per record and the JSON records;
- `environment`: machine, versions, date and commit of every record.
What each record holds is documented in `measure` (time, memory) and `flops`.
"""

from fastprompt.bench.config import TEXT_STEP, VARIANTS, BenchConfig, bench_methods
from fastprompt.bench.measure import run_bench
from fastprompt.bench.report import check_records_path, header_line, record_line, write_records

__all__ = ["BenchConfig", "TEXT_STEP", "VARIANTS", "bench_methods", "check_records_path", "header_line", "record_line",
           "run_bench", "write_records"]
