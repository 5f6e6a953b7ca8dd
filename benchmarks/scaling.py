"""Pretraining throughput and scaling: per-component costs, the (env runners, learners) grid, memory of L.

Three measurements in one run (so the ratios between them share one machine state):

1. ``components``: per-instance costs in one process, one torch thread, for the S and M models on the
   default scenario distribution (N 10-200, M 2-10, padded to 200 x 10): an env step (draw, features,
   reward), sampling decode in batches of 32 env replicas, and a teacher-forced forward + backward
   (the learner's work per row and epoch), each with the padding trimmed per size chunk and padded.
2. ``grid``: RLlib iterations of LAMBO-S for (env runners, learners) in (1,0), (2,0), (1,1), (2,1),
   with sampling overlapped with learning, plus two baselines on (1,0): PPO's sequential step with
   trimming, and the padded network without overlap (what the code did before). Reported: instances
   per second over the timed iterations, and the mean time the driver waited for samples / spent in
   the learner update.
3. ``memory``: the training memory budget of S, M and L: weights, Adam state and gradients from the
   parameter count, and activations (bytes of the tensors autograd saves in the forward pass) measured
   on torch's meta device, so L's are counted without allocating them.

    python benchmarks/scaling.py                          # full (~20-30 min on a busy 2-core machine)
    python benchmarks/scaling.py --quick                  # smoke run
    python benchmarks/scaling.py --tables benchmarks/results/scaling.json   # the README tables from a result
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lambo_ray.results import print_table, write_results

GRID = [  # name, env runners, learners, overlap, trim
    ("padded, sequential (before)", 1, 0, False, False),
    ("sequential", 1, 0, False, True),
    ("overlap", 1, 0, True, True),
    ("overlap", 2, 0, True, True),
    ("overlap", 1, 1, True, True),
    ("overlap", 2, 1, True, True),
]


# ----------------------------------------------------------------------------------------------
# 1. Per-component costs
# ----------------------------------------------------------------------------------------------
def distribution_batch(count: int, seed: int) -> tuple[Any, list[dict[str, np.ndarray]]]:
    from lambo_ray.rl.config import PretrainConfig
    from lambo_ray.rl.env import MecEnv

    env = MecEnv(PretrainConfig(scenario_dist={}, val_expert=None).env_config().to_dict())
    return env, [env.reset(seed=seed + i)[0] for i in range(count)]


def _module(scale: str, env: Any, trim: bool, chunk_rows: int) -> Any:
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from lambo_ray.policy import SCALES
    from lambo_ray.rl.module import LamboRLModule, module_model_config

    torch.manual_seed(0)
    spec = RLModuleSpec(
        module_class=LamboRLModule,
        observation_space=env.observation_space,
        action_space=env.action_space,
        model_config=module_model_config(SCALES[scale], 2, trim, chunk_rows),
    )
    return spec.build()


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def env_step_cost(count: int) -> float:
    """Seconds per env step (reward of a decision, next instance drawn and featurised)."""
    from lambo_ray.rl.config import PretrainConfig
    from lambo_ray.rl.env import MecEnv

    env = MecEnv(PretrainConfig(scenario_dist={}, val_expert=None).env_config().to_dict())
    env.reset(seed=0)
    n = env.cfg.n_max
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(count):
        m = env.instance.n_servers
        action = {"target": rng.integers(0, m + 1, n), "share": rng.uniform(0.05, 0.3, n).astype(np.float32)}
        env.step(action)
    return (time.perf_counter() - t0) / count


def module_costs(scale: str, rows: int, repeats: int) -> list[dict[str, Any]]:
    """Sampling decode and teacher forcing + backward per instance, trimmed (chunks of 16) and padded."""
    from ray.rllib.core.columns import Columns

    env, obs = distribution_batch(rows, seed=100)
    batch = {Columns.OBS: {k: torch.from_numpy(np.stack([o[k] for o in obs])) for k in obs[0]}}
    out = []
    for trim in (True, False):
        module = _module(scale, env, trim, 16)
        explore = {Columns.OBS: {k: v[:32] for k, v in batch[Columns.OBS].items()}}
        decode_s = _best_of(lambda: module.forward_exploration(explore), repeats) / min(32, rows)  # noqa: B023
        sampled = module.forward_exploration(batch)
        train_batch = {**batch, Columns.ACTIONS: sampled[Columns.ACTIONS], "u": sampled["u"]}

        def train_step() -> None:
            fwd = module.forward_train(train_batch)  # noqa: B023
            (fwd["logp_target"].sum() + fwd["logp_share"].sum() + fwd["vf"].sum()).backward()
            module.zero_grad(set_to_none=True)  # noqa: B023

        train_s = _best_of(train_step, repeats) / rows
        out.append(
            {
                "scale": scale,
                "padding": "trimmed per chunk of 16" if trim else "padded to 200 x 10",
                "decode_ms_per_instance": 1000 * decode_s,
                "train_fwd_bwd_ms_per_instance": 1000 * train_s,
            }
        )
    return out


# ----------------------------------------------------------------------------------------------
# 2. The RLlib grid
# ----------------------------------------------------------------------------------------------
def grid_config(args: argparse.Namespace, runners: int, learners: int, overlap: bool, trim: bool) -> Any:
    from lambo_ray.rl.config import PretrainConfig

    return PretrainConfig(
        scale="S",
        scenario_dist={},
        iterations=10_000,  # never reached: no end-of-run validation inside the timed iterations
        num_env_runners=runners,
        num_envs_per_env_runner=args.envs,
        instances_per_episode=args.instances_per_episode,
        train_batch_size=args.train_batch_size,
        minibatch_size=args.minibatch_size,
        num_epochs=args.epochs,
        num_learners=learners,
        overlap=overlap,
        trim_padding=trim,
        baseline="critic",  # as measured in benchmarks/results/scaling.json: one rollout per instance
        val_size=1,
        val_expert=None,
        eval_every=10_000,
        seed=0,
    )


def run_grid_point(args: argparse.Namespace, point: tuple, root: Path) -> dict[str, Any]:
    from lambo_ray.rl.pretrain import Pretrainer

    name, runners, learners, overlap, trim = point
    cfg = grid_config(args, runners, learners, overlap, trim)
    out = root / f"r{runners}l{learners}{'o' if overlap else 's'}{'t' if trim else 'p'}"
    t0 = time.perf_counter()
    trainer = Pretrainer(cfg, out, progress=False)
    build_s = time.perf_counter() - t0
    try:
        for _ in range(args.warmup):
            trainer.train_iteration()
        timed = [trainer.train_iteration() for _ in range(args.iterations)]
    finally:
        trainer.close()
        shutil.rmtree(out, ignore_errors=True)
    wall = sum(m["time_s"] for m in timed)
    return {
        "step": name,
        "env_runners": runners,
        "learners": learners,
        "instances_per_s": sum(m["instances"] for m in timed) / wall,
        "sample_wait_s": float(np.mean([m.get("timers/lambo_sample_wait_s", np.nan) for m in timed])),
        "learn_s": float(np.mean([m.get("timers/lambo_learn_s", np.nan) for m in timed])),
        "iteration_s": wall / len(timed),
        "build_s": build_s,
    }


# ----------------------------------------------------------------------------------------------
# 3. Memory budget
# ----------------------------------------------------------------------------------------------
def activation_bytes(scale: str, rows: int, n: int, m: int) -> int:
    """Bytes of the activations autograd saves in the learner's forward pass (encoder + teacher forcing)
    of ``rows`` cells of n UEs x m servers, counted on the meta device (the features of a real generated
    cell, moved there). Saved weights (a linear layer keeps its weight for the backward pass) are not
    activations and are left out; a tensor saved by two operations counts twice, so this is an upper
    bound."""
    from lambo_ray.mec.generator import generate
    from lambo_ray.mec.scenario import ScenarioConfig, default_capacities
    from lambo_ray.policy import SCALES, LamboPolicy, featurize

    cell = ScenarioConfig(n_ues=n, n_servers=m, capacities_cps=default_capacities(m))
    pb = featurize([generate(cell, np.random.default_rng(0))] * rows, "min_energy").to("meta")
    with torch.device("meta"):
        policy = LamboPolicy(SCALES[scale])
        target = torch.zeros(rows, n, dtype=torch.long)
        share = torch.zeros(rows, n, dtype=torch.float64)
    total = [0]
    params = {id(q) for q in policy.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t
        while base._base is not None:
            base = base._base
        if id(base) not in params and id(t) not in params:
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        policy.teacher_forced(pb, policy.encode(pb), target, share)
    return total[0]


def memory_budget(minibatch: int) -> list[dict[str, Any]]:
    from lambo_ray.policy import count_parameters

    gb = 1e9
    rows = []
    for scale in ("S", "M", "L"):
        params = count_parameters(scale)
        act_max = activation_bytes(scale, 1, 200, 10) * minibatch
        act_mean = activation_bytes(scale, 1, 63, 6) * minibatch
        state = 16 * params  # fp32 weights 4 + gradients 4 + Adam moments 8 bytes per parameter
        rows.append(
            {
                "scale": scale,
                "parameters": params,
                "weights_fp32_gb": 4 * params / gb,
                "adam_state_gb": 8 * params / gb,
                "gradients_gb": 4 * params / gb,
                "minibatch": minibatch,
                "activations_gb_at_N200_M10": act_max / gb,
                "activations_gb_at_N63_M6": act_mean / gb,
                "total_fp32_gb_at_N200_M10": (state + act_max) / gb,
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------
GRID_COLUMNS = ["env_runners", "learners", "step", "instances_per_s", "speedup_vs_padded_sequential"]
GRID_COLUMNS += ["speedup_vs_sequential_1_0", "sample_wait_s", "learn_s"]


def print_tables(path: Path) -> None:
    """The README's tables (Markdown) from a result file, so the README shows exactly what was measured."""
    import json

    from lambo_ray.results import markdown_table

    doc = json.loads(path.read_text())
    print(markdown_table(doc["rows"], GRID_COLUMNS))
    print(markdown_table(doc["components"]))
    print(f"env step: {doc['env_step_ms']:.2f} ms per instance\n")
    print(markdown_table(doc["memory"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/scaling.json"))
    p.add_argument("--iterations", type=int, default=3, help="timed iterations per grid point")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per grid point (the first)")
    p.add_argument("--train-batch-size", type=int, default=256)
    p.add_argument("--minibatch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--envs", type=int, default=32, help="env replicas per env runner")
    p.add_argument("--instances-per-episode", type=int, default=64)
    p.add_argument("--component-rows", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
    p.add_argument("--tables", type=Path, help="only print the README tables of this result file")
    args = p.parse_args()
    if args.tables:
        print_tables(args.tables)
        return
    if args.quick:
        args.iterations, args.train_batch_size, args.minibatch_size, args.component_rows = 1, 64, 32, 16
        args.envs, args.instances_per_episode = 8, 8
    torch.set_num_threads(1)
    start, load_before = time.perf_counter(), os.getloadavg()

    memory = memory_budget(args.minibatch_size)
    print_table(memory, title="Training memory budget (fp32)")
    components = [*module_costs("S", args.component_rows, 2), *module_costs("M", args.component_rows // 2, 1)]
    env_ms = 1000 * env_step_cost(50 if args.quick else 200)
    print_table(components, title=f"Per-instance costs, one thread (env step: {env_ms:.2f} ms)")

    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)  # logical CPUs: runners + learners
    root = Path(tempfile.mkdtemp(prefix="lambo-scaling-"))
    try:
        grid = [run_grid_point(args, point, root) for point in GRID]
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    base = grid[0]["instances_per_s"]
    seq = grid[1]["instances_per_s"]
    for row in grid:
        row["speedup_vs_padded_sequential"] = row["instances_per_s"] / base
        row["speedup_vs_sequential_1_0"] = row["instances_per_s"] / seq
    print_table(grid, title="LAMBO-S iterations on the default distribution")
    write_results(
        args.out,
        grid,
        components=components,
        env_step_ms=env_ms,
        memory=memory,
        settings={k: v for k, v in vars(args).items() if k != "out"},
        load_average_before=list(load_before),
        load_average_after=list(os.getloadavg()),
        total_wall_s=time.perf_counter() - start,
    )
    print(f"wrote {args.out} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
