"""Pattern files: exact round trips, application to a pipeline, and refusal of files that do not fit."""

import json
import pickle

import pytest
import torch

import sparse_dit
from sparse_dit import ConfigError, PatternFile
from sparse_dit.pattern_file import METADATA_KEY, ModelSignature

from tiny_models import make_pipeline

OPTIONS = dict(block_size=8, min_seq_len=0, dense_steps=0)


@pytest.fixture(scope="module")
def wan():
    pipe, kwargs = make_pipeline("wan")
    return pipe, kwargs, sparse_dit.model_signature(pipe)


def density_file(sites: ModelSignature, density: float = 0.25, **changes) -> PatternFile:
    """A `random` file that sets every site's heads to `density` from step 1 on (step 0: the default)."""
    tensors = {f"{site}/density": torch.tensor([[float("nan")] * heads, [density] * heads]) for site, heads in sites.sites.items()}
    return PatternFile(**{"method": "random", "options": {**OPTIONS, "density": 1.0}, "tensors": tensors,
                          "signature": sites, "grid": (3, 4, 6), "step_buckets": (0, 1), **changes})


def test_signature_names_every_site_of_the_model(wan):
    _, _, signature = wan
    assert signature.components == {"transformer": ("WanTransformer3DModel", signature.components["transformer"][1])}
    assert set(signature.sites) == {"transformer.blocks.0.attn1", "transformer.blocks.1.attn1"}
    assert set(signature.sites.values()) == {2}


def test_round_trip_is_exact(wan, tmp_path):
    _, _, signature = wan
    pattern = density_file(signature)
    pattern.tensors["transformer.blocks.0.attn1/density"][1, 0] = 1 / 3  # not representable in a short decimal
    path = pattern.save(tmp_path / "random")
    assert path.suffix == ".safetensors"
    loaded = PatternFile.load(path)
    assert loaded.tensors.keys() == pattern.tensors.keys()
    for name, tensor in pattern.tensors.items():
        torch.testing.assert_close(loaded.tensors[name], tensor, rtol=0, atol=0, equal_nan=True)
    assert (loaded.method, loaded.options, loaded.signature, loaded.grid, loaded.step_buckets) == (
        pattern.method, pattern.options, pattern.signature, pattern.grid, pattern.step_buckets)
    assert loaded.library_version == sparse_dit.__version__


def test_a_file_applies_its_method_options_and_densities_to_a_pipeline(wan, tmp_path):
    pipe, kwargs, signature = wan
    path = density_file(signature).save(tmp_path / "random.safetensors")
    config = pipe.enable_sparse_attention(str(path))
    assert config.method == "random" and config.density == 1.0
    pipe(**kwargs)
    stats = pipe.sparse_attention_stats()
    pipe.disable_sparse_attention()
    by_step = {step: e.density for (step, _), e in stats.entries.items()}
    assert by_step[0] == pytest.approx(1.0)  # no entry at step 0: the file's `density` option
    assert by_step[1] == pytest.approx(0.25, abs=0.05) and by_step[2] == pytest.approx(0.25, abs=0.05)
    # Overrides apply on top of the file's options; the functional object reads files by site too.
    assert pipe.enable_sparse_attention(path, seed=3).seed == 3
    pipe.disable_sparse_attention()
    attn = sparse_dit.SparseAttention(path)
    q = torch.randn(1, 72, 2, 8)
    attn(q, q, q, grid=(3, 4, 6), site="transformer.blocks.0.attn1", step=1, num_steps=3)
    assert attn.stats.density() == pytest.approx(0.25, abs=0.05)


def test_a_file_for_another_model_is_refused_with_what_differs(wan, tmp_path):
    _, _, signature = wan
    other, _ = make_pipeline("cogvideox")
    path = density_file(signature).save(tmp_path / "wan.safetensors")
    with pytest.raises(ConfigError, match="transformer is a CogVideoXTransformer3DModel, the file was made for a WanTransformer3DModel"):
        other.enable_sparse_attention(path)
    assert sparse_dit.sparse_attention_config(other) is None  # refused before anything was hooked
    changed = ModelSignature({"transformer": ("WanTransformer3DModel", "0" * 16)}, signature.sites)
    with pytest.raises(ConfigError, match="config differs"):
        wan[0].enable_sparse_attention(density_file(changed))


def test_a_file_with_another_head_count_is_refused(wan):
    pipe, _, signature = wan
    three_heads = ModelSignature(signature.components, {site: 3 for site in signature.sites})
    with pytest.raises(ConfigError, match="has 2 heads, the file 3"):
        pipe.enable_sparse_attention(density_file(three_heads))
    unsigned = density_file(three_heads, signature=None)  # the tensors' head dimension is checked anyway
    with pytest.raises(ConfigError, match=r"shape \(2, 3\), but transformer.blocks.\d.attn1 has 2 heads"):
        pipe.enable_sparse_attention(unsigned)
    extra = density_file(signature, signature=None)
    extra.tensors["transformer.blocks.7.attn1/density"] = torch.zeros(2, 2)
    with pytest.raises(ConfigError, match="not in the model"):
        pipe.enable_sparse_attention(extra)


def test_corrupt_pickled_and_foreign_files_are_refused(wan, tmp_path):
    _, _, signature = wan
    good = density_file(signature).save(tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    (tmp_path / "pickled.safetensors").write_bytes(pickle.dumps({"density": [0.5]}))
    torch.save({"density": torch.zeros(2)}, tmp_path / "torch_save.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    cases = {"truncated": "truncated or corrupt", "garbage": "truncated or corrupt", "pickled": "never unpickles",
             "torch_save": "never unpickles", "plain": "not a sparse-dit pattern file"}
    for name, match in cases.items():
        with pytest.raises(ConfigError, match=match):
            PatternFile.load(tmp_path / f"{name}.safetensors")
    for missing in (str(tmp_path / "missing.safetensors"), tmp_path / "missing.safetensors", tmp_path):
        with pytest.raises(ConfigError, match="does not exist or is not a file"):
            sparse_dit.SparseAttention(missing)


def test_files_that_no_method_reads_or_from_a_newer_format_are_refused(wan, tmp_path):
    _, _, signature = wan
    with pytest.raises(ConfigError, match="reads no pattern file"):
        sparse_dit.SparseAttention(density_file(signature, method="window", options={}))
    with pytest.raises(ConfigError, match="does not read"):
        sparse_dit.SparseAttention(PatternFile("random", tensors={"s/centroids": torch.zeros(2, 2)}))
    with pytest.raises(ConfigError, match="pattern file"):
        sparse_dit.resolve_config(density_file(signature))
    path = density_file(signature).save(tmp_path / "new.safetensors")
    from safetensors.torch import load_file, save_file

    meta = density_file(signature).metadata()
    save_file(load_file(str(path)), str(path), metadata={METADATA_KEY: json.dumps({**meta, "version": 99})})
    with pytest.raises(ConfigError, match="upgrade sparse-dit"):
        PatternFile.load(path)


def test_a_method_name_is_a_method_even_beside_a_folder_of_that_name(tmp_path, monkeypatch):
    (tmp_path / "window").mkdir()
    monkeypatch.chdir(tmp_path)
    assert sparse_dit.SparseAttention("window").config.method == "window"
    assert sparse_dit.resolve_config("window").method == "window"
