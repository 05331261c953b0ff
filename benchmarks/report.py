"""Collects benchmark samples and writes RESULTS.md, results/samples.csv and the plots."""

from __future__ import annotations

import csv
import os
import platform
import statistics
import subprocess
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from cpu_floor import CORES

from cronium_nb.results import PHASES

OURS = "cronium_nb"
COLD_CACHED = f"{OURS}, cold connections (runner cached)"
TARGETS = {
    "B1": "at most 1.5x the raw asyncssh floor",
    "B2": "faster than every peer at every N",
    "B3": "cold deployment to 20 servers under 2 s",
    "B4": "at least 70% of raw asyncssh throughput, peak RSS under 300 MB",
    "B4 logs": "res.logs of the 2 million stored lines under 2 s",
    "B6 warm": "fan-out to 100 servers on warm connections under 600 ms",
    "B6 cold": "fan-out to 100 servers on new connections (runner cached) under 3 s",
    "B6 memory": "orchestrator RSS growth under 1 MB per server",
}


@dataclass
class Series:
    benchmark: str
    tool: str
    n: int
    samples: list[float]
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _floor(series: Series) -> float | None:
    """The series' median CPU floor in seconds (cpu_floor.py), if it was measured."""
    floor_ms = series.extra.get("cpu_floor_ms")
    return None if floor_ms is None else floor_ms / 1000


def _floor_cell(series: Series) -> str:
    floor = _floor(series)
    return "" if floor is None else _ms(floor)


def _floor_note(series: Series, limit_s: float | None = None) -> str:
    """`` (CPU floor X)``, saying so where the floor alone is over ``limit_s``."""
    floor = _floor(series)
    if floor is None:
        return ""
    over = f", over the {_ms(limit_s)} of the target: out of reach here" if limit_s and floor > limit_s else ""
    return f" (CPU floor {_ms(floor)}{over})"


def _command(args: list[str]) -> str:
    try:
        completed = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    return (
        (completed.stdout or completed.stderr).strip().splitlines()[0] if completed.returncode == 0 else "unavailable"
    )


def machine() -> dict[str, str]:
    memory = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())  # fmt: skip
    return {
        "CPU": f"{os.cpu_count()} x {cpu}",
        "memory": f"{int(memory.split()[1]) // 1024 // 1024} GiB",
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "Docker": _command(["docker", "version", "--format", "{{.Server.Version}}"]),
        "servers": "Debian bookworm sshd containers (linux/amd64), ports published on 127.0.0.1",
    }


class Report:
    def __init__(self, *, command: str, quick: bool) -> None:
        self.command = command
        self.quick = quick
        self.series: list[Series] = []
        self.phase_tables: dict[str, dict[str, float]] = {}
        self.duration_s = 0.0
        self.profiles: list[tuple[str, list[tuple[str, float, float]]]] = []
        self.profile_errors: list[tuple[str, str]] = []

    def add(self, benchmark: str, tool: str, n: int, samples: list[float], extra: dict | None = None) -> None:
        series = Series(benchmark, tool, n, samples, dict(extra or {}))
        self.series.append(series)
        details = ", ".join(f"{k} {v:.1f}" for k, v in series.extra.items())
        print(f"  {benchmark} {tool:<45} N={n:<3} median {_ms(series.median):>10}  {details}", flush=True)

    def phases(self, label: str, executor: Any, keep_last: bool = False) -> None:
        """B5: per-phase medians from the executor's metrics (``keep_last``: overwrite a label)."""
        metrics = executor.metrics().set_index("metric")["value"]
        if label in self.phase_tables and not keep_last:
            return
        self.phase_tables[label] = {p: float(metrics.get(f"phase.{p}.p50_s", float("nan"))) for p in PHASES}

    def add_profile(self, label: str, raw_stacks: str, top: int = 15) -> None:
        """Summarise py-spy's collapsed stacks: the functions with the largest inclusive and
        self share of the samples (idle waiting in selectors and locks left out)."""
        inclusive: dict[str, float] = defaultdict(float)
        own: dict[str, float] = defaultdict(float)
        total = 0.0
        for line in raw_stacks.splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
            if not frames or any(idle in frames[-1] for idle in IDLE_FRAMES):
                continue
            if any("_find_and_load" in f for f in frames):
                continue  # importing modules at start-up: not the work measured
            total += int(count)
            for name in {_frame_name(f) for f in frames if not any(g in f for g in GENERIC_FRAMES)}:
                inclusive[name] += int(count)
            own[_frame_name(frames[-1])] += int(count)
        ranked = sorted(inclusive, key=inclusive.get, reverse=True)[:top]
        self.profiles.append((label, [(name, inclusive[name] / total, own.get(name, 0) / total) for name in ranked]))

    def find(self, benchmark: str, tool: str, n: int = 1) -> Series | None:
        return next((s for s in self.series if (s.benchmark, s.tool, s.n) == (benchmark, tool, n)), None)

    # -- output

    def write(self, out: Path) -> None:
        results = out / "results"
        results.mkdir(parents=True, exist_ok=True)
        with open(results / "samples.csv", "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(["benchmark", "tool", "n", "sample", "seconds", *sorted({k for s in self.series
                                                                                      for k in s.extra})])  # fmt: skip
            keys = sorted({k for s in self.series for k in s.extra})
            for series in self.series:
                for index, seconds in enumerate(series.samples):
                    writer.writerow([series.benchmark, series.tool, series.n, index, f"{seconds:.6f}",
                                     *[series.extra.get(k, "") for k in keys]])  # fmt: skip
        plots = self._plots(results)
        (out / "RESULTS.md").write_text(self._markdown(plots))

    def _plots(self, results: Path) -> list[str]:
        written = []
        by_bench: dict[str, list[Series]] = defaultdict(list)
        for series in self.series:
            by_bench[series.benchmark].append(series)
        if by_bench.get("B2"):
            figure, axes = plt.subplots(figsize=(8, 5))
            tools: dict[str, list[Series]] = defaultdict(list)
            for series in by_bench["B2"]:
                tools[series.tool].append(series)
            for tool, points in tools.items():
                points.sort(key=lambda s: s.n)
                style = "-o" if tool.startswith(OURS) else "--s"
                axes.plot([s.n for s in points], [s.median * 1000 for s in points], style, label=tool)
            axes.set(xlabel="servers (N)", ylabel="wall time until all results are in (ms, median)",
                     title=f"B2 fan-out: {FANOUT_LABEL}", yscale="log")  # fmt: skip
            axes.grid(True, which="both", alpha=0.3)
            axes.legend(fontsize=8)
            figure.tight_layout()
            figure.savefig(results / "b2-fanout.png", dpi=110)
            plt.close(figure)
            written.append("results/b2-fanout.png")
        for bench, unit, title in (("B1", 1000, "B1 warm single-server latency of `true` (ms, median)"),
                                   ("B4", None, "B4 streaming 200 MB of lines (MB/s, median)")):  # fmt: skip
            if not by_bench.get(bench):
                continue
            figure, axes = plt.subplots(figsize=(8, 3.5))
            labels = [s.tool for s in by_bench[bench]]
            values = [s.median * unit if unit else s.extra["mb_per_s"] for s in by_bench[bench]]
            axes.barh(labels, values, color=["#0969da" if label.startswith(OURS) else "#8c959f" for label in labels])
            for y, value in enumerate(values):
                axes.text(value, y, f" {value:.1f}", va="center", fontsize=8)
            axes.set(title=title)
            figure.tight_layout()
            figure.savefig(results / f"{bench.lower()}.png", dpi=110)
            plt.close(figure)
            written.append(f"results/{bench.lower()}.png")
        return written

    def _markdown(self, plots: list[str]) -> str:
        lines = ["# Benchmarks: cronium_nb against its peers", ""]
        if self.quick:
            lines += ["**A `--quick` smoke run: too few samples to compare anything.**", ""]
        lines += [
            f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `{self.command}` "
            f"in {self.duration_s / 60:.1f} min. Every tool ran against the same fleet in the same run; "
            "every sample was checked (all servers answered with exit 0 and the expected output, every "
            "line arrived). Raw samples: `results/samples.csv`.",
            "",
            "## Machine and versions",
            "",
            "| | |",
            "|---|---|",
        ]
        from peers import tool_versions  # the peers' packages are only needed here and in bench.py

        lines += [f"| {key} | {value} |" for key, value in {**machine(), **tool_versions()}.items()]
        lines += [
            "",
            *self._summary(),
            *self._b1(),
            *self._b2(),
            *self._b3(),
            *self._b4(),
            *self._b5(),
            *self._b6(),
            *self._b7(),
        ]
        lines += self._profile()
        lines += [f"![{Path(p).stem}]({p})" for p in plots]
        analysis = Path(__file__).with_name("analysis.md")
        if analysis.exists():
            lines += ["", analysis.read_text().strip()]
        return "\n".join(lines) + "\n"

    def _summary(self) -> list[str]:
        rows = ["## Targets", "", "| target | result | met |", "|---|---|---|"]
        floor, warm = self.find("B1", "asyncssh run('true'), open connection"), self.find("B1", f"{OURS} warm")
        if floor and warm:
            ratio = warm.median / floor.median
            rows.append(f"| B1 {TARGETS['B1']} | {ratio:.2f}x ({_ms(warm.median)} vs {_ms(floor.median)}) | "
                        f"{'yes' if ratio <= 1.5 else '**no**'} |")  # fmt: skip
        for ours, peers in self._b2_pairs():
            beaten = [(n, o, p) for n, o, p in ours_vs(self, ours, peers) if o.median >= p.median]
            if self.of("B2"):
                verdict = (
                    "yes"
                    if not beaten
                    else "**no**: " + ", ".join(f"{p.tool} at N={n}{_floor_note(o, p.median)}" for n, o, p in beaten)
                )
                rows.append(f"| B2 {ours} {TARGETS['B2']} {peers_label(peers)} | see B2 | {verdict} |")
        raw, stored = (
            self.find("B4", "asyncssh read(65536), open connection"),
            self.find("B4", f"{OURS} (stored, lines)"),
        )
        if deploy := self.find("B3", f"{OURS} deploy, static binary", 20):
            rows.append(_target_row("B3", _ms(deploy.median) + _floor_note(deploy, 2), deploy.median < 2))
        if raw and stored:
            share = stored.extra["mb_per_s"] / raw.extra["mb_per_s"]
            met = share >= 0.7 and stored.extra["peak_rss_mb"] < 300
            # 70% of raw's throughput: at most raw's time / 0.7 for the same 200 MB
            floor = _floor_note(stored, raw.median / 0.7)
            rows.append(_target_row("B4", f"{share:.0%} of raw, {stored.extra['peak_rss_mb']:.0f} MB peak{floor}", met))
            if "logs_read_s" in stored.extra:
                rows.append(_target_row("B4 logs", _ms(stored.extra["logs_read_s"]), stored.extra["logs_read_s"] < 2))
        warm, cold = self.find("B6", f"{OURS}, warm connections", 100), self.find("B6", COLD_CACHED, 100)
        if warm:
            rows.append(_target_row("B6 warm", _ms(warm.median) + _floor_note(warm, 0.6), warm.median < 0.6))
        if cold:
            rows.append(_target_row("B6 cold", _ms(cold.median) + _floor_note(cold, 3), cold.median < 3))
        if growth := self._rss_per_server():
            rows.append(_target_row("B6 memory", f"{growth:.2f} MB per server", growth < 1))
        return [*rows, ""]

    def _rss_per_server(self) -> float | None:
        """Resident memory per server with every connection open: the slope between the smallest
        and the largest B6 size."""
        sizes = sorted(s.n for s in self.of("B6") if s.tool == f"{OURS}, warm connections")
        if len(sizes) < 2:
            return None
        small, large = (self.find("B6", f"{OURS}, warm connections", n) for n in (sizes[0], sizes[-1]))
        assert small and large
        return (large.extra["rss_mb"] - small.extra["rss_mb"]) / (sizes[-1] - sizes[0])

    def _b2_pairs(self) -> list[tuple[str, list[str]]]:
        tools = sorted({s.tool for s in self.of("B2")})
        peers = [t for t in tools if not t.startswith(OURS)]
        return [
            (f"{OURS}, cold connections", [t for t in peers if "reused" not in t]),
            (f"{OURS}, warm connections", peers),
        ]

    def of(self, benchmark: str) -> list[Series]:
        return [s for s in self.series if s.benchmark == benchmark]

    def _b1(self) -> list[str]:
        series = self.of("B1")
        if not series:
            return []
        floor = series[0].median
        return _section(
            "B1 warm single-server latency (`true`)",
            f"Median of {len(series[0].samples)} runs each.",
            ["tool", "median", "min", "ratio to the asyncssh floor"],
            [[s.tool, _ms(s.median), _ms(min(s.samples)), f"{s.median / floor:.1f}x"] for s in series],
        )

    def _b2(self) -> list[str]:
        series = self.of("B2")
        if not series:
            return []
        sizes = sorted({s.n for s in series})
        columns = [f"N={n}" for n in sizes]
        medians = [[tool] + [_ms(c.median) if (c := self.find("B2", tool, n)) else "" for n in sizes]
                   for tool in dict.fromkeys(s.tool for s in series)]  # fmt: skip
        ratios = []
        for ours, peers in self._b2_pairs():
            for peer in peers:
                cells = []
                for n in sizes:
                    a, b = self.find("B2", ours, n), self.find("B2", peer, n)
                    cells.append(f"{b.median / a.median:.2f}" if a and b else "")
                ratios.append([f"{peer} / {ours.removeprefix(OURS + ', ')}", *cells])
        floors = [[tool] + [_floor_cell(c) if (c := self.find("B2", tool, n)) else "" for n in sizes]
                  for tool in dict.fromkeys(s.tool for s in series if _floor(s) is not None)]  # fmt: skip
        return [
            *_section(
                f"B2 fan-out: `{FANOUT_LABEL}` on N servers",
                "Wall time until every server's result is in, median. `new client` / `cold connections`: "
                "connecting is part of every sample; `reused` / `warm`: connections opened before. Ansible is "
                "the whole `ansible` process with its SSH masters kept by ControlPersist.",
                ["tool", *columns],
                medians,
            ),
            "Ratio peer / cronium_nb (above 1: we are faster):",
            "",
            *_table(["comparison", *columns], ratios),
            "",
            *(["CPU floor: what the servers' containers and the measuring process used in a sample, over "
               f"the {CORES} cores (`cpu_floor.py`), median; no sample can take less wall time:", "",
               *_table(["tool", *columns], floors), ""] if floors else []),
        ]  # fmt: skip

    def _b3(self) -> list[str]:
        series = self.of("B3")
        return _section(
            "B3 cold deployment",
            "Runner removed from every server first; a new executor connects, probes, uploads, verifies "
            "and runs `true`. Median wall time and bytes sent in all.",
            ["flavour", "N", "median", "bytes sent", "CPU floor"],
            [[s.tool, str(s.n), _ms(s.median), f"{s.extra['bytes_sent'] / 1e6:.1f} MB", _floor_cell(s)]
             for s in series],
        ) if series else []  # fmt: skip

    def _b4(self) -> list[str]:
        series = self.of("B4")
        return _section(
            "B4 streaming: 200 MB of 100-byte lines from one server",
            "Each measurement runs in its own process; peak RSS is that process's VmHWM. cronium_nb "
            "splits the output into lines, stores every line in SQLite and counts them afterwards.",
            ["tool", "median", "MB/s", "peak RSS", "res.logs read back", "CPU floor"],
            [[s.tool, _ms(s.median), f"{s.extra['mb_per_s']:.1f}", f"{s.extra['peak_rss_mb']:.0f} MB",
              _ms(s.extra["logs_read_s"]) if "logs_read_s" in s.extra else "", _floor_cell(s)] for s in series],
        ) if series else []  # fmt: skip

    def _b6(self) -> list[str]:
        series = self.of("B6")
        return _section(
            f"B6 scale: `{FANOUT_LABEL}` on {', '.join(str(n) for n in sorted({s.n for s in series}))} servers",
            "Each size in its own process. Cold: a new executor per sample (the runner is cached on the "
            "servers); warm: one executor's open connections. CPU: the orchestrator process's CPU time "
            "per server per fan-out; RSS: resident memory with every connection open.",
            ["mode", "N", "median", "min", "CPU per server", "RSS", "CPU floor"],
            [[s.tool.removeprefix(OURS + ", "), str(s.n), _ms(s.median), _ms(min(s.samples)),
              f"{s.extra['cpu_ms_per_server']:.1f} ms", f"{s.extra['rss_mb']:.0f} MB", _floor_cell(s)]
             for s in series],
        ) if series else []  # fmt: skip

    def _b5(self) -> list[str]:
        if not self.phase_tables:
            return []
        return _section(
            "B5 where the time goes (cronium_nb's own metrics, median per phase)",
            "connect: lease a pooled connection or open one; deploy: probe and check the cached runner; "
            "upload: start the runner, send, verify and unpack the payload; run: the script; cleanup: "
            "work dir removed, result back.",
            ["run", *PHASES],
            [[label, *(_ms(phases[p]) for p in PHASES)] for label, phases in self.phase_tables.items()],
        )

    def _b7(self) -> list[str]:
        series = self.of("B7")
        if not series:
            return []
        sizes = sorted({s.n for s in series})
        tools = list(dict.fromkeys(s.tool for s in series))
        rows = [[tool] + [_ms(c.median) if (c := self.find("B7", tool, n)) else "" for n in sizes] for tool in tools]
        overhead = []
        for flavour in ("cold", "warm"):
            local = [self.find("B7", f"local executor, {flavour}", n) for n in sizes]
            remote = [self.find("B7", t, n) for n in sizes for t in tools if t.startswith("through") and flavour in t]
            if all(local) and len(remote) == len(sizes) and all(remote):
                cells = [_ms(there.median - here.median) for here, there in zip(local, remote, strict=True)]
                overhead.append([f"cluster minus local, {flavour}", *cells])
        delays = [[f"{tool.removesuffix(', warm')}: a line's delay, median"]
                  + [f"{c.extra['line_delay_ms']:.0f} ms" if (c := self.find("B7", tool, n)) else "" for n in sizes]
                  for tool in tools if tool.endswith("warm")]  # fmt: skip
        return _section(
            f"B7 fan-out through a Dask cluster: `{FANOUT_LABEL}` on N servers",
            "A LocalCluster of 2 worker processes on this machine, servers spread over both, against the "
            "local executor. Cold: a new executor per sample (for the cluster: new agents on the workers, "
            "new connections); warm: the same executor again. Median wall time; the last rows are the "
            "cluster path's own cost per execution (see the analysis for where it pays off), and how long "
            "after its runner read it a line reached the notebook's callbacks (warm runs).",
            ["path", *[f"N={n}" for n in sizes]],
            rows + overhead + delays,
        )

    def _profile(self) -> list[str]:
        lines = []
        for label, error in self.profile_errors:
            lines += [f"## Profile: {label}", "", f"py-spy failed: `{error.strip()}`", ""]
        for label, rows in self.profiles:
            lines += _section(
                "Profile: " + label,
                "Share of the busy samples (waiting in select/locks and start-up imports left out) in "
                "which a function was on the stack (inclusive; frames common to every stack left out) "
                "or on top (self).",
                ["function", "inclusive", "self"],
                [[f"`{name}`", f"{inclusive:.0%}", f"{own:.0%}"] for name, inclusive, own in rows],
            )
        return lines


def _target_row(key: str, result: str, met: bool) -> str:
    return f"| {key} {TARGETS[key]} | {result} | {'yes' if met else '**no**'} |"


def _table(columns: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _section(heading: str, intro: str, columns: list[str], rows: list[list[str]]) -> list[str]:
    """A RESULTS.md section: its heading, a paragraph, a table, a blank line."""
    return [f"## {heading}", "", intro, "", *_table(columns, rows), ""]


# Frames on (nearly) every stack, which say nothing about where the time goes.
GENERIC_FRAMES = ("threading.py", "base_events.py", "events.py", "(bench.py", "<frozen", "runpy.py",
                  "concurrent/futures")  # fmt: skip
IDLE_FRAMES = ("select (selectors.py", "wait (threading.py", "_worker (concurrent", "poll (selectors.py",
               "epoll", "acquire", "sleep")  # fmt: skip


def _frame_name(frame: str) -> str:
    """``func (path/to/module.py:123)`` -> ``func (module.py)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({Path(where.split(':')[0]).name})" if where else name


def ours_vs(report: Report, ours: str, peers: list[str]):
    for n in sorted({s.n for s in report.of("B2")}):
        mine = report.find("B2", ours, n)
        for peer in peers:
            theirs = report.find("B2", peer, n)
            if mine and theirs:
                yield n, mine, theirs


def peers_label(peers: list[str]) -> str:
    return "(" + ", ".join(peers) + ")"


FANOUT_LABEL = "hostname; uptime"
