"""Benchmark the LLM client against a bare `openai` call on the same local server (issue 13: the client must
never be the bottleneck, >= 500 requests/s with concurrency 64 to a server that answers instantly).

    python bench/llm_client.py                       # N=2000 chat requests, concurrency 64
    python bench/llm_client.py --requests 5000 --concurrency 128 --repeats 3

The server (tests/synth/openai_server.py) runs in its own process, so it does not share this process's GIL,
and answers every request at once with a short text. Measured, best of --repeats, in this process:
  openai   a bare AsyncOpenAI(max_retries=0): one chat.completions.create per request, an asyncio.Semaphore of
           --concurrency around it, asyncio.gather over all of them
  ours     megasynth.synth.llm.LLMClient.map over the same requests: concurrency limit, budget check, JSON-free
           replies, the ledger written to a temporary directory (flushed and fsynced), results collected
Reported: requests/s (wall clock) and this process's CPU time per request (process_time; robust to other load
on the machine: 1 / CPU per request is what one core of client could sustain). The server bounds both rates.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "Say ok."}]


def start_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "synth" / "openai_server.py")],
                            stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()
    if not url.startswith("http://"):
        proc.kill()
        raise SystemExit(f"error: the test server did not start (printed {url!r})")
    return proc, url


async def bare_openai(url: str, n: int, concurrency: int) -> float:
    import openai

    api = openai.AsyncOpenAI(base_url=url, api_key="EMPTY", max_retries=0, timeout=60.0)
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int):
        async with sem:
            r = await api.chat.completions.create(model="m", messages=MESSAGES)
            return r.choices[0].message.content

    t, cpu = time.perf_counter(), time.process_time()
    out = await asyncio.gather(*(one(i) for i in range(n)))
    elapsed, cpu = time.perf_counter() - t, time.process_time() - cpu
    await api.close()
    assert len(out) == n and all(out)
    return n / elapsed, cpu / n


async def ours(url: str, n: int, concurrency: int, ledger: Path) -> float:
    from megasynth.synth.llm import LLMClient, LLMRequest, LLMSettings

    settings = LLMSettings(base_url=url, model="m", api_key_env="MEGASYNTH_BENCH_NO_KEY", concurrency=concurrency,
                           budget_tokens=10**12)
    async with LLMClient(settings, ledger_path=ledger) as client:
        t, cpu = time.perf_counter(), time.process_time()
        results = await client.map(LLMRequest(f"k{i}", messages=MESSAGES) for i in range(n))
        elapsed, cpu = time.perf_counter() - t, time.process_time() - cpu
    assert len(results) == n and all(r.ok for r in results.values())
    return n / elapsed, cpu / n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per measurement (default 2000)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per side; the best counts (default 3)")
    args = parser.parse_args(argv)
    proc, url = start_server()
    try:
        asyncio.run(bare_openai(url, 200, args.concurrency))  # warm-up: imports, connections, server paths
        bare, mine = [], []
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.repeats):
                bare.append(asyncio.run(bare_openai(url, args.requests, args.concurrency)))
                mine.append(asyncio.run(ours(url, args.requests, args.concurrency, Path(tmp) / f"ledger{r}.jsonl")))
    finally:
        proc.terminate()
        proc.wait(10)
    print(f"{args.requests} chat requests, concurrency {args.concurrency}, local server in another process, "
          f"{os.cpu_count()} CPUs, best of {args.repeats}")
    print(f"{'client':<8} {'requests/s':>11} {'client CPU ms/request':>22}")
    for name, runs in (("openai", bare), ("ours", mine)):
        print(f"{name:<8} {max(r[0] for r in runs):>11.0f} {1000 * min(r[1] for r in runs):>22.3f}")
    rate = max(r[0] for r in mine) / max(r[0] for r in bare)
    cpu = min(r[1] for r in mine) / min(r[1] for r in bare)
    print(f"ratio ours/openai: requests/s {rate:.2f}, CPU per request {cpu:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
