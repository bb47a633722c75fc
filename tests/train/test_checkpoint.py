"""Tests of train/checkpoint.py: exact resume, keep-N, corruption fallback, structure mismatch."""

import gc
import logging
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from kda_jax.train.checkpoint import CheckpointMismatchError, Checkpointer, read_config

# A restore that fails on purpose leaves orbax's pending tensorstore reads to be garbage-collected,
# which reports "Exception ignored in <coroutine _read_array_index_and_device_put>" later; collect
# them while this module's filter applies, not at the end of the session.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True, scope="module")
def _collect_abandoned_reads():
    yield
    gc.collect()


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 2, 2, 1), ("data", "fsdp", "tensor", "expert"), axis_types=(AxisType.Auto,) * 4)


def make_state(mesh, seed: int = 0):
    rng = np.random.default_rng(seed)
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))  # noqa: E731
    return {
        "params": {
            "w": put(rng.standard_normal((8, 4), dtype=np.float32), "fsdp", "tensor"),
            "emb": put(jnp.asarray(rng.standard_normal((4, 6), dtype=np.float32), dtype=jnp.bfloat16), "data", None),
            "layers": [put(rng.standard_normal((2, 4), dtype=np.float32), None, "tensor") for _ in range(2)],
        },
        "opt": {"count": put(np.int32(seed + 7)), "mu": put(rng.integers(-9, 9, (4, 4), dtype=np.int32), "tensor")},
        "key": put(jax.random.key_data(jax.random.key(seed))),
    }


def abstract_of(state, mesh, spec_of=None):
    """ShapeDtypeStructs of ``state``; ``spec_of(x)`` picks the requested PartitionSpec."""
    def one(x):
        sharding = x.sharding if spec_of is None else NamedSharding(mesh, spec_of(x))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return jax.tree.map(one, state)


def assert_bit_identical(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert np.asarray(g).tobytes() == np.asarray(w).tobytes()


def make_iterator():
    return iter(grain.MapDataset.range(100).shuffle(seed=1).batch(4).to_iter_dataset())


def make_iterator_at(it):
    """A fresh iterator set to the position of ``it`` (``it`` itself is not advanced)."""
    other = make_iterator()
    other.set_state(it.get_state())
    return other


def take(it, n):
    return [np.asarray(next(it)).tolist() for _ in range(n)]


def listing(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def save_steps(directory, states: dict, **kwargs):
    """Save ``{step: state}`` in ``directory`` and wait for the files."""
    with Checkpointer(directory, every=10) as ckpt:
        for step, state in states.items():
            assert ckpt.save(step, state, force=True, **kwargs)
        ckpt.wait()


def fail_init():
    raise AssertionError("init_fn must not be called")


def test_round_trip_sharded_bit_identical(tmp_path, mesh):
    state = make_state(mesh, seed=3)
    with Checkpointer(tmp_path, every=5) as ckpt:
        assert not ckpt.should_save(3) and ckpt.should_save(5)
        assert ckpt.save(5, state)
        assert not ckpt.should_save(5)  # already saved
        ckpt.wait()
    # restore onto shardings other than the saved ones
    transposed = lambda x: P(*reversed(x.sharding.spec)) if x.ndim == len(x.sharding.spec) else P()  # noqa: E731
    abstract = abstract_of(state, mesh, transposed)
    with Checkpointer(tmp_path, every=5) as ckpt:
        got, step, restored = ckpt.restore_or_init(abstract, fail_init)
        assert ckpt.latest_good_step() == 5
    assert (step, restored) == (5, True)
    assert_bit_identical(got, state)
    for g, a in zip(jax.tree.leaves(got), jax.tree.leaves(abstract)):
        assert g.sharding == a.sharding
    assert got["key"].dtype == np.uint32
    assert jnp.array_equal(jax.random.wrap_key_data(got["key"]), jax.random.key(3))


def test_data_iterator_resumes_exactly(tmp_path, mesh):
    state = make_state(mesh)
    it = make_iterator()
    take(it, 3)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, state, data_iterator=it, force=True)
        expected = take(it, 2)  # advancing right after an async save must not change what was saved
        ckpt.wait()
    fresh = make_iterator()
    with Checkpointer(tmp_path) as ckpt:
        _, step, restored = ckpt.restore_or_init(abstract_of(state, mesh), fail_init, data_iterator=fresh)
    assert (step, restored) == (3, True)
    assert take(fresh, 2) == expected


def test_keep_latest_n(tmp_path, mesh):
    state = make_state(mesh)
    with Checkpointer(tmp_path, keep=2, every=1) as ckpt:
        for step in range(1, 6):
            assert ckpt.save(step, state)
        ckpt.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["4", "5"]


def test_corrupt_latest_falls_back_and_is_moved_aside(tmp_path, mesh, caplog):
    it = make_iterator()
    states = {10: make_state(mesh, 10), 20: make_state(mesh, 20)}
    positions = {}
    with Checkpointer(tmp_path, keep=2, every=10) as ckpt:
        for step in (10, 20):
            take(it, 1)
            ckpt.save(step, states[step], data_iterator=it, config_str=f"step = {step}")
            positions[step] = take(make_iterator_at(it), 1)
        ckpt.wait()
    data_files = list((tmp_path / "20" / "state" / "d").iterdir())
    assert data_files, "orbax writes the array data to state/d/<hash>"
    for f in data_files:
        with open(f, "r+b") as fh:
            fh.truncate(7)

    fresh = make_iterator()
    with caplog.at_level(logging.WARNING, logger="kda_jax.train.checkpoint"):
        with Checkpointer(tmp_path, keep=2, every=10) as ckpt:
            got, step, restored = ckpt.restore_or_init(abstract_of(states[10], mesh), fail_init,
                                                       data_iterator=fresh)
            assert (step, restored) == (10, True)
            assert_bit_identical(got, states[10])
            assert take(fresh, 1) == positions[10]
            warned = " ".join(r.getMessage() for r in caplog.records)
            assert "step 20" in warned and str(tmp_path / "20") in warned
            assert not (tmp_path / "20").exists()
            aside = [p for p in (tmp_path / "corrupt").iterdir() if p.is_dir()]
            assert len(aside) == 1 and aside[0].name.startswith("20-")
            assert (aside[0] / "state").is_dir() and aside[0].with_suffix(".txt").read_text().startswith("step 20 from")
            assert ckpt.latest_good_step() == 10
            # the run goes on and reaches step 20 again, then 30; keep=2 counts good steps only
            assert ckpt.save(20, got, data_iterator=fresh)
            assert ckpt.save(30, got, data_iterator=fresh)
            ckpt.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["20", "30", "corrupt"]
    assert aside[0].is_dir()


def test_every_checkpoint_corrupt_inits_and_keeps_them(tmp_path, mesh, caplog):
    state = make_state(mesh)
    save_steps(tmp_path, {1: state, 2: state})
    (tmp_path / "1" / "state" / "_METADATA").write_text("{not json")
    shutil.rmtree(tmp_path / "2" / "state")
    it = make_iterator()
    take(it, 2)
    start = it.get_state()
    with caplog.at_level(logging.WARNING, logger="kda_jax.train.checkpoint"):
        with Checkpointer(tmp_path, every=1) as ckpt:
            got, step, restored = ckpt.restore_or_init(abstract_of(state, mesh), lambda: "fresh", data_iterator=it)
    assert (got, step, restored) == ("fresh", 0, False)
    assert it.get_state() == start
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "corrupt").iterdir() if p.is_dir()) == ["1", "2"]
    assert "initialising a fresh state" in caplog.text


def test_interrupted_save_is_ignored(tmp_path, mesh):
    state = make_state(mesh, 1)
    save_steps(tmp_path, {10: make_state(mesh, 0), 20: state})
    # what a process killed during a save leaves: the step written under orbax's tmp name, never renamed
    shutil.copytree(tmp_path / "20", tmp_path / "30.orbax-checkpoint-tmp")
    (tmp_path / "30.orbax-checkpoint-tmp" / "state" / "manifest.ocdbt").unlink()
    with Checkpointer(tmp_path, keep=2, every=10) as ckpt:
        assert ckpt.latest_good_step() == 20
        got, step, restored = ckpt.restore_or_init(abstract_of(state, mesh), fail_init)
        assert (step, restored) == (20, True)
        assert any("unfinished save" in line for line in ckpt.report)
        assert_bit_identical(got, state)
        assert ckpt.save(30, got)  # replaces the leftover tmp directory
        ckpt.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["20", "30"]


def _other_shape(state):
    state = dict(state, params=dict(state["params"]))
    state["params"]["w"] = jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=state["params"]["w"].sharding)
    return state


def _other_dtype(state):
    state = dict(state, opt=dict(state["opt"]))
    state["opt"]["mu"] = jax.ShapeDtypeStruct((4, 4), jnp.int64, sharding=state["opt"]["mu"].sharding)
    return state


def _extra_leaf(state):
    return dict(state, extra=jax.ShapeDtypeStruct((2,), jnp.float32, sharding=state["key"].sharding))


@pytest.mark.parametrize("change", [_other_shape, _other_dtype, _extra_leaf])
@pytest.mark.parametrize("newest_corrupt", [False, True])
def test_structure_mismatch_raises_and_moves_nothing(tmp_path, mesh, change, newest_corrupt):
    state = make_state(mesh)
    save_steps(tmp_path, {10: state, 20: state})
    if newest_corrupt:  # the walk passes a corrupt step 20 and meets the mismatch at 10: still nothing moves
        shutil.rmtree(tmp_path / "20" / "state" / "d")
    before = listing(tmp_path)
    with Checkpointer(tmp_path, every=10) as ckpt:
        with pytest.raises(CheckpointMismatchError, match=f"step {10 if newest_corrupt else 20} .* does not match"):
            ckpt.restore_or_init(change(abstract_of(state, mesh)), fail_init)
    assert listing(tmp_path) == before


def test_intact_checkpoint_that_cannot_be_restored_as_requested_is_a_mismatch(tmp_path, mesh):
    state = make_state(mesh)
    with Checkpointer(tmp_path, every=10) as ckpt:
        ckpt.save(10, state, data_iterator=make_iterator())
        ckpt.save(20, state)  # without a data iterator
        ckpt.wait()
    before = listing(tmp_path)
    abstract = abstract_of(state, mesh)
    with Checkpointer(tmp_path, every=10) as ckpt:
        with pytest.raises(CheckpointMismatchError, match="saved without a data iterator"):
            ckpt.restore_or_init(abstract, fail_init, data_iterator=make_iterator())
        shutil.rmtree(tmp_path / "20")
        before = listing(tmp_path)
        # the files read back, but the iterator belongs to another pipeline (its state has other keys)
        other = iter(grain.IterDataset.mix([grain.MapDataset.range(9).to_iter_dataset()] * 2, [0.5, 0.5]))
        with pytest.raises(CheckpointMismatchError, match="reads back intact"):
            ckpt.restore_or_init(abstract, fail_init, data_iterator=other)
        # a sharding the stored shape cannot be split by: the 4 rows of "emb" over data x fsdp x tensor = 8
        bad = dict(abstract, params=dict(abstract["params"]))
        bad["params"]["emb"] = jax.ShapeDtypeStruct((4, 6), jnp.bfloat16,
                                                    sharding=NamedSharding(mesh, P(("data", "fsdp", "tensor"))))
        with pytest.raises(CheckpointMismatchError, match="reads back intact"):
            ckpt.restore_or_init(bad, fail_init)
    assert listing(tmp_path) == before


def test_no_checkpoint_inits(tmp_path, mesh):
    state = make_state(mesh)
    with Checkpointer(tmp_path / "run", every=10) as ckpt:
        assert ckpt.latest_good_step() is None
        got, step, restored = ckpt.restore_or_init(abstract_of(state, mesh), lambda: state)
    assert got is state and (step, restored) == (0, False)


def test_config_saved_and_read_back(tmp_path, mesh):
    text = "# operative config\nModelConfig.d_model = 64\nTrainConfig.steps = 'ten'\n"
    with Checkpointer(tmp_path, every=10) as ckpt:
        ckpt.save(10, make_state(mesh), config_str=text)
        ckpt.save(20, make_state(mesh), config_str=text + "x = 1\n")
        ckpt.save(30, make_state(mesh))
        ckpt.wait()
    assert read_config(tmp_path, 10) == text
    assert read_config(tmp_path, 20) == text + "x = 1\n"
    with pytest.raises(FileNotFoundError, match="without a config"):
        read_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="step 40"):
        read_config(tmp_path, 40)


def test_saving_an_existing_step(tmp_path, mesh):
    old, new = make_state(mesh, 1), make_state(mesh, 2)
    with Checkpointer(tmp_path, keep=2, every=10) as ckpt:
        ckpt.save(10, old)
        ckpt.save(20, old)
        assert not ckpt.save(20, old, force=True)  # this run saved it already
        with pytest.raises(ValueError, match="steps must increase"):
            ckpt.save(15, old, force=True)
        ckpt.wait()
    # a run that starts over in the same directory: the old timeline is moved aside, not deleted,
    # so keep=2 cannot delete the new checkpoint in favour of the old, higher steps
    with Checkpointer(tmp_path, keep=2, every=10) as ckpt:
        assert ckpt.save(10, new)
        ckpt.wait()
        got, step, _ = ckpt.restore_or_init(abstract_of(new, mesh), fail_init)
    assert step == 10
    assert_bit_identical(got, new)
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "superseded").iterdir() if p.is_dir()) == ["10", "20"]



def test_relative_directory_is_made_absolute(tmp_path, monkeypatch):
    """orbax refuses relative paths; a workdir given as runs/x must still work."""
    monkeypatch.chdir(tmp_path)
    state = {"w": jnp.arange(4, dtype=jnp.float32)}
    with Checkpointer("runs/rel/checkpoints", keep=2, every=1, async_save=False) as ckpt:
        assert ckpt.save(1, state)
        ckpt.wait()
    with Checkpointer("runs/rel/checkpoints", keep=2, every=1) as ckpt:
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
        restored, step, ok = ckpt.restore_or_init(abstract, lambda: None)
    assert ok and step == 1
    np.testing.assert_array_equal(restored["w"], state["w"])
