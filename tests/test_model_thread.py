"""Every call into the models runs on one thread of ours (workarounds.ModelThread), whichever of Cog's
threads calls predict(): PyTorch's OpenMP keeps a team of threads per calling thread, and past as many
as the machine has CPUs every op wakes its team from sleep (the pipeline ran about 1.5× slower in
Cog's worker on 2 cores: bench/README.md). A cancel still stops the work, as Cog delivers it."""

from __future__ import annotations

import contextvars
import ctypes
import logging
import threading
import time

import pytest

from workarounds import ModelThread


class Canceled(BaseException):
    """Stands for coglet's CancelationException (a BaseException, raised into predict()'s thread)."""


def raise_in(ident: int, exception: type[BaseException]) -> None:
    """What coglet does to cancel a sync predict(): PyThreadState_SetAsyncExc on its thread."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(exception))


def in_threads(fn, count: int = 4) -> list:
    """fn() called once from each of `count` fresh threads, as coglet calls predict(); their results."""
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(fn())) for _ in range(count)]
    for thread in threads:
        thread.start()
        thread.join()
    return results


def test_every_call_runs_on_the_one_model_thread_whichever_thread_calls():
    model = ModelThread()
    seen = in_threads(lambda: model.call(threading.get_ident)) + [model.call(threading.get_ident)]
    assert len(set(seen)) == 1
    assert seen[0] != threading.get_ident()
    assert model.call(model.is_current) and not model.is_current()


def test_the_callers_context_goes_along_and_errors_come_back():
    """Cog keeps the current prediction in a context variable: its logs and metrics must reach it."""
    prediction = contextvars.ContextVar("prediction")
    prediction.set("p-1")
    model = ModelThread()
    assert model.call(prediction.get) == "p-1"
    with pytest.raises(KeyError, match="missing"):
        model.call({}.__getitem__, "missing")
    assert model.call(lambda a, *, b: a + b, 1, b=2) == 3  # arguments pass through; the thread lives on


def test_a_cancel_raised_in_the_caller_stops_the_work_before_the_caller_returns():
    model = ModelThread()
    events: list[str] = []
    started = threading.Event()

    def work():
        started.set()
        try:
            while True:  # a long prediction: Python between short native calls, as a pipeline is
                time.sleep(0.01)
        finally:
            events.append("work unwound")

    def caller():
        try:
            model.call(work)
        except Canceled:
            events.append("caller canceled")

    thread = threading.Thread(target=caller)
    thread.start()
    assert started.wait(10)
    raise_in(thread.ident, Canceled)
    thread.join(10)
    assert not thread.is_alive()
    assert events == ["work unwound", "caller canceled"]  # the next prediction never runs beside it
    assert model.call(lambda: "ready") == "ready"


def test_predictions_from_cogs_threads_compute_on_one_thread(run, caplog):
    """The predictor's own steps (a log line each) run on the model thread, whoever calls run()."""
    caplog.set_level(logging.INFO, logger="predict")
    in_threads(lambda: run(prompt="x", num_inference_steps=1, aspect_ratio="custom", width=256, height=256), 2)
    steps = [r for r in caplog.records if r.name == "predict" and r.getMessage().startswith("step ")]
    assert len(steps) == 2
    assert len({r.thread for r in steps}) == 1 and steps[0].threadName.startswith("model")
