"""`dvc plots show` pages that render offline: a DVC HTML template with Vega inlined.

DVC's default page loads Vega, Vega-Lite and vega-embed from a CDN, so on a machine without
network the page stays blank. This template has no `{scripts}` placeholder (where DVC would put
those CDN `<script>` tags); instead it inlines the three libraries as vl-convert-python ships them
(`vl_convert.javascript_bundle`), and DVC fills in `{plot_divs}`. `.dvc/config` points DVC at it
(`plots.html_template`); `make setup` writes it, since it is generated from an installed package
(about 0.9 MB) and git-ignored:

    python -m transferlab.offline_plots [PATH]      # default: .dvc/offline_plots.html
"""

from __future__ import annotations

import sys
from pathlib import Path

from transferlab import atomic

TEMPLATE_FILE = Path(".dvc") / "offline_plots.html"  # `.dvc/config`: html_template = offline_plots.html
VEGA_LITE_VERSION = "5.21"  # DVC's plot templates are Vega-Lite v5 specs
_PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <script>__BUNDLE__</script>
    <script>
      // DVC's plot divs call vegaEmbed(id, spec): render SVG, without the action menu (its links go online).
      (function () {
        const embed = window.vegaEmbed;
        window.vegaEmbed = (el, spec, opt) => embed(el, spec, Object.assign({renderer: "svg", actions: false}, opt));
      })();
    </script>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def template_html() -> str:
    """The template's text, with Vega, Vega-Lite and vega-embed inlined."""
    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE_VERSION)
    # DVC fills placeholders with str.replace, and "</script" would end the script element early.
    for forbidden in ("{plot_divs}", "{scripts}", "{refresh_tag}", "</script"):
        if forbidden in bundle.lower():
            raise RuntimeError(f"the Vega bundle contains {forbidden!r}: it cannot be inlined in a DVC template")
    return _PAGE.replace("__BUNDLE__", bundle)


def write_template(path: Path) -> Path:
    """Write the template to `path` (atomically)."""
    atomic.write_text(path, template_html())
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = write_template(Path(args[0]) if args else TEMPLATE_FILE)
    print(f"wrote {path}: `dvc plots show` renders without network")
    return 0


if __name__ == "__main__":
    sys.exit(main())
