"""Scoring JSONL files: stream a file through the engine into another, line for line in input
order (`urm-jax score`), shard a file across hosts, or read a small file whole (parity,
goldens). Bad lines name `file:line` (see `urm_jax.jsonl`)."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from urm_jax.compile_cache import CompileMeter, CompileTotals
from urm_jax.io_utils import atomic_file, check_outputs
from urm_jax.jsonl import BadLines, chunked, count_lines, dumps, iter_jsonl
from urm_jax.scoring.engine import Ensemble, Scorer


def read_jsonl(path: str | Path, encode) -> tuple[list[dict], list[list[int]]]:
    """Parse and encode every line (small files: parity, goldens); the first bad line raises
    InputError naming file and line."""
    examples, sequences = [], []
    for _, (example, ids) in iter_jsonl(path, lambda obj: (obj, encode(obj))):
        examples.append(example)
        sequences.append(ids)
    return examples, sequences


@dataclasses.dataclass
class ScoreRun:
    """What a `score_file` run did."""

    written: int
    skipped: BadLines
    tokens: int
    seconds: float
    shapes: int  # distinct padded batch shapes (one compile each per member)
    compile: CompileTotals = dataclasses.field(default_factory=CompileTotals)  # within `seconds`


_NO_ID = object()


def score_file(models: Scorer | Ensemble, input_path, output_path, **kwargs) -> int:
    """`score_jsonl`, returning the number of lines written."""
    return score_jsonl(models, input_path, output_path, **kwargs).written


def shard_range(num_lines: int, shard: tuple[int, int]) -> range:
    """Shard k of n of num_lines lines: contiguous and balanced, so the shards' outputs
    concatenated in shard order are the whole file's output in input order."""
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: the index must be in 0..{count - 1}")
    return range(num_lines * index // count, num_lines * (index + 1) // count)


def score_jsonl(models: Scorer | Ensemble, input_path, output_path, *, chunk_size: int = 1024,
                on_bad_line: str = "error", bad_lines_path=None, progress: bool = True,
                shard: tuple[int, int] | None = None, overwrite: bool = False) -> ScoreRun:
    """Stream-score a JSONL file into another, line for line in input order.

    Memory is bounded by ``chunk_size`` lines: a chunk is read, tokenised and dispatched to every
    member; while the devices work, the next chunk is read and tokenised; then the first is
    gathered and written. The output appears only when the whole file succeeded (atomic rename);
    a bad line stops the run naming ``file:line`` unless ``on_bad_line="skip"``, which leaves it
    out and records it (written to ``bad_lines_path`` as JSONL when given). ``shard=(k, n)``
    scores only the k-th of n contiguous slices of the non-blank lines (one process or host per
    slice; `cat` of the outputs in shard order is the whole file's output). An output that is the
    input, the other output, or (without ``overwrite``) exists is refused before anything is read
    (`urm_jax.io_utils.check_outputs`).
    """
    check_outputs([("--input", input_path)], [("--output", output_path, "file"),
                                             ("--bad-lines", bad_lines_path, "file")], overwrite=overwrite)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    ensemble = models if isinstance(models, Ensemble) else Ensemble([models])
    bad = BadLines(str(input_path))
    started = time.perf_counter()

    def parse(obj):
        ids, truncated = ensemble.encode_with_info(obj)  # ValueError for a bad example
        return obj.get("id", _NO_ID), ids, truncated

    lines = None if shard is None else shard_range(count_lines(input_path), shard)
    total = len(lines) if lines is not None else count_lines(input_path) if progress else None
    written = tokens = counted_bad = 0
    chunks = chunked(iter_jsonl(input_path, parse, on_bad_line=on_bad_line, bad=bad, lines=lines),
                     chunk_size)
    with atomic_file(output_path) as out, CompileMeter() as meter, \
            tqdm(total=total, desc="score", unit="line", file=sys.stderr, disable=not progress,
                 dynamic_ncols=True) as bar:
        for chunk, scores in ensemble.score_chunks(chunks, lambda chunk: (
                [ids for _, (_, ids, _) in chunk], [t for _, (_, _, t) in chunk])):
            for row, (_, (example_id, _, _)) in enumerate(chunk):
                record = {} if example_id is _NO_ID else {"id": example_id}
                record.update(scores.record(row))
                out.write(dumps(record) + "\n")
            written += len(chunk)
            tokens += int(scores.num_tokens.sum())
            bar.update(len(chunk) + len(bad) - counted_bad)  # skipped lines are progress too
            counted_bad = len(bad)
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - started):.0f}", skipped=len(bad))
    if bad_lines_path is not None:
        bad.write(bad_lines_path)
    shapes = len(set().union(*(s.compiled_shapes for s in ensemble.scorers)))
    return ScoreRun(written, bad, tokens, time.perf_counter() - started, shapes, meter.totals)
