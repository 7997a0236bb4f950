"""Validation of user-chosen names that become object keys and directory names."""

import re

from randes.errors import InvalidNameError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_name(name: str, kind: str = "name") -> str:
    """Return `name` unchanged if it is safe as a single path / key component.

    Allowed: letters, digits, '.', '_', '-', starting with a letter or digit, at most
    128 characters, and never '..' anywhere (so no component can walk upwards).
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise InvalidNameError(
            f"invalid {kind} {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return name
