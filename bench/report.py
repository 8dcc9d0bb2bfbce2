"""Rows of the result table: snapfs beside its baselines, with ratios; text and JSON."""

from dataclasses import dataclass, field


@dataclass
class Baseline:
    name: str
    value: float | None
    runs: list[float] = field(default_factory=list)
    ratio: str | None = None  # overrides snapfs / value


@dataclass
class Row:
    figure: str
    unit: str
    snapfs: float | None
    runs: list[float] = field(default_factory=list)
    baselines: list[Baseline] = field(default_factory=list)
    note: str = ""

    def as_dict(self) -> dict:
        return {
            "figure": self.figure,
            "unit": self.unit,
            "snapfs": self.snapfs,
            "snapfs_runs": self.runs,
            "note": self.note,
            "baselines": [
                {
                    "name": b.name,
                    "value": b.value,
                    "runs": b.runs,
                    "snapfs_ratio": ratio(self.snapfs, b.value),
                }
                for b in self.baselines
            ],
        }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 0.01 or a == 0:
        return f"{v:.2f}"
    return f"{v:.2g}"


HEADER = ("figure", "unit", "snapfs", "baseline", "value", "snapfs/base")


def lines(rows: list[Row]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for row in rows:
        first = True
        for b in row.baselines or [Baseline("", None)]:
            r = (
                b.ratio
                if b.ratio is not None
                else (
                    f"{ratio(row.snapfs, b.value):.2f}x"
                    if ratio(row.snapfs, b.value) is not None
                    else ""
                )
            )
            out.append(
                (
                    row.figure if first else "",
                    row.unit if first else "",
                    fmt(row.snapfs) if first else "",
                    b.name,
                    fmt(b.value) if b.name else "",
                    r,
                )
            )
            first = False
    return out


def table(rows: list[Row]) -> str:
    body = lines(rows)
    all_lines = [HEADER, *body]
    widths = [max(len(line[i]) for line in all_lines) for i in range(len(HEADER))]
    right = {2, 4, 5}

    def render(line: tuple[str, ...]) -> str:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([render(HEADER), sep, *(render(line) for line in body)])
