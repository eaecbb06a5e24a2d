"""The float teacher's side of QAT distillation: its logits computed once per calibration sequence and kept as
their top-k log-probabilities, and the KL losses against them.

The teacher is a fixed function of each sequence, so running it at every step repeats work (a step over 4 x 256
tokens spends about a quarter of its time there). TeacherCache runs it the first time a sequence is drawn and
keeps, per position, the k most probable tokens' log-probabilities at the distillation temperature (k = 256 of
SmolLM2's 49152 tokens: 50 MB for 128 x 256 tokens). The loss is then the exact KL between the teacher's and
the student's distributions over k + 1 outcomes (the top-k tokens and "any other token"): a lower bound on the
full-vocabulary KL that equals it when the top k hold all the teacher's mass. Held-out checks use the full
vocabulary (full_logits: computed once for the few held-out sequences).

Public: kl_divergence, topk_kl, TeacherCache.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * mean over positions of KL(softmax(t/T) || softmax(s/T)), in nats."""
    T = float(temperature)
    lt = F.log_softmax(teacher_logits.float() / T, dim=-1)
    ls = F.log_softmax(student_logits.float() / T, dim=-1)
    kl = (lt.exp() * (lt - ls)).sum(dim=-1)
    return kl.mean() * (T * T)


def topk_kl(top_logp: torch.Tensor, top_idx: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * mean over positions of the KL over the teacher's top-k tokens plus one bucket for the rest.

    top_logp, top_idx: (..., k) teacher log-probabilities at temperature T and their token ids."""
    T = float(temperature)
    ls = F.log_softmax(student_logits.float() / T, dim=-1).gather(-1, top_idx.long())
    lt = top_logp.float()
    p = lt.exp()
    kl = (p * (lt - ls)).sum(-1)
    p_rest = (1 - p.sum(-1)).clamp_min(0)
    q_rest = (1 - ls.exp().sum(-1)).clamp_min(1e-12)
    kl = kl + torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-12).log() - q_rest.log()), torch.zeros_like(p_rest))
    return kl.mean() * (T * T)


class TeacherCache:
    """Top-k teacher log-probabilities per calibration sequence, filled the first time a sequence is asked for."""

    def __init__(self, teacher, sequences: torch.Tensor, top_k: int, temperature: float = 1.0):
        self.teacher, self.seqs, self.T = teacher, sequences, float(temperature)
        n, length = sequences.shape
        self.k = min(int(top_k), int(teacher.config.vocab_size))
        self.logp = torch.zeros(n, length, self.k, dtype=torch.float32)
        self.idx = torch.zeros(n, length, self.k, dtype=torch.int32)
        self.filled = torch.zeros(n, dtype=torch.bool)
        self.teacher_passes = 0  # sequences the teacher ran on
        self.teacher_s = 0.0  # seconds spent running it

    @torch.no_grad()
    def get(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top log-probabilities, token ids) of the sequences at `rows`, each (len(rows), length, k)."""
        missing = rows[~self.filled[rows]]
        if len(missing):
            t = time.perf_counter()
            device = next(self.teacher.parameters()).device
            logits = self.teacher(input_ids=self.seqs[missing].to(device)).logits
            logp = F.log_softmax(logits.float() / self.T, dim=-1)
            del logits
            top, idx = logp.topk(self.k, dim=-1)
            self.logp[missing], self.idx[missing] = top.cpu(), idx.to(torch.int32).cpu()
            self.filled[missing] = True
            self.teacher_passes += len(missing)
            self.teacher_s += time.perf_counter() - t
        return self.logp[rows], self.idx[rows]


@torch.no_grad()
def full_logits(teacher, batch: torch.Tensor, chunk: int) -> torch.Tensor:
    """The teacher's logits for a small fixed batch (held-out checks), in chunks of `chunk` sequences."""
    return torch.cat([teacher(input_ids=batch[i:i + chunk]).logits.float() for i in range(0, batch.shape[0], chunk)])
