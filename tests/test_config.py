"""Method registry, config resolution and validation: bad input gets an error that says what to do."""

import pytest

import sparse_dit
from sparse_dit import ConfigError, UnknownMethodError, WindowConfig, resolve_config


def test_registry_lists_methods():
    assert {"dense", "window"} <= set(sparse_dit.list_methods())


def test_unknown_method_lists_valid_ones():
    with pytest.raises(UnknownMethodError, match="valid methods: .*dense.*window"):
        resolve_config("svg9")


def test_names_configs_and_overrides():
    assert resolve_config().method == "window"
    cfg = resolve_config("window", window=5, dense_steps=3)
    assert cfg.window == (5, 5, 5) and cfg.dense_steps == 3
    given = WindowConfig(window=(1, 3, 3))
    assert resolve_config(given) is given
    assert resolve_config(given, block_size=128).block_size == 128


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"dense_steps": -1}, "dense_steps"),
        ({"dense_steps": 1.5}, "dense_steps"),
        ({"dense_steps": "all"}, "dense_steps"),
        ({"block_size": 0}, "block_size"),
        ({"min_seq_len": -4}, "min_seq_len"),
        ({"dense_layers": (-1,)}, "dense_layers"),
        ({"backend": "cuda-magic"}, "backend"),
        ({"window": (0, 3, 3)}, "window"),
        ({"window": (3, 3)}, "window"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
    ],
)
def test_out_of_range_values_are_rejected(overrides, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config("window", **overrides)


def test_unknown_option_lists_valid_options():
    with pytest.raises(ConfigError, match="valid options: .*window"):
        resolve_config("window", kernel_sise=3)
    with pytest.raises(ConfigError, match="valid options"):
        resolve_config(WindowConfig(), radius=3)


def test_pattern_file_is_not_silently_accepted():
    with pytest.raises(ConfigError, match="pattern file"):
        resolve_config("patterns/wan.json")


def test_dense_step_count():
    assert resolve_config("dense", dense_steps=0.2).dense_step_count(50) == 10
    assert resolve_config("dense", dense_steps=0.2).dense_step_count(3) == 0
    assert resolve_config("dense", dense_steps=1.0).dense_step_count(7) == 7
    assert resolve_config("dense", dense_steps=4).dense_step_count(None) == 4
    assert resolve_config("dense", dense_steps=0.5, num_inference_steps=10).dense_step_count(None) == 5
    with pytest.raises(ConfigError, match="num_inference_steps"):
        resolve_config("dense", dense_steps=0.5).dense_step_count(None)


@pytest.mark.parametrize("options", [{"window": True}, {"window": 3.0}, {"window": "3"}, {"block_size": True}])
def test_bools_floats_and_strings_are_not_sizes(options):
    with pytest.raises(ConfigError):
        resolve_config("window", **options)
