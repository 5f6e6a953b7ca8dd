"""The MEC system model: scenario, generator, drift, instances, and the one evaluator."""

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.instance import PROMPTS, Decision, Instance, Prompt, check_prompt
from lambo_ray.mec.scenario import ScenarioConfig

__all__ = ["Decision", "Instance", "LamboInputError", "PROMPTS", "Prompt", "ScenarioConfig", "check_prompt"]
