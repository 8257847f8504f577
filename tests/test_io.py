"""litquant.io: the tensor-by-tensor safetensors writer (read back by the safetensors library itself) and its
all-or-nothing file."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from litquant.io import SafetensorsWriter, open_safetensors, write_safetensors


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 5, generator=g),
        "b": torch.randn(7, generator=g).bfloat16(),
        "c": torch.randint(-9, 9, (2, 2, 2), dtype=torch.int32, generator=g),
        "d": torch.zeros(0, 4),
        "e": torch.randint(0, 255, (5,), dtype=torch.uint8, generator=g),
    }


def test_written_in_any_order_and_read_back_by_safetensors(tmp_path):
    ts = _tensors()
    path = tmp_path / "x.safetensors"
    plan = [(k, torch.empty(v.shape, dtype=v.dtype, device="meta")) for k, v in ts.items()]
    with SafetensorsWriter(path, plan, metadata={"format": "pt", "who": "test"}) as w:
        for k in ("e", "c", "a", "d", "b"):  # not the planned order
            w.write(k, ts[k])
    with safe_open(str(path), "pt") as f:  # the reference reader: header, alignment and offsets are valid
        assert f.metadata() == {"format": "pt", "who": "test"}
        assert set(f.keys()) == set(ts)
        for k, v in ts.items():
            assert torch.equal(f.get_tensor(k), v)
    with open_safetensors(path) as f:  # and ours
        assert all(torch.equal(f.get_tensor(k), v) for k, v in ts.items())
    assert (8 + int.from_bytes(path.read_bytes()[:8], "little")) % 8 == 0  # data starts 8-byte aligned


def test_nothing_is_written_unless_every_tensor_is(tmp_path):
    ts = _tensors()
    path = tmp_path / "x.safetensors"
    path.write_text("the previous file")
    plan = [(k, v) for k, v in ts.items()]
    with pytest.raises(ValueError, match="never wrote"):
        with SafetensorsWriter(path, plan) as w:
            w.write("a", ts["a"])
    with pytest.raises(RuntimeError, match="boom"):
        with SafetensorsWriter(path, plan) as w:
            w.write("a", ts["a"])
            raise RuntimeError("boom")
    assert path.read_text() == "the previous file"  # untouched, and no temp file left beside it
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_write_checks_names_dtypes_shapes(tmp_path):
    ts = _tensors()
    with SafetensorsWriter(tmp_path / "x.safetensors", list(ts.items())) as w:
        with pytest.raises(ValueError, match="not in the plan"):
            w.write("zzz", ts["a"])
        with pytest.raises(ValueError, match="planned"):
            w.write("a", ts["a"].double())
        with pytest.raises(ValueError, match="planned"):
            w.write("a", ts["a"].t())
        for k, v in ts.items():
            w.write(k, v)
        with pytest.raises(ValueError, match="twice"):
            w.write("a", ts["a"])
    with pytest.raises(ValueError, match="planned twice"):
        SafetensorsWriter(tmp_path / "y.safetensors", [("a", ts["a"]), ("a", ts["a"])])


def test_write_safetensors_from_a_stream(tmp_path):
    ts = _tensors()
    made = []

    def stream():
        for k, v in ts.items():
            made.append(k)
            yield k, v.clone()

    n = write_safetensors(tmp_path / "x.safetensors", stream(), ((k, v.to("meta")) for k, v in ts.items()))
    assert made == list(ts) and n == sum(v.numel() for v in ts.values())
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert all(torch.equal(f.get_tensor(k), v) for k, v in ts.items())


def test_a_full_disk_is_one_error_line_and_keeps_the_previous_file(tmp_path, capsys):
    """ENOSPC in the middle of a write (what a full disk raises): the old file stays, no temp file is left, and the
    job guard prints one line instead of a traceback."""
    import errno
    import os

    from litquant.errors import run_guarded

    class FullDisk:  # the writer's file, refusing any write of more than 32 bytes
        def __init__(self, f):
            self.f = f

        def write(self, data):
            if memoryview(data).nbytes > 32:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    ts = _tensors()
    path = tmp_path / "x.safetensors"
    path.write_text("the previous file")

    def job():
        with SafetensorsWriter(path, list(ts.items())) as w:
            w._f = FullDisk(w._f)
            for k, v in ts.items():
                w.write(k, v)

    with pytest.raises(SystemExit) as e:
        run_guarded(job)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no space left on the device"), err
    assert path.read_text() == "the previous file"
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]
