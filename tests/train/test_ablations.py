"""The ablation configs (configs/experiments/ablations/): each variant changes exactly what it says.

Every variant file must be ``include`` of the base plus one binding, and its RunConfig must equal
the base's except for the ModelConfig fields stated in ``CHANGES`` — written out by hand from the
paper's Table 1 and ``hybrid_layout``'s rule (MLA at every (r+1)-th layer and the last), not
computed by the code under test.
"""

import dataclasses

import jax
import pytest
from flax import nnx

from kda_jax.models import HybridDecoder, get_config
from kda_jax.train.config import CONFIG_DIR, parse

ABLATIONS = CONFIG_DIR / "experiments" / "ablations"
LAYERS = tuple(range(1, 17))


def _split(full: tuple[int, ...]) -> dict:
    return {"kda_layers": tuple(i for i in LAYERS if i not in full), "full_attn_layers": full}


CHANGES: dict[str, dict] = {
    "ratio_0to1.gin": _split(LAYERS),
    "ratio_1to1.gin": _split((2, 4, 6, 8, 10, 12, 14, 16)),
    "ratio_3to1.gin": {},                      # the base is the 3:1 hybrid
    "ratio_7to1.gin": _split((8, 16)),
    "ratio_15to1.gin": _split((16,)),
    "output_gate_none.gin": {"output_gate": "none"},
    "output_gate_swish.gin": {"output_gate": "swish"},
    "output_gate_sigmoid.gin": {},             # the base's gate
    "no_short_conv.gin": {"short_conv_kernel_size": 0},
    "mla_rope.gin": {"mla_use_nope": False},
    "gdn_hybrid.gin": {"kda_gate": "gdn"},
}


@pytest.fixture(scope="module")
def base():
    return parse([ABLATIONS / "base.gin"])


def _diff(a, b) -> dict:
    return {f.name: getattr(b, f.name) for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)}


def test_every_variant_file_is_in_the_table():
    files = {p.name for p in ABLATIONS.glob("*.gin")} - {"base.gin"}
    assert files == set(CHANGES)


def test_base_is_the_16_layer_3to1_small_model(base):
    expected = dict(num_hidden_layers=16, **_split((4, 8, 12, 16)))
    assert _diff(get_config("small"), base.model) == expected
    assert (base.model.output_gate, base.model.short_conv_kernel_size, base.model.mla_use_nope,
            base.model.kda_gate) == ("sigmoid", 4, True, "kda")


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_variant_changes_one_binding_and_only_the_intended_fields(name, base):
    path = ABLATIONS / name
    lines = [line.strip() for line in path.read_text().splitlines()]
    statements = [line for line in lines if line and not line.startswith("#")]
    assert statements[0] == "include 'configs/experiments/ablations/base.gin'"
    assert len(statements) == 2 and "=" in statements[1], statements

    run = parse([path])
    assert _diff(base.model, run.model) == CHANGES[name]
    for part in ("data", "optim", "train", "mesh"):
        assert getattr(run, part) == getattr(base, part), part
    # Builds at its real size, abstractly (shapes only; nothing is allocated).
    params = nnx.state(nnx.eval_shape(lambda: HybridDecoder(run.model, rngs=nnx.Rngs(0))), nnx.Param)
    assert jax.tree.leaves(params)


def test_ratio_variants_are_distinct_models(base):
    models = [parse([ABLATIONS / n]).model for n in sorted(CHANGES) if n.startswith("ratio_")]
    assert len({m.full_attn_layers for m in models}) == len(models) == 5
