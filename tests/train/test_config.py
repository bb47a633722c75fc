"""Every gin file parses and builds; bad bindings and presets fail with messages naming them."""


import pytest
from flax import nnx

from kda_jax.models import HybridDecoder, get_config, variant
from kda_jax.train.config import CONFIG_DIR, parse

GIN_FILES = sorted(p for p in CONFIG_DIR.rglob("*.gin"))


def test_there_are_configs():
    names = {p.relative_to(CONFIG_DIR).as_posix() for p in GIN_FILES}
    assert {"base.gin", "models/small.gin", "experiments/shakespeare_small.gin"} <= names


@pytest.mark.parametrize("path", GIN_FILES, ids=lambda p: p.relative_to(CONFIG_DIR).as_posix())
def test_every_gin_file_parses_and_builds(path):
    run = parse([path])
    nnx.eval_shape(lambda: HybridDecoder(run.model, rngs=nnx.Rngs(0)))  # builds at full size, abstractly
    # the same run on the tiny preset (the file's model overrides and ratio dropped; its vocabulary kept)
    tiny = parse([path], ["ModelSpec.preset = 'tiny'", "ModelSpec.kda_per_mla = None", "TrainConfig.steps = 3",
                          f"ModelSpec.overrides = {{'vocab_size': {run.model.vocab_size}}}"])
    assert tiny.train.steps == 3 and tiny.model.hidden_size == get_config("tiny").hidden_size
    assert "ModelSpec.preset = 'tiny'" in tiny.operative


def test_model_spec_twins_and_overrides():
    run = parse([CONFIG_DIR / "experiments" / "shakespeare_small.gin"],
                ["ModelSpec.variant = 'mla_only'", "ModelSpec.overrides = {'output_gate': 'none'}"])
    assert run.model == variant(get_config("small", output_gate="none"), "mla_only")
    ratio = parse([CONFIG_DIR / "models" / "small.gin"], ["ModelSpec.kda_per_mla = 7"])
    assert ratio.model.full_attn_layers == (8,)


def test_unknown_binding_and_preset_are_named():
    with pytest.raises(ValueError, match="TrainConfig.stepz"):
        parse([CONFIG_DIR / "base.gin"], ["TrainConfig.stepz = 3"])
    with pytest.raises(ValueError, match="unknown model config 'smal'.*valid names"):
        parse([CONFIG_DIR / "base.gin"], ["ModelSpec.preset = 'smal'"])
    with pytest.raises(FileNotFoundError, match="nope.gin"):
        parse(["nope.gin"])
    with pytest.raises(ValueError, match="OptimConfig.name"):
        parse([CONFIG_DIR / "base.gin"], ["OptimConfig.name = 'sgd'"])


def test_parse_leaves_no_global_bindings_behind():
    from kda_jax.train.config import MeshConfig

    run = parse([CONFIG_DIR / "base.gin"], ["MeshConfig.data = 2", "MeshConfig.fsdp = 4"])
    assert run.mesh == MeshConfig(data=2, fsdp=4)
    assert MeshConfig() == MeshConfig(data=1, fsdp=-1, tensor=1, expert=1)
