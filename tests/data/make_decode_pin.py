"""Digests of the decisions of a fixed-seed untrained S policy; `python tests/data/make_decode_pin.py`
adds this machine's CPU class to tests/data/decode_pin.json (see test_decisions_match_the_pinned_reference).

Greedy decisions are the same on every x86 CPU we have met; sampled ones are not: a float32 logit that
differs in its last bit between AVX2 and AVX-512 kernels can move a sample across a category boundary,
and every later UE of that row follows. So digests are recorded per CPU class, and a class the file
does not hold is checked on its greedy decisions only."""

import hashlib
import json
from pathlib import Path

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


def cpu_class() -> str:
    """``avx512`` / ``avx2`` / ``other``: which float32 kernels torch's CPU build uses here."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "other"
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"


if __name__ == "__main__":
    path = Path(__file__).with_name("decode_pin.json")
    pins = json.loads(path.read_text()) if path.exists() else {}
    pins[cpu_class()] = pinned_digests()
    path.write_text(json.dumps(pins, indent=1, sort_keys=True) + "\n")
    print(f"recorded {cpu_class()} in {path}")
