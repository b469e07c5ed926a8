"""The plan as one standard MIDI file: every clip in its own time slot, written with mido."""

from __future__ import annotations

from pathlib import Path

import mido

from data.demo.plan import PlannedClip

MIDI_CHANNELS = 16
XG_DRUM_BANK = 127  # bank select MSB that makes a channel a drum kit in XG mode
TICKS_PER_QUARTER = 1000
TEMPO_US_PER_QUARTER = 1_000_000  # with 1000 ticks per quarter: one tick = 1 ms
TAIL_MS = 500  # a harmless controller message this long after the last slot keeps the render running

# Controller numbers.
BANK_SELECT_MSB, BANK_SELECT_LSB, VOLUME, PAN, EXPRESSION = 0, 32, 7, 10, 11
ALL_SOUND_OFF, RESET_CONTROLLERS = 120, 121


def _tick(seconds: float) -> int:
    return int(round(seconds * 1000))


def _timed_messages(clips: list[PlannedClip]) -> list[tuple[int, mido.Message]]:
    """(tick, message) of every clip, in playing order.

    At equal ticks the order is: reset controllers, bank select, program and levels,
    controller moves, note-offs, note-ons, the slot's mute; ties keep the clip's order.
    """
    events: list[tuple[int, int, mido.Message]] = []  # tick, priority at equal tick, message

    def control(tick: int, priority: int, channel: int, number: int, value: int) -> None:
        events.append((tick, priority, mido.Message("control_change", channel=channel, control=number, value=value)))

    for position, clip in enumerate(clips):
        # Consecutive clips use different channels: "All Sound Off" only releases voices
        # (slowly, for some presets), so a clip is silenced by zeroing its channel's volume,
        # and that channel is reused only 15 slots later, when every tail has long died.
        start, channel = clip.slot_start_s, position % MIDI_CHANNELS
        begin = _tick(start)
        control(begin, 0, channel, RESET_CONTROLLERS, 0)
        control(begin, 1, channel, BANK_SELECT_MSB, XG_DRUM_BANK if clip.drums else 0)
        control(begin, 1, channel, BANK_SELECT_LSB, 0)
        events.append((begin, 2, mido.Message("program_change", channel=channel, program=clip.program)))
        control(begin, 2, channel, VOLUME, 100)
        control(begin, 2, channel, EXPRESSION, 127)
        control(begin, 2, channel, PAN, clip.pan)
        for offset, number, value in clip.controls:
            control(_tick(start + offset), 3, channel, number, value)
        for onset, duration, pitch, velocity in clip.notes:
            note_on = mido.Message("note_on", channel=channel, note=pitch, velocity=velocity)
            note_off = mido.Message("note_off", channel=channel, note=pitch, velocity=64)
            events.append((_tick(start + onset), 5, note_on))
            events.append((_tick(start + onset + duration), 4, note_off))
        end = _tick(start + clip.slot_length_s)
        control(end, 6, channel, VOLUME, 0)  # silence now
        control(end, 6, channel, EXPRESSION, 0)
        control(end, 6, channel, ALL_SOUND_OFF, 0)  # free the voices
    control(max(tick for tick, _, _ in events) + TAIL_MS, 7, 0, RESET_CONTROLLERS, 0)
    events.sort(key=lambda event: (event[0], event[1]))
    return [(tick, message) for tick, _, message in events]


def midi_file(clips: list[PlannedClip]) -> mido.MidiFile:
    """A format-0 MIDI file (1 tick = 1 ms) playing every clip at its slot start."""
    track = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=TEMPO_US_PER_QUARTER, time=0)])
    previous = 0
    for tick, message in _timed_messages(clips):
        message.time = tick - previous  # mido stores delta times
        track.append(message)
        previous = tick
    track.append(mido.MetaMessage("end_of_track", time=0))
    return mido.MidiFile(type=0, ticks_per_beat=TICKS_PER_QUARTER, tracks=[track])


def write_midi(clips: list[PlannedClip], path: Path) -> None:
    """Save `midi_file(clips)`; mido writes running status, which fluidsynth reads like full status bytes."""
    midi_file(clips).save(path)
