"""The knowledge tool: what the store holds (atom counts by kind, file size, load time), the atoms a MeTTa pattern
matches, or a model forgotten. One plain function, pydantic in and out."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from quantloop.errors import InputError
from quantloop.knowledge.store import KnowledgeStore, default_path
from quantloop.schemas import Strict


class KnowledgeRequest(Strict):
    action: Literal["show", "query", "forget"] = Field("show", description="show: counts, size, load time; query: the atoms a "
                                                                           "MeTTa pattern matches; forget: remove a model's atoms")
    pattern: str | None = Field(None, description="query: a MeTTa pattern, variables as $name, e.g. "
                                                  "'(Measurement $d $u \"ffn_down\" $l \"Q2_K\" $t $tv $k)'")
    model: str | None = Field(None, description="forget: the model's name or weights digest")
    limit: int = Field(50, ge=1, description="query: at most this many atoms returned")
    store: str | None = Field(None, description="the store file (default: SLM/knowledge/atomspace.metta)")


class KnowledgeReport(Strict):
    path: str
    enabled: bool
    note: str = ""
    atoms: int
    by_kind: dict[str, int]
    shards: int
    file_bytes: int
    load_s: float
    matches: list[str] = Field(default_factory=list, description="query: the matching atoms as MeTTa text")
    matched: int = 0
    removed: int = 0


def knowledge(req: KnowledgeRequest) -> KnowledgeReport:
    path = req.store or str(default_path())
    warnings: list[str] = []
    store = KnowledgeStore.open(path, on_warning=warnings.append)
    matches, removed = [], 0
    if req.action == "query":
        if not req.pattern:
            raise InputError(None, "no pattern given", "pass a MeTTa pattern such as '(Model $digest $name $arch $family $params)'")
        try:
            atoms = store.query(req.pattern)
        except Exception as e:  # noqa: BLE001 — hyperon's parser raises SyntaxError or others on a malformed pattern
            raise InputError(None, f"not a MeTTa pattern: {req.pattern!r} ({str(e)[:80]})",
                             "write one expression, variables as $name, strings in double quotes") from None
        matches = [str(a) for a in atoms]
    elif req.action == "forget":
        if not req.model:
            raise InputError(None, "no model given", "pass the model's name or digest (see `quantloop knowledge show`)")
        removed = store.forget(req.model)
        if removed == 0 and store.enabled:
            names = ", ".join(sorted({m.name for m in store.models()})) or "none"
            raise InputError(store.path, f"no model named or digested '{req.model}' in the store", f"models held: {names}")
    s = store.stats()
    return KnowledgeReport(path=path, enabled=s["enabled"], note=s["note"] or "; ".join(warnings), atoms=s["atoms"],
                           by_kind=s["by_kind"], shards=s["shards"], file_bytes=s["file_bytes"], load_s=s["load_s"],
                           matches=matches[:req.limit], matched=len(matches), removed=removed)
