"""mkdocs hooks: keep the site self-contained, and list the optional CAT-Seg page where the checkout has it.

Notebooks saved with widget state (05's sliders, 12's progress bars) make nbconvert add a loader that fetches the
Jupyter widget manager from a CDN. Without a kernel the widgets cannot run anyway, so the loader is dropped and each
widget shows its stored text form: the site reads offline and leaves a browser's console clean.
"""
import re
from pathlib import Path

WIDGET_LOADER = re.compile(r"<script>\s*\(function\(\) \{\s*function addWidgetsRenderer\(\).*?</script>", re.DOTALL)
OPTIONAL_PAGES = {"real-data-catseg.md": ("Using it", "CAT-Seg on real data")}


def on_config(config):
    for page, (section, title) in OPTIONAL_PAGES.items():
        listed = any(page in str(entry) for entry in config["nav"])
        if (Path(config["docs_dir"]) / page).is_file() and not listed:
            for entry in config["nav"]:
                if section in entry:
                    entry[section].append({title: page})
    return config


def on_post_page(output: str, page, config) -> str:
    return WIDGET_LOADER.sub("", output)
