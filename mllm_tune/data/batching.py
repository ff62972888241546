"""The batch iterator: deterministic shuffling, padding or packing, exact resume, prefetch.

    it = BatchIterator(source, SamplePreparer(...), BatchSpec(...), image_spec, seed=0)
    batch = next(it)              # dict of numpy arrays, see `mllm_tune.data.packing`
    state = it.get_state()        # small JSON-able dict: checkpoint it with the train state
    it.set_state(state)           # the next batches are exactly those that followed `state`
    it = Prefetcher(it, depth=2)  # background thread, same get_state / set_state

Order: epoch e visits `permutation(seed, e)` of the source (or 0..n-1 without shuffle), sharded
`order[shard_index::shard_count]` across hosts. With packing, hosts may form different numbers of
batches per epoch: run a fixed number of steps with `num_epochs=None` (endless).

State: {"epoch", "index" (next position in the epoch's order), "pending" (source indices read
but not yet emitted, re-prepared on restore: preparation is deterministic), "report" (skip
counts, total and this epoch), "layout" (the spec's packing budget: image groups, image
budget)}. A state restored into an iterator with another layout (`data.image_groups` left to
the mesh, and the mesh changed) continues with the same records in the same order, but they
are grouped into batches under the new budget: logged as a warning.

`num_workers > 0` prepares the next records (image decoding and resizing) in a thread pool;
results are consumed in order, so batches and states are the same as with `num_workers=0`.

Bad records: with `on_error="skip"` a record whose reading or preparation raises `DataError` is
counted by reason (see `SkipReport`) and skipped; each epoch's counts are logged when it ends
("data epoch 0 done: 3 record(s) skipped or truncated (missing_image: 2, too_long: 1)") and the
totals stay in `iterator.report`. `fatal` errors (overflow='fail') always raise.
"""
from __future__ import annotations

import functools
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from mllm_tune.data import images as img_lib
from mllm_tune.data.anyres_batch import assemble_anyres
from mllm_tune.data import qwen_batch, qwen_images
from mllm_tune.data.errors import DataError, SkipReport, check_on_error, log
from mllm_tune.data.packing import BatchSpec, Item, Planner, assemble
from mllm_tune.data.pipeline import Sample, SampleDropped


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True, shard_index: int = 0,
                shard_count: int = 1) -> np.ndarray:
  """Source indices visited in `epoch`: a permutation keyed by (seed, epoch), then sharded."""
  order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
  return order[shard_index::shard_count]


class BatchIterator:
  """Iterates fixed-shape batches over a `Source`; see the module docstring."""

  def __init__(self, source, prepare, spec: BatchSpec,
               image_spec: img_lib.ImageSpec | None = None, *, seed: int = 0,
               shuffle: bool = True, num_epochs: int | None = None, on_error: str = "raise",
               shard_index: int = 0, shard_count: int = 1, num_workers: int = 0):
    if spec.max_images and image_spec is None:
      raise ValueError("max_images > 0 needs an image_spec to normalize pixels")
    if spec.qwen and not isinstance(image_spec, qwen_images.QwenImageSpec):
      raise ValueError("a Qwen2-VL BatchSpec needs a QwenImageSpec to lay out patch rows")
    if (image_spec is not None and spec.max_images and not spec.qwen
        and spec.image_hw != image_spec.output_hw):
      raise ValueError(f"BatchSpec.image_hw {spec.image_hw} != the image processor's output "
                       f"{image_spec.output_hw}")
    self.source, self.prepare, self.spec, self.image_spec = source, prepare, spec, image_spec
    self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
    self.on_error = check_on_error(on_error)
    self.shard_index, self.shard_count = shard_index, shard_count
    self.report = SkipReport()
    self.num_workers = num_workers
    self._pool = ThreadPoolExecutor(num_workers, "mllm_tune-prepare") if num_workers else None
    self._ahead: dict[int, Future] = {}
    self._set(epoch=0, index=0, pending=[])

  # ---------------------------------------------------------------------------- state
  def _set(self, epoch: int, index: int, pending: list[int]) -> None:
    self.epoch, self.index = epoch, index
    self._batches_in_epoch = int(index > 0)  # only used to detect an epoch with no batch
    self._order = None
    self._ahead = {}  # results still running are dropped
    self._planner = Planner(self.spec)
    self._samples: dict[int, Sample] = {}
    for key in pending:  # re-prepare carried samples; they were valid when first read
      sample = self._prepare(key)
      if sample is not None:
        self._samples[key] = sample
        self._planner.pending.append(Item(key, sample.length, sample.num_images))

  def _layout(self) -> dict:
    return {"image_groups": int(self.spec.image_groups), "max_images": int(self.spec.max_images)}

  def get_state(self) -> dict:
    return {"epoch": int(self.epoch), "index": int(self.index),
            "pending": [int(i.key) for i in self._planner.buffered()],
            "report": self.report.state(), "layout": self._layout()}

  def set_state(self, state: dict) -> None:
    saved, now = state.get("layout"), self._layout()
    if saved is not None and saved != now:
      changed = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in now.items()
                          if saved.get(k) != v)
      log.warning("data state saved with another packing budget (%s; data.image_groups defaults "
                  "to the data-parallel shards of a host's rows): the same records follow in the "
                  "same order, but they are grouped into batches differently than the saved run "
                  "would have (set data.image_groups to keep the batches across meshes)", changed)
    report = state.get("report", {})
    self.report.load(report.get("total", {}), report.get("epoch", {}))
    self._set(int(state["epoch"]), int(state["index"]), [int(k) for k in state["pending"]])

  # ---------------------------------------------------------------------------- reading
  def order(self) -> np.ndarray:
    if self._order is None:
      self._order = epoch_order(len(self.source), self.seed, self.epoch, self.shuffle,
                                self.shard_index, self.shard_count)
    return self._order

  def _load(self, key: int) -> Sample:
    sample = self.prepare(self.source[key])
    g = self.spec.image_groups  # Qwen row groups: each holds max_images / g patches
    if sample.num_images > self.spec.max_images // g:
      what = ("patches of its images" if self.spec.qwen else
              "crop(s) of its images" if self.spec.anyres else "image(s)")
      where = (f"a row group holds at most max_images / image_groups = "
               f"{self.spec.max_images} / {g}" if g > 1
               else f"a batch holds at most max_images={self.spec.max_images}")
      raise DataError(f"{sample.where}: {sample.num_images} {what} but {where}",
                      "too_many_images")
    return sample

  def _prepare(self, key: int, future: Future | None = None) -> Sample | None:
    """The prepared sample, or None when it is skipped (counted in the report)."""
    try:
      return future.result() if future is not None else self._load(key)
    except DataError as e:
      if e.fatal or (self.on_error == "raise" and not isinstance(e, SampleDropped)):
        raise
      self.report.add(e.reason, str(e))
      return None

  def _fill(self) -> None:
    order = self.order()
    while self._planner.wants_more() and self.index < len(order):
      key, future = int(order[self.index]), None
      if self._pool is not None:  # prepare the next records in parallel, consume in order
        for pos in range(self.index, min(self.index + 2 * self.num_workers, len(order))):
          if pos not in self._ahead:
            self._ahead[pos] = self._pool.submit(self._load, int(order[pos]))
        future = self._ahead.pop(self.index)
      self.index += 1
      sample = self._prepare(key, future)
      if sample is not None:
        self._samples[key] = sample
        self._planner.add(Item(key, sample.length, sample.num_images))

  def _end_epoch(self) -> None:
    source_report = getattr(self.source, "report", None)  # records dropped when loading
    loaded = (f"; when the source was read: {source_report.summary()}"
              if source_report is not None and source_report.counts else "")
    (log.warning if self.report.epoch_counts or loaded else log.info)(
        "data epoch %d done: %s%s", self.epoch, self.report.end_epoch(), loaded)
    self._set(self.epoch + 1, 0, [])

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    while self.num_epochs is None or self.epoch < self.num_epochs:
      self._fill()
      rows = self._planner.next_batch()
      if rows:
        samples = [[self._samples.pop(it.key) for it in row] for row in rows]
        for s in (s for row in samples for s in row if s.truncated_from):
          self.report.add("truncated", f"{s.where}: truncated from {s.truncated_from} to "
                          f"{s.length} tokens")
        self._batches_in_epoch += 1
        if self.spec.qwen:
          return qwen_batch.assemble_qwen(
              samples, self.spec, functools.partial(qwen_images.patch_rows,
                                                    spec=self.image_spec))
        normalize = functools.partial(img_lib.normalize, spec=self.image_spec) \
            if self.image_spec is not None else None
        return (assemble_anyres if self.spec.anyres else assemble)(samples, self.spec, normalize)
      if not self.order().size:
        raise StopIteration  # an empty source (or shard)
      if self._batches_in_epoch == 0:
        raise DataError(f"data epoch {self.epoch}: none of the {self.order().size} records "
                        f"could be used ({self.report.describe(self.report.epoch_counts)})",
                        "empty_epoch", fatal=True)
      self._end_epoch()
    raise StopIteration


class _Wrapper:
  """An iterator around another (`self.iterator`) that shows its skip report and batch spec."""

  @property
  def report(self) -> SkipReport:
    return self.iterator.report

  @property
  def spec(self) -> BatchSpec:
    return self.iterator.spec


class MicroBatches(_Wrapper):
  """`micro` consecutive batches of `iterator`, stacked on a new leading axis: the (A, ...)
  batches of `train.grad_accum` = A. Each micro-batch is a whole batch (its own packing and
  image buffer, pack tables indexing it), so the stack needs batches of one shape (the loader
  builds them so); keys or shapes that differ raise. The state is the inner iterator's after
  the last micro-batch, so resume stays exact."""

  def __init__(self, iterator, micro: int):
    self.iterator, self.micro = iterator, micro

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(self.iterator) for _ in range(self.micro)]
    for k in set().union(*parts):
      shapes = [np.shape(p[k]) if k in p else None for p in parts]
      if len(set(shapes)) > 1:
        raise ValueError(f"micro-batches of one step differ in field {k!r}: shapes {shapes} "
                         "(they need one row length and one image bucket)")
    return {k: np.stack([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> dict:
    return self.iterator.get_state()

  def set_state(self, state: dict) -> None:
    self.iterator.set_state(state)


_DONE = object()


class Prefetcher(_Wrapper):
  """Runs an iterator with `get_state`/`set_state` in a background thread, `depth` batches
  ahead. `get_state()` is the state after the last batch *returned*, so resume stays exact."""

  def __init__(self, iterator, depth: int = 2):
    self.iterator, self.depth = iterator, depth
    self._state = iterator.get_state()
    self._start()

  def _start(self) -> None:
    self._queue: queue.Queue = queue.Queue(self.depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True, name="mllm_tune-prefetch")
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _run(self) -> None:
    try:
      for batch in self.iterator:
        if not self._put((batch, self.iterator.get_state())):
          return
      self._put(_DONE)
    except BaseException as e:  # surfaced to the consumer
      self._put(e)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    item = self._queue.get()
    if item is _DONE:
      self._queue.put(_DONE)
      raise StopIteration
    if isinstance(item, BaseException):
      self._queue.put(item)
      raise item
    batch, self._state = item
    return batch

  def get_state(self) -> dict:
    return self._state

  def close(self) -> None:
    self._stop.set()
    self._thread.join()

  def set_state(self, state: dict) -> None:
    self.close()
    self.iterator.set_state(state)
    self._state = self.iterator.get_state()
    self._start()
