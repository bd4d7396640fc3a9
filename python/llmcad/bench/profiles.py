"""Device profiles of ``llmcad bench e2e``: a memory limit and a read limit, run by the kernel.

A setting is what the rows of one table ran under (:class:`Setting`):

- ``native``: no limit; the page cache is kept cold by evicting the weight files before every target forward;
- a profile (``--profile orin-nvme,emmc``, or ``--read-limit RATE``): every row runs in its own process
  in a fresh cgroup (:mod:`llmcad.bench.cgroups`) whose memory limit is the row's ``memory_budget`` (page
  cache charged to it) and whose read throttle is set on the disk holding the models; the files are
  evicted once before each row and no thread touches the page cache while it runs;
- where cgroups cannot be written, a profile falls back to the streamer's own cap (``emulated by
  llmcad``: llmcad rows only, memory not enforced), as does ``--cap RATE``.

Profile sources are in benchmarks/README.md.

Part of llmcad.bench (tools): may import the whole package; nothing outside llmcad.bench imports it.
"""
from __future__ import annotations

import sys
from typing import NamedTuple

from llmcad.streaming.budget import format_size, parse_rate, parse_size

# name -> (read limit in bytes/s, what it stands for); sources in benchmarks/README.md
PROFILES = {
    "orin-nvme": (1.4e9, "NVMe like a Jetson Orin developer kit's, about 1.4 GB/s reads"),
    "emmc": (300e6, "eMMC 5.1, 300 MB/s reads"),
}
EMULATED = "emulated by llmcad"
KERNEL = "kernel (cgroup)"


class Setting(NamedTuple):
    """One setting: ``cap`` is the streamer's own cap (bytes/s, emulated); ``memory_limit`` (bytes) and
    ``read_limit`` (bytes/s) are kernel limits when ``enforced_by`` is :data:`KERNEL`."""

    name: str
    cap: float | None = None
    memory_limit: int | None = None
    read_limit: float | None = None
    enforced_by: str | None = None
    profile: str | None = None
    memory_budget: int | None = None  # the rows' budget when it is not the memory limit

    @property
    def kernel(self) -> bool:
        return self.enforced_by == KERNEL

    def describe(self) -> str:
        if self.kernel:
            budget = (f"the rows' memory_budget {format_size(self.memory_budget)}" if self.memory_budget
                      else "the rows' memory_budget")
            return (f"{self.profile or 'custom'}: memory limit {format_size(self.memory_limit)} ({budget}), "
                    f"reads {self.read_limit / 1e6:g} MB/s, enforced by the {KERNEL}")
        if self.cap:
            budget = f"; memory_budget {format_size(self.memory_limit)}" if self.memory_limit else ""
            return f"streamer cap {self.cap / 1e6:g} MB/s, {EMULATED} (llmcad rows only; memory not enforced{budget})"
        return "no limit (the weight files evicted before every target forward)"


def as_setting(value) -> Setting:
    """A :class:`Setting` from itself or a plain ``(name, cap)`` tuple."""
    return value if isinstance(value, Setting) else Setting(*value)


def add_arguments(p) -> None:
    p.add_argument("--profile", default=None, metavar="NAMES", help="device profiles run by the kernel, "
                   f"comma-separated: {', '.join(f'{k} ({v[1]})' for k, v in PROFILES.items())}")
    p.add_argument("--memory-limit", default=None, metavar="SIZES", help="memory limit(s) of the profiles, "
                   "comma-separated (e.g. 1GiB,2.5GiB); each is also the rows' memory_budget unless "
                   "--memory-budget is given too (default: --memory-budget)")
    p.add_argument("--read-limit", default=None, metavar="RATE", help="a custom profile reading at RATE "
                   "(300MB/s, 1.4GB/s, 300MiB/s or bytes/s)")


def make_settings(args) -> list:
    """The settings of a run, in order: native (unless --only-cap or a profile is given), each profile at
    each memory limit (None: the budget, filled by :func:`with_budget`), then --cap's. Profiles fall back
    to the streamer cap where cgroups cannot be written, and say so."""
    profiles = [p.strip() for p in (args.profile or "").split(",") if p.strip()]
    unknown = sorted(set(profiles) - set(PROFILES))
    if unknown:
        raise ValueError(f"--profile: unknown profile(s) {', '.join(unknown)}; profiles: {', '.join(PROFILES)}")
    reads = [(name, PROFILES[name][0]) for name in profiles]
    if args.read_limit:
        rate = parse_rate(args.read_limit, what="--read-limit")
        reads.append((f"read{rate / 1e6:g}MB", rate))
    if args.memory_limit and not reads:
        raise ValueError("--memory-limit needs --profile or --read-limit")
    limits = [parse_size(s.strip(), what="--memory-limit") for s in (args.memory_limit or "").split(",")
              if s.strip()] or [None]
    settings = [] if args.only_cap or reads else [Setting("native")]
    reason = cgroups_unavailable() if reads else None
    if reason:
        print(f"llmcad bench e2e: cgroups cannot be written here ({reason}); the profiles fall back to the "
              f"streamer's cap, {EMULATED} (llmcad rows only, memory not enforced)", file=sys.stderr)
    for name, rate in reads:
        for limit in limits:
            label = name if len(limits) == 1 else f"{name}@{format_size(limit).replace(' ', '')}"
            if reason:
                settings.append(Setting(f"{label}-emulated", cap=rate, memory_limit=limit, enforced_by=EMULATED,
                                        profile=name))
            else:
                settings.append(Setting(label, memory_limit=limit, read_limit=rate, enforced_by=KERNEL, profile=name))
    if args.cap:
        rate = parse_rate(args.cap, what="--cap")
        settings.append(Setting(f"cap{rate / 1e6:g}", cap=rate, enforced_by=EMULATED))
    if not settings:
        raise ValueError("--only-cap needs --cap RATE")
    return settings


def with_budget(settings: list, budget, explicit: bool = False) -> list:
    """Profiles without --memory-limit take the run's memory budget as their limit. With ``explicit``
    (both --memory-budget and --memory-limit given) the rows keep the budget under the larger or smaller limit."""
    nbytes = parse_size(budget, what="--memory-budget")
    out = []
    for s in settings:
        if s.profile and s.memory_limit is None:
            s = s._replace(memory_limit=nbytes)
        elif s.profile and explicit and s.memory_limit != nbytes:
            s = s._replace(memory_budget=nbytes)
        out.append(s)
    return out


def budget_of(setting: Setting, budget) -> str:
    """The memory_budget a row runs with under ``setting``: its memory limit (unless the run named both),
    else the run's budget."""
    return str(setting.memory_budget or setting.memory_limit or budget)


def cgroups_unavailable() -> str | None:
    """Why rows cannot run in their own cgroup here; None when they can."""
    try:
        from llmcad.bench import cgroups
    except ImportError as exc:
        return f"llmcad.bench.cgroups: {exc}"
    return cgroups.available(io=True)
