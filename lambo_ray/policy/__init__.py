"""The LAMBO policy in plain torch (no Ray needed): features, model, decoding strategies, checkpoints.

Public API (other modules should import from here):

* :func:`featurize`, :class:`PolicyBatch`, :data:`PROMPT_IDS` -- instances -> padded tensors
* :class:`PolicyConfig`, :data:`SCALES`, :func:`scale_config`, :func:`count_parameters`
* :class:`LamboPolicy` (``encode`` / ``decode`` / ``teacher_forced`` / ``pooled``), :func:`output_shares`
  (share head -> the decision's shares) and :func:`spare_fractions` (its inverse, for expert labels)
* :func:`decide` and the decode-strategy registry (``greedy``, ``sample``, ``best_of_k``, ``refine``)
* :func:`save_policy` / :func:`load_policy`, :func:`save_decoder` / :func:`load_decoder`
"""

from lambo_ray.policy.checkpoint import (
    load_decoder,
    load_policy,
    policy_fingerprint,
    read_decoder,
    read_manifest,
    resolve_policy_dir,
    save_decoder,
    save_policy,
)
from lambo_ray.policy.config import SCALES, PolicyConfig, count_parameters, scale_config
from lambo_ray.policy.decoding import available_strategies, decide
from lambo_ray.policy.features import FEATURE_VERSION, PROMPT_IDS, PolicyBatch, featurize
from lambo_ray.policy.masks import output_shares, spare_fractions
from lambo_ray.policy.model import DecodeOut, Encoded, LamboPolicy, TFOut

__all__ = [
    "FEATURE_VERSION",
    "PROMPT_IDS",
    "PolicyBatch",
    "featurize",
    "SCALES",
    "PolicyConfig",
    "count_parameters",
    "scale_config",
    "DecodeOut",
    "Encoded",
    "LamboPolicy",
    "TFOut",
    "output_shares",
    "spare_fractions",
    "available_strategies",
    "decide",
    "load_decoder",
    "load_policy",
    "policy_fingerprint",
    "read_decoder",
    "read_manifest",
    "resolve_policy_dir",
    "save_decoder",
    "save_policy",
]
