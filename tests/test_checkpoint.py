import os
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from litquant.checkpoint import WEIGHTS_FILE, Checkpoint, load_model
from litquant.config import Config
from litquant.errors import UserError
from litquant.io import atomic_path, save_safetensors
from litquant.precision import resolve


def test_load_model_streams_weights_exactly(tiny_checkpoint):
    model = load_model(tiny_checkpoint, progress=False)
    ref = load_file(str(tiny_checkpoint / WEIGHTS_FILE))
    state = model.state_dict()
    assert set(state) == set(ref)
    for k, v in ref.items():
        assert torch.equal(state[k], v), k
    assert not any(t.is_meta for t in model.parameters())


def test_load_model_casts_to_precision(tiny_checkpoint):
    model = load_model(tiny_checkpoint, resolve("bf16-true"), progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ref = load_file(str(tiny_checkpoint / WEIGHTS_FILE))
    assert torch.equal(model.lm_head.weight, ref["lm_head.weight"].to(torch.bfloat16))


def test_missing_directory_and_files(tmp_path, tiny_checkpoint):
    with pytest.raises(UserError, match="does not exist"):
        Checkpoint.open(tmp_path / "nope")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="convert_hf_checkpoint"):
        Checkpoint.open(tmp_path / "hf")
    d = tmp_path / "noweights"
    shutil.copytree(tiny_checkpoint, d)
    (d / WEIGHTS_FILE).unlink()
    with pytest.raises(UserError, match="has no lit_model.safetensors"):
        load_model(d, progress=False)


def test_truncated_weights_file(tmp_path, tiny_checkpoint):
    d = tmp_path / "trunc"
    shutil.copytree(tiny_checkpoint, d)
    data = (d / WEIGHTS_FILE).read_bytes()
    (d / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_model(d, progress=False)


def test_config_that_does_not_match_the_weights(tmp_path, tiny_checkpoint):
    d = tmp_path / "mismatch"
    shutil.copytree(tiny_checkpoint, d)
    cfg = yaml.safe_load((d / "model_config.yaml").read_text())
    cfg["intermediate_size"] = 384
    (d / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(
        UserError, match=r"mlp.fc_1.weight has shape \(256, 128\) but the config needs \(384, 128\)"
    ):
        load_model(d, progress=False)

    cfg["intermediate_size"] = 256
    cfg["n_layer"] = 3  # more layers than the file has
    (d / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(UserError, match="missing tensors: transformer.h.2"):
        load_model(d, progress=False)

    cfg["n_layer"] = 1  # fewer
    (d / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(UserError, match="unexpected tensor 'transformer.h.1"):
        load_model(d, progress=False)


def test_bad_config_yaml(tmp_path, tiny_checkpoint):
    d = tmp_path / "badyaml"
    shutil.copytree(tiny_checkpoint, d)
    (d / "model_config.yaml").write_text("n_layer: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        Config.from_checkpoint(d)
    (d / "model_config.yaml").write_text("n_layers: 2\n")
    with pytest.raises(UserError, match=r"unknown config keys \['n_layers'\]"):
        Config.from_checkpoint(d)


def test_atomic_save_keeps_previous_file_on_crash(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors({"a": torch.ones(3)}, path)
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            save_file({"a": torch.zeros(3)}, str(tmp))
            raise RuntimeError("crash mid-write")
    assert torch.equal(load_file(str(path))["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp files left behind
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)


def test_precision_registry_rejects_unknown_values():
    with pytest.raises(
        UserError, match="unknown --precision 'fp8'; choose one of: 32-true, 16-true, bf16-true"
    ):
        resolve("fp8")
    with pytest.raises(UserError, match=r"unknown --quantize 'bnb.nf5'; choose one of: .*bnb.nf4"):
        resolve("32-true", "bnb.nf5")
    assert resolve("bf16").dtype == torch.bfloat16


_PEAK_SCRIPT = r"""
import subprocess, sys, torch
from litquant.utils import peak_memory_bytes, reset_peak_memory
if sys.argv[1] == "child":
    print(peak_memory_bytes("cpu"))
    raise SystemExit
x = torch.ones(600_000_000, dtype=torch.uint8)  # 600 MB, touched
big = peak_memory_bytes("cpu")
del x
reset_peak_memory("cpu")
after_reset = peak_memory_bytes("cpu")
y = torch.ones(200_000_000, dtype=torch.uint8)
again = peak_memory_bytes("cpu")
del y
x = torch.ones(600_000_000, dtype=torch.uint8)  # the parent is big while the child starts
child = int(subprocess.run([sys.executable, "-c", sys.argv[2], "child", ""], capture_output=True, text=True).stdout)
print(big, after_reset, again, child)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux peak-RSS reset")
def test_cpu_peak_memory_resets_and_is_not_inherited_by_children():
    """`Memory used` on CPU: the peak resident set since reset_peak_memory (jobs reset before loading), and a
    child process's own peak, not the one ru_maxrss would hand down from a big parent (benchmarks spawn jobs)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, "parent", _PEAK_SCRIPT], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    big, after_reset, again, child = map(int, out.stdout.split())
    assert big - after_reset > 500e6  # the 600 MB peak is forgotten after the reset
    assert 180e6 < again - after_reset < 260e6  # a new 200 MB allocation is the new peak
    assert child < big - 500e6  # the child counts from its own start


@pytest.mark.parametrize(
    "header,why",
    [
        ({"__metadata__": "x", "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, "__metadata__"),
        ({"a": {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}}, "bad header entry for 'a'"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [4, 0]}}, "bad header entry for 'a'"),
        ({"a": {"dtype": "F99", "shape": [4], "data_offsets": [0, 16]}}, "bad header entry for 'a'"),
    ],
)
def test_malformed_safetensors_headers_are_user_errors(tmp_path, header, why):
    import json
    import struct

    from litquant.io import SafetensorsFile

    raw = json.dumps(header).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16))
    with pytest.raises(UserError, match="not a valid safetensors file") as e:
        SafetensorsFile(path)
    assert why in str(e.value)
