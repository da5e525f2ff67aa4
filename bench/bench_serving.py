"""1. Serving overhead.

`run_http` (the headline, as users compare): our Cog server over real HTTP against a bare diffusers
FluxPipeline + PIL save in a default process of its own (bench/bare_pipeline.py); and the public front
(`make serve`: front/ with its Cog server behind it), what strangers reach.

`run` (in-process): a full Predictor.run against the bare diffusers call + saving the same file, both
in this process (so they share its allocator and environment).

Both sides use the same tiny weights, size, steps, seed, prompt and output format; runs are
interleaved (A B C D, A B C D, …) and each figure is the median of the per-round ratios.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import requests
import torch
from common import interleaved, median, paired_ratio, timed

logger = logging.getLogger(__name__)

PROMPT = "an ascii art cat"


def run(tree: Path, *, size: int = 1024, steps: int = 4, rounds: int = 3) -> dict:
    from cog._inspector import check_input, create_predictor
    from diffusers import FluxPipeline

    import predict

    runner = predict.Predictor()
    runner.setup()
    fields = create_predictor("predict", "Predictor").inputs
    inputs = {
        "prompt": PROMPT,
        "aspect_ratio": "custom",
        "width": size,
        "height": size,
        "num_inference_steps": steps,
        "seed": 1,
    }

    def ours(**extra):
        return lambda: runner.run(**check_input(fields, {**inputs, **extra}))

    bare = FluxPipeline.from_pretrained(tree / "FLUX.1-dev")
    bare.set_progress_bar_config(disable=True)
    with_lora = FluxPipeline.from_pretrained(tree / "FLUX.1-dev")
    with_lora.set_progress_bar_config(disable=True)
    with_lora.load_lora_weights(str(tree / "lora.safetensors"), adapter_name="main")
    out = Path(tempfile.mkdtemp(prefix="bench-serving-"))

    def baseline(pipe):
        def call():
            image = pipe(
                prompt=PROMPT,
                width=size,
                height=size,
                num_inference_steps=steps,
                guidance_scale=3.5,
                max_sequence_length=512,
                generator=[torch.Generator("cpu").manual_seed(1)],
            ).images[0]
            image.convert("RGB").save(out / "bare.webp", format="WEBP", quality=90)

        return call

    cases = {
        "predict": ours(),  # defaults: main LoRA at 1.0 (adapters on), safety checker on, webp 90
        "bare": baseline(bare),  # no LoRA, no safety checker
        "bare_lora": baseline(with_lora),  # the same LoRA as an unfused diffusers adapter
        "predict_no_lora": ours(lora_scale=0),  # adapters off
        "predict_no_lora_no_safety": ours(lora_scale=0, disable_safety_checker=True),
    }
    times = interleaved(cases, rounds=rounds, warmup=1)
    runner.outputs.cleanup()
    for f in out.iterdir():
        f.unlink()
    out.rmdir()
    return {
        "size": size,
        "steps": steps,
        "rounds": rounds,
        "lora_max_rank": runner.loras.max_rank,
        "seconds": {k: median(v) for k, v in times.items()},
        "raw_seconds": times,
        "ratios": {
            "predict / bare": paired_ratio(times["predict"], times["bare"]),
            "predict / bare_lora": paired_ratio(times["predict"], times["bare_lora"]),
            "predict_no_lora / bare": paired_ratio(times["predict_no_lora"], times["bare"]),
            "predict_no_lora_no_safety / bare": paired_ratio(times["predict_no_lora_no_safety"], times["bare"]),
        },
    }


# ---------------------------------------------------------------- over real HTTP, as users compare

BARE_SCRIPT = Path(__file__).resolve().parent / "bare_pipeline.py"
STAGE_LINES = {
    "generate_s": re.compile(r"generated \d+ image\(s\) in ([\d.]+) s"),
    "lora_apply_s": re.compile(r"LoRA applied in ([\d.]+) ms"),  # ms, converted to seconds below
    "lora_write_s": re.compile(r"layers rewritten in ([\d.]+) ms"),  # ms, converted to seconds below
}


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A default user's environment: PATH, HOME, offline hub; nothing of ours (LOG_LEVEL, LD_PRELOAD…)."""
    env = {key: os.environ[key] for key in ("PATH", "HOME", "LANG", "TMPDIR") if key in os.environ}
    return {**env, "HF_HUB_OFFLINE": "1", **(extra or {})}


class BareProcess:
    """bench/bare_pipeline.py in its own process, started with `clean_env()`; one request at a time."""

    def __init__(self, tree: Path, *, env: dict[str, str] | None = None):
        args = [sys.executable, str(BARE_SCRIPT), str(tree)]
        self.process = subprocess.Popen(
            args, env=clean_env(env), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, cwd=tempfile.gettempdir(),
        )  # fmt: skip
        if json.loads(self.process.stdout.readline()).get("ready") is not True:
            raise RuntimeError("bare pipeline process did not start")

    def __call__(self, size: int, steps: int = 4, seed: int = 1) -> dict:
        self.process.stdin.write(f"{size} {size} {steps} {seed}\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def serve_env() -> dict[str, str]:
    """What `make serve` adds to the server's environment: the image's allocator, where installed."""
    import workarounds

    return workarounds.serving_environment()


class HttpServer:
    """`python -m cog.server.http` as `make serve` starts it (tests' CogServer, without the tests'
    offline guard on PYTHONPATH; `serve_env()`), the predictor logging at INFO so that its per-stage
    timings come back in each response's `logs`. `env` adds to (or, with a value of None, removes
    from) its env."""

    def __init__(self, tree: Path, *, env: dict[str, str | None] | None = None, pythonpath: str = ""):
        from cog_server import CogServer

        self.server = CogServer(tree, env={"LOG_LEVEL": "INFO"})
        self.server.env["PYTHONPATH"] = pythonpath
        for key, value in {**serve_env(), **(env or {})}.items():
            if value is None:
                self.server.env.pop(key, None)
            else:
                self.server.env[key] = value
        self.server.__enter__()
        self.server.wait_for("READY", timeout=300)
        self.session = requests.Session()

    def __call__(self, size: int, steps: int = 4, seed: int = 1) -> dict:
        return self.post({**http_inputs(size, steps), "seed": seed})

    def post(self, inputs: dict) -> dict:
        """One prediction; the client's time, Cog's predict_time and our logged stage times."""
        body = {"input": inputs}
        for _ in range(100):  # Cog's brief 409 right after the previous answer (FACTS.md): not timed
            started = time.perf_counter()
            response = self.session.post(self.server.url + "/predictions", json=body, timeout=600)
            if response.status_code != 409:
                break
            time.sleep(0.02)
        payload = response.json()
        total = time.perf_counter() - started
        if payload.get("status") != "succeeded":
            raise RuntimeError(f"prediction failed: {payload.get('error')}")
        answer = {
            "total_s": total,
            "predict_s": (payload.get("metrics") or {}).get("predict_time"),
            "response_bytes": len(response.content),
            "output_bytes": sum(len(base64.b64decode(uri.split(",", 1)[1])) for uri in payload["output"]),
        }
        logs = payload.get("logs") or ""
        for key, pattern in STAGE_LINES.items():
            found = pattern.findall(logs)
            if found:
                value = float(found[-1])
                answer[key] = value / 1000 if key.startswith("lora_") else value
        if "generate_time" in (payload.get("metrics") or {}):  # the same, to 0.1 ms (the log line: 10 ms)
            answer["generate_s"] = payload["metrics"]["generate_time"]
        return answer

    def worker_rss_mib(self) -> float:
        return self.server.worker().memory_info().rss / 2**20

    def server_rss_mib(self) -> float:
        import psutil

        return psutil.Process(self.server.process.pid).memory_info().rss / 2**20

    def close(self) -> None:
        self.session.close()
        self.server.__exit__(None, None, None)


class FrontHttp(HttpServer):
    """`python -m front` as `make serve` starts it (tests' FrontServer: the public front, its Cog server
    behind it on a loopback port, the serving environment of `make serve`), the same sync POST."""

    def __init__(self, tree: Path):
        from front_server import FrontServer

        self.server = FrontServer(tree, env={"LOG_LEVEL": "INFO", **serve_env()})
        self.server.__enter__()
        self.server.wait_ready()
        self.session = requests.Session()


def http_inputs(size: int, steps: int) -> dict:
    return {
        "prompt": PROMPT,
        "aspect_ratio": "custom",
        "width": size,
        "height": size,
        "num_inference_steps": steps,
        "output_format": "png",
        "lora_scale": 0,
        "disable_safety_checker": True,
    }


def interleaved_calls(cases: dict[str, Callable[[], dict]], rounds: int, warmup: int = 1) -> dict[str, list[dict]]:
    """Each case once per round in turn (A B C, A B C…) after `warmup` untimed rounds; its answers."""
    for _ in range(warmup):
        for call in cases.values():
            call()
    answers: dict[str, list[dict]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, call in cases.items():
            answers[name].append(call())
    return answers


def run_http(tree: Path, *, sizes: tuple[int, ...] = (1024, 256), steps: int = 4, rounds: int = 5) -> dict:
    """Figure 1 as users compare: our server over real HTTP vs a bare FluxPipeline + PIL save in a
    default process of its own, interleaved, lora_scale=0, no safety checker, png, seed 1."""
    server = HttpServer(tree)
    front = FrontHttp(tree)
    bare = BareProcess(tree)
    # And the bare pipeline with the server's allocator (make serve's preload): the serving cost alone.
    same = BareProcess(tree, env=serve_env()) if serve_env() else None
    try:
        results: dict = {"steps": steps, "rounds": rounds, "allocator": serve_env().get("LD_PRELOAD"), "sizes": {}}
        for size in sizes:
            cases = {
                "http": lambda s=size: server(s, steps),
                "front": lambda s=size: front(s, steps),
                "bare": lambda s=size: bare(s, steps),
            }
            if same:
                cases["bare, same allocator"] = lambda s=size: same(s, steps)
            answers = interleaved_calls(cases, rounds=rounds)
            http, base = answers["http"], answers["bare"]
            seconds = {
                "http": median([a["total_s"] for a in http]),
                "bare": median([a["total_s"] for a in base]),
            }
            # Where the HTTP time goes: predict (Cog's predict_time: our predict()) split by our own log
            # lines into pipeline ("generated … in"), LoRA apply ("LoRA applied in") and the rest (input
            # checks, png save); and Cog's part outside predict (HTTP, input validation, the output's
            # data-URI encoding, IPC). Seconds, medians over the rounds.
            stages = {
                "round_trip": seconds["http"],
                "predict": median([a["predict_s"] for a in http]),
                "pipeline": median([a["generate_s"] for a in http]),
                "lora_apply": median([a.get("lora_apply_s", 0.0) for a in http]),
                "predict_rest": median([a["predict_s"] - a["generate_s"] - a.get("lora_apply_s", 0.0) for a in http]),
                "cog_outside_predict": median([a["total_s"] - a["predict_s"] for a in http]),
                "bare_pipeline": median([a["pipe_s"] for a in base]),
                "bare_save": median([a["save_s"] for a in base]),
            }
            results["sizes"][str(size)] = {
                "seconds": seconds,
                "ratio http / bare": paired_ratio([a["total_s"] for a in http], [a["total_s"] for a in base]),
                "ratio http / bare, same allocator": paired_ratio(
                    [a["total_s"] for a in http], [a["total_s"] for a in answers["bare, same allocator"]]
                )
                if same
                else None,
                "ratio front / bare, same allocator": paired_ratio(
                    [a["total_s"] for a in answers["front"]], [a["total_s"] for a in answers["bare, same allocator"]]
                )
                if same
                else None,
                "ratio front / http": paired_ratio(
                    [a["total_s"] for a in answers["front"]], [a["total_s"] for a in http]
                ),
                "ratio pipeline: ours / bare": paired_ratio(
                    [a["generate_s"] for a in http], [a["pipe_s"] for a in base]
                ),
                "stages_s": stages,
                "png_bytes": http[-1]["output_bytes"],
                "response_bytes": http[-1]["response_bytes"],
                "base64_encode_s": _base64_cost(http[-1]["output_bytes"]),
                "raw": answers,
            }
        return results
    finally:
        server.close()
        front.close()
        bare.close()
        if same:
            same.close()


def _base64_cost(nbytes: int) -> float:
    """What base64-encoding an output of that size costs in Python (a lower bound for Cog's data URI)."""
    data = os.urandom(nbytes)
    return min(timed(lambda: "data:image/png;base64," + base64.b64encode(data).decode()) for _ in range(5))
