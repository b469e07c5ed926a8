"""Dataset builders.

`data.build_demo` renders the small default demo dataset (FSDKaggle2018 layout)
from the FluidR3 General MIDI soundfont. Nothing is imported here so that
`python -m data.build_demo` runs without a double-import warning.
"""
