"""The one training step: `TrainStep(model, config, device=..., steps_per_epoch=...)`.

fit, the LR range test and the benchmark all call this step, so what the benchmark times is what fit runs. It owns
what a step needs: the precision (autocast dtype, GradScaler for fp16), the optimizer (fused kernels on CUDA), when
the scheduler steps, channels_last, the L1 term, and how the model's forward and backward execute:

- eager:   plain PyTorch.
- graphs:  forward and backward captured as CUDA graphs (torch.cuda.make_graphed_callables): no compilation, the
           capture takes ~0.1 s; removes the launch overhead that dominates small-batch steps.
- compile: torch.compile(mode="reduce-overhead"): Inductor fuses batch-norm, ReLU and pooling, plus CUDA graphs;
           costs 14-20 s of compilation the first time in a process.
- auto:    eager on the CPU; on CUDA, the mode whose warm-up plus steps take least for this run by measured step
           times (STEP_STUDY; compile only where its compilation pays back within the run), see `choose_mode`.

A compilation that fails (no C++ compiler, an unsupported op) falls back to eager with a warning and a note in
`mode_reason`: the run goes on.

Under torchrun (several processes, helpers.distributed) the forward runs in DistributedDataParallel, whose
gradient all-reduce runs in hooks during the backward. eager works; compile compiles the DDP model in Inductor's
default mode (DDP's bucketed communication splits the graph; reduce-overhead's CUDA graphs around it need care);
graphs falls back to eager with a message (make_graphed_callables does not capture DDP's hooks), and auto picks
compile for long runs, else eager (`ddp_mode`).

`prepare()` does the one-time work (cuDNN autotuning, capture or compilation) on a zero batch before any clock
starts, then puts the model, optimizer, scheduler, scaler and RNGs back exactly as they were.
"""

from __future__ import annotations

import copy
import math
import time
import warnings

import torch
from torch import nn

from helpers import distributed
from helpers.config import TrainConfig
from helpers.utils import BATCH_NORMS, amp_dtype, precision_name, preserved_modes

WARMUP_STEPS = 3  # steps on a zero batch before the clock: cuDNN autotuning, the allocator, CUDA-graph warm-up
# What `auto` weighs on CUDA: ms per training step and the one-time warm-up in seconds, per execution mode, for a
# (model, precision, batch) measured. H100, torch 2.11, commit 858b4af, synthetic batches, fused optimizer
# (gpu-runs 2026-11-23, steps.txt and its README; BENCHMARKS.md "Execution modes"): ResNet-9 is GPU-bound at batch
# 512 (graphs save 0.1 ms a step), and compiling fuses enough to save 1.6 ms but costs 10-14 s in a fresh process.
# Re-measure on the GPU the check runs on (benchmarks.gpu_check, item `modes`) and replace these.
STEP_STUDY: dict[tuple[str, str, int], dict[str, tuple[float, float]]] = {
    ("custom_resnet", "bf16", 512): {"eager": (5.51, 0.0), "graphs": (5.4, 0.1), "compile": (3.88, 14.0)},
    ("resnet18", "bf16", 128): {"eager": (11.28, 0.1), "graphs": (3.2, 0.1), "compile": (3.10, 14.4)},
}
# without a measurement, auto picks compile over graphs from this many training steps on: compilation costs 14-20 s
# and saved 0.5-1.5 ms a step over graphs where measured, so it pays after ~13,000-32,000 steps. The write-up
# recipes run 2,328 (custom_resnet), 7,820 (resnet18) and 78,000 (depthwise_net) steps.
COMPILE_MIN_STEPS = 15_000


def choose_mode(requested: str, device: torch.device, total_steps: int, *,
                measured: dict[str, tuple[float, float]] | None = None) -> tuple[str, str]:
    """(mode, description) for a run of `total_steps` training steps on `device`; the description says why.
    auto on CUDA: with `measured` (STEP_STUDY's entry for the run), the mode whose warm-up plus steps takes least
    (compile only where its warm-up pays back within the run); else graphs, or compile from COMPILE_MIN_STEPS.
    graphs asked for on the CPU falls back to eager."""
    if requested == "auto":
        if device.type != "cuda":
            return "eager", "eager (auto, on the CPU)"
        if measured:
            seconds = {m: warmup + total_steps * ms / 1000 for m, (ms, warmup) in measured.items()}
            mode = min(seconds, key=seconds.get)
            return mode, (f"{mode} (auto: {total_steps:,} steps with the measured step times and warm-ups: "
                          + ", ".join(f"{m} {s:.1f} s" for m, s in seconds.items()) + ")")
        if total_steps >= COMPILE_MIN_STEPS:
            return "compile", f"compile (auto: {total_steps:,} steps repay its compilation)"
        return "graphs", f"graphs (auto: CUDA graphs; {total_steps:,} steps would not repay compiling)"
    if requested == "graphs" and device.type != "cuda":
        return "eager", "eager (graphs asked for, but CUDA graphs need a CUDA GPU)"
    if requested not in ("eager", "graphs", "compile"):
        raise ValueError(f"unknown mode {requested!r}: choose auto, eager, graphs or compile")
    return requested, requested


def ddp_mode(requested: str, mode: str, reason: str) -> tuple[str, str]:
    """(mode, description) under DistributedDataParallel, from `choose_mode`'s: graphs becomes eager."""
    if mode == "graphs":
        why = "auto" if requested == "auto" else "graphs asked for"
        return "eager", f"eager ({why}, but CUDA graphs do not capture DDP's gradient all-reduce)"
    if mode == "compile":
        return "compile", reason + " (under DDP: Inductor's default mode, no CUDA graphs)"
    return mode, reason


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """The trainable parameters, in two groups when config.bias_lr_scale != 1: batch-norm parameters (the biases,
    and the scales unless frozen) at LR x scale and weight decay / scale, as Page's and airbench's "bias" groups
    (their classifiers have no bias; ours keeps its bias at the base LR); everything else at the config's."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.bias_lr_scale == 1:
        return [{"params": params}]
    scale = config.bias_lr_scale
    norm = {id(p) for m in model.modules() if isinstance(m, BATCH_NORMS) for p in m.parameters()}
    return [{"params": [p for p in params if id(p) not in norm]},
            {"params": [p for p in params if id(p) in norm], "lr": config.start_lr * scale,
             "weight_decay": config.weight_decay / scale}]


def fused_kernels(device: torch.device) -> bool:
    """Whether the optimizer runs fused (one kernel a step): on CUDA, where a launch per tensor costs (on the CPU
    torch's default, foreach, is as fast; benchmarks.proxies turns this on to count the GPU path there)."""
    return device.type == "cuda"


def make_optimizer(model: nn.Module, config: TrainConfig, device: torch.device | None = None) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or Adam at the config's start LR; fused kernels on CUDA (one launch per step)."""
    device = device or next(model.parameters()).device
    fused = {"fused": True} if fused_kernels(device) else {}
    groups = param_groups(model, config)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.start_lr, momentum=config.momentum, nesterov=config.nesterov,
                               weight_decay=config.weight_decay, **fused)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.start_lr, betas=(config.momentum, 0.999),
                                weight_decay=config.weight_decay, **fused)
    raise ValueError(f"unknown optimizer {config.optimizer!r}: choose sgd or adam")


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    """OneCycleLR (linear up to max_lr, linear down, stepped per batch), ReduceLROnPlateau, or None."""
    if config.scheduler == "onecycle":
        max_lr = config.peak_lr
        pct_start = config.pct_start
        if math.isclose(pct_start * config.epochs * steps_per_epoch, 1.0):
            # a warm-up of exactly one step is a zero-length phase: OneCycleLR divides by zero (tiny runs only)
            pct_start *= 1 + 1e-6
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[max_lr * g["lr"] / config.start_lr for g in optimizer.param_groups],
            epochs=config.epochs, steps_per_epoch=steps_per_epoch,
            pct_start=pct_start, anneal_strategy="linear", div_factor=max_lr / config.start_lr,
            cycle_momentum=False,  # Page and the custom-ResNet write-up keep momentum fixed
        )
    if config.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.2, patience=2)
    if config.scheduler == "none":
        return None
    raise ValueError(f"unknown scheduler {config.scheduler!r}: choose onecycle, plateau or none")


def clock(device: torch.device) -> float:
    """Seconds, after the device has finished everything queued (CUDA work is asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def mark(device: torch.device) -> float | torch.cuda.Event:
    """A point in time that costs no host sync: a timing event queued on CUDA, the clock now elsewhere. Read the
    seconds between two with `seconds_between` once the device has passed the later one."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def seconds_between(start: float | torch.cuda.Event, end: float | torch.cuda.Event) -> float:
    """Seconds from `start` to `end` (two `mark`s; CUDA events must have completed: read after a host sync)."""
    if isinstance(start, float):
        return end - start
    return start.elapsed_time(end) / 1000  # milliseconds


class WeightAverage:
    """An exponential moving average of a model's parameters and buffers, `average.update(model)` once per step;
    `average.module` is the averaged copy that evaluation runs.

    The same numbers as torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay),
    use_buffers=True) (tests/test_engine.py holds them equal), without its host syncs: AveragedModel tests its
    tensor counter (`n_averaged == 0`, `n_averaged > 0`) and copies it to the device on every update (three
    blocking reads a step on a GPU), and averages integer buffers one by one (32 extra launches for ResNet-9).
    Here the count is a Python int and an update is one `torch._foreach_lerp_` over the float tensors plus three
    launches for the integer ones. `torch._foreach_*` are documented in torch's reference (beta) and are what
    torch's own EMA (get_ema_multi_avg_fn) and optimizers call; no public API does a fused in-place lerp of
    many tensors.

    state_dict() has AveragedModel's layout ('module.<name>' and 'n_averaged'): checkpoints written before this
    class (and by it) load either way.
    """

    def __init__(self, model: nn.Module, *, decay: float):
        self.decay, self.updates = decay, 0
        self.module = copy.deepcopy(model)
        # a captured model's forward is an instance attribute bound to the original: the copy gets its own
        self.module.__dict__.pop("forward", None)
        self._mine = self._tensors(self.module)  # the average's own tensors, for good: updates write into them
        self._floats = [i for i, t in enumerate(self._mine) if t.is_floating_point() or t.is_complex()]
        self._others = [i for i, t in enumerate(self._mine) if not (t.is_floating_point() or t.is_complex())]

    @staticmethod
    def _tensors(model: nn.Module) -> list[torch.Tensor]:
        """Parameters then buffers, in AveragedModel's order (no detach: updates run under no_grad)."""
        return [*model.parameters(), *model.buffers()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold `model`'s current weights into the average (the first update copies them), on the device only."""
        mine, theirs = self._mine, self._tensors(model)
        if self.updates == 0:
            torch._foreach_copy_(mine, theirs)
        else:
            torch._foreach_lerp_([mine[i] for i in self._floats], [theirs[i] for i in self._floats],
                                 1 - self.decay)
            if self._others:  # AveragedModel's integer rule: mine * decay + theirs * (1 - decay), truncated
                ints = [mine[i] for i in self._others]
                flat = (torch.cat([t.reshape(-1) for t in ints]) * self.decay
                        + torch.cat([theirs[i].reshape(-1) for i in self._others]) * (1 - self.decay))
                parts = flat.split([t.numel() for t in ints])
                torch._foreach_copy_(ints, [p.view(t.shape) for p, t in zip(parts, ints)])
        self.updates += 1

    def state_dict(self) -> dict:
        return {**{f"module.{k}": v for k, v in self.module.state_dict().items()},
                "n_averaged": torch.tensor(self.updates, dtype=torch.long)}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict({k[len("module."):]: v for k, v in state.items() if k.startswith("module.")})
        self.updates = int(state["n_averaged"])  # a CPU tensor read from a checkpoint: no device sync


class TrainStep:
    """One optimisation step, `loss, logits = step(x, y)`, returning device tensors (no host sync).

    In graphs and compile modes the logits live in a buffer the next step overwrites: read them before then.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, *, device: torch.device, steps_per_epoch: int,
                 mode: str | None = None):
        self.device, self.config = torch.device(device), config
        self.ddp = distributed.world().distributed  # several processes: the forward runs in DDP
        self.sync_bn_note = None
        if config.sync_bn:
            model, self.sync_bn_note = distributed.convert_sync_bn(model, self.device)
        if config.freeze_bn_weight:  # scales stay at their value (1 at initialisation)
            for module in model.modules():
                if isinstance(module, BATCH_NORMS) and module.weight is not None:
                    module.weight.requires_grad_(False)
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format)
        if self.device.type == "cuda" and not config.deterministic:  # autotuning picks kernels by timing them
            torch.backends.cudnn.benchmark = True
        self.dtype = amp_dtype(self.device, config.amp)
        self.optimizer = make_optimizer(model, config, self.device)
        self.scheduler = make_scheduler(self.optimizer, config, steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.params = [p for p in model.parameters() if p.requires_grad]
        requested = mode or config.mode
        measured = STEP_STUDY.get((config.model, precision_name(self.dtype), config.batch_size))
        self.mode, self.mode_reason = choose_mode(requested, self.device, config.epochs * steps_per_epoch,
                                                  measured=measured)
        if self.ddp:
            self.mode, self.mode_reason = ddp_mode(requested, self.mode, self.mode_reason)
        # what runs the training forward: the model, in DDP under torchrun, or its compiled form
        self.forward: nn.Module = distributed.wrap(self.model, self.device)
        self.ema: WeightAverage | None = None  # made by start_epoch when averaging starts
        self.warmup_seconds: float | None = None  # set by prepare()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def autocast(self, *, cache_enabled: bool = True):
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None,
                              cache_enabled=cache_enabled)

    def to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) images in the step's memory format and (B,) labels on its device (no copy if already)."""
        return (x.to(self.device, non_blocking=True, memory_format=self.memory_format),
                y.to(self.device, non_blocking=True))

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.to_device(x, y)
        with self.autocast():
            out = self.forward(x)
            loss = self.criterion(out, y)  # mean cross-entropy (label-smoothed)
        total = loss + self.config.l1 * sum(p.abs().sum() for p in self.params) if self.config.l1 else loss
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.config.scheduler == "onecycle":
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return loss.detach(), out.detach()

    def start_epoch(self, epoch: int) -> None:
        """Per-epoch switches: weight averaging starts `ema_epochs` before the end (from the current weights)."""
        first = self.config.epochs - self.config.ema_epochs + 1 if self.config.ema_epochs else 1
        if self.config.ema and self.ema is None and epoch >= first:
            self.ema = WeightAverage(self.model, decay=self.config.ema)

    # --- the weight average: the step owns it; callers ask for the model to evaluate

    @property
    def trained_model(self) -> nn.Module:
        """The weights the optimizer trains (their module: what a checkpoint saves and resumes)."""
        return self.model

    @property
    def evaluated_model(self) -> nn.Module:
        """What evaluation runs: the weight average when there is one, else the trained one (compiled, when it
        is); under DDP the model itself (every process evaluates alone)."""
        if self.ema is not None:
            return self.ema.module
        return self.trained_forward

    @property
    def trained_forward(self) -> nn.Module:
        """The trained weights as evaluation should run them: compiled or captured when they are, without DDP."""
        return self.model if self.ddp else self.forward

    @property
    def averaging(self) -> bool:
        """Whether a weight average is being kept (and is what `evaluated_model` gives)."""
        return self.ema is not None

    def averaged_weights(self) -> dict | None:
        """The weight average's state dict, or None when there is none."""
        return self.ema.module.state_dict() if self.ema is not None else None

    def sync_buffers(self) -> None:
        """Under torchrun: rank 0's buffers (batch-norm statistics, the average's) into every process."""
        distributed.broadcast_buffers(self.model, *([self.ema.module] if self.ema is not None else []))

    def end_training(self) -> None:
        """Training is over: the model takes the weights it was evaluated with (the weight average, if any)."""
        if self.ema is not None:
            self.model.load_state_dict(self.ema.module.state_dict())

    def end_epoch(self, test_loss: float) -> None:
        """Per-epoch scheduling: ReduceLROnPlateau steps on the loss fit evaluates each epoch (the validation
        split's when the run has one, else the test set's)."""
        if self.config.scheduler == "plateau":
            self.scheduler.step(test_loss)

    # --- the one-time work, before any clock

    def prepare(self, train_loader, test_loader=None) -> float:
        """Capture or compile, and autotune cuDNN, for the loaders' full-batch shapes, on zero batches; then
        restore every state the warm-up touched. Returns its seconds (0 for eager on the CPU, which has nothing to
        warm up). Runs once; later calls return the first one's seconds."""
        if self.warmup_seconds is not None:
            return self.warmup_seconds
        if self.mode == "eager" and self.device.type != "cuda":
            self.warmup_seconds = 0.0
            return 0.0
        t0 = clock(self.device)
        train_batch = min(train_loader.batch_size, train_loader.num_images)  # full batches (helpers.data.Loader)
        eval_batch = min(test_loader.batch_size, test_loader.num_images) if test_loader is not None else None
        saved = self._save_state()
        x = torch.zeros(train_batch, 3, 32, 32, device=self.device).contiguous(memory_format=self.memory_format)
        y = torch.zeros(train_batch, dtype=torch.long, device=self.device)
        try:
            if self.mode == "graphs":
                self._capture(x)
            elif self.mode == "compile":
                eager_forward = self.forward
                self.forward = torch.compile(self.forward, mode="default" if self.ddp else "reduce-overhead")
            try:
                self._warm_up(x, y, eval_batch)
            except Exception as err:  # noqa: BLE001 - no compiler, an unsupported op...: the run goes on eager
                if self.mode != "compile":
                    raise
                self.forward = eager_forward
                reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"
                warnings.warn(f"torch.compile failed ({reason}); running eager", stacklevel=2)
                self.mode, self.mode_reason = "eager", f"eager (compile failed: {reason})"
                self._restore_state(saved)  # whatever the failed step touched
                self._warm_up(x, y, eval_batch)
        finally:
            self._restore_state(saved)
        self.warmup_seconds = clock(self.device) - t0
        return self.warmup_seconds

    def _warm_up(self, x: torch.Tensor, y: torch.Tensor, eval_batch: int | None) -> None:
        """WARMUP_STEPS training steps on the zero batch, and one evaluation forward of `eval_batch` images."""
        for _ in range(WARMUP_STEPS):
            self(x, y)
        if eval_batch:
            with torch.no_grad(), preserved_modes(self.model), self.autocast():
                self.model.eval()
                self.forward(torch.zeros(eval_batch, 3, 32, 32, device=self.device)
                             .contiguous(memory_format=self.memory_format))

    def _capture(self, x: torch.Tensor) -> None:
        """Replace the model's training forward and backward by CUDA graphs (eval mode keeps the eager forward).
        A model that cannot be captured (host syncs, dynamic shapes) runs eager, with a warning."""
        self.model.train()  # the training forward is what gets captured
        try:
            with self.autocast(cache_enabled=False):  # make_graphed_callables' rule under autocast
                torch.cuda.make_graphed_callables(self.model, (x,), num_warmup_iters=3)
        except Exception as err:  # noqa: BLE001 - any capture failure leaves a working eager model
            warnings.warn(f"CUDA-graph capture failed ({type(err).__name__}: {err}); running eager", stacklevel=3)
            self.mode, self.mode_reason = "eager", f"eager (CUDA-graph capture failed: {type(err).__name__})"

    def _save_state(self) -> dict:
        return {"model": {k: v.clone() for k, v in self.model.state_dict().items()},
                "step": copy.deepcopy(self.state_dict()), "rng": self.rng_state()}

    def _restore_state(self, saved: dict) -> None:
        self.load_weights_in_place(saved["model"])
        self.optimizer.state.clear()
        self.load_state_dict(saved["step"])
        self.set_rng_state(saved["rng"])

    # --- checkpoints

    def load_weights_in_place(self, weights: dict) -> None:
        """Copy a state dict into the model's own tensors: a captured or compiled forward keeps pointing at them."""
        with torch.no_grad():
            for name, value in self.model.state_dict().items():
                value.copy_(weights[name])

    def rng_state(self) -> dict:
        """The global torch RNG states this step draws from: {'torch': CPU, 'cuda': the device's or None}."""
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}

    def set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if self.device.type == "cuda" and state.get("cuda") is not None:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    # --- checkpoints

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if state.get("ema") is not None:
            self.start_epoch(self.config.epochs)  # averaging had started: make the average, then load it
            self.ema.load_state_dict(state["ema"])
        else:
            self.ema = None


def time_epoch(model: nn.Module, config: TrainConfig, train_loader, test_loader=None, *,
               device: torch.device | str, max_steps: int | None = None, warmup_steps: int = 3) -> dict:
    """Seconds of one training epoch of `config`'s step, warm: the one-time warm-up (prepare) and
    `warmup_steps` real steps run first and are reported apart. Trains `model` (pass a copy to keep yours).

    Returns mode, precision, warmup_s, steps_timed, steps_per_epoch, ms_per_step, images_per_s and
    seconds_per_epoch (measured over a full epoch, or scaled from `max_steps` steps), peak_gpu_mem_gib."""
    device = torch.device(device)
    # a schedule long enough for the warm-up steps and a whole epoch, whatever config.epochs says
    step = TrainStep(model, config, device=device, steps_per_epoch=len(train_loader) + warmup_steps)
    warmup = step.prepare(train_loader, test_loader)
    run_steps(step, train_loader, max_steps=warmup_steps)  # the loader's first pass, the allocator
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = clock(device)
    steps, images = run_steps(step, train_loader, max_steps=max_steps)
    seconds = clock(device) - t0
    return {"mode": step.mode, "precision": precision_name(step.dtype), "warmup_s": warmup, "steps_timed": steps,
            "steps_per_epoch": len(train_loader), "ms_per_step": 1000 * seconds / steps,
            "images_per_s": images / seconds, "seconds_per_epoch": seconds * len(train_loader) / steps,
            "full_epoch_timed": steps >= len(train_loader),
            "peak_gpu_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def run_steps(step: TrainStep, loader, *, epochs: int = 1, max_steps: int | None = None) -> tuple[int, int]:
    """The bare loop: `step` over `loader` for `epochs` passes and nothing else; returns (steps, images)."""
    step.model.train()
    steps = images = 0
    for _ in range(epochs):
        for x, y in loader:
            step(x, y)
            steps, images = steps + 1, images + len(y)
            if max_steps and steps >= max_steps:
                return steps, images
    return steps, images
