"""Writes benchmarks/results/INDEX.md: every results file, what made it, where it is read, whether current.

Run from the repository root after adding or retiring results: `python benchmarks/results_index.py`. A retired
file is removed from the tree (git keeps it) and named in `removed` below, with what supersedes it."""

import json
import re
from pathlib import Path

root = Path("benchmarks/results")
docs = {p.name: p.read_text() for p in sorted(Path("docs").glob("*.md"))}
docs["README.md"] = Path("README.md").read_text()
removed = {
    "compress_cost_qwen1.5b": "the cost study `speed_compress_qwen0.5b` (docs/cost.md); its rows name a method that no longer exists (`SelectFit`)",
    "default_smollm2_n512": "`default_v2_smollm2` (the default's study at n = 1024, docs/default-vs-kvpress.md)",
    "long_smollm2": "`long_smollm2_chunked` (the default with the repeat pass and the solve in chunks; the kvpress rows were copied there; the old default's 8k figures are quoted in docs/long-context.md)",
    "refine_lr_smollm2": "`refine_lr_report_smollm2` (the same step study on the 8 report windows)",
    "sculpt_descent_smollm2": "`sculpt_iters_*` (made before Sculpt's optimiser was fixed; docs/sculpt.md)",
}
stems = {}
for p in sorted(root.iterdir()):
    if p.name == "INDEX.md":
        continue
    stem = p.name if p.is_dir() else re.sub(r"\.(jsonl|json|md|png)$", "", p.name)
    stems.setdefault(stem, []).append(p.name + ("/" if p.is_dir() else ""))


def command(stem: str, files: list[str]) -> str:
    for name in files:
        path = root / name
        if name.endswith(".md"):
            m = re.search(r"Command:\s*`([^`]+)`", path.read_text())
            if m:
                return m.group(1)
        if name.endswith(".json"):
            try:
                data = json.loads(path.read_text())
            except ValueError:
                continue
            if isinstance(data, dict) and isinstance(data.get("command"), str):
                return data["command"]
    if stem == "scorers":  # a folder of weights: its commands are in docs/learned.md
        return "kvsculpt train-scorer … --out benchmarks/results/scorers/NAME.safetensors (one per file, docs/learned.md)"
    if (root / stem / "summary.md").exists():
        m = re.search(r"Command:\s*`([^`]+)`", (root / stem / "summary.md").read_text())
        if m:
            return m.group(1)
    for text in docs.values():  # the command a docs page gives for it
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            for cmd in re.split(r"\n(?=python|kvsculpt|\.venv)", block):
                if stem in cmd:
                    return " ".join(cmd.replace("\\\n", " ").split())
    for text in docs.values():  # an inline command naming it
        for cmd in re.findall(r"`((?:python|kvsculpt)[^`]*)`", text.replace("\n", " ")):
            if re.search(rf"(?<![\w.]){re.escape(stem)}(?![\w])", cmd):
                return " ".join(cmd.split())
    if stem.endswith(".setting"):
        return "the run of its family"
    known = {
        "speed_decode": "python benchmarks/speed.py decode",
        "quant_qwen0.5b_r09": "python benchmarks/quant.py --model qwen2.5-coder-0.5b --report-only --rows "
        "benchmarks/results/quant_qwen0.5b.jsonl --out benchmarks/results/quant_qwen0.5b_r09 (after the run "
        "docs/quantisation.md gives)",
    }
    if stem in known:
        return known[stem]
    return ""


lines = [
    "# Results files",
    "",
    "Every file in this folder: what made it (the command recorded in its report, or given where it is",
    "read), the page that reads it, and whether it is current. A `.jsonl` holds the rows (resumable: a rerun of",
    "the command skips what is there), `.json` the summary, `.md` the report, `.png` its plot; `.setting.json`",
    "records the settings a resumed run must share. Made with transformers 5.2.0 unless said; spot-checks on",
    "transformers 5.19 reproduced them (docs/layout.md, and this session's closing note).",
    "",
    "## Current",
    "",
    "| results | files | read in | made by |",
    "|---|---|---|---|",
]
for stem, files in stems.items():
    family = re.sub(r"\.setting$", "", stem)
    where = sorted(name for name, text in docs.items() if family in text)
    cmd = command(stem, files)
    exts = ", ".join(sorted(f.removeprefix(stem) or f for f in files))
    lines.append(
        f"| `{stem}` | {exts} | {', '.join(where) or '– (settings of its family)' if stem.endswith('.setting') else ', '.join(where) or '–'} | "
        + (f"`{cmd}`" if cmd and cmd != "the run of its family" else cmd or "–")
        + " |"
    )
lines += [
    "",
    "## Superseded (removed from the tree; `git log -- benchmarks/results/NAME.*` finds them)",
    "",
    "| results | superseded by |",
    "|---|---|",
]
lines += [f"| `{s}` | {why} |" for s, why in removed.items()]
(root / "INDEX.md").write_text("\n".join(lines) + "\n")
print(len(stems), "stems")
