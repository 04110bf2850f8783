"""`sparse-dit distill`: fine-tuning the demo model's self-attention onto a static pattern, on a tiny setting."""

import dataclasses
import json
import re

import pytest
import torch

import sparse_dit.patterns.clear  # noqa: F401  (registers the method)
from sparse_dit import ConfigError, SparseDiTError, UnknownMethodError
from sparse_dit.cli import build_parser, main
from sparse_dit.demo import load_demo_pipeline
from sparse_dit.demo.distill import DistillSettings, distill, load_distilled

# 4 frames of 32 x 32 pixels: a 4 x 8 x 8 grid of 256 tokens, in 16-token blocks so the pattern is sparse.
TINY = ["--num-frames", "4", "--height", "32", "--width", "32", "--samples", "2", "--sample-steps", "3",
        "--validation", "4", "--steps", "24", "--checkpoint-every", "12", "--lr", "5e-4"]
SMALL_BLOCKS = ["min_seq_len=0", "block_size=16"]
METHODS = {"clear": ["radius=2", "temporal_extent=0"], "window": ["window=[1,3,3]"]}


@pytest.fixture(scope="module", params=sorted(METHODS))
def distilled(request, tmp_path_factory):
    """(method, output folder, record) of one tiny distillation through the command line."""
    method, out = request.param, tmp_path_factory.mktemp(f"distill-{request.param}")
    code = main(["distill", "--method", method, "--config", *METHODS[method], *SMALL_BLOCKS, "--out", str(out), *TINY])
    assert code == 0
    return method, out, json.loads((out / "distill.json").read_text())


def test_the_loss_against_the_dense_teacher_goes_down(distilled):
    _, _, record = distilled
    val = [v["loss"] for v in record["validation"]]
    assert [v["step"] for v in record["validation"]] == [0, 12, 24]
    assert val[-1] < 0.9 * val[0], val


def test_training_ran_through_the_sparse_pattern(distilled):
    method, _, record = distilled
    assert len(record["log"]) == 24
    assert all(0 < r["density"] < 0.6 for r in record["log"]), "a step trained dense attention"
    assert record["method"] == method and record["config"]["min_seq_len"] == 0


def test_only_the_self_attention_weights_moved(distilled):
    _, out, record = distilled
    before = load_demo_pipeline().transformer.state_dict()
    after = load_demo_pipeline(out).transformer.state_dict()
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved and all(".attn1." in name for name in moved), sorted(moved)
    assert {f"transformer.{name}" for name in moved} <= set(record["trained"])


def test_the_output_folder_loads_back_and_runs_sparse(distilled):
    method, out, record = distilled
    assert {"distill.json", "loss_curve.svg", "model_index.json", "checkpoint-12"} <= {p.name for p in out.iterdir()}
    assert (out / "loss_curve.svg").read_text().startswith("<svg")
    assert not (out / "checkpoint-24").exists()  # the final weights are the folder itself
    pipe = load_demo_pipeline(out)
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in record["config"].items()}
    pipe.enable_sparse_attention(method, **options)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe("a red circle moving left", num_frames=4, height=32, width=32, num_inference_steps=2).frames
    assert frames.shape == (1, 4, 32, 32, 3) and torch.isfinite(torch.as_tensor(frames)).all()
    assert pipe.sparse_attention_stats().density(sparse_only=True) < 1
    again = load_distilled(out, dense_steps=0)
    again.set_progress_bar_config(disable=True)
    again("a red circle moving left", num_frames=4, height=32, width=32, num_inference_steps=1)
    assert again.sparse_attention_stats().density() < 1


def test_a_setting_where_nothing_runs_sparse_is_refused(tmp_path):
    settings = DistillSettings(steps=1, num_frames=1, height=16, width=16, samples=1, sample_steps=1, validation=0)
    with pytest.raises(SparseDiTError, match="ran sparse"):
        distill(tmp_path, "window", {"window": 1}, settings=settings)  # min_seq_len 1024 > 16 tokens


def test_a_warm_up_that_covers_every_step_is_refused(tmp_path):
    settings = DistillSettings(steps=1, num_frames=2, height=32, width=32, samples=1, sample_steps=3, validation=0)
    with pytest.raises(ConfigError, match="no sparse step"):
        distill(tmp_path, "window", {"window": (1, 3, 3), "min_seq_len": 0, "block_size": 16, "dense_steps": 3},
                settings=settings)


def test_runs_without_validation_or_checkpoints(tmp_path):
    settings = DistillSettings(steps=2, num_frames=2, height=32, width=32, samples=1, sample_steps=1, validation=0,
                               checkpoint_every=0)
    record = distill(tmp_path, "clear", {"radius": 1, "min_seq_len": 0, "block_size": 16}, settings=settings)
    assert [v["loss"] for v in record["validation"]] == [None, None] and len(record["log"]) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("checkpoint")]


@pytest.mark.parametrize("method, options, error", [
    ("nope", {}, UnknownMethodError),
    ("clear", {"radius": -1}, ConfigError),
    ("clear", {"nope": 1}, ConfigError),
    ("oracle", {}, ConfigError),  # dynamic: plans from q and k
])
def test_bad_methods_and_options_fail_before_anything_loads(tmp_path, method, options, error):
    with pytest.raises(error):
        distill(tmp_path, method, options, settings=DistillSettings(steps=1))
    assert not any(tmp_path.iterdir())


def test_config_needs_key_value(tmp_path, capsys):
    assert main(["distill", "--method", "clear", "--config", "radius", "--out", str(tmp_path)]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_help_states_the_settings_defaults():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices["distill"]
    text = " ".join(sub.format_help().split()).split("options:")[1]
    defaults = {f.name: f.default for f in dataclasses.fields(DistillSettings)}
    for name, value in defaults.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):  # --flag, --no-flag
            flag, value = f"{flag}, --no-{flag[2:]}", "on" if value else "off"
            match = re.search(re.escape(flag) + r" [^(]*\(default: ([^)]*)\)", text)
        else:
            match = re.search(re.escape(flag) + r" [A-Z_]+ [^(]*\(default: ([^)]*)\)", text)
        assert match and match.group(1) == str(value), (flag, value, match and match.group(1))


def test_sparse_noise_levels_are_the_samplers_after_the_dense_warm_up():
    from sparse_dit.demo.distill import sparse_noise_levels
    from sparse_dit.patterns import resolve_config

    pipe = load_demo_pipeline()
    pipe.scheduler.set_timesteps(10)
    every = pipe.scheduler.timesteps.float() / 1000
    levels = sparse_noise_levels(pipe, resolve_config("window", dense_steps=0.2), 10)
    assert torch.equal(levels, every[2:]) and levels.max() < every[0]
    with pytest.raises(ConfigError, match="noise_levels"):
        DistillSettings(noise_levels="late")
    with pytest.raises(ConfigError, match="only with noise_levels='trajectory'"):
        DistillSettings(student_states_every=100)
    with pytest.raises(ConfigError, match="only with noise_levels='trajectory'"):
        DistillSettings(rollout_steps=10)
    with pytest.raises(ConfigError, match="rollout_lr"):
        DistillSettings(noise_levels="trajectory", rollout_steps=10, rollout_lr=0.0)


def test_student_samples_are_the_students_own_states_with_the_teachers_targets():
    """On-policy examples: the student's sampler states under its pattern, and the teacher's predictions there."""
    from sparse_dit.demo.distill import _sampled, make_student, student_samples
    from sparse_dit.patterns import resolve_config

    teacher = load_demo_pipeline()
    teacher.set_progress_bar_config(disable=True)
    student = make_student(teacher)
    config = resolve_config("window", window=(1, 3, 3), min_seq_len=0, block_size=16, dense_steps=1)
    student.enable_sparse_attention(config)
    settings = DistillSettings(num_frames=4, height=32, width=32, samples=2, sample_steps=3)
    examples = student_samples(student, teacher, ["a red circle moving left", "a blue square staying still"], settings,
                               torch.Generator().manual_seed(0), keep_from=1)
    assert examples.states.shape == (2, 2, *examples.clips.shape[1:]) and examples.targets.shape == examples.states.shape
    t = examples.levels * 1000
    torch.testing.assert_close(examples.targets[1], teacher.predict_clean(examples.states[1], t, examples.text[1:2].expand(2, -1, -1)))
    # The states are the student's own: after its dense first step the teacher's, after its sparse second not.
    dense = _sampled(teacher, teacher, ["a red circle moving left", "a blue square staying still"], settings,
                     torch.Generator().manual_seed(0), 4, 1)
    torch.testing.assert_close(examples.states[:, 0], dense.states[:, 0])
    assert not torch.allclose(examples.states[:, 1], dense.states[:, 1], atol=1e-3)


def test_trajectory_examples_are_the_teachers_own_sampler_states():
    """With noise_levels="trajectory" the student trains on the latents the teacher's sampler passed through at
    the steps the pattern runs: re-running the sampler from one kept state reproduces the teacher's clip."""
    from sparse_dit.demo.distill import sampler_levels, teacher_samples

    teacher = load_demo_pipeline()
    teacher.set_progress_bar_config(disable=True)
    settings = DistillSettings(num_frames=2, height=16, width=16, samples=3, sample_steps=4)
    for keep_from in (0, 2):
        examples = teacher_samples(teacher, settings, torch.Generator().manual_seed(0), chunk=2, keep_from=keep_from)
        assert examples.states.shape == (3, 4 - keep_from, *examples.clips.shape[1:])
        assert torch.equal(examples.levels, sampler_levels(teacher, 4)[keep_from:])
        assert examples.targets.shape == examples.states.shape
        # Finish sample 1 from its last kept state with the last sampler step: its clip, exactly.
        scheduler = teacher.scheduler
        scheduler.set_timesteps(4)
        t = scheduler.timesteps[-1]
        state = examples.states[1, -1:]
        velocity = teacher.velocity(state, t.expand(1), examples.text[1:2])
        # The kept target is the teacher's prediction from that state, taken from the call that made the clip.
        torch.testing.assert_close(examples.targets[1, -1:], teacher.predict_clean(state, t.expand(1), examples.text[1:2]),
                                   rtol=0, atol=1e-5)
        scheduler._step_index = 3
        done = scheduler.step(velocity, t, state, return_dict=False)[0]
        torch.testing.assert_close(done, examples.clips[1:2], rtol=0, atol=1e-5)
    # The first step's input is the noise the pipeline draws.
    examples = teacher_samples(teacher, settings, torch.Generator().manual_seed(0), chunk=2, keep_from=0)
    assert examples.states[:, 0].std().item() == pytest.approx(1.0, abs=0.2)


def test_training_calls_run_as_the_sampler_step_their_noise_level_falls_in():
    """A training call at a noise level of the dense warm-up runs dense, exactly as the teacher; later ones sparse."""
    from sparse_dit.demo.distill import as_sampled, make_student, sampler_step_index
    from sparse_dit.plugin.api import runtime_of

    teacher = load_demo_pipeline()
    student = make_student(teacher)
    student.enable_sparse_attention("window", window=(1, 3, 3), min_seq_len=0, block_size=16, dense_steps=2)
    student.scheduler.set_timesteps(4)
    timesteps = student.scheduler.timesteps
    assert [sampler_step_index(student, float(t)) for t in timesteps] == [0, 1, 2, 3]
    between = float(timesteps[1] + timesteps[2]) / 2
    assert [sampler_step_index(student, t) for t in (1000.0, between, 0.0)] == [0, 1, 3]
    t = timesteps.flip(0)  # rows 3 and 2 in the warm-up
    x = torch.randn(4, student.latent_channels, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    text = teacher.encode_prompt(["a red circle moving left"] * 4)
    stats, ran = runtime_of(student).stats, {}
    with torch.no_grad():
        for rows in as_sampled(student, t):
            stats.clear()
            got = student.predict_clean(x[rows], t[rows], text[rows])
            ran[int(rows)] = stats.density(sparse_only=True)
            if int(rows) >= 2:
                torch.testing.assert_close(got, teacher.predict_clean(x[rows], t[rows], text[rows]), rtol=0, atol=0)
    assert ran[3] is None and ran[2] is None and 0 < ran[1] < 0.6 and 0 < ran[0] < 0.6, ran
    assert student._current_timestep is None


@pytest.mark.parametrize("attention_loss, student_states_every, train_warmup",
                         [(0.0, 0, True), (0.0, 0, False), (0.5, 0, True), (0.0, 5, True)])
def test_distill_on_trajectory_states_lowers_the_loss(tmp_path, attention_loss, student_states_every, train_warmup):
    settings = DistillSettings(steps=12, num_frames=4, height=32, width=32, samples=2, sample_steps=3, validation=2,
                               checkpoint_every=0, lr=5e-4, noise_levels="trajectory", attention_loss=attention_loss,
                               student_states_every=student_states_every, train_warmup=train_warmup)
    record = distill(tmp_path, "window", {"window": (1, 3, 3), "min_seq_len": 0, "block_size": 16, "dense_steps": 1},
                     settings=settings)
    assert record["validation"][-1]["loss"] < record["validation"][0]["loss"]
    densities = [r["density"] for r in record["log"]]
    # The warm-up's step (one of the 3) trains dense; the others through the pattern.
    assert (None in densities) == train_warmup and all(0 < d < 0.6 for d in densities if d is not None)
    # The attention term adds to the clean-clip MSE, which alone is under 0.01 here.
    assert (min(r["loss"] for r in record["log"]) > 0.01) == (attention_loss > 0)


def test_a_rollout_of_the_dense_model_is_the_pipelines_own_run():
    """The rollout loss trains what inference runs: from the state after the warm-up, `rollout` through the
    sampler's remaining noise levels lands on the teacher's clip, and keeps a gradient for the student."""
    from sparse_dit.demo.distill import make_student, rollout, sampler_sigmas, teacher_samples

    teacher = load_demo_pipeline()
    teacher.set_progress_bar_config(disable=True)
    settings = DistillSettings(num_frames=2, height=16, width=16, samples=2, sample_steps=5)
    examples = teacher_samples(teacher, settings, torch.Generator().manual_seed(0), chunk=2, keep_from=2)
    sigmas = sampler_sigmas(teacher, 5)
    assert sigmas.shape == (6,) and sigmas[-1] == 0 and torch.allclose(sigmas[:-1], examples.levels.new_tensor(
        [*sigmas[:2], *examples.levels]), atol=1e-6)
    with torch.no_grad():
        done = rollout(teacher, examples.states[:, 0], examples.text, sigmas[2:])
    torch.testing.assert_close(done, examples.clips, rtol=0, atol=1e-4)
    student = make_student(teacher)
    final = rollout(student, examples.states[:1, 0], examples.text[:1], sigmas[2:])
    torch.nn.functional.mse_loss(final, examples.clips[:1]).backward()
    grads = [p.grad for p in student.transformer.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_rollout_steps_lower_the_final_clip_error(tmp_path):
    settings = DistillSettings(steps=4, num_frames=4, height=32, width=32, samples=2, sample_steps=3, validation=1,
                               checkpoint_every=4, lr=5e-4, noise_levels="trajectory", rollout_steps=8, rollout_lr=1e-3)
    record = distill(tmp_path, "window", {"window": (1, 3, 3), "min_seq_len": 0, "block_size": 16, "dense_steps": 1},
                     settings=settings)
    start, before, after = (r["loss"] for r in record["rollout_validation"])
    assert after < before and after < start
    assert [r["stage"] for r in record["log"]] == ["4x32x32"] * 4 + ["rollout 4x32x32"] * 8
    # A rollout runs the sparse steps only; a one-step step in the warm-up trains dense.
    assert all(0 < r["density"] < 0.6 for r in record["log"][4:])
    assert all(r["density"] is None or 0 < r["density"] < 0.6 for r in record["log"][:4])
    assert (tmp_path / "checkpoint-4").is_dir()  # the one-step phase's result, before the rollout


def test_trajectory_validation_uses_a_held_out_clip():
    from sparse_dit.demo.distill import Examples

    examples = Examples(torch.arange(3.0).view(3, 1), torch.zeros(3, 2, 1), torch.ones(3, 2, 1),
                        torch.arange(6.0).view(3, 2, 1), torch.tensor([0.5, 0.25]), -torch.arange(6.0).view(3, 2, 1))
    rest = examples.split(2)
    assert examples.clips.flatten().tolist() == [0, 1] and rest.clips.flatten().tolist() == [2]
    assert examples.states.shape[0] == 2 and rest.states.flatten().tolist() == [4, 5]
    assert examples.targets.shape[0] == 2 and rest.targets.flatten().tolist() == [-4, -5]
    assert rest.levels is examples.levels
