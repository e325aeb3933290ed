"""Reading prompt (or text) lists: one per line, blank lines and ``#`` comments skipped.

Used by the command line, evaluation configs, the app's pasted lists and the Shapes
concept sets. Errors are :class:`PromptFileError`, which names the file and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

from .steering.errors import PromptFileError

__all__ = ["PromptFileError", "prompt_lines", "read_prompts"]


def prompt_lines(text: str) -> list[str]:
    r"""The prompts of a text, one per line; blank lines and ``#`` comment lines are skipped.

    Example:
        >>> prompt_lines("# bananas\n a yellow banana on a white background \n\n")
        ['a yellow banana on a white background']
    """
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    r"""The prompts of a text file, one per line.

    Raises :class:`PromptFileError` when the file is missing, is not UTF-8 text, or holds
    no prompt.

    Example:
        >>> import tempfile, pathlib
        >>> file = pathlib.Path(tempfile.mkdtemp()) / "source.txt"
        >>> _ = file.write_text("a yellow banana on a white background\n")
        >>> read_prompts(file)
        ['a yellow banana on a white background']
    """
    file = Path(path)
    if not file.is_file():
        raise PromptFileError(f"prompt file {str(file)!r} does not exist; give a text file with one prompt per line")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PromptFileError(
            f"prompt file {str(file)!r} is not UTF-8 text; give a text file with one prompt per line"
        ) from None
    except OSError as error:
        raise PromptFileError(f"prompt file {str(file)!r} cannot be read ({error.strerror})") from None
    prompts = prompt_lines(text)
    if not prompts:
        raise PromptFileError(f"prompt file {str(file)!r} has no prompts; write one prompt per line")
    return prompts
