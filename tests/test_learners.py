"""Learners as resources: data-parallel remote learners, mixed precision, padding trim, group baseline.

References: the single-learner update on the same fixed batch (for K = 2 learners), the fp32 loss (for
bf16), the padded forward pass (for the trimmed one), group means written out with numpy.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lambo_ray.errors import LamboInputError
from lambo_ray.rl.env import MecEnv

SMALL = {"n_ues": 8, "n_servers": 2, "capacities_cps": [1.5e10, 3e10]}


def tiny_config(**kw):
    from lambo_ray.rl.config import PretrainConfig

    base = dict(
        scenario=dict(SMALL),
        iterations=1,
        num_env_runners=0,
        num_envs_per_env_runner=8,
        instances_per_episode=8,
        train_batch_size=64,
        minibatch_size=64,
        num_epochs=2,
        val_size=4,
        val_expert=None,
        seed=5,
    )
    base.update(kw)
    return PretrainConfig(**base)


# ----------------------------------------------------------------------------------------------
# Data-parallel learners (2 remote learner actors, gloo) against one learner
# ----------------------------------------------------------------------------------------------
def fixed_episodes(cfg, count: int):
    """``count`` env steps sampled once by a driver-side env runner with the initial policy."""
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    from lambo_ray.rl.pretrain import build_algo_config

    runner = SingleAgentEnvRunner(config=build_algo_config(cfg))
    try:
        return runner.sample(num_timesteps=count), runner.module.get_state()
    finally:
        runner.stop()


def learner_group(cfg, initial_policy_state):
    """A LearnerGroup for ``cfg`` whose actor weights are the sampling policy's (so the first epoch's PPO
    ratios are 1), critic as initialised."""
    from lambo_ray.rl.pretrain import MODULE_ID, build_algo_config

    env = MecEnv(cfg.env_config().to_dict())
    group = build_algo_config(cfg).build_learner_group(spaces={MODULE_ID: (env.observation_space, env.action_space)})
    weights = dict(group.get_weights()[MODULE_ID])
    weights.update({k: v for k, v in initial_policy_state.items() if k.startswith("policy.")})
    group.set_weights({MODULE_ID: weights})
    return group


def update(group, episodes, rows: int, epochs: int = 1):
    """One update on a copy of ``episodes`` (a local learner's connector appends the bootstrap step to the
    episodes it is given) in minibatches of ``rows`` rows (bootstrap rows included: one per episode)."""
    return group.update(episodes=copy.deepcopy(episodes), num_epochs=epochs, minibatch_size=rows)


def _losses(results, key):
    """The value of ``key`` of every learner (logged once per minibatch, with window 1)."""
    from lambo_ray.rl.pretrain import MODULE_ID

    return [float(r[MODULE_ID][key].peek()) for r in results]


@pytest.mark.slow
def test_two_remote_learners_stay_identical_and_match_one_learner(ray_session):
    """K = 2 learner actors (gloo all-reduce) against one learner, one full-batch step on 64 fixed steps
    (8 episodes of 8, + 8 bootstrap rows)."""
    from lambo_ray.rl.pretrain import MODULE_ID

    one, two = tiny_config(lr=1e-3), tiny_config(lr=1e-3, num_learners=2)
    probe = tiny_config(lr=1e-30)  # a learner that only measures: its step is nil
    episodes, init_state = fixed_episodes(one, 64)
    group1, group2, judge = (learner_group(c, init_state) for c in (one, two, probe))
    start = {k: np.array(v) for k, v in group1.get_weights()[MODULE_ID].items()}
    group2.set_weights({MODULE_ID: start})

    def loss_at(weights):
        judge.set_weights({MODULE_ID: weights})
        res = update(judge, episodes, 72)
        return {k: _losses(res, k)[0] for k in ("total_loss", "vf_off_loss")}

    try:
        assert group2.is_remote and len(group2) == 2 and not group1.is_remote
        res1, res2 = update(group1, episodes, 72), update(group2, episodes, 36)
        # The loss before the step: each learner saw half of the rows, and the mean of their losses is the
        # single learner's loss (same weights, same rows; only the float summation order differs).
        assert _losses(res2, "valid_rows") == [32.0, 32.0] and _losses(res1, "valid_rows") == [64.0]
        for key in ("total_loss", "vf_off_loss", "vf_alloc_loss", "entropy_target"):
            assert float(np.mean(_losses(res2, key))) == pytest.approx(_losses(res1, key)[0], rel=1e-5, abs=1e-6), key
        # After the step both learner actors hold bit-identical weights (gradients all-reduced).
        states = group2.foreach_learner(lambda learner: learner.get_state(components="rl_module"))
        w_a, w_b = (r.get()["rl_module"][MODULE_ID] for r in states)
        for k in w_a:
            np.testing.assert_array_equal(np.asarray(w_a[k]), np.asarray(w_b[k]), err_msg=k)
        # The step itself equals one learner's step on the whole batch: gradients are averaged and the
        # advantages standardised over both halves together. Measured: weights within 4e-7 of each other
        # after a step of 1e-3, the loss on the fixed batch afterwards (same judge) within 2e-6 relative.
        w1 = group1.get_weights()[MODULE_ID]
        assert max(float(np.abs(np.asarray(w1[k]) - start[k]).max()) for k in start) > 5e-4  # it moved
        for k in start:
            np.testing.assert_allclose(np.asarray(w_a[k]), np.asarray(w1[k]), rtol=0, atol=1e-5, err_msg=k)
        before, after1, after2 = loss_at(start), loss_at(w1), loss_at(w_a)
        assert after1["vf_off_loss"] < 0.7 * before["vf_off_loss"]
        assert after2["total_loss"] == pytest.approx(after1["total_loss"], rel=1e-4)
        assert after2["vf_off_loss"] == pytest.approx(after1["vf_off_loss"], rel=1e-4)
    finally:
        for g in (group2, group1, judge):
            g.shutdown()


def test_bf16_autocast_loss_matches_fp32(ray_session):
    """Mixed precision on CPU (bf16 encoder): same weights, same fixed batch, every loss term within 1% of
    fp32 (measured: 2e-4 relative at most), and the PPO ratios of the unchanged policy stay 1 (policy
    loss ~0: the log-probabilities are computed in float32)."""
    from lambo_ray.rl.pretrain import MODULE_ID

    episodes, init_state = fixed_episodes(tiny_config(), 64)
    reference = None
    losses = {}
    for precision in ("fp32", "bf16"):
        group = learner_group(tiny_config(precision=precision), init_state)
        try:
            if reference is None:
                reference = {k: np.array(v) for k, v in group.get_weights()[MODULE_ID].items()}
            group.set_weights({MODULE_ID: reference})
            res = update(group, episodes, 72)
            losses[precision] = {k: _losses(res, k)[0] for k in LOSS_TERMS}
        finally:
            group.shutdown()
    for key, value in losses["fp32"].items():
        assert losses["bf16"][key] == pytest.approx(value, rel=1e-2, abs=1e-4), key


LOSS_TERMS = ("total_loss", "vf_off_loss", "vf_alloc_loss", "entropy_target", "entropy_share", "policy_loss")


# ----------------------------------------------------------------------------------------------
# Config validation (no Ray)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(num_learners=3), "divisible by num_learners 3"),
        (dict(precision="fp16"), "fp16 needs GPU learners"),
        (dict(precision="int8"), "precision must be one of"),
        (dict(baseline="pomo"), "baseline must be one of"),
        (dict(baseline="group", group_size=1), "group_size must be >= 2"),
        (dict(baseline="group", group_size=3), "multiples of group_size 3"),
        (dict(num_learners=-1), "must be >= 0"),
        (dict(chunk_rows=-2), "chunk_rows must be >= 0"),
    ],
)
def test_bad_learner_settings_are_clear_errors(kw, match):
    with pytest.raises(LamboInputError, match=match):
        tiny_config(**kw)


def test_batch_sizes_are_split_over_learners():
    assert tiny_config(num_learners=2).learner_batch_sizes() == (32, 32)
    assert tiny_config(num_learners=0).learner_batch_sizes() == (64, 64)
    cfg = tiny_config(num_learners=2, num_gpus_per_learner=1, precision="fp16")
    from lambo_ray.rl.pretrain import build_algo_config

    algo_cfg = build_algo_config(cfg)
    assert algo_cfg.num_learners == 2 and algo_cfg.num_gpus_per_learner == 1
    assert algo_cfg.num_gpus_per_env_runner == 0 and algo_cfg._torch_grad_scaler_class is torch.amp.GradScaler
    assert algo_cfg.train_batch_size_per_learner == 32 and algo_cfg.total_train_batch_size == 64


# ----------------------------------------------------------------------------------------------
# Padding trim (no Ray): the trimmed, size-chunked forward passes equal the padded ones
# ----------------------------------------------------------------------------------------------
MIXED = {"n_ues": [4, 30], "n_servers": [2, 5], "paper_prob": 0.0, "base": SMALL}


def mixed_module(trim_padding: bool, chunk_rows: int):
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from lambo_ray.policy import SCALES
    from lambo_ray.rl.module import LamboRLModule, module_model_config

    env = MecEnv({"scenario_dist": MIXED, "n_max": 40, "m_max": 6, "seed": 2})
    torch.manual_seed(0)
    spec = RLModuleSpec(
        module_class=LamboRLModule,
        observation_space=env.observation_space,
        action_space=env.action_space,
        model_config=module_model_config(SCALES["S"], 2, trim_padding, chunk_rows),
    )
    return env, spec.build()


def test_trimmed_chunked_forward_passes_equal_the_padded_ones():
    from ray.rllib.core.columns import Columns

    env, padded = mixed_module(False, 0)
    obs = [env.reset(seed=s)[0] for s in range(24)]
    sizes = [int(o["ue_mask"].sum()) for o in obs]
    assert max(sizes) < 40 and min(sizes) < 15  # cells of several sizes, all smaller than the padding
    batch = {Columns.OBS: {k: torch.from_numpy(np.stack([o[k] for o in obs])) for k in obs[0]}}
    ref_greedy = padded.forward_inference(batch)[Columns.ACTIONS]
    sampled = padded.forward_exploration(batch)
    # The row with the fewest servers gets the action of the row with the most, as RLlib's bootstrap row
    # gets the previous step's action: a target that names a server this row does not have.
    servers = [int(o["server_mask"].sum()) for o in obs]
    small, big = int(np.argmin(servers)), int(np.argmax(servers))
    for key in ("target", "share"):
        sampled[Columns.ACTIONS][key][small] = sampled[Columns.ACTIONS][key][big]
    sampled["u"][small] = sampled["u"][big]
    assert int(sampled[Columns.ACTIONS]["target"][small].max()) > servers[small]
    others = [i for i in range(len(obs)) if i != small]
    train_batch = {**batch, Columns.ACTIONS: sampled[Columns.ACTIONS], "u": sampled["u"]}
    ref_train = padded.forward_train(train_batch)
    for trim_padding, rows in ((True, 0), (True, 1), (True, 5), (True, 64)):
        _, module = mixed_module(trim_padding, rows)
        module.set_state(padded.get_state())
        greedy = module.forward_inference(batch)[Columns.ACTIONS]
        assert greedy["target"].shape == (24, 40)
        torch.testing.assert_close(greedy["target"], ref_greedy["target"], rtol=0, atol=0)
        torch.testing.assert_close(greedy["share"], ref_greedy["share"], rtol=0, atol=1e-6)
        train = module.forward_train(train_batch)
        for key in ("logp_target", "logp_share", "entropy_target", "entropy_share", "vf"):
            torch.testing.assert_close(train[key][others], ref_train[key][others], rtol=0, atol=1e-5, msg=key)
        torch.testing.assert_close(module.compute_values(batch), padded.compute_values(batch), rtol=0, atol=1e-5)
        # Sampling in chunks returns the action shape, padding as the padded pass leaves it.
        out = module.forward_exploration(batch)
        real = train_batch[Columns.OBS]["ue_mask"] > 0.5
        assert out[Columns.ACTIONS]["target"].shape == (24, 40)
        assert int(out[Columns.ACTIONS]["target"][~real].abs().sum()) == 0
        assert torch.all(out["u"][~real] == 0.5)
        own = module.forward_train({**batch, Columns.ACTIONS: out[Columns.ACTIONS], "u": out["u"]})
        logp = (own["logp_target"] + own["logp_share"]).sum(-1)
        torch.testing.assert_close(logp, out[Columns.ACTION_LOGP], rtol=0, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# Group baseline (no Ray)
# ----------------------------------------------------------------------------------------------
def test_env_repeats_each_instance_group_size_times():
    env = MecEnv({"scenario": SMALL, "n_max": 10, "m_max": 3, "instances_per_episode": 6, "group_size": 3})
    obs, _ = env.reset(seed=4)
    action = {"target": np.zeros(10, dtype=np.int64), "share": np.zeros(10, dtype=np.float32)}
    seen = []
    for k in range(6):
        inst = env.instance
        nxt, reward, _, trunc, info = env.step(action)
        seen.append((id(inst), info["group_id"], reward))
        assert trunc == (k == 5)
        if k % 3 != 2:  # the same instance, observation and group id again
            assert env.instance is inst
            for key in obs:
                np.testing.assert_array_equal(nxt[key], obs[key])
        obs = nxt
    assert seen[0][:2] == seen[1][:2] == seen[2][:2] and seen[3][:2] == seen[4][:2] == seen[5][:2]
    assert seen[0][1] != seen[3][1] and seen[0][0] != seen[3][0]
    assert seen[0][2] == seen[1][2]  # same instance, same (all-local) decision: same reward
    with pytest.raises(LamboInputError, match="group_size"):
        MecEnv({"scenario": SMALL, "n_max": 10, "m_max": 3, "instances_per_episode": 6, "group_size": 4})


def test_group_means_and_group_advantages():
    from ray.rllib.core.columns import Columns
    from ray.rllib.evaluation.postprocessing import Postprocessing

    from lambo_ray.rl.learner import GROUP, R_OFF, OneStepAdvantages, group_means

    rng = np.random.default_rng(0)
    group = np.array([7, 7, 7, 9, 9, 9, 5, 3, 3, 0])  # group 5 has one row; the last row is a bootstrap row
    mask = np.array([True] * 9 + [False])
    reward, r_off = rng.normal(size=10), rng.normal(size=10)
    targets = torch.tensor(np.stack([r_off, reward - r_off], -1))
    mean, has_peer = group_means(targets, torch.tensor(group), torch.tensor(mask))
    for i in range(9):
        members = (group == group[i]) & mask
        np.testing.assert_allclose(mean[i].numpy(), targets.numpy()[members].mean(0))
    assert has_peer.tolist() == [True] * 6 + [False, True, True, False]

    class Critic:  # values the connector must ignore with the group baseline
        def unwrapped(self):
            return self

        def compute_head_values(self, batch):
            return torch.full((10, 2), 123.0, dtype=torch.float64)

    batch = {
        "p": {
            Columns.LOSS_MASK: torch.tensor(mask),
            Columns.REWARDS: torch.tensor(reward),
            R_OFF: torch.tensor(r_off),
            GROUP: torch.tensor(group),
            "feasible": torch.ones(10),
            Columns.OBS: {"prompt": torch.zeros(10, dtype=torch.long)},
        }
    }
    out = OneStepAdvantages(baseline="group")(rl_module={"p": Critic()}, batch=batch, episodes=[])["p"]
    adv = out[Postprocessing.ADVANTAGES].numpy()
    raw = np.where(has_peer.numpy()[:, None], targets.numpy() - mean.numpy(), 0.0)
    want = (raw - raw[mask].mean(0)) / raw[mask].std(0, ddof=1)
    np.testing.assert_allclose(adv[mask], want[mask], atol=1e-9)
    assert adv[6].tolist() == pytest.approx(want[6].tolist())  # the lone row: raw advantage 0, standardised
    np.testing.assert_allclose(out[Postprocessing.VALUE_TARGETS].numpy()[mask], targets.numpy()[mask])


# ----------------------------------------------------------------------------------------------
# Cluster recipes (no Ray): their `lambo pretrain` commands parse into valid configs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,learners,gpus", [("rayjob-pretrain.yaml", 1, 1.0), ("rayjob-pretrain-l.yaml", 4, 1.0)])
def test_cluster_recipes_run_valid_pretrain_commands(name, learners, gpus):
    import shlex
    from pathlib import Path

    import yaml

    from lambo_ray.cli import build_parser
    from lambo_ray.commands.pretrain import config_from_args

    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster" / "kuberay" / name).read_text())
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["lambo", "pretrain"]
    cfg = config_from_args(build_parser("pretrain").parse_args(argv[1:]))
    assert cfg.num_learners == learners and cfg.num_gpus_per_learner == gpus and cfg.precision == "bf16"
    groups = {g["groupName"]: g for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    gpu_pods = groups["gpu"]["replicas"]
    per_pod = int(groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert gpu_pods * per_pod >= cfg.num_learners * cfg.num_gpus_per_learner  # every learner gets its GPU
    cpu = groups["cpu"]
    cpus = cpu["replicas"] * int(cpu["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert cpus >= cfg.num_env_runners  # one CPU per env runner
    assert groups["gpu"]["rayStartParams"].get("num-cpus") == "0" and cfg.num_cpus_per_learner == 0


def test_memory_budget_of_the_scaling_benchmark_counts_activations_without_allocating():
    """benchmarks/scaling.py measures L's activations on the meta device: they grow with the cell and the
    model, and L is counted without allocating its 4 GB of weights."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling.py"
    spec = importlib.util.spec_from_file_location("scaling_benchmark", path)
    scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling)
    small, large = scaling.activation_bytes("S", 1, 20, 3), scaling.activation_bytes("S", 1, 60, 6)
    assert 0 < small < large and scaling.activation_bytes("S", 2, 20, 3) == 2 * small
    assert scaling.activation_bytes("L", 1, 20, 3) > 20 * small
