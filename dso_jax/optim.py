"""The optimizer of every trainer: global-norm clipping, then AdamW on a learning-rate schedule.

One factory for the LoRA fine-tuning (offline and online; DSO's diffusers ``constant_with_warmup``) and for
the toy model's pre-training (TRELLIS trains its flow models with AdamW and clipping; warmup then cosine).
``optim.schedule`` picks the schedule; the other ``optim.*`` keys are optax's AdamW arguments and the clip.
"""

from __future__ import annotations

import optax

SCHEDULES = ("constant_with_warmup", "warmup_cosine")


def lr_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """``optim.schedule`` as a function of the optimizer step.

    constant_with_warmup: linear 0 -> lr over ``warmup_steps``, then constant (``total_steps`` unused).
    warmup_cosine: linear 0 -> lr over ``warmup_steps``, then cosine decay to ``lr * final_lr_frac`` at
    ``total_steps``.
    """
    kind = optim_cfg.schedule
    if kind == "constant_with_warmup":
        if optim_cfg.warmup_steps <= 0:
            return optax.constant_schedule(optim_cfg.lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, optim_cfg.lr, optim_cfg.warmup_steps), optax.constant_schedule(optim_cfg.lr)],
            [optim_cfg.warmup_steps],
        )
    if kind == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=optim_cfg.lr,
            warmup_steps=optim_cfg.warmup_steps,
            decay_steps=max(total_steps, optim_cfg.warmup_steps + 1),
            end_value=optim_cfg.lr * optim_cfg.final_lr_frac,
        )
    raise ValueError(f"optim.schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {kind!r}")


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping (``grad_clip`` > 0) then AdamW (decoupled decay, as torch.optim.AdamW)."""
    adamw = optax.adamw(
        lr_schedule(optim_cfg, total_steps),
        b1=optim_cfg.b1,
        b2=optim_cfg.b2,
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
    )
    if optim_cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), adamw)
    return adamw
