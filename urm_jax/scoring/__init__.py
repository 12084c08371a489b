"""Batch scoring with uncertainty: token ids in, per-sequence reward, attribute means, log-stds,
gate weights and uncertainty out, in input order, for one model or an ensemble (URME).

    results  `Scores`, `EnsembleScores`, ensemble statistics, the JSON record per sequence
    engine   `Scorer` (one model: length buckets, data parallel over local devices, asynchronous
             dispatch) and `Ensemble` (several models over the same token ids)
    files    `score_jsonl`: a JSONL file scored into another, streamed, atomic, shardable
"""

from urm_jax.scoring.engine import Ensemble, Scorer, bucket_lengths, encode_example
from urm_jax.scoring.files import ScoreRun, read_jsonl, score_file, score_jsonl, shard_range
from urm_jax.scoring.results import (UNCERTAINTY_MEASURES, EnsembleScores, Scores,
                                     ensemble_statistics, least_uncertain)

__all__ = ["Ensemble", "EnsembleScores", "ScoreRun", "Scorer", "Scores", "UNCERTAINTY_MEASURES",
           "bucket_lengths", "encode_example", "ensemble_statistics", "least_uncertain",
           "read_jsonl", "score_file", "score_jsonl", "shard_range"]
