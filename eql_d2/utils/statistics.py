"""Base class of per-category statistics that a checkpoint carries (loss gradient statistics,
Seesaw's class counts, regime indicators)."""

import warnings
from typing import List, Tuple

from torch import nn

__all__ = ["RestartableStatistics", "StatisticsRestartWarning"]


class StatisticsRestartWarning(UserWarning):
    """Statistics absent from a loaded state_dict restart from zero."""


class RestartableStatistics(nn.Module):
    """A module whose statistics buffers (names in ``_STAT_NAMES``) describe one training run.

    Loading a state_dict that lacks any of them (a checkpoint written before they existed,
    or by another loss) does not fail: all of them restart from zero, as for a fresh model
    (part of a set would mix statistics of two runs), and a :class:`StatisticsRestartWarning`
    from :meth:`_restart_warning` names the missing keys.
    """

    _STAT_NAMES: Tuple[str, ...] = ()

    def reset_statistics(self) -> None:
        """Forget the accumulated statistics (back to the state before the first step)."""
        for name in self._STAT_NAMES:
            getattr(self, name).zero_()

    def _restart_warning(self, absent: List[str]) -> str:
        return (f"{type(self).__name__}: the state_dict has no {', '.join(absent)}; the "
                "statistics restart from zero.")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        absent = [prefix + n for n in self._STAT_NAMES if prefix + n not in state_dict]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if absent:
            for key in absent:
                if key in missing_keys:
                    missing_keys.remove(key)
            self.reset_statistics()
            warnings.warn(self._restart_warning(absent), StatisticsRestartWarning, stacklevel=2)
