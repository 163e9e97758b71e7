"""``shrink``: import -> quantize -> fine-tune -> freeze -> emit -> verify -> evaluate -> write.

Nothing is written until the emitted model has passed verification; the model and its JSON report
are written atomically, and the input file is only read. The fine-tune checkpoints to ``OUT.ckpt``
every ``--checkpoint-every`` steps and on Ctrl-C; ``--resume`` continues from it (refusing a
checkpoint written with other options or another model), and a successful run deletes it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from onnxbits.config import ShrinkConfig
from onnxbits.data import (ImageTensors, decode_images, holdout_split, load_image_set,
                           select_files, split_data_dir)
from onnxbits.checkpoint import CheckpointSpec, checkpoint_path, remove_checkpoint, run_fingerprint
from onnxbits.deploy import limit_clip_alphas, prepare_ort
from onnxbits.emit import emit
from onnxbits.errors import ConfigError, DataError, InvalidModelError
from onnxbits.evaluate import agreement, make_session, predict_logits, topk_accuracy
from onnxbits.history import write_run_outputs
from onnxbits.importer import convert, find_sites, float_layer_warnings, float_layers
from onnxbits.budget import LambdaController, freeze_to_budget
from onnxbits.cost import LayerBits, bit_cost
from onnxbits.insert import QuantizedNetwork, attach_quantizers, calibrate, layer_bits
from onnxbits.io import (fixed_batch, load_model, quantized_nodes, save_model_atomic,
                         write_bytes_atomic)
from onnxbits.normalize import normalize
from onnxbits.train import StepRecord, TrainConfig, fine_tune
from onnxbits.verify import verify

Event = Callable[[str, dict[str, Any]], None]


@dataclass
class ShrinkResult:
    """What a shrink produced: paths, accuracies, the per-layer report and the history."""

    output: Path
    report_path: Path
    report: dict[str, Any]
    history: list[StepRecord] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)  # OUT.png, OUT.history.{json,csv,png}


def default_output(model_path: Path) -> Path:
    """``model.onnx`` -> ``model.bits.onnx`` next to the input."""
    return model_path.with_name(model_path.stem + ".bits.onnx")


def check_output_path(model_path: Path, output: Path) -> None:
    """Refuse to overwrite the input or to write into a missing or read-only folder.

    Writability is probed with a temporary file (``os.access`` says yes to root on read-only
    file systems).
    """
    if output.resolve() == model_path.resolve():
        raise ConfigError(f"output {output} is the input model; choose another -o/--output path")
    folder = output.resolve().parent
    if not folder.is_dir():
        raise ConfigError(f"output folder {folder} does not exist; create it or change -o/--output")
    if output.suffix != ".onnx":
        raise ConfigError(f"output {output} must end in .onnx; change -o/--output")
    try:
        fd, probe = tempfile.mkstemp(prefix=".onnxbits-probe.", dir=folder)
    except OSError as exc:
        raise ConfigError(f"output folder {folder} is not writable ({exc.strerror}); "
                          "change -o/--output") from None
    os.close(fd)
    os.unlink(probe)


def check_batch_size(model: onnx.ModelProto, batch_size: int) -> None:
    """A model with a fixed batch dimension runs only at that batch size."""
    fixed = fixed_batch(model)
    if fixed is not None and fixed[1] != batch_size:
        raise ConfigError(f"model input '{fixed[0]}' has a fixed batch of {fixed[1]}; use "
                          f"--batch-size {fixed[1]} or re-export the model with a dynamic batch")


def _emit_event(on_event: Event | None, kind: str, **info: Any) -> None:
    if on_event is not None:
        on_event(kind, info)


def load_splits(cfg: ShrinkConfig, on_event: Event | None = None
                ) -> tuple[ImageTensors, ImageTensors, dict[str, Any]]:
    """Decode the fine-tune split and the held-out evaluation split (never trained on)."""
    train_dir, val_dir = split_data_dir(cfg.data)
    if cfg.eval_data is not None:
        val_dir = Path(cfg.eval_data)
    elif val_dir is None and cfg.eval_include is not None:
        val_dir = train_dir
    train_set = select_files(load_image_set(train_dir, cfg.classes), cfg.include, "--include")
    if val_dir is not None:
        eval_set = select_files(load_image_set(val_dir, cfg.classes), cfg.eval_include,
                                "--eval-include")
        split = {"train": str(train_dir), "eval": str(val_dir)}
    else:
        train_idx, eval_idx = holdout_split(len(train_set), cfg.eval_fraction, cfg.seed)
        eval_set, train_set = train_set.subset(eval_idx), train_set.subset(train_idx)
        split = {"train": str(train_dir), "eval": f"held-out {cfg.eval_fraction:.0%} of {train_dir} "
                 f"(seed {cfg.seed})"}
    if cfg.max_train_images is not None and len(train_set) > cfg.max_train_images:
        keep = np.sort(np.random.default_rng(cfg.seed).permutation(len(train_set))
                       [:cfg.max_train_images])
        train_set = train_set.subset(keep)
    progress = (lambda k: _emit_event(on_event, "decode", n=k))
    _emit_event(on_event, "stage", name="decode", total=len(train_set) + len(eval_set))
    train, bad_train = decode_images(train_set, cfg.preprocess, workers=2, progress=progress)
    evaluation, bad_eval = decode_images(eval_set, cfg.preprocess, workers=2, progress=progress)
    split.update(n_train=len(train), n_eval=len(evaluation), bad_images=bad_train + bad_eval)
    if len(train) == 0 or len(evaluation) == 0:
        raise DataError(f"{cfg.data}: too few images to fine-tune and evaluate; add images")
    return train, evaluation, split


def _accuracy(logits: np.ndarray, tensors: ImageTensors, reference: np.ndarray) -> dict[str, float]:
    out: dict[str, float] = {"agreement": agreement(logits, reference)}
    if tensors.has_labels:
        result = topk_accuracy(logits, tensors.labels)
        out.update(top1=result.top1, top5=result.top5)
    return out


@torch.no_grad()
def torch_logits(net: QuantizedNetwork, tensors: ImageTensors, batch_size: int) -> np.ndarray:
    """Logits of the torch (simulated k-bit) model on every image."""
    parts = []
    for start in range(0, len(tensors), batch_size):
        idx = np.arange(start, min(start + batch_size, len(tensors)))
        parts.append(net(torch.from_numpy(tensors.batch(idx))).numpy())
    return np.concatenate(parts)


def shrink(model_path: str | Path, cfg: ShrinkConfig, on_event: Event | None = None) -> ShrinkResult:
    """Learn bitlengths for ``model_path`` and write the quantized model and its report.

    torch's process-wide settings (denormal flushing, thread count) are restored on return.
    """
    threads = torch.get_num_threads()
    try:
        return _shrink(model_path, cfg, on_event)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


def _shrink(model_path: str | Path, cfg: ShrinkConfig, on_event: Event | None) -> ShrinkResult:
    started = time.perf_counter()
    model_path = Path(model_path)
    output = Path(cfg.output) if cfg.output is not None else default_output(model_path)
    report_path = output.with_suffix(".json")
    original = load_model(model_path)
    check_output_path(model_path, output)
    found = quantized_nodes(original)
    if found:
        raise InvalidModelError(
            f"{model_path}: already quantized (node '{found[0].name}' is {found[0].op_type}); "
            "pass the float model")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(cfg.seed)
    _emit_event(on_event, "stage", name="import")
    model = normalize(original, str(model_path))
    float_graph = convert(model, str(model_path))
    sites = find_sites(model, float_graph)
    floats = float_layers(model, float_graph)
    warnings = float_layer_warnings(str(model_path), model, floats, cfg.skip_unsupported)
    if not sites:
        raise InvalidModelError(f"{model_path}: no quantizable layer (Conv, Gemm or MatMul with a "
                                "constant weight); nothing to shrink")
    check_batch_size(original, cfg.batch_size)
    train, evaluation, split = load_splits(cfg, on_event)
    if split["bad_images"]:
        warnings.append(f"skipped {split['bad_images']} unreadable image(s) in {cfg.data}; "
                        "remove or re-encode them")
    if cfg.loss != "kd" and not train.has_labels:
        raise ConfigError(f"--loss {cfg.loss} needs labels but {cfg.data} has none; use --loss kd")
    _emit_event(on_event, "stage", name="teacher")
    session = make_session(original, threads=cfg.threads)
    teacher_train = predict_logits(session, train, batch_size=cfg.batch_size)
    float_eval = predict_logits(session, evaluation, batch_size=cfg.batch_size)
    _check_labels(train, teacher_train.shape[1])
    net = attach_quantizers(model, float_graph, sites, min_bits=cfg.min_bits,
                            max_bits=cfg.max_bits, per_channel_bits=cfg.granularity == "channel")

    def fetch(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        labels = torch.from_numpy(train.labels[idx]) if train.has_labels else None
        return torch.from_numpy(train.batch(idx)), labels

    calib = [fetch(np.arange(s, min(s + cfg.batch_size, len(train))))[0]
             for s in range(0, min(len(train), 4 * cfg.batch_size), cfg.batch_size)]
    if cfg.target in ("ort", "pack"):
        prepare_ort(model, net)
    calibrate(net, calib)
    objective, budget = budget_target(cfg, net)
    tcfg = TrainConfig(steps=cfg.steps, frozen_steps=cfg.frozen_steps, batch_size=cfg.batch_size,
                       lr=cfg.lr, alpha_lr=cfg.alpha_lr, bits_lr=cfg.bits_lr, lam=cfg.lam,
                       objective=objective, loss=cfg.loss, seed=cfg.seed)
    moved: list[str] = []
    ckpt = CheckpointSpec(checkpoint_path(output), every=cfg.checkpoint_every, resume=cfg.resume,
                          fingerprint=run_fingerprint(model_path, _resume_options(cfg)),
                          extra={"moved": moved})
    controller = freeze = None
    if budget is not None:
        start = float(bit_cost(objective, layer_bits(net)).detach())
        controller = LambdaController(budget, start, tcfg.learn_steps())
        freeze = lambda n: moved.extend(freeze_to_budget(n, objective, budget))  # noqa: E731
    _emit_event(on_event, "stage", name="fine-tune", total=cfg.steps)
    history = fine_tune(net, fetch, torch.from_numpy(teacher_train), len(train), tcfg,
                        on_step=lambda r: _emit_event(on_event, "step", record=r),
                        lam_schedule=controller, freeze=freeze, checkpoint=ckpt)
    guard: dict[str, Any] = {}
    if cfg.max_drop is not None:
        _emit_event(on_event, "stage", name="accuracy guard")
        retune_cfg = TrainConfig(steps=max(20, tcfg.n_frozen() // 3), frozen_steps=10**9,
                                 batch_size=cfg.batch_size, lr=cfg.lr, alpha_lr=cfg.alpha_lr,
                                 loss=cfg.loss, seed=cfg.seed + 1)
        guard = _apply_guard(cfg, model, net, evaluation, float_eval, calib, teacher_train,
                             lambda: fine_tune(net, fetch, torch.from_numpy(teacher_train),
                                               len(train), retune_cfg))
    if cfg.target in ("ort", "pack"):
        limit_clip_alphas(model, net)
    _emit_event(on_event, "stage", name="emit")
    source = {"model": model_path.name, "objective": objective, "lambda": cfg.lam,
              "budget": budget, "final_lambda": history[-1].lam if history else cfg.lam,
              "steps": cfg.steps, "seed": cfg.seed, "min_bits": cfg.min_bits,
              "max_bits": cfg.max_bits, "granularity": cfg.granularity}
    emitted = emit(model, net, cfg.target, source=source)
    verification = verify(emitted, net, calib[: cfg.verify_batches], cfg.target)
    _emit_event(on_event, "stage", name="evaluate")
    quant_eval = predict_logits(make_session(emitted, threads=cfg.threads), evaluation,
                                batch_size=cfg.batch_size)
    sim_eval = torch_logits(net, evaluation, cfg.batch_size)
    from onnxbits.report import analyze_model

    report = analyze_model(emitted).to_dict()
    report.update(
        model=str(model_path), output=str(output), target=cfg.target, data=split,
        accuracy={"float": _accuracy(float_eval, evaluation, float_eval),
                  "quantized": _accuracy(quant_eval, evaluation, float_eval),
                  "torch_sim_k_bit": _accuracy(sim_eval, evaluation, float_eval)},
        verification=verification.to_dict(), config=_config_dict(cfg),
        guard=guard, warnings=warnings,
        float_layers=[{"node": f.node, "op": f.op, "reason": f.reason} for f in floats],
        budget={"objective": objective, "target": budget, "moved_at_freeze": moved,
                "final_cost": float(bit_cost(objective, layer_bits(net)).detach())},
        seconds=round(time.perf_counter() - started, 1))
    save_model_atomic(emitted, output)
    write_bytes_atomic(json.dumps(report, indent=2).encode(), report_path)
    outputs = write_run_outputs(output, report, history)
    remove_checkpoint(ckpt.path)
    return ShrinkResult(output, report_path, report, history, outputs)


def _resume_options(cfg: ShrinkConfig) -> dict[str, Any]:
    """The options a resumed run must share (all but output, threads and checkpointing)."""
    skip = {"output", "threads", "checkpoint_every", "resume"}
    return {k: v for k, v in _config_dict(cfg).items() if k not in skip}


def _drop(logits: np.ndarray, tensors: ImageTensors, float_logits: np.ndarray) -> float:
    """Top-1 points lost vs the float model (labels), else 100 - agreement with it."""
    if tensors.has_labels:
        return (topk_accuracy(float_logits, tensors.labels).top1
                - topk_accuracy(logits, tensors.labels).top1)
    return 100.0 - agreement(logits, float_logits)


def _apply_guard(cfg: ShrinkConfig, model: onnx.ModelProto, net: QuantizedNetwork,
                 evaluation: ImageTensors, float_eval: np.ndarray, calib: list[torch.Tensor],
                 teacher_train: np.ndarray, retune: Callable[[], object]) -> dict[str, Any]:
    """Run :func:`onnxbits.guard.enforce_max_drop` with the drop measured on the emitted model
    in ONNX Runtime on the evaluation split."""
    from onnxbits.guard import enforce_max_drop

    def measure() -> float:
        session = make_session(emit(model, net, cfg.target), threads=cfg.threads)
        return _drop(predict_logits(session, evaluation, batch_size=cfg.batch_size), evaluation,
                     float_eval)

    teachers = [torch.from_numpy(teacher_train[i * cfg.batch_size:i * cfg.batch_size + len(x)])
                for i, x in enumerate(calib)]
    drop, raised = enforce_max_drop(net, measure, cfg.max_drop, calib, teachers, retune)
    return {"max_drop": cfg.max_drop, "final_drop": drop, "held": drop <= cfg.max_drop,
            "raised": raised}


def budget_target(cfg: ShrinkConfig, net: QuantizedNetwork) -> tuple[str, float | None]:
    """The objective and the budget in cost units (see :mod:`onnxbits.cost`).

    ``--target-size MB`` -> memory cost ``MB * 8e6 / sum P_i`` (bits per weight);
    ``--target-bops G`` -> BOPs cost ``G * 1e9 / (8 sum M_i)``.
    """
    objective = cfg.budget_objective()
    if objective is None:
        return cfg.objective, None
    layers = layer_bits(net)
    if objective == "bits":
        return objective, float(cfg.target_bits)
    if objective == "memory":
        value = cfg.target_size_mb * 8e6 / sum(l.params for l in layers)
    else:
        value = cfg.target_bops_g * 1e9 / (8.0 * sum(l.macs for l in layers))
    low = float(bit_cost(objective, _uniform(layers, cfg.min_bits)))
    high = float(bit_cost(objective, _uniform(layers, cfg.max_bits)))
    if not low <= value <= high:
        option = "--target-size" if objective == "memory" else "--target-bops"
        raise ConfigError(f"{option} is outside what --min-bits/--max-bits allow for this model "
                          f"(cost {value:.2f}, possible {low:.2f} to {high:.2f}); change the budget")
    return objective, value


def _uniform(layers: list[LayerBits], bits: int) -> list[LayerBits]:
    b = torch.tensor(float(bits))
    return [LayerBits(b, b if l.act_bits is not None else None, l.params, l.macs) for l in layers]


def _check_labels(tensors: ImageTensors, outputs: int) -> None:
    if tensors.has_labels and len(tensors.labels) and int(tensors.labels.max()) >= outputs:
        raise DataError(f"label {int(tensors.labels.max())} is out of range for the model's "
                        f"{outputs} outputs; check --classes and --label-offset")


def _config_dict(cfg: ShrinkConfig) -> dict[str, Any]:
    out = {}
    for key, value in cfg.__dict__.items():
        out[key] = str(value) if isinstance(value, Path) else value
    out["preprocess"] = cfg.preprocess.__dict__ if hasattr(cfg.preprocess, "__dict__") else str(cfg.preprocess)
    return json.loads(json.dumps(out, default=str))
