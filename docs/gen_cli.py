"""Write docs/cli.md from `semla-lab --help` and every subcommand's --help (run: python docs/gen_cli.py).

tests/test_cli_docs.py fails when the page is stale. The help is rendered at a fixed width so that the page does
not depend on the terminal that regenerates it.
"""
import contextlib
import io
import os
import re
import sys
from pathlib import Path

PAGE = Path(__file__).with_name("cli.md")
WIDTH = "100"

PREFACE = """# Command line

`semla-lab` runs every step of the package from a shell; every subcommand runs on the embedded default unless told
otherwise. Common uses:

```bash
semla-lab world --summary                      # the shipped domains: dataset, scene, factors, class shares
semla-lab world --preview world.png            # sample grid with label overlays
semla-lab evaluate --out runs/eval             # the leave-one-out benchmark (results.json, selections.jsonl)
semla-lab evaluate --targets my_domain.yaml real:acdc_fog --methods zero_shot semla
semla-lab ablate --k 1,3,5,10 --tau 0.05,0.2 --out runs/ablate
semla-lab tune --out runs/tune                 # choose tau and K on selection domains, report on the others
semla-lab transfer --out runs/transfer         # every adapter alone on every target
semla-lab build-library --out runs/library --domains nyu ade   # rerun to resume an interrupted build
semla-lab add-domain --library runs/library --domains my_domain.yaml
semla-lab analyze photos/ --out runs/shift --classes road,car,sky,person   # your own images: report.html
semla-lab segment street.jpg --classes road,car,sky --out overlay.png --explain
semla-lab build all                            # rebuild the shipped artifacts from scratch (make assets)
```

`analyze` reads files, folders and globs of any common format, skips unreadable files (listed with the reason in
the report and the CSV), and reports per image the retrieved domains with distances and weights, the distance to
the nearest centroid and a coverage score against the library's own held-out images; `--labels DIR` adds mIoU per
method. From Python, `semla_lab.analyze(paths, classes=...)` returns the same table as a DataFrame.

The reference below is generated from the command's own help by `python docs/gen_cli.py`.
"""


def help_text(argv: list[str]) -> str:
    from semla_lab.cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(argv)
    return out.getvalue().rstrip()


def subcommands(top_help: str) -> list[str]:
    return re.search(r"\{([a-z0-9,-]+)\}", top_help).group(1).split(",")


def render() -> str:
    os.environ["COLUMNS"] = WIDTH                 # argparse wraps to the terminal's width
    top = help_text(["--help"])
    parts = [PREFACE, "## semla-lab\n", f"```text\n{top}\n```\n"]
    for name in subcommands(top):
        parts += [f"## semla-lab {name}\n", f"```text\n{help_text([name, '--help'])}\n```\n"]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    PAGE.write_text(render())
    print(f"wrote {PAGE}")
