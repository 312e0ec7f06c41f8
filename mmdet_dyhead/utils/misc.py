"""Small helpers shared by the models, ops, deploy and visualisation code."""

from typing import Any, Iterable


def check_choice(
    name: str, value: Any, choices: Iterable, hint: str = ''
) -> None:
    """Raise if ``value`` is not one of ``choices``, naming the valid ones.

    Every "unknown setting" error of the package comes from here, so they
    all read ``name='value' does not exist; choose one of (...).``

    Args:
        name (str): The setting, as the user wrote it (``'dcn_backend'``).
        value (Any): What was given.
        choices (Iterable): The accepted values.
        hint (str): Appended after the list, e.g. what each choice means.

    Raises:
        ValueError: ``value`` is not in ``choices``.
    """
    choices = tuple(choices)
    if value in choices:
        return
    message = f'{name}={value!r} does not exist; choose one of {choices}'
    raise ValueError(f'{message} {hint}.' if hint else f'{message}.')
