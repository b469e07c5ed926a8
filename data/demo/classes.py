"""The class plan: each FSDKaggle2018 label and how a General MIDI synth plays it."""

from __future__ import annotations

import dataclasses

# Standard, Room, Power, Electronic, TR-808, Jazz, Brush. Not the Orchestra kit (48):
# it maps the hi-hat notes to timpani.
DRUM_KITS = (0, 8, 16, 24, 25, 32, 40)


@dataclasses.dataclass(frozen=True)
class SoundClass:
    """How one FSDKaggle2018 label is played on a General MIDI synth.

    `voices` are (0-based MIDI program = GM number minus one, lowest, highest MIDI note):
    a realistic range that FluidR3 also covers with samples (it has holes, e.g. the
    baritone sax is silent above note 72 and the violin at note 94).
    `style` picks the event generator: melodic, drum, crowd, burst or ring.
    """

    label: str
    style: str
    voices: tuple[tuple[int, int, int], ...] = ()
    max_chord_notes: int = 1
    drum_notes: tuple[int, ...] = ()
    source: str = ""


CLASSES = (
    SoundClass("Acoustic_guitar", "melodic", ((24, 40, 76), (25, 40, 76)), 4, source="GM 25 nylon / 26 steel guitar"),
    SoundClass("Applause", "crowd", ((126, 57, 67),), source="GM 127 Applause"),
    SoundClass("Bass_drum", "drum", drum_notes=(35, 36), source="drum notes 35/36"),
    SoundClass("Cello", "melodic", ((42, 36, 72),), 2, source="GM 43 Cello"),
    SoundClass("Clarinet", "melodic", ((71, 50, 84),), source="GM 72 Clarinet"),
    SoundClass("Cowbell", "drum", drum_notes=(56,), source="drum note 56"),
    SoundClass("Double_bass", "melodic", ((43, 28, 55), (32, 28, 55)), 2, source="GM 44 Contrabass / 33 Acoustic Bass"),
    SoundClass("Flute", "melodic", ((73, 60, 93),), source="GM 74 Flute"),
    SoundClass("Glockenspiel", "melodic", ((9, 79, 108),), 3, source="GM 10 Glockenspiel"),
    SoundClass("Gunshot_or_gunfire", "burst", ((127, 48, 72),), source="GM 128 Gunshot"),
    SoundClass("Hi-hat", "drum", drum_notes=(42, 42, 44, 46), source="drum notes 42/44/46"),
    SoundClass("Oboe", "melodic", ((68, 58, 89),), source="GM 69 Oboe"),
    SoundClass(
        "Saxophone", "melodic", ((64, 56, 87), (65, 49, 81), (66, 44, 76), (67, 36, 69)),
        source="GM 65-68 soprano/alto/tenor/baritone sax",
    ),
    SoundClass("Snare_drum", "drum", drum_notes=(38, 40), source="drum notes 38/40"),
    SoundClass("Tambourine", "drum", drum_notes=(54,), source="drum note 54"),
    SoundClass("Telephone", "ring", ((124, 60, 72),), source="GM 125 Telephone Ring"),
    SoundClass("Trumpet", "melodic", ((56, 54, 82),), source="GM 57 Trumpet"),
    SoundClass("Violin_or_fiddle", "melodic", ((40, 55, 93), (110, 55, 93)), 2, source="GM 41 Violin / 111 Fiddle"),
)

LABELS = tuple(spec.label for spec in CLASSES)
