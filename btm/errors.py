"""Errors a user can act on. Each message names the file or thing and says what to do."""


class BTMError(Exception):
    """Base for every error the btm library raises on bad input."""


class DataError(BTMError):
    """A corpus, split file or token cache is missing, empty or corrupt."""


class WeightsError(BTMError):
    """A weights file is not a well-formed safetensors file of the expected layout."""


class FamilyError(BTMError):
    """Models or tokenizers that should share one family (architecture + tokenizer) do not."""


class ForestError(BTMError):
    """A forest directory or manifest is missing, malformed, or asked to do something it can't."""
