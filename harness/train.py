"""Training loop of the small models (scripts/train_small.py): one model, one token stream, a seeded run.

Step i reads rows [i * batch, (i + 1) * batch) of the stream (inputs and targets [rows, seq_len], targets -100
where no loss is taken), so every model sees the same tokens in the same order. AdamW (betas 0.9 / 0.95, weight
decay on matrices only), linear warmup then cosine decay to `min_lr_ratio` of the peak, gradient clipping, bf16
autocast on CUDA (fp32 on CPU), parameters and optimizer state fp32. Loss: mean cross-entropy over the targets.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import platform
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gdn2.ops.triton.compile_ahead import compile_step

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

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1; got {self.steps}, {self.batch_size}")
        if not 0 <= self.warmup_steps:
            raise ValueError(f"warmup_steps must be >= 0; got {self.warmup_steps}")


@dataclass
class TrainResult:
    losses: list[tuple[int, float]]          # (step, mean loss over the steps since the previous point)
    final_loss: float                        # mean loss over the last 5% of steps (at least one step)
    steps_done: int                          # config.steps, unless a deadline stopped the run earlier
    tokens: int                              # input tokens seen
    trained_tokens: int                      # tokens with a target (the loss is their mean)
    seconds: float
    device: str
    extra: dict = field(default_factory=dict)
    needle_checks: list[tuple[int, dict]] = field(default_factory=list)   # (step, {set: answer exact match})

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


def batch_at(inputs: np.ndarray, targets: np.ndarray, step: int, batch_size: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of step `step` as int64 tensors on device."""
    rows = slice(step * batch_size, (step + 1) * batch_size)
    x = torch.from_numpy(np.asarray(inputs[rows], dtype=np.int64))
    y = torch.from_numpy(np.asarray(targets[rows], dtype=np.int64))
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def lm_loss(lm: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the model's next-token logits against targets (IGNORE skipped). [B, T] -> scalar."""
    logits = lm(input_ids=inputs).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


def answer_exact_match(lm: nn.Module, documents: list[tuple[list[int], int]], device: torch.device,
                       batch_size: int = 8) -> float:
    """Share of documents (token ids, prompt length) whose every answer token (ids[prompt length:]) is the model's
    argmax given the tokens before it: the greedy flags of EvalModel.token_logprobs_many (teacher forcing, the
    scoring path of the evaluation), batch_size documents per forward pass."""
    from harness.model import EvalModel

    model = EvalModel(name="training check", family="", lm=lm, tokenizer=None, device=device,
                      dtype=torch.float32, source="the model in training", backend="", state_floats=0,
                      batch_size=batch_size)
    was_training = lm.training
    lm.eval()
    scored = model.token_logprobs_many(documents)
    lm.train(was_training)
    return sum(bool(greedy.all()) for _, greedy in scored) / len(documents)


def needle_check(lm: nn.Module, needle_sets: dict, step: int, device: torch.device) -> tuple[int, dict]:
    return step, {name: answer_exact_match(lm, docs, device) for name, docs in needle_sets.items()}


def compile_first_step(lm: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, autocast) -> None:
    """Compile every Triton kernel of a training step at once, in threads, before the first step (gdn2's
    compile_step: a throwaway forward and backward whose kernels run nothing; the gradients are set to None)."""
    def loss():
        with autocast:
            return lm_loss(lm, inputs, targets)
    try:
        compile_step(loss, lm.parameters())
    except Exception as err:  # noqa: BLE001 - the step itself still compiles what it launches
        warnings.warn(f"compiling the step's kernels ahead failed ({type(err).__name__}: {err}); each kernel "
                      "compiles when first launched (GDN2_TRITON_COMPILE_AHEAD=0 skips the attempt)", RuntimeWarning,
                      stacklevel=2)
        for p in lm.parameters():
            p.grad = None


def train(lm: nn.Module, inputs: np.ndarray, targets: np.ndarray, config: TrainConfig, device: torch.device,
          progress=None, deadline: float | None = None, stop_after: int | None = None,
          needle_sets: dict[str, list[tuple[list[int], int]]] | None = None, check_every: int = 0) -> TrainResult:
    """Train `lm` in place on the stream (module docstring). progress(step, loss, lr) is called every log_every.
    deadline (time.time() seconds): stop at the first log point past it; the result records the steps done.
    stop_after: stop after that many steps (a log point) of the schedule set for config.steps, as a deadline did.
    needle_sets {name: documents} with check_every > 0: answer_exact_match of each set every check_every steps and
    after the last step (not counted in the run's seconds)."""
    needed = config.steps * config.batch_size
    if len(inputs) < needed:
        raise ValueError(f"the stream has {len(inputs)} rows; {config.steps} steps of {config.batch_size} need "
                         f"{needed}: build a longer stream (--rows) or train fewer steps")
    if stop_after is not None and not (0 < stop_after <= config.steps and stop_after % config.log_every == 0):
        raise ValueError(f"stop_after must be a multiple of log_every ({config.log_every}) in [1, {config.steps}]; "
                         f"got {stop_after} (a deadline stops at a log point)")
    lm.to(device).train()
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(parameter_groups(lm, config.weight_decay), lr=config.lr, betas=(0.9, 0.95),
                                  eps=1e-8, fused=fused)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    losses, window, step_losses, elapsed, checks = [], [], [], [], []
    checking = bool(needle_sets) and check_every > 0
    start = time.perf_counter()
    if device.type == "cuda":
        compile_first_step(lm, *batch_at(inputs, targets, 0, config.batch_size, device), autocast)
    steps_done = config.steps
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        x, y = batch_at(inputs, targets, step, config.batch_size, device)
        with autocast:
            loss = lm_loss(lm, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), config.grad_clip)
        optimizer.step()
        window.append(loss.detach())
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            values = torch.stack(window).float().cpu().tolist()
            if not all(math.isfinite(v) for v in values):
                raise FloatingPointError(f"non-finite training loss at step {step + 1}: {values}")
            step_losses += values
            losses.append((step + 1, float(np.mean(values))))
            elapsed.append(round(time.perf_counter() - start, 3))
            window = []
            if progress is not None:
                progress(step + 1, losses[-1][1], learning_rate(step, config))
            stop = step + 1 == stop_after or (deadline is not None and time.time() > deadline)
            if stop and step + 1 < config.steps:
                steps_done = step + 1
                break
        if checking and (step + 1) % check_every == 0:
            paused = time.perf_counter()
            checks.append(needle_check(lm, needle_sets, step + 1, device))
            start += time.perf_counter() - paused
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if checking and (not checks or checks[-1][0] != steps_done):
        checks.append(needle_check(lm, needle_sets, steps_done, device))
    tail = max(1, steps_done // 20)
    rows = steps_done * config.batch_size
    trained = int(np.count_nonzero(np.asarray(targets[:rows]) != IGNORE))
    extra = {"elapsed_at_log": elapsed}
    if steps_done < config.steps:
        extra["stopped_by_deadline_at_step"] = steps_done
    return TrainResult(losses=losses, final_loss=float(np.mean(step_losses[-tail:])), steps_done=steps_done,
                       tokens=rows * inputs.shape[1], trained_tokens=trained, seconds=seconds,
                       device=describe_device(device), extra=extra, needle_checks=checks)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


CODE_FOLDERS = ("gdn2", "baselines", "harness", "tasks", "scripts")


def code_fingerprint(root: str | Path) -> str:
    """sha256 (16 hex digits) of the Python sources a training run executes: every *.py under CODE_FOLDERS of the
    repository root, by relative path and content, in sorted order. Two runs with the same fingerprint ran the same
    code; it needs no git (the GPU machine gets a copy of the tree without .git)."""
    root = Path(root)
    digest = hashlib.sha256()
    for folder in CODE_FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
