"""``shrink``: import -> quantize -> fine-tune -> freeze -> emit -> verify -> evaluate -> write.

The fine-tune runs on ``--device`` (the network and batches move there; teacher logits come from
ONNX Runtime on the CPU), with ``--amp`` autocast, and under ``torchrun`` on several processes
(:mod:`onnxbits.train.distributed`); the network then returns to the CPU for emission and verification.

Nothing is written until the emitted model has passed verification; the model and its JSON report
are written atomically, and the input file is only read. The fine-tune checkpoints to ``OUT.ckpt``
every ``--checkpoint-every`` steps and on Ctrl-C; ``--resume`` continues from it (refusing a
checkpoint written with other options or another model), and a successful run deletes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import fx

from onnxbits.config import ShrinkConfig
from onnxbits.data.decode import ImageTensors
from onnxbits.data.stream import Images, StreamedImages
from onnxbits.data.tensors import TensorSet, input_specs
from onnxbits.emit.prepare import limit_clip_alphas, prepare_ort
from onnxbits.emit.targets import emit
from onnxbits.emit.verify import verify
from onnxbits.errors import ConfigError, DataError, InvalidModelError
from onnxbits.graph.io import (
    fixed_batch,
    load_model,
    quantized_nodes,
    write_files_atomic,
)
from onnxbits.graph.normalize import normalize
from onnxbits.importer.batch import as_tensors, rows
from onnxbits.importer.convert import (
    FloatLayer,
    Site,
    convert,
    find_sites,
    float_layer_warnings,
    float_layers,
)
from onnxbits.pipeline.inputs import (
    Event,
    StageClock,
    batch_fetcher,
    check_batch_free,
    check_labels,
    check_output_path,
    emit_event,
    load_splits,
    relax_batch,
)
from onnxbits.pipeline.lock import output_lock
from onnxbits.pipeline.outputs import run_output_files, run_output_paths
from onnxbits.pipeline.summary import (
    apply_guard,
    build_report,
    chance_warning,
    config_dict,
    runtime_info,
)
from onnxbits.pipeline.summary import torch_logits as torch_logits
from onnxbits.quant.cost import bit_cost
from onnxbits.quant.network import QuantizedNetwork, attach_quantizers, calibrate, layer_bits
from onnxbits.report.evaluate import make_session, predict_outputs
from onnxbits.train.budget import LambdaController, budget_freezer, budget_target
from onnxbits.train.checkpoint import (
    CheckpointSpec,
    checkpoint_path,
    remove_checkpoint,
    run_fingerprint,
)
from onnxbits.train.config import TrainConfig
from onnxbits.train.device import check_amp, configure_cpu, rows_per_pass
from onnxbits.train.distributed import DistContext, close, init_from_env
from onnxbits.train.history import StepRecord
from onnxbits.train.loop import fine_tune
from onnxbits.train.reconstruct import BlockResult
from onnxbits.train.teacher import OnlineTeacher

SHRINK_FIELDS = {f.name for f in dataclasses.fields(ShrinkConfig)}
CALIB_BATCHES = 4  # batches of a seeded sample of the fine-tune images the ranges start from
VERIFY_BATCHES = 2  # calibration batches the emitted model is verified on, tensor by tensor
MIN_TRAIN_IMAGES = 100  # fewer fine-tune images than this get a warning

__all__ = ["ShrinkResult", "budget_target", "check_output_path",
           "default_output", "load_splits", "shrink", "torch_logits"]


@dataclass
class ShrinkResult:
    """What a shrink produced: paths, accuracies, the per-layer report and the history."""

    output: Path
    report_path: Path
    report: dict[str, Any]
    history: list[StepRecord] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)  # OUT.png, OUT.history.{json,csv,png}
    main: bool = True      # False on the torchrun processes other than rank 0 (nothing written)


def default_output(model_path: Path) -> Path:
    """``model.onnx`` -> ``model.bits.onnx`` next to the input."""
    return model_path.with_name(model_path.stem + ".bits.onnx")


def shrink(model_path: str | Path, cfg: ShrinkConfig,
           on_event: Event | None = None) -> ShrinkResult:
    """Learn bitlengths for ``model_path`` and write the quantized model and its report.

    Under ``torchrun`` (``WORLD_SIZE > 1``) every process calls this: they fine-tune together
    (:mod:`onnxbits.train.distributed`), then only rank 0 runs the accuracy guard, emits, verifies,
    evaluates and writes; the other processes return a result with ``main=False`` and an empty
    report. torch's thread count and denormal flushing are restored on return (the allocator
    setting of :func:`onnxbits.train.device.configure_cpu` stays for the process).
    """
    threads = torch.get_num_threads()
    ctx = init_from_env(cfg.device)
    try:
        try:
            check_amp(cfg.amp_dtype(), ctx.device)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        model_path = Path(model_path)
        output = Path(cfg.output) if cfg.output is not None else default_output(model_path)
        check_output_path(model_path, output)
        files = [output, output.with_suffix(".json"), checkpoint_path(output),
                 *run_output_paths(output).values()]
        with output_lock(output, files) if ctx.is_main else contextlib.nullcontext():
            return _shrink(model_path, output, cfg, on_event if ctx.is_main else None, ctx)
    finally:
        close(ctx, wait=False)
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


@dataclass
class _Inputs:
    """What the fine-tune starts from: the model and its float graph, sites and float layers, the
    splits, the float outputs on the evaluation split, the teacher, the loss, the warnings."""

    model: onnx.ModelProto
    float_graph: fx.GraphModule
    sites: list[Site]
    floats: list[FloatLayer]
    train: Images
    evaluation: Images
    split: dict[str, Any]
    loss: str
    teacher: OnlineTeacher
    rows_per_pass: int | None      # samples per forward pass (memory), None: whole batches
    float_eval: np.ndarray
    float_outputs: list[np.ndarray]
    warnings: list[str]


def _load_inputs(model_path: Path, original: onnx.ModelProto, cfg: ShrinkConfig,
                 ctx: DistContext, stages: StageClock, on_event: Event | None) -> _Inputs:
    """Import the model (``stages``: import), open the splits, and compute the float model's
    logits on the evaluation split (``stages``: teacher); user errors raise :class:`ConfigError` or
    :class:`InvalidModelError`."""
    stages.start("import")
    declared = fixed_batch(original)
    relaxed, batch_note = relax_batch(original, declared, cfg.batch_size)
    model = normalize(relaxed, str(model_path))
    float_graph = convert(model, str(model_path))
    if batch_note is not None and declared is not None:
        check_batch_free(float_graph, model, str(model_path), declared[1])
    sites = find_sites(model, float_graph)
    floats = float_layers(model, float_graph)
    warnings = float_layer_warnings(str(model_path), model, floats, cfg.skip_unsupported)
    if batch_note is not None:
        warnings.append(batch_note)
    if len(floats) > len(sites):
        warnings.append(f"{len(floats)} of the {len(floats) + len(sites)} layers stay in float "
                        "(listed in the report's float_layers): most of the model is not shrunk")
    if not sites:
        raise InvalidModelError(f"{model_path}: no quantizable layer (Conv, Gemm or MatMul with a "
                                "constant weight); nothing to shrink")
    specs = input_specs(model)
    train, evaluation, split = load_splits(cfg, on_event, specs)
    tensors = isinstance(train, TensorSet)
    if tensors and cfg.augment != "none":
        raise ConfigError(f"--augment {cfg.augment} mirrors images; tensor data "
                          f"{split['train']} has none: drop --augment")
    if len(specs) > 1 and cfg.reconstruct > 0:
        raise ConfigError(f"{model_path}: block reconstruction (--recipe reconstruct, "
                          f"--reconstruct) runs single-input models; this one has {len(specs)} "
                          "inputs: use the default recipe or --reconstruct 0")
    if split["bad_images"]:
        warnings.append(f"skipped {split['bad_images']} unreadable image(s) in {cfg.data}; "
                        "remove or re-encode them")
    if cfg.augment == "flip":
        train = train.with_mirrors()
        split["n_train_views"] = len(train)
    if len(train) < MIN_TRAIN_IMAGES:
        kind = "samples" if tensors else "images"
        warnings.append(f"only {len(train)} fine-tune {kind} in {split['train']}: too few to "
                        "tune on "
                        f"reliably (the result may not hold on other images); give at least "
                        f"{MIN_TRAIN_IMAGES}")
    loss = cfg.task_loss(train.has_labels)
    if loss != "kd" and not train.has_labels:
        raise ConfigError(f"--loss {cfg.loss} needs labels but {cfg.data} has none; use --loss kd")
    if min(cfg.batch_size, len(train)) < ctx.world:
        raise ConfigError(f"--batch-size {cfg.batch_size} (with {len(train)} fine-tune images) is "
                          f"smaller than the {ctx.world} torchrun processes; raise --batch-size")
    per_pass = rows_per_pass(model, cfg.batch_size, declared is not None and batch_note is None)
    stages.start("float eval", total=len(evaluation))   # the float model on the eval split
    session = make_session(original, threads=cfg.threads)
    float_outputs = predict_outputs(session, evaluation, batch_size=per_pass or cfg.batch_size,
                                    progress=lambda k: emit_event(on_event, "decode", n=k))
    float_eval = float_outputs[0].reshape(len(float_outputs[0]), -1)
    check_labels(train, float_eval.shape[1])
    warnings.extend(chance_warning(evaluation, float_eval, cfg))
    held = isinstance(train, ImageTensors) or (tensors and not train.on_demand)
    teacher = OnlineTeacher(float_graph, cache=len(train) if held else None,
                            rows_per_pass=per_pass)
    return _Inputs(model, float_graph, sites, floats, train, evaluation, split, loss,
                   teacher, per_pass, float_eval, float_outputs, warnings)


def _train_config(cfg: ShrinkConfig, objective: str, inputs: _Inputs) -> TrainConfig:
    """The fine-tune's configuration from the shrink options."""
    derived = {"objective": objective, "loss": inputs.loss, "reconstruct_steps": cfg.reconstruct,
               "amp": cfg.amp_dtype(), "steps": cfg.total_steps(len(inputs.train)),
               "micro_batch": inputs.rows_per_pass}
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)
              if f.name in SHRINK_FIELDS and f.name not in derived}
    return TrainConfig(**shared, **derived)


def _quantized_network(cfg: ShrinkConfig, inputs: _Inputs
                       ) -> tuple[QuantizedNetwork, list[torch.Tensor]]:
    """The float graph with quantizers attached and calibrated on (at most) 4 batches of a
    seeded sample of the fine-tune images, and those batches."""
    net = attach_quantizers(inputs.model, inputs.float_graph, inputs.sites,
                            min_bits=cfg.min_bits, min_act_bits=cfg.act_floor,
                            max_bits=cfg.max_bits)
    train = inputs.train
    n = min(len(train), CALIB_BATCHES * cfg.batch_size)
    sample = np.sort(np.random.default_rng(cfg.seed).choice(len(train), n, replace=False))
    calib = []
    for s in range(0, n, cfg.batch_size):
        x, _ = train.read(sample[s:s + cfg.batch_size])
        x = as_tensors(x)
        if rows(x):
            calib.append(x)
    if not calib:
        raise DataError(f"{cfg.data}: no readable image among the calibration sample")
    if cfg.target in ("ort", "pack"):
        prepare_ort(inputs.model, net)
    calibrate(net, calib, inputs.rows_per_pass)
    return net, calib


def _shrink(model_path: Path, output: Path, cfg: ShrinkConfig, on_event: Event | None,
            ctx: DistContext) -> ShrinkResult:
    started = time.perf_counter()
    stages = StageClock(on_event)
    report_path = output.with_suffix(".json")
    original = load_model(model_path)
    if not cfg.resume and checkpoint_path(output).exists():
        raise ConfigError(f"{checkpoint_path(output)} holds an interrupted run writing {output}; "
                          "add --resume to continue it, or delete it to start over")
    found = quantized_nodes(original)
    if found:
        raise InvalidModelError(
            f"{model_path}: already quantized (node '{found[0].name}' is {found[0].op_type}); "
            "pass the float model")
    cpu = configure_cpu(cfg.threads, keep_memory=ctx.device.type == "cpu")
    torch.manual_seed(cfg.seed)
    inputs = _load_inputs(model_path, original, cfg, ctx, stages, on_event)
    model, float_graph, train, warnings = (inputs.model, inputs.float_graph, inputs.train,
                                           inputs.warnings)
    net, calib = _quantized_network(cfg, inputs)
    objective, budget = budget_target(cfg, net)
    tcfg = _train_config(cfg, objective, inputs)
    moved: list[str] = []
    ckpt = CheckpointSpec(checkpoint_path(output), every=cfg.checkpoint_every, resume=cfg.resume,
                          fingerprint=run_fingerprint(model_path, _resume_options(cfg)),
                          extra={"moved": moved})
    controller = None
    if budget is not None:
        start = float(bit_cost(objective, layer_bits(net)).detach())
        controller = LambdaController(budget, start, tcfg.learn_steps(), net=net,
                                      objective=objective)
    freeze = budget_freezer(objective, budget, moved)
    fetch, resident = batch_fetcher(train, ctx.device)
    teacher = inputs.teacher
    ckpt.extra["teacher"] = teacher.state
    steps_run: list[StepRecord] = []
    blocks: list[dict[str, Any]] = []

    def on_step(record: StepRecord) -> None:
        steps_run.append(record)
        emit_event(on_event, "step", record=record)

    def on_block(result: BlockResult) -> None:
        blocks.append(result.to_dict())
        emit_event(on_event, "block", result=result)

    stages.start("fine-tune", total=tcfg.steps)
    net.graph.to(ctx.device)
    float_graph.to(ctx.device)           # the online teacher, and block reconstruction's target
    block_graph = float_graph if tcfg.needs_float_graph() else None
    tuned = time.perf_counter()
    history = fine_tune(net, fetch, teacher, len(train), tcfg, on_step=on_step,
                        lam_schedule=controller, freeze=freeze, checkpoint=ckpt, dist=ctx,
                        float_graph=block_graph, on_block=on_block,
                        read_ahead=isinstance(train, StreamedImages)
                        or (isinstance(train, TensorSet) and train.on_demand))
    float_graph.cpu()
    tuned = time.perf_counter() - tuned
    if blocks and blocks[0]["inputs"] < blocks[0]["wanted"]:
        warnings.append(f"block reconstruction ran on {blocks[0]['inputs']} of its "
                        f"{blocks[0]['wanted']} inputs (a seeded subset): the tensors of all of "
                        "them would not fit in the free memory; free memory or use fewer "
                        "images (--max-train-images) to choose the subset yourself")
    close(ctx)
    if not ctx.is_main:
        return ShrinkResult(output, report_path, {}, history, main=False)
    try:     # after the fine-tune a failure repeats on --resume: the checkpoint goes with it
        runtime = runtime_info(ctx, cfg.amp, cpu, len(steps_run), min(cfg.batch_size, len(train)),
                               tuned, resident)
        net.graph.cpu()
        guard: dict[str, Any] = {}
        if cfg.max_drop is not None:
            stages.start("accuracy guard")
            guard = _guard(cfg, tcfg, inputs, net, calib, fetch, teacher, ctx.device)
        if cfg.target in ("ort", "pack"):
            limit_clip_alphas(model, net)
        stages.start("emit")
        source = {"model": model_path.name, "objective": objective, "lambda": cfg.lam,
                  "budget": budget, "final_lambda": history[-1].lam if history else cfg.lam,
                  "steps": tcfg.steps, "seed": cfg.seed, "min_bits": cfg.min_bits,
                  "min_act_bits": cfg.act_floor, "max_bits": cfg.max_bits}
        emitted = emit(model, net, cfg.target, source=source)
        verification = verify(emitted, net, calib[:VERIFY_BATCHES], cfg.target,
                              rows_per_pass=inputs.rows_per_pass)
        stages.start("evaluate")
        report = build_report(cfg, emitted, net, inputs.evaluation, inputs.float_outputs,
                              ctx.device, inputs.rows_per_pass or cfg.batch_size)
        report["config"].update(task_loss=inputs.loss, steps=tcfg.steps)  # as run
        report.update(
            model=str(model_path), output=str(output), data=inputs.split,
            verification=verification.to_dict(), guard=guard, warnings=warnings,
            float_layers=[{"node": f.node, "op": f.op, "reason": f.reason} for f in inputs.floats],
            budget={"objective": objective, "target": budget, "moved_at_freeze": moved,
                    "final_cost": float(bit_cost(objective, layer_bits(net)).detach())},
            reconstruction=blocks,
            runtime={**runtime, "stages": stages.seconds()},
            seconds=round(time.perf_counter() - started, 1))
        side = run_output_files(output, report, history)
        write_files_atomic({**side, report_path: json.dumps(report, indent=2).encode(),
                            output: emitted.SerializeToString()})   # all or none, model last
        outputs = list(side)
    except Exception:
        remove_checkpoint(ckpt.path)
        raise
    remove_checkpoint(ckpt.path)
    return ShrinkResult(output, report_path, report, history, outputs)


def _guard(cfg: ShrinkConfig, tcfg: TrainConfig, inputs: _Inputs, net: QuantizedNetwork,
           calib: list[torch.Tensor], fetch: Callable[[np.ndarray], Any], teacher: torch.Tensor,
           device: torch.device) -> dict[str, Any]:
    """The accuracy guard (``net`` on the CPU); its retune is a frozen-bit fine-tune of
    ``max(20, frozen steps / 3)`` steps on ``device``."""
    retune_cfg = dataclasses.replace(tcfg, steps=max(20, tcfg.n_frozen() // 3),
                                     frozen_steps=10**9, reconstruct_steps=0, seed=cfg.seed + 1)

    def retune() -> None:
        net.graph.to(device)
        try:
            fine_tune(net, fetch, teacher, len(inputs.train), retune_cfg)
        finally:
            net.graph.cpu()

    teachers = [inputs.teacher(x) for x in calib]
    return apply_guard(cfg, inputs.model, net, inputs.evaluation, inputs.float_outputs, calib,
                       teachers, retune, inputs.rows_per_pass or cfg.batch_size)


def _resume_options(cfg: ShrinkConfig) -> dict[str, Any]:
    """The options a resumed run must share (all but output, threads and checkpointing)."""
    skip = {"output", "threads", "checkpoint_every", "resume"}
    return {k: v for k, v in config_dict(cfg).items() if k not in skip}
