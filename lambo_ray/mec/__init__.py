"""The MEC system model: scenario, generator, drift, instances, and the one evaluator."""
from lambo_ray.mec.errors import LamboInputError
from lambo_ray.mec.instance import Decision, Instance, PROMPTS, Prompt, check_prompt
from lambo_ray.mec.scenario import ScenarioConfig

__all__ = ["Decision", "Instance", "LamboInputError", "PROMPTS", "Prompt", "ScenarioConfig", "check_prompt"]
