"""mkdocs hook: keep the site self-contained (it must read offline and leave a browser's console clean).

Notebooks saved with widget state (05's sliders, 12's progress bars) make nbconvert add a loader that fetches the
Jupyter widget manager from a CDN. Without a kernel the widgets cannot run anyway, so the loader is dropped and each
widget shows its stored text form.
"""
import re

WIDGET_LOADER = re.compile(r"<script>\s*\(function\(\) \{\s*function addWidgetsRenderer\(\).*?</script>", re.DOTALL)


def on_post_page(output: str, page, config) -> str:
    return WIDGET_LOADER.sub("", output)
