"""Data-parallel `sparse-dit eval --num-processes 2`: the items split over two processes (accelerate, gloo on the
CPU) and merged into the `results.json` one process writes."""

import json
import shutil

import pytest

from sparse_dit.cli import main
from sparse_dit.evals.runner import EvalSettings, merge_records, run_order

ARGS = ["eval", "--methods", "dense,window", "--controls", "random", "--config", "window.window=[1,3,3]",
        "--config", "window.block_size=16", "--config", "window.min_seq_len=0", "--config", "window.dense_steps=1",
        "--num-frames", "4", "--height", "32", "--width", "32", "--steps", "2", "--seeds", "2", "--warmup", "0"]
# Wall times differ between any two runs; everything else in a record is determined by the item.
TIMES = {"total_s", "attention_s", "attention_ms_per_call", "speedup", "attention_speedup", "plan_share"}


def _untimed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMES} for r in records]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two prompts evaluated by one process; then a third added, by one process (`one`) and by two (`two`)."""
    tmp = tmp_path_factory.mktemp("eval_parallel")
    first, both = tmp / "first.txt", tmp / "all.txt"
    first.write_text("a red circle moving left\na blue square moving up\n")
    both.write_text("a red circle moving left\na blue square moving up\na green circle moving right\n")
    one, two = tmp / "one", tmp / "two"
    assert main([*ARGS, "--prompts", str(first), "--out", str(one)]) == 0
    shutil.copytree(one, two)
    assert main([*ARGS, "--prompts", str(both), "--out", str(one)]) == 0
    assert main([*ARGS, "--prompts", str(both), "--out", str(two), "--num-processes", "2"]) == 0
    return one, two


def test_two_processes_write_what_one_writes(runs):
    one, two = runs
    single, split = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert len(split) == 3 * 2 * 3  # prompts x seeds x (dense, window, random ~ window)
    assert _untimed(split) == _untimed(single)
    assert all(set(r) == set(s) for r, s in zip(split, single))
    assert sorted(p.name for p in (two / "videos").iterdir()) == sorted(p.name for p in (one / "videos").iterdir())
    assert not (two / ".parallel").exists() and (two / "report.md").exists()


def test_finished_items_are_kept_not_run_again(runs):
    one, two = runs
    # The first two prompts' records, timings included, are those the first run wrote: found, not generated again.
    single, split = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert split[:12] == single[:12]
    assert {r["prompt"] for r in split[12:]} == {"a green circle moving right"}


def test_merge_keeps_found_records_in_place_and_orders_new_ones_as_one_process_runs_them():
    settings = EvalSettings(out=None, methods=["dense", "window"], prompts=["a", "b"], seeds=1)
    order = run_order(settings, ["window"], ["random"])
    assert order == [("dense", "a", 0, None), ("window", "a", 0, None), ("random", "a", 0, "window"),
                     ("dense", "b", 0, None), ("window", "b", 0, None), ("random", "b", 0, "window")]

    def rec(method, prompt, paired=None, key="new"):
        return {"method": method, "prompt": prompt, "seed": 0, "paired_with": paired, "key": key}

    other = {"method": "gna", "prompt": "z", "seed": 0, "paired_with": None, "key": "old"}  # of another evaluation
    initial = [rec("dense", "a", key="old"), other, rec("window", "a", key="old"), rec("dense", "b", key="old")]
    # The window items were evaluated again (their settings changed), in any order across processes.
    created = [rec("random", "b", "window"), rec("window", "a"), rec("window", "b"), rec("random", "a", "window")]
    merged = merge_records(initial, created, order)
    assert [(r["method"], r["prompt"], r["key"]) for r in merged] == [
        ("dense", "a", "old"), ("gna", "z", "old"), ("dense", "b", "old"),
        ("window", "a", "new"), ("random", "a", "new"), ("window", "b", "new"), ("random", "b", "new")]


def test_bad_process_count_is_refused(tmp_path):
    from sparse_dit import SparseDiTError
    from sparse_dit.cli import run

    with pytest.raises(SparseDiTError, match="--num-processes must be 1 or more"):
        run([*ARGS, "--out", str(tmp_path / "out"), "--num-processes", "0"])
