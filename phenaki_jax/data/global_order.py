"""One data order for the whole job, whatever the number of processes.

Training batches are global: step s takes the elements s·B … s·B + B - 1 of
one stream (B = input.batch_size) that is shuffled and augmented the same way
on every process, and process p of N reads only its rows p·B/N … (p+1)·B/N - 1
of each. So the examples of a step, the batch kinds of a mixture and every
augmentation draw are those of a one-process run, which is what makes the
losses of 1, 2 or 4 processes equal and a checkpoint's data position
(counted in batches, the same on every process) valid on any process count.

Slicing the example stream (`ds[p::N]`) instead would also give disjoint
examples, but a different set per step for each process count.
"""
from __future__ import annotations

from typing import Any

import grain


class ProcessRows(grain.MapDataset):
  """This process's rows of each global batch of `global_batch` consecutive elements.

  Only the selected elements are read: a process decodes B/N examples per step.
  """

  def __init__(self, parent: grain.MapDataset, *, global_batch: int, process_index: int,
               process_count: int):
    super().__init__(parent)
    if global_batch <= 0 or global_batch % process_count:
      raise ValueError(f"config.input.batch_size={global_batch} must be a positive multiple "
                       f"of the {process_count} processes")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} outside 0 … {process_count - 1}")
    self._global = global_batch
    self._local = global_batch // process_count
    self._offset = process_index * self._local
    self._length = (len(parent) // global_batch) * self._local

  def __len__(self) -> int:
    return self._length

  def parent_index(self, index: int) -> int:
    step, row = divmod(index, self._local)
    return step * self._global + self._offset + row

  def __getitem__(self, index: Any):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self.parent_index(index)]

  def __str__(self) -> str:
    return (f"ProcessRows(rows {self._offset}…{self._offset + self._local - 1} of each "
            f"{self._global})")


def local_batches(ds: grain.MapDataset, *, global_batch: int, process_index: int,
                  process_count: int) -> grain.MapDataset:
  """`ds` (one element per example, the same on every process) as this process's
  batches of global_batch / process_count rows."""
  rows = ProcessRows(ds, global_batch=global_batch, process_index=process_index,
                     process_count=process_count)
  return rows.batch(global_batch // process_count, drop_remainder=True)
