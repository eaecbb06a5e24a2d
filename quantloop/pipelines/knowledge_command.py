"""`quantloop knowledge`: show the store (atom counts by kind, file size, load time), query it with a MeTTa
pattern, or forget a model."""

from __future__ import annotations

import argparse

from quantloop.pipelines.report_format import table
from quantloop.tools.knowledge import KnowledgeRequest, knowledge


def cmd_knowledge(a) -> int:
    if a.action == "forget":
        a.model, a.pattern = a.pattern, None
    r = knowledge(KnowledgeRequest(action=a.action, pattern=a.pattern, model=a.model, limit=a.limit, store=a.store))
    state = "on" if r.enabled else f"off ({r.note})"
    print(f"store: {r.path}  ({r.file_bytes:,} bytes, {r.atoms:,} atoms in {r.shards} spaces, loaded in {r.load_s:.3f} s; memory {state})")
    if a.action == "show":
        print(table(["kind", "atoms"], [[k, f"{n:,}"] for k, n in r.by_kind.items()]))
    elif a.action == "query":
        for m in r.matches:
            print(m)
        print(f"{r.matched} atom(s) matched" + (f", the first {len(r.matches)} shown (--limit)" if r.matched > len(r.matches) else ""))
    else:
        print(f"forgot {a.model}: {r.removed} atom(s) removed")
    return 0


def add_knowledge_command(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "knowledge", help="the memory across runs: show the store, query it with a MeTTa pattern, forget a model",
        description="The knowledge store (an OpenCog Hyperon AtomSpace in SLM/knowledge/atomspace.metta) keeps what runs "
                    "measured and decided: (Model ...), (Tensor ...), (Measurement ...), (Attempt ...), (Front ...) atoms. "
                    "See docs/knowledge.md.", epilog="Models and text are local only; nothing is fetched from a model hub.")
    s.add_argument("action", choices=["show", "query", "forget"], nargs="?", default="show",
                   help="show (default): atom counts by kind, file size, load time; query PATTERN; forget MODEL")
    s.add_argument("pattern", nargs="?", default=None,
                   help="query: a MeTTa pattern, e.g. '(Measurement $d $u \"ffn_down\" $l \"Q2_K\" $t $tv $k)'; forget: the model")
    s.add_argument("--limit", type=int, default=50, help="query: print at most this many atoms (default: 50)")
    s.add_argument("--store", help="the store file (default: SLM/knowledge/atomspace.metta, or $QUANTLOOP_KNOWLEDGE)")
    s.set_defaults(func=cmd_knowledge, model=None)
    return s
