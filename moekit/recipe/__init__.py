"""Training recipes: stages, phases, trainable groups, losses, optimizer and schedule, in strict YAML."""

from moekit.recipe.load import Plan, PlannedStage, load_plan
from moekit.recipe.schema import (
    GROUP_NAMES,
    Distributed,
    Losses,
    Optimizer,
    Phase,
    Pipeline,
    Recipe,
    RecipeUpcycle,
    Schedule,
    Stage,
    StageRef,
    StartFrom,
)

__all__ = [
    "GROUP_NAMES",
    "Distributed",
    "Losses",
    "Optimizer",
    "Phase",
    "Pipeline",
    "Plan",
    "PlannedStage",
    "Recipe",
    "RecipeUpcycle",
    "Schedule",
    "Stage",
    "StageRef",
    "StartFrom",
    "load_plan",
]
