"""Digests of the decisions of a fixed-seed untrained S policy; `python tests/data/make_decode_pin.py`
prints the JSON stored in tests/data/decode_pin.json (see test_decisions_match_the_pinned_reference)."""

import hashlib
import json

import numpy as np
import torch

from lambo_ray.mec.generator import generate_many
from lambo_ray.mec.scenario import ScenarioConfig
from lambo_ray.policy import LamboPolicy, decide, scale_config


def digest(decisions):
    """Targets exactly, shares to 6 decimals: the last bits of a float32 network's outputs differ between
    CPU kernels (AVX2 vs AVX-512 builds of the same torch), and a refactoring guard must not depend on
    which machine runs it."""
    h = hashlib.sha256()
    for d in decisions:
        h.update(np.asarray(d.target, np.int64).tobytes())
        h.update(np.round(np.asarray(d.share, np.float64), 6).tobytes())
    return h.hexdigest()


def pinned_digests() -> dict[str, str]:
    out = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        pol = LamboPolicy(scale_config("S")).eval()
        for n, m in ((50, 4), (20, 2)):
            sc = ScenarioConfig(n_ues=n, n_servers=m, capacities_cps=(1.5e10, 1.5e10, 3e10, 5e10)[:m])
            insts = generate_many(sc, 4, seed=100 + seed)
            for prompt in ("min_latency", "min_energy"):
                for mode in ("greedy", "sample", "best_of_k"):
                    decs = decide(pol, insts, prompt, mode, k=4, seed=3)
                    out[f"{seed}/{n}x{m}/{prompt}/{mode}"] = digest(decs)
    return out


if __name__ == "__main__":
    print(json.dumps(pinned_digests(), indent=1))
