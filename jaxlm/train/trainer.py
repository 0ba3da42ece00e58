"""The training loop: model, mesh, data, sharded steps, checkpoints, logs.

Running the same command on the same workdir resumes exactly: parameters,
optimizer state, step, data iterator and dropout keys (derived from the seed
and the step) all come back, so the losses after a resume equal those of an
uninterrupted run. Checkpoints are Orbax's: asynchronous, the last N kept, and
a step counts only once its save has completed.

The loop does not wait for each step: losses stay on device and are fetched
together at log, eval and checkpoint steps. A NaN or Inf loss therefore stops
training at the next such step (up to ``log_every`` steps after it occurred),
naming the step where it first occurred; it is never logged or checkpointed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm  # plain text bars (tqdm.auto wants ipywidgets in notebooks)

from jaxlm.assets import TINY_DIR
from jaxlm.checkpoint.loading import param_sharding
from jaxlm.config import InternLM2Config
from jaxlm.errors import ConfigError, JaxlmError
from jaxlm.files import copy_if_present
from jaxlm.models.causal_lm import InternLM2ForCausalLM
from jaxlm.options import ModelOptions
from jaxlm.sharding import ACT, batch_multiple, check_mesh_for_model, make_mesh, named_sharding
from jaxlm.tokenizer import InternLM2Tokenizer
from jaxlm.train.config import TrainConfig
from jaxlm.train.data import DataReport, DataState, PackedBatches, load_examples
from jaxlm.train.lora import apply_lora, quantized_projections, save_adapter, target_projections, trainable_filter
from jaxlm.train.metrics import MetricsWriter, flops_per_token, peak_flops_per_device
from jaxlm.train.step import batch_loss_sum, make_optimizer, schedule, train_step


class TrainingDiverged(JaxlmError):
    """The loss became NaN or Inf (noticed at the next log, eval or checkpoint step)."""


# ----------------------------------------------------------------- building
def _model_config(name: str):
    return InternLM2Config.from_pretrained(TINY_DIR if name == "tiny" else name)


def _is_checkpoint(name: str) -> bool:
    return os.path.isdir(name)


def build_model(cfg: TrainConfig, mesh):
    """The model on the mesh: loaded from a checkpoint, or initialized (preset / tiny)."""
    m = cfg.model
    options = ModelOptions.of(m)
    if _is_checkpoint(m.name):
        model = InternLM2ForCausalLM.from_pretrained(m.name, options, mesh=mesh)
    else:
        config = _model_config(m.name)
        check_mesh_for_model(mesh, config)

        @jax.jit
        def init():  # initialized directly with its sharding: never whole on one device
            model = InternLM2ForCausalLM(config, options, rngs=nnx.Rngs(cfg.seed))
            state = nnx.state(model)
            shardings = jax.tree.map(lambda v: param_sharding(v, mesh), state,
                                     is_leaf=lambda x: isinstance(x, nnx.Variable))
            return jax.lax.with_sharding_constraint(state, shardings)

        abstract = nnx.eval_shape(lambda: InternLM2ForCausalLM(config, options, rngs=nnx.Rngs(cfg.seed)))
        graphdef, _ = nnx.split(abstract)
        with jax.set_mesh(mesh):
            model = nnx.merge(graphdef, init())
    if cfg.lora.enabled:
        apply_lora(model, cfg.lora, seed=cfg.seed)
        lora_state = nnx.state(model, nnx.LoRAParam)
        placed = jax.tree.map(lambda v: jax.device_put(v.get_value(), param_sharding(v, mesh)), lora_state,
                              is_leaf=lambda x: isinstance(x, nnx.Variable))
        nnx.update(model, placed)
    return model


def load_tokenizer(cfg: TrainConfig):
    path = cfg.model.tokenizer or (cfg.model.name if _is_checkpoint(cfg.model.name) else TINY_DIR)
    return InternLM2Tokenizer.from_pretrained(path)


# ------------------------------------------------------------------ batches
def _global_batch(rows: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """This process's slice of the global batch rows, assembled into global arrays."""
    n, index = jax.process_count(), jax.process_index()
    per = rows["input_ids"].shape[0] // n
    return {k: jax.make_array_from_process_local_data(sharding, v[index * per:(index + 1) * per])
            for k, v in rows.items()}


@jax.jit
def _eval_sums(graphdef, trainable, frozen, batch):
    return batch_loss_sum(nnx.merge(graphdef, trainable, frozen), batch)


def evaluate(graphdef, trainable, frozen, eval_rows, batch_size, sharding) -> float:
    total, count = 0.0, 0.0
    n = eval_rows["input_ids"].shape[0]
    for start in range(0, n, batch_size):
        part = {k: v[start:start + batch_size] for k, v in eval_rows.items()}
        missing = batch_size - part["input_ids"].shape[0]
        if missing:  # pad with rows that carry no loss
            part = {k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)]) for k, v in part.items()}
        s, c = _eval_sums(graphdef, trainable, frozen, _global_batch(part, sharding))
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0)


# --------------------------------------------------------------- the loop
def train(cfg: TrainConfig, workdir: str, *, progress: bool = True, log=print) -> dict:
    """Trains ``cfg`` in ``workdir`` (resuming from its latest checkpoint); returns the
    workdir, the exported ``final/`` directory, the per-step losses and the data report."""
    run = _setup(cfg, os.path.abspath(workdir), log)
    manager = _checkpoint_manager(run)
    start = _resume(run, manager, log)
    logger = _StepLog(run, start, progress)
    try:
        for step in range(start, cfg.steps + 1):
            logger.add(step, _train_step(run, step))
            _after_step(run, logger, manager, step)
        manager.wait_until_finished()
    finally:
        logger.close()
        manager.close()
    return _finish(run, logger.history)


@dataclasses.dataclass
class _Run:
    """What a run holds: built by `_setup`; ``trainable`` and ``opt_state`` then move on
    with each step (or come back from a checkpoint in `_resume`)."""
    cfg: TrainConfig
    workdir: str
    mesh: jax.sharding.Mesh
    tokenizer: object
    report: DataReport
    batches: PackedBatches
    eval_rows: dict[str, np.ndarray] | None
    model_config: object
    graphdef: nnx.GraphDef
    trainable: nnx.State
    frozen: nnx.State
    optimizer: optax.GradientTransformation
    opt_state: object
    batch_sharding: jax.sharding.NamedSharding
    base_key: jax.Array  # dropout keys: folded with the step


def _setup(cfg: TrainConfig, workdir: str, log) -> _Run:
    """The mesh, the data, the model split into trainable / frozen, and the optimizer state."""
    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh(cfg.mesh)
    if cfg.global_batch % batch_multiple(mesh) or cfg.global_batch % jax.process_count():
        raise ConfigError(f"global_batch ({cfg.global_batch}) must be a multiple of data x fsdp "
                          f"({batch_multiple(mesh)}) and of the process count ({jax.process_count()})")
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "experiment.json"), "w", encoding="utf-8") as f:
            json.dump(cfg.to_dict(), f, indent=2, default=str)
    tokenizer, report, batches, eval_rows = _setup_data(cfg)
    log(f"data: {report.summary()}; {batches.rows_per_epoch()} packed rows of {cfg.data.seq_len} tokens per epoch")

    with jax.set_mesh(mesh):
        model = build_model(cfg, mesh)
        graphdef, trainable, frozen = nnx.split(model, trainable_filter(cfg.lora), ...)
        optimizer = make_optimizer(dataclasses.replace(cfg.optimizer, total_steps=cfg.steps))
        param_shardings = jax.tree.map(lambda x: x.sharding, trainable)
        opt_shardings = optax.tree_map_params(
            optimizer, lambda _, s: s, jax.eval_shape(optimizer.init, trainable), param_shardings,
            transform_non_params=lambda _: named_sharding(mesh, ()))
        opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(trainable)

    n_trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
    log(f"model: {model.config.num_params() / 1e6:.2f}M params, training "
        f"{'LoRA adapters' if cfg.lora.enabled else 'all weights'} ({n_trainable / 1e6:.2f}M); "
        f"mesh {dict(mesh.shape)}")
    return _Run(cfg, workdir, mesh, tokenizer, report, batches, eval_rows, model.config, graphdef, trainable,
                frozen, optimizer, opt_state, named_sharding(mesh, ACT["tokens"]), jax.random.key(cfg.seed))


def _setup_data(cfg: TrainConfig):
    """(tokenizer, report, training batches, eval rows or None)."""
    tokenizer = load_tokenizer(cfg)
    report = DataReport()
    examples = load_examples(cfg.data.train_files, tokenizer, kind=cfg.data.format,
                             max_tokens=cfg.data.seq_len + 1, strict=cfg.strict, report=report)
    batches = PackedBatches(examples, seq_len=cfg.data.seq_len, batch_size=cfg.global_batch, seed=cfg.seed,
                            pad_id=tokenizer.pad_token_id, shuffle=cfg.data.shuffle)
    eval_rows = None
    if cfg.data.eval_files and cfg.eval_every:
        eval_examples = load_examples(cfg.data.eval_files, tokenizer, kind=cfg.data.format,
                                      max_tokens=cfg.data.seq_len + 1, strict=cfg.strict)
        eval_rows = PackedBatches(eval_examples, seq_len=cfg.data.seq_len, batch_size=1, seed=0,
                                  pad_id=tokenizer.pad_token_id, shuffle=False)._rows(0)
    return tokenizer, report, batches, eval_rows


def _checkpoint_manager(run: _Run):
    return ocp.CheckpointManager(
        os.path.join(run.workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=run.cfg.keep_checkpoints, enable_async_checkpointing=True),
        item_names=("state", "data"))


def _resume(run: _Run, manager, log) -> int:
    """Restores the latest completed checkpoint (state and data position) into ``run``;
    returns the first step to run."""
    latest = manager.latest_step()
    if latest is None:
        return 1
    abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
    target = {"trainable": abstract(run.trainable), "opt_state": abstract(run.opt_state)}
    restored = manager.restore(latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                               data=ocp.args.JsonRestore()))
    run.trainable, run.opt_state = restored["state"]["trainable"], restored["state"]["opt_state"]
    run.batches.state = DataState(**restored["data"])
    log(f"resumed from step {latest} (data epoch {run.batches.state.epoch}, row {run.batches.state.row})")
    return latest + 1


def _train_step(run: _Run, step: int) -> dict[str, jax.Array]:
    """Dispatches one optimizer step and returns its metrics, still on device: nothing here
    waits for the step to finish."""
    cfg = run.cfg
    batch = _global_batch(run.batches.next(), run.batch_sharding)
    dropout = jax.random.fold_in(run.base_key, step) if cfg.lora.enabled and cfg.lora.dropout else None
    with jax.set_mesh(run.mesh):
        run.trainable, run.opt_state, metrics = train_step(run.graphdef, run.trainable, run.frozen, run.opt_state,
                                                           batch, optimizer=run.optimizer,
                                                           micro_batches=cfg.micro_batches, dropout_key=dropout)
    return metrics


def _after_step(run: _Run, logger: "_StepLog", manager, step: int) -> None:
    """Logs, evaluates and checkpoints where ``step`` calls for it.

    Only these steps wait for the device: each first fetches the losses since the last
    fetch and stops on a non-finite one (`_StepLog.fetch`), so no NaN is logged or saved.
    """
    cfg = run.cfg
    last = step == cfg.steps
    log_now = step % cfg.log_every == 0 or last
    eval_now = run.eval_rows is not None and (step % cfg.eval_every == 0 or last)
    save_now = step % cfg.checkpoint_every == 0 or last
    if log_now or eval_now or save_now:
        logger.fetch(manager)
    record = logger.record(step) if log_now else {"step": step}  # timed before any evaluation
    if eval_now:
        record["eval_loss"] = evaluate(run.graphdef, run.trainable, run.frozen, run.eval_rows,
                                       cfg.global_batch, run.batch_sharding)
    if log_now or eval_now:
        logger.write(record)
    if save_now:
        _save_checkpoint(run, manager, step)
    logger.bar.update(1)


def _save_checkpoint(run: _Run, manager, step: int) -> None:
    """Starts an asynchronous save of the state after ``step`` and of the data position."""
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"trainable": run.trainable, "opt_state": run.opt_state}),
        data=ocp.args.JsonSave(dataclasses.asdict(run.batches.state))))


class _StepLog:
    """The per-step losses, ``metrics.jsonl`` / TensorBoard records and the progress bar.

    Losses stay on device until `fetch` brings all those since the last fetch to the host
    at once, so the loop never waits on a step it has just dispatched. `_after_step`
    fetches at every log, eval and checkpoint step and at the last step: a NaN or Inf
    loss is therefore noticed at the next of these steps (at most ``log_every`` steps
    late), reported with the step where it first occurred, and never saved.
    """

    def __init__(self, run: _Run, start: int, progress: bool):
        cfg = run.cfg
        main = jax.process_index() == 0
        self.run = run
        self.writer = MetricsWriter(run.workdir, resume_step=start - 1, enabled=main)
        self.lr = schedule(dataclasses.replace(cfg.optimizer, total_steps=cfg.steps))
        self.tokens_per_step = cfg.global_batch * cfg.data.seq_len
        self.flops_per_step = flops_per_token(run.model_config, cfg.data.seq_len, cfg.lora.enabled) \
            * self.tokens_per_step
        self.peak = peak_flops_per_device() * jax.device_count()
        self.bar = tqdm(total=cfg.steps, initial=start - 1, desc="train", unit="step",
                        disable=not (progress and main), dynamic_ncols=True)
        self.history: list[tuple[int, float]] = []           # (step, loss), fetched
        self.pending: list[tuple[int, jax.Array]] = []       # (step, loss), still on device
        self.metrics: dict[str, jax.Array] = {}              # the latest step's
        self.last_time, self.timed_steps = time.perf_counter(), 0

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        self.pending.append((step, metrics["loss"]))
        self.metrics = metrics
        self.timed_steps += 1

    def fetch(self, manager) -> None:
        """Moves the pending losses to ``history``; raises `TrainingDiverged` at the first
        non-finite one (after the checkpoints in flight have completed)."""
        losses = jax.device_get([loss for _, loss in self.pending])
        for (step, _), loss in zip(self.pending, losses):
            loss = float(loss)
            if not math.isfinite(loss):
                manager.wait_until_finished()
                good = manager.latest_step()
                raise TrainingDiverged(f"loss is {loss} at step {step}: training stopped; the last good "
                                       f"checkpoint is {'step ' + str(good) if good else 'none'} in "
                                       f"{self.run.workdir}")
            self.history.append((step, loss))
        self.pending.clear()

    def record(self, step: int) -> dict:
        """The log record of ``step`` (just fetched): loss, schedule, throughput since the last one."""
        step_time = (time.perf_counter() - self.last_time) / self.timed_steps
        m = self.metrics
        return {"step": step, "loss": self.history[-1][1], "learning_rate": float(self.lr(step - 1)),
                "grad_norm": float(m["grad_norm"]), "target_tokens": float(m["tokens"]),
                "tokens_per_second": self.tokens_per_step / step_time,
                "mfu": self.flops_per_step / step_time / self.peak}

    def write(self, record: dict) -> None:
        self.writer.write(record)
        if "loss" in record:  # a log step (not an eval-only one): restart the clock
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_second']:.0f}")
            self.last_time, self.timed_steps = time.perf_counter(), 0

    def close(self) -> None:
        self.bar.close()
        self.writer.close()


def _finish(run: _Run, history: list[tuple[int, float]]) -> dict:
    model = nnx.merge(run.graphdef, run.trainable, run.frozen)
    final = export_final(model, run.cfg, run.workdir, run.tokenizer)
    return {"workdir": run.workdir, "final": final, "losses": history, "data": run.report}


def export_final(model, cfg: TrainConfig, workdir: str, tokenizer) -> str:
    """``final/``: the trained (LoRA-merged) model as a jaxlm checkpoint with its tokenizer;
    with LoRA also ``adapter/`` in PEFT's layout."""
    final = os.path.join(workdir, "final")
    if cfg.lora.enabled:
        save_adapter(model, cfg.lora, os.path.join(workdir, "adapter"), base_model=cfg.model.name, overwrite=True)
        model = merge_lora_in_place(model)
    model.save_pretrained(final, overwrite=True)
    if jax.process_index() == 0:
        copy_if_present(os.path.dirname(tokenizer.model_file), final,
                        ("tokenizer.model", "tokenizer_config.json"))
        eos = [tokenizer.eos_token_id, tokenizer.token_to_id("<|im_end|>")]
        with open(os.path.join(final, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos,
                       "pad_token_id": tokenizer.pad_token_id}, f)
    return final


def merge_lora_in_place(model):
    """Folds every adapter into its weight (``W + scale * B @ A``) and drops the factors.

    A quantized base (QLoRA) is dequantized first: the merged model is full precision
    (``param_dtype``), since the merged delta is not representable in the base's int grid.
    """
    if model.options.quantize is not None:
        for proj in quantized_projections(model):
            proj.dequantize_(model.options.param_dtype)
        model.options = model.model.options = dataclasses.replace(model.options, quantize=None,
                                                                  quantize_output=False)
    for _, projections in target_projections(model):
        for proj in projections.values():
            if proj.lora_a is None:
                continue
            a, b, w = proj.lora_a[...], proj.lora_b[...], proj.kernel[...]
            # full float32 products (no TF32/bf16 passes), so the merge rounds like the PEFT/HF
            # export, which adds the same delta on the host
            flat = lambda bb, aa: jnp.matmul(bb.reshape(-1, bb.shape[-1]), aa.reshape(aa.shape[0], -1),
                                             precision=jax.lax.Precision.HIGHEST)
            stacked = a.ndim == proj.in_dims + 2  # [layers, r, *in] under scan_layers
            delta = jax.vmap(flat)(b, a) if stacked else flat(b, a)
            proj.kernel.set_value((w.astype(jnp.float32) + proj.lora_scale * delta.reshape(w.shape)).astype(w.dtype))
            proj.lora_a = None
            proj.lora_b = None
    return model
