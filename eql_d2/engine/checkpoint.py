import os

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..utils.io import atomic_write

__all__ = ["AtomicCheckpointer"]


class AtomicCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose files appear only when completely written.

    detectron2 writes ``<name>.pth`` in place, so a run killed while saving leaves a
    truncated file where the last good checkpoint was. Here the data goes to a temporary
    file (``<name>.pth.partial-<pid>``, which detectron2 never takes for a checkpoint) that
    is flushed to disk and replaces the target with one atomic rename, and
    ``last_checkpoint`` is updated only after that.
    """

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        with atomic_write(save_file, "wb", fsync=True) as f:
            torch.save(data, f)
        self.tag_last_checkpoint(basename)
