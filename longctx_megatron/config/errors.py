"""The one exception type for invalid configuration."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and how to fix it."""
