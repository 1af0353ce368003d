"""``VLMModule``: the one LightningModule every connector family shares (loss, optim, freezing)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from torch import nn

from vlm_lit.models.backbones import build_backbones
from vlm_lit.models.base import BaseVLM, VLMOutput
from vlm_lit.models.freezing import (
    LoraSettings,
    apply_freezing,
    check_vision_mode,
    count_parameters,
    flat_parameter_counts,
    frozen_components,
    get_preset,
    print_parameter_table,
    set_frozen_eval,
)
from vlm_lit.models.language import enable_gradient_checkpointing
from vlm_lit.models.loss import count_supervised, summed_cross_entropy
from vlm_lit.models.optim import build_optimizer, warmup_cosine
from vlm_lit.reliability.ddp import has_images, unused_parameter_anchor
from vlm_lit.reliability.token_mean import TokenMean

#: Seed of randomly initialised backbones (``size="tiny"`` or ``{"config": ...}`` specs).
BACKBONE_SEED = 0


class VLMModule(L.LightningModule):
    """Vision tower -> connector -> causal LM, trained with one loss / optimizer / freezing.

    Subclasses set ``family`` and implement :meth:`build_model`, which only says how the vision
    features reach the LM. Every constructor argument is a plain type, so ``LightningCLI``
    turns them into ``--model.*`` flags and ``save_hyperparameters`` lets
    ``load_from_checkpoint`` rebuild the module.

    Args:
        vision: vision tower spec, ``{"backend": "open_clip" | "hf", **kwargs}`` for
            ``build_vision_tower`` (e.g. ``{"backend": "open_clip", "model_cfg": {...},
            "pretrained": "/path/clip.safetensors"}``). ``None`` only with ``size="tiny"``.
        language_model: ``{"path": DIR}`` (a local transformers model + tokenizer) or
            ``{"config": {...}, "tokenizer": DIR}``; extra keys go to ``build_language_model``.
            ``None`` only with ``size="tiny"``.
        connector_kwargs: keyword arguments of the family's connector (see the subclass),
            e.g. ``{"num_queries": 32}`` for the Q-Former.
        freeze: freezing preset, one of ``FREEZE_PRESETS`` (``align``, ``lora``, ``full``).
        vision_mode: ``frozen``, ``lora`` or ``full`` training of the vision tower.
        lr_connector: peak learning rate of the connector (and of new token rows unless the
            whole LM trains).
        lr_lm: peak learning rate of the LM (its LoRA adapters under ``freeze=lora``).
        lr_vision: peak learning rate of the vision tower (or its LoRA adapters).
        lr_gates: Flamingo only: peak learning rate of the tanh gates; ``None`` trains them
            at ``lr_connector``. A closed gate (alpha = 0) passes no gradient to the block
            behind it, and the gate's own gradient is noise until that block is useful, so
            in a short run the gates can stay closed (shapes world, 800 steps at 2e-3:
            |alpha| < 0.01). A larger gate rate makes them wander further (at 5e-2 a gate
            opened in one run of two); ``gate_init`` > 0 was the reliable fix there.
        weight_decay: AdamW decay of matrices; never applied to norms, biases, gates and
            embedding rows.
        betas: AdamW betas.
        warmup_steps: linear warmup steps from 0 to the peak learning rates.
        max_steps: length of the cosine decay; ``None`` uses the trainer's
            ``estimated_stepping_batches``.
        min_lr_ratio: the cosine ends at ``min_lr_ratio * peak``.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (scale = alpha / r).
        lora_dropout: dropout on the LoRA branch.
        lora_target_modules: LM module names for LoRA; ``None`` auto-detects per family
            (``q_proj,k_proj,v_proj,o_proj`` for Llama-like, ``c_attn,c_proj`` for GPT-2, ...).
        lora_vision_target_modules: vision module names for ``vision_mode=lora``; ``None``
            auto-detects.
        lora_on_xattn: Flamingo only: LoRA on the cross-attention blocks' linears.
        gradient_checkpointing: activation checkpointing in the LM (non-reentrant).
        size: ``"tiny"`` fills unset ``vision``/``language_model``/``connector_kwargs`` with a tiny
            random model and an in-code tokenizer (no files, seconds on a CPU).
        seed: seed of what training creates (connector, LoRA adapters); random backbones
            (tiny / config-only) always use ``BACKBONE_SEED``, like fixed pretrained weights.
        attn_implementation: the LM's attention kernel (``sdpa``, ``eager``, ...).
        trust_remote_code: allow custom modelling code from the LM directory (off by default).
        init_from: a previous stage's ``save_pretrained`` directory (same family and backbones)
            whose trained tensors (connector, new token rows, trained LM weights) initialise this
            model: the two-stage recipe, align then finetune.
    """

    family: ClassVar[str] = ""

    def __init__(
        self,
        vision: dict[str, Any] | None = None,
        language_model: dict[str, Any] | None = None,
        connector_kwargs: dict[str, Any] | None = None,
        freeze: str = "align",
        vision_mode: Literal["frozen", "lora", "full"] = "frozen",
        lr_connector: float = 1e-3,
        lr_lm: float = 2e-5,
        lr_vision: float = 2e-6,
        lr_gates: float | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | None = None,
        lora_vision_target_modules: list[str] | None = None,
        lora_on_xattn: bool = False,
        gradient_checkpointing: bool = False,
        size: Literal["tiny"] | None = None,
        seed: int = 0,
        attn_implementation: str = "sdpa",
        trust_remote_code: bool = False,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        get_preset(freeze)  # fail fast, before any weight is loaded
        check_vision_mode(vision_mode)
        self.save_hyperparameters()
        with torch.random.fork_rng(devices=[]):
            # Random (tiny / config-only) backbones stand in for pretrained weights, so they
            # do not depend on `seed`: a different seed only re-draws what training creates.
            torch.manual_seed(BACKBONE_SEED)
            parts = build_backbones(
                self.family,
                vision=vision,
                language_model=language_model,
                connector=connector_kwargs,
                size=size,
                attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
            )
            self.tokenizer = parts.tokenizer
            torch.manual_seed(seed)
            self.model: BaseVLM = self.build_model(
                parts.vision, parts.language_model, parts.image_token_id, parts.connector
            )
            apply_freezing(
                self.model,
                freeze,
                vision_mode,
                new_token_ids=parts.new_token_ids,
                lora=LoraSettings(
                    r=lora_r,
                    alpha=lora_alpha,
                    dropout=lora_dropout,
                    target_modules=lora_target_modules,
                    vision_target_modules=lora_vision_target_modules,
                ),
                lora_on_xattn=lora_on_xattn,
            )
        self.new_token_ids = list(parts.new_token_ids)
        if init_from is not None:
            from vlm_lit.models.serialization import init_from_pretrained

            init_from_pretrained(self, init_from)
        if gradient_checkpointing:
            # Non-reentrant, with input grads: reentrant checkpoints over a frozen embedding
            # silently give LoRA / the connector no gradient (PITFALLS: LoRA / peft).
            enable_gradient_checkpointing(self.model.language_model)
        self._frozen = frozen_components(freeze, vision_mode)
        # Token-weighted epoch losses (non-persistent state: checkpoints are unchanged).
        self._loss_means = nn.ModuleDict({"val": TokenMean(), "test": TokenMean()})
        self.train()

    # --- the family hook -------------------------------------------------------------------

    def build_model(
        self,
        vision: nn.Module,
        language_model: nn.Module,
        image_token_id: int,
        connector: dict[str, Any],
    ) -> BaseVLM:
        """Assemble the family's plain model from built backbones and connector kwargs."""
        raise TypeError(
            f"{type(self).__name__} is the shared base; build a family instead: "
            "MLPProjectorVLM, QFormerVLM, FlamingoVLM or build_vlm(connector=...)."
        )

    # --- components ------------------------------------------------------------------------

    @property
    def vision(self) -> nn.Module:
        """The vision tower (``forward(pixel_values (N,3,H,W)) -> (N, P, D_v)``)."""
        return self.model.vision

    @property
    def connector(self) -> nn.Module:
        """The connector (Flamingo: ``ModuleDict(resampler=..., xattn=...)``)."""
        return self.model.connector

    @property
    def language_model(self) -> nn.Module:
        """The transformers causal LM (under LoRA: the same object with adapters injected)."""
        return self.model.language_model

    def train(self, mode: bool = True) -> VLMModule:
        """Switch modes, keeping frozen components in eval mode (dropout off)."""
        super().train(mode)
        if mode and "model" in self._modules:
            set_frozen_eval(self.model, self._frozen, self.hparams.gradient_checkpointing)
        return self

    # --- loss ------------------------------------------------------------------------------

    def _step_denominator(self, batch: dict[str, Any]) -> tuple[torch.Tensor | None, int]:
        """Supervised tokens of the whole optimizer step over all ranks, and the world size.

        Only in training with ``step_supervised_tokens`` present; otherwise (None, 1): the
        batch's own token mean. See ``vlm_lit.models.loss`` for the derivation.
        """
        if not self.training or "step_supervised_tokens" not in batch:
            return None, 1
        step = torch.as_tensor(batch["step_supervised_tokens"], device=self.device).long()
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return step, 1
        return trainer.strategy.reduce(step, reduce_op="sum"), trainer.world_size

    def _run(self, batch: dict[str, Any]) -> tuple[VLMOutput, torch.Tensor, torch.Tensor]:
        """Forward + loss; also returns the summed CE and this batch's supervised count."""
        out = self.model(
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("pixel_values"),
            batch.get("image_sample_index"),
            batch.get("labels"),
            # packed rows (--data.packing): samples attend only within themselves
            **{k: batch[k] for k in ("segment_ids", "position_ids") if k in batch},
        )
        labels = out.labels if out.labels is not None else batch["labels"]
        summed = summed_cross_entropy(out.logits, labels)
        count = count_supervised(labels)
        denom, world = self._step_denominator(batch)
        if denom is None:
            denom = count
        out.loss = summed * world / denom.to(summed.device).float().clamp(min=1.0)
        if self.training and not has_images(batch):
            # Text-only batch: vision/connector never ran; a zero-valued term gives their
            # trainable tensors a (zero) gradient so plain DDP works (vlm_lit.reliability.ddp).
            anchor = unused_parameter_anchor(self.model)
            if anchor is not None:
                out.loss = out.loss + anchor.to(out.loss.device)
        return out, summed, count

    def forward(self, batch: dict[str, Any]) -> VLMOutput:
        """Run the model on a DataModule batch; ``.loss`` is the token-weighted loss."""
        return self._run(batch)[0]

    def _common_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        out, summed, count = self._run(batch)
        mean = (summed / count.clamp(min=1)).detach()  # this batch's token mean, for logs
        size = int(batch["input_ids"].shape[0])
        on_step = stage == "train"
        sync = stage != "train"
        logged: Any = mean
        if not on_step:
            # The epoch value is the token-weighted mean, synced exactly (see TokenMean).
            logged = self._loss_means[stage]
            logged.update(summed, count)
        self.log(
            f"{stage}/loss",
            logged,
            on_step=on_step,
            on_epoch=not on_step,
            prog_bar=True,
            batch_size=size,
        )
        self.log(
            f"{stage}/supervised_tokens",
            count.float(),
            on_step=on_step,
            on_epoch=not on_step,
            reduce_fx="sum",
            batch_size=size,
            sync_dist=sync,
        )
        if on_step and self._trainer is not None and self.trainer.optimizers:
            for group in self.trainer.optimizers[0].param_groups:
                self.log(f"lr/{group['name']}", group["lr"], on_step=True, batch_size=size)
        return out.loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._common_step(batch, "train")
        # Lightning divides by accumulate_grad_batches; our denominator already spans the
        # accumulation group, so undo it (see vlm_lit.models.loss).
        return loss * self.trainer.accumulate_grad_batches

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "test")

    # --- optimisation ----------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over per-component groups + linear warmup and cosine decay (per step)."""
        hp = self.hparams
        optimizer = build_optimizer(
            self.model,
            lrs={"vision": hp.lr_vision, "connector": hp.lr_connector, "lm": hp.lr_lm},
            weight_decay=hp.weight_decay,
            betas=tuple(hp.betas),
            new_rows_lr=hp.lr_connector if get_preset(hp.freeze).lm != "full" else hp.lr_lm,
            gates_lr=hp.get("lr_gates"),
        )
        total = hp.max_steps
        if total is None:
            total = self.trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ValueError(
                    "cannot size the cosine schedule: the trainer does not know the number of "
                    "steps (iterable data). Set --trainer.max_steps or --model.max_steps."
                )
        schedule = warmup_cosine(hp.warmup_steps, int(total), hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def setup(self, stage: str) -> None:
        """Hand the tokenizer and image preprocessing to an attached DataModule that has none
        yet, so the DataModule never needs to know the connector."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if datamodule is not None and hasattr(datamodule, "connect"):
            if getattr(datamodule, "tokenizer", None) is None:
                tower = self.model.vision
                datamodule.connect(
                    self.tokenizer,
                    image_size=tower.image_size,
                    image_mean=tower.image_mean,
                    image_std=tower.image_std,
                )

    def on_fit_start(self) -> None:
        """Re-arm new-row gradient masks; print and log parameter counts per component."""
        # The row mask is a tensor hook, which deepcopy / pickling (ddp_spawn) drop; without
        # it the frozen rows of the embedding would train. Re-registering replaces any hook.
        if self.model.trainable_rows:
            from vlm_lit.models.language import keep_new_rows_trainable

            keep_new_rows_trainable(self.model.language_model, self.new_token_ids)
        counts = count_parameters(self)
        if self.global_rank == 0:
            title = f"{type(self).__name__}: freeze={self.hparams.freeze}, "
            print_parameter_table(counts, title + f"vision_mode={self.hparams.vision_mode}")
        if self.logger is not None:
            self.logger.log_hyperparams(flat_parameter_counts(counts))

    # --- generation and export -------------------------------------------------------------

    def generate(
        self,
        batch_or_images_and_prompts: Any,
        prompts: list[Any] | None = None,
        *,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        image_mode: Literal["pad", "resize"] = "pad",
    ) -> list[str]:
        """Decode answers for a DataModule batch or for ``(images, prompts)``.

        ``images`` is ``list[PIL.Image]`` (one per prompt) or ``list[list[PIL.Image]]``;
        ``prompts`` are strings (images go first in one user turn) or message lists. Stops
        at eos / the template's end-of-turn token; returns strings without special tokens.
        """
        from vlm_lit.models.generation import decode_loop, prepare_prompts

        ids, pixels, owners = prepare_prompts(
            self.model, self.tokenizer, batch_or_images_and_prompts, prompts, image_mode
        )
        was_training = self.training
        self.eval()
        try:
            return decode_loop(
                self.model,
                self.tokenizer,
                ids,
                pixels,
                owners,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
            )
        finally:
            self.train(was_training)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write what training changed + the config + the tokenizer (see serialization.py)."""
        from vlm_lit.models.serialization import save_pretrained

        return save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides: Any) -> VLMModule:
        """Rebuild a module saved with :meth:`save_pretrained` (overrides: constructor args)."""
        from vlm_lit.models.serialization import from_pretrained

        module = from_pretrained(directory, **overrides)
        if cls is not VLMModule and not isinstance(module, cls):
            raise TypeError(f"{directory} holds a {type(module).__name__}, not a {cls.__name__}")
        return module
