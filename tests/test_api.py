"""The Python API: the README's example runs as written, and ``import onnxbits`` stays light."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_api_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md: the Python API section has no python block"
    return match.group(1)


def test_readme_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "models").symlink_to(ROOT / "models")
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    exec(compile(readme_api_example(), "README.md", "exec"), scope)
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith("digits.bits.onnx ")  # only the example's
    result = scope["result"]
    out = tmp_path / "digits.bits.onnx"
    assert result.output == Path("digits.bits.onnx") and out.is_file()   # type: ignore[attr-defined]
    assert 2 <= result.report["avg_weight_bits"] < 8                      # type: ignore[attr-defined]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.zeros([1 if isinstance(d, str) else d for d in session.get_inputs()[0].shape],
                 np.float32)
    assert session.run(None, {session.get_inputs()[0].name: x})[0].shape[-1] == 10


def test_import_is_light_and_api_names_resolve() -> None:
    code = ("import sys, onnxbits, onnxbits.config, onnxbits.cli.main; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "from onnxbits import ShrinkConfig, Preprocess; "
            "assert 'torch' not in sys.modules, 'torch imported by the config'; "
            "from onnxbits import shrink; assert callable(shrink)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr


def test_unknown_attribute_is_an_attribute_error() -> None:
    import onnxbits

    with pytest.raises(AttributeError, match="no attribute 'shrinkk'"):
        onnxbits.shrinkk  # noqa: B018
