"""The OS benchmark's items, built deterministically from real operating-system data: the PCI and USB ID databases
(pci.ids, usb.ids) and the one-line NAME descriptions of section 1 and 8 man pages.

Each item is one multiple-choice question with four choices: "PCI device 8086:10d3 is" -> "82574L Gigabit Network
Connection", with three other devices of the same vendor as distractors; "Which Linux command is described as ...?"
-> the command, with three other commands as distractors. Everything random (the distractors, the gold answer's
position, the order of the items) comes from a string-seeded random.Random per item, so the same sources and seed
give the same file on every machine and an item does not change when another one is added."""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

N_CHOICES = 4
DEFAULT_SEED = 30

_VENDOR = re.compile(r"^([0-9a-fA-F]{4})\s+(.+?)\s*$")
_DEVICE = re.compile(r"^\t([0-9a-fA-F]{4})\s+(.+?)\s*$")
_LEXGROG = re.compile(r'^(?P<path>.+?): "(?P<name>[^"]+?) - (?P<desc>.+)"$')


@dataclass(frozen=True)
class Device:
    vendor_id: str
    vendor: str
    device_id: str
    name: str


@dataclass(frozen=True)
class ManEntry:
    package: str
    section: str
    name: str
    description: str


def parse_ids(text: str) -> list[Device]:
    """Vendors and their devices from a pci.ids / usb.ids file (the vendor section only: it ends at the first line
    that starts with neither a hex ID nor a tab, e.g. pci.ids' 'C 00' class list). Subsystem and interface lines
    (two tabs) and comments are skipped."""
    devices, vendor = [], None
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if m := _VENDOR.match(line):
            vendor = (m.group(1).lower(), m.group(2))
        elif m := _DEVICE.match(line):
            if vendor is not None:
                devices.append(Device(vendor[0], vendor[1], m.group(1).lower(), m.group(2)))
        elif line.startswith("\t\t"):
            continue
        elif not line.startswith("\t") and vendor is not None:
            break
    return devices


def parse_lexgrog(output: str, package: str) -> list[ManEntry]:
    """man-db's `lexgrog` lines ('.../man1/ls.1.gz: "ls - list directory contents"') -> the page's own entry: the
    name equal to the page file's stem (gzip.1.gz lists gzip, gunzip and zcat: only gzip is kept)."""
    entries = []
    for line in output.splitlines():
        if not (m := _LEXGROG.match(line.strip())):
            continue
        file = m.group("path").rsplit("/", 1)[-1]
        stem, _, section = file.removesuffix(".gz").rpartition(".")
        name, desc = m.group("name").strip(), m.group("desc").strip().rstrip(".").strip()
        if name == stem and desc:
            entries.append(ManEntry(package, section[:1], name, desc))
    return entries


def _rng(seed: int, key: str) -> random.Random:
    return random.Random(f"{seed}:{key}")


def _order(items: list[dict], seed: int) -> list[dict]:
    """A fixed shuffle: by the sha256 of seed and item id, so the first N items are a random sample."""
    return sorted(items, key=lambda it: hashlib.sha256(f"{seed}:{it['id']}".encode()).hexdigest())


def _item(item_id: str, query: str, gold: str, distractors: list[str], rng: random.Random, **extra) -> dict:
    choices = list(distractors)
    pos = rng.randrange(N_CHOICES)
    choices.insert(pos, gold)
    return {"id": item_id, "query": query, "choices": choices, "gold": pos, **extra}


def device_items(devices: list[Device], bus: str, seed: int = DEFAULT_SEED) -> list[dict]:
    """One item per device of a vendor with at least four distinct device names: 'PCI device VVVV:DDDD is' -> its
    name; the distractors are three other device names of the same vendor (never the gold name: 8086:10d3 and
    8086:10f6 are both an '82574L Gigabit Network Connection', and neither is offered as the other's distractor)."""
    by_vendor: dict[str, list[Device]] = {}
    for d in devices:
        by_vendor.setdefault(d.vendor_id, []).append(d)
    items = []
    for vid, devs in by_vendor.items():
        names = sorted({d.name for d in devs})
        if len(names) < N_CHOICES:
            continue
        for d in devs:
            item_id = f"{bus.lower()}:{vid}:{d.device_id}"
            rng = _rng(seed, item_id)
            others = [n for n in names if n.lower() != d.name.lower()]
            if len(others) < N_CHOICES - 1:
                continue
            distractors = rng.sample(others, N_CHOICES - 1)
            items.append(_item(item_id, f"{bus} device {vid}:{d.device_id} is", d.name, distractors, rng,
                               vendor=d.vendor))
    return _order(items, seed)


def man_items(entries: list[ManEntry], seed: int = DEFAULT_SEED) -> list[dict]:
    """One item per command (first package wins when two ship the same name): 'Which Linux command is described as
    "DESCRIPTION"?' -> the command; the distractors are three other commands with other descriptions. Commands whose
    description names them (a giveaway) and descriptions shared by two commands (ambiguous) are left out."""
    seen, kept = set(), []
    for e in sorted(entries, key=lambda e: (e.name, e.package, e.section)):
        if e.name not in seen:
            seen.add(e.name)
            kept.append(e)
    desc_count: dict[str, int] = {}
    for e in kept:
        desc_count[e.description.lower()] = desc_count.get(e.description.lower(), 0) + 1
    usable = [e for e in kept if desc_count[e.description.lower()] == 1
              and not re.search(rf"(?<![\w-]){re.escape(e.name)}(?![\w-])", e.description, re.IGNORECASE)]
    names = sorted(e.name for e in usable)
    items = []
    for e in usable:
        item_id = f"man:{e.section}:{e.name}"
        rng = _rng(seed, item_id)
        distractors = rng.sample([n for n in names if n != e.name], N_CHOICES - 1)
        query = f'Question: Which Linux command is described as "{e.description}"?\nAnswer:'
        items.append(_item(item_id, query, e.name, distractors, rng, package=e.package, section=e.section))
    return _order(items, seed)
