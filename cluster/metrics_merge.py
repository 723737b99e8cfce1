"""One Prometheus exposition for N workers that behaves as one process's would (issue 13).

Whichever worker answers `GET /metrics` asks its siblings for theirs (cluster.peers) and
merges them here. Design, and why:

- **Summed series, not a `worker` label.** The merged output has the same series as a
  single-worker gateway, so dashboards and alerts do not change with `--workers`, and the
  number of series does not grow N times. What is per worker is said by two series of its
  own: `router_worker_up{worker}` (answered this scrape) and `router_worker_restarts_total
  {worker}` (its process was replaced).
- **Counters never go backwards** (counters, and histograms' and summaries' `_bucket`,
  `_count`, `_sum`). A per-worker `base` is needed whichever way the series are shown: a
  restarted worker counts from zero again. The `CounterLedger`, one small file in the run
  directory that every worker reads and writes (any of them may answer a scrape), keeps per
  worker index its pid, its last-seen values and its base. A new pid moves the last-seen
  values into the base; a worker that misses the deadline (cluster.peers.PEER_TIMEOUT) or is
  down counts with its last-seen values; an answer from a pid already replaced (a scrape
  that raced the restart) is ignored. Within one pid a value only ever rises (a reload
  carries every counter over, proxy.runtime), so the ledger keeps the larger of the stored
  and the answered value, and two scrapes merged at once by two workers cannot make it fall.
  What a worker counted after the last scrape that reached it and before it died is lost:
  the merged counter then stalls, which Prometheus reads correctly, instead of falling.
- **Gauges are state, not totals**: merged only from the workers that answered this scrape,
  by the rule declared beside them (telemetry.prometheus.GAUGE_MERGE: in-flight counts add
  up, breaker state takes the worst, health the least healthy). A gauge without a declared
  rule, and a summary's quantiles, are never summed or averaged (an average of percentiles
  is no percentile): they are exposed per worker, with a `worker` label.
- **Rendered by prometheus_client** with the encoder the scraper asked for (text 0.0.4 or
  OpenMetrics), so label values and help texts are escaped as the format says.

The ledger is read and written under an exclusive `flock` and replaced atomically (temporary
file + `os.replace`), off the event loop (cluster.peers runs the merge in a thread): this is
the scrape path, never the request path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import orjson
from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from cluster.files import locked, replace_atomically
from cluster.merge import Rule
from telemetry.prometheus import GAUGE_MERGE

log = logging.getLogger("request_router.metrics_merge")

PID_HEADER = "X-Router-Worker-Pid"  # a sibling's pid, on its answer to GET /metrics
LEDGER_FILE = "metrics-ledger.json"
LOCK_FILE = "metrics-ledger.lock"
RETIRED_KEPT = 16  # replaced pids remembered per worker, to recognise their late answers
COUNTING_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("_count", "_sum"),
}


def _gauge_rule(family: str, word: str) -> Rule:
    rule = Rule(word)
    if rule not in (Rule.SUM, Rule.MAX, Rule.MIN):
        raise ValueError(f"GAUGE_MERGE[{family!r}]: {word!r} is no rule for a gauge")
    return rule


GAUGE_RULES = {family: _gauge_rule(family, word) for family, word in GAUGE_MERGE.items()}

SeriesKey = str  # JSON of [family, sample name, [[label, value], ...]], labels sorted


@dataclass(frozen=True, slots=True)
class Exposition:
    """One worker's answer to GET /metrics, in the text format (0.0.4)."""

    worker: int
    pid: int
    text: str


class WorkerRecord(TypedDict):
    pid: int
    retired: list[int]
    restarts: int
    last: dict[SeriesKey, float]
    base: dict[SeriesKey, float]


class LedgerState(TypedDict):
    families: dict[str, list[str]]  # family -> [type, help]
    workers: dict[str, WorkerRecord]  # worker index (a JSON key) -> its record


def empty_state() -> LedgerState:
    return {"families": {}, "workers": {}}


def advance(state: LedgerState, answer: Exposition, counters: Mapping[SeriesKey, float]) -> bool:
    """Take one worker's counters into `state`; False when its answer is from a pid already
    replaced (then it counts as not answering)."""
    record = state["workers"].get(str(answer.worker))
    if record is None:
        state["workers"][str(answer.worker)] = {
            "pid": answer.pid,
            "retired": [],
            "restarts": 0,
            "last": dict(counters),
            "base": {},
        }
        return True
    if answer.pid == record["pid"]:
        last = record["last"]
        for key, value in counters.items():
            if key not in last or value > last[key]:
                last[key] = value
        return True
    if answer.pid in record["retired"]:
        return False
    base = record["base"]
    for key, value in record["last"].items():
        base[key] = base.get(key, 0.0) + value
    record["retired"] = [*record["retired"], record["pid"]][-RETIRED_KEPT:]
    record["pid"] = answer.pid
    record["last"] = dict(counters)
    record["restarts"] += 1
    return True


class CounterLedger:
    """Per worker: pid, last-seen counters, base carried over restarts; in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LEDGER_FILE
        self.lock_path = directory / LOCK_FILE

    def update(self, change: _Change) -> LedgerState:
        """Read, apply `change`, write back, all under the lock; the state as written."""
        with locked(self.lock_path):
            state = self._read()
            change(state)
            self._write(state)
        return state

    def _read(self) -> LedgerState:
        try:
            data: Any = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            return empty_state()
        except orjson.JSONDecodeError as exc:
            log.error(
                "%s is unreadable (%s): merged counters start again from zero", self.path, exc
            )
            return empty_state()
        if not isinstance(data, dict) or "workers" not in data or "families" not in data:
            log.error("%s has an unknown shape: merged counters start again from zero", self.path)
            return empty_state()
        state: LedgerState = data  # type: ignore[assignment]  # written only by _write
        return state

    def _write(self, state: LedgerState) -> None:
        replace_atomically(self.path, orjson.dumps(state))


class _Change:
    """A change to the ledger, applied under its lock (see `merge_prometheus`)."""

    def __init__(
        self,
        answers: Sequence[tuple[Exposition, dict[SeriesKey, float]]],
        families: Mapping[str, tuple[str, str]],
    ) -> None:
        self.answers = answers
        self.families = families
        self.current: set[int] = set()

    def __call__(self, state: LedgerState) -> None:
        for name, (kind, documentation) in self.families.items():
            state["families"][name] = [kind, documentation]
        for answer, counters in self.answers:
            if advance(state, answer, counters):
                self.current.add(answer.worker)


@dataclass
class _Parsed:
    """The expositions of the workers that answered, sorted by what merging does with them."""

    families: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> type, help
    order: dict[SeriesKey, None] = field(default_factory=dict)  # every series, first seen first
    counters: dict[int, dict[SeriesKey, float]] = field(default_factory=dict)  # per worker
    gauges: dict[int, dict[SeriesKey, float]] = field(default_factory=dict)  # per worker
    gauge_rules: dict[SeriesKey, Rule] = field(default_factory=dict)
    per_worker: dict[int, dict[SeriesKey, float]] = field(default_factory=dict)  # per worker


def series_key(family: str, name: str, labels: Mapping[str, str]) -> SeriesKey:
    return orjson.dumps([family, name, sorted(labels.items())]).decode()


def _parse(expositions: Sequence[Exposition]) -> _Parsed:
    parsed = _Parsed()
    for exposition in expositions:
        counters = parsed.counters.setdefault(exposition.worker, {})
        gauges = parsed.gauges.setdefault(exposition.worker, {})
        per_worker = parsed.per_worker.setdefault(exposition.worker, {})
        for family in text_string_to_metric_families(exposition.text):
            parsed.families.setdefault(family.name, (family.type, family.documentation))
            counting = COUNTING_SUFFIXES.get(family.type, ())
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue  # a process's start time: not summable, and not one gateway's
                key = series_key(family.name, sample.name, sample.labels)
                parsed.order[key] = None
                if family.type == "counter" or sample.name.endswith(counting):
                    counters[key] = sample.value
                elif family.type == "gauge" and family.name in GAUGE_RULES:
                    gauges[key] = sample.value
                    parsed.gauge_rules[key] = GAUGE_RULES[family.name]
                else:  # undeclared gauges, quantiles, info, unknown: never summed or averaged
                    per_worker[key] = sample.value
    return parsed


def merge_prometheus(
    expositions: Sequence[Exposition], workers: int, ledger: CounterLedger | None
) -> list[Metric]:
    """The gateway's metric families from the expositions of the workers that answered.

    `workers`: how many there are (for `router_worker_up`); `ledger`: where counters are
    carried over restarts and missed deadlines (None: only the answers are summed, as a
    single merge with nothing to remember)."""
    parsed = _parse(expositions)
    change = _Change([(e, parsed.counters[e.worker]) for e in expositions], parsed.families)
    state: LedgerState | None = None
    if ledger is not None:
        try:
            state = ledger.update(change)
        except OSError as exc:
            log.error("metrics ledger %s: %r; absent workers' counters left out", ledger.path, exc)
    if state is None:
        state = empty_state()
        change.current.clear()
        change(state)
    families = {**{k: (v[0], v[1]) for k, v in state["families"].items()}, **parsed.families}
    return _families(parsed, state, change.current, families, workers)


def _families(
    parsed: _Parsed,
    state: LedgerState,
    current: set[int],
    families: Mapping[str, tuple[str, str]],
    workers: int,
) -> list[Metric]:
    totals: dict[SeriesKey, float] = {}
    for record in state["workers"].values():
        for part in (record["base"], record["last"]):
            for key, value in part.items():
                totals[key] = totals.get(key, 0.0) + value
    gauges: dict[SeriesKey, float] = {}
    labelled: list[tuple[SeriesKey, int, float]] = []
    for worker in sorted(current):
        for key, value in parsed.gauges.get(worker, {}).items():
            merged = gauges.get(key)
            gauges[key] = (
                value if merged is None else _combine(parsed.gauge_rules[key], merged, value)
            )
        labelled += [(k, worker, v) for k, v in parsed.per_worker.get(worker, {}).items()]
    metrics = {
        name: Metric(name, documentation, kind) for name, (kind, documentation) in families.items()
    }
    for key in {**parsed.order, **dict.fromkeys(totals)}:
        family, name, labels = orjson.loads(key)
        if key in totals:
            metrics[family].add_sample(name, dict(labels), totals[key])
        elif key in gauges:
            metrics[family].add_sample(name, dict(labels), gauges[key])
    for key, worker, value in labelled:
        family, name, labels = orjson.loads(key)
        metrics[family].add_sample(name, {**dict(labels), "worker": str(worker)}, value)
    return [*metrics.values(), *_worker_families(state, current, workers)]


def _combine(rule: Rule, merged: float, value: float) -> float:
    if rule is Rule.MAX:
        return max(merged, value)
    if rule is Rule.MIN:
        return min(merged, value)
    return merged + value


def _worker_families(state: LedgerState, current: set[int], workers: int) -> list[Metric]:
    up = Metric(
        "router_worker_up",
        "1 when the worker answered this scrape in time; 0: its counters are its last-seen"
        " values and its gauges are left out",
        "gauge",
    )
    restarts = Metric(
        "router_worker_restarts",
        "Times the worker's process was replaced (seen as a new pid at a scrape)",
        "counter",
    )
    for worker in range(workers):
        label = {"worker": str(worker)}
        up.add_sample("router_worker_up", label, 1.0 if worker in current else 0.0)
        record = state["workers"].get(str(worker))
        restarts.add_sample(
            "router_worker_restarts_total", label, float(record["restarts"] if record else 0)
        )
    return [up, restarts]


class _Families(Collector):
    def __init__(self, families: Sequence[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def render(families: Sequence[Metric], accept: str) -> tuple[bytes, str]:
    """The exposition in the format the scraper's Accept header asks for, and its type."""
    encoder, content_type = choose_encoder(accept)
    return encoder(_Families(families)), content_type


def merged_exposition(
    expositions: Sequence[Exposition], workers: int, ledger: CounterLedger | None, accept: str
) -> tuple[bytes, str]:
    return render(merge_prometheus(expositions, workers, ledger), accept)
