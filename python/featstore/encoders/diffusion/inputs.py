"""Where a source's other inputs are: captions (a ``.txt`` beside the image, or a ``.jsonl`` field)
and control images (a parallel directory)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from featstore import _core
from featstore.bulk import collector_paused
from featstore.errors import FeatstoreError
from featstore.inputs import AbsentInput, InputValue, JsonlLine
from featstore.regular import read_text
from featstore.scan import DEFAULT_EXTENSIONS, scan


class JsonlField(Mapping[str, str]):
    """A field of ``.jsonl`` lines, by the image each line lists: captions or control images
    kept next to the image paths that ``featstore scan --jsonl FIELD`` reads.

    Every ``.jsonl`` file under ``root`` is read once, when this is made; each line names its
    image(s) in ``image_field`` (a path, or a list of paths, relative to the jsonl's folder or to
    the root, as the scan resolves them) and holds ``field`` (a string). Keys are absolute,
    normalized image paths.

    Parameters
    ----------
    root : path
        The data root.
    field : str
        The field to look up, e.g. ``"prompt"`` or ``"control"``.
    image_field : str
        The field naming the image (the ``jsonl=`` of the scan).

    Examples
    --------
    >>> captions = JsonlField(root, "prompt", image_field="image")
    >>> TextEncoder(model, tokenizer, max_length=77, captions=captions)
    >>> VAEEncoder(vae_dir, name="control_latent", control_fn=JsonlField(root, "control").path_of)
    """

    def __init__(self, root: str | os.PathLike[str], field: str, *, image_field: str = "image") -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.field, self.image_field = field, image_field
        # image -> (value, its .jsonl, the candidate the listed path would rather name: must stay
        # absent, the path as the line spells it)
        self._values: dict[str, tuple[str, str, str | None, str]] = {}
        self.errors: list[tuple[str, str]] = []
        with collector_paused():  # a tuple per line and no cycles: see featstore.bulk
            for rel in scan(self.root, extensions=["jsonl"]).paths:
                self._read(os.path.join(self.root, rel))

    def _read(self, jsonl: str) -> None:
        """Every line of one listing, parsed and its paths resolved in Rust: the lines the
        lookups' per-line check reads (``rust/core/src/jsonl.rs``), the paths as the scan and
        :meth:`_resolve` find them."""
        try:
            listed, skipped = _core.jsonl_field(self.root, jsonl, self.image_field, self.field)
        except (OSError, FeatstoreError) as exc:
            self.errors.append((jsonl, f"cannot read it as UTF-8 text: {exc}"))
            return
        self.errors.extend((f"{jsonl}:{number}", why) for number, why in skipped)
        values = self._values
        for image, value, resolved, passed_over in listed:
            values[resolved] = (value, jsonl, passed_over, image)

    def _resolve(self, base: str, listed: str) -> tuple[str, str | None]:
        """Where a listed path leads, as the scan resolves it: relative to the jsonl's folder
        first, then to the root; and, when it led to the root, the folder's candidate it passed
        over (an entry from this resolution must stop being served when that file appears)."""
        if os.path.isabs(listed):
            return os.path.normpath(listed), None
        first = os.path.normpath(os.path.join(base, listed))
        if os.path.isfile(first):
            return first, None
        second = os.path.normpath(os.path.join(self.root, listed))
        return (second, first) if os.path.isfile(second) and second != first else (first, None)

    def _key(self, path: str | os.PathLike[str]) -> str:
        p = os.fspath(path)
        # An absolute, normal path (as the planner passes them) is its own key; others are
        # normalized (abspath costs microseconds, times a million lookups).
        if type(p) is str and p.startswith("/") and "/." not in p and "//" not in p and not p.endswith("/"):
            return p
        return os.path.abspath(p)

    def __getitem__(self, path: str | os.PathLike[str]) -> str:  # type: ignore[override]
        try:
            return self._values[self._key(path)][0]
        except KeyError:
            skipped = (f"; {len(self.errors)} .jsonl lines or files were skipped, e.g. {self.errors[0][0]}: "
                       f"{self.errors[0][1]}") if self.errors else ""
            raise KeyError(f"no .jsonl line under {self.root} lists {os.fspath(path)} in {self.image_field!r} "
                           f"with a {self.field!r}{skipped}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"JsonlField({self.root!r}, {self.field!r}, image_field={self.image_field!r})"

    def jsonl_of(self, path: str | os.PathLike[str]) -> str:
        """The ``.jsonl`` file whose line lists ``path``."""
        self[path]  # noqa: B018 (the KeyError with its message)
        return self._values[self._key(path)][1]

    def jsonl_input(self, path: str | os.PathLike[str]) -> JsonlLine:
        """The line that lists ``path``, as an input: an edit of another line of its ``.jsonl``
        leaves the entry valid, an edit of this one makes it stale (see :class:`JsonlLine`)."""
        self[path]  # noqa: B018 (the KeyError with its message)
        value, jsonl, _, listed = self._values[self._key(path)]
        return JsonlLine(jsonl, self.image_field, self.field, listed, value.encode("utf-8"))

    def listing_inputs(self, path: str | os.PathLike[str], name: str, jsonl_name: str | None = None
                       ) -> dict[str, InputValue]:
        """The inputs of ``path``'s line: its text (``name``), its ``.jsonl`` (shared, see
        :meth:`jsonl_input`), and the file its listed image path passed over (see ``_resolve``)
        as one that must stay absent: when it appears, the line names it instead."""
        key = self._key(path)
        if key not in self._values:
            self[path]  # noqa: B018 (the KeyError with its message)
        value, jsonl, passed_over, listed = self._values[key]
        text = value.encode("utf-8")
        found: dict[str, InputValue] = {name: text, jsonl_name or f"{name}_jsonl": JsonlLine(
            jsonl, self.image_field, self.field, listed, text)}
        if passed_over is not None:
            found[f"{name}_listed_preferred"] = AbsentInput(passed_over)
        return found

    def path_of(self, path: str | os.PathLike[str]) -> str:
        """The field's value as a path (relative to its jsonl's folder, else the root): a
        ``control_fn`` for :class:`VAEEncoder`."""
        return self._resolve(os.path.dirname(self.jsonl_of(path)), self[path])[0]

    def path_inputs(self, path: str | os.PathLike[str], name: str) -> dict[str, InputValue]:
        """What :meth:`path_of` read for ``path``, as inputs: the line (as in
        :meth:`listing_inputs`), the file its value names (``name``), and the file that value
        passed over, which must stay absent."""
        found = self.listing_inputs(path, f"{name}_line")
        chosen, passed_over = self._resolve(os.path.dirname(self.jsonl_of(path)), self[path])
        found[name] = chosen
        if passed_over is not None:
            found[f"{name}_preferred"] = AbsentInput(passed_over)
        return found


class ControlDir:
    """A ``control_fn``: the control image of ``<images_root>/a/b.jpg`` is
    ``<control_root>/a/b.jpg``, or a file of the same stem with another image extension
    (``b.png``).

    Keep ``control_root`` outside the scanned data root (or scan with ``files_from``/``jsonl``):
    otherwise the control images are sources too.
    """

    def __init__(self, images_root: str | os.PathLike[str], control_root: str | os.PathLike[str]) -> None:
        self.images_root = os.path.abspath(os.fspath(images_root))
        self.control_root = os.path.abspath(os.fspath(control_root))

    def __call__(self, path: str | os.PathLike[str]) -> str:
        return self._choose(path)[0]

    def path_inputs(self, path: str | os.PathLike[str], name: str) -> dict[str, InputValue]:
        """The control image (``name``) and every candidate the rule prefers to it, as files that
        must stay absent: when ``control/a.jpg`` appears beside the ``control/a.png`` chosen for
        ``a.jpg``, the rule picks it, and the entry stops being served."""
        chosen, passed_over = self._choose(path)
        found: dict[str, InputValue] = {name: chosen}
        for i, candidate in enumerate(passed_over):
            found[f"{name}_preferred_{i}"] = AbsentInput(candidate)
        return found

    def _candidates(self, path: str | os.PathLike[str]) -> list[str]:
        """The files the rule looks at for ``path``, preferred first."""
        rel = os.path.relpath(os.path.abspath(os.fspath(path)), self.images_root)
        if rel.startswith(".."):
            raise ValueError(f"{os.fspath(path)} is not under the images root {self.images_root}")
        exact = os.path.join(self.control_root, rel)
        stem = os.path.splitext(exact)[0]
        found = [exact]
        for ext in DEFAULT_EXTENSIONS:
            for candidate in (f"{stem}.{ext}", f"{stem}.{ext.upper()}"):
                if candidate not in found:
                    found.append(candidate)
        return found

    def _choose(self, path: str | os.PathLike[str]) -> tuple[str, list[str]]:
        """The control image of ``path`` and the preferred candidates that are not files."""
        candidates = self._candidates(path)
        for i, candidate in enumerate(candidates):
            if os.path.isfile(candidate):
                return candidate, candidates[:i]
        raise FileNotFoundError(f"no control image for {os.fspath(path)}: expected {candidates[0]} "
                                f"(or {os.path.splitext(candidates[0])[0]}.<png|jpg|...>)")

    def __repr__(self) -> str:
        return f"ControlDir({self.images_root!r}, {self.control_root!r})"


def caption_inputs(path: str | os.PathLike[str]) -> dict[str, InputValue]:
    """The caption file the rule chooses now, and (when it chose ``<name>.txt``) the preferred
    ``<stem>.txt`` as a file that must stay absent: if it appears, the rule picks it and the
    entry is stale."""
    chosen = caption_path(path)
    preferred = f"{os.path.splitext(os.fspath(path))[0]}.txt"
    found: dict[str, InputValue] = {"caption": chosen}
    if chosen != preferred:
        found["caption_preferred"] = AbsentInput(preferred)
    return found


def rule_inputs(rule: Callable[[str], Any], path: str | os.PathLike[str], name: str) -> dict[str, InputValue]:
    """The inputs of the file a rule (a ``control_fn``) picks for ``path``: the file as ``name``,
    and, for the built-in rules (:class:`ControlDir`, :meth:`JsonlField.path_of`), the
    candidates the rule prefers to it, which must stay absent, and the listing line it read. A
    plain callable records only the file it returned."""
    owner = getattr(rule, "__self__", None)
    if isinstance(owner, JsonlField) and getattr(rule, "__func__", None) is JsonlField.path_of:
        return owner.path_inputs(path, name)
    if isinstance(rule, ControlDir):
        return rule.path_inputs(path, name)
    return {name: os.fspath(rule(os.fspath(path)))}


def read_caption(captions: str | Mapping[str, str], path: str | os.PathLike[str]) -> str:
    """The caption of the image at ``path``, surrounding whitespace stripped: from its ``.txt``
    (``captions="txt"``, see :func:`caption_path`) or from a mapping by absolute path (a
    :class:`JsonlField`). A caption file that is not a regular file is refused at once."""
    if isinstance(captions, str):
        return read_text(caption_path(path), "caption").strip()
    return str(captions[os.path.normpath(os.path.abspath(os.fspath(path)))]).strip()


def caption_path(path: str | os.PathLike[str]) -> str:
    """The caption file of an image: ``<stem>.txt`` beside it (``img_0001.txt``, the common
    convention), else ``<name>.txt`` (``img_0001.jpg.txt``).

    Raises
    ------
    FileNotFoundError
        Neither exists (the message names both).
    """
    p = os.fspath(path)
    stem, name = f"{os.path.splitext(p)[0]}.txt", f"{p}.txt"
    for candidate in (stem, name):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"no caption for {p}: expected {stem} (or {name})")
