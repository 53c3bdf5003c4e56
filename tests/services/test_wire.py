"""The step call's tuples over Ray (`junction.services.wire`) carry every field, both ways."""

from __future__ import annotations

import pickle
from dataclasses import fields

from junction.services.wire import pack_requests, pack_results, unpack_requests, unpack_results
from junction.shared.types import Candidates, Commit, Failure, RunAhead, StepRequest, StepResult

# One value per field, none of them a default: a field added to a class and not to the wire
# fails `made` below, by name.
VALUES = {
    Commit: {"text": " é", "ids": (7, 8), "family": "llama"},
    RunAhead: {"steps": 9, "threshold": 1.5, "tau": 0.4, "seconds": 0.1},
    StepRequest: {
        "seq_id": "r1", "k": 100, "temperature": 0.7, "top_p": 0.9,
        "append": [Commit(" a", (1,), "gemma"), Commit("b")], "logprobs": 3, "entropy_k": 10,
        "ahead": RunAhead(9, None, 0.5),
    },
    Candidates: {
        "ids": [5, 6], "texts": [" x", ""], "logprobs": [-0.1, -2.5], "entropy": 0.3,
        "top1_prob": 0.9,
    },
    StepResult: {
        "seq_id": "r1", "top": Candidates([1], ["\uffff<eos>"], [-0.5], 0.0, 0.6),
        "sampled_id": 1, "sampled_text": "\uffff<eos>", "mid_char": True, "processed": 4,
        "sampled_logprob": -0.5, "top_logprobs": [(" x", -0.1)],
        "earlier": [StepResult("r1", Candidates([2], ["y"], [-1.0], 0.1, 0.4), 2, "y", False, 1)],
    },
}


def made(cls):
    values = VALUES[cls]
    assert [f.name for f in fields(cls)] == list(values), f"{cls.__name__}: fields changed"
    return cls(**values)


def test_every_class_on_the_wire_has_its_sample_values():
    for cls in VALUES:
        made(cls)


def test_requests_come_back_equal_with_every_field():
    reqs = [made(StepRequest), StepRequest("r2")]
    wire = pickle.loads(pickle.dumps(pack_requests(reqs)))
    assert unpack_requests(wire) == reqs


def test_results_come_back_equal_with_every_field_and_failures_as_they_are():
    results = [made(StepResult), Failure("r2", "ValueError: no"), made(StepResult)]
    wire = pickle.loads(pickle.dumps(pack_results(results)))
    back = unpack_results(wire)
    assert back == results
    assert isinstance(back[1], Failure) and isinstance(back[0].earlier[0], StepResult)


def test_the_wire_holds_no_object_of_a_class_of_ours():
    """What the pickler sees: built-in containers and values only (failures excepted)."""

    def plain(value) -> bool:
        if isinstance(value, list | tuple):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, str | int | float | bool)

    assert plain(pack_requests([made(StepRequest)]))
    assert plain(pack_results([made(StepResult)]))
