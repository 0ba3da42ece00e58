"""The training loop: model, mesh, data, sharded steps, checkpoints, logs.

Running the same command on the same workdir resumes exactly: parameters,
optimizer state, step, data iterator and dropout keys (derived from the seed
and the step) all come back, so the losses after a resume equal those of an
uninterrupted run. Checkpoints are Orbax's: asynchronous, the last N kept, and
a step counts only once its save has completed.
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
from flax import nnx

from jaxlm.errors import ConfigError, JaxlmError
from jaxlm.train.config import TrainConfig
from jaxlm.train.data import DataReport, DataState, PackedBatches, load_examples
from jaxlm.train.lora import apply_lora, save_adapter, trainable_filter
from jaxlm.train.metrics import MetricsWriter, flops_per_token, peak_flops_per_device
from jaxlm.train.step import batch_loss_sum, make_optimizer, schedule, train_step


class TrainingDiverged(JaxlmError):
    """The loss became NaN or Inf."""


# ----------------------------------------------------------------- building
def _model_config(name: str):
    from jaxlm.assets import TINY_DIR
    from jaxlm.config import InternLM2Config

    return InternLM2Config.from_pretrained(TINY_DIR if name == "tiny" else name)


def _is_checkpoint(name: str) -> bool:
    return os.path.isdir(name)


def build_model(cfg: TrainConfig, mesh):
    """The model on the mesh: loaded from a checkpoint, or initialized (preset / tiny)."""
    from jaxlm.checkpoint.loading import param_sharding
    from jaxlm.models.internlm2 import InternLM2ForCausalLM
    from jaxlm.sharding import check_mesh_for_model

    m = cfg.model
    options = dict(dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers, remat=m.remat,
                   attention_impl=m.attention_impl)
    if _is_checkpoint(m.name):
        model = InternLM2ForCausalLM.from_pretrained(m.name, mesh=mesh, **options)
    else:
        config = _model_config(m.name)
        check_mesh_for_model(mesh, config)

        @jax.jit
        def init():  # initialized directly with its sharding: never whole on one device
            model = InternLM2ForCausalLM(config, rngs=nnx.Rngs(cfg.seed), **options)
            state = nnx.state(model)
            shardings = jax.tree.map(lambda v: param_sharding(v, mesh), state,
                                     is_leaf=lambda x: isinstance(x, nnx.Variable))
            return jax.lax.with_sharding_constraint(state, shardings)

        abstract = nnx.eval_shape(lambda: InternLM2ForCausalLM(config, rngs=nnx.Rngs(cfg.seed), **options))
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
    from jaxlm.assets import TINY_DIR
    from jaxlm.tokenizer import InternLM2Tokenizer

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
    import orbax.checkpoint as ocp
    from tqdm import tqdm  # plain text bars (tqdm.auto wants ipywidgets in notebooks)

    from jaxlm.sharding import batch_multiple, make_mesh, named_sharding

    main = jax.process_index() == 0
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh(cfg.mesh)
    if cfg.global_batch % batch_multiple(mesh) or cfg.global_batch % jax.process_count():
        raise ConfigError(f"global_batch ({cfg.global_batch}) must be a multiple of data x fsdp "
                          f"({batch_multiple(mesh)}) and of the process count ({jax.process_count()})")
    if main:
        with open(os.path.join(workdir, "experiment.json"), "w", encoding="utf-8") as f:
            json.dump(cfg.to_dict(), f, indent=2, default=str)

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

    manager = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, enable_async_checkpointing=True),
        item_names=("state", "data"))
    start = 1
    latest = manager.latest_step()
    if latest is not None:
        target = {"trainable": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                            trainable),
                  "opt_state": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                            opt_state)}
        restored = manager.restore(latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                   data=ocp.args.JsonRestore()))
        trainable, opt_state = restored["state"]["trainable"], restored["state"]["opt_state"]
        batches.state = DataState(**restored["data"])
        start = latest + 1
        log(f"resumed from step {latest} (data epoch {batches.state.epoch}, row {batches.state.row})")

    writer = MetricsWriter(workdir, resume_step=start - 1, enabled=main)
    batch_sharding = named_sharding(mesh, ("batch", None))
    lr = schedule(dataclasses.replace(cfg.optimizer, total_steps=cfg.steps))
    tokens_per_step = cfg.global_batch * cfg.data.seq_len
    flops_step = flops_per_token(model.config, cfg.data.seq_len, cfg.lora.enabled) * tokens_per_step
    peak = peak_flops_per_device() * jax.device_count()
    base_key = jax.random.key(cfg.seed)
    bar = tqdm(total=cfg.steps, initial=start - 1, desc="train", unit="step", disable=not (progress and main),
               dynamic_ncols=True)
    history, last_time, timed_steps = [], time.perf_counter(), 0
    try:
        for step in range(start, cfg.steps + 1):
            batch = _global_batch(batches.next(), batch_sharding)
            dropout = jax.random.fold_in(base_key, step) if cfg.lora.enabled and cfg.lora.dropout else None
            with jax.set_mesh(mesh):
                trainable, opt_state, metrics = train_step(graphdef, trainable, frozen, opt_state, batch,
                                                           optimizer=optimizer, micro_batches=cfg.micro_batches,
                                                           dropout_key=dropout)
            loss = float(metrics["loss"])
            timed_steps += 1
            if not math.isfinite(loss):
                manager.wait_until_finished()
                good = manager.latest_step()
                raise TrainingDiverged(f"loss is {loss} at step {step}: training stopped; the last good "
                                       f"checkpoint is {'step ' + str(good) if good else 'none'} in {workdir}")
            history.append((step, loss))
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                step_time = (now - last_time) / timed_steps
                record = {"step": step, "loss": loss, "learning_rate": float(lr(step - 1)),
                          "grad_norm": float(metrics["grad_norm"]), "target_tokens": float(metrics["tokens"]),
                          "tokens_per_second": tokens_per_step / step_time,
                          "mfu": flops_step / step_time / peak}
                if eval_rows is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                    record["eval_loss"] = evaluate(graphdef, trainable, frozen, eval_rows, cfg.global_batch,
                                                   batch_sharding)
                writer.write(record)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_second']:.0f}")
                last_time, timed_steps = time.perf_counter(), 0
            elif eval_rows is not None and cfg.eval_every and step % cfg.eval_every == 0:
                writer.write({"step": step, "eval_loss": evaluate(graphdef, trainable, frozen, eval_rows,
                                                                  cfg.global_batch, batch_sharding)})
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                manager.save(step, args=ocp.args.Composite(
                    state=ocp.args.StandardSave({"trainable": trainable, "opt_state": opt_state}),
                    data=ocp.args.JsonSave(dataclasses.asdict(batches.state))))
            bar.update(1)
        manager.wait_until_finished()
    finally:
        bar.close()
        writer.close()
        manager.close()

    model = nnx.merge(graphdef, trainable, frozen)
    final = export_final(model, cfg, workdir, tokenizer)
    return {"workdir": workdir, "final": final, "losses": history, "data": report}


def export_final(model, cfg: TrainConfig, workdir: str, tokenizer) -> str:
    """``final/``: the trained (LoRA-merged) model as a jaxlm checkpoint with its tokenizer;
    with LoRA also ``adapter/`` in PEFT's layout."""
    from jaxlm.files import copy_if_present

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
    """Folds every adapter into its weight (``W + scale * B @ A``) and drops the factors."""
    from jaxlm.train.lora import target_projections

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
