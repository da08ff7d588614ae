"""Stage 2a: train the missing SAEs of a unit with the params' trainer -> ``saes/<sae id>/`` (SAELens format).

``sae.trainer: fast`` (the default) trains them as one set from one shared activation stream
(``engine.train_set``); ``saelens`` runs each training run alone through SAELens' ``SAETrainer``
(``training.run_training``, the parity baseline). Both build on ``training.py`` (init, schedule, saving),
and this stage chooses between them, so neither trainer imports the other.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .layout import sae_dir
from .params import Params, SAESpec
from .training import is_trained, run_training, runs_for


def train_unit(p: Params, specs: list[SAESpec], source, out_dir: Path, model_name: str, context_size: int,
               device: str = "cpu", force: bool = False, progress: bool = True) -> list[dict]:
    """Train every missing SAE of ``specs`` (one role, one or more hooks) with the params' trainer from ``source``
    (``extract.activation_source``); finished SAEs are kept unless ``force`` (then they are removed first and
    retrained). Returns the train_meta of each SAE trained now."""
    if force:
        for s in specs:
            shutil.rmtree(sae_dir(out_dir, s.sae_id), ignore_errors=True)
    todo = [s for s in specs if not is_trained(out_dir, s.sae_id)]
    if not todo:
        return []
    if p.sae.trainer == "fast":
        from .engine import train_set

        return train_set(p, todo, source, out_dir, model_name, context_size, device, progress)
    metas = []
    for run in runs_for(p, todo):
        src = source.for_layer(run[0].layer) if p.multi_hook else source  # this trainer reads one hook at a time
        metas += run_training(p, run, src, out_dir, model_name, context_size, device, progress)
    return metas
