"""The one check of the training loss for NaN / inf (`--nan-policy`), kept in one small class
so the training step's host reads stay visible in one place.

- `stop` (default): the check stays on the device: each step folds `isfinite(loss)` into a
  device scalar (the first bad step of the epoch) without a host read; `end_epoch` reads it
  once. An epoch with a bad step is discarded whole (its metrics line and checkpoint are
  never written) and the run stops naming the epoch and step; the last checkpoint written
  before it is what the next start resumes from.
- `skip`: a bad step is skipped (no backward, no optimiser step, not counted in the
  epoch's loss and accuracy) and counted in the epoch's `skipped_steps`; deciding whether
  to call the optimiser needs the flag on the host, so this policy reads it every step
  (one CPU-GPU sync per step; under DDP the flag is first reduced over ranks, so every
  rank skips the same steps). An epoch whose every step is skipped stops the run
  (`skipped_all`): the prompts no longer change, and a run that went on would end at chance
  with exit 0.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


class NonFiniteGuard:
    def __init__(self, policy: str, device: torch.device, distributed: bool = False):
        self.policy = policy
        self.device = device
        self.distributed = distributed
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)  # 0-based step of the epoch, -1: none
        self.skipped = 0  # `skip`: steps skipped this epoch
        self.steps = 0  # steps checked this epoch

    def start_epoch(self) -> None:
        self.first_bad.fill_(-1)
        self.skipped = 0
        self.steps = 0

    def step_ok(self, loss: torch.Tensor, step: int) -> bool:
        """Whether to take the optimiser step for this loss (0-based `step` of the epoch)."""
        self.steps += 1
        bad = ~torch.isfinite(loss.detach())  # () bool, on the device
        if self.policy == "skip":
            flag = bad.to(torch.int32)
            if self.distributed:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if bool(flag):  # CPU-GPU sync: skip needs the decision on the host
                self.skipped += 1
                return False
            return True
        self.first_bad = torch.where(bad & (self.first_bad < 0), torch.full_like(self.first_bad, step), self.first_bad)
        return True

    @property
    def skipped_all(self) -> bool:
        """`skip`: every step of the epoch was skipped (the same on every rank)."""
        return self.policy == "skip" and self.steps > 0 and self.skipped == self.steps

    def end_epoch(self) -> Optional[int]:
        """`stop`: the first bad step of the epoch (1-based, any rank), None when every loss was finite."""
        if self.policy == "skip":
            return None
        first = self.first_bad.clone()
        if self.distributed:
            dist.all_reduce(first, op=dist.ReduceOp.MAX)
        value = int(first)  # CPU-GPU sync: once per epoch
        return None if value < 0 else value + 1
