"""The NVIDIA DALI loader: decoding, resizing, cropping and normalising inside a DALI pipeline.

Same samples, same geometry as the PyTorch loader (dito_fast/data/loader.py):

- Order. DALI's own reader shuffling cannot follow a (seed, epoch) permutation, so the readers
  run with ``random_shuffle=False`` over sample lists we write: for a chunk of consecutive steps
  (about one epoch, at least 4096 samples), this rank's samples of those steps, in step order, from
  the same :class:`~dito_fast.data.sampler.StepBatchSampler` the PyTorch loader uses. Folders and
  file lists go through ``fn.readers.file(files=...)``; tar shards through
  ``fn.readers.webdataset`` with index files we write per chunk (one per run of consecutive
  samples of one shard; DALI reads index entries in the order written). Each pipeline iteration
  is one step, so resuming at step k builds the chunk starting at k: exact, with no replay.
- Geometry. Per-sample (label, index, crop position, flip) enter through ``fn.external_source``
  aligned with the reader's order; the resize size and crop offsets are computed in float32 graph
  arithmetic with the same formulas as :func:`~dito_fast.data.transforms.loader_resize_size` and
  :func:`~dito_fast.data.transforms.crop_window`, so both loaders cut the same integer window.
- Pixels. ``fn.decoders.image`` ("mixed" = GPU decoding when a GPU is used, else "cpu" with
  ``device_id=None``), ``fn.resize`` (cubic, antialiased), ``fn.crop_mirror_normalize`` to float
  [-1, 1]. On CPU the JPEG/PNG decode is bit-identical to PIL's here (both libjpeg-turbo / libpng);
  the cubic resampler differs from PIL's by ~0.1-0.2 grey levels on average.
- Evaluation passes use DALI's own sharding (``shard_id``/``num_shards``, ``pad_last_batch``,
  the iterator's PARTIAL last batch): rank r reads the same contiguous block as the PyTorch loader.
- Unreadable files. DALI stops the whole pipeline at the first file it cannot decode, so files
  are screened before the first batch (``check_source``: format header + JPEG/PNG end marker).
  If a file still fails, the failed pipeline is dropped, the file is identified (from DALI's
  message, or by decoding the in-flight samples with PIL, or failing that each in a one-sample DALI
  pipeline: PIL reads some files DALI cannot, such as lossless WebP with EXIF data or 1-bit and
  32-bit integer TIFF; the PyTorch loader trains on those), marked unreadable and replaced by the
  next readable index, exactly as the PyTorch loader does, and a new pipeline resumes at the
  step that failed.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import shutil
import tempfile
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .loader import DALI_PIP_PACKAGE, BatchLoader, DALIUnavailableError
from .sampler import eval_shard, mix_seed
from .sources import DALI_FORMATS, FileSource, Source, TarSource, _check_one

logger = logging.getLogger(__name__)

__all__ = ["DALILoader"]

_UNSAFE = re.compile(r"[\s:]")  # characters a webdataset index line cannot hold in a member name


def _import_dali():
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.math as dmath
        import nvidia.dali.types as types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError as e:
        raise DALIUnavailableError(f"the 'dali' loader needs NVIDIA DALI: `pip install {DALI_PIP_PACKAGE}` "
                                   f"({type(e).__name__}: {e})") from None
    return dali, fn, dmath, types, DALIGenericIterator, LastBatchPolicy


class _PipelineFailure(Exception):
    """A DALI pipeline stopped with an error after ``done`` batches of its chunk."""

    def __init__(self, message: str, done: int):
        super().__init__(message)
        self.message, self.done = message, done


class _Params:
    """External-source callback: the per-sample arrays of pipeline iteration ``info.iteration``."""

    def __init__(self, arrays: Sequence[np.ndarray], batch_size: int):
        self.arrays, self.batch = [np.ascontiguousarray(a) for a in arrays], batch_size
        self.iterations = max(1, len(self.arrays[0]) // batch_size)

    def __call__(self, info):
        i = info.iteration % self.iterations  # DALI may prefetch past the end of the list
        return tuple(a[i * self.batch:(i + 1) * self.batch] for a in self.arrays)


class DALILoader(BatchLoader):
    """The DALI loader (see the module docstring). Built by :func:`~dito_fast.data.make_loader`.

    Args (beyond BatchLoader's):
        threads: DALI CPU threads. device_id: CUDA device for GPU decoding, None = CPU only.
        prefetch: DALI prefetch queue depth.
        chunk_samples: minimum samples per pipeline (one pipeline is built per chunk of steps).
        max_shard_runs: maximum tar index files (open shard files) per pipeline.
    """

    kind = "dali"

    def __init__(self, source: Source, *, threads: int = 1, device_id: Optional[int] = None, prefetch: int = 2,
                 chunk_samples: int = 4096, max_shard_runs: int = 256, **kw):
        super().__init__(source, **kw)
        if not isinstance(source, (FileSource, TarSource)):
            raise DALIUnavailableError(f"the DALI loader reads image files or tar shards, not {source!r}")
        self._dali = _import_dali()
        self.threads, self.device_id, self.prefetch = int(threads), device_id, int(prefetch)
        self.chunk_samples, self.max_shard_runs = int(chunk_samples), int(max_shard_runs)
        self._tmp: Optional[str] = None
        self._names: Optional[Dict[str, int]] = None
        self._pipelines_built = 0

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        if not self.train:
            yield from self._iter_eval()
            return
        step = self.start_step
        end = None if self.num_steps is None else self.start_step + self.num_steps
        while end is None or step < end:
            keys = self._plan_chunk(step, end)
            flat = [k for step_keys in keys for k in step_keys]
            actual = np.array([self.resolve(i) for i, _ in flat], np.int64)
            done = 0
            try:
                for batch in self._run(actual, flat, len(keys)):
                    done += 1
                    yield batch
            except _PipelineFailure as f:
                # the samples that may have been in flight when the pipeline stopped
                self._recover(f.message, actual[f.done * self.batch_size:(f.done + self.prefetch + 2) * self.batch_size])
            step += done

    def _iter_eval(self) -> Iterator[Dict[str, torch.Tensor]]:
        n, B = len(self.source), self.batch_size
        block = eval_shard(n, self.rank, self.world_size)
        if len(block) == 0:
            return
        total = math.ceil(len(block) / B)
        end = total if self.num_steps is None else min(total, self.start_step + self.num_steps)
        step = self.start_step
        while step < end:
            seq = [self.resolve(i) for i in range(n)]
            # this rank's samples, padded to whole batches with the last one (as pad_last_batch does)
            mine = [seq[i] for i in block] + [seq[block[-1]]] * (total * B - len(block))
            done = 0
            try:
                for j, batch in enumerate(self._run(np.array(mine, np.int64), [(i, 0) for i in mine], total,
                                                    reader_seq=seq, shard=(self.rank, self.world_size))):
                    if j >= step:
                        if j >= end:
                            break
                        done = j + 1 - step
                        yield batch
            except _PipelineFailure as f:
                self._recover(f.message, mine[f.done * B:(f.done + self.prefetch + 2) * B])
            step += done

    def _plan_chunk(self, step: int, end: Optional[int]) -> List[List[Tuple[int, int]]]:
        """Keys of the next chunk of steps: about one epoch and >= chunk_samples samples; for tar
        shards cut where this rank's sample stream would need more than max_shard_runs runs."""
        n, B = len(self.source), self.batch_size
        steps = max(math.ceil(n / (B * self.world_size)), math.ceil(self.chunk_samples / B))
        if end is not None:
            steps = min(steps, end - step)
        keys = list(self.step_sampler(step, steps))
        if isinstance(self.source, TarSource):
            runs, last = 0, None
            for s, step_keys in enumerate(keys):
                for i, _ in step_keys:
                    shard = int(self.source.shard[self.resolve(i)])
                    runs += shard != last
                    last = shard
                if runs > self.max_shard_runs and s > 0:
                    return keys[:s]
        return keys

    # ------------------------------------------------------------------ pipelines

    def _run(self, actual: np.ndarray, keys: Sequence[Tuple[int, int]], iterations: int,
             reader_seq: Optional[List[int]] = None, shard: Tuple[int, int] = (0, 1)):
        """Build a pipeline, run ``iterations`` batches and yield them.

        ``actual``: the source indices this rank reads, in order (``iterations`` x batch);
        ``keys``: their (requested index, epoch) keys, which seed crops and flips;
        ``reader_seq``: what the reader gets (default ``actual``), split by DALI into ``shard``
        = (shard_id, num_shards) when evaluating.
        """
        dali, fn, dmath, types, DALIGenericIterator, LastBatchPolicy = self._dali
        seq = [int(j) for j in actual] if reader_seq is None else reader_seq
        u_x, u_y, flip = self._key_params(keys)
        arrays = [self.source.labels[actual], actual]
        if self.train:
            arrays += [u_x, u_y, flip.astype(np.int32)]
        B, S = self.batch_size, float(self.image_size)
        train, layout = self.train, "HWC" if self.memory_format == "channels_last" else "CHW"
        decoder = "mixed" if self.device_id is not None else "cpu"
        chunk_dir = tempfile.mkdtemp(prefix="chunk", dir=self._tmpdir()) if isinstance(self.source, TarSource) else None
        reader_args = dict(random_shuffle=False, dont_use_mmap=True, name="Reader", shard_id=shard[0],
                           num_shards=shard[1], pad_last_batch=True)

        @dali.pipeline_def(batch_size=B, num_threads=self.threads, device_id=self.device_id,
                           prefetch_queue_depth=self.prefetch, seed=mix_seed(self.seed, self.rank) % 2 ** 31)
        def graph():
            if isinstance(self.source, TarSource):
                paths, index_paths = self._write_index_files(seq, chunk_dir)
                encoded = fn.readers.webdataset(paths=paths, index_paths=index_paths, ext=["img"], **reader_args)
            else:
                encoded, _ = fn.readers.file(files=[self._dali_path(j) for j in seq], **reader_args)
            params = fn.external_source(source=_Params(arrays, B), num_outputs=len(arrays), batch=True,
                                        batch_info=True,
                                        dtype=[types.INT64, types.INT64, types.FLOAT, types.FLOAT, types.INT32][:len(arrays)])
            label, index = params[:2]
            # resized size: shorter side S, longer floor(long * S / short + 0.5) >= S (float32)
            shape = fn.peek_image_shape(encoded, dtype=types.FLOAT)  # (H, W, C), EXIF orientation applied
            h, w = shape[0], shape[1]
            w_short = w <= h
            new_w = w_short * S + (1 - w_short) * dmath.max(dmath.floor(w * S / h + 0.5), S)
            new_h = (1 - w_short) * S + w_short * dmath.max(dmath.floor(h * S / w + 0.5), S)
            images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
            images = fn.resize(images, resize_x=new_w, resize_y=new_h, interp_type=types.INTERP_CUBIC,
                               antialias=True, subpixel_scale=False)
            # crop offsets: train floor(u * (room + 1)) capped at room; eval room // 2
            room_x, room_y = new_w - S, new_h - S
            if train:
                ux, uy, mirror = params[2:]
                left = dmath.min(dmath.floor(ux * (room_x + 1.0)), room_x)
                top = dmath.min(dmath.floor(uy * (room_y + 1.0)), room_y)
            else:
                left, top, mirror = dmath.floor(room_x * 0.5), dmath.floor(room_y * 0.5), 0
            # DALI places the window at pos * room: pos = offset / room lands on the integer offset
            images = fn.crop_mirror_normalize(
                images, crop_h=self.image_size, crop_w=self.image_size,
                crop_pos_x=left / dmath.max(room_x, 1.0), crop_pos_y=top / dmath.max(room_y, 1.0),
                mirror=mirror, mean=[127.5] * 3, std=[127.5] * 3, dtype=types.FLOAT, output_layout=layout)
            return images, label, index

        pipe = it = None
        done = 0
        try:
            pipe = graph()
            pipe.build()
            self._pipelines_built += 1
            it = DALIGenericIterator([pipe], ["image", "label", "index"], reader_name="Reader", auto_reset=False,
                                     last_batch_policy=LastBatchPolicy.PARTIAL, prepare_first_batch=False)
            while done < iterations:
                try:
                    out = next(it)[0]
                except StopIteration:
                    raise RuntimeError(f"DALI pipeline ended after {done} of {iterations} batches") from None
                except RuntimeError as e:
                    raise _PipelineFailure(str(e), done) from e
                image = out["image"]
                if layout == "HWC":
                    image = image.permute(0, 3, 1, 2)  # NCHW shape, channels_last memory
                done += 1
                yield {"image": image, "label": out["label"].reshape(-1).long(),
                       "index": out["index"].reshape(-1).long()}
        except RuntimeError as e:  # failures while building
            if isinstance(e, _PipelineFailure) or "Failed to decode" not in str(e):
                raise
            raise _PipelineFailure(str(e), done) from e
        finally:
            del it
            if pipe is not None and hasattr(pipe, "_shutdown"):
                pipe._shutdown()  # stop its threads now, not at garbage collection
            if chunk_dir is not None:
                shutil.rmtree(chunk_dir, ignore_errors=True)

    def _write_index_files(self, seq: Sequence[int], folder: str) -> Tuple[List[str], List[str]]:
        """One webdataset index file per run of consecutive samples from one shard, listing
        those samples (component "img") in reading order; returns (tar paths, index paths)."""
        src: TarSource = self.source
        paths, index_paths = [], []
        for r, (shard, group) in enumerate(itertools.groupby(seq, key=lambda j: int(src.shard[j]))):
            group = list(group)
            # DALI splits index lines at whitespace; the name is only used in messages
            lines = [f"img {src.offset[j]} {src.sizes[j]} {_UNSAFE.sub('_', src.members[j])}" for j in group]
            path = os.path.join(folder, f"run{r:05d}.idx")
            with open(path, "w") as f:
                f.write(f"v1.2 {len(lines)}\n" + "\n".join(lines) + "\n")
            paths.append(src.shards[shard])
            index_paths.append(path)
        return paths, index_paths

    def _tmpdir(self) -> str:
        if self._tmp is None or not os.path.isdir(self._tmp):
            self._tmp = tempfile.mkdtemp(prefix="dito_fast_dali_")
        return self._tmp

    # ------------------------------------------------------------------ unreadable files

    def _recover(self, message: str, candidates: Sequence[int]) -> None:
        """Mark the file(s) that stopped the pipeline as unreadable, or re-raise."""
        found = []
        m = re.search(r"Failed to decode sample #\d+ : (.+)", message)
        if m:
            j = self._index_of(m.group(1).strip())
            if j is not None and j not in self._bad:
                found.append((j, "DALI could not decode it"))
        pending = [j for j in dict.fromkeys(int(c) for c in candidates) if j not in self._bad]
        if not found:  # DALI did not name it: find it among the in-flight samples with PIL
            for j in pending:
                reason = _check_one(self.source, j, "decode", DALI_FORMATS)
                if reason is not None:
                    found.append((j, reason))
        if not found:  # files PIL reads but DALI does not (e.g. lossless WebP with EXIF, 1-bit TIFF): ask DALI
            for j in pending:
                reason = self._dali_rejects(j)
                if reason is not None:
                    found.append((j, f"DALI cannot decode it ({reason})"))
        if not found:
            raise RuntimeError(f"the DALI pipeline failed and no unreadable file was found among the "
                               f"{len(candidates)} samples it was reading: {message}")
        for j, reason in found:
            self._mark_bad(j, reason)

    def _dali_rejects(self, j: int) -> Optional[str]:
        """Why DALI's decoder (on this loader's device) refuses sample j on its own, or None: a
        one-sample pipeline over its bytes, through the operators that read the encoded image."""
        dali, fn, _, types, _, _ = self._dali
        data = np.frombuffer(self.source.read_bytes(j), np.uint8)

        @dali.pipeline_def(batch_size=1, num_threads=1, device_id=self.device_id)
        def probe():
            encoded = fn.external_source(source=lambda: [data], batch=True, dtype=types.UINT8)
            shape = fn.peek_image_shape(encoded, dtype=types.FLOAT)
            decoder = "mixed" if self.device_id is not None else "cpu"
            return fn.decoders.image(encoded, device=decoder, output_type=types.RGB), shape

        pipe = probe()
        try:
            pipe.build()
            pipe.run()
            return None
        except RuntimeError as e:
            lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
            return (lines[-1] if lines else type(e).__name__)[:200]
        finally:
            if hasattr(pipe, "_shutdown"):
                pipe._shutdown()

    def _dali_path(self, j: int) -> str:
        """The path DALI's file reader gets for file j: its own, or, for a name that is not UTF-8
        (one undecodable name had failed the whole pipeline: "Unsupported argument type with name
        files"), a link to it in this loader's temporary folder, named after j."""
        path = self.source.files[j]
        try:
            path.encode("utf-8")
            return path
        except UnicodeEncodeError:
            pass
        ext = os.path.splitext(path)[1].encode("ascii", "replace").decode()
        link = os.path.join(self._tmpdir(), "links", f"{j}{ext}")
        if not os.path.lexists(link):
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(os.path.abspath(path), link)
            self._names = None  # (rebuilt with the link's name)
        return link

    def _index_of(self, info: str) -> Optional[int]:
        """The source index DALI's sample description refers to (a path, or tar:offset:name)."""
        if self._names is None:
            src = self.source
            if isinstance(src, TarSource):
                self._names = {f"{src.shards[s]}:{o}": i for i, (s, o) in enumerate(zip(src.shard, src.offset))}
            else:
                self._names = {f: i for i, f in enumerate(src.files)}
                links = os.path.join(self._tmp, "links") if self._tmp is not None else None
                if links is not None and os.path.isdir(links):  # (_dali_path's links, named j.ext)
                    self._names.update({os.path.join(links, n): int(n.split(".")[0]) for n in os.listdir(links)})
        if isinstance(self.source, TarSource):
            info = info.rsplit(":", 1)[0]
        return self._names.get(info)

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __del__(self):
        self.close()
