"""The curation config parsed once: the shipped YAML's values reach the typed settings unchanged, ``--root`` and
``--workers`` layer on top, and a wrong root, key or histogram is one error naming it."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from data_curation.settings import DEFAULT_CONFIG, load_settings
from data_curation.sources import REGISTRY
from meddino_common.config import ConfigError


def test_shipped_values_reach_the_settings():
    raw = OmegaConf.to_container(OmegaConf.load(DEFAULT_CONFIG), resolve=True)
    s = load_settings()
    assert s.config == raw  # the plan hash fingerprints exactly the merged YAML
    assert list(s.sources) == list(raw["sources"]) and set(REGISTRY) <= set(s.sources)  # every source declared
    g = raw["geometry"]
    assert (s.geometry.inplane_spacing_mm, list(s.geometry.output_size), s.geometry.fit, s.geometry.interpolation,
            s.geometry.downsample, s.geometry.antialias, s.geometry.pad_value_hu) == \
        (g["inplane_spacing_mm"], g["output_size"], g["fit"], g["interpolation"], g["downsample"], g["antialias"], g["pad_value_hu"])
    assert (s.output.image_format, s.output.samples_per_shard, s.output.volumes_per_group) == ("npy", 1000, 64)
    assert list(s.dedup.grid) == raw["dedup"]["grid"] and s.hu_histogram.n_bins == (3072 + 1024) // 16
    assert s.holdout.tasks == raw["holdout"]["tasks"] and s.seed == raw["seed"] and s.slices.min_slice_step_mm is None
    assert s.run.pack_threads == max(1, raw["run"]["workers"])  # pack_threads: null -> workers


def test_roots_workers_overrides_and_a_config_copy(tmp_path):
    s = load_settings(roots=["folder=~/ct", "lits=/data/LiTS"], workers=3, overrides=["output.samples_per_shard=500"])
    assert s.source_root("folder") == Path("~/ct").expanduser() and s.source_root("lits") == Path("/data/LiTS")
    assert s.source_root("btcv") is None and s.config["sources"]["lits"]["root"] == "/data/LiTS"
    assert (s.run.workers, s.run.pack_threads, s.output.samples_per_shard) == (3, 3, 500)
    copy = tmp_path / "mine.yaml"
    copy.write_text("output:\n  image_format: png\nrun:\n  pack_threads: 2\n")
    s = load_settings(copy, overrides=["run.workers=4"])
    assert (s.output.image_format, s.run.workers, s.run.pack_threads) == ("png", 4, 2)


def test_bad_roots_keys_and_histograms_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^--root foldr=/x: unknown source 'foldr'; did you mean folder\?"):
        load_settings(roots=["foldr=/x"])
    with pytest.raises(ConfigError, match=r"^--root expects NAME=PATH, got '/data/x'$"):
        load_settings(roots=["/data/x"])
    with pytest.raises(ConfigError, match=r"unknown config key dedup.grids \(did you mean dedup.grid\?\)"):
        load_settings(overrides=["dedup.grids=[8,8,8]"])
    with pytest.raises(ConfigError, match=r"output.samples_per_shard='many' is a string, but output.samples_per_shard takes a number"):
        load_settings(overrides=["output.samples_per_shard=many"])
    with pytest.raises(ConfigError, match=r"^stats.hu_histogram: max - min \(3072 - -1024\) must be a multiple of bin \(15\)$"):
        load_settings(overrides=["stats.hu_histogram.bin=15"])
    with pytest.raises(ConfigError, match=r"config file not found: .*nothing.yaml"):
        load_settings(tmp_path / "nothing.yaml")
