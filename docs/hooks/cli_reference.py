"""MkDocs hook: fills the command-line reference page from featstore's own parsers."""

from featstore.cli.reference import markdown

MARKER = "<!-- featstore-cli-reference -->"


def on_page_markdown(text, page, config, files):  # noqa: ARG001 (MkDocs' hook signature)
    return text.replace(MARKER, markdown()) if MARKER in text else text
