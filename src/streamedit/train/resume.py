"""Resume ``streamedit train lllite`` where a checkpoint left it (``--resume CHECKPOINT``).

Every adapter file the trainer writes (the ``--save-every`` checkpoints and the final output) gets a
training-state file beside it, ``NAME.train-state.pt``: the step, the optimizer and LR-schedule state, the
example sampler's generator (and torch's global RNG for dropout), the losses so far, and the options that
shape the run. Resuming loads the adapter weights and that state and trains on from the next step, so a run
cut into pieces (a GPU lent for less time than the run takes) ends with the same adapter as one run
without a break. A resume with different options is refused: it would not be the same run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import StreameditError

STATE_SUFFIX = ".train-state.pt"


def state_path(checkpoint) -> Path:
    p = Path(checkpoint)
    return p.with_name(p.stem + STATE_SUFFIX)


def save_state(checkpoint, step: int, options: dict, optimizer, schedule, gen: torch.Generator,
               losses: list[float]) -> None:
    state = {"step": step, "options": options, "optimizer": optimizer.state_dict(),
             "schedule": schedule.state_dict(), "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [], "losses": losses}
    try:
        torch.save(state, state_path(checkpoint))
    except OSError as exc:
        raise StreameditError(f"could not write {str(state_path(checkpoint))!r}: {exc.strerror or exc}") from exc


def read_state(checkpoint, steps: int) -> dict:
    """The training state saved beside ``checkpoint``, checked against this run's ``steps`` (before any slow
    set-up: the options are checked by :func:`check_options` once the pairs are loaded)."""
    checkpoint, path = Path(checkpoint), state_path(checkpoint)
    if not checkpoint.is_file():
        raise StreameditError(f"--resume: checkpoint {str(checkpoint)!r} not found")
    if not path.is_file():
        raise StreameditError(f"--resume: {checkpoint.name} has no training state beside it ({path.name}); "
                              "only adapters written by `train lllite` since --resume exists can be resumed")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (a corrupt or foreign file: one message)
        raise StreameditError(f"--resume: cannot read {str(path)!r}: {exc}") from None
    if state["step"] >= steps:
        raise StreameditError(f"--resume: the checkpoint is at step {state['step']}; --steps {steps} leaves "
                              "nothing to train")
    return state


def check_options(state: dict, options: dict) -> None:
    changed = [f"{k} {state['options'].get(k)!r} -> {v!r}" for k, v in options.items()
               if state["options"].get(k) != v]
    if changed:
        raise StreameditError("--resume needs the checkpoint's training options; changed: " + "; ".join(changed))


def restore(state: dict, checkpoint, unet, adapter, optimizer, schedule, gen: torch.Generator) -> tuple[int, list]:
    """Load the adapter weights (before the adapter patches ``unet``) and the training state;
    -> (last step done, losses so far)."""
    from ..temporal.adapter import LLLiteAdapter

    adapter.load_state_dict(LLLiteAdapter.load(checkpoint, unet, hooks=list(adapter.config.hooks)).state_dict())
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], list(state["losses"])
