"""Distilling the demo model onto a static sparse pattern: CLEAR's recipe (and STA's, Efficient-vDiT's), made general.

A static pattern (`clear`, `window`, `gna`, any registered method whose plan depends on the token layout only)
drops attention the trained model relies on. A short fine-tune teaches the model to do without it: the student is
a copy of the model with the pattern enabled, the teacher the frozen dense model, and the loss the MSE between
their transformer outputs (the predicted clean clip) on samples the teacher generated itself:

1. the teacher generates `samples` clips from random captions of the demo vocabulary (its own distribution, as
   CLEAR distils on 10K FLUX-generated images);
2. each step draws one of them, a noise level t and a noise, and regresses the student's prediction at
   x_t = (1 - t) x0 + t noise onto the teacher's (10% of the examples with the empty caption, so classifier-free
   guidance keeps working). By default t is one of the sampler's noise levels at the steps where the pattern runs
   (`noise_levels="sparse"`: after the dense warm-up of a `sample_steps`-step run), so no capacity goes to noise
   levels the dense warm-up covers; `"all"` draws them as the demo was trained (uniform, shifted towards noise).
   `"trajectory"` draws instead the very states the teacher's sampler passed through at those steps while it
   generated the clips: the inputs a student that tracks the teacher meets at inference, where the error of one
   step carries into the next. Each training call runs as the sampler step its noise level falls in
   (`sampler_step`), so a call in the config's dense warm-up runs dense, as the sampler runs it; with
   `train_warmup` the warm-up's levels are drawn too, to keep the fine-tuned weights, which run the warm-up as
   well, on the teacher's path there;
3. with `student_states_every`, the student itself regenerates the captions every so many steps with its
   pattern on, as at inference, and its own sampler states, with the teacher's predictions from them, become
   half of the examples. A student trained on the teacher's states alone never sees the states its own errors
   lead to, and on the demo model those errors add up step after step (scripts/sparse_sensitivity.py); this
   was the first variant to beat random blocks there (README, Distillation);
4. with `rollout_steps`, a last phase trains on what is scored: from the state a teacher clip reached at the end
   of the dense warm-up, the student runs every sparse sampler step with its pattern on and its final clip is
   regressed onto the teacher's, the gradient flowing back through all the steps (`rollout`, checkpointed per
   call). A one-step loss treats the steps' errors as independent; on the demo model they add up coherently, so
   a student that only halves each step's error gains little, while one trained on the whole run can also learn
   to have later steps undo earlier ones.

What is trained: every weight of the self-attention modules the pattern replaces (q, k, v and output projections,
the QK-norm gains), nothing else. Full weights rather than a LoRA: the demo's self-attention holds 66K weights per
layer (265K in all, a fifth of its 1.3M-weight transformer), few enough to train in full on a CPU, so a low-rank
adapter would save nothing worth its extra code and merge step; full weights save with plain `save_pretrained`
into a folder any `from_pretrained` reads, and CLEAR too trains the full attention projections. The trainable set
is found through the same adapter `enable_sparse_attention` uses (`attention_sites`), so it is the set the pattern
applies to on any supported model. `train="all"` adds the cross-attention to the caption, which could carry what
a local window no longer sees; on the demo model it did not help (README, Distillation).

The loss is CLEAR's: the clean-clip MSE, plus with `attention_loss` its second term, each sparse self-attention
output against the teacher's (CLEAR weighs it 0.5 on every 4th block of FLUX; here every layer, relative to the
teacher's mean square so that the weight does not depend on the activations' scale).

Gradients flow through the sparse attention itself: the student calls need a gradient, so backend "auto" routes
them to a kernel that honours one (on CPU the gather path through autograd, whose cost falls with the density,
`kernels.gather.gather_attention_autograd`; the reference for variable blocks), and every step checks that its
attention ran sparse (the stats' density below 1) rather than silently dense. On sampler states the teacher's
predictions are kept from the calls that generated the clips, so a step runs no teacher forward unless the
caption was dropped or `attention_loss` asks for the teacher's attention outputs.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.utils.checkpoint
from tqdm import tqdm

from ..config import SparseAttentionConfig
from ..errors import ConfigError, SparseDiTError
from ..patterns import PlanContext, build_planner, resolve_config
from ..plugin import attention_sites, compat, enable_sparse_attention
from ..plugin.api import named_transformers, runtime_of
from .clips import sample_spec
from .pipeline import PATCH, SHIFT, ShapesVideoPipeline
from .train import CAPTION_DROPOUT, loss_curve_svg

RECORD = "distill.json"
NOISE_LEVELS = ("sparse", "all", "trajectory")


@dataclass(frozen=True)
class DistillSettings:
    """How long and on what the student is trained.

    Attributes:
        steps: optimiser steps, `batch` examples each.
        batch: examples per step.
        num_frames, height, width: size of the teacher's clips in pixels (the demo patches 1 x 4 x 4, so the
            default 16 x 64 x 64 is 4096 tokens); distil at the resolution the pattern will run at.
        samples: clips the teacher generates to distil on.
        sample_steps: denoising steps of the teacher's generations.
        validation: fixed held-out examples (clip, noise, t) at the steps the pattern runs, the loss is also
            measured on before training, at every checkpoint and at the end.
        lr: AdamW peak learning rate: a linear warm-up over the first 10% of the steps, then a cosine decay to
            zero, so the last steps do not leave the weights where one noisy example pushed them.
        noise_levels: "sparse" (the sampler's noise levels at the steps the pattern runs), "all" (the demo's
            training distribution) or "trajectory" (the teacher's own sampler states at the steps the pattern runs).
        checkpoint_every: steps between checkpoints (`checkpoint-<step>` folders); 0 writes none.
        seed: seed of the captions, noises and noise levels.
        attention_loss: weight of CLEAR's second term: each sparse self-attention output against the dense
            teacher's at the same site, as an MSE relative to the teacher's mean square, averaged over the sites;
            0 trains on the clean-clip prediction alone. It costs a teacher forward per step.
        train: "self", the self-attention modules the pattern replaces, or "all", also the cross-attention to the
            caption (the other attention modules of the transformer).
        student_states_every: with noise_levels "trajectory", every this many steps the student generates the
            training captions again with its pattern on, as at inference, and its own sampler states at the sparse
            steps, with the teacher's predictions from them, become half of the examples (on-policy: the states
            a student whose errors carry from step to step meets); 0 trains on the teacher's states alone.
        rollout_steps: optimiser steps after the `steps` above with the rollout loss (needs noise_levels
            "trajectory"): from the state one teacher clip reached at the end of the dense warm-up, the student runs
            every sparse sampler step with its pattern on, as at inference, and its final clip is regressed onto
            the teacher's. It trains what is scored, errors that add up from step to step included, at the cost of
            one checkpointed forward and backward per sparse step (about 36 s a step at 32 x 64 x 64 on 2 cores,
            some 21 one-step steps).
        rollout_lr: AdamW peak learning rate of the rollout steps, on their own warm-up and cosine decay.
        train_warmup: with noise_levels "sparse" or "trajectory", also train at the levels of the config's dense
            warm-up, where the student runs dense as at inference: its fine-tuned weights run those steps too, and
            a warm-up that drifts from the teacher's hands every sparse step a worse start. On the demo model it
            did not pay: the drift costs about 1 dB, training the warm-up removed little of it, and the sparse
            steps lost more (README, Distillation). "all" levels take in the warm-up's levels either way.
    """

    steps: int = 400
    batch: int = 1
    num_frames: int = 16
    height: int = 64
    width: int = 64
    samples: int = 8
    sample_steps: int = 20
    validation: int = 4
    lr: float = 2e-4
    checkpoint_every: int = 100
    seed: int = 0
    noise_levels: str = "sparse"
    attention_loss: float = 0.0
    train: str = "self"
    student_states_every: int = 0
    rollout_steps: int = 0
    rollout_lr: float = 3e-4
    train_warmup: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "num_frames", "height", "width", "samples", "sample_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.validation < 0 or self.checkpoint_every < 0 or not self.lr > 0 or not self.attention_loss >= 0:
            raise ConfigError("validation, checkpoint_every and attention_loss must be >= 0 and lr > 0, got "
                              f"{self.validation}, {self.checkpoint_every}, {self.attention_loss}, {self.lr}")
        if self.student_states_every < 0 or (self.student_states_every and self.noise_levels != "trajectory"):
            raise ConfigError(f"student_states_every={self.student_states_every} must be >= 0, and above 0 only with "
                              "noise_levels='trajectory' (the student's states replace sampler states)")
        if self.rollout_steps < 0 or (self.rollout_steps and self.noise_levels != "trajectory") or not self.rollout_lr > 0:
            raise ConfigError(f"rollout_steps={self.rollout_steps} must be >= 0, and above 0 only with noise_levels="
                              f"'trajectory' (a rollout starts from the teacher's state after the warm-up); "
                              f"rollout_lr={self.rollout_lr} must be > 0")
        if self.train not in ("self", "all"):
            raise ConfigError(f"train={self.train!r} must be 'self' or 'all'")
        if self.noise_levels not in NOISE_LEVELS:
            raise ConfigError(f"noise_levels={self.noise_levels!r} must be one of {', '.join(NOISE_LEVELS)}")


@dataclass
class Examples:
    """Teacher-generated clean clips and their caption embeddings: clips (N, C, F, H, W), text and empty (N, L, d);
    with `keep_from`, also the sampler's states on the way, states (N, T, C, F, H, W) at noise levels (T,), and
    the teacher's clean-clip predictions from them under the caption, targets (N, T, C, F, H, W)."""

    clips: torch.Tensor
    text: torch.Tensor
    empty: torch.Tensor
    states: torch.Tensor | None = None
    levels: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    captions: list[str] | None = None

    def split(self, n: int) -> "Examples":
        """Keep the first `n` clips; return the others as their own `Examples`."""
        def cut(x: torch.Tensor | None, keep: bool) -> torch.Tensor | None:
            return None if x is None else x[:n] if keep else x[n:]

        rest = Examples(*(cut(x, False) for x in (self.clips, self.text, self.empty, self.states)), self.levels,
                        cut(self.targets, False), None if self.captions is None else self.captions[n:])
        self.clips, self.text, self.empty, self.states, self.targets = (
            cut(x, True) for x in (self.clips, self.text, self.empty, self.states, self.targets))
        self.captions = None if self.captions is None else self.captions[:n]
        return rest

    def after(self, n: int) -> "Examples":
        """The same clips with the first `n` of their sampler states (and targets, levels) left out."""
        if self.states is None or not n:
            return self
        cut = lambda x: None if x is None else x[:, n:]  # noqa: E731
        return Examples(self.clips, self.text, self.empty, cut(self.states), self.levels[n:], cut(self.targets),
                        self.captions)

    def join(self, other: "Examples") -> "Examples":
        """These examples and `other`'s (sampler states at the same levels) as one set."""
        names = ("clips", "text", "empty", "states", "targets")
        return Examples(**{name: torch.cat([getattr(self, name), getattr(other, name)]) for name in names},
                        levels=self.levels)


def attention_parameters(pipe: Any, scope: str = "self") -> dict[str, torch.nn.Parameter]:
    """name -> parameter of every self-attention module that `enable_sparse_attention` makes sparse in `pipe`;
    with scope "all", also of the transformer's other attention modules (the cross-attention to the caption)."""
    found = {}
    for site, module in attention_sites(pipe):
        for name, param in module.named_parameters():
            found[f"{site.id}.{name}"] = param
    if scope == "all":
        classes = compat.load().attention_classes
        for component, model in named_transformers(pipe).items():
            for module_name, module in model.named_modules():
                if isinstance(module, classes):
                    for name, param in module.named_parameters():
                        found.setdefault(f"{component}.{module_name}.{name}", param)
    return found


def make_student(teacher: ShapesVideoPipeline, scope: str = "self") -> ShapesVideoPipeline:
    """A pipeline sharing the teacher's tokenizer, text encoder and scheduler around a copy of its transformer,
    with only the attention weights of `scope` (see `attention_parameters`) trainable. The teacher must not have
    sparse attention enabled."""
    student = ShapesVideoPipeline(tokenizer=teacher.tokenizer, text_encoder=teacher.text_encoder,
                                  transformer=copy.deepcopy(teacher.transformer), scheduler=copy.deepcopy(teacher.scheduler))
    student.transformer.requires_grad_(False)
    for param in attention_parameters(student, scope).values():
        param.requires_grad_(True)
    student.set_progress_bar_config(disable=True)
    return student


def require_static(config: SparseAttentionConfig, settings: DistillSettings) -> None:
    """Raise `ConfigError` unless `config`'s method plans from the token layout alone (its planner gives a cache
    key; a dynamic method's pattern follows q and k, which the fine-tune itself moves) and its options can be
    recorded as JSON."""
    grid = (settings.num_frames, settings.height // PATCH[1], settings.width // PATCH[2])
    if build_planner(config).cache_key(PlanContext(grid=grid, layer=0)) is None:
        raise ConfigError(f"method {config.method!r} plans from q and k on every call; distill adapts a model to a "
                          "static pattern (clear, window, gna, or a method whose planner has a cache_key)")
    try:  # distill.json must rebuild the config the weights were trained for
        json.dumps(_options(config))
    except (TypeError, ValueError):
        raise ConfigError(f"the options of {config.method!r} must be JSON values (numbers, strings, lists) so that "
                          f"distill.json can record them; got {_options(config)}") from None


def sampler_step_index(pipe: ShapesVideoPipeline, timestep: float) -> int:
    """The step of `pipe`'s sampler run (its scheduler set for the run) whose noise interval holds `timestep`
    (t * 1000): the last step at or above it, or the first step for a timestep above them all."""
    return max(int((pipe.scheduler.timesteps >= timestep - 1e-3).sum()) - 1, 0)


@contextlib.contextmanager
def sampler_step(pipe: ShapesVideoPipeline, step: int) -> Iterator[None]:
    """Run the block's transformer calls as step `step` of `pipe`'s sampler run: the hooks read the step from the
    pipeline, as in its denoising loop, so a training call keeps the config's dense warm-up dense and runs the
    pattern after it, as at inference."""
    pipe._current_timestep = pipe.scheduler.timesteps[step]
    try:
        yield
    finally:
        pipe._current_timestep = None


def as_sampled(pipe: ShapesVideoPipeline, t: torch.Tensor) -> Iterator[torch.Tensor]:
    """Split a batch with timesteps `t` (B,) by the sampler step each falls in and run each part as that step:
    yields the rows of each part, long (n,), inside its `sampler_step`."""
    steps = torch.tensor([sampler_step_index(pipe, float(x)) for x in t])
    for step in steps.unique().tolist():
        with sampler_step(pipe, step):
            yield (steps == step).nonzero().flatten()


def teacher_samples(teacher: ShapesVideoPipeline, settings: DistillSettings, gen: torch.Generator,
                    chunk: int = 4, keep_from: int | None = None, extra: int = 0) -> Examples:
    """`settings.samples` (+ `extra`) clips the dense teacher generates from random captions, as (clean) latents;
    with `keep_from`, also the latents entering each of its sampler steps from that one on, and the teacher's
    predictions from them: the targets come from the very transformer calls that made the clips, so training
    on them costs no teacher forward."""
    captions = [sample_spec(gen).caption for _ in range(settings.samples + extra)]
    return _sampled(teacher, teacher, captions, settings, gen, chunk, keep_from)


def student_samples(student: ShapesVideoPipeline, teacher: ShapesVideoPipeline, captions: list[str],
                    settings: DistillSettings, gen: torch.Generator, keep_from: int) -> Examples:
    """The student's own clips from `captions` with its pattern on as at inference (dense warm-up included), its
    sampler states from step `keep_from` on, and the teacher's predictions from those states as targets."""
    student.transformer.eval()
    return _sampled(student, teacher, captions, settings, gen, 4, keep_from)


@torch.no_grad()
def _sampled(pipe: ShapesVideoPipeline, teacher: ShapesVideoPipeline, captions: list[str], settings: DistillSettings,
             gen: torch.Generator, chunk: int, keep_from: int | None) -> Examples:
    """`pipe`'s clips from `captions`, with `keep_from` its sampler states from that step on and the teacher's
    predictions from them (kept from the calls themselves where `pipe` is the teacher)."""
    clips, states, targets = [], [], []
    chunk_state = {"size": 0, "calls": 0}  # the chunk being generated: its captions, its transformer calls so far

    def keep(pipe: ShapesVideoPipeline, i: int, t: torch.Tensor, tensors: dict) -> dict:
        if keep_from is not None and keep_from <= i + 1 < settings.sample_steps:  # the input of step i + 1
            states[-1].append(tensors["latents"].clone())
        return tensors

    def record(module: torch.nn.Module, args: tuple, output: Any) -> None:
        chunk_state["calls"] += 1  # one transformer call per sampler step
        if chunk_state["calls"] > keep_from:
            # The captioned half comes first where guidance batches the empty caption after it.
            targets[-1].append(output[0][: chunk_state["size"]].float().clone())

    hook = teacher.transformer.register_forward_hook(record) if keep_from is not None and pipe is teacher else None
    try:
        desc = "teacher samples" if pipe is teacher else "student samples"
        for start in tqdm(range(0, len(captions), chunk), desc=desc, unit="batch"):
            part = captions[start : start + chunk]
            seeds = [torch.Generator().manual_seed(int(torch.randint(2**31, (1,), generator=gen))) for _ in part]
            states.append([]), targets.append([])
            chunk_state.update(size=len(part), calls=0)
            if keep_from == 0:  # the first step's input is the noise itself, drawn as the pipeline draws it
                states[-1].append(torch.cat([torch.randn(1, pipe.latent_channels, settings.num_frames, settings.height,
                                                         settings.width, generator=torch.Generator().set_state(g.get_state())) for g in seeds]))
            clips.append(pipe(part, num_frames=settings.num_frames, height=settings.height, width=settings.width,
                              num_inference_steps=settings.sample_steps, generator=seeds, output_type="latent",
                              callback_on_step_end=keep).frames)
    finally:
        if hook is not None:
            hook.remove()
    examples = Examples(torch.cat(clips), teacher.encode_prompt(captions), teacher.encode_prompt([""] * len(captions)),
                        captions=captions)
    if keep_from is not None:
        examples.states = torch.cat([torch.stack(part, dim=1) for part in states])
        examples.levels = sampler_levels(teacher, settings.sample_steps)[keep_from:]
        if pipe is teacher:
            examples.targets = torch.cat([torch.stack(part, dim=1) for part in targets])
        else:  # one clip's states in one batch: (T, C, F, H, W) at the T levels
            t = examples.levels * 1000
            examples.targets = torch.stack([teacher.predict_clean(x, t, text.expand(len(t), -1, -1))
                                            for x, text in zip(examples.states, examples.text.split(1))])
    return examples


def _sampler(teacher: ShapesVideoPipeline, sample_steps: int) -> Any:
    """A copy of the teacher's scheduler set for a `sample_steps`-step run (the teacher's own stays untouched)."""
    scheduler = copy.deepcopy(teacher.scheduler)
    scheduler.set_timesteps(sample_steps)
    return scheduler


def sampler_levels(teacher: ShapesVideoPipeline, sample_steps: int) -> torch.Tensor:
    """The noise levels t in (0, 1] of the steps of a `sample_steps`-step run of the teacher's sampler: float (n,)."""
    return _sampler(teacher, sample_steps).timesteps.float().cpu() / 1000


def sampler_sigmas(teacher: ShapesVideoPipeline, sample_steps: int) -> torch.Tensor:
    """The noise levels a `sample_steps`-step run of the teacher's sampler steps through, its final one (0)
    included: float (sample_steps + 1,)."""
    return _sampler(teacher, sample_steps).sigmas.float().cpu()


def sparse_noise_levels(teacher: ShapesVideoPipeline, config: SparseAttentionConfig, sample_steps: int) -> torch.Tensor:
    """The sampler's noise levels t in (0, 1] at the steps of a `sample_steps`-step run where `config` runs sparse
    (after its dense warm-up): float (n,)."""
    return sampler_levels(teacher, sample_steps)[config.dense_step_count(sample_steps):]


def draw(examples: Examples, count: int, gen: torch.Generator,
         levels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`count` training examples: noisy clips x_t (count, C, F, H, W), timesteps t * 1000 (count,), caption
    embeddings (count, L, d), an empty caption with probability CAPTION_DROPOUT, and the teacher's predictions
    (count, C, F, H, W) where the examples hold them (sampler states under their caption), else None. Examples
    with sampler states give those states; otherwise `levels` (n,) are the noise levels to draw t from, None the
    demo's training distribution."""
    index = torch.randint(examples.clips.shape[0], (count,), generator=gen)
    x0 = examples.clips[index]
    noise = torch.randn(x0.shape, generator=gen)
    target = None
    if examples.states is not None:  # the teacher's own sampler states: x_t is where its run was at t
        step = torch.randint(len(examples.levels), (count,), generator=gen)
        xt, t = examples.states[index, step], examples.levels[step]
        target = None if examples.targets is None else examples.targets[index, step]
    elif levels is None:
        u = torch.rand(count, generator=gen).clamp(1e-3, 1 - 1e-3)
        t = SHIFT * u / (1 + (SHIFT - 1) * u)  # the demo's training noise levels (train._noise_levels)
    else:
        t = levels[torch.randint(len(levels), (count,), generator=gen)]
    if examples.states is None:
        sigma = t.view(-1, 1, 1, 1, 1)
        xt = (1 - sigma) * x0 + sigma * noise.to(x0.device)
    drop = (torch.rand(count, generator=gen) < CAPTION_DROPOUT).view(-1, 1, 1)
    text = torch.where(drop.to(x0.device), examples.empty[index], examples.text[index])
    if bool(drop.any()):  # the kept predictions are under the caption
        target = None
    return xt, (t * 1000).to(x0.device), text, target


def sparse_density(student: ShapesVideoPipeline, expect_sparse: bool = True) -> float | None:
    """Density of the student's sparse attention calls since the last call of this function (then cleared), None
    if none ran sparse; raises then if `expect_sparse` (some call lay after the dense warm-up), which would train
    the dense model, not the pattern."""
    stats = runtime_of(student).stats
    density = stats.density(sparse_only=True)
    stats.clear()
    if density is None and expect_sparse:
        config = runtime_of(student).config
        raise SparseDiTError(
            f"no attention call of the student ran sparse (min_seq_len={config.min_seq_len}, dense_layers="
            f"{config.dense_layers}); distilling would train the dense model. Lower min_seq_len or raise the clip size")
    return density


@torch.no_grad()
def validation_loss(student: ShapesVideoPipeline, batches: list[tuple[torch.Tensor, ...]]) -> float | None:
    """Mean MSE of the student's predictions against the teacher's on the fixed validation examples (None for
    none). Its attention calls are left out of the training's density."""
    student.transformer.eval()
    losses = [sum(torch.nn.functional.mse_loss(student.predict_clean(xt[rows], t[rows], text[rows]), target[rows],
                                               reduction="sum").item() for rows in as_sampled(student, t)) / target.numel()
              for xt, t, text, target in batches]
    runtime_of(student).stats.clear()
    return sum(losses) / len(losses) if losses else None


def distill(out: str | Path, method: str, options: dict[str, Any] | None = None, teacher: str | Path | None = None,
            settings: DistillSettings = DistillSettings(), device: str = "cpu") -> dict:
    """Fine-tune the demo model's self-attention onto `method`'s static pattern; save it to `out`.

    Args:
        out: output folder: the student pipeline (`save_pretrained`), `distill.json` (the method, its config, the
            settings and the losses), `loss_curve.svg`, and `checkpoint-<step>` pipelines.
        method: a registered method name; options: its config options (validated as `enable_sparse_attention`
            does).
        teacher: the model to distil, as `load_demo_pipeline` takes it (default: the shipped demo weights).
    Returns:
        The record written to `distill.json`.

    Load the result with `load_distilled(out)`, or `load_demo_pipeline(out)` then `enable_sparse_attention(method,
    **record["config"])`.
    """
    from . import load_demo_pipeline

    out, begin = Path(out), time.perf_counter()
    config = resolve_config(method, **(options or {}))
    require_static(config, settings)
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    dense = load_demo_pipeline(teacher).to(device)
    dense.set_progress_bar_config(disable=True)
    dense.transformer.requires_grad_(False)
    student = make_student(dense, settings.train)
    enable_sparse_attention(student, config)
    # Training calls run as the sampler steps their noise levels fall in, so the warm-up's stay dense.
    student.scheduler.set_timesteps(settings.sample_steps)
    warmup = config.dense_step_count(settings.sample_steps)
    if warmup >= len(student.scheduler.timesteps) and settings.noise_levels != "all":
        raise ConfigError(f"dense_steps={config.dense_steps} leaves no sparse step in a {settings.sample_steps}-step run "
                          "to distil on; lower dense_steps or use noise_levels='all'")
    keep_from = 0 if settings.train_warmup else warmup  # the first sampler step trained on
    first_sparse = warmup - keep_from  # where the sparse steps start among the kept states and levels
    levels = sampler_levels(dense, settings.sample_steps)[keep_from:] if settings.noise_levels != "all" else None
    trajectory = settings.noise_levels == "trajectory"
    examples = teacher_samples(dense, settings, gen, keep_from=keep_from if trajectory else None,
                               extra=1 if trajectory and settings.validation else 0)
    # Sampler states repeat exactly, so their validation examples come from a clip held out of training.
    held_out = examples.split(settings.samples) if trajectory and settings.validation else examples
    # Validation measures the student where its pattern runs (the warm-up starts out exact).
    val_examples = held_out.after(first_sparse)
    val = [_with_target(dense, *draw(val_examples, 1, gen, None if levels is None else levels[first_sparse:]))
           for _ in range(settings.validation)]
    record: dict[str, Any] = {"method": config.method, "config": _options(config), "settings": asdict(settings),
                              "teacher": str(teacher or "demo"), "trained": sorted(attention_parameters(student, settings.train)),
                              "validation": [{"step": 0, "loss": validation_loss(student, val)}]}
    trained = [p for p in attention_parameters(student, settings.train).values() if p.requires_grad]
    optimiser, schedule = _optimiser(trained, settings.lr, settings.steps)
    if settings.rollout_steps:
        sigmas = sampler_sigmas(dense, settings.sample_steps)[warmup:]
        record["rollout_validation"] = [{"step": 0, "loss": rollout_loss(student, val_examples, sigmas)}]
    log, start = [], time.perf_counter()
    stage = f"{settings.num_frames}x{settings.height}x{settings.width}"
    bar = tqdm(range(1, settings.steps + 1), desc=f"distill {config.method}", unit="step")
    teachers = examples
    for step in bar:
        if settings.student_states_every and step > 1 and (step - 1) % settings.student_states_every == 0:
            examples = teachers.join(student_samples(student, dense, teachers.captions, settings, gen, keep_from))
            runtime_of(student).stats.clear()  # the generation's calls are not training's
        student.transformer.train()
        batch = draw(examples, settings.batch, gen, levels)
        loss = _train_step(student, dense, batch, trained, optimiser, settings.attention_loss)
        schedule.step()
        density = sparse_density(student, any(sampler_step_index(student, float(t)) >= warmup for t in batch[1]))
        log.append({"step": step, "loss": loss, "density": density, "stage": stage, "s": time.perf_counter() - start})
        bar.set_postfix(loss=f"{loss:.2e}", density="dense" if density is None else f"{density:.3f}")
        if settings.checkpoint_every and step % settings.checkpoint_every == 0 and step < settings.steps:
            record["validation"].append({"step": step, "loss": validation_loss(student, val)})
            student.save_pretrained(out / f"checkpoint-{step}")
    bar.close()
    record["validation"].append({"step": settings.steps, "loss": validation_loss(student, val)})
    if settings.rollout_steps:
        if settings.checkpoint_every:  # the one-step phase's result, to compare the rollout phase's with
            student.save_pretrained(out / f"checkpoint-{settings.steps}")
        _rollout_phase(student, teachers.after(first_sparse), val_examples, sigmas, trained, settings, gen, record,
                       log, start)
    densities = [r["density"] for r in log if r["density"] is not None]  # the steps that ran the pattern
    record |= {"seconds": time.perf_counter() - start, "total_seconds": time.perf_counter() - begin,
               "density": sum(densities) / len(densities) if densities else None, "log": log}
    student.save_pretrained(out)
    (out / RECORD).write_text(json.dumps(record, indent=1))
    (out / "loss_curve.svg").write_text(loss_curve_svg(log))
    return record


def _optimiser(trained: list[torch.nn.Parameter], lr: float,
               steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW at peak `lr`, with a linear warm-up over the first 10% of `steps` and a cosine decay to zero."""
    optimiser = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    return optimiser, torch.optim.lr_scheduler.LambdaLR(optimiser, lambda i: min((i + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * max(0, i + 1 - warmup) / max(1, steps - warmup)))))


def rollout(pipe: ShapesVideoPipeline, latents: torch.Tensor, text: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The pipeline's Euler sampler run from `latents` (B, C, F, H, W) at noise level sigmas[0] down through
    `sigmas` (n + 1,), n transformer calls under `text` (B, L, d), without guidance as the demo samples, each call
    as the step of the pipeline's scheduler (set for the run) at its level. Returns the final latents
    (B, C, F, H, W). Where a gradient is on, each call is checkpointed: memory holds one call's activations
    instead of n (at 32 x 64 x 64, 16 calls' would not fit in 24 GiB), for one more forward each."""
    for sigma, after in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        t = torch.full((latents.shape[0],), sigma * 1000, device=latents.device)
        call = functools.partial(_velocity_at_step, pipe, sampler_step_index(pipe, sigma * 1000))
        v = torch.utils.checkpoint.checkpoint(call, latents, t, text, use_reentrant=False) if torch.is_grad_enabled() \
            else call(latents, t, text)
        latents = latents + (after - sigma) * v
    return latents


def _velocity_at_step(pipe: ShapesVideoPipeline, step: int, latents: torch.Tensor, t: torch.Tensor,
                      text: torch.Tensor) -> torch.Tensor:
    """`pipe.velocity` as sampler step `step`; a checkpoint's recompute in the backward pass runs it as that step
    again."""
    with sampler_step(pipe, step):
        return pipe.velocity(latents, t, text)


@torch.no_grad()
def rollout_loss(student: ShapesVideoPipeline, examples: Examples, sigmas: torch.Tensor) -> float | None:
    """Mean MSE of the student's final clips against the teacher's, each run from the teacher's state after the
    dense warm-up (examples.states[:, 0]) through `sigmas` (None without examples). Its attention calls are left
    out of the training's density."""
    if examples.states is None or not len(examples.clips):
        return None
    student.transformer.eval()
    losses = [torch.nn.functional.mse_loss(rollout(student, x[None, 0], text[None], sigmas), clip[None]).item()
              for x, text, clip in zip(examples.states, examples.text, examples.clips)]
    runtime_of(student).stats.clear()
    return sum(losses) / len(losses)


def _rollout_phase(student: ShapesVideoPipeline, examples: Examples, held_out: Examples, sigmas: torch.Tensor,
                   trained: list[torch.nn.Parameter], settings: DistillSettings, gen: torch.Generator,
                   record: dict[str, Any], log: list[dict], start: float) -> None:
    """`settings.rollout_steps` optimiser steps on the rollout loss, one teacher clip each (under its caption:
    the demo samples without guidance), appending to `log` and to record["rollout_validation"]."""
    record["rollout_validation"].append({"step": settings.steps, "loss": rollout_loss(student, held_out, sigmas)})
    optimiser, schedule = _optimiser(trained, settings.rollout_lr, settings.rollout_steps)
    stage = f"rollout {settings.num_frames}x{settings.height}x{settings.width}"
    bar = tqdm(range(1, settings.rollout_steps + 1), desc="rollout", unit="step")
    for step in bar:
        n = int(torch.randint(len(examples.clips), (1,), generator=gen))
        student.transformer.train()
        final = rollout(student, examples.states[n : n + 1, 0], examples.text[n : n + 1], sigmas)
        loss = _update(torch.nn.functional.mse_loss(final, examples.clips[n : n + 1]), trained, optimiser)
        schedule.step()
        density = sparse_density(student)
        log.append({"step": settings.steps + step, "loss": loss, "density": density, "stage": stage,
                    "s": time.perf_counter() - start})
        bar.set_postfix(loss=f"{loss:.2e}", density=f"{density:.3f}")
    bar.close()
    record["rollout_validation"].append({"step": settings.steps + settings.rollout_steps,
                                         "loss": rollout_loss(student, held_out, sigmas)})


def _train_step(student: ShapesVideoPipeline, teacher: ShapesVideoPipeline, batch: tuple[torch.Tensor, ...],
                trained: list[torch.nn.Parameter], optimiser: torch.optim.Optimizer, attention_loss: float = 0.0) -> float:
    """One optimiser step on (x_t, t, text, target or None) from `draw`: MSE of the sparse student's clean-clip
    prediction against the dense teacher's, plus `attention_loss` times the mean relative MSE of the self-attention
    outputs. Returns the loss."""
    xt, t, text, target = batch if attention_loss else _with_target(teacher, *batch)
    loss = xt.new_zeros(())
    for rows in as_sampled(student, t):  # one part per sampler step: dense in the warm-up, sparse after it
        if attention_loss:
            with torch.no_grad(), attention_outputs(teacher) as expected:
                target_rows = teacher.predict_clean(xt[rows], t[rows], text[rows])
        else:
            target_rows = target[rows]
        with attention_outputs(student) as got:
            part = torch.nn.functional.mse_loss(student.predict_clean(xt[rows], t[rows], text[rows]), target_rows)
        if attention_loss:
            sites = [torch.nn.functional.mse_loss(a, b) / b.pow(2).mean() for a, b in zip(got, expected, strict=True)]
            part = part + attention_loss * torch.stack(sites).mean()
        loss = loss + part * len(rows) / len(t)
    return _update(loss, trained, optimiser)


def _update(loss: torch.Tensor, trained: list[torch.nn.Parameter], optimiser: torch.optim.Optimizer) -> float:
    """Back-propagate `loss`, clip the gradient norm of `trained` to 1 and step `optimiser`. Returns the loss."""
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trained, 1.0)
    optimiser.step()
    return loss.item()


@contextlib.contextmanager
def attention_outputs(pipe: ShapesVideoPipeline) -> Iterator[list[torch.Tensor]]:
    """Collect the output of every self-attention module `enable_sparse_attention` applies to, in call order,
    while the block runs."""
    found: list[torch.Tensor] = []
    hooks = [module.register_forward_hook(lambda m, args, out: found.append(out[0] if isinstance(out, tuple) else out))
             for _, module in attention_sites(pipe)]
    try:
        yield found
    finally:
        for hook in hooks:
            hook.remove()


def _with_target(teacher: ShapesVideoPipeline, xt: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                 target: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, text, the dense teacher's prediction of the clean clip): `target` where `draw` had it kept."""
    if target is not None:
        return xt, t, text, target
    with torch.no_grad():
        return xt, t, text, teacher.predict_clean(xt, t, text)


def _options(config: SparseAttentionConfig) -> dict[str, Any]:
    """The config's options as JSON, without the method name."""
    options = config.to_dict()
    options.pop("method")
    return options


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples configs take."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def load_distilled(path: str | Path, **overrides: Any) -> ShapesVideoPipeline:
    """The pipeline `distill` saved at `path`, with its method enabled under the recorded config (`overrides`
    on top, e.g. `dense_steps=0`)."""
    from . import load_demo_pipeline

    record_path = Path(path) / RECORD
    if not record_path.is_file():
        raise SparseDiTError(f"{path} has no {RECORD}: it is not a folder `sparse-dit distill --out` wrote")
    record = json.loads(record_path.read_text())
    pipe = load_demo_pipeline(path)
    options = {k: _tuples(v) for k, v in record["config"].items()}
    enable_sparse_attention(pipe, record["method"], **{**options, **overrides})
    return pipe


__all__ = ["DistillSettings", "Examples", "attention_parameters", "distill", "load_distilled", "make_student",
           "require_static", "sampler_step", "sampler_step_index", "sparse_noise_levels", "student_samples",
           "teacher_samples"]
