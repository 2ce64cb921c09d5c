"""Self-contained HTML pages. Every string from data goes through :func:`esc`."""
from __future__ import annotations

import html
from pathlib import Path

from ..fileio import atomic_write_text

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 4px 8px; }
th { background: #f3f3f3; } img { image-rendering: pixelated; display: block; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; } .card { border: 1px solid #ddd; padding: 6px; }
.ok { color: #170; } .bad { color: #b00; } figure { margin: 0; } figcaption { font-size: 12px; }
"""


def esc(value) -> str:
    """HTML-escape any value (class names, file names, numbers) for text and attributes."""
    return html.escape(str(value), quote=True)


def img_tag(src: str, alt: str = "", width: int | None = None) -> str:
    w = f' width="{int(width)}"' if width else ""
    return f'<img src="{esc(src)}" alt="{esc(alt)}"{w}>'


def write_page(path: str | Path, title: str, body: str) -> None:
    """Write a complete page; images must be given as paths relative to ``path``'s folder."""
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{STYLE}</style></head>\n"
            f"<body><h1>{esc(title)}</h1>\n{body}\n</body></html>\n")
    atomic_write_text(path, page)


def append_to_page(path: str | Path, body: str) -> None:
    """Add ``body`` (HTML) at the end of the page :func:`write_page` wrote at ``path``."""
    page = Path(path).read_text()
    end = page.rfind("</body>")
    if end < 0:
        raise ValueError(f"{path} is not a page write_page wrote (no </body>)")
    atomic_write_text(path, page[:end] + body + "\n" + page[end:])


def table(header: list[str], rows: list[list[str]]) -> str:
    """A table; ``header`` is escaped here, ``rows`` cells must already be HTML."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def metrics_table(metrics: dict, title: str = "Test metrics") -> str:
    """The metrics as a table; an explanation metric ``X`` with a ``X_chance`` companion shows it
    in the *chance level* column (what a uniform map scores), never on its own."""
    def fmt(value) -> str:
        return esc(f"{value:.4f}" if isinstance(value, float) else value)

    rows = [[esc(k), fmt(v), fmt(metrics[k + "_chance"]) if k + "_chance" in metrics else ""]
            for k, v in metrics.items() if not isinstance(v, (dict, list))  # tables of their own
            and (not k.endswith("_chance") or k[:-7] not in metrics)]
    return (f"<h2>{esc(title)}</h2>" + table(["metric", "value", "chance level"], rows)
            + "<p>Chance level: the score of a map that carries no information (a uniform map, "
              "or a whole-image box).</p>")
