"""workers/actor.py without Ray: the outbox `take` drains, and the hand-shake that makes a worker
wait after RoundResults until the controller has committed them (its next `take`)."""

from __future__ import annotations

import dataclasses
import threading

from flexorch.contract.messages import Failed, Finished, Ready, RoundResults, WorkerTask
from flexorch.contract.protocol import EngineSettings, EngineSummary, ScoreSpec
from flexorch.workers import actor as actor_module
from flexorch.workers.actor import WorkerActor

TASK = WorkerTask(name="w0", model_dir="unused", settings=EngineSettings("cpu", "float32", 1, "cpu", 64),
                  score=ScoreSpec(kind="next_token_probs"), rounds=(), parts_dir="unused", return_results=True)
SUMMARY = EngineSummary(1.0, 0.0, 0.0, 1.0, 0, 0, 0)


def _results(round_id):
    return RoundResults("w0", round_id, (round_id,), (), SUMMARY)


def test_worker_waits_after_round_results_until_the_controller_asks_again(monkeypatch):
    after_first_round = threading.Event()

    def two_rounds(task, send):
        send(_results(0))
        after_first_round.set()  # reached only once round 0 is acknowledged
        send(_results(1))
        send(Finished(task.name, 1.0))

    monkeypatch.setattr(actor_module, "run_task", two_rounds)
    worker = WorkerActor()
    worker.run(TASK)
    first = worker.take()
    while not any(isinstance(m, RoundResults) for m in first):
        first += worker.take()
    assert isinstance(first[0], Ready) and first[-1] == _results(0)
    # The controller has not asked again, so it may not have committed round 0: the worker waits.
    assert not after_first_round.wait(0.2)
    rest = worker.take()  # asking again acknowledges round 0
    while not isinstance(rest[-1], Finished):
        rest += worker.take()
    assert after_first_round.is_set()
    assert rest == [_results(1), Finished("w0", 1.0)]


def test_an_exception_in_the_worker_is_its_failed_message(monkeypatch):
    def broken(task, send):
        raise RuntimeError("boom")

    monkeypatch.setattr(actor_module, "run_task", broken)
    worker = WorkerActor()
    worker.run(TASK)
    messages = worker.take()
    while not isinstance(messages[-1], Failed):
        messages += worker.take()
    assert messages[-1].error == "RuntimeError: boom" and "Traceback" in messages[-1].traceback


def test_a_log_that_cannot_be_opened_on_the_node_is_a_failed_message(tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where job_dir/logs would be")
    worker = WorkerActor()
    worker.run(dataclasses.replace(TASK, log_path=str(blocked / "logs" / "w0.log")))
    (message,) = worker.take()
    assert isinstance(message, Failed) and "not-a-folder" in message.error
