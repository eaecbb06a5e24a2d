"""The benchmark tasks, as the scoring side uses them: the registry (name -> TaskInfo: group, source, split,
licence, choices, chance level, metric, the lm-eval task it follows), the groups, `expand(names)` turning groups
into tasks, and `task_configs(names)`, each installed task's lm-evaluation-harness config, checked by sha256."""

from quantloop.benchmarks.catalog import DEFAULT_SUITE, GROUPS, TASKS, TaskInfo, expand
from quantloop.benchmarks.configs import task_configs

__all__ = ["DEFAULT_SUITE", "GROUPS", "TASKS", "TaskInfo", "expand", "task_configs"]
