"""ACRL pretraining: env reward and its split, module log-probs, learner pipeline, training, checkpoints.

References are independent of the code under test: objectives come straight from the evaluator,
optimal shares from the water-filling of ``mec.shares``, sampled log-probs from the decoder loop.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.evaluator import evaluate
from lambo_ray.mec.generator import generate_many
from lambo_ray.mec.instance import PROMPTS
from lambo_ray.mec.scenario import ScenarioConfig
from lambo_ray.mec.shares import optimal_shares
from lambo_ray.rl.env import MecEnv, best_shares, observe, reward_parts, violation_measure

SMALL = {"n_ues": 8, "n_servers": 2, "capacities_cps": [1.5e10, 3e10]}


def expected_reward(inst, prompt, target, share, penalty):
    """The reward formula of rl/env.py, written out from the evaluator alone."""
    zeros = np.zeros(inst.n_ues)
    ref = evaluate(inst, zeros.astype(int), zeros).objective(prompt)
    ev = evaluate(inst, target, share)
    obj = ev.objective(prompt)
    gain = -1.0 if not np.isfinite(obj) else float(np.clip((ref - obj) / ref, -1.0, 1.0))
    size = 0.0
    for v in ev.violations:
        rel = {"deadline": lambda v: v["excess_s"] / v["deadline_s"], "capacity": lambda v: v["excess"]}.get(
            v["constraint"], lambda v: 1.0
        )(v)
        size += 1.0 + min(rel, 1.0)
    return gain - penalty * size


# ----------------------------------------------------------------------------------------------
# Reward and its decomposition (no Ray)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", ["min_latency", "min_energy"])
def test_reward_split_is_exact_and_matches_the_evaluator(small_instances, rng, prompt):
    for inst in small_instances:
        for _ in range(20):
            target = rng.integers(0, inst.n_servers + 1, inst.n_ues)
            share = np.where(target > 0, rng.uniform(0.01, 0.6, inst.n_ues), 0.0)
            parts = reward_parts(inst, prompt, target, share, penalty=0.1)
            assert parts.r_off + parts.r_alloc == pytest.approx(parts.reward, abs=1e-12)
            assert parts.reward == pytest.approx(expected_reward(inst, prompt, target, share, 0.1), abs=1e-12)
            assert parts.objective == pytest.approx(evaluate(inst, target, share).objective(prompt))
            # r_off is the reward of the same targets with water-filled optimal shares.
            opt = optimal_shares(inst, target)
            if opt is not None:
                assert parts.r_off == pytest.approx(expected_reward(inst, prompt, target, opt, 0.1), abs=1e-12)
                # ... which no share vector beats, so the allocation part is never positive.
                assert parts.r_alloc <= 1e-12
                if prompt == "min_energy" and evaluate(inst, target, share).feasible:
                    assert parts.r_alloc == pytest.approx(0.0, abs=1e-12)  # energy ignores shares


def test_best_shares_fall_back_per_server_when_minimums_overflow(small_instances):
    inst = small_instances[0]
    target = np.ones(inst.n_ues, dtype=int)  # everything on server 1
    s = best_shares(inst, target)
    assert s.sum() == pytest.approx(1.0)
    opt = optimal_shares(inst, target)
    if opt is None:  # overflow: sqrt(c)-proportional split
        np.testing.assert_allclose(s, np.sqrt(inst.cycles) / np.sqrt(inst.cycles).sum())
    else:
        np.testing.assert_allclose(s, opt)


def test_violation_measure_counts_and_sizes(small_instances):
    inst = small_instances[1]
    target = np.ones(inst.n_ues, dtype=int)
    share = np.full(inst.n_ues, 0.5)  # capacity excess n/2 - 1, probably some deadline misses
    ev = evaluate(inst, target, share)
    assert not ev.feasible
    m = violation_measure(ev)
    assert len(ev.violations) < m <= 2 * len(ev.violations)


def test_env_episode_steps_and_rewards_match_reward_parts():
    env = MecEnv({"scenario": SMALL, "n_max": 10, "m_max": 3, "instances_per_episode": 3, "seed": 5})
    obs, _ = env.reset(seed=11)
    assert env.observation_space.contains(obs)
    rng = np.random.default_rng(0)
    for k in range(3):
        inst, prompt = env.instance, env.prompt
        target = np.zeros(10, dtype=np.int64)
        target[:8] = rng.integers(0, 3, 8)
        share = rng.uniform(0.05, 0.3, 10).astype(np.float32)
        # Actions are per decode position (the observation's order); UE obs["order"][p] gets position p's.
        order = obs["order"][:8]
        t_ue, s_ue = np.zeros(8, np.int64), np.zeros(8, np.float32)
        t_ue[order], s_ue[order] = target[:8], share[:8]
        want = reward_parts(inst, prompt, t_ue, np.where(t_ue > 0, s_ue.astype(np.float64), 0.0), 0.1)
        obs, r, term, trunc, info = env.step({"target": target, "share": share})
        assert r == pytest.approx(want.reward, abs=1e-12)
        assert info["r_off"] == pytest.approx(want.r_off, abs=1e-12)
        assert info["r_off"] + info["r_alloc"] == pytest.approx(r, abs=1e-12)
        assert not term and trunc == (k == 2)
        assert env.instance is not inst  # a fresh instance after every step


def test_env_observations_reserve_capacity_with_the_plan_users_decode_with():
    """RL trains the decoder on the must-offload plan ``lambo solve`` and Serve use (local search's for
    min_energy), not on first fit's: same features as the product's featurize call, and they differ
    from first fit's where the two plans differ."""
    from lambo_ray.mec.drift import apply_drift
    from lambo_ray.policy import featurize
    from lambo_ray.policy.decoding import decode_packing

    differs = 0
    for inst in generate_many(apply_drift(ScenarioConfig(**{**SMALL, "n_ues": 10}), "deadline"), 8, seed=3):
        for prompt in PROMPTS:
            obs = observe(inst, prompt, 10, 2)
            users = featurize([inst], [prompt], 10, 2, packings=[decode_packing(inst, prompt)[0]]).to_numpy_dict()
            for key, value in users.items():
                np.testing.assert_array_equal(obs[key], value[0], err_msg=key)
            first_fit = featurize([inst], [prompt], 10, 2).to_numpy_dict()
            differs += not np.array_equal(obs["reserve"], first_fit["reserve"][0])
    assert differs > 0  # the test can tell the plans apart


def test_env_streams_are_seeded_and_distinct_per_worker():
    class Ctx(dict):
        worker_index = 0

    def first(worker, seed):
        ctx = Ctx({"scenario": SMALL, "seed": 1})
        ctx.worker_index = worker
        env = MecEnv(ctx)
        env.reset(seed=seed)
        return env.instance.cycles

    np.testing.assert_array_equal(first(1, 3), first(1, 3))
    # RLlib seeds sub-env i of worker w with seed + w + i: (w=1, i=1) and (w=2, i=0) get the same seed.
    assert not np.array_equal(first(1, 5), first(2, 5))


def test_env_rejects_instances_larger_than_the_padding():
    with pytest.raises(LamboInputError, match="n_max"):
        MecEnv({"scenario": SMALL, "n_max": 4, "m_max": 2})


# ----------------------------------------------------------------------------------------------
# RLModule (no Ray needed to build one)
# ----------------------------------------------------------------------------------------------
def build_module(heads=2, inference_only=False):
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from lambo_ray.policy import SCALES
    from lambo_ray.rl.module import LamboRLModule, module_model_config

    env = MecEnv({"scenario": SMALL, "n_max": 10, "m_max": 3})
    torch.manual_seed(0)
    spec = RLModuleSpec(
        module_class=LamboRLModule,
        observation_space=env.observation_space,
        action_space=env.action_space,
        inference_only=inference_only,
        model_config=module_model_config(SCALES["S"], heads),
    )
    return env, spec.build()


def obs_batch(env, count):
    from ray.rllib.core.columns import Columns

    obs = [env.reset(seed=s)[0] for s in range(count)]
    return {Columns.OBS: {k: torch.from_numpy(np.stack([o[k] for o in obs])) for k in obs[0]}}


def test_teacher_forced_logp_equals_sampling_logp():
    from ray.rllib.core.columns import Columns

    env, module = build_module()
    batch = obs_batch(env, 12)
    out = module.forward_exploration(batch)
    actions = out[Columns.ACTIONS]
    assert actions["target"].shape == (12, 10) and int(actions["target"][:, 8:].abs().sum()) == 0  # padding
    # As the learner sees them: float32 shares (RLlib reduces float64), the share head's sampled fractions
    # u from the extra outputs (the shares alone do not determine u: they are normalised per server).
    acts32 = {"target": actions["target"].int(), "share": actions["share"].float()}
    tr = module.forward_train({**batch, Columns.ACTIONS: acts32, "u": out["u"]})
    torch.testing.assert_close(tr["logp_target"], out["logp_target"], atol=1e-4, rtol=0)  # per UE
    torch.testing.assert_close(tr["logp_share"], out["logp_share"], atol=1e-4, rtol=0)
    total = (tr["logp_target"] + tr["logp_share"]).sum(-1)
    torch.testing.assert_close(total, out[Columns.ACTION_LOGP], atol=1e-3, rtol=0)
    assert tr["vf"].shape == (12, 2)
    assert torch.all(tr["entropy_target"] >= 0)
    # Greedy inference is deterministic, sampling is not.
    g1, g2 = module.forward_inference(batch), module.forward_inference(batch)
    torch.testing.assert_close(g1[Columns.ACTIONS]["share"], g2[Columns.ACTIONS]["share"])
    values = module.compute_values(batch)
    torch.testing.assert_close(values, module.compute_head_values(batch).sum(-1))


def test_inference_only_module_has_no_critic_and_accepts_learner_weights():
    _, learner_module = build_module()
    _, runner_module = build_module(inference_only=True)
    assert hasattr(learner_module, "critic") and not hasattr(runner_module, "critic")
    runner_module.set_state(learner_module.get_state(inference_only=True))
    for k, v in runner_module.policy.state_dict().items():
        torch.testing.assert_close(v, learner_module.policy.state_dict()[k])


def test_single_head_module_outputs_one_value():
    env, module = build_module(heads=1)
    assert module.compute_head_values(obs_batch(env, 3)).shape == (3, 1)


# ----------------------------------------------------------------------------------------------
# Training with RLlib (embedded Ray)
# ----------------------------------------------------------------------------------------------
def small_config(**kw):
    from lambo_ray.rl.config import PretrainConfig

    base = dict(
        scenario=dict(SMALL),
        iterations=3,
        num_env_runners=0,
        num_envs_per_env_runner=8,
        instances_per_episode=32,
        train_batch_size=128,
        minibatch_size=64,
        num_epochs=4,
        val_size=12,
        val_expert="exact",
        val_expert_time_limit=10.0,
        seed=3,
    )
    base.update(kw)
    return PretrainConfig(**base)


@pytest.fixture(scope="module")
def trained_run(ray_session, tmp_path_factory):
    """A short pure-ACRL run (driver-side sampling) shared by the tests below."""
    from lambo_ray.rl.pretrain import Pretrainer

    out = tmp_path_factory.mktemp("pretrain") / "run"
    trainer = Pretrainer(small_config(), out, progress=False)
    history = trainer.run()
    weights = {k: v.clone() for k, v in trainer.policy().state_dict().items()}
    trainer.close()
    return out, history, weights


def test_training_improves_the_policy_and_the_critic(trained_run):
    out, history, _ = trained_run
    init, acrl = history[0], [h for h in history if h.get("phase") == "acrl"]
    assert init["phase"] == "init" and [h["iteration"] for h in acrl] == [1, 2, 3]
    # Validation objectives are the evaluator's means over the same seeded instances: both prompts improve
    # on the untrained policy (min_energy by a wide margin: the untrained policy offloads at random).
    assert acrl[-1]["val/min_energy/objective"] < 0.9 * init["val/min_energy/objective"]
    assert acrl[-1]["val/min_latency/objective"] < init["val/min_latency/objective"]
    assert acrl[-1]["val/min_energy/gap"] < init["val/min_energy/gap"]
    # Sampled reward goes up and the critic learns (value loss down, explained variance positive).
    assert acrl[-1]["train/batch_reward_mean"] > acrl[0]["train/batch_reward_mean"]
    vf = lambda h: h["train/vf_off_loss"] + h["train/vf_alloc_loss"]  # noqa: E731
    assert vf(acrl[-1]) < vf(acrl[0])
    assert acrl[-1]["train/vf_explained_var"] > 0.0
    for h in acrl:
        assert h["instances"] == 128 and h["train/batch_feasible"] > 0.9
        assert 0 <= h["train/approx_kl"] < 1.0  # per-step policy change stays a trust region


def test_checkpoint_layout_and_policy_without_rllib(trained_run, small_instances):
    from lambo_ray.policy.checkpoint import load_policy
    from lambo_ray.policy.decoding import decide

    out, history, weights = trained_run
    state = json.loads((out / "state.json").read_text())
    assert state["iteration"] == 3 and state["config"]["scale"] == "S" and len(state["history"]) == len(history)
    assert (out / "rllib" / "lambo_state.json").exists() and list((out / "tb").iterdir())
    assert json.loads((out / "val_labels.json").read_text())["objective"].keys() == {
        "min_latency",
        "min_energy",
    }
    policy, meta = load_policy(out / "policy", expected_scale="S")
    assert meta["iteration"] == 3
    for k, v in policy.state_dict().items():
        torch.testing.assert_close(v, weights[k])
    decisions = decide(policy, generate_many(ScenarioConfig.from_dict(SMALL), 3, 0), "min_energy")
    assert all(d.stats["feasible"] for d in decisions)


def test_resume_continues_from_the_checkpoint(trained_run, tmp_path):
    from lambo_ray.rl.pretrain import Pretrainer

    src, history, weights = trained_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    # Simulate a crash between the two renames of a save: only the previous rllib/ survives.
    (out / "rllib").rename(out / ".rllib.old")
    (out / ".rllib.tmp-999").mkdir()  # and a half-written one, which must be ignored
    with pytest.raises(LamboInputError, match="--resume"):
        Pretrainer(small_config(iterations=4), out, progress=False)
    trainer = Pretrainer(small_config(iterations=4), out, resume=True, progress=False)
    try:
        assert trainer.iteration == 3 and len(trainer.history) == len(history)
        for k, v in trainer.policy().state_dict().items():
            torch.testing.assert_close(v, weights[k])
        trainer.run()
        assert trainer.iteration == 4 and trainer.history[-1]["iteration"] == 4
    finally:
        trainer.close()
    assert json.loads((out / "state.json").read_text())["iteration"] == 4
    assert (out / "rllib").exists() and not (out / ".rllib.old").exists()


def test_corrupt_or_mismatched_checkpoints_are_clear_errors(trained_run, tmp_path):
    from lambo_ray.rl.run_dir import check_run_dir

    src, _, _ = trained_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    with pytest.raises(LamboInputError, match="scale: checkpoint has 'S', requested 'M'"):
        check_run_dir(out, small_config(scale="M"), resume=True)
    with pytest.raises(LamboInputError, match="critic"):
        check_run_dir(out, small_config(critic="single_head"), resume=True)
    (out / "rllib" / "lambo_state.json").write_text("{not json")
    with pytest.raises(LamboInputError, match="unreadable lambo_state.json"):
        check_run_dir(out, small_config(), resume=True)
    (out / "rllib" / "lambo_state.json").unlink()
    with pytest.raises(LamboInputError, match="incomplete checkpoint"):
        check_run_dir(out, small_config(), resume=True)
    shutil.rmtree(out / "rllib")
    with pytest.raises(LamboInputError, match="rllib/ missing"):
        check_run_dir(out, small_config(), resume=True)


def test_broken_rllib_files_are_a_clear_error(trained_run, tmp_path, ray_session):
    from lambo_ray.rl.pretrain import Pretrainer

    src, _, _ = trained_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    for f in (out / "rllib" / "learner_group").rglob("*"):
        if f.is_file():
            f.write_bytes(b"truncated")
    with pytest.raises(LamboInputError, match="cannot restore the RLlib state"):
        Pretrainer(small_config(), out, resume=True, progress=False)


def test_cli_rejects_bad_input_before_starting_ray(tmp_path, capsys):
    from lambo_ray.cli import main

    assert main(["pretrain", "--out", str(tmp_path / "a"), "--scale", "XL"]) == 2
    assert "argument --scale: invalid choice: 'XL'" in capsys.readouterr().err
    assert main(["pretrain", "--out", str(tmp_path / "a"), "--n-ues", "60", "--n-max", "50"]) == 2
    assert "n_max=50" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    assert main(["pretrain", "--out", str(tmp_path / "f")]) == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    "critic,ratio,credit,baseline",
    [
        ("two_head", "per_ue", "total", "group"),
        ("two_head", "per_ue", "total", "critic"),
        ("single_head", "joint", "total", "group"),
        ("two_head", "per_ue", "alloc", "critic"),
    ],
)
def test_training_with_two_env_runners_improves(ray_session, tmp_path, critic, ratio, credit, baseline):
    """The distributed path: 2 env-runner actors x 8 envs sampling while the driver's learner trains
    (overlap), and the ablations."""
    from lambo_ray.rl.pretrain import Pretrainer

    trainer = Pretrainer(
        small_config(
            num_env_runners=2,
            iterations=4,
            critic=critic,
            ratio=ratio,
            share_credit=credit,
            baseline=baseline,
            entropy_bonus=critic == "two_head",
        ),
        tmp_path / "run",
        progress=False,
    )
    try:
        history = trainer.run()
    finally:
        trainer.close()
    init, last = history[0], history[-1]
    assert last["val/min_energy/objective"] < 0.9 * init["val/min_energy/objective"]
    assert last["train/batch_reward_mean"] > history[1]["train/batch_reward_mean"]
    assert all(h["instances"] == 128 for h in history[1:])


@pytest.mark.slow
def test_warm_start_reduces_the_gap_before_acrl(ray_session, tmp_path):
    from lambo_ray.rl.pretrain import Pretrainer

    trainer = Pretrainer(
        small_config(iterations=1, warm_start_labels=64, warm_start_epochs=10),
        tmp_path / "run",
        progress=False,
    )
    try:
        history = trainer.run()
    finally:
        trainer.close()
    init, warm = history[0], history[1]
    assert warm["phase"] == "warm_start"
    assert warm["warm_start/nll_last_epoch"] < warm["warm_start/nll_first_epoch"]
    assert warm["val/min_energy/gap"] < 0.5 * init["val/min_energy/gap"]


def test_warm_start_alone_depends_on_the_config_only(ray_session, tmp_path):
    """``iterations: 0`` is a warm-start-only run (how configs/lambo-s.yaml makes the shipped model): it saves
    once, and its weights are those of a policy seeded by the config and trained on the same labels outside
    RLlib, bit for bit (RLlib's own module initialisation must not leak into them)."""
    from lambo_ray.policy import LamboPolicy
    from lambo_ray.policy.checkpoint import load_policy
    from lambo_ray.rl.pretrain import Pretrainer
    from lambo_ray.rl.warm_start import LABEL_SEED_OFFSET, examples_from_labels, train_on_examples, warm_start_labels

    cfg = small_config(iterations=0, warm_start_labels=6, warm_start_epochs=2, val_expert=None, val_size=2)
    trainer = Pretrainer(cfg, tmp_path / "run", progress=False)
    try:
        history = trainer.run()
    finally:
        trainer.close()
    assert [h["phase"] for h in history] == ["init", "warm_start"]
    shipped, meta = load_policy(tmp_path / "run" / "policy")
    assert meta["iteration"] == 0

    torch.manual_seed(cfg.seed)
    direct = LamboPolicy(cfg.policy_config())
    labels = warm_start_labels(cfg, tmp_path / "run", log=lambda _: None)  # the run's cached labels
    examples = examples_from_labels(cfg, labels, cfg.seed + LABEL_SEED_OFFSET)
    train_on_examples(
        direct, examples, cfg.warm_start_epochs, cfg.warm_start_lr, cfg.warm_start_batch_ues, cfg.seed, lambda _: None
    )
    for name, value in direct.state_dict().items():
        assert torch.equal(value, shipped.state_dict()[name]), name


@pytest.mark.parametrize("ratio,critic", [("per_ue", "two_head"), ("joint", "two_head"), ("joint", "single_head")])
def test_ppo_surrogates_match_a_per_row_loop(ratio, critic):
    """The clipped surrogates of both heads against PPO's formula written out row by row and UE by UE
    (padding excluded), for the per-UE ratio and the joint ratio with one or two critic heads."""
    from lambo_ray.rl.learner import _surrogates

    g = torch.Generator().manual_seed(0)
    b, n, clip = 5, 4, 0.2
    a_t, a_s = torch.randn(b, generator=g), torch.randn(b, generator=g)
    ue = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float32)
    d_t, d_s = 0.3 * torch.randn(b, n, generator=g) * ue, 0.3 * torch.randn(b, n, generator=g) * ue
    surr_t, surr_s, clipped = _surrogates({"ratio": ratio, "critic": critic}, (a_t, a_s), (d_t, d_s), ue, clip)

    def ppo(adv: float, rho: float) -> float:
        return min(rho * adv, max(min(rho, 1 + clip), 1 - clip) * adv)

    for r in range(b):
        real = [k for k in range(n) if ue[r, k] > 0]
        if ratio == "per_ue":
            want_t = sum(ppo(float(a_t[r]), math.exp(float(d_t[r, k]))) for k in real) / len(real)
            want_s = sum(ppo(float(a_s[r]), math.exp(float(d_s[r, k]))) for k in real) / len(real)
            rhos = [(math.exp(float(d_t[r, k])), math.exp(float(d_s[r, k]))) for k in real]
            want_c = sum(abs(rt - 1) > clip or abs(rs - 1) > clip for rt, rs in rhos) / len(real)
        elif critic == "two_head":
            rho_t, rho_s = math.exp(float(d_t[r].sum())), math.exp(float(d_s[r].sum()))
            want_t, want_s = ppo(float(a_t[r]), rho_t), ppo(float(a_s[r]), rho_s)
            want_c = float(abs(rho_t - 1) > clip or abs(rho_s - 1) > clip)
        else:
            rho = math.exp(float(d_t[r].sum() + d_s[r].sum()))
            want_t, want_s, want_c = ppo(float(a_t[r]), rho), 0.0, float(abs(rho - 1) > clip)
        assert float(surr_t[r]) == pytest.approx(want_t, rel=1e-5, abs=1e-6)
        assert float(surr_s[r]) == pytest.approx(want_s, rel=1e-5, abs=1e-6)
        assert float(clipped[r]) == pytest.approx(want_c)
