"""mkdocs hooks: keep the site self-contained.

The site reads offline and leaves a browser's console clean. Notebooks saved with widget state (05's sliders, 12's
progress bars) make nbconvert add a loader that fetches the Jupyter widget manager from a CDN; without a kernel the
widgets cannot run anyway, so the loader is dropped and each widget shows its stored text form. The notebooks'
formulas are typeset by the MathJax that the jupyter-server-mathjax package ships, copied into the site
(mkdocs.yml's custom_mathjax_url points at it).
"""
import re
import shutil
from pathlib import Path

import jupyter_server_mathjax

WIDGET_LOADER = re.compile(r"<script>\s*\(function\(\) \{\s*function addWidgetsRenderer\(\).*?</script>", re.DOTALL)
MATHJAX_URL = "../assets/mathjax/MathJax.js"
# The package ships MathJax's STIX-Web fonts only (not the TeX fonts MathJax prefers): use them, before it loads.
MATHJAX_FONTS = ('<script>window.MathJax = {"HTML-CSS": {availableFonts: [], preferredFont: null, webFont: "STIX-Web", '
                 'imageFont: null}};</script>')
# MathJax 2 declares a placeholder font at url('about:blank'), which a browser refuses with a console error; a local()
# source that no system has plays the same part without a request.
BLANK_FONT = ("src:\"url('about:blank')\"", "src:\"local('MathJax_Blank')\"")
MATHJAX_CONFIG = "config/TeX-AMS-MML_HTMLorMML-full.js"


def on_post_build(config):
    mathjax = Path(jupyter_server_mathjax.__file__).parent / "static"
    target = Path(config["site_dir"]) / "assets" / "mathjax"
    shutil.copytree(mathjax, target, dirs_exist_ok=True)
    combined = target / MATHJAX_CONFIG
    text = combined.read_text()
    assert BLANK_FONT[0] in text, f"MathJax's placeholder font moved: update BLANK_FONT in {__file__}"
    combined.write_text(text.replace(*BLANK_FONT))


def on_post_page(output: str, page, config) -> str:
    output = WIDGET_LOADER.sub("", output)
    return output.replace(f'<script src="{MATHJAX_URL}', f'{MATHJAX_FONTS}<script src="{MATHJAX_URL}', 1)
