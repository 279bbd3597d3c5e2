"""Markdown tables, summary statistics and benchmark sections of a document."""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
from collections.abc import Sequence

import torch


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation); the deviation is 0 for one value."""
    if not values:
        return math.nan, math.nan
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), spread


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Format a GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_description() -> str:
    """Describe this machine: CPU model, cores, memory and software versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory_gib = math.nan
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    memory_gib = int(line.split()[1]) / 2**20
                    break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory_gib:.0f} GiB RAM; "
        f"Python {platform.python_version()}, PyTorch {torch.__version__}"
    )


def load_average() -> str:
    """Return the 1, 5 and 15 minute load averages, or 'unknown'."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


SECTION_BEGIN = "<!-- benchmark-job:{name}:begin -->"
SECTION_END = "<!-- benchmark-job:{name}:end -->"


def replace_section(document: str, name: str, body: str) -> str:
    """Return ``document`` with the section ``name`` replaced by ``body``.

    A section runs from its begin marker to its end marker (HTML comments,
    invisible when rendered). A missing section is appended at the end;
    text outside the markers is never changed.
    """
    begin = SECTION_BEGIN.format(name=name)
    end = SECTION_END.format(name=name)
    block = f"{begin}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(document):
        return pattern.sub(lambda _: block, document, count=1)
    if not document or document.endswith("\n\n"):
        separator = ""
    elif document.endswith("\n"):
        separator = "\n"
    else:
        separator = "\n\n"
    return f"{document}{separator}{block}\n"


def write_sections(path: str, sections: dict[str, str], title: str) -> None:
    """Replace (or append) each named section of the Markdown file ``path``."""
    document = f"# {title}\n\n"
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            document = f.read()
    for name, body in sections.items():
        document = replace_section(document, name, body)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(document)
