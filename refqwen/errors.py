"""The errors refqwen raises for bad input: each names the file, tensor or argument at fault."""


class RefqwenError(ValueError):
    """Base class: something the user gave refqwen is not what it expected."""


class ConfigError(RefqwenError):
    """A config.json or GGUF header that does not describe a model refqwen can run."""


class WeightsError(RefqwenError):
    """A checkpoint whose tensors are missing, unexpected, misshapen or unreadable."""


class DemoModelError(RefqwenError):
    """The embedded demo model cannot be found or assembled."""
