import queue
import sys
import threading
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from asyncrl.weights import PublishTimeout, WeightStore

# Large enough that each copy_ runs long outside the GIL, so reads and publishes interleave.
NUM_PARAMS = 2_000_000


def publish_constants(store: WeightStore, stop: threading.Event, deadline: float, pieces: int = 1) -> None:
    """Publish parameters whose every element equals the version they become (a module of
    ``pieces`` parameters: one copy each, as a learner's network)."""
    source = Flat(store.num_params, pieces)
    while not stop.is_set() and time.monotonic() < deadline:
        for piece in source.pieces:
            piece.fill_(store.version + 1)
        store.publish(source)


class Flat(nn.Module):
    """Parameters filling the store, in ``pieces`` tensors: what ``pull`` copies into, as an
    actor's network (one copy per parameter, as for a network's layers)."""

    def __init__(self, size: int, pieces: int = 1):
        super().__init__()
        edges = [size * i // pieces for i in range(pieces + 1)]
        self.pieces = nn.ParameterList(nn.Parameter(torch.empty(b - a), requires_grad=False)
                                       for a, b in zip(edges, edges[1:]))

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat(list(self.pieces))


def read_and_check(store: WeightStore, min_versions: int, budget_s: float) -> tuple[int, int, int]:
    """Read until ``min_versions`` publishes went by and at least one read overlapped a publish
    (or the budget ran out), by ``read_into``
    and by ``pull`` (as actors read) in turn; check every copy.

    Returns (reads, versions seen, reads that overlapped a publish and were redone).
    """
    out = torch.empty(store.num_params)
    module = Flat(store.num_params, pieces=64)
    retries_before = store.read_retries
    deadline = time.monotonic() + budget_s
    first = last = store.read_into(out)
    reads = 0
    # Whether a read overlaps a publish is up to the scheduler: on a loaded machine the first 50
    # versions can all go by between reads, which would prove nothing about torn reads.
    while ((last - first < min_versions or store.read_retries == retries_before)
           and time.monotonic() < deadline):
        if reads % 2:
            version = store.read_into(out)
            copy = out
        else:
            version = store.pull(module, -1)
            copy = module.weight
        low, high = torch.aminmax(copy)
        assert low == high == version, f"torn read: [{low}, {high}] at version {version}"
        assert version >= last, "version went backwards"
        last = version
        reads += 1
    return reads, last - first, store.read_retries - retries_before


def test_no_torn_read_across_threads():
    # Reads and publishes copy one parameter at a time, as a network's, and the interpreter
    # hands the GIL over every 20 us: the two threads interleave within each copy however
    # many cores the scheduler gives them (on a loaded 2-core box, with the default 5 ms
    # switches and one long copy each, a whole 5 s could pass without one overlap).
    store = WeightStore(NUM_PARAMS)
    stop = threading.Event()
    writer = threading.Thread(
        target=publish_constants, args=(store, stop, time.monotonic() + 10, 64), daemon=True
    )
    interval = sys.getswitchinterval()
    sys.setswitchinterval(2e-5)
    writer.start()
    try:
        reads, versions, retries = read_and_check(store, min_versions=50, budget_s=5)
    finally:
        stop.set()
        writer.join(timeout=5)
        sys.setswitchinterval(interval)
    assert not writer.is_alive()
    # Reads and publishes really overlapped (else no torn read could have been seen).
    assert reads > 0 and versions > 0 and retries > 0


def _child_reader(store: WeightStore, results: mp.Queue) -> None:
    try:
        results.put(("ready",))
        while store.version == 0:  # the parent's first publish proves the storage is shared
            time.sleep(0.001)
        results.put(("ok", *read_and_check(store, min_versions=30, budget_s=5)))
    except BaseException as error:
        results.put(("error", repr(error)))


def test_no_torn_read_across_a_spawned_process():
    ctx = mp.get_context("spawn")
    store = WeightStore(NUM_PARAMS)
    results = ctx.Queue()
    child = ctx.Process(target=_child_reader, args=(store, results), daemon=True)
    child.start()
    try:
        # Spawning a torch child is slow on a busy machine; publish only once it reads, so the
        # writer does not slow its start.
        assert results.get(timeout=30) == ("ready",)
        source = torch.empty(NUM_PARAMS)
        # Past the child's read budget (5 s) plus one read's timeout (10 s): a starved reader
        # then reports its PublishTimeout instead of going silent.
        deadline = time.monotonic() + 20
        result = None
        while result is None and time.monotonic() < deadline:
            source.fill_(store.version + 1)
            store.publish(source)
            # A learner updates between publishes. Back-to-back publishes leave a reader only
            # the gap of one fill_ to copy 8 MB in: a reader descheduled mid-copy on a busy
            # 2-core box retried for the whole 10 s and the test timed out (seen once in CI).
            time.sleep(0.001)
            try:
                result = results.get_nowait()
            except queue.Empty:
                pass
        assert result is not None, "the child reader did not finish in time"
        assert result[0] == "ok", result[1]
        _, reads, versions, retries = result
        assert reads > 0 and versions > 0 and retries > 0
        child.join(timeout=10)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
            child.join()


def make_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_module_round_trip():
    source, target = make_net(), make_net()
    store = WeightStore.for_module(source)
    assert store.num_params == 4 * 8 + 8 + 8 * 2 + 2
    assert store.publish(source) == 1
    assert store.pull(target, known_version=0) == 1
    for a, b in zip(source.parameters(), target.parameters(), strict=True):
        assert torch.equal(a, b)

    flat = torch.empty(store.num_params)
    assert store.read_into(flat) == 1
    assert torch.equal(flat, nn.utils.parameters_to_vector(source.parameters()))


def test_pull_only_when_the_version_moved():
    source, target = make_net(), make_net()
    store = WeightStore.for_module(source)
    before = [p.clone() for p in target.parameters()]
    assert store.version == 0
    assert store.pull(target, known_version=0) is None  # nothing published yet
    assert all(torch.equal(a, b) for a, b in zip(before, target.parameters()))

    store.publish(source)
    known = store.pull(target, known_version=0)
    assert known == 1
    assert store.pull(target, known_version=known) is None

    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    store.publish(source)
    assert store.pull(target, known_version=known) == 2
    assert all(torch.equal(a, b) for a, b in zip(source.parameters(), target.parameters()))


def test_size_mismatches_are_refused():
    store = WeightStore(10)
    with pytest.raises(ValueError, match="publishing 11"):
        store.publish(torch.zeros(11))
    assert store.version == 0 and store._sequence.item() == 0  # not left mid-publish
    with pytest.raises(ValueError, match="into 9"):
        store.read_into(torch.zeros(9))
    store.publish(torch.ones(10))
    with pytest.raises(ValueError, match="module of"):
        store.pull(make_net(), known_version=0)
    with pytest.raises(ValueError, match="num_params"):
        WeightStore(0)


def _read_in_thread(store: WeightStore, out: torch.Tensor) -> tuple[threading.Thread, list]:
    """A reader in a daemon thread, so that a reader spinning for ever fails the test, not hangs it."""
    got: list = []
    reader = threading.Thread(target=lambda: got.append(store.read_into(out)), daemon=True)
    reader.start()
    reader.join(timeout=10)
    return reader, got


def test_a_publish_that_raises_leaves_the_store_readable():
    store = WeightStore(10)
    store.publish(torch.ones(10))
    # Its size fits, so the publish begins; the copy out of a meta tensor then raises.
    with pytest.raises(NotImplementedError):
        store.publish(torch.empty(10, device="meta"))
    assert store.version == 1
    reader, got = _read_in_thread(store, torch.empty(10))  # a reader that needs version 1
    assert not reader.is_alive() and got == [1]
    assert store.publish(torch.full((10,), 2.0)) == 2  # the next publish goes on as usual
    out = torch.empty(10)
    assert store.read_into(out) == 2 and torch.equal(out, torch.full((10,), 2.0))


def test_a_publish_that_never_finishes_times_readers_out():
    store = WeightStore(10)
    store.publish(torch.ones(10))
    store._sequence.fill_(3)  # what a writer killed mid-publish leaves behind
    with pytest.raises(PublishTimeout, match="mid-publish"):
        store.read_into(torch.empty(10), timeout=0.2)
    with pytest.raises(PublishTimeout):
        store.pull(nn.Linear(4, 2), known_version=0, timeout=0.2)  # 10 parameters
    assert store.pull(nn.Linear(4, 2), known_version=1, timeout=0.2) is None  # up to date: no read
