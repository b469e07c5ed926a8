"""The demo builder's MIDI file (`data.demo.midi`, written with mido) parses back to the planned clips."""

from __future__ import annotations

import io

import mido

from data.demo import midi
from data.demo.plan import PlannedClip, make_plan


def _clip(fname: str, start: float, notes, *, drums: bool = False, program: int = 0, controls=(), pan: int = 64):
    return PlannedClip(
        fname=fname, label="x", split="train", kind="test", drums=drums, program=program, notes=list(notes),
        controls=list(controls), slot_length_s=2.0, peak_dbfs=-6.0, snr_db=30.0, noise_color=0.0, noise_seed=0,
        slot_start_s=start, pan=pan,
    )  # fmt: skip


def _parse(clips) -> mido.MidiFile:
    buffer = io.BytesIO()
    midi.midi_file(clips).save(file=buffer)
    return mido.MidiFile(file=io.BytesIO(buffer.getvalue()))


def _absolute(track) -> list[tuple[int, mido.Message]]:
    """(tick, message) with absolute ticks (1 tick = 1 ms here)."""
    tick, out = 0, []
    for message in track:
        tick += message.time
        out.append((tick, message.copy(time=0)))
    return out


def test_small_plan_round_trip():
    clips = [
        _clip("a.wav", 0.5, [(0.0, 0.25, 60, 100), (0.25, 0.5, 62, 90)], program=40, controls=[(0.1, 11, 80)]),
        _clip("b.wav", 2.7, [(0.0, 0.1, 38, 127)], drums=True, program=25, pan=24),
    ]
    parsed = _parse(clips)
    assert parsed.type == 0 and len(parsed.tracks) == 1 and parsed.ticks_per_beat == midi.TICKS_PER_QUARTER
    events = _absolute(parsed.tracks[0])
    assert events[0] == (0, mido.MetaMessage("set_tempo", tempo=midi.TEMPO_US_PER_QUARTER, time=0))
    assert events[-1][1].type == "end_of_track"
    channel_messages = [(tick, message) for tick, message in events if not message.is_meta]

    def controls(channel, tick):
        return [(m.control, m.value) for t, m in channel_messages
                if t == tick and m.channel == channel and m.type == "control_change"]  # fmt: skip

    # Clip a on channel 0 from 500 ms: reset, melodic bank, program 40, levels and centre pan, then the notes.
    assert controls(0, 500) == [(121, 0), (0, 0), (32, 0), (7, 100), (11, 127), (10, 64)]
    assert [(t, m.channel, m.program) for t, m in channel_messages if m.type == "program_change"] == [
        (500, 0, 40), (2700, 1, 25),
    ]  # fmt: skip
    notes = [(t, m.type, m.channel, m.note, m.velocity) for t, m in channel_messages if m.type.startswith("note")]
    assert notes == [
        (500, "note_on", 0, 60, 100),
        (750, "note_off", 0, 60, 64),  # a note-off sorts before a note-on at the same tick
        (750, "note_on", 0, 62, 90),
        (1250, "note_off", 0, 62, 64),
        (2700, "note_on", 1, 38, 127),
        (2800, "note_off", 1, 38, 64),
    ]
    assert controls(0, 600) == [(11, 80)]
    # Each slot ends with its channel muted and its voices freed; clip b is a drum kit (XG bank 127), panned.
    assert controls(0, 2500) == [(7, 0), (11, 0), (120, 0)]
    assert controls(1, 2700) == [(121, 0), (0, 127), (32, 0), (7, 100), (11, 127), (10, 24)]
    assert controls(1, 4700) == [(7, 0), (11, 0), (120, 0)]
    # A harmless trailing message keeps the render running past the last slot.
    tail = mido.Message("control_change", channel=0, control=121, value=0)
    assert channel_messages[-1] == (4700 + midi.TAIL_MS, tail)


def test_built_plan_parses_back_to_its_notes_channels_and_programs():
    clips = make_plan(2018, clips_per_class=2, test_clips_per_class=1).clips  # 54 clips: channels wrap around
    events = _absolute(_parse(clips).tracks[0])
    ms = lambda seconds: int(round(seconds * 1000))  # noqa: E731
    expected_notes = sorted(
        (ms(clip.slot_start_s + onset), position % midi.MIDI_CHANNELS, pitch, velocity)
        for position, clip in enumerate(clips)
        for onset, _, pitch, velocity in clip.notes
    )
    notes_on = sorted((t, m.channel, m.note, m.velocity) for t, m in events if m.type == "note_on")
    assert notes_on == expected_notes
    offs = sum(m.type == "note_off" for _, m in events)
    assert offs == len(notes_on)
    programs = [(t, m.channel, m.program) for t, m in events if m.type == "program_change"]
    assert programs == [
        (ms(clip.slot_start_s), position % midi.MIDI_CHANNELS, clip.program) for position, clip in enumerate(clips)
    ]
    banks = [m.value for _, m in events if m.type == "control_change" and m.control == 0]
    assert banks == [midi.XG_DRUM_BANK if clip.drums else 0 for clip in clips]
    assert [t for t, _ in events] == sorted(t for t, _ in events)


def test_file_structure():
    buffer = io.BytesIO()
    midi.midi_file(make_plan(2018, clips_per_class=1, test_clips_per_class=1).clips).save(file=buffer)
    data = buffer.getvalue()
    assert data[:4] == b"MThd" and data[14:18] == b"MTrk"
    assert int.from_bytes(data[18:22], "big") == len(data) - 22
    assert data.endswith(b"\xff\x2f\x00")
