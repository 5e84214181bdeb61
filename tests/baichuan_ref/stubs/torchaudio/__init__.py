"""Stand-in for `torchaudio` (our own code, for the Baichuan-Omni reference harness).

processor_omni.py imports torchaudio at module level, and its OmniAudioProcessor uses:
- `torchaudio.list_audio_backends()` (asserts it is non-empty),
- `torchaudio.info(uri)` -> .sample_rate / .num_channels (/ .num_frames),
- `torchaudio.load(uri, normalize=True)` -> (float32 tensor [channels, samples], sample_rate),
- `torchaudio.functional.resample(...)` only when the file is not at 16 kHz.

The model classes themselves never touch torchaudio. Installing the real package would pull a
second torch-matched binary, so this stub reads uncompressed PCM WAV files with the standard
library's `wave` module and converts them exactly as torchaudio's normalize=True does for integer
PCM: int16 / 2**15, int32 / 2**31, uint8 (x - 128) / 2**7, giving float32. The harness writes its
audio as 16 kHz mono int16 WAV, so `resample` is never needed; it raises unless the rates match.
"""

from __future__ import annotations

import sys
import types
import wave
from dataclasses import dataclass

import numpy as np
import torch

__version__ = "0.0.0+baichuan-ref-stub"


@dataclass
class AudioMetaData:
    sample_rate: int
    num_frames: int
    num_channels: int
    bits_per_sample: int
    encoding: str


def list_audio_backends():
    return ["wave-stub"]


def info(uri, *args, **kwargs) -> AudioMetaData:
    with wave.open(str(uri), "rb") as w:
        return AudioMetaData(
            sample_rate=w.getframerate(),
            num_frames=w.getnframes(),
            num_channels=w.getnchannels(),
            bits_per_sample=8 * w.getsampwidth(),
            encoding="PCM_S" if w.getsampwidth() > 1 else "PCM_U",
        )


def load(uri, frame_offset: int = 0, num_frames: int = -1, normalize: bool = True,
         channels_first: bool = True, *args, **kwargs):
    with wave.open(str(uri), "rb") as w:
        sr, ch, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
        w.setpos(frame_offset)
        n = w.getnframes() - frame_offset if num_frames < 0 else num_frames
        raw = w.readframes(n)
    if width == 2:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0 if normalize else np.frombuffer(raw, dtype="<i2")
    elif width == 4:
        x = (np.frombuffer(raw, dtype="<i4").astype(np.float64) / 2147483648.0).astype(np.float32) if normalize else np.frombuffer(raw, dtype="<i4")
    elif width == 1:
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0 if normalize else np.frombuffer(raw, dtype=np.uint8)
    else:
        raise NotImplementedError(f"torchaudio stub: {8 * width}-bit PCM is not supported")
    x = torch.from_numpy(np.ascontiguousarray(x.reshape(-1, ch)))
    return (x.t().contiguous() if channels_first else x), sr


def _resample(waveform, orig_freq, new_freq, *args, **kwargs):
    if int(orig_freq) == int(new_freq):
        return waveform
    raise NotImplementedError(
        "torchaudio stub: resampling is not implemented; write the audio at 16 kHz")


functional = types.ModuleType(f"{__name__}.functional", "stub of torchaudio.functional")
functional.resample = _resample
sys.modules[functional.__name__] = functional
