"""MetricsWriter: JSONL round trip with non-finite values, killed-run truncation, TensorBoard
event records read back through their TFRecord framing, process-0-only writing; Throughput."""

import json
import math
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.crc32c import crc32c
from tensorboardX.proto.event_pb2 import Event

from kda_jax.train.metrics import MetricsWriter, Throughput, read_metrics


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(logdir) -> list[Event]:
    """Events of every file under logdir. TFRecord: u64 length, u32 masked crc32c of the length,
    the data, u32 masked crc32c of the data (little endian)."""
    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        buf, pos = path.read_bytes(), 0
        while pos < len(buf):
            (n,) = struct.unpack_from("<Q", buf, pos)
            (len_crc,) = struct.unpack_from("<I", buf, pos + 8)
            assert len_crc == _masked_crc(buf[pos:pos + 8])
            data = buf[pos + 12:pos + 12 + n]
            assert struct.unpack_from("<I", buf, pos + 12 + n)[0] == _masked_crc(data)
            events.append(Event.FromString(data))
            pos += 16 + n
    return events


def test_jsonl_round_trip_with_nonfinite(tmp_path):
    workdir = tmp_path / "run" / "nested"
    with MetricsWriter(workdir) as w:
        w.write(1, {"loss": 2.5, "lr": np.float32(1e-3), "tokens": 4096, "grad_norm": jnp.asarray(0.75)})
        w.write(2, {"loss": math.nan, "grad_norm": math.inf, "min": -math.inf, "bf16": jnp.bfloat16(1.5)})
        w.write_text(2, "sample", "nan")
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    for line in lines:  # strict JSON: no bare NaN / Infinity tokens
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert json.loads(lines[1])["loss"] == "NaN"
    r = read_metrics(workdir)
    assert [x["step"] for x in r] == [1, 2, 2]
    assert r[0]["loss"] == 2.5 and r[0]["tokens"] == 4096 and isinstance(r[0]["tokens"], int)
    assert r[0]["lr"] == pytest.approx(1e-3) and r[0]["grad_norm"] == 0.75
    assert math.isnan(r[1]["loss"]) and r[1]["grad_norm"] == math.inf and r[1]["min"] == -math.inf
    assert r[1]["bf16"] == 1.5
    assert r[2]["tag"] == "sample" and r[2]["text"] == "nan"  # text is never decoded as a number
    assert all(abs(x["time"] - r[0]["time"]) < 60 for x in r)


def test_bad_metrics_rejected(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        with pytest.raises(ValueError, match="reserved"):
            w.write(1, {"step": 3.0})
        with pytest.raises(ValueError, match="scalar"):
            w.write(1, {"loss": np.ones(3)})
        with pytest.raises(ValueError, match="scalar"):
            w.write(1, {"loss": "low"})
    with pytest.raises(RuntimeError):
        w.write(2, {"loss": 1.0})


def test_truncated_last_line(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write(1, {"loss": 3.0})
        w.write(2, {"loss": 2.0})
    path = tmp_path / "metrics.jsonl"
    with path.open("a") as f:  # a run killed mid-write
        f.write('{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    # a resumed run cuts the partial line off and appends valid lines
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write(3, {"loss": 1.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 3.0), (2, 2.0), (3, 1.0)]
    # corruption elsewhere is an error, not silently skipped
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=":2"):
        read_metrics(tmp_path)


def test_tensorboard_events(tmp_path):
    with MetricsWriter(tmp_path) as w:
        for step in range(3):
            w.write(step, {"train/loss": 4.0 - step, "train/lr": 0.1})
        w.write(3, {"train/loss": math.nan})
        w.write_text(3, "samples", "hello world")
    files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    events = read_events(tmp_path / "tensorboard")
    assert events[0].file_version.startswith("brain.Event")
    scalars = [(e.step, v.tag, v.simple_value) for e in events if e.HasField("summary") for v in e.summary.value
               if v.HasField("simple_value")]
    loss = [(s, x) for s, tag, x in scalars if tag == "train/loss"]
    assert loss[:3] == [(0, 4.0), (1, 3.0), (2, 2.0)] and loss[3][0] == 3 and math.isnan(loss[3][1])
    assert sorted(s for s, tag, _ in scalars if tag == "train/lr") == [0, 1, 2]
    texts = [(e.step, v.tensor.string_val[0]) for e in events if e.HasField("summary") for v in e.summary.value
             if v.tag.startswith("samples")]
    assert texts == [(3, b"hello world")]


def test_only_process_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with MetricsWriter(tmp_path / "run") as w:
        w.write(1, {"loss": 1.0})
        w.write_text(1, "sample", "x")
    assert not (tmp_path / "run").exists()


def test_throughput_excludes_warmup():
    t = Throughput(tokens_per_step=1000, warmup_steps=1)
    assert t.summary() == {}
    for seconds in (30.0, 0.5, 0.25, 0.25):  # the first step compiles
        t.add(seconds)
    s = t.summary()
    assert s["step_time_s"] == pytest.approx(1 / 3)
    assert s["tokens_per_s"] == pytest.approx(3000 / 1.0)
    t.add(1.0, tokens=4000)  # a step with a different token count
    assert t.summary()["tokens_per_s"] == pytest.approx(7000 / 2.0)
    w = Throughput(10, warmup_steps=0, window=2)
    for seconds in (1.0, 2.0, 4.0):
        w.add(seconds)
    assert w.summary() == {"step_time_s": 3.0, "tokens_per_s": 20 / 6.0}
    clock = Throughput(10, warmup_steps=0)
    assert clock.tick() >= 0 and clock.summary()["step_time_s"] >= 0
    with pytest.raises(ValueError):
        Throughput().add(1.0)
