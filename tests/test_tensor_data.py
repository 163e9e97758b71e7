"""Models that are not single-input image classifiers: tensor data (.npz file, folder, API
records), several inputs (one int64), several outputs distilled by kind, label-free fidelity;
ONNX Runtime is the oracle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from onnx import TensorProto, helper
from onnxbits.cli.main import main

from onnxbits import ShrinkConfig, shrink
from onnxbits.data.files import holdout_split
from onnxbits.data.tensors import input_specs, load_tensor_set
from onnxbits.errors import DataError
from onnxbits.graph.outputs import GraphOutput, graph_outputs, output_kind
from onnxbits.pipeline.inputs import MAX_HELDOUT
from onnxbits.report.fidelity import fidelity, fidelity_drop
from onnxbits.train.losses import output_loss, task_loss
from tests.builders import make_model, softmax_segmenter, two_input_two_output

FAST = ("--steps", "12", "--batch-size", "16", "--threads", "1", "-q")


def _arrays(n: int = 120, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 8)).astype(np.float32), "ids": rng.integers(0, 6, n)}


def _run(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session.run(None, feeds)


def test_two_inputs_two_outputs_shrink_label_free_from_npz(tmp_path: Path) -> None:
    model_path, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(two_input_two_output(), model_path)
    arrays = _arrays()
    np.savez(data, **arrays)
    result = CliRunner().invoke(main, ["shrink", str(model_path), "--data", str(data), *FAST])
    assert result.exit_code == 0, result.output
    out = tmp_path / "m.bits.onnx"
    report = json.loads((tmp_path / "m.bits.json").read_text())
    assert [(f["output"], f["kind"]) for f in report["fidelity"]] == [("logits", "logits"),
                                                                      ("reg", "values")]
    assert report["config"]["task_loss"] == "kd" and report["data"]["kind"] == "tensors"
    assert report["verification"]["max_steps"] <= 1.0
    emitted = onnx.load(out)
    ids = next(i for i in emitted.graph.input if i.name == "ids")
    assert ids.type.tensor_type.elem_type == TensorProto.INT64      # passed through as is
    assert not any(n.op_type == "QuantizeLinear" and "ids" in n.input for n in emitted.graph.node)
    # the report's fidelity is what ONNX Runtime gives on the held-out samples
    _, held = holdout_split(len(arrays["x"]), 0.2, 0, max_eval=MAX_HELDOUT)
    feeds = {k: v[held] for k, v in arrays.items()}
    want = _run(ort.InferenceSession(str(model_path)), feeds)
    got = _run(ort.InferenceSession(str(out)), feeds)
    for k, name in enumerate(["logits", "reg"]):
        t, s = want[k].astype(np.float64), got[k].astype(np.float64)
        measured = report["fidelity"][k]
        assert measured["rel_l2"] == pytest.approx(np.linalg.norm(t - s) / np.linalg.norm(t),
                                                   rel=1e-4), name
        assert measured["sqnr_db"] == pytest.approx(
            10 * np.log10((t ** 2).sum() / ((t - s) ** 2).sum()), rel=1e-4)
    assert report["fidelity"][0]["agreement"] == pytest.approx(
        100 * np.mean(want[0].argmax(1) == got[0].argmax(1)))
    assert report["fidelity"][1]["agreement"] is None
    assert "output 'reg' (values, normalised MSE)" in result.output
    # eval measures the same fidelity label-free; without --reference it says what to add
    ev = CliRunner().invoke(main, ["eval", str(out), "--data", str(data), "--reference",
                                   str(model_path), "--json"])
    assert ev.exit_code == 0, ev.output
    assert [f["output"] for f in json.loads(ev.output)["fidelity"]] == ["logits", "reg"]
    bare = CliRunner().invoke(main, ["eval", str(out), "--data", str(data)])
    assert bare.exit_code == 2 and "--reference FLOAT.onnx" in bare.output


def test_npz_file_folder_and_records_give_the_same_samples(tmp_path: Path) -> None:
    specs = input_specs(two_input_two_output())
    arrays = _arrays(n=6)
    np.savez(tmp_path / "all.npz", **arrays)
    folder = tmp_path / "samples"
    folder.mkdir()
    for i in range(6):          # with and without a leading sample axis of 1
        sample = {k: (v[i:i + 1] if i % 2 else v[i]) for k, v in arrays.items()}
        np.savez(folder / f"{i:03d}.npz", **sample)
    records = [{k: v[i:i + 3] for k, v in arrays.items()} for i in (0, 3)]
    idx = np.array([5, 0, 2])
    for source in (tmp_path / "all.npz", folder, records):
        data = load_tensor_set(source, specs)
        assert len(data) == 6
        (x, ids), ok = data.read(idx)
        np.testing.assert_array_equal(x, arrays["x"][idx])
        np.testing.assert_array_equal(ids, arrays["ids"][idx])
        assert ids.dtype == np.int64 and ok.all()


@pytest.mark.parametrize(("arrays", "message"), [
    ({"x": np.zeros((4, 8), np.float32)}, r"no array for model input\(s\) 'ids'"),
    ({"x": np.zeros((4, 8), np.float32), "ids": np.zeros(4, np.int64), "y": np.zeros(4)},
     r"array\(s\) 'y' match no model input"),
    ({"x": np.zeros((4, 7), np.float32), "ids": np.zeros(4, np.int64)},
     r"array 'x' has 7 along axis 1 but model input 'x' needs 8"),
    ({"x": np.zeros((4, 8), np.float32), "ids": np.zeros(4, np.float32)},
     r"array 'ids' is float32; model input 'ids' takes int64"),
    ({"x": np.zeros((4, 8), np.float32), "ids": np.zeros(3, np.int64)},
     r"different numbers of samples \(x: 4, ids: 3\)"),
])
def test_tensor_data_that_does_not_fit_names_the_array(tmp_path: Path, arrays: dict,
                                                       message: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_tensor_set(tmp_path / "bad.npz", input_specs(two_input_two_output()))


def test_a_softmax_map_of_any_size_shrinks_from_api_records(tmp_path: Path) -> None:
    model_path = tmp_path / "seg.onnx"
    onnx.save(softmax_segmenter(), model_path)
    rng = np.random.default_rng(0)
    records = [{"input": rng.normal(size=(20, 3, 8, 8)).astype(np.float32)} for _ in range(5)]
    result = shrink(model_path, ShrinkConfig(data=records, steps=12, batch_size=16, threads=1))
    (metrics,) = result.report["fidelity"]
    assert metrics["kind"] == "probs" and metrics["agreement"] is not None
    assert result.report["accuracy"] == {}          # a map, not one class per sample
    assert result.report["config"]["data"] == "5 in-memory record(s)"
    x = rng.normal(size=(2, 3, 12, 10)).astype(np.float32)      # another image size
    (want,) = ort.InferenceSession(str(model_path)).run(None, {"input": x})
    (got,) = ort.InferenceSession(str(result.output)).run(None, {"input": x})
    assert got.shape == (2, 4, 12, 10)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.5
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-4)


def test_fidelity_metrics_by_hand() -> None:
    t = np.array([[1.0, 2.0, 2.0], [0.0, 3.0, 4.0]])
    s = np.array([[1.0, 2.0, 3.0], [0.0, 3.0, 4.0]])
    f = fidelity(t, s, GraphOutput("y", index=1))        # a later output: values
    assert f.kind == "values" and f.agreement is None
    assert f.sqnr_db == pytest.approx(10 * np.log10(34.0 / 1.0))
    assert f.rel_l2 == pytest.approx(1 / np.sqrt(34.0))
    assert f.cosine == pytest.approx(36.0 / (np.sqrt(34.0) * np.sqrt(39.0)))
    # a per-pixel Softmax over axis 1: agreement counts positions
    probs = GraphOutput("p", "probs", axis=1)
    a = np.zeros((1, 2, 1, 3))
    a[0, 0] = [[0.9, 0.2, 0.6]]
    a[0, 1] = 1 - a[0, 0]
    b = a.copy()
    b[0, :, 0, 2] = [0.4, 0.6]                              # one of 3 positions flips
    assert fidelity(a, b, probs).agreement == pytest.approx(100 * 2 / 3)
    assert fidelity_drop([fidelity(a, b, probs), f]) == pytest.approx(100 / 3)


def test_each_output_kind_gets_its_loss() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean",
                  log_target=True)
    assert float(output_loss(s, t)) == pytest.approx(float(kl))          # logits
    ps, pt = s.softmax(-1), t.softmax(-1)
    manual = float((pt * (pt.log() - ps.log())).sum() / 4)
    assert float(output_loss(ps, pt, GraphOutput("p", "probs"))) == pytest.approx(manual, rel=1e-5)
    assert float(output_loss(ps.log(), pt.log(), GraphOutput("p", "logprobs"))) == \
        pytest.approx(manual, rel=1e-5)
    later = GraphOutput("r", index=1)
    assert float(output_loss(s, t, later)) == pytest.approx(
        float(((s - t) ** 2).sum() / (t ** 2).sum()))
    both = task_loss([s, s], [t, t], None, "kd", [GraphOutput("a"), later])
    assert float(both) == pytest.approx(float(kl) + float(((s - t) ** 2).sum() / (t ** 2).sum()))


def test_softmax_outputs_are_recognised_through_reshapes_and_old_opsets() -> None:
    nodes = [helper.make_node("Softmax", ["x"], ["p"], axis=1),
             helper.make_node("Identity", ["p"], ["probs"]),
             helper.make_node("LogSoftmax", ["x"], ["lp"]),
             helper.make_node("Flatten", ["lp"], ["logprobs"]),
             helper.make_node("Relu", ["x"], ["plain"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 2])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
         for n in ("probs", "logprobs", "plain")])
    found = graph_outputs(make_model(graph, 11))
    assert [(o.producer, o.axis, o.flatten, o.keeps_shape) for o in found] == [
        ("probs", 1, True, True), ("logprobs", 1, True, False), ("values", -1, False, True)]
    assert output_kind(found[1], (4, 6)) == "logprobs"       # flattened to (N, K): still one
    assert output_kind(found[1], (4, 3, 2)) == "values"
    assert output_kind(GraphOutput("logits"), (4, 10, 1, 1)) == "logits"
