"""The OS benchmark's sources: Debian packages fetched once with `apt-get download` into the cache, unpacked with
`dpkg-deb -x`, and read: pci.ids and usb.ids, and the NAME lines of the section 1 and 8 man pages of core system
packages (parsed by man-db's `lexgrog`). Each part's items and its provenance (package, version, sha256 of the .deb
and of every file read) come back together for the manifest."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from quantloop.benchmarks.os_items import DEFAULT_SEED, device_items, man_items, parse_ids, parse_lexgrog
from quantloop.errors import InputError
from quantloop.fileio import sha256_file
from quantloop.paths import CACHE_DIR

SOURCES_DIR = CACHE_DIR / "os-sources"
# pci.ids is pinned (the version the counts come from: 2,325 vendors, 17,616 devices); the others are
# whatever the machine's apt sources hold, recorded with their sha256 in each manifest
PCI_IDS = "pci.ids=0.0~2023.04.11-1"
USB_IDS = "usb.ids"
MAN_PACKAGES = ("coreutils", "util-linux", "mount", "bsdutils", "procps", "psmisc", "iproute2", "iputils-ping",
                "net-tools", "ethtool", "kmod", "pciutils", "usbutils", "e2fsprogs", "findutils", "grep", "sed", "tar",
                "gzip", "diffutils", "passwd", "hostname", "debianutils", "dpkg", "apt", "lsof", "strace", "file",
                "less", "openssh-client", "cron", "sudo")
FIX = "run `make benchmarks` (scripts/setup-os-sources.sh installs man-db and dpkg when missing) on a Debian machine with apt sources"


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, errors="replace")
    except FileNotFoundError:
        raise InputError(cmd[0], "not found: the OS benchmark needs Debian's apt-get, dpkg-deb and man-db's lexgrog", FIX) from None
    if r.returncode != 0 and cmd[0] != "lexgrog":  # lexgrog exits 1 when one page of many has no NAME line
        last = (r.stderr.strip().splitlines() or [""])[-1][:200]
        raise InputError(" ".join(cmd[:3]), f"failed with exit code {r.returncode}: {last}", FIX)
    return r.stdout


def fetch_deb(spec: str, cache: Path = SOURCES_DIR) -> Path:
    """The .deb of `spec` ('name' or 'name=version') in the cache, downloaded with apt-get the first time."""
    name, _, version = spec.partition("=")
    pattern = f"{name}_{version.replace(':', '%3a')}_*.deb" if version else f"{name}_*.deb"
    if found := sorted(cache.glob(pattern)):
        return found[-1]
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        _run(["apt-get", "download", "-q", spec], cwd=Path(tmp))
        debs = sorted(Path(tmp).glob(f"{name}_*.deb"))
        if not debs:
            raise InputError(spec, "apt-get download wrote no .deb", FIX)
        os.replace(debs[0], cache / debs[0].name)
        return cache / debs[0].name


def deb_version(deb: Path) -> str:
    return _run(["dpkg-deb", "-f", str(deb), "Version"]).strip()


def _source(deb: Path, files: dict[str, str]) -> dict:
    return {"package": deb.name.split("_")[0], "version": deb_version(deb), "deb": deb.name,
            "deb_sha256": sha256_file(deb), "files": files}


def _ids_part(spec: str, rel: str, bus: str, seed: int, cache: Path) -> tuple[list[dict], dict]:
    deb = fetch_deb(spec, cache)
    with tempfile.TemporaryDirectory() as tmp:
        _run(["dpkg-deb", "-x", str(deb), tmp])
        path = Path(tmp) / rel
        if not path.is_file():
            raise InputError(deb, f"has no {rel}", FIX)
        text = path.read_text(encoding="utf-8", errors="replace")
        files = {"/" + rel: sha256_file(path)}
    devices = parse_ids(text)
    items = device_items(devices, bus, seed)
    stats = {"vendors_with_devices": len({d.vendor_id for d in devices}), "devices": len(devices)}
    return items, {"sources": [_source(deb, files)], **stats}


def build_pci(seed: int = DEFAULT_SEED, cache: Path = SOURCES_DIR) -> tuple[list[dict], dict]:
    return _ids_part(PCI_IDS, "usr/share/misc/pci.ids", "PCI", seed, cache)


def build_usb(seed: int = DEFAULT_SEED, cache: Path = SOURCES_DIR) -> tuple[list[dict], dict]:
    # /usr/share/misc/usb.ids is a link to the real file in /var/lib/usbutils
    return _ids_part(USB_IDS, "var/lib/usbutils/usb.ids", "USB", seed, cache)


def build_man(seed: int = DEFAULT_SEED, cache: Path = SOURCES_DIR, packages=MAN_PACKAGES) -> tuple[list[dict], dict]:
    if shutil.which("lexgrog") is None:
        raise InputError("lexgrog", "not found: man-db's lexgrog parses the man pages' NAME lines", FIX)
    entries, sources = [], []
    for pkg in packages:
        deb = fetch_deb(pkg, cache)
        with tempfile.TemporaryDirectory() as tmp:
            _run(["dpkg-deb", "-x", str(deb), tmp])
            pages = sorted(p for p in Path(tmp).glob("usr/share/man/man[18]/*") if p.is_file() and not p.is_symlink())
            files = {"/" + str(p.relative_to(tmp)): sha256_file(p) for p in pages}
            if pages:
                entries += parse_lexgrog(_run(["lexgrog", *map(str, pages)]), pkg)
        sources.append(_source(deb, files))
    items = man_items(entries, seed)
    return items, {"sources": sources, "man_pages": sum(len(s["files"]) for s in sources), "commands": len(entries)}
