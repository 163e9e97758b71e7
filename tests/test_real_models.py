"""Real models and images from ../shared (marked slow; skipped cleanly without ../shared).

Run with ``python -m pytest -m slow``. Expected float accuracies are the measured figures
published in ../shared/README.md; the shrink test follows its protocol (fine-tune on CIFAR-10
test files 0000-0499 of each class, measure on 0500-0999).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from onnxbits.cli.main import main

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
IMAGENET = SHARED / "data" / "imagenet"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (SHARED / "models").is_dir(), reason="../shared not present")]

# model, data, preset, float top-1 measured on that set (../shared/README.md)
FLOAT_TOP1 = [
    ("efficientnet_lite0.onnx", "imagenet/val1300", "efficientnet-lite", 82.38),
    ("mobilenet_v2_1.0_224_dq.onnx", "imagenet/val1300", "tf-mobilenet", 80.08),
    ("mobilenet_v1_0.5_160_dq.onnx", "imagenet/val1300", "tf-mobilenet-160", 71.69),
    ("mobilenet_v1_0.25_128_dq.onnx", "imagenet/val1300", "tf-mobilenet-128", 53.92),
    ("resnet56_cifar10.onnx", "cifar10/test", "cifar10", 83.20),
]


@pytest.mark.parametrize("model,data,preset,top1", FLOAT_TOP1, ids=[m[0] for m in FLOAT_TOP1])
def test_eval_reproduces_published_float_top1(model: str, data: str, preset: str,
                                              top1: float) -> None:
    result = CliRunner().invoke(main, ["eval", str(SHARED / "models" / model), "--data",
                                       str(SHARED / "data" / data), "--preset", preset,
                                       "--classes", str(IMAGENET / "wnids.txt"), "--json"])
    assert result.exit_code == 0, result.output
    assert abs(json.loads(result.stdout)["top1"] - top1) <= 0.1


def test_shrink_resnet20_cifar10_protocol(tmp_path: Path) -> None:
    """Issue target: ORT top-1 within 1 point of float at <= 5 average bits, input unchanged."""
    model = SHARED / "models" / "resnet20_cifar10.onnx"
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    out = tmp_path / "resnet20.bits.onnx"
    result = CliRunner().invoke(main, [
        "shrink", str(model), "--data", str(SHARED / "data" / "cifar10" / "test"),
        "--include", "*/0[0-4]*", "--eval-include", "*/0[5-9]*", "--preset", "cifar10",
        "--steps", "300", "--lambda", "0.2", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["data"]["n_train"] == 5000 and report["data"]["n_eval"] == 5000
    assert report["avg_bits"] <= 5.0
    acc = report["accuracy"]
    assert acc["quantized"]["top1"] >= acc["float"]["top1"] - 1.0
    assert report["verification"]["max_steps"] <= 1.0 + 1e-3
    assert hashlib.sha256(model.read_bytes()).hexdigest() == digest
    evaluated = CliRunner().invoke(main, [
        "eval", str(out), "--data", str(SHARED / "data" / "cifar10" / "test"), "--preset",
        "cifar10", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["n"] == 10000


# mobilenet_v2: 17 inverted-residual blocks (stem + first block, 15, last block + head);
# resnet20: stem + 9 basic blocks of 2 convolutions + classifier -> pairs of basic blocks
@pytest.mark.parametrize("model,blocks", [("mobilenet_v2_1.0_224_dq.onnx", 17),
                                          ("resnet20_cifar10.onnx", 5)])
def test_real_graphs_split_into_blocks_that_chain_into_the_network(model: str,
                                                                   blocks: int) -> None:
    """Block reconstruction's cuts on real graphs: residual blocks whole, exact chaining."""
    import onnx
    import torch

    from onnxbits.train.reconstruct import split_blocks
    from tests.conftest import calibrated_network

    s = calibrated_network(onnx.load(str(SHARED / "models" / model)), batch=4)
    assert s.graph is not None
    found = split_blocks(s.net, s.graph, min_layers=3)
    assert len(found) == blocks
    assert [n for b in found for n in b.layers] == [site.node for site in s.net.sites]
    quant, flt = s.x, s.x
    with torch.no_grad():
        for block in found:
            quant, flt = block.quantized(quant), block.float(flt)
        torch.testing.assert_close(quant, s.net(s.x), rtol=0, atol=0)
        torch.testing.assert_close(flt, s.graph(s.x), rtol=1e-5, atol=1e-4)
