"""Crab+ media decoding: streaming resampling (soxr / PyAV) against an analytic reference, upstream Crab+'s per-task
audio windows and frame counts (``data.upstream_media``), and the recipe's global batch."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")
sf = pytest.importorskip("soundfile")

from ilora_kernels.crab.config import DataSection, load_config  # noqa: E402
from ilora_kernels.crab.data import (  # noqa: E402
    Sample,
    StreamResampler,
    _decode_media,
    apply_audio_windows,
    load_audio,
    load_video_frames,
    media_num_frames,
    resample_audio,
)
from ilora_kernels.crab.tasks import TASKS, UPSTREAM_AUDIO_WINDOWS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SR = 16000
EMOTION = ("meld", "mer24", "cremad", "mafw", "dfew")
HAVE_SOXR = importlib.util.find_spec("soxr") is not None
BACKENDS = [pytest.param("soxr", marks=pytest.mark.skipif(not HAVE_SOXR, reason="soxr not installed")), "pyav"]


def _tone(freq, sr, seconds, amp=0.5):
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(round(seconds * sr))) / sr)).astype(np.float32)


# --------------------------------------------------------------------------------------------------- resampling
@pytest.mark.parametrize("backend", BACKENDS)
def test_resampled_tone_matches_the_analytic_reference(backend, tmp_path):
    x = _tone(440, 44100, 3.0)
    y = resample_audio(x, 44100, SR, backend=backend)
    ref = _tone(440, SR, 3.0)
    assert y.dtype == np.float32 and y.shape == ref.shape          # round(n * 16000 / 44100) samples
    tol = 1e-4 if backend == "soxr" else 2e-3
    inner = slice(SR // 10, -SR // 10)                             # away from the filter's edges
    assert np.abs(y[inner] - ref[inner]).max() < tol
    # no aliasing: a 7 kHz tone at 22.05 kHz is above 8 kHz's Nyquist (4 kHz) and is removed
    z = resample_audio(_tone(7000, 22050, 1.0, amp=1.0), 22050, 8000, backend=backend)
    assert np.abs(z[400:-400]).max() < 1e-2
    assert resample_audio(np.ones(8000), 8000, 16000, backend=backend).shape == (16000,)
    # the file path streams block by block: stereo 44.1 kHz wav -> mono 16 kHz equals resampling the mono mix
    stereo = np.stack([x, 0.5 * x], 1)
    p = tmp_path / "s.wav"
    sf.write(str(p), stereo, 44100, subtype="FLOAT")
    w = load_audio(p, SR, resampler=backend)
    np.testing.assert_allclose(w, resample_audio(stereo.mean(1), 44100, SR, backend=backend), atol=1e-6)
    assert load_audio(p, SR, max_seconds=0.5, resampler=backend).shape == (8000,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_in_uneven_blocks_equals_one_call(backend):
    x = np.random.default_rng(0).standard_normal(50000).astype(np.float32)
    rs = StreamResampler(48000, SR, backend)
    for a, b in ((0, 7), (7, 12345), (12345, 12346), (12346, 50000)):
        rs.feed(x[a:b])
    np.testing.assert_allclose(rs.finish(), resample_audio(x, 48000, SR, backend=backend), atol=1e-6)
    same = StreamResampler(SR, SR)
    same.feed(x)
    assert np.array_equal(same.finish(), x)
    with pytest.raises(ValueError, match="resampler must be one of"):
        StreamResampler(44100, SR, "fft")


def test_pyav_container_audio_streams_through_the_resampler(tmp_path):
    m4a = tmp_path / "s.m4a"
    with av.open(str(m4a), "w") as c:
        st = c.add_stream("aac", rate=22050)
        st.layout = "stereo"
        x = _tone(440, 22050, 2.0)
        fr = av.AudioFrame.from_ndarray(np.stack([x, x]), format="fltp", layout="stereo")
        fr.sample_rate = 22050
        for pkt in [*st.encode(fr), *st.encode(None)]:
            c.mux(pkt)
    for backend in ("pyav",) + (("soxr",) if HAVE_SOXR else ()):
        w = load_audio(m4a, SR, resampler=backend)
        assert abs(w.shape[0] - 32000) < 2000                               # 2 s (+ AAC priming)
        assert abs(np.argmax(np.abs(np.fft.rfft(w))) * SR / len(w) - 440) <= 2
        assert load_audio(m4a, SR, max_seconds=0.5, resampler=backend).shape == (8000,)


# --------------------------------------------------------------------------------------------------- audio windows
def _ramp_wav(tmp_path, name, n):
    """A 16 kHz float wav whose sample i holds the value i + 1 (exact in float32): a window's values are its
    sample range; 0 is padding."""
    p = tmp_path / f"{name}.wav"
    sf.write(str(p), np.arange(1, n + 1, dtype=np.float32), SR, subtype="FLOAT")
    return p


def _audio(task, path, raw=None, upstream=True, max_seconds=None, **attrs):
    s = Sample(task=task, index=0, target="x", instruction="", media={"audio": [Path(path)]}, raw=dict(raw or {}))
    for k, v in attrs.items():
        setattr(s, k, v)
    _, _, _, audios = _decode_media(s, SR, 10, 32, max_seconds, upstream_media=upstream)
    assert len(audios) == 1 and audios[0].dtype == np.float32
    return audios[0]


def _r(a, b):
    """Samples a..b-1 of a ramp file."""
    return np.arange(a + 1, b + 1, dtype=np.float32)


def _z(n):
    return np.zeros(n, dtype=np.float32)


def test_avqa_ten_2s_windows(tmp_path):
    # a 60-s clip: upstream cuts it into 60 parts of 1 s, windows [c - 0.5, c + 1.5) s for c = 0, 6, ..., 54
    got = _audio("avqa", _ramp_wav(tmp_path, "avqa", 60 * SR))
    want = [np.concatenate([_z(SR // 2), _r(0, 3 * SR // 2)])]
    want += [_r(int((c - 0.5) * SR), int((c + 1.5) * SR)) for c in range(6, 60, 6)]
    assert np.array_equal(got, np.concatenate(want)) and got.shape == (20 * SR,)
    # a 6-s clip: the same windows in parts of 0.1 s (upstream assumes 60 parts whatever the length)
    u = 6 * SR // 60
    got = _audio("avqa", _ramp_wav(tmp_path, "avqa6", 6 * SR))
    want = [np.concatenate([_z(u // 2), _r(0, 3 * u // 2)])] + [_r(int((c - .5) * u), int((c + 1.5) * u))
                                                                for c in range(6, 60, 6)]
    assert np.array_equal(got, np.concatenate(want))


@pytest.mark.parametrize("task", EMOTION)
def test_emotion_tasks_first_4s(task, tmp_path):
    assert np.array_equal(_audio(task, _ramp_wav(tmp_path, "long", 7 * SR)), _r(0, 4 * SR))
    # shorter than 4 s: padded with silence at the end
    short = int(2.5 * SR)
    assert np.array_equal(_audio(task, _ramp_wav(tmp_path, "short", short)),
                          np.concatenate([_r(0, short), _z(4 * SR - short)]))


def test_image_tasks_one_window_at_the_frame_index(tmp_path):
    five = _ramp_wav(tmp_path, "five", 5 * SR)
    for task in ("s4", "ms3"):
        assert np.array_equal(_audio(task, five, raw={"frame_idx": 3}), _r(3 * SR, 4 * SR))
        assert np.array_equal(_audio(task, five), _r(0, SR))                       # no index: 0
        # the reader's Sample.audio_window wins over the record's fields (upstream's s4 train uses 0)
        assert np.array_equal(_audio(task, five, raw={"frame_idx": 3}, audio_window=1), _r(SR, 2 * SR))
        assert np.array_equal(_audio(task, five, raw={"frame_idx": 9}), _z(SR))     # past the clip: silence
    ten = _ramp_wav(tmp_path, "ten", 10 * SR)
    assert np.array_equal(_audio("ref_avs", ten, raw={"idx": 7}), _r(7 * SR, 8 * SR))
    assert np.array_equal(_audio("ref_avs", ten, raw={"frame_idx": 2}), _r(2 * SR, 3 * SR))
    assert np.array_equal(_audio("ref_avs", ten, frame_idx=4), _r(4 * SR, 5 * SR))


def test_whole_clip_tasks_and_switching_off(tmp_path):
    odd = _ramp_wav(tmp_path, "odd", 10 * SR + 7)
    for task in ("ks", "ucf", "ave", "avvp", "unav", "avcap", "avqa_thu", "a2v", "v2a"):
        assert np.array_equal(_audio(task, odd), _r(0, 10 * SR))                 # 10 whole parts
    assert np.array_equal(_audio("arig", odd), _r(0, 10 * SR + 5))              # 5 whole parts
    tiny = _ramp_wav(tmp_path, "tiny", SR // 2)                                  # padded to 1 s first
    assert np.array_equal(_audio("ks", tiny), np.concatenate([_r(0, SR // 2), _z(SR // 2)]))
    assert np.array_equal(_audio("ks", odd, max_seconds=2.0), _r(0, 2 * SR))    # then capped (30 s in training)
    # switched off: today's behaviour, the file's first max_seconds whatever the task
    long = _ramp_wav(tmp_path, "long", 7 * SR)
    assert np.array_equal(_audio("meld", long, upstream=False), _r(0, 7 * SR))
    assert np.array_equal(_audio("avqa", long, upstream=False, max_seconds=3.0), _r(0, 3 * SR))
    assert np.array_equal(_audio("s4", long, raw={"frame_idx": 3}, upstream=False), _r(0, 7 * SR))
    assert np.array_equal(apply_audio_windows(_r(0, 100), None, SR), np.concatenate([_r(0, 100), _z(SR - 100)]))


def test_every_task_has_upstreams_window():
    assert set(UPSTREAM_AUDIO_WINDOWS) == set(TASKS)
    avqa = TASKS["avqa"].audio_windows
    assert (avqa.units, avqa.length, len(avqa.starts)) == (60, 2.0, 10)
    for t in EMOTION:
        w = TASKS[t].audio_windows
        assert (w.units, w.starts, w.length, w.read_seconds) == (None, (0.0,), 4.0, 4.0)
    assert [(TASKS[t].audio_windows.units, TASKS[t].audio_windows.indexed) for t in ("s4", "ms3", "ref_avs")] == \
        [(5, True), (5, True), (10, True)]


# --------------------------------------------------------------------------------------------------- video frames
def _numbered_video(path, n=20, size=32):
    """An mp4 whose frame i is a flat grey of level 10 * i + 20."""
    with av.open(str(path), "w") as c:
        st = c.add_stream("mpeg4", rate=10)
        st.width = st.height = size
        st.pix_fmt = "yuv420p"
        st.options = {"qscale": "1"}
        for i in range(n):
            img = np.full((size, size, 3), 10 * i + 20, dtype=np.uint8)
            for pkt in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in st.encode(None):
            c.mux(pkt)
    return path


def _frame_ids(frames):
    return [int(round((float(f.float().mean()) - 20) / 10)) for f in frames]


def test_emotion_tasks_get_4_frames_sampled_first_to_last(tmp_path):
    vid = _numbered_video(tmp_path / "v.mp4")
    frames, _ = load_video_frames(vid, 4, 32, sampling="linspace")
    assert _frame_ids(frames) == [0, 6, 13, 19]                    # round(linspace(0, 19, 4))
    frames, _ = load_video_frames(vid, 4, 32)
    assert _frame_ids(frames) == [2, 7, 12, 17]                    # segment midpoints (switched off)
    for task in TASKS:
        assert media_num_frames(task, 10, upstream_media=True) == (4 if task in EMOTION else 10)
        assert media_num_frames(task, 10, upstream_media=False) == 10
    for task, upstream, n in (("meld", True, 4), ("dfew", True, 4), ("ks", True, 10), ("meld", False, 10)):
        s = Sample(task=task, index=0, target="x", instruction="", media={"video": [vid]})
        videos, durations, _, _ = _decode_media(s, SR, 10, 32, None, upstream_media=upstream)
        assert videos[0].shape == (n, 3, 32, 32) and durations[0] == pytest.approx(2.0, abs=0.2)
    with pytest.raises(ValueError, match="frame sampling"):
        load_video_frames(vid, 4, 32, sampling="random")


# --------------------------------------------------------------------------------------------------- recipe config
def test_recipe_feeds_upstream_media_and_upstreams_global_batch():
    import yaml

    plus = load_config(ROOT / "configs" / "crab_plus.yaml")
    assert plus.data.upstream_media is True and DataSection().upstream_media is True
    assert plus.data.num_frames == 10
    off = load_config(ROOT / "configs" / "crab_plus.yaml", {"data.upstream_media": False})
    assert off.data.upstream_media is False
    # the header's launch: configs/accelerate/zero2.yaml's processes x per device x accumulation = upstream's 8
    procs = yaml.safe_load((ROOT / "configs" / "accelerate" / "zero2.yaml").read_text())["num_processes"]
    t = plus.training
    assert procs * t.per_device_train_batch_size * t.gradient_accumulation_steps == 8
