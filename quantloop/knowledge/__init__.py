"""The memory across runs and models: what quantloop measured and decided, as atoms in an OpenCog Hyperon AtomSpace."""

from quantloop.knowledge.atoms import AttemptFact, FrontFact, MeasurementFact, ModelFact, TensorFact
from quantloop.knowledge.store import KnowledgeStore, Prior, default_path

__all__ = ["AttemptFact", "FrontFact", "KnowledgeStore", "MeasurementFact", "ModelFact", "Prior", "TensorFact", "default_path"]
