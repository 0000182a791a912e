"""One training loop for teachers and students, read top to bottom.

config -> data -> model (+ frozen teacher) -> optimiser -> resume -> loop (train, validate,
checkpoint). A run folder holds everything: `config.json` (every option), `checkpoint.safetensors`
and `state.json` after every epoch (weights, momentum, RNG, history), `weights.safetensors` at
the end, and `log.txt`. No pickle anywhere: checkpoints are safetensors plus JSON.

On a GPU the loop never waits for the device inside an epoch: losses and accuracies are summed
on the device and read once per epoch (and by the progress bar every `POSTFIX_EVERY` steps), so
the host queues step after step while the GPU works. `channels_last` and `compile` are options.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from erde.artifact import InputSpec
from erde.data import TensorData, iterate_batches
from erde.device import pick_device
from erde.losses import distillation_loss
from erde.nets import EarlyExitResNet, NetConfig, build_model, model_config
from erde.runs import TrainConfig, load_run_data
from erde.store import read_artifact

POSTFIX_EVERY = 50  # steps between progress-bar updates (each one reads the device: a host sync)


def net_config_for(arch: str, data: TensorData) -> NetConfig:
    return model_config(arch, in_channels=data.spec.channels, input_size=data.spec.size,
                        num_classes=len(data.classes))


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up then cosine decay to zero; a pure function of the step, so resume needs no state."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def memory_format(cfg: TrainConfig, device: torch.device) -> torch.memory_format:
    """Channels-last on a GPU only, where it is asked for: on the CPU it buys nothing for these small nets,
    and oneDNN's channels-last backward pass crashed the process there (a double free, torch 2.14.1 on an
    AVX2 AMD EPYC without AVX-512; README, "Training")."""
    return torch.channels_last if cfg.channels_last and device.type == "cuda" else torch.contiguous_format


@torch.inference_mode()
def evaluate_exits(model: EarlyExitResNet, data: TensorData, device: torch.device, batch_size: int = 512,
                   fmt: torch.memory_format = torch.contiguous_format) -> list[float]:
    """Accuracy of every exit on `data` (each exit answering for every image); one host sync at the end."""
    model.eval()
    correct = torch.zeros(model.num_exits, device=device)
    for x, y in iterate_batches(data, batch_size, shuffle=False):
        logits = model.forward_all(x.to(device, memory_format=fmt))
        y = y.to(device)
        correct += torch.stack([(lg.argmax(-1) == y).sum() for lg in logits])
    return (correct / len(data)).tolist()


def save_checkpoint(out: Path, model: EarlyExitResNet, opt: torch.optim.Optimizer, gen: torch.Generator,
                    state: dict[str, Any]) -> None:
    """Weights, momentum buffers and RNG as safetensors, the rest as JSON; written atomically.

    The checkpoint names its epoch: a kill between the two renames leaves a checkpoint one epoch
    ahead of state.json, and `load_checkpoint` then takes the state from the complete state.json.tmp.
    """
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"optim.{i}"] = buf.detach().cpu().contiguous()
    tensors["rng"] = gen.get_state()  # data order and augmentation
    tensors["torch_rng"] = torch.get_rng_state()  # dropout on the CPU
    if torch.cuda.is_available() and next(model.parameters()).is_cuda:
        tensors["cuda_rng"] = torch.cuda.get_rng_state()  # dropout on the GPU
    (out / "state.json.tmp").write_text(json.dumps(state, indent=2))
    save_file(tensors, out / "checkpoint.safetensors.tmp", metadata={"epoch": str(state["epoch"])})
    (out / "checkpoint.safetensors.tmp").replace(out / "checkpoint.safetensors")
    (out / "state.json.tmp").replace(out / "state.json")


def load_checkpoint(out: Path, model: EarlyExitResNet, opt: torch.optim.Optimizer,
                    gen: torch.Generator) -> dict[str, Any]:
    with safe_open(out / "checkpoint.safetensors", "pt") as f:
        epoch = int((f.metadata() or {}).get("epoch", -1))
    state = json.loads((out / "state.json").read_text())
    if epoch not in (-1, state["epoch"]):  # killed between the renames: the newer state is the .tmp
        state = json.loads((out / "state.json.tmp").read_text())
        if state["epoch"] != epoch:
            raise ValueError(f"{out}: checkpoint (epoch {epoch}) and state.json disagree; cannot resume")
    tensors = load_file(out / "checkpoint.safetensors")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        if f"optim.{i}" in tensors:
            opt.state[p]["momentum_buffer"] = torch.empty_like(p).copy_(tensors[f"optim.{i}"])  # p's layout
    gen.set_state(tensors["rng"])
    torch.set_rng_state(tensors["torch_rng"])
    if "cuda_rng" in tensors and next(model.parameters()).is_cuda:
        torch.cuda.set_rng_state(tensors["cuda_rng"])
    return state


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train a teacher (loss 'ce', no teacher) or a student; returns the run folder.

    `resume` continues the run in `cfg.out_dir` with the options in its config.json, except how to
    run it (`TrainConfig.RUNTIME_FIELDS`: device, threads, channels_last, compile), taken from `cfg`.
    """
    # -- config and run folder --------------------------------------------------------------
    out = Path(cfg.out_dir)
    if resume:
        if not (out / "state.json").is_file():
            raise ValueError(f"nothing to resume in {out}: no state.json (start without --resume)")
        stored = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))  # the run's own options
        cfg = replace(stored, **{k: getattr(cfg, k) for k in TrainConfig.RUNTIME_FIELDS})
    elif (out / "state.json").is_file():
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if cfg.loss.kind != "ce" and not cfg.teacher:
        raise ValueError(f"loss {cfg.loss.kind!r} needs --teacher (an artifact folder)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    on_cuda = device.type == "cuda"
    fmt = memory_format(cfg, device)
    if on_cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once

    # -- data -------------------------------------------------------------------------------
    data = load_run_data(cfg)
    spec: InputSpec = data.train.spec

    # -- model, teacher, optimiser ----------------------------------------------------------
    model = build_model(net_config_for(cfg.arch, data.train)).to(device, memory_format=fmt)
    teacher = None
    if cfg.teacher:
        teacher = read_artifact(Path(cfg.teacher)).model.to(device, memory_format=fmt).eval()
        if teacher.num_exits != model.num_exits:
            raise ValueError(f"teacher has {teacher.num_exits} exits, student {model.num_exits}: they must match")
        if teacher.config.num_classes != model.config.num_classes:
            raise ValueError("teacher and student must have the same classes")
    # Compiling the bound methods keeps the modules (and their state_dict names) as they are.
    student_forward = torch.compile(model.forward_all) if cfg.compile else model.forward_all
    teacher_forward = None
    if teacher is not None:
        teacher_forward = torch.compile(teacher.forward_all) if cfg.compile else teacher.forward_all
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    if cfg.max_train_batches:
        steps_per_epoch = min(steps_per_epoch, cfg.max_train_batches)
    total_steps = steps_per_epoch * cfg.epochs
    state: dict[str, Any] = {"epoch": 0, "history": [], "input_spec": spec.to_dict(), "classes": data.train.classes}
    if resume:
        state = load_checkpoint(out, model, opt, gen)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else torch.autocast("cpu", enabled=False)

    # -- loop -------------------------------------------------------------------------------
    log = (out / "log.txt").open("a")
    for epoch in range(state["epoch"], cfg.epochs):
        model.train()
        started = time.time()
        seen = 0
        loss_sum = torch.zeros((), device=device)  # sums over the epoch's samples, on the device
        correct = torch.zeros(model.num_exits, device=device)
        part_sums: dict[str, torch.Tensor] = {}
        batches = iterate_batches(data.train, cfg.batch_size, shuffle=True, augmented=True, generator=gen)
        bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   mininterval=1.0)
        for step, (x, y) in enumerate(bar):
            if step >= steps_per_epoch:
                break
            global_step = epoch * steps_per_epoch + step
            for g in opt.param_groups:
                g["lr"] = lr_at(global_step, total_steps, steps_per_epoch, cfg.lr)
            if on_cuda:
                x, y = x.pin_memory(), y.pin_memory()  # so the copies below really are asynchronous
            x = x.to(device, non_blocking=True, memory_format=fmt)
            y = y.to(device, non_blocking=True)
            with amp:
                t_logits = None
                if teacher_forward is not None:
                    with torch.no_grad():
                        t_logits = [t.float() for t in teacher_forward(x)]
                s_logits = [s.float() for s in student_forward(x)]
            loss, parts = distillation_loss(cfg.loss, s_logits, y, t_logits, progress=global_step / total_steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(y)
            loss_sum += loss.detach() * len(y)
            correct += torch.stack([(s.detach().argmax(-1) == y).sum() for s in s_logits])
            for name, value in parts.items():
                part_sums[name] = part_sums.get(name, 0) + value * len(y)
            if (step + 1) % POSTFIX_EVERY == 0:  # the only read inside an epoch
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}",
                                acc="/".join(f"{a:.3f}" for a in (correct / seen).tolist()))
        val_acc = evaluate_exits(model, data.val, device, fmt=fmt)
        seen = max(seen, 1)
        record = {"epoch": epoch + 1, "train_loss": loss_sum.item() / seen, "train_acc": (correct / seen).tolist(),
                  "val_acc": val_acc, "seconds": round(time.time() - started, 1), "device": device.type,
                  **{name: value.item() / seen for name, value in part_sums.items()}}
        state["history"].append(record)
        state["epoch"] = epoch + 1
        save_checkpoint(out, model, opt, gen, state)
        line = (f"epoch {epoch + 1}/{cfg.epochs} loss {record['train_loss']:.4f} "
                f"val_acc {' '.join(f'{a:.4f}' for a in val_acc)} ({record['seconds']}s)")
        tqdm.write(line)
        log.write(line + "\n")
        log.flush()
    log.close()
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, out / "weights.safetensors")
    return out
