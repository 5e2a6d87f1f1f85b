"""One progress bar for a training run: optimizer steps of the whole run, with its true ETA.

Lightning's own bars count an epoch's micro-batches (a 2-step run showed ``2/738 ... 1:27:53``); a user wants
"step 120 of 375, 4 minutes left".
"""

from __future__ import annotations

from lightning.pytorch.callbacks.progress import ProgressBar
from tqdm.auto import tqdm


class StepProgressBar(ProgressBar):
    """A tqdm bar over the run's optimizer steps (``trainer.estimated_stepping_batches``: ``max_steps`` or the
    epochs' steps), starting at the resumed step, with the last training loss; global rank 0 only."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self.bar: tqdm | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer, pl_module) -> None:
        if not self._enabled or not trainer.is_global_zero:
            return
        total = int(trainer.estimated_stepping_batches)
        self.bar = tqdm(total=total, initial=trainer.global_step, desc="train", unit="step", dynamic_ncols=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.bar is None:
            return
        new = trainer.global_step - self.bar.n
        if new > 0:
            loss = trainer.callback_metrics.get("train/loss")
            if loss is not None:
                self.bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
            self.bar.update(new)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
