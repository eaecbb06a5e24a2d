"""The agent loop and the command line: graph.py (the LangGraph graph: state, nodes, edges), run.py (`quantloop run`,
resumable by run id), cli.py (the one place the CLI is assembled), search_command.py and train_command.py (the
search and training subcommands), train_slm.py (training a small Llama from scratch, or fine-tuning a prepared
model), report_format.py (terminal tables). The agents that decide, and the fallback policy, live in quantloop.agents."""
