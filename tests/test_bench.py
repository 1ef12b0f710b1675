"""The benchmark suite's plumbing, at tiny sizes, so a change that breaks it shows in CI.

The figures of a smoke run mean nothing; what is checked is that every benchmark runs to
its end against the real servers, controller and simulator, and that the results file
and the docs table come out whole, with the page's prose kept.
"""

import json
import subprocess
import sys
from pathlib import Path

from bench import loadpub, report
from bench.__main__ import BENCHMARKS
from bench.harness import Figure, percentile

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_run_of_every_benchmark(tmp_path: Path) -> None:
    page = tmp_path / "benchmarks.md"
    page.write_text(
        f"# Benchmarks\n\nprose before\n\n{report.BEGIN}\nold table\n{report.END}\n\nprose after\n"
    )
    out = tmp_path / "latest.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out), "--docs", str(page)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert list(results["benchmarks"]) == list(BENCHMARKS)
    assert results["git"]["commit"]
    assert results["machine"]["cores"]
    for name, bench in results["benchmarks"].items():
        assert bench["error"] is None, name
        assert bench["figures"], name
        assert bench["command"].startswith("make bench"), name
    ingest = {f["name"]: f for f in results["benchmarks"]["ingest"]["figures"]}
    lost = next(f for name, f in ingest.items() if name.startswith("messages lost"))
    assert lost["value"] == 0
    committed = next(f for name, f in ingest.items() if "end to end" in name)
    assert committed["value"] > 0
    assert committed["ceiling"] > 0
    assert committed["ratio"] is not None
    text = page.read_text()
    assert "prose before" in text
    assert "prose after" in text
    assert "old table" not in text
    assert "| benchmark | figure | ceiling from the same run | ratio | target | command |" in text
    assert "`make bench BENCH=ingest`" in text


def test_publish_packets_follow_mqtt_v5() -> None:
    packet = loadpub.encode_publish(b"a/b", b"xyz", 7)
    # QoS1 PUBLISH; remaining length; topic; packet id 7; empty properties; payload.
    assert packet == b"\x32\x0b\x00\x03a/b\x00\x07\x00xyz"
    connect = loadpub.encode_connect("c", "u", "p")
    assert connect[0] == 0x10
    assert connect[2:9] == b"\x00\x04MQTT\x05"


def test_receive_maximum_is_found_among_other_properties() -> None:
    # Maximum QoS (1 byte), an assigned client id (string), then Receive Maximum 20.
    properties = b"\x24\x01" + b"\x12\x00\x02id" + b"\x21\x00\x14"
    assert loadpub._receive_maximum(properties) == 20
    assert loadpub._receive_maximum(b"") is None


def test_figures_ratio_and_percentiles() -> None:
    assert Figure("x", 30.0, "msg/s", ceiling=60.0).ratio == 0.5
    assert Figure("x", None, "msg/s", ceiling=60.0).ratio is None
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert percentile(list(map(float, range(1, 101))), 99) == 99.0
    assert percentile([], 50) is None
