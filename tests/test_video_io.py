import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import frame_index, index_frames, psnr, smooth_frames, write_frame_folder
from utils.errors import UserError
from utils.video_io import (VideoReadError, count_frames, frame_number_gaps, gif_bytes,
                            list_frame_files, read_frames, save_grid_png, uint8_to_video_tensor,
                            video_tensor_to_uint8, write_video)


def test_mp4_round_trip_keeps_smooth_content(tmp_path):
    frames = smooth_frames(10, 32, 48)
    path = str(tmp_path / "sub" / "clip.mp4")  # the parent folder does not exist yet
    write_video(path, frames, fps=8)
    assert count_frames(path) == 10
    back = read_frames(path, range(10))
    assert back.shape == (10, 32, 48, 3) and back.dtype == np.uint8
    assert psnr(back, frames) > 30
    assert not [f for f in os.listdir(tmp_path / "sub") if ".tmp" in f]


def test_gif_round_trip_keeps_frames_and_loops(tmp_path):
    frames = smooth_frames(9, 24, 40)
    frames[4] = frames[3]  # identical neighbours must stay two frames
    path = str(tmp_path / "clip.gif")
    write_video(path, frames, fps=10)
    back = read_frames(path, range(9))
    assert count_frames(path) == 9 and back.shape == (9, 24, 40, 3)
    assert psnr(back, frames) > 25
    with Image.open(path) as im:
        assert im.n_frames == 9 and im.info["loop"] == 0  # 0 = loop forever


def test_odd_sizes_are_padded_to_even_for_h264(tmp_path):
    path = str(tmp_path / "odd.mp4")
    write_video(path, smooth_frames(3, 33, 47), fps=8)
    assert read_frames(path, [0]).shape == (1, 34, 48, 3)


@pytest.mark.parametrize("ext", [".mp4", ".gif", ".mkv"])  # mkv has no count: decoded to count
def test_read_frames_returns_requested_frames_in_order(tmp_path, ext):
    path = str(tmp_path / f"index{ext}")
    write_video(path, index_frames(12), fps=8)
    assert count_frames(path) == 12
    got = read_frames(path, [7, 0, 3, 3, 11])
    assert [frame_index(f) for f in got] == [7, 0, 3, 3, 11]
    with pytest.raises(VideoReadError, match="only 12 frames decode"):
        read_frames(path, [12])


def test_frame_folder_sorts_numerically_and_finds_gaps(tmp_path):
    frames = index_frames(6)
    write_frame_folder(str(tmp_path), frames, numbers=[1, 2, 10, 3, 11, 12])
    (tmp_path / "cover.png").write_bytes((tmp_path / "frame_1.png").read_bytes())  # no number
    (tmp_path / "notes.txt").write_text("not a frame")
    files = list_frame_files(str(tmp_path))
    assert [os.path.basename(f) for f in files] == [
        "frame_1.png", "frame_2.png", "frame_3.png", "frame_10.png", "frame_11.png", "frame_12.png"]
    assert frame_number_gaps(files) == [(4, 9)]
    assert count_frames(str(tmp_path)) == 6
    # frame_3.png holds index_frames()[3]; it is the 3rd frame in numeric order.
    assert [frame_index(f) for f in read_frames(str(tmp_path), [2, 3])] == [3, 2]


def test_gray_rgba_and_16bit_frames_become_rgb(tmp_path):
    Image.fromarray(np.full((8, 10), 100, np.uint8), "L").save(tmp_path / "f_0.png")
    Image.fromarray(np.full((8, 10, 4), 50, np.uint8), "RGBA").save(tmp_path / "f_1.png")
    Image.fromarray(np.full((8, 10), 200 * 257, np.uint16)).save(tmp_path / "f_2.png")
    Image.fromarray(np.full((8, 10, 3), 30, np.uint8)).save(tmp_path / "f_3.jpg")
    got = read_frames(str(tmp_path), [0, 1, 2, 3])
    assert got.shape == (4, 8, 10, 3) and got.dtype == np.uint8
    assert got[:3, 0, 0].tolist() == [[100] * 3, [50] * 3, [200] * 3]
    assert abs(int(got[3].mean()) - 30) <= 2


@pytest.mark.parametrize("content, reason", [(b"", "0 bytes"), (b"hello", "not a readable video")])
def test_bad_video_files_raise_named_errors(tmp_path, content, reason):
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(VideoReadError, match=reason) as e:
        count_frames(str(path))
    assert str(path) in str(e.value)


def test_tensor_uint8_round_trip_is_exact():
    frames = np.random.default_rng(0).integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    video = uint8_to_video_tensor(frames)
    assert video.shape == (3, 5, 6, 7) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    assert np.array_equal(video_tensor_to_uint8(video), frames)
    assert video_tensor_to_uint8(torch.full((3, 1, 2, 2), 5.0)).max() == 255  # clamped


def test_gif_bytes_is_an_animated_gif():
    data = gif_bytes(index_frames(5), fps=4)
    assert data[:6] == b"GIF89a"
    with Image.open(io.BytesIO(data)) as im:
        assert im.n_frames == 5


def test_save_grid_png_has_one_row_per_video_and_one_column_per_frame(tmp_path):
    path = str(tmp_path / "grid.png")
    save_grid_png(path, [index_frames(20, 8, 10), index_frames(3, 8, 10)], max_frames=16)
    with Image.open(path) as im:
        assert im.size == (16 * 10 + 15 * 2, 2 * 8 + 2)  # (width, height), 2 px separators
        grid = np.asarray(im)
    assert frame_index(grid[:8, :10]) == 0 and frame_index(grid[:8, -10:]) == 19


def test_write_video_refuses_bad_destinations(tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    bad = str(tmp_path / "file" / "clip.mp4")
    with pytest.raises(UserError, match="cannot write .*clip.mp4"):
        write_video(bad, index_frames(2), fps=8)
    with pytest.raises(UserError, match="use one of"):
        write_video(str(tmp_path / "clip.webm"), index_frames(2), fps=8)
