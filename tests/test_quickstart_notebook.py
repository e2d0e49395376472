"""notebooks/quickstart.ipynb runs top to bottom headless: its code cells in order in one fresh Python
process started in notebooks/ (as Jupyter starts a kernel), in its tiny mode (FORESTGAPS_QUICKSTART_TINY:
a small synthetic scene, 4 training steps). No Jupyter needed; the file must also be valid nbformat 4."""
import json
import os
import subprocess
import sys

from conftest import REPO

NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def code_cells(notebook: dict) -> list[str]:
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    for cell in cells:
        source = "".join(cell["source"])
        assert not any(line.lstrip().startswith(("!", "%")) for line in source.splitlines()), \
            "keep the cells plain Python (magics need IPython): use subprocess"
    return ["".join(c["source"]) for c in cells]


def test_notebook_is_nbformat_4_with_clean_cells():
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert notebook["nbformat"] == 4 and notebook["metadata"]["kernelspec"]["language"] == "python"
    ids = [c["id"] for c in notebook["cells"]]
    assert len(ids) == len(set(ids))
    for cell in notebook["cells"]:
        assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["source"], list)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None   # committed without outputs
    for source in code_cells(notebook):
        compile(source, str(NOTEBOOK), "exec")


def test_notebook_runs_top_to_bottom(tmp_path):
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    script = tmp_path / "quickstart.py"
    script.write_text("\n\n".join(f"# --- cell {i}\n{src}" for i, src in enumerate(code_cells(notebook))))
    env = {**os.environ, "FORESTGAPS_QUICKSTART_TINY": "1", "FORESTGAPS_QUICKSTART_WORK": str(tmp_path / "work"),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], cwd=REPO / "notebooks", env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    work = tmp_path / "work"
    for path in ("maps/gaps_10m.tif", "maps/quicklook.png", "maps/scores.json", "analysis/size_freq_10m.png",
                 "analysis/analysis_10m.json", "runs/quickstart/best.ckpt", "eval/report.json"):
        assert (work / path).stat().st_size > 0, path
    assert json.loads((work / "analysis" / "analysis_10m.json").read_text())["n_gaps"] >= 0
    assert "installed now: nothing" in done.stdout                       # the test env has the four
