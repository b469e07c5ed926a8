"""Rendering: finding fluidsynth and a General MIDI soundfont, and the one offline render."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SAMPLE_RATE = 22050
RENDER_GAIN = 0.5  # float output cannot clip, so this only sets the working level
INSTALL_HINT = "apt-get install fluidsynth fluid-soundfont-gm"
SOUNDFONT_CANDIDATES = (
    Path("/usr/share/sounds/sf2/FluidR3_GM.sf2"),
    Path("/usr/share/soundfonts/FluidR3_GM.sf2"),
    Path("/usr/share/sounds/sf2/default-GM.sf2"),
    Path("/usr/share/soundfonts/default-GM.sf2"),
    Path("/usr/share/soundfonts/default.sf2"),
)


def find_fluidsynth() -> str:
    """Path of the fluidsynth program, or a RuntimeError saying what to install."""
    path = shutil.which("fluidsynth")
    if path is None:
        raise RuntimeError(
            "The demo dataset is rendered with the 'fluidsynth' program, which is not on PATH. "
            f"Install it with: {INSTALL_HINT}"
        )
    return path


def find_soundfont(soundfont: str | os.PathLike | None = None) -> Path:
    """The soundfont to render with: the given path, else the first standard location that exists."""
    if soundfont is not None:
        path = Path(soundfont)
        if not path.is_file():
            raise RuntimeError(
                f"Soundfont {path} does not exist. For the default FluidR3 GM soundfont run: {INSTALL_HINT}"
            )
        return path
    for candidate in SOUNDFONT_CANDIDATES:
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(path) for path in SOUNDFONT_CANDIDATES)
    raise RuntimeError(
        f"No General MIDI soundfont found (searched {searched}). "
        f"Install one with: {INSTALL_HINT} (or pass --soundfont PATH)"
    )


def fluidsynth_version(fluidsynth: str) -> str:
    """First line of `fluidsynth --version`, recorded so a build can be traced."""
    result = subprocess.run([fluidsynth, "--version"], capture_output=True, text=True, timeout=60)
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def render(fluidsynth: str, soundfont: Path, midi_path: Path, wav_path: Path) -> None:
    """Render the MIDI file to a float WAV at SAMPLE_RATE.

    Reverb and chorus are off so slots stay independent. XG bank selection lets any
    channel play a drum kit (bank MSB 127), which the channel rotation needs.
    """
    command = [
        fluidsynth, "-ni", "-q", "-R", "0", "-C", "0", "-o", "synth.midi-bank-select=xg",
        "-g", str(RENDER_GAIN), "-r", str(SAMPLE_RATE),
        "-O", "float", "-T", "wav", "-F", str(wav_path), str(soundfont), str(midi_path),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0 or not wav_path.is_file():
        raise RuntimeError(
            f"fluidsynth failed (exit {result.returncode}) rendering {midi_path}: "
            f"{(result.stderr or result.stdout).strip()[-2000:]}"
        )
