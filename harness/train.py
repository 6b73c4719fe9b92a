"""Training loop of the small models (scripts/train_small.py): one model, one token stream, a seeded run.

Step i reads rows [i * batch, (i + 1) * batch) of the stream (inputs and targets [rows, seq_len], targets -100
where no loss is taken), so every model sees the same tokens in the same order. AdamW (betas 0.9 / 0.95, weight
decay on matrices only), linear warmup then cosine decay to `min_lr_ratio` of the peak, gradient clipping, bf16
autocast on CUDA (fp32 on CPU), parameters and optimizer state fp32.

Loss: mean cross-entropy over the targets; with answer flags (tasks/training_mix.py), the text targets and the
answer targets are averaged apart and mixed, (1 - answer_weight) * text + answer_weight * answers, so that the few
answer tokens of a retrieval row (a 7-digit number after 1,000 tokens of haystack) are not drowned by the text.
"""
from __future__ import annotations

import contextlib
import math
import platform
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE = -100


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 25
    answer_weight: float = 0.5        # share of the loss on answer targets, when the stream flags them

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1; got {self.steps}, {self.batch_size}")
        if not 0.0 <= self.answer_weight <= 1.0:
            raise ValueError(f"answer_weight must be in [0, 1]; got {self.answer_weight}")
        if not 0 <= self.warmup_steps:
            raise ValueError(f"warmup_steps must be >= 0; got {self.warmup_steps}")


@dataclass
class TrainResult:
    losses: list[tuple[int, float]]          # (step, mean loss over the steps since the previous point)
    final_loss: float                        # mean loss over the last 5% of steps (at least one step)
    text_losses: list[tuple[int, float]]     # the same, of the text targets alone (empty without answer flags)
    answer_losses: list[tuple[int, float]]   # the same, of the answer targets alone (empty without answer flags)
    final_text_loss: float | None
    final_answer_loss: float | None
    steps_done: int                          # config.steps, unless a deadline stopped the run earlier
    tokens: int                              # input tokens seen
    trained_tokens: int                      # tokens with a target (the loss is their mean)
    seconds: float
    device: str
    extra: dict = field(default_factory=dict)

    def to_record(self) -> dict:
        return asdict(self)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to lr * min_lr_ratio at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps - 1)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))


def parameter_groups(lm: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (2-D+ weights) except embeddings; none on norms, biases and decay parameters."""
    embeddings = {id(m.weight) for m in lm.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in lm.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def rows_at(array: np.ndarray, step: int, batch_size: int, device: torch.device, dtype=torch.int64) -> torch.Tensor:
    """Rows of step `step` of a stream array, as a tensor on device."""
    rows = np.asarray(array[step * batch_size:(step + 1) * batch_size])
    return torch.from_numpy(rows).to(device=device, dtype=dtype, non_blocking=True)


def lm_loss(lm: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, answers: torch.Tensor | None = None,
            answer_weight: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, text loss, answer loss) of the model's next-token logits against targets [B, T] (IGNORE skipped).
    Without answers [B, T] bool: loss = mean cross-entropy, the parts NaN. With them: the parts are the means over
    text and over answer targets and loss mixes them by answer_weight (a part absent from the batch drops out)."""
    logits = lm(input_ids=inputs).logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))      # bf16 logits: fp32 softmax
    flat = targets.flatten()
    nll = F.cross_entropy(logits.flatten(0, 1), flat, ignore_index=IGNORE, reduction="none")
    taken = flat != IGNORE
    if answers is None:
        nan = nll.new_tensor(float("nan"))
        return nll.sum() / taken.sum().clamp(min=1), nan, nan
    is_answer = answers.flatten() & taken
    is_text = taken & ~is_answer
    text = (nll * is_text).sum() / is_text.sum().clamp(min=1)       # 0 (not 0/0) when the batch has none
    answer = (nll * is_answer).sum() / is_answer.sum().clamp(min=1)
    w_text = (1.0 - answer_weight) * is_text.any()
    w_answer = answer_weight * is_answer.any()
    loss = (w_text * text + w_answer * answer) / (w_text + w_answer)
    nan = nll.new_tensor(float("nan"))
    return loss, torch.where(is_text.any(), text, nan), torch.where(is_answer.any(), answer, nan)


def train(lm: nn.Module, inputs: np.ndarray, targets: np.ndarray, config: TrainConfig, device: torch.device,
          progress=None, deadline: float | None = None, answers: np.ndarray | None = None) -> TrainResult:
    """Train `lm` in place on the stream (module docstring): inputs, targets [rows, T] int, answers [rows, T] bool
    or None. progress(step, loss, lr) is called every log_every. deadline (time.time() seconds): stop at the first
    log point past it; the result records the steps done."""
    needed = config.steps * config.batch_size
    if len(inputs) < needed:
        raise ValueError(f"the stream has {len(inputs)} rows; {config.steps} steps of {config.batch_size} need "
                         f"{needed}: build a longer stream (--rows) or train fewer steps")
    lm.to(device).train()
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(parameter_groups(lm, config.weight_decay), lr=config.lr, betas=(0.9, 0.95),
                                  eps=1e-8, fused=fused)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    losses, window, step_losses, elapsed = [], [], [], []
    parts: dict[str, list] = {"text": [], "answer": []}           # (step, mean) per log point
    part_steps: dict[str, list] = {"text": [], "answer": []}      # per step (NaN where the batch had none)
    start = time.perf_counter()
    steps_done = config.steps
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        x = rows_at(inputs, step, config.batch_size, device)
        y = rows_at(targets, step, config.batch_size, device)
        flags = None if answers is None else rows_at(answers, step, config.batch_size, device, torch.bool)
        with autocast:
            loss, text, answer = lm_loss(lm, x, y, flags, config.answer_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), config.grad_clip)
        optimizer.step()
        window.append(torch.stack([loss, text, answer]).detach())
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            values, text_values, answer_values = torch.stack(window).float().cpu().T.tolist()
            if not all(math.isfinite(v) for v in values):
                raise FloatingPointError(f"non-finite training loss at step {step + 1}: {values}")
            step_losses += values
            losses.append((step + 1, float(np.mean(values))))
            if answers is not None:
                for name, got in (("text", text_values), ("answer", answer_values)):
                    part_steps[name] += got
                    parts[name].append((step + 1, nan_mean(got)))
            elapsed.append(round(time.perf_counter() - start, 3))
            window = []
            if progress is not None:
                progress(step + 1, losses[-1][1], learning_rate(step, config))
            if deadline is not None and time.time() > deadline and step + 1 < config.steps:
                steps_done = step + 1
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tail = max(1, steps_done // 20)
    rows = steps_done * config.batch_size
    trained = int(np.count_nonzero(np.asarray(targets[:rows]) != IGNORE))
    extra = {"elapsed_at_log": elapsed}
    if steps_done < config.steps:
        extra["stopped_by_deadline_at_step"] = steps_done
    finals = {name: nan_mean(part_steps[name][-tail:]) if answers is not None else None for name in parts}
    return TrainResult(losses=losses, final_loss=float(np.mean(step_losses[-tail:])),
                       text_losses=parts["text"], answer_losses=parts["answer"],
                       final_text_loss=finals["text"], final_answer_loss=finals["answer"], steps_done=steps_done,
                       tokens=rows * inputs.shape[1], trained_tokens=trained, seconds=seconds,
                       device=describe_device(device), extra=extra)


def nan_mean(values: list[float]) -> float | None:
    """Mean of the finite values (a step without text or answer targets gives NaN for that part); None if none."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
