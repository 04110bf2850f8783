"""Issue 21's classes of failure, one test each: stale evaluation results, shared state, config validation and
misleading messages."""

import copy
import json

import pytest
import torch

import sparse_dit
from sparse_dit import ConfigError, ShapeError, SparseDiTError
from sparse_dit.cli import main

from tiny_models import make_pipeline

EVAL = ["eval", "--methods", "window", "--controls", "random", "--config", "window.block_size=16",
        "--config", "window.dense_steps=1", "--num-frames", "4", "--height", "32", "--width", "32", "--seeds", "1",
        "--warmup", "0"]


def test_a_changed_setting_re_evaluates_instead_of_reusing_old_records(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\n")
    run = [*EVAL, "--config", "window.min_seq_len=0", "--prompts", str(prompts), "--out", str(tmp_path / "out")]
    assert main([*run, "--steps", "2"]) == 0
    first = json.loads((tmp_path / "out" / "results.json").read_text())
    assert main([*run, "--steps", "2"]) == 0  # the same settings: nothing is redone
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == first
    capsys.readouterr()
    assert main([*run, "--steps", "3"]) == 0
    second = json.loads((tmp_path / "out" / "results.json").read_text())
    captured = capsys.readouterr()
    assert "3 finished items were made under other settings" in captured.out + captured.err
    assert len(second) == len(first) == 3
    assert {r["key"] for r in second}.isdisjoint({r["key"] for r in first})


def test_nothing_ran_sparse_is_said_not_hidden_behind_a_density_of_one(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\n")
    assert main([*EVAL, "--steps", "2", "--prompts", str(prompts), "--out", str(tmp_path / "out")]) == 0  # min_seq_len 1024 > 256 tokens
    window = next(r for r in json.loads((tmp_path / "out" / "results.json").read_text()) if r["method"] == "window")
    assert window["sparse_calls"] == 0 and window["density"] is None and window["speedup"] is None
    assert "Nothing ran sparse for window" in (tmp_path / "out" / "report.md").read_text()


def test_an_enabled_pipeline_refuses_deepcopy_until_disabled():
    pipe, _ = make_pipeline("wan")
    pipe.enable_sparse_attention("window", block_size=8, min_seq_len=0)
    for target in (pipe, pipe.transformer):
        with pytest.raises(SparseDiTError, match="disable_sparse_attention"):
            copy.deepcopy(target)
    pipe.disable_sparse_attention()
    twin = copy.deepcopy(pipe)
    twin.enable_sparse_attention("window", block_size=8, min_seq_len=0)
    assert sparse_dit.sparse_attention_config(pipe) is None  # the copy's hooks are its own


def test_a_transformer_shared_by_two_pipelines_reports_the_truth_in_both():
    first, kwargs = make_pipeline("wan")
    second = type(first)(**first.components)
    first.enable_sparse_attention("window", block_size=8, min_seq_len=0, dense_steps=0)
    second(**kwargs)  # the shared transformer is sparse in both pipelines, and the second says so
    assert sparse_dit.sparse_attention_config(second).method == "window"
    assert second.sparse_attention_stats().density(sparse_only=True) < 1.0
    with pytest.raises(SparseDiTError, match="shared with another pipeline"):
        second.enable_sparse_attention("dense")
    second.disable_sparse_attention()  # restores the shared transformer, so neither reports it enabled
    assert sparse_dit.sparse_attention_config(first) is None and sparse_dit.sparse_attention_config(second) is None
    registry = getattr(first.transformer, "_diffusers_hook", None)
    assert registry is None or registry.get_hook("sparse_dit_root") is None


@pytest.mark.parametrize("method, options, field", [
    ("window", {"window": True}, "window"),
    ("window", {"window": 3.0}, "window"),
    ("window", {"block_size": True}, "block_size"),
    ("window", {"min_seq_len": True}, "min_seq_len"),
    ("window", {"dense_layers": True}, "dense_layers"),
    ("window", {"dense_layers": "0"}, "dense_layers"),
    ("window", {"backend": 3}, "backend"),
    ("random", {"seed": "x"}, "seed"),
    ("random", {"density": "0.2"}, "density"),
    ("window", {"replan_every": 0}, "replan_every"),
])
def test_every_config_field_is_type_checked_when_the_config_is_built(method, options, field):
    with pytest.raises(ConfigError, match=field):
        sparse_dit.resolve_config(method, **options)


def test_backend_triton_is_refused_where_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="backend='triton' needs a CUDA GPU"):
        sparse_dit.resolve_config("window", backend="triton")


def test_functional_grid_and_text_len_are_checked_not_truncated():
    q = torch.randn(1, 585, 2, 16)
    with pytest.raises(ShapeError, match="three positive ints"):
        sparse_dit.sparse_attention(q, q, q, grid=(4.5, 10, 13))
    with pytest.raises(ShapeError, match="text_len=600 must be in"):
        sparse_dit.sparse_attention(q, q, q, text_len=600)


def test_a_fractional_warm_up_without_a_step_count_names_the_functional_argument():
    q = torch.randn(1, 64, 2, 16)
    with pytest.raises(ConfigError, match="num_steps=N to sparse_attention"):
        sparse_dit.sparse_attention(q, q, q, grid=(1, 8, 8), step=3, min_seq_len=0, block_size=16)


def test_a_folder_as_str_and_as_path_gets_the_same_error(tmp_path):
    for spec in (str(tmp_path), tmp_path):
        with pytest.raises(ConfigError, match="does not exist or is not a file"):
            sparse_dit.SparseAttention(spec)


def test_the_demo_says_when_nothing_ran_sparse(tmp_path, capsys):
    assert main(["demo", "--steps", "2", "--num-frames", "4", "--height", "32", "--width", "32",
                 "--options", '{"min_seq_len": 100000}', "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "nothing ran sparse" in out and "speed-up" in out and "x)" not in out
