"""`sparse-dit eval` end to end on the demo model at a small size: records, resumption, reports, rendering."""

import json
import shutil
import subprocess

import numpy as np
import pytest

from sparse_dit.cli import main, run  # run raises what main reports as one line
from sparse_dit.evals.report import PLOT_COLOUR, TABLE_HEAD_COLOUR

ARGS = ["eval", "--methods", "dense,window,random", "--config", "window.window=[1,3,3]", "--config", "window.block_size=16",
        "--config", "window.min_seq_len=0", "--config", "window.dense_steps=1", "--num-frames", "4", "--height", "32",
        "--width", "32", "--steps", "3", "--seeds", "2", "--warmup", "0"]
FIELDS = {"method", "prompt", "seed", "density", "psnr", "ssim", "lpips", "attention_s", "attention_ms_per_call", "plan_share", "total_s", "speedup",
          "temporal_flickering", "motion_smoothness", "subject_consistency", "background_consistency",
          "dynamic_degree", "imaging_quality", "density_map"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    prompts = out / "prompts.txt"
    prompts.write_text("a red circle moving left\na blue square moving up\n")
    assert main([*ARGS, "--prompts", str(prompts), "--out", str(out)]) == 0
    return out


def test_records(report):
    records = json.loads((report / "results.json").read_text())
    assert len(records) == 2 * 2 * 4  # prompts x seeds x (dense, window, random ~ window, oracle ~ window)
    assert all(FIELDS <= set(r) for r in records)
    by = {(r["method"], r["prompt"], r["seed"]): r for r in records}
    for (method, prompt, seed), r in by.items():
        if method == "dense":
            assert r["density"] == 1.0 and r["speedup"] == 1.0
            continue
        assert 0 < r["density"] < 1 and r["speedup"] > 0 and r["lpips"] is None
        assert r["psnr"] > 10 and 0 < r["ssim"] <= 1
        assert set(r["density_map"][0]) == {1.0}  # step 0 is a dense warm-up step in every layer
    # The controls run at the density their method measured.
    for r in records:
        if r["method"] in ("random", "oracle"):
            paired = by[("window", r["prompt"], r["seed"])]
            assert r["paired_with"] == "window"
            assert r["density"] == pytest.approx(paired["density"], abs=0.05)
    # The static window reuses one cached plan; the oracle computes exact attention mass to plan every call.
    for r in records:
        assert (r["plan_share"] is None) == (r["method"] == "dense")
        if r["method"] == "oracle":
            assert r["plan_share"] > by[("window", r["prompt"], r["seed"])]["plan_share"]
    # At the same density the blocks of highest mass lose less of the dense clip than random ones.
    for prompt, seed in {(r["prompt"], r["seed"]) for r in records}:
        assert by[("oracle", prompt, seed)]["psnr"] > by[("random", prompt, seed)]["psnr"]


def test_rerun_skips_finished_items(report):
    before = (report / "results.json").read_text()
    videos = sorted(p.name for p in (report / "videos").iterdir())
    assert main([*ARGS, "--prompts", str(report / "prompts.txt"), "--out", str(report)]) == 0
    assert (report / "results.json").read_text() == before
    assert sorted(p.name for p in (report / "videos").iterdir()) == videos


def test_markdown_and_html(report):
    md = (report / "report.md").read_text()
    assert "| window |" in md and "| random ~ window |" in md and "| oracle ~ window |" in md and "LPIPS is absent" in md
    assert md.index("| window |") < md.index("| random ~ window |") < md.index("| oracle ~ window |")
    page = (report / "report.html").read_text()
    assert "<svg" in page and "data:image/gif;base64," in page and "src='videos" not in page  # self-contained


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    from PIL import Image

    shot = tmp_path / "report.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1400", f"--screenshot={shot}",
         (report / "report.html").as_uri()],
        check=True, timeout=120, capture_output=True,
    )
    pixels = {tuple(p) for p in np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).tolist()}
    colour = lambda hex_: tuple(int(hex_[i : i + 2], 16) for i in (1, 3, 5))  # noqa: E731
    assert colour(TABLE_HEAD_COLOUR) in pixels, "the results table header did not render"
    assert colour(PLOT_COLOUR) in pixels, "the Pareto plot markers did not render"


@pytest.mark.parametrize("extra, match", [
    (["--methods", "random"], "random is a control"),
    (["--methods", "dense,svg3"], "unknown sparse attention method"),
    (["--methods", "window", "--controls", "random,orcale"], "unknown sparse attention method"),
    (["--methods", "window", "--config", "window.window=true"], "window"),
    (["--methods", "window", "--config", "foo.bar=1"], "does not run"),
    (["--methods", "window", "--config", "random.block_size=8"], "clashes"),
    (["--prompts", "EMPTY"], "prompts file is empty"),
])
def test_bad_settings_fail_before_anything_is_generated(tmp_path, extra, match):
    from sparse_dit import SparseDiTError

    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    extra = [str(empty) if x == "EMPTY" else x for x in extra]
    with pytest.raises(SparseDiTError, match=match):
        run(["eval", "--steps", "2", "--num-frames", "4", "--height", "32", "--width", "32", "--out", str(tmp_path / "out"), *extra])
    assert not (tmp_path / "out" / "results.json").exists()


def test_reference_scores_against_another_pipelines_dense_output_and_runs_the_controls_there(tmp_path):
    """How a distilled model is scored: against the original's dense video, next to random on the original."""
    import torch
    from safetensors.torch import load_file

    from sparse_dit import load_demo_pipeline

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\n")
    out = tmp_path / "out"
    assert main(["eval", "--pipeline", "demo", "--reference", "demo:diffuse", "--methods", "window", "--controls", "random",
                 "--config", "window.min_seq_len=0", "--config", "window.block_size=16", "--config", "window.dense_steps=1",
                 "--num-frames", "4", "--height", "32", "--width", "32", "--steps", "2", "--seeds", "1", "--warmup", "0",
                 "--prompts", str(prompts), "--out", str(out)]) == 0
    original = load_demo_pipeline("diffuse")
    expected = original(prompt="a red circle moving left", num_frames=4, height=32, width=32, num_inference_steps=2,
                        generator=torch.Generator().manual_seed(0), output_type="pt").frames[0]
    torch.testing.assert_close(load_file(out / "videos" / "dense_p0_s0.safetensors")["video"], expected.float())
    records = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    assert records["window"]["on_reference"] is False and records["random"]["on_reference"] is True
