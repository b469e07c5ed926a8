"""The demo dataset builder, one concern per module (entry point: ``python -m data.build_demo``).

Why this design: the pipeline needs real sampled instrument and effect sounds
with the quirks of FSDKaggle2018 (noisy unverified labels, odd files), yet the
whole pipeline must run on it in minutes on 2 CPU cores. Every clip is one
"event" (a note, a melody, a chord, a drum hit or pattern) placed in its own
time slot of ONE standard MIDI file. fluidsynth renders that file once (loading
the 150 MB soundfont is the expensive part), and the long render is cut at the
known slot boundaries. At the end of its slot a clip's MIDI channel is muted
(volume 0) and consecutive clips use different channels, so no release tail
leaks into the next clip (MIDI "All Sound Off" alone does not do it: fluidsynth
only releases the voices, and some ring on for seconds).

Modules, in the order a build uses them:

- ``classes``: the class plan, each label and the General MIDI voices or drum keys that play it.
- ``events``: one random event (notes and controller moves) per clip, by class style.
- ``plan``: every random draw of a build (names, events, splits, label noise, hard cases, slots).
- ``midi``: the plan as one standard MIDI file (written with mido).
- ``render``: finding fluidsynth and the soundfont, and the one offline render.
- ``cut``: the render cut into slots, trimmed, levelled and given light noise.
- ``hard_cases``: the planted odd files (short, stereo, other rates and formats, corrupt).
- ``layout``: the FSDKaggle2018 CSVs and the README written next to the audio.
- ``build``: one build into a temporary folder, the cache marker, locking and the swap into place.

Nothing is imported here, so ``python -m data.build_demo`` loads only what it uses.
"""
