"""The report written out: one list of blocks (headings, paragraphs, lists, tables, images) rendered to report.md
and to a self-contained report.html by the same code, the configurations as configurations.csv, and write_report,
which writes them all beside the charts.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import stat
from collections import Counter
from pathlib import Path

from lora_efficiency.errors import UserError
from lora_efficiency.report.charts import CHART_TITLES, draw_charts
from lora_efficiency.report.convergence import convergence_section
from lora_efficiency.report.families import families_section
from lora_efficiency.report.files import write_file
from lora_efficiency.report.findings import CEILING, Comparison, Report, recommendation_lines, same_modules
from lora_efficiency.report.forgetting import forgetting_section
from lora_efficiency.report.lr import lr_section
from lora_efficiency.report.metrics import EXACT_MATCH, FINDING_METRICS, METRICS, PEAK_MB, PERPLEXITY
from lora_efficiency.report.runs import RunData, Scope
from lora_efficiency.report.stats import PAIRED, Stat, cell, margin_text
from lora_efficiency.report.timing import time_split_section

Block = tuple  # (kind, *content): ("h1".."h3", text), ("p", text), ("ul", items), ("table", header, rows),
# ("img", path, title)

TABLE_METRICS = (
    PERPLEXITY,
    EXACT_MATCH,
    "eval/exact_match_normalized",
    "eval/exact_match_by_kind",
    PEAK_MB,
    "params/trainable",
    "perf/train_tokens_per_second",
    "inference/decode_tokens_per_second",
    "time/train_s",
)
# shown only where some run logged it: runs before the fixed-length speed pass
LEGACY_TABLE_METRICS = ("inference/tokens_per_second",)


def methods(report: Report) -> str:
    """The Methods paragraph: how every number and verdict of the report is made."""
    family = report.family
    margin = margin_text(family.margin)
    return (
        "Methods: each metric is the mean over seeds with its 95% interval (Student's t, n - 1 degrees of "
        "freedom), written mean [low, high]. Configurations are compared paired by seed (the same seed saw the "
        "same batches): the difference is taken seed by seed over the seeds both have and gets a t interval with "
        "n - 1 degrees of freedom; fewer than 2 pairs: 'cannot tell'. Perplexity, memory, speed and time are "
        "compared on the log scale: the effect is the ratio exp(mean difference of ln value) (for perplexity, "
        "of eval loss) with the interval exp(interval of the difference); exact match in percentage points. "
        "Tests that cannot be paired say so: adapters against the base model alone (one evaluation, a constant: "
        "one-sample t) and configurations without a seed in common (Welch). "
        f"Equivalence is declared for perplexity only, with the margin {family.margin:g} (ratio within "
        f"{margin}, |difference of eval loss| < ln {family.margin:g}), tested by TOST (two one-sided t-tests). "
        + _families_sentence(family)
        + " Verdicts: 'better' / 'worse' (a difference beyond noise after Holm), "
        f"'equivalent within {margin}' (TOST after Holm), else 'cannot tell'; a difference not detected is not "
        f"'equal'. Intervals are {1 - family.alpha:.0%} intervals of each comparison, not adjusted; the p-values "
        "shown are Holm-adjusted. " + _noise_sentence(report)
    )


def _noise_sentence(report: Report) -> str:
    """What the perplexity intervals count: seeds alone, or seeds and the sampling of evaluation examples."""
    if not any(c.losses for c in report.configurations):
        return (
            "Only seed-to-seed noise is counted, not the sampling noise of the evaluation examples (no run of this "
            "report logged per_example_losses.json)."
        )
    return (
        "Perplexity comparisons count both noises where every pair has per-example losses (per_example_losses.json): "
        "seeds by Student's t (s^2 / n), and the sampling of evaluation examples by a bootstrap of example ids "
        "(2,000 replicates, fixed seed; one resample shared by every seed and paired across a and b by example, "
        "since every run scores the same examples), added in quadrature with Welch-Satterthwaite degrees of "
        "freedom; the pairs column says where a comparison counts seeds only, and why. Other metrics count seeds."
    )


def _count(count: int, singular: str, plural: str) -> str:
    """'1 test of ...' or '3 tests of ...': the report prints counts of 1 (a study that declares one contrast)."""
    return f"{count} {singular if count == 1 else plural}"


def _families_sentence(family) -> str:
    differences = _count(family.difference_tests, "test of 'no difference'", "tests of 'no difference'")
    equivalences = _count(family.equivalence_tests, "equivalence test", "equivalence tests")
    if family.declared_tests:
        declared = _count(
            family.declared_tests, "contrast the study declared forms", "contrasts the study declared form"
        )
        return (
            f"The {declared} the confirmatory family, each with the "
            "test and margin it declared (an equivalence margin its own, a difference two-sided, its margin the "
            f"effect its seeds were sized for), corrected with Holm-Bonferroni at alpha = {family.alpha:g}; every "
            f"other test is exploratory: {differences} and {equivalences}, "
            "each kind corrected with Holm among themselves, outside the declared family."
        )
    return (
        f"Every test the report states is corrected with Holm-Bonferroni at alpha = {family.alpha:g}: "
        f"{differences} in one family, {equivalences} in another."
    )


def configuration_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """The table of every configuration (best perplexity first; # is the number in the charts), then the
    baselines.

    Args:
        report: the built report.

    Returns:
        The header and the rows, as text.
    """
    runs = [r for c in report.configurations for r in c.runs] + list(report.scope.baselines)
    shown = TABLE_METRICS + tuple(m for m in LEGACY_TABLE_METRICS if any(m in r.metrics for r in runs))
    header = ["#", "configuration", "seeds"] + [METRICS[m].axis for m in shown] + ["Pareto front of"]
    rows = [
        [str(i), c.label, ", ".join(map(str, c.seeds))]
        + [cell(c.stats.get(m), m) for m in shown]
        + [", ".join(METRICS[m].label for m, front in report.fronts.items() if c in front)]
        for i, c in enumerate(report.configurations, 1)
    ]
    for base in report.scope.baselines:
        values = [
            cell(Stat((base.metrics[m],)), m).replace(" (1 seed)", "") if m in base.metrics else "-" for m in shown
        ]
        rows.append(["", f"baseline: no adapter, {base.storage}", "-"] + values + [""])
    return header, rows


def comparison_rows(comp: Comparison) -> tuple[list[str], list[list[str]]]:
    """The table of one comparison: its configurations along the axis, quality and cost, the reference marked."""
    header = [comp.name, "seeds"] + [METRICS[m].axis for m in (*FINDING_METRICS, "params/trainable")]
    rows = [
        [comp.value(c) + (" (reference)" if c is comp.reference else ""), str(len(c.runs))]
        + [cell(c.stats.get(m), m) for m in (*FINDING_METRICS, "params/trainable")]
        for c in comp.configurations
    ]
    return header, rows


def test_rows(report: Report, comp: Comparison) -> tuple[list[str], list[list[str]]]:
    """The perplexity tests of one comparison: each configuration against the reference, the pairs used, the
    ratio with its interval, the Holm-adjusted p-values and the verdict."""
    alpha = report.family.alpha
    header = [
        comp.name,
        "against",
        "pairs (n)",
        f"perplexity ratio, {1 - alpha:.0%} interval, {1 - 2 * alpha:.0%} interval (the TOST's)",
        "Holm p (difference)",
        "Holm p (equivalence)",
        "verdict",
    ]
    rows = []
    for f in report.findings:
        if f.comparison != comp.name:
            continue
        j = f.judgements[PERPLEXITY]
        e = j.effect
        pairs = str(e.n) if e.design == PAIRED else f"{e.n} ({e.design})" if e.design else f"{e.n} ({e.reason})"
        pairs += f"; noise of {e.noise}" if e.noise != "seeds" else ""
        rows.append(
            [f.a, f.b, pairs, j.size().removeprefix("ratio ") if e.diff is not None else "not measured"]
            + [_p_cell(j.p_difference), _p_cell(j.p_equivalence), j.decision]
        )
    return header, rows


def _p_cell(p: float | None) -> str:
    return "-" if p is None else "< 0.001" if p < 0.001 else f"{p:.3f}"


def _document(report: Report, charts: dict[str, Path]) -> list[Block]:
    """The report as blocks, rendered to Markdown and to HTML by the same code."""
    return [
        *_scope_blocks(report),
        *_configuration_blocks(report),
        *families_section(report),
        *lr_section(report),
        *convergence_section(report),
        *_declared_blocks(report),
        *forgetting_section(report),
        *time_split_section(report),
        *_finding_blocks(report),
        *_recommendation_blocks(report),
        *_anchor_blocks(report),
        ("h2", "Charts"),
        *[("img", path, CHART_TITLES[name]) for name, path in charts.items()],
        *_failed_blocks(report.scope),
    ]


# The quick profile (`make study`: 16 steps, 2 seeds) checks that every part of the pipeline runs; on 2026-12-04 its
# report read "cannot tell" on all 72 of its tests. Its first line says so, before any table can be read as an answer.
SMOKE_TEST = (
    "**A smoke test of the pipeline, not an answer.** These runs used the `quick` profile (a few steps, two seeds), "
    "sized to show that every part of the study runs, not to decide rank, target modules or quantization: read "
    "every verdict below as a check of the machinery. The `standard` profile's study (docs/RESULTS.md) is the one "
    "that answers."
)


def _scope_blocks(report: Report) -> list[Block]:
    """The title, what the report covers, the method, and the sweeps and notes."""
    s = report.scope
    seeds = Counter(len(c.runs) for c in report.configurations)
    kind = {"main": "study run", "sweep": "sweep run"}
    root = f"{kind.get(s.root.tags.get('entry_point', ''), 'run')} {s.root.name} ({s.root.run_id})" if s.root else None
    devices = sorted({r.tags.get("device_name", "?") for r in s.runs})
    blocks: list[Block] = [
        ("h1", f"LoRA efficiency report: {s.experiment}"),
        *([("p", SMOKE_TEST)] if any(r.tags.get("profile") == "quick" for r in s.sweeps) else []),
        (
            "p",
            f"Scope: experiment {s.experiment}, {root or 'every sweep run (no study run)'}: {len(s.runs)} FINISHED "
            f"training runs in {len(report.configurations)} configurations ("
            + ", ".join(f"{n} with {k} seed{'s' * (k > 1)}" for k, n in sorted(seeds.items()))
            + f"), {len(s.failed)} failed, {len(s.baselines)} baseline{'s' * (len(s.baselines) != 1)}. "
            f"Device: {', '.join(devices)}.",
        ),
        *[("p", line) for line in report.provenance],
        ("p", methods(report)),
    ]
    sweeps = [_sweep_line(r) for r in sorted(s.sweeps, key=lambda r: r.start_ms)]
    if sweeps or report.notes:
        blocks += [("h2", "Runs and notes"), ("ul", sweeps + report.notes)]
    return blocks


def _sweep_line(r: RunData) -> str:
    return (
        f"sweep {r.tags.get('sweep_name', r.name)}: {r.tags.get('children_total', '?')} runs, "
        f"{r.tags.get('children_finished', '?')} trained, {r.tags.get('children_skipped', '?')} skipped (already "
        f"FINISHED elsewhere), {r.tags.get('children_failed', '?')} failed"
    )


def _section(title: str, intro: str, *content: Block) -> list[Block]:
    """A titled section: its heading, the paragraph that says how to read it, then its content."""
    return [("h2", title), ("p", intro), *content]


def _configuration_blocks(report: Report) -> list[Block]:
    return _section(
        "Every configuration",
        "mean [95% interval] over seeds, best perplexity first; a single number: every seed measured the same; "
        "the base model alone (evaluated once) at the bottom.",
        ("table", *configuration_rows(report)),
    )


def _declared_blocks(report: Report) -> list[Block]:
    """The contrasts the study declared before its data: the confirmatory tests, Holm over them alone."""
    if not report.declared:
        return []
    return _section(
        "Declared contrasts",
        f"The {len(report.declared)} contrasts the study's profile declared before any run, each with its one test "
        "(equivalence by TOST, or difference), corrected together with Holm over these alone; every other test of "
        "this report is exploratory, corrected among themselves outside this family. Where a contrast reads "
        "'cannot tell', the seeds that would decide it give 80% power at the observed paired spread, planned at "
        "alpha / k (lora_efficiency/design.py).",
        ("ul", report.declared_lines),
        *(
            [
                ("h3", "Declared contrasts by task family (exploratory)"),
                (
                    "p",
                    "Each declared perplexity contrast on each task family that is not at its ceiling (the better "
                    f"configuration's perplexity on it at least {CEILING:.2f}; below it, under 0.095 nats per token "
                    "are left to gain). These tests form a Holm family of their own, outside the declared one: which "
                    "families are tested is read from these runs, so they are exploratory.",
                ),
                ("ul", report.family_lines),
            ]
            if report.family_lines
            else []
        ),
    )


def _finding_blocks(report: Report) -> list[Block]:
    """The Pareto fronts and the baselines, then each comparison: its table and its findings."""
    number = {c.key: i for i, c in enumerate(report.configurations, 1)}
    fronts = [
        f"Pareto front of {METRICS[m].label} against peak memory (means; a step along it is a finding only where "
        "the Findings below say so): "
        + " -> ".join(f"#{number[c.key]} {c.label} ({c.mean(PEAK_MB):,.0f} MB, {cell(c.stats[m], m)})" for c in front)
        for m, front in report.fronts.items()
    ]
    blocks: list[Block] = [("h2", "Findings"), ("ul", fronts + report.baseline_lines)]
    for comp in report.comparisons:
        found = [f.text for f in report.findings if f.comparison == comp.name]
        blocks += [
            ("h3", f"{comp.name} ({comp.fixed or 'all else equal'}; reference {comp.value(comp.reference)})"),
            ("table", *comparison_rows(comp)),
            ("table", *test_rows(report, comp)),
            ("ul", found + same_modules(comp)),
        ]
    return blocks


def _recommendation_blocks(report: Report) -> list[Block]:
    return _section(
        "Recommendations by memory budget",
        "The lowest mean perplexity among the configurations whose every seed peaked under the budget, and the "
        f"ones that fit and are equivalent to it in perplexity (within {margin_text(report.family.margin)}, "
        "TOST after Holm), those it beats beyond noise, and those it cannot be told from: a choice by the mean "
        "alone, which the study does not back.",
        ("ul", recommendation_lines(report.recommendations)),
    )


def _anchor_blocks(report: Report) -> list[Block]:
    rows = [
        [a.source, a.claim, a.test, a.setup, a.verdict]
        + [f"{a.verdicts[m]}: {a.evidence[m]}" for m in (PERPLEXITY, EXACT_MATCH)]
        for a in report.anchors
    ]
    return _section(
        "Published anchors",
        "Each published result (summarised, not quoted) is tested on this study's runs, per quality metric: "
        "'agrees' only when the numbers show it (equivalence within the margin for a 'no difference' claim, the "
        "claimed direction beyond noise otherwise), 'disagrees' only beyond noise against the claim, else "
        "'cannot tell'; a difference that was not detected never agrees. Their setup is not ours: the "
        "'setups' column says how.",
        ("table", ["source", "published", "tested here as", "setups", "verdict", "perplexity", "exact match"], rows),
    )


def _failed_blocks(scope: Scope) -> list[Block]:
    if not scope.failed:
        return []
    failed = [
        f"{r.tags.get('sweep_configuration', r.name)} ({r.run_id[:8]}): "
        + r.tags.get("error", "no error recorded")[:300]
        for r in scope.failed
    ]
    return [("h2", "Failed runs"), ("ul", failed)]


def render_report_markdown(blocks: list[Block], folder: Path) -> str:
    """The blocks as Markdown; images are linked relative to `folder` (where report.md is written)."""

    def esc(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + rest[0])
        elif kind == "p":
            out.append(rest[0])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in rest[0]))
        elif kind == "table":
            header, rows = rest
            lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + " --- |" * len(header)]
            lines += ["| " + " | ".join(map(esc, row)) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{rest[1]}]({rest[0].relative_to(folder).as_posix()})")
    return "\n\n".join(out) + "\n"


HTML_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;"
    "text-align:left;vertical-align:top}th{background:#f3f3f3}img{max-width:100%}li{margin:.3em 0}"
)


def render_html(blocks: list[Block], title: str) -> str:
    """One file with every image inside it (base64 PNG): it opens anywhere, as an MLflow artifact too."""
    e = html.escape
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{e(rest[0])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{e(rest[0])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in rest[0]) + "</ul>")
        elif kind == "table":
            header, rows = rest
            head = "".join(f"<th>{e(h)}</th>" for h in header)
            body = "".join("<tr>" + "".join(f"<td>{e(v)}</td>" for v in row) + "</tr>" for row in rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(rest[0].read_bytes()).decode()
            out.append(f'<figure><img alt="{e(rest[1])}" src="data:image/png;base64,{data}"></figure>')
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
        f"<style>{HTML_STYLE}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n"
    )


def write_csv(report: Report, path: Path) -> None:
    """configurations.csv: every configuration's n, mean, std, low, high of every metric, for other tools."""
    with io.StringIO(newline="") as f:
        writer = csv.writer(f)
        metrics = list(METRICS)
        writer.writerow(
            ["configuration", "config_hash", "seeds"]
            + [f"{m}:{k}" for m in metrics for k in ("n", "mean", "std", "low", "high")]
        )
        for c in report.configurations:
            row = [c.label, c.key, " ".join(map(str, c.seeds))]
            for m in metrics:
                st = c.stats.get(m)
                row += ["", "", "", "", ""] if st is None else [st.n, st.mean, st.std, st.low, st.high]
            writer.writerow(["" if v is None else v for v in row])
        write_file(path, f.getvalue().encode())


def write_report(report: Report, folder: Path) -> dict[str, Path]:
    """report.md, report.html, configurations.csv and charts/*.png in `folder`.

    Args:
        report: the built report (build_report).
        folder: where to write; created if missing.

    Returns:
        The paths written: "markdown", "html", "csv", then one per chart by its name.
    """
    _claim_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    charts = draw_charts(report, folder / "charts")
    blocks = _document(report, charts)
    title = f"LoRA efficiency report: {report.scope.experiment}"
    paths = {"markdown": folder / "report.md", "html": folder / "report.html", "csv": folder / "configurations.csv"}
    write_file(paths["markdown"], render_report_markdown(blocks, folder).encode())
    write_file(paths["html"], render_html(blocks, title).encode())
    write_csv(report, paths["csv"])
    written = {**paths, **charts}
    write_file(folder / WRITTEN, json.dumps(sorted(str(p.relative_to(folder)) for p in written.values())).encode())
    return written


WRITTEN = ".report-files"  # the files a report wrote into its folder (relative paths), for the next report there


def _files_in(folder: Path) -> set[str]:
    """Relative paths of everything under `folder` but folders themselves; a link counts as a file, never followed."""
    found = set()
    for root, dirs, files in os.walk(folder):
        for name in [*files, *(d for d in dirs if Path(root, d).is_symlink())]:
            found.add(str((Path(root) / name).relative_to(folder)))
    return found


def _claim_folder(folder: Path) -> None:
    """A report writes into a new or empty folder, or one that holds only what an earlier report wrote there (its
    WRITTEN list; those files are removed first, so no stale chart stays). Anything else is refused: the folder
    is logged file by file, but a report must not overwrite what it did not make either."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise UserError(f"output={str(folder)!r} is not a folder: choose a new or empty folder")
    earlier = _earlier_files(folder)
    present = _files_in(folder) - {WRITTEN}
    if others := sorted(present - earlier):
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise UserError(
            f"output={str(folder)!r} holds {len(others)} file(s) no report wrote ({shown}): "
            "choose a new or empty folder"
        )
    for name in present & earlier:
        (folder / name).unlink()


def _earlier_files(folder: Path) -> set[str]:
    """The WRITTEN list of an earlier report in `folder`. It is read without following a link, and a WRITTEN that
    is a link (a symlink, or a hard link: a name of a file elsewhere too) is refused: a report would trust a list it
    did not write, and writing the new list must not reach that other file."""
    try:
        fd = os.open(folder / WRITTEN, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return set()
    except OSError as exc:  # ELOOP: a symlink
        raise UserError(
            f"output={str(folder)!r}: {WRITTEN} is a link or unreadable ({exc.strerror}): no report "
            "wrote it; choose a new or empty folder"
        ) from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
            raise UserError(
                f"output={str(folder)!r}: {WRITTEN} is not a plain file of its own ({info.st_nlink} links): no "
                "report wrote it; choose a new or empty folder"
            )
        try:
            earlier = json.loads(f.read(1 << 20))  # a list of a few dozen names: 1 MB is far beyond any report's
        except ValueError:
            return set()
    return {n for n in earlier if isinstance(n, str)} if isinstance(earlier, list) else set()
