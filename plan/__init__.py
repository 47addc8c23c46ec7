"""Model import and deployment planning (the only layer that imports torch)."""

from .importer import AffineMap, ImportedModel, from_pytorch
from .planner import Plan, plan_model, plan_pytorch

__all__ = ["AffineMap", "ImportedModel", "Plan", "from_pytorch", "plan_model", "plan_pytorch"]
