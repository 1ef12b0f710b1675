"""The results file and the table in docs/benchmarks.md, rendered between its markers."""

import json
from pathlib import Path
from typing import Any

from bench.harness import number

BEGIN = "<!-- bench:results:begin -->"
END = "<!-- bench:results:end -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _ratio(raw: dict[str, Any]) -> str:
    ratio = raw.get("ratio")
    return "—" if ratio is None else f"{ratio:.2f}"


def _ceiling(raw: dict[str, Any]) -> str:
    if raw.get("ceiling") is None:
        return "—"
    return f"{number(raw['ceiling'], raw['unit'])} ({raw['ceiling_name']})"


def _target(raw: dict[str, Any]) -> str:
    if not raw.get("target"):
        return "—"
    verdict = {True: " ✔", False: " ✘ missed", None: ""}[raw.get("met")]
    return f"{raw['target']}{verdict}"


def render_table(results: dict[str, Any]) -> str:
    """The markdown block that goes between the markers."""
    machine = results["machine"]
    git = results["git"]
    dirty = " (work tree had uncommitted changes)" if git["dirty"] else ""
    lines = [
        BEGIN,
        "",
        (
            f"Measured {results['date']} by `{results['command']}` in {results['total_s']:.0f} s "
            f"on {machine['cores']} x {machine['cpu']}, {machine['memory_gib']} GiB, "
            f"{machine['os']} (kernel {machine['kernel']}), Python {machine['python']}, "
            f"{machine['mosquitto']}, {machine['postgres']}; open-files limit "
            f"{machine['open_files_limit']['hard']:,} per process. "
            f"Commit `{git['commit'][:12]}`{dirty}. Raw figures: `bench/results/latest.json`."
        ),
        "",
        "| benchmark | figure | ceiling from the same run | ratio | target | command |",
        "|---|---|---|---|---|---|",
    ]
    for name, bench in results["benchmarks"].items():
        command = f"`{bench['command']}`"
        if bench.get("date", results["date"]) != results["date"]:
            # Merged from an earlier run of only some benchmarks.
            command += f" (run {bench['date']}, commit `{bench.get('commit', '')[:12]}`)"
        if bench.get("error"):
            lines.append(
                f"| {name} | stopped early: {_cell(bench['error'][:200])} | — | — | — | {command} |"
            )
        lines.extend(
            f"| {name} | {_cell(raw['name'])}: **{number(raw['value'], raw['unit'])}** "
            f"| {_cell(_ceiling(raw))} | {_ratio(raw)} | {_cell(_target(raw))} "
            f"| {command} |"
            for raw in bench["figures"]
        )
    notes = [(name, n) for name, bench in results["benchmarks"].items() for n in bench["notes"]]
    if notes:
        lines += ["", "Notes from the run:", ""]
        lines += [f"- **{name}**: {_cell(note)}" for name, note in notes]
    lines += ["", END]
    return "\n".join(lines)


def write_results(results: dict[str, Any], path: Path) -> None:
    """Write the results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")


def update_docs(results: dict[str, Any], page: Path) -> None:
    """Replace the block between the markers (or append one), keeping the prose around it."""
    text = page.read_text() if page.exists() else "# Benchmarks\n"
    block = render_table(results)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    page.write_text(text)
