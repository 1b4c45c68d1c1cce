"""mci_interp: do narrow finetunes converge on one misaligned-persona direction, and is it
fluency (T2) or internalisation (T5)?

The package is layered one way (see README): sites/specs -> direction -> models/datasets ->
activations -> extract -> intervene -> organisms -> evaluate -> analysis -> plot -> report -> cli.
Import submodules directly; this top level stays light so ``import mci_interp`` is cheap.
"""

__version__ = "0.1.0"
