"""What a name may look like: the patterns the API's schemas declare and the services check,
written once. Each comes as the pattern string (for pydantic's `pattern=`) and compiled."""

from __future__ import annotations

import re

# forests and domains: 2-64 lowercase letters, digits, '_' or '-', starting with a letter or digit
SLUG_PATTERN = r"^[a-z0-9][a-z0-9_-]{1,63}$"
# an ELM (a contribution's name): 1-64 lowercase letters, digits, '.', '_' or '-'
ELM_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
# accounts: 2-64 letters, digits, '.', '_' or '-', starting with a letter or digit
USERNAME_PATTERN = r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{1,63}$"

SLUG = re.compile(SLUG_PATTERN)
ELM = re.compile(ELM_PATTERN)
USERNAME = re.compile(USERNAME_PATTERN)
