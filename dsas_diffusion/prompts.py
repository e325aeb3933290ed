"""Reading prompt (or text) lists: one per line, blank lines and ``#`` comments skipped.

Used by the command line, evaluation configs, the app's pasted lists and the Shapes
concept sets. Errors are :class:`PromptFileError`, which names the file and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputSetError, PromptFileError

__all__ = ["PromptFileError", "check_prompt_list", "prompt_lines", "read_prompts"]


def prompt_lines(text: str) -> list[str]:
    r"""The prompts of a text, one per line; blank lines and ``#`` comment lines are skipped.

    Examples:
        >>> prompt_lines("# bananas\n a yellow banana on a white background \n\n")
        ['a yellow banana on a white background']
    """
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    r"""The prompts of a text file, one per line.

    Raises :class:`PromptFileError` when the file is missing, is not UTF-8 text, or holds
    no prompt.

    Examples:
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
    if "\x00" in text:
        raise PromptFileError(
            f"prompt file {str(file)!r} is binary, not text; give a text file with one prompt per line"
        )
    prompts = prompt_lines(text)
    if not prompts:
        raise PromptFileError(f"prompt file {str(file)!r} has no prompts; write one prompt per line")
    return prompts


def check_prompt_list(prompts: object, name: str) -> list[str]:
    """``prompts`` as a list of non-empty strings, or :class:`InputSetError` naming ``name``
    and the fix (a bare string is refused: it would be read as a list of characters).

    Examples:
        >>> check_prompt_list("a red star on a white background", "source_prompts")
        Traceback (most recent call last):
        ...
        dsas_diffusion.errors.InputSetError: source_prompts is a single string; pass a list of prompts, e.g. ['a red star on a white background']
    """
    if isinstance(prompts, str):
        raise InputSetError(f"{name} is a single string; pass a list of prompts, e.g. [{prompts!r}]")
    if not isinstance(prompts, (list, tuple)):
        raise InputSetError(f"{name} must be a list of prompts, got {type(prompts).__name__}")
    if not prompts:
        raise InputSetError(f"{name} is empty; give at least one prompt")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputSetError(f"{name}[{index}] is {prompt!r}; every prompt must be a non-empty string")
    return list(prompts)
