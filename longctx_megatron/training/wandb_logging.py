"""--wandb-project: the training scalars also go to Weights & Biases, as Megatron's wandb writer.

wandb stays optional: ``check_wandb`` runs at start-up, before any process group, and names
``pip install wandb`` when the flag is given and the module cannot be imported. One process (global
rank 0, which also writes TensorBoard here; Megatron uses the last rank) calls
``wandb.init(project=--wandb-project, name=--wandb-exp-name, entity=--wandb-entity, dir=...,
config=the run's settings)`` with Megatron's directory rule: --wandb-save-dir, else ``<--save>/wandb``
(else wandb's own default, where Megatron would fail). Metrics logs each scalar as
``wandb.log({tag: value}, step=iteration)``, under the TensorBoard tag's name (never the
" vs samples" variants, as Megatron). WANDB_MODE=offline works without a server.
"""

from __future__ import annotations

import dataclasses
import os

from longctx_megatron.training.run_config import RunConfig


def check_wandb(run: RunConfig) -> None:
    """Refuse --wandb-project when wandb cannot be imported (before any process group starts)."""
    if not run.logging.wandb_project:
        return
    try:
        import wandb  # noqa: F401
    except ImportError as error:
        raise ValueError(f"--wandb-project needs the wandb package ({error}): pip install wandb") from None


def wandb_writer(run: RunConfig, rank: int):
    """The initialised ``wandb`` module on global rank 0 when --wandb-project is given, else None."""
    flags = run.logging
    if not flags.wandb_project or rank != 0:
        return None
    import wandb

    directory = flags.wandb_save_dir or (os.path.join(run.checkpointing.save, "wandb") if run.checkpointing.save
                                         else None)
    kwargs = {"project": flags.wandb_project, "name": flags.wandb_exp_name,
              "config": dataclasses.asdict(run)}
    if directory:
        os.makedirs(directory, exist_ok=True)
        kwargs["dir"] = directory
    if flags.wandb_entity:
        kwargs["entity"] = flags.wandb_entity
    wandb.init(**kwargs)
    return wandb
