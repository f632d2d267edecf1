"""QLoRA / LoRA supervised fine-tuning on accelerate, with the family plugin making every
family-specific decision (template, labels, targets, stop ids, loading).

The batch order is a pure function of (seed, epoch), so a checkpoint's data position is two
integers and ``--resume`` continues exactly where the run stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from pathlib import Path
from typing import Any

from famtune import attention, distributed, kernels, run_state, runlock, schedule, tracking
from famtune import checkpoint as ckpt_mod
from famtune import packing as packing_mod
from famtune.adapters import AdapterRun, adapter_settings, rank_distribution
from famtune.adapters import describe as describe_adapter
from famtune.backends import training_policy
from famtune.callbacks import Callbacks
from famtune.encoding import IGNORE_INDEX
from famtune.errors import FamtuneError
from famtune.evaluate.training import score_during_training
from famtune.loss import causal_lm_loss
from famtune.metadata import build_metadata, write_metadata
from famtune.recipe import Recipe
from famtune.samples import Sample, prepare_samples


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed * 100003 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def collate(samples: list[Sample], pad_id: int, device) -> dict[str, Any]:
    import torch

    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def resolve_packing(setting: Any, family) -> bool:
    """The recipe's ``packing`` against what the family's model can keep apart."""
    if setting is False:
        return False
    if family.supports_packing():
        return True
    if setting is True:
        raise FamtuneError(
            f"packing: true, but {family.info.describe()} says family {family.name} cannot keep packed "
            "samples apart (its attention ignores restarting position ids); set packing: false or auto"
        )
    return False


def supervised_count(batch: dict[str, Any]) -> int:
    # The causal-LM loss shifts labels by one: position 0's label is never predicted.
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class Trainer:
    def __init__(self, recipe: Recipe, resume: str | bool | None = None, log=print, overwrite: bool = False) -> None:
        self.recipe = recipe
        self.resume = resume
        self.overwrite = overwrite
        self.resume_state: dict[str, Any] | None = None
        self.skipped_steps: list[int] = []
        self.log = log
        self.out = Path(recipe.output_dir)

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        from accelerate.utils import set_seed

        r = self.recipe
        self.accelerator = distributed.make_accelerator(
            r, **tracking.accelerator_kwargs(r.report_to, str(Path(r.output_dir) / tracking.TENSORBOARD_DIR))
        )
        self.dp = distributed.DataParallel.of(self.accelerator)
        if not self.dp.main:  # one voice: rank 0 speaks for the run
            self.log = lambda *args, **kwargs: None
        self.device_policy = training_policy(self.accelerator.device)
        set_seed(r.seed)
        self.ckpt = ckpt_mod.open_checkpoint(r.model, family=r.family, trust_remote_code=r.trust_remote_code)
        self.family = self.ckpt.family
        self.tokenizer = self.ckpt.load_tokenizer()
        policies = self.family.masking_policies()
        self.masking = r.masking or policies[0]
        if self.masking not in policies:
            raise FamtuneError(
                f"masking {self.masking!r} is not offered by {self.family.info.describe()} for "
                f"{self.family.name}; choose one of {', '.join(policies)}"
            )
        self.conversation = self.family.conversation_template()
        self.generation = self.family.generation_defaults(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.generation.stop_ids[0]
        self.log(
            f"model: {r.model} -> {self.family.info.describe()}, family {self.family.name}, "
            f"template {self.conversation.name}, masking {self.masking}"
        )

        self.train_samples, self.eval_samples, self.report = prepare_samples(
            r, self.family, self.tokenizer, self.masking
        )
        for line in self.report.lines():
            self.log(line)

        self.packing = resolve_packing(r.packing, self.family)
        self._lengths = [len(s) for s in self.train_samples]
        if self.packing:
            rows = len(packing_mod.best_fit_decreasing(self._lengths, r.max_length))
            self.log(
                f"packing: {len(self.train_samples)} samples into {rows} rows of up to {r.max_length} tokens "
                f"({sum(self._lengths) / max(rows * r.max_length, 1):.0%} full)"
            )
        else:
            rows = len(self.train_samples)
            self.log("packing: off" + (f" ({self.family.name} does not support it)" if r.packing == "auto" else ""))

        self.micro_per_epoch = self.dp.global_micro_batches(rows, r.batch_size)
        if self.dp.world > 1:
            self.log(
                f"distributed: {self.dp.world} processes x batch {r.batch_size} "
                f"({self.accelerator.distributed_type.value}, {r.distributed}, {self.accelerator.device.type})"
            )
        self.steps_per_epoch = max(1, math.ceil(self.micro_per_epoch / r.grad_accum))
        self.total_steps = r.max_steps if r.max_steps > 0 else max(1, math.ceil(r.epochs * self.steps_per_epoch))
        # The adapter method needs the real step count (AdaLoRA's schedule) before it is built.
        self.adapters = AdapterRun(r, self.total_steps, self.out, self.log)
        self.model = self._build_model()
        self.optimizer = self.adapters.optimizer(self.model)
        self._plan_schedule()
        self.scheduler = schedule.build_scheduler(
            self.optimizer, self.warmup_steps, self.schedule_total, self.schedule_segments
        )
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(
            self.model, self.optimizer, self.scheduler
        )

    def epoch_units(self, epoch: int) -> list[Any]:
        """One epoch's training order: sample indices, or rows of sample indices when packing.
        Every process computes the same list; ``self.dp`` gives each its share."""
        r = self.recipe
        if self.packing:
            return packing_mod.epoch_rows(self._lengths, r.max_length, r.seed, epoch)
        return [i for batch in epoch_batches(len(self.train_samples), r.batch_size, r.seed, epoch) for i in batch]

    def _collate(self, spec: list[Any]) -> tuple[dict[str, Any], int]:
        """A micro-batch and its number of real (non-pad) tokens."""
        device = self.accelerator.device
        if self.packing:
            rows = [[self.train_samples[i] for i in row] for row in spec]
            return (
                packing_mod.collate_packed(rows, self.pad_id, device, self.attention.wants_boundaries),
                sum(self._lengths[i] for row in spec for i in row),
            )
        return collate([self.train_samples[i] for i in spec], self.pad_id, device), sum(self._lengths[i] for i in spec)

    def _build_model(self):
        from peft import prepare_model_for_kbit_training

        from famtune.plugins import validate_targets

        r = self.recipe
        self.nf4_settings = distributed.quantization_settings(r)
        model = self.ckpt.load_model(
            r.quantization, r.compute_dtype, device=self.accelerator.device, quantization_config=self.nf4_settings
        )
        self.ckpt.check_vocabulary(model)
        model.config.use_cache = False
        self.attention = attention.choose(model, self.packing, self.accelerator.device, r.compute_dtype)
        self.log(f"attention: {self.attention.path} ({self.attention.why})")
        if r.quantization == "nf4":
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=r.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        elif r.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        if isinstance(r.lora_targets, str) and r.lora_targets in ("default", "all-linear"):
            targets = self.family.lora_target_modules(model, r.lora_targets)
        else:
            targets = r.lora_targets if isinstance(r.lora_targets, list) else [r.lora_targets]
            validate_targets(targets, model, lambda why: FamtuneError(f"recipe lora_targets: {why}"))
        self.targets = targets
        model = self.adapters.attach(
            model, targets, quantized=r.quantization == "nf4", is_main=self.accelerator.is_main_process
        )
        self.kernels = {"lora_dropout_replaced": kernels.use_fast_lora_dropout(model), "half_matmul_widened": 0}
        if r.quantization == "nf4":
            from famtune.checkpoint import resolve_dtype

            widen, why = kernels.resolve_half_matmul(
                r.half_matmul, self.accelerator.device, resolve_dtype(r.compute_dtype)
            )
            if widen:
                self.kernels["half_matmul_widened"] = kernels.widen_4bit_matmuls(model)
            self.log(why)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        self.param_counts = {"trainable": n_train, "total": n_all}
        self.log(
            f"adapter: {describe_adapter(r)} on {', '.join(targets)}; "
            f"{n_train:,} trainable of {n_all:,} parameters ({r.quantization} base)"
        )
        return model

    # -- evaluation ----------------------------------------------------------------------------
    def eval_loss(self) -> float | None:
        import torch

        if not self.eval_samples:
            return None
        self.model.eval()
        total, count = 0.0, 0
        size = self.recipe.batch_size
        with torch.no_grad():
            for k in self.dp.eval_batches(math.ceil(len(self.eval_samples) / size)):
                i = (k or 0) * size
                batch = collate(self.eval_samples[i : i + size], self.pad_id, self.accelerator.device)
                n = supervised_count(batch)
                loss = float(causal_lm_loss(self.model, batch, max(n, 1)))
                if k is not None:
                    total += loss * n
                    count += n
        total_all, count_all = self.dp.sum([total, count])
        self.model.train()
        return total_all / max(count_all, 1)

    def generate(self, prompts: list[str]) -> list[dict[str, str]]:
        import torch

        if not prompts:
            return []
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        model.config.use_cache = True
        answers = []
        with torch.no_grad():
            for prompt in prompts:
                messages = [{"role": "user", "content": prompt}]
                if self.recipe.system is not None:
                    messages.insert(0, {"role": "system", "content": self.recipe.system})
                enc = self.family.encode(self.tokenizer, messages, "all_assistant", add_generation_prompt=True)
                ids = torch.tensor([enc.input_ids], device=self.accelerator.device)
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=self.recipe.max_new_tokens,
                    eos_token_id=self.generation.stop_ids,
                    pad_token_id=self.pad_id,
                )
                new = [t for t in out[0, ids.shape[1] :].tolist() if t not in self.generation.stop_ids]
                answers.append({"input": prompt, "output": self.tokenizer.decode(new, skip_special_tokens=True)})
        model.config.use_cache = False
        model.train()
        return answers

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from famtune.validate import check_paths

        check_paths(self.recipe, "the recipe")  # before any model loads
        with runlock.RunDirectory(self.recipe, self.resume, self.overwrite, self.log) as self.run_dir:
            if self.resume:
                self.state_dir = run_state.find_checkpoint(self.out, self.resume, self.log)
                self.resume_state = run_state.read_trainer_state(self.state_dir)
                self.run_dir.verify_checkpoint(self.resume_state, self.state_dir)
            return self._run_locked()

    def _run_locked(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        r = self.recipe
        self.setup()
        self.out.mkdir(parents=True, exist_ok=True)
        callbacks = Callbacks(r)  # plugins' trackers (famtune_training_callbacks)
        callbacks.on_train_begin(
            {"family": self.family.describe(), "total_steps": self.total_steps, "output_dir": str(self.out)}
        )
        metrics = run_state.MetricsLog(self.out / "metrics.jsonl", enabled=self.accelerator.is_main_process)
        step, epoch, pos = 0, 0, 0  # pos: units (samples or packed rows) of the epoch consumed so far
        if self.resume:
            state_dir = self.state_dir
            self.adapters.check_resume(state_dir)
            step, epoch, batch_in_epoch = run_state.load_checkpoint(
                state_dir, self.model, self.optimizer, self.scheduler, self.accelerator
            )
            pos = distributed.data_position(state_dir, batch_in_epoch, r.batch_size)
            self.adapters.restore(state_dir, self.accelerator.unwrap_model(self.model))
            metrics.truncate_after(step)
            self.log(f"resumed from {state_dir} at step {step} (epoch {epoch}, sample {pos})")
        else:
            metrics.reset()
            score_during_training(self, "base")
            before = self.generate(r.evaluation_inputs)
            if before:
                metrics.write({"step": 0, "generations": before})
                for g in before:
                    self.log(f"[step 0] {g['input']!r} -> {g['output']!r}")
        self.model.train()
        # A bar only on an interactive terminal; elsewhere (or with progress: false) a plain line per
        # logging step, so log files get readable lines instead of one line of carriage returns.
        use_bar = self.accelerator.is_local_main_process and tracking.progress_bar_wanted(r.progress)
        print_lines = self.accelerator.is_main_process and not use_bar
        bar = tqdm(
            total=self.total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True, disable=not use_bar
        )
        self.tracker = tracking.RunTracker(self.accelerator, r, run_name=self.out.resolve().name)
        t_start, tokens_seen, last_loss = time.perf_counter(), 0, float("nan")
        self.counts = {"tokens_total": 0, "tokens_supervised": 0}
        with run_state.StopOnInterrupt() as stop:
            while step < self.total_steps and not stop.requested:
                units = self.epoch_units(epoch)
                while pos < len(units) and step < self.total_steps and not stop.requested:
                    group, pos = self.dp.step_batches(units, pos, r.batch_size, r.grad_accum)
                    step_loss, step_tokens = self._optimizer_step(group, step)
                    step += 1
                    tokens_seen += step_tokens
                    last_loss = step_loss
                    elapsed = time.perf_counter() - t_start
                    lr = self.last_lr
                    bar.update(1)
                    bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_seen / elapsed:.0f}")
                    if step % max(r.logging_steps, 1) == 0 or step == self.total_steps:
                        record = {
                            "step": step,
                            "epoch": epoch,
                            "loss": step_loss,
                            "lr": lr,
                            "grad_norm": self.last_grad_norm,
                            "tokens_per_s": tokens_seen / elapsed,
                            "elapsed_s": elapsed,
                        }
                        metrics.write(record)
                        self.tracker.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step)
                        callbacks.on_log(step, record)
                        if print_lines:
                            self.log(
                                tracking.progress_line(
                                    step, self.total_steps, step_loss, lr, tokens_seen / elapsed, elapsed
                                )
                            )
                    if r.eval_steps and step % r.eval_steps == 0 and step < self.total_steps:
                        self._evaluate(step, metrics, bar)
                    if r.save_steps and step % r.save_steps == 0 and step < self.total_steps:
                        self._save_checkpoint(step, epoch, pos)
                if pos >= len(units):
                    epoch, pos = epoch + 1, 0
        if stop.requested and step < self.total_steps:
            bar.close()
            self.tracker.finish()
            path = self._save_checkpoint(step, epoch, pos)
            raise FamtuneError(
                f"interrupted at step {step}/{self.total_steps} ({stop.signal_name}); state saved in {path}; "
                f"continue with: famtune train RECIPE --resume"
            )
        bar.close()
        train_wall = time.perf_counter() - t_start
        final = self._evaluate(step, metrics, None)
        task_eval = score_during_training(self, "tuned")
        self.tracker.finish()
        self._save_final_or_rescue(metrics, step, epoch, pos)
        self.counts = {k: int(v) for k, v in zip(self.counts, self.dp.sum(list(self.counts.values())))}
        summary = {
            "steps": step,
            "final_loss": last_loss,
            "eval_loss": final.get("eval_loss"),
            "train_wall_s": train_wall,
            "tokens_per_s": tokens_seen / train_wall if train_wall else None,
            "tokens_nonpad": tokens_seen,
            **self.counts,
            "parameters": self.param_counts,
            "data": self.report.to_dict(),
            "output_dir": str(self.out),
            "peak_rss_mib": run_state.peak_rss_mib(),
            "peak_accelerator_mib": run_state.peak_accelerator_mib(),
            "family": self.family.describe(),
            "kernels": self.kernels,
            "attention": self.attention.as_dict(),
            "device_policy": self.device_policy.as_dict(),
            "processes": self.dp.world,
        }
        if task_eval:
            summary["task_eval"] = task_eval
        summary["adapter"] = adapter_settings(r)
        if self.skipped_steps:
            summary["skipped_steps"] = self.skipped_steps
        if self.dp.main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            from famtune.modelcard import write_model_card

            write_model_card(self.out)  # after summary.json: the card quotes its losses
        self.run_dir.finish()
        callbacks.on_train_end(summary)
        self.log(
            f"done: {step} steps, final loss {last_loss:.4f}"
            + (f", eval loss {final['eval_loss']:.4f}" if final.get("eval_loss") is not None else "")
            + f"; adapter in {self.out}"
        )
        return summary

    def _save_checkpoint(self, step: int, epoch: int, pos: int) -> Path:
        # The data position is saved in units, which mean the same for any number of processes.
        global_micro = -(-pos // (self.recipe.batch_size * self.dp.world))
        model = self.accelerator.unwrap_model(self.model)
        with self.adapters.saving_checkpoint(model):
            # the adapter's own state goes in before the manifest, so the checkpoint proves it too
            return run_state.save_checkpoint(
                self.out,
                step,
                epoch,
                global_micro,
                self.model,
                self.optimizer,
                self.scheduler,
                self.accelerator,
                self._checkpoint_fields(pos),
                write_extra=lambda d: self.adapters.save_state(d, model),
            )

    def _optimizer_step(self, group: list[distributed.MicroBatch], step_index: int) -> tuple[float, int]:
        import torch

        r = self.recipe
        # Names the step's phases for a profiler (bench/train_throughput.py --profile).
        phase = torch.profiler.record_function
        with phase("famtune.collate"):
            batches, real = zip(*(self._collate(b.units) for b in group))
        for b, batch in zip(group, batches):
            if not b.real:
                batch["labels"].fill_(IGNORE_INDEX)
        real = [n if b.real else 0 for b, n in zip(group, real)]
        # Weight every supervised token equally across the accumulated micro-batches and all
        # processes: each rank divides its summed loss by the step's total count over the world,
        # times the world size because the gradient all-reduce averages.
        n_local = sum(supervised_count(b) for b in batches)
        (n_items,) = self.dp.sum([n_local])
        n_items_t = torch.tensor(max(n_items, 1) / self.dp.world, device=self.accelerator.device)
        total_loss, tokens, padded = 0.0, 0, 0
        for k, batch in enumerate(batches):
            sync = k == len(batches) - 1
            ctx = self.accelerator.no_sync(self.model) if not sync else contextlib.nullcontext()
            with ctx:
                with phase("famtune.forward"):
                    loss = causal_lm_loss(self.model, batch, n_items_t)
                regulariser = self.adapters.take_regulariser()  # AdaLoRA's; once per step, not logged
                with phase("famtune.backward"):
                    self.accelerator.backward(loss if regulariser is None else loss + regulariser / len(batches))
            total_loss += float(loss.detach())
            tokens += real[k]
            padded += int(batch["input_ids"].numel()) if group[k].real else 0
        self.counts["tokens_total"] += padded
        self.counts["tokens_supervised"] += n_local
        if self.dp.world > 1:
            total_loss, tokens_all = self.dp.sum([total_loss / self.dp.world, tokens])
            tokens = int(tokens_all)
        with phase("famtune.clip_grad"):
            self.last_grad_norm = float(
                self.accelerator.clip_grad_norm_(
                    [p for p in self.model.parameters() if p.requires_grad], r.max_grad_norm
                )
            )
        self.last_lr = self.scheduler.get_last_lr()[0]  # the rate this step used
        if not (math.isfinite(total_loss) and math.isfinite(self.last_grad_norm)):
            self._skip_or_stop_non_finite(group, total_loss)  # raises under nan_policy: stop
            return total_loss, tokens
        with phase("famtune.optimizer"):
            self.optimizer.step()
            self.adapters.after_optimizer_step(self.accelerator.unwrap_model(self.model), step_index)
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return total_loss, tokens

    def _evaluate(self, step: int, metrics, bar) -> dict[str, Any]:
        record: dict[str, Any] = {"step": step}
        loss = self.eval_loss()
        if loss is not None:
            record["eval_loss"] = loss
            self.tracker.log({"eval/loss": loss}, step)
        gens = self.generate(self.recipe.evaluation_inputs)
        if gens:
            record["generations"] = gens
        if len(record) > 1:
            metrics.write(record)
            write = bar.write if bar is not None and not bar.disable else self.log
            if loss is not None:
                write(f"[step {step}] eval loss {loss:.4f}")
            for g in gens:
                write(f"[step {step}] {g['input']!r} -> {g['output']!r}")
        return record

    def _save_final(self, metrics) -> None:
        import yaml

        state = distributed.full_state_dict(self.accelerator, self.model)  # all ranks gather a sharded model
        if not self.accelerator.is_main_process:
            return
        model = self.accelerator.unwrap_model(self.model)
        if state is not None:  # a sharded model: its gathered weights, as a plain LoRA adapter
            run_state.save_adapter(self.out, lambda target: model.save_pretrained(target, state_dict=state))
        else:
            run_state.save_adapter(self.out, lambda target: self.adapters.save_final(model, target))
        meta = build_metadata(
            family=self.family,
            template_name=self.conversation.name,
            generation=self.generation,
            base_model=self.recipe.model,
            base_path=self.ckpt.path,
            quantization=self.recipe.quantization,
            compute_dtype=self.recipe.compute_dtype,
            masking=self.masking,
            max_length=self.recipe.max_length,
            system=self.recipe.system,
        )
        meta["lora_targets"] = list(self.targets)
        if self.nf4_settings:  # the preset's 4-bit storage dtype, so merge rebuilds the same base
            meta["quantization_config"] = self.nf4_settings
        meta["adapter"] = adapter_settings(self.recipe)
        pattern = self.adapters.rank_pattern(model)
        if pattern is not None:
            meta["adapter"]["ranks"] = rank_distribution(pattern)
        write_metadata(self.out, meta)
        (self.out / "recipe.yaml").write_text(
            yaml.safe_dump(self.recipe.to_dict(), sort_keys=False, allow_unicode=True)
        )
        run_state.plot_losses(metrics.path, self.out / "loss.png")

    # -- hardening: schedule, checkpoints' identity, non-finite steps, a final save that loses nothing
    def _plan_schedule(self) -> None:
        """Warmup, last step and extension segments; a changed step budget on resume adds a segment."""
        r, state = self.recipe, self.resume_state
        self.warmup_steps = math.ceil(r.warmup_ratio * self.total_steps)
        self.schedule_total, self.schedule_segments = self.total_steps, []
        if not state or "total_steps" not in state:
            return
        self.warmup_steps, self.schedule_total = state["warmup_steps"], state["total_steps"]
        self.schedule_segments = [list(s) for s in state.get("schedule", [])]
        old_end = self.schedule_segments[-1][2] if self.schedule_segments else self.schedule_total
        if self.total_steps != old_end:
            if self.total_steps <= state["step"]:
                raise FamtuneError(
                    f"--resume: the step budget is now {self.total_steps} steps but the checkpoint is "
                    f"at step {state['step']}; raise max_steps or epochs"
                )
            self.schedule_segments = schedule.extend(
                self.schedule_segments, state["step"], self.warmup_steps, self.schedule_total, self.total_steps
            )
            self.log(
                f"step budget {old_end} -> {self.total_steps}: from step {state['step']} the learning rate "
                "decays by cosine from its current value to 0 at the new last step"
            )

    def _checkpoint_fields(self, pos: int) -> dict[str, Any]:
        # units_in_epoch: the data position, the same for any number of processes
        return {
            **self.run_dir.checkpoint_fields(),
            "units_in_epoch": pos,
            "total_steps": self.schedule_total,
            "warmup_steps": self.warmup_steps,
            "schedule": self.schedule_segments,
            "skipped_steps": self.skipped_steps,
        }

    def _skip_or_stop_non_finite(self, group: list[Any], loss: float) -> None:
        """nan_policy on a non-finite loss or gradient norm: stop with the culprits, or skip the update."""
        step = getattr(self.scheduler, "scheduler", self.scheduler).last_epoch + 1  # accelerate wraps it
        # this rank's samples (a packed row is a list of sample indices; stand-in batches hold no real ones)
        flat = [
            i
            for micro in group
            if micro.real
            for item in micro.units
            for i in (item if isinstance(item, list) else [item])
        ]
        where = ", ".join(f"{self.train_samples[i].source}:{self.train_samples[i].line}" for i in flat[:5])
        what = (
            f"step {step}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
            f"(loss {loss}, grad norm {self.last_grad_norm}) on samples {flat[:5]} ({where})"
        )
        self.optimizer.zero_grad(set_to_none=True)
        if self.recipe.nan_policy == "skip_step":
            self.skipped_steps.append(step)
            self.log(f"famtune: warning: {what}; update skipped (nan_policy: skip_step)")
            self.scheduler.step()  # the schedule stays aligned with the step count
            return
        kept = run_state.checkpoint_dirs(self.out)
        raise FamtuneError(
            f"{what}; nothing of this step was applied"
            + (f", the last good checkpoint is {kept[0]}" if kept else "")
            + "; lower learning_rate or check those records, or set nan_policy: skip_step"
        )

    def _save_final_or_rescue(self, metrics, step: int, epoch: int, pos: int) -> None:
        """The final save; if it fails, the trained state goes to a checkpoint so nothing is lost."""
        from famtune import durable

        try:
            self._save_final(metrics)
        except Exception as exc:
            if not isinstance(exc, OSError) and not durable.is_disk_full(exc):
                raise
            why = "disk full" if durable.is_disk_full(exc) else f"{type(exc).__name__}: {exc}"
            rescue = self._rescue_checkpoint(step, epoch, pos)
            kept = (
                (
                    f"the trained state is kept in {rescue}; free space, then finish with: famtune train RECIPE "
                    f"--resume {rescue}"
                )
                if rescue
                else "no checkpoint could be written either"
            )
            raise FamtuneError(f"final save to {self.out} failed ({why}); {kept}") from None

    def _rescue_checkpoint(self, step: int, epoch: int, pos: int):
        import tempfile

        global_micro = -(-pos // (self.recipe.batch_size * self.dp.world))
        for root in (self.out, Path(tempfile.gettempdir()) / f"famtune-rescue-{self.run_dir.run['run_id']}"):
            try:
                return run_state.save_checkpoint(
                    root,
                    step,
                    epoch,
                    global_micro,
                    self.model,
                    self.optimizer,
                    self.scheduler,
                    self.accelerator,
                    self._checkpoint_fields(pos),
                )
            except (FamtuneError, OSError):
                continue
        return None


def train(recipe: Recipe, resume: str | bool | None = None, log=print, overwrite: bool = False) -> dict[str, Any]:
    return Trainer(recipe, resume=resume, log=log, overwrite=overwrite).run()
