"""The registry's trace as a Chrome trace-event timeline (JSON), which ui.perfetto.dev and chrome://tracing open.

Input: the events of ``.pmemfs/trace.json``. Output: a process per holder pid, a thread per file
it referenced (``pmem0``, ``dax0``), a B/E slice per reference from pin (or get) to unpin (or put),
instant events for refusals, teardown and the rest, and a counter track of the pins in flight.

A thread track must hold slices that nest; two pins of one holder may overlap without nesting
(pin A, pin B, unpin A), so overlapping references go to further lanes of the same file
("pmem0 #2"), each lane a sequence of slices one after another. References whose pin fell off the
ring (the ring keeps the last 4096 events per serving process) start at the trace's first event;
those still held end when the trace was read. Timestamps are microseconds since the first event;
``otherData.start_unix_ns`` says when that was.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

# What opens a reference and what closes it, and what each is called on the timeline.
OPENS = {"pin": "pin", "get": "get"}
CLOSES = {"unpin": "pin", "put": "get"}
# Device-wide events are global instants (a line across every track); the others sit on the track
# of the holder they name.
GLOBAL_INSTANTS = ("teardown", "revive", "reset")
DEVICE_PID = 0  # the track of events that name no holder (pid 0 in the trace)
LANE_TIDS = 1000  # a file's lanes are tids FILE_CODE * LANE_TIDS + lane
FILE_CODES = {"": 0, "pmem0": 1, "dax0": 2}
_SESSION_PIN = re.compile(r"session pin (\d+)(?: \((\w+)\))?")


@dataclass
class Slice:
    name: str  # "pin", "longterm pin", "get"
    pid: int
    file: str
    pfn: int
    npages: int
    start_ns: int
    end_ns: int
    args: dict[str, object] = field(default_factory=dict)
    held: bool = False  # still held when the trace was read: it ends there only because the trace does

    @property
    def pinned(self) -> bool:
        return self.name != "get"


def _key(event: dict) -> tuple[object, ...]:
    """What pairs a close with its open: a session pin's id, else the transfer's holder and pages."""
    match = _SESSION_PIN.match(event["note"])
    if match:
        return ("session", int(match.group(1)))
    return ("transfer", OPENS.get(event["what"]) or CLOSES[event["what"]], event["pid"], event["file"],
            event["pfn"], event["npages"])  # fmt: skip


def _reference(name: str, event: dict, start_ns: int, end_ns: int, **args: object) -> Slice:
    where = {"pages": f"{event['pfn']}+{event['npages']}", "offset": event["pfn"] * 4096,
             "length": event["npages"] * 4096}  # fmt: skip
    return Slice(name, event["pid"], event["file"], event["pfn"], event["npages"], start_ns, end_ns, {**where, **args})


def slices(events: list[dict], now_ns: int) -> list[Slice]:
    """Pair every open with its close: one :class:`Slice` per reference the events show."""
    start_ns = events[0]["time_ns"] if events else now_ns
    open_: dict[tuple[object, ...], list[Slice]] = {}
    done: list[Slice] = []
    for event in events:
        what = event["what"]
        if what in OPENS:
            match = _SESSION_PIN.match(event["note"])
            name = "longterm pin" if match and match.group(2) == "longterm" else OPENS[what]
            source = f"session pin {match.group(1)}" if match else "I/O transfer"
            open_.setdefault(_key(event), []).append(_reference(name, event, event["time_ns"], now_ns, source=source))
        elif what in CLOSES:
            waiting = open_.get(_key(event))
            # An open that fell off the ring: held from before the first event on.
            ref = (
                waiting.pop(0)
                if waiting
                else _reference(CLOSES[what], event, start_ns, now_ns, begun="before the trace's first event")
            )
            # Events carry wall-clock time, which may step back: a slice never ends before it begins.
            ref.end_ns = max(event["time_ns"], ref.start_ns)
            if event["note"]:
                ref.args["end"] = event["note"]
            done.append(ref)
    for waiting in open_.values():
        for ref in waiting:
            ref.args["end"] = "still held when the trace was read"
            ref.held = True
            done.append(ref)
    return sorted(done, key=lambda s: (s.start_ns, s.end_ns))


def _lanes(refs: list[Slice]) -> dict[int, int]:
    """For each slice (by index), the lane of its (pid, file) in which it overlaps no other slice."""
    lane_ends: dict[tuple[int, str], list[int]] = {}
    lanes = {}
    for index, ref in enumerate(refs):  # sorted by start
        ends = lane_ends.setdefault((ref.pid, ref.file), [])
        lane = next((i for i, end in enumerate(ends) if end <= ref.start_ns), len(ends))
        if lane == len(ends):
            ends.append(ref.end_ns)
        else:
            ends[lane] = ref.end_ns
        lanes[index] = lane
    return lanes


def to_chrome_trace(
    events: list[dict],
    now_ns: int,
    *,
    mountpoint: str = "",
    process_name: Callable[[int], str] = lambda pid: f"pid {pid}",
) -> dict[str, object]:
    """The Chrome trace-event JSON object (``{"traceEvents": [...], ...}``) for ``events``."""
    events = sorted(events, key=lambda e: (e["time_ns"], e["column"], e["seq"]))
    start_ns = events[0]["time_ns"] if events else now_ns

    def ts(time_ns: int) -> float:
        return round((time_ns - start_ns) / 1000, 3)

    refs = slices(events, now_ns)
    lanes = _lanes(refs)
    tracks: dict[tuple[int, int], list[dict[str, object]]] = {}
    names: dict[tuple[int, int], str] = {}
    for index, ref in enumerate(refs):
        tid = FILE_CODES[ref.file] * LANE_TIDS + lanes[index] + 1
        names[(ref.pid, tid)] = ref.file + (f" #{lanes[index] + 1}" if lanes[index] else "")
        category = "pin" if ref.pinned else "get"
        common: dict[str, object] = {"name": ref.name, "cat": category, "pid": ref.pid, "tid": tid}
        begin: dict[str, object] = {**common, "ph": "B", "ts": ts(ref.start_ns), "args": ref.args}
        tracks.setdefault((ref.pid, tid), []).extend([begin, {**common, "ph": "E", "ts": ts(ref.end_ns)}])
    instants: list[dict[str, object]] = []
    for event in events:
        if event["what"] in OPENS or event["what"] in CLOSES:
            continue
        pid = event["pid"] or DEVICE_PID
        tid = FILE_CODES[event["file"]] * LANE_TIDS + 1 if event["file"] else 0
        names.setdefault((pid, tid), event["file"] or ("device" if pid == DEVICE_PID else "session"))
        args = {"note": event["note"]} if event["note"] else {}
        if event["npages"]:
            args["pages"] = f"{event['pfn']}+{event['npages']}"
        instants.append(
            {"name": event["what"], "cat": "registry", "ph": "i", "s": "g" if event["what"] in GLOBAL_INSTANTS else "t",
             "pid": pid, "tid": tid, "ts": ts(event["time_ns"]), "args": args}
        )  # fmt: skip
    counter = _pins_in_flight(refs, ts)
    if counter:
        names.setdefault((DEVICE_PID, 0), "device")
    metadata: list[dict[str, object]] = []
    for pid in sorted({pid for pid, _ in names}):
        label = "pmemfs device" + (f" {mountpoint}" if mountpoint else "") if pid == DEVICE_PID else process_name(pid)
        metadata.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": label}})
    for (pid, tid), name in sorted(names.items()):
        metadata.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}})
    # Each track's events are in order already; merging by time keeps that order (an E before the
    # B that follows it at the same instant).
    timeline = list(heapq.merge(*tracks.values(), instants, counter, key=lambda e: e["ts"]))  # type: ignore[arg-type,return-value]
    return {
        "traceEvents": metadata + timeline,
        "displayTimeUnit": "ms",
        "otherData": {
            "source": "pmemfs trace --perfetto",
            "mountpoint": mountpoint,
            "start_unix_ns": start_ns,
            "read_unix_ns": now_ns,
            "events": len(events),
        },  # fmt: skip
    }


def _pins_in_flight(refs: list[Slice], ts: Callable[[int], float]) -> list[dict[str, object]]:
    """A counter sample at every change of the number of pins held (references of kind get are not pins)."""
    changes: list[tuple[int, int, int]] = []
    for ref in refs:
        if ref.pinned:
            changes.append((ref.start_ns, 1, ref.npages))
            if not ref.held:  # what is still held counts until the end of the trace
                changes.append((ref.end_ns, -1, -ref.npages))
    samples: list[dict[str, object]] = []
    pins = pages = 0
    for time_ns, delta, npages in sorted(changes, key=lambda c: (c[0], c[1])):  # releases first at a tie
        pins, pages = pins + delta, pages + npages
        sample = {"name": "pins in flight", "ph": "C", "pid": DEVICE_PID, "tid": 0, "ts": ts(time_ns),
                  "args": {"pins": pins, "pinned pages": pages}}  # fmt: skip
        if samples and samples[-1]["ts"] == sample["ts"]:
            samples[-1] = sample
        else:
            samples.append(sample)
    return samples


PHASES = {"B", "E", "X", "i", "I", "C", "M", "b", "e", "n"}


def validate(trace: dict[str, object]) -> list[str]:
    """What is wrong with ``trace`` as Chrome trace-event JSON, as Perfetto reads it (empty: nothing).

    Checks: the object form; every event's phase, name, pid, tid and numeric ts; every B closed by
    an E of the same name on its track and no E without a B; timestamps non-decreasing on each
    track; timestamps in microseconds (start + ts lies between the first event and the read).
    """
    problems: list[str] = []
    events = trace.get("traceEvents")
    if not isinstance(events, list):
        return ["no traceEvents list"]
    other = trace.get("otherData") or {}
    span_us = None
    if isinstance(other, dict) and "start_unix_ns" in other and "read_unix_ns" in other:
        span_us = (int(other["read_unix_ns"]) - int(other["start_unix_ns"])) / 1000
    stacks: dict[tuple[object, object], list[str]] = {}
    last_ts: dict[tuple[object, object], float] = {}
    for n, event in enumerate(events):
        where = f"event {n} ({event.get('ph')} {event.get('name')!r})"
        if event.get("ph") not in PHASES:
            problems.append(f"{where}: unknown phase")
            continue
        if not isinstance(event.get("pid"), int) or not isinstance(event.get("tid"), int):
            problems.append(f"{where}: pid and tid must be integers")
        if event["ph"] == "M":
            continue
        if not isinstance(event.get("name"), str):
            problems.append(f"{where}: no name")
        stamp = event.get("ts")
        if not isinstance(stamp, int | float) or stamp < 0:
            problems.append(f"{where}: ts must be a number of microseconds >= 0")
            continue
        if span_us is not None and stamp > span_us + 1:
            problems.append(f"{where}: ts {stamp} is past the read ({span_us:.0f} µs): not microseconds?")
        track = (event["pid"], event["tid"])
        if event["ph"] == "C":
            track = (event["pid"], f"counter {event['name']}")
            if not all(isinstance(v, int | float) for v in (event.get("args") or {}).values()):
                problems.append(f"{where}: counter values must be numbers")
        if stamp < last_ts.get(track, 0.0):
            problems.append(f"{where}: ts {stamp} goes back on track {track} (was {last_ts[track]})")
        last_ts[track] = stamp
        if event["ph"] == "i" and event.get("s", "t") not in ("g", "p", "t"):
            problems.append(f"{where}: instant scope must be g, p or t")
        elif event["ph"] == "B":
            stacks.setdefault(track, []).append(event["name"])
        elif event["ph"] == "E":
            stack = stacks.get(track)
            if not stack:
                problems.append(f"{where}: E without a B on track {track}")
            elif stack.pop() != event["name"]:
                problems.append(f"{where}: E closes a slice of another name on track {track}")
    for track, stack in stacks.items():
        problems += [f"B {name!r} on track {track} has no E" for name in stack]
    return problems


def summary(trace: dict[str, object]) -> dict[str, int]:
    """How many slices, instants and counter samples a trace holds (what the CLI reports)."""
    events: Iterable[dict] = trace["traceEvents"]  # type: ignore[assignment]
    counts = {"slices": 0, "instants": 0, "counter samples": 0}
    for event in events:
        phase = event["ph"]
        if phase == "B":
            counts["slices"] += 1
        elif phase == "i":
            counts["instants"] += 1
        elif phase == "C":
            counts["counter samples"] += 1
    return counts
