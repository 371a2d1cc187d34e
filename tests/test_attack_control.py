"""Attacks on the control files: fuzzed commands, snapshots over 1 MiB, many handles at once, who may revive.

DESIGN.md section 2: a read of a control file is one consistent snapshot, whole, however large,
whichever serving process answers. Section 5: anything written to a control file gets EINVAL or the
command's own errno, and the mount keeps serving with its registry unchanged.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import PAGE, SERVING_MODE, DirectFile, Mount, create_image, mounted, pmemfs, serving_pids, wait_for

from pmemfs.client import PinSession, poll_until, read_status

MiB = 1 << 20
# What a bad control write may get: EINVAL, or the errno of a command that was valid and refused.
ALLOWED_ERRNOS = {errno.EINVAL, errno.ENOSPC, errno.EBUSY, errno.ENXIO, errno.EOPNOTSUPP, errno.ENOENT, errno.ERANGE}
# What the kernel answers once the daemon (or the serving process) is gone.
DEAD_ERRNOS = {errno.ECONNABORTED, errno.ENOTCONN}
TRACE_LINE = re.compile(r"^\d+:\d+ \d\d:\d\d:\d\d\.\d{6} [a-z-]+ pid -?\d+")


@pytest.fixture(scope="module", params=["fast", "trio"])
def control_mount(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """One mount per serving mode for the tests that leave it as they found it (each checks that): a mount
    costs seconds. The fuzz runs last, so a daemon it kills takes no other test down with it."""
    SERVING_MODE[0] = request.param
    where = tmp_path_factory.mktemp(f"control-{request.param}")
    try:
        image = create_image(where / "pmem.img", "256M")
        with mounted(image, str(where / "mnt"), "--log", str(where / "daemon.log")) as mount:
            yield mount
    finally:
        SERVING_MODE[0] = "fast"


def control(mount: Mount, name: str) -> str:
    return os.path.join(mount.mountpoint, ".pmemfs", name)


def read_whole(path: str, chunk: int = 65536) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        data = b""
        while block := os.read(fd, chunk):
            data += block
        return data
    finally:
        os.close(fd)


# A2: snapshots larger than 1 MiB.


def test_control_snapshots_larger_than_1_mib_are_whole(serving_mode: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Attacks the snapshot size limit: 300 overlapping pins make .pmemfs/pages render over 1 MiB (each range
    lists up to 70 holders), and thousands of refused pins fill the trace rings; both files must read back
    whole, the trace with its newest event last."""
    image = create_image(tmp_path / "pmem.img", "256M")
    # Several serving processes, each with its own trace ring: only then can the trace pass 1 MiB
    # (one ring holds 4096 events of under 110 bytes, so the trio loop's trace stays under 0.5 MiB).
    extra = ["--workers", "4", "--spin-us", "0"] if SERVING_MODE[0] == "fast" else []
    started = time.monotonic()
    with mounted(image, str(tmp_path / "mnt"), "--log", str(tmp_path / "daemon.log"), *extra) as mount:
        with PinSession(mount.mountpoint) as holder:
            for i in range(300):
                os.write(holder.fd, f"pin pmem0 {i * PAGE} {70 * PAGE}".encode())
            pages_text = read_whole(control(mount, "pages"))
            assert pages_text.endswith(b"}\n"), f"pages cut at {len(pages_text)} bytes: ...{pages_text[-120:]!r}"
            pages = json.loads(pages_text)
            assert len(pages["holders"]) == 300 and len(pages_text) > MiB, len(pages_text)
            cli = pmemfs("pages", mount.mountpoint, "--json", check=False)
            assert cli.returncode == 0, cli.stderr[-500:]
            assert len(json.loads(cli.stdout)["holders"]) == 300
        pages_s = time.monotonic() - started

        fillers = fill_trace(mount, threads=4 if extra else 1)
        with PinSession(mount.mountpoint) as last:
            os.write(last.fd, b"inject 271828 1")
            os.write(last.fd, b"uninject 271828 1")
            trace = read_whole(control(mount, "trace")).decode()
        lines = trace.splitlines()
        print(
            f"control snapshots ({SERVING_MODE[0]}): pages {len(pages_text)} bytes with 300 holders ({pages_s:.1f} s), "
            f"trace {len(trace)} bytes in {len(lines)} lines after {fillers} refused pins"
        )
        bad_lines = [line for line in lines if not TRACE_LINE.match(line)]
        assert not bad_lines, f"trace of {len(trace)} bytes is not whole: {bad_lines[:2]}"
        newest = [line for line in lines[-2:] if "sectors 271828+1" in line]
        assert len(newest) == 2 and " uninject pid " in lines[-1], f"newest events missing; the trace ends {lines[-3:]}"
        if extra:
            assert len(trace) > MiB, "the trace never passed 1 MiB: the attack did not happen"


def fill_trace(mount: Mount, threads: int) -> int:
    """Refused long-term pins of pmem0, from several sessions at once so every serving process traces
    some, until the trace passes 1.05 MiB or each session had 7000 refused (4200 for a single session: one
    ring holds 4096 events). Returns how many."""
    done = [0] * threads
    stop = threading.Event()
    limit = 7000 if threads > 1 else 4200  # one ring holds 4096

    tids = [0] * threads  # what the daemon names a session's client by: the thread that opened it

    def refuse(n: int) -> None:
        tids[n] = threading.get_native_id()
        with PinSession(mount.mountpoint) as session:
            while not stop.is_set() and done[n] < limit:
                try:
                    os.write(session.fd, f"pin pmem0 {200 << 20} 4096 longterm".encode())
                except OSError as err:
                    assert err.errno == errno.EOPNOTSUPP
                done[n] += 1
            # All stop together: a session closed while others go on refusing would see its close
            # buried under their events, where the caller looks for it among the newest.
            stop.set()

    workers = [threading.Thread(target=refuse, args=(n,)) for n in range(threads)]
    for t in workers:
        t.start()
    try:
        # Reading the whole trace costs a MiB: look four times a second, and give up after a minute.
        filled = poll_until(
            lambda: not any(t.is_alive() for t in workers) or len(read_whole(control(mount, "trace"))) > 1.05 * MiB,
            timeout_s=60,
            interval_s=0.25,
        )
        assert filled, "the sessions neither finished nor filled the trace within 60 s"
    finally:
        stop.set()
        for t in workers:
            t.join()
    # A session's close reaches the daemon after close(2) returns (FUSE's release is asynchronous):
    # wait for every one, so that no close lands among the events the caller traces next.
    closes = [f"session pid {tid} closed" for tid in tids]

    def all_closed() -> bool:
        newest = "\n".join(read_whole(control(mount, "trace")).decode().splitlines()[-50:])
        return all(close in newest for close in closes)

    filled = poll_until(all_closed, timeout_s=30, interval_s=0.1)
    assert filled, "the filling sessions' closes did not reach the trace within 30 s"
    return sum(done)


# A3: many handles (on the module's mount, as A4 and A1).


def test_a_hundred_open_control_handles_each_read_a_whole_snapshot(control_mount: Mount) -> None:
    """Attacks the per-process limit of shared snapshot slots (32): 100 handles of .pmemfs/pages open in one
    process, read 4 KiB at a time in turn, each must be one consistent JSON snapshot whichever serving
    process answers each read (a holder shows the same age everywhere in one snapshot)."""
    mount = control_mount
    with PinSession(mount.mountpoint) as session:
        for i in range(12):  # separate ranges, one holder each: a snapshot of a few 4 KiB reads
            os.write(session.fd, f"pin dax0 {i * 2 * PAGE} {PAGE}".encode())
        fds = [os.open(control(mount, "pages"), os.O_RDONLY) for _ in range(100)]
        contents = [b""] * len(fds)
        reads = 0
        try:
            open_fds = set(range(len(fds)))
            while open_fds:
                for k in sorted(open_fds):
                    chunk = os.read(fds[k], 4096)
                    reads += 1
                    if chunk:
                        contents[k] += chunk
                    else:
                        open_fds.discard(k)
        finally:
            for fd in fds:
                os.close(fd)
    broken = [f"handle {k}: {problem}" for k, text in enumerate(contents) if (problem := snapshot_problem(text, 12))]
    print(f"control handles ({SERVING_MODE[0]}): 100 open at once, {reads} reads of 4 KiB, {len(broken)} broken")
    assert not broken, broken[:5]


def snapshot_problem(text: bytes, holders: int) -> str | None:
    """Why ``text`` is not one whole pages snapshot with ``holders`` holders, or None."""
    try:
        snapshot = json.loads(text)
        ages: dict[int, set[float]] = {}
        for holder in snapshot["holders"] + [h for r in snapshot["ranges"] for h in r["holders"]]:
            ages.setdefault(holder["id"], set()).add(holder["age_s"])
    except (ValueError, KeyError, TypeError) as err:
        return f"not a pages snapshot ({len(text)} bytes): {err!r}"
    if len(snapshot["holders"]) != holders or any(len(a) > 1 for a in ages.values()):
        return f"two snapshots mixed ({len(snapshot['holders'])} holders, ages {sorted(ages.values())[:3]})"
    return None


# A4: who may revive.


def test_only_the_killing_session_revives_the_device_reference(control_mount: Mount) -> None:
    """Attacks the device reference's ownership: a session that did not kill it must not revive it (EBUSY),
    pins stay refused (ENXIO) until the killer closes, and work again after."""
    mount = control_mount
    tried = 0
    with PinSession(mount.mountpoint) as killer, PinSession(mount.mountpoint) as other:
        os.write(killer.fd, b"kill")
        with PinSession(mount.mountpoint) as third:
            with pytest.raises(OSError) as revive:
                tried += 1
                os.write(other.fd, b"revive")
            assert revive.value.errno == errno.EBUSY
            with pytest.raises(OSError) as pin:
                tried += 1
                os.write(third.fd, b"pin dax0 0 4096")
            assert pin.value.errno == errno.ENXIO
            with pytest.raises(OSError) as io:  # the device is going away: opening it fails too
                tried += 1
                DirectFile(mount.pmem0)
            assert io.value.errno == errno.ENXIO
            assert not read_status(mount.mountpoint)["registry"]["device_alive"]
        killer.close()
        # The kernel sends the release of a closed file asynchronously: a fast worker may see the next
        # request first, so wait for it, as a client of a real dev_pagemap waits for its teardown.
        wait_for(lambda: read_status(mount.mountpoint)["registry"]["device_alive"], what="the killer's close")
        os.write(other.fd, b"pin dax0 0 4096")
        with DirectFile(mount.pmem0) as direct:
            assert direct.pread(PAGE, 0) == bytes(PAGE)
        tried += 2
    print(f"device reference ownership ({SERVING_MODE[0]}): {tried} attempts, revive refused to a non-killer")


# A1: the fuzz.

NUMBERS = [
    "0", "1", "-1", "7", "512", "4096", "8192", "0x1000", "+4096", "1_000", "-0", "0b1", "0o17", "4096.0",
    "1e9", "nan", "inf", "", "99999999999999999999", "18446744073709551616", str(2**63), str(-(2**63)),
    "9" * 4301, "1" * 5000, "\u0663", "\uff11", "0x", "--1",
]  # fmt: skip
VERBS = ["pin", "unpin", "zero", "inject", "uninject", "clear-errors", "trace-io", "kill", "revive", "PIN", "quit"]
FILES = ["pmem0", "dax0", "pmem1", "..", "dax0/x", "\u00ff", "status"]
SESSION_CORPUS = [
    b"pin pmem0 -1 99999999999999999999",
    b"inject 0 18446744073709551616",
    b"zero 0 0",
    b"unpin 99999",
    b"trace-io maybe",
    b"kill",
    b"revive",
    b"pin dax0 0 4096\x00",
    b"pin\x00dax0 0 4096",
    b"pin dax0 0 4096\npin dax0 4096 4096",
    b"zero 0 4096\nzero 4096 4096\n",
    b"\n",
    b"\x00" * 64,
    b"\xff\xfe\xfd pin dax0 0 4096",
    b"pin dax0 0 " + b"9" * 4301,
    b"inject 1 " + b"1" * 4301,
    b"uninject " + b"1" * 4301 + b" 1",
    b"pin pmem0 0 4096 longterm",
    b"pin dax0 0 4096 longterm extra",
    b"trace-io on",
    b"trace-io off",
    b"clear-errors now",
    b"unpin -1",
    b"unpin 0x" + b"f" * 40,
    b" " * 65536,
    b"9" * 65536,
    b"pin dax0 0 4096\n" * 4096,
]
BADBLOCKS_CORPUS = [
    b"1" * 4301 + b" 1",
    b"1 " + b"1" * 4301,
    b"18446744073709551616 1",
    b"0 18446744073709551616",
    b"-1 1",
    b"0 0",
    b"5 5\n6 6",
    b"1 1 1",
    b"0x10 1",
    b"\xd9\xa3 1",
    b"\x00",
    b"\xff\xfe",
    b"\n",
    b" " * 65536,
    b"9" * 65536,
]


def fuzz_command(rng: random.Random) -> bytes:
    verb = rng.choice(VERBS)
    words = [verb]
    if verb in ("pin", "PIN"):
        words.append(rng.choice(FILES))
    words += [rng.choice(NUMBERS) for _ in range(rng.choice((0, 1, 2, 2, 2, 3)))]
    if rng.random() < 0.1:
        words.append(rng.choice(["longterm", "on", "off", "maybe", "\x00"]))
    return " ".join(words).encode(errors="surrogateescape")


def fuzz_payload(rng: random.Random, corpus: list[bytes]) -> bytes:
    kind = rng.random()
    if kind < 0.30:
        return fuzz_command(rng)
    if kind < 0.40:
        return b"\n".join(fuzz_command(rng) for _ in range(rng.randint(2, 5)))
    if kind < 0.50:
        return rng.randbytes(rng.randint(1, 300))
    if kind < 0.55:
        return rng.randbytes(rng.randint(4096, 64 << 10))
    if kind < 0.60:
        return b""
    if kind < 0.70:  # non-UTF-8 inside a command
        command = bytearray(fuzz_command(rng))
        command.insert(rng.randint(0, len(command)), rng.choice((0x80, 0xC3, 0xFF, 0xED)))
        return bytes(command)
    if kind < 0.80:  # NUL bytes inside a command
        command = bytearray(fuzz_command(rng))
        command.insert(rng.randint(0, len(command)), 0)
        return bytes(command)
    return rng.choice(corpus)


def fuzz_badblocks(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.4:
        return f"{rng.choice(NUMBERS)} {rng.choice(NUMBERS)}".encode()
    if kind < 0.5:
        return rng.randbytes(rng.randint(0, 200))
    return rng.choice(BADBLOCKS_CORPUS)


def released(mount: Mount) -> bool:
    registry = read_status(mount.mountpoint)["registry"]
    return registry["referenced_pages"] == 0 and registry["device_alive"]


def check_snapshots(mount: Mount) -> None:
    json.loads(read_whole(control(mount, "status")))
    json.loads(read_whole(control(mount, "pages")))
    for line in read_whole(control(mount, "trace")).decode().splitlines():
        assert TRACE_LINE.match(line), line


def test_control_file_fuzz_never_takes_the_mount_down(control_mount: Mount) -> None:
    """Attacks the control-file parsers: thousands of random, huge, non-UTF-8 and extreme-number writes to
    four pin sessions and to .pmemfs/badblocks. Each must succeed or get an errno the contract allows; no
    serving process may die, and afterwards the registry is balanced and I/O is intact."""
    seed = int(os.environ.get("PMEMFS_FUZZ_SEED", random.SystemRandom().randrange(2**32)))
    print(f"control fuzz seed {seed} (PMEMFS_FUZZ_SEED={seed} repeats this run)")
    rng = random.Random(seed)
    mount = control_mount
    before = serving_pids(read_status(mount.mountpoint)["pid"])
    sessions = [os.open(control(mount, "pin"), os.O_RDWR) for _ in range(4)]
    badblocks = os.open(control(mount, "badblocks"), os.O_WRONLY)
    # Every corpus entry once, then random picks, in a seeded order.
    plan = [(True, p) for p in SESSION_CORPUS] + [(False, p) for p in BADBLOCKS_CORPUS]
    plan += [(None, b"")] * 2500
    rng.shuffle(plan)
    writes = accepted = reads = reopened = 0
    errnos: dict[str, int] = {}
    bad: list[str] = []
    deadline = time.monotonic() + 20
    try:
        for to_session, payload in plan:
            if to_session is None:
                to_session = rng.random() < 0.8
                payload = fuzz_payload(rng, SESSION_CORPUS) if to_session else fuzz_badblocks(rng)
            index = rng.randrange(len(sessions))
            fd = sessions[index] if to_session else badblocks
            writes += 1
            try:
                os.write(fd, payload)
                accepted += 1
            except OSError as err:
                name = errno.errorcode.get(err.errno or 0, str(err.errno))
                errnos[name] = errnos.get(name, 0) + 1
                if err.errno not in ALLOWED_ERRNOS:
                    target = "pin session" if to_session else "badblocks"
                    bad.append(f"{name} for {payload[:60]!r}... ({len(payload)} bytes to {target})")
                    if err.errno in DEAD_ERRNOS:
                        break  # the mount is gone: every later write would say the same
            if writes % 50 == 0:
                check_snapshots(mount)
                os.pread(sessions[index], 65536, 0)  # the session's own listing
                reads += 4
            if rng.random() < 0.01:  # a session ends (reviving a kill of its own) and a new one starts
                os.close(sessions[index])
                sessions[index] = os.open(control(mount, "pin"), os.O_RDWR)
                reopened += 1
            if time.monotonic() > deadline:
                break
    finally:
        for fd in [*sessions, badblocks]:
            try:
                os.close(fd)
            except OSError as err:
                bad.append(f"close: {err}")
    print(
        f"control fuzz ({SERVING_MODE[0]}): {writes} writes, {accepted} accepted, rejected {errnos}, "
        f"{reads} snapshot reads, {reopened} sessions restarted, {len(bad)} lost"
    )
    assert not bad, f"{len(bad)} write(s) got an errno outside the contract, first: " + "; ".join(bad[:5])
    # Releases of closed files reach the daemon asynchronously: wait for the sessions' pins and kills to go.
    wait_for(lambda: released(mount), what="the sessions to close")
    pmemfs("clear-errors", mount.mountpoint)
    status = read_status(mount.mountpoint)
    assert serving_pids(status["pid"]) == before, "a serving process died or was replaced"
    pages = json.loads(pmemfs("pages", mount.mountpoint, "--json").stdout)
    assert pages["ranges"] == [] and pages["holders"] == [], pages
    registry = status["registry"]
    assert registry["nr_foll_pin_acquired"] == registry["nr_foll_pin_released"], registry
    assert registry["referenced_pages"] == 0 and registry["device_alive"], registry
    data = os.urandom(MiB)
    with DirectFile(mount.pmem0) as direct:
        assert direct.pwrite(data, 3 * MiB) == MiB
        assert direct.pread(MiB, 3 * MiB) == data
