"""Dataset builders.

`data.build_demo` renders the small default demo dataset (FSDKaggle2018 layout)
from the FluidR3 General MIDI soundfont; the builder itself is the package
`data.demo`. `data.variants` writes harder variants of an existing dataset, and
`data.common` holds what both share. Nothing is imported here so that
`python -m data.build_demo` runs without a double-import warning.
"""
