"""The demo pipeline: diffusers calling conventions, save/load round trip, training command, bad input."""

import pytest
import torch

from sparse_dit import ConfigError, SparseDiTError
from sparse_dit.cli import main
from sparse_dit.demo import load_demo_pipeline


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["train-demo", "--out", str(out), "--stages", "4x16:2:2,4x32:1:1"]) == 0
    pipe = load_demo_pipeline(out)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, **kw):
    args = dict(prompt="a red circle moving left", num_frames=4, height=32, width=32, num_inference_steps=2,
                generator=torch.Generator().manual_seed(0), output_type="pt")
    return pipe(**{**args, **kw}).frames


def test_round_trip_and_conventions(trained):
    frames = run(trained)
    assert frames.shape == (1, 4, 3, 32, 32) and 0 <= float(frames.min()) and float(frames.max()) <= 1
    assert torch.equal(frames, run(trained))  # same seed, same clip
    seen = []
    run(trained, callback_on_step_end=lambda p, i, t, kw: seen.append(i) or kw)
    assert seen == [0, 1]
    assert run(trained, output_type="np").shape == (1, 4, 32, 32, 3)


def test_sparse_attention_on_the_demo_pipeline(trained):
    dense = run(trained)
    trained.enable_sparse_attention("window", window=(1, 3, 3), block_size=16, min_seq_len=0, dense_steps=0)
    sparse = run(trained)
    assert 0 < trained.sparse_attention_stats().density() < 1
    trained.disable_sparse_attention()
    assert not torch.equal(sparse, dense) and torch.equal(run(trained), dense)


def test_bad_input(trained, tmp_path):
    with pytest.raises(ConfigError, match="knows: .*circle"):
        run(trained, prompt="a purple circle moving left")
    with pytest.raises(ConfigError, match="try 28 or 32"):
        run(trained, height=30)
    with pytest.raises(SparseDiTError, match="train-demo"):
        load_demo_pipeline(tmp_path)


def test_coordinate_planes_with_fourier_features():
    from sparse_dit.demo.pipeline import coordinate_planes

    times = torch.linspace(-1, 1, 3)
    planes = coordinate_planes(times, 4, 8, frequencies=2)
    assert planes.shape == (3 + 6 * 2, 3, 4, 8)
    x, y, t = planes[:3]
    assert torch.equal(x[0, 0], torch.linspace(-1, 1, 8)) and torch.equal(y[0, :, 0], torch.linspace(-1, 1, 4))
    assert torch.equal(t[:, 0, 0], times)
    # k = 1: sin then cos of 2 pi times each raw plane
    assert torch.allclose(planes[9:12], torch.sin(2 * torch.pi * planes[:3]), atol=1e-6)
    assert torch.allclose(planes[12:15], torch.cos(2 * torch.pi * planes[:3]), atol=1e-6)
    batched = coordinate_planes(torch.stack([times, times.flip(0)]), 4, 8, frequencies=2)
    assert batched.shape == (2, 15, 3, 4, 8) and torch.equal(batched[0], planes)


def test_training_takes_a_spec_drawer_and_model_arguments(tmp_path):
    from sparse_dit.demo.clips import ClipSpec, ShapeSpec
    from sparse_dit.demo.train import Stage, _batch, train_demo

    spec = ClipSpec((ShapeSpec("red", "circle", "left"),))
    _, _, captions = _batch(Stage(4, 16, 8, 1), torch.Generator().manual_seed(0), lambda gen: spec)
    assert set(captions) <= {spec.caption, ""} and spec.caption in captions  # "" is the caption dropout
    train_demo(tmp_path, [Stage(4, 16, 1, 1)], draw=lambda gen: spec, model={"layers": 1})
    assert load_demo_pipeline(tmp_path).transformer.config.num_layers == 1


def test_coverage_channel_is_trained_on_and_dropped_from_the_frames(tmp_path):
    from sparse_dit.demo.clips import ClipSpec, ShapeSpec, render_with_coverage
    from sparse_dit.demo.train import Stage, _batch

    spec = ClipSpec((ShapeSpec("red", "circle", "left"),))
    stage = Stage(4, 16, 1, 1)
    plain, _, _ = _batch(stage, torch.Generator().manual_seed(0), lambda gen: spec)
    with_cover, _, _ = _batch(stage, torch.Generator().manual_seed(0), lambda gen: spec, coverage=True)
    assert plain.shape == (1, 3, 4, 16, 16) and with_cover.shape == (1, 4, 4, 16, 16)
    assert torch.equal(with_cover[:, :3], plain)  # the same clip, and the same draws from the generator
    _, covered = render_with_coverage(spec, 16, 16, 16, torch.Generator().manual_seed(0))
    assert with_cover[0, 3].min() == -1 and with_cover[0, 3].max() == 1  # covered pixels are 1, background -1
    assert covered.max() == 1

    assert main(["train-demo", "--out", str(tmp_path), "--stages", "4x16:1:1"]) == 0  # the defaults: the shipped recipe
    pipe = load_demo_pipeline(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.latent_channels == 4 and pipe.text_encoder.config.num_layers == 0
    assert run(pipe, height=16, width=16).shape == (1, 4, 3, 16, 16)  # (B, F, 3, H, W): RGB only

    assert main(["train-demo", "--out", str(tmp_path / "rgb"), "--stages", "4x16:1:1", "--no-coverage", "--text-layers", "1"]) == 0
    pipe = load_demo_pipeline(tmp_path / "rgb")
    assert pipe.latent_channels == 3 and pipe.text_encoder.config.num_layers == 1


def test_qk_gain_ramp_scales_only_the_self_attention_gains(tmp_path):
    from sparse_dit.demo.pipeline import ShapesVideoPipeline
    from sparse_dit.demo.train import Stage, gain_at, qk_gain_parameters, train_demo

    assert [gain_at(s, 3.0, (2, 6)) for s in (0, 2, 4, 6, 9)] == [1.0, 1.0, 2.0, 3.0, 3.0]
    assert gain_at(0, 2.0, (0, 0)) == 2.0  # an empty ramp: the gain from the start
    train_demo(tmp_path / "plain", [Stage(4, 16, 1, 3)], model={"layers": 1}, lr=1e-6)
    train_demo(tmp_path / "ramp", [Stage(4, 16, 1, 3)], model={"layers": 1}, lr=1e-6, qk_gain=2.0, qk_gain_ramp=(1, 3))
    plain, ramp = (ShapesVideoPipeline.from_pretrained(tmp_path / name).transformer for name in ("plain", "ramp"))
    names = {n for n, _ in ramp.named_parameters()}
    gains = {id(p) for p in qk_gain_parameters(ramp)}
    assert len(gains) == 2  # norm_q and norm_k of the one layer's self-attention
    for (name, a), b in zip(ramp.named_parameters(), plain.parameters()):
        expected = 2.0 * b if id(a) in gains else b
        torch.testing.assert_close(a, expected, atol=1e-4, rtol=1e-4, msg=name)
    assert "blocks.0.attn2.norm_q.weight" in names  # cross-attention has gains too, left alone
    assert all(torch.equal(p, torch.full_like(p, 2.0)) for p in qk_gain_parameters(ramp))  # the schedule alone
