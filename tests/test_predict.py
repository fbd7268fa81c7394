"""helpers.predict as a user meets it: their own images read the way the test images were, the model's class names
and normalisation, GradCAM, and one clear line for every bad input, with nothing of theirs replaced."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import predict
from helpers.checkpoints import save_checkpoint
from helpers.predict import InputError, load_predictor


@pytest.fixture(scope="module")
def predictor(trained_run):
    return load_predictor(trained_run, device="cpu")


def run_main(argv, capsys) -> tuple[int, str, str]:
    code = predict.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def one_error_line(argv, capsys) -> str:
    """Run the command expecting exit status 2 and exactly one `error: ...` line; returns the message."""
    code, out, err = run_main(argv, capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0][len("error: "):]


def test_a_test_image_gets_the_probabilities_evaluate_gave_it(predictor, trained_run, tiny_arrays):
    """The same 32x32 through predict and through the test loader: the same normalisation, the same answer."""
    from helpers.data import make_loader
    from helpers.train import evaluate

    test = tiny_arrays[1]
    result = evaluate(predictor.model, make_loader(test, train=False, batch_size=50, workers=0), device="cpu")
    for i in (0, 7, 31):
        p = predictor.predict(test.images[i])
        assert np.array_equal(p.seen, test.images[i])  # a 32x32 input is used as it is
        np.testing.assert_allclose(p.probabilities, result.probabilities[i], atol=1e-5)
        assert p.index == result.predictions[i]


def test_path_pil_image_and_array_give_the_same_answer(predictor, tiny_arrays, tmp_path):
    image = tiny_arrays[1].images[3]
    Image.fromarray(image).save(tmp_path / "x.png")
    answers = [predictor.predict(x).probabilities for x in
               (tmp_path / "x.png", str(tmp_path / "x.png"), Image.fromarray(image), image, image / 255.0)]
    for a in answers[1:]:
        np.testing.assert_allclose(a, answers[0], atol=1e-6)
    assert predictor.predict(tmp_path / "x.png").name == "x.png"
    top = predict.predict(predictor, image, top=3)
    assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1] and 0 < sum(v for _, v in top) <= 1 + 1e-6


def test_a_wide_image_is_centre_cropped_not_squashed(predictor, tiny_arrays):
    image = tiny_arrays[1].images[5]
    wide = np.concatenate([np.zeros((32, 16, 3), np.uint8), image, np.full((32, 16, 3), 255, np.uint8)], axis=1)
    p = predictor.predict(wide)
    assert p.size == (64, 32)
    assert np.abs(p.seen.astype(int) - image).max() <= 1  # the middle square, resampled at scale 1
    assert p.square.shape == (predict.DISPLAY, predict.DISPLAY, 3)
    assert "centre 32x32 -> 32x32" in p.describe()


def test_a_large_photo_shrinks_to_its_average_colours(predictor):
    """Lanczos over the whole footprint: a fine checkerboard becomes mid-gray, not an aliased pattern."""
    board = ((np.indices((640, 480)).sum(0) % 2) * 255).astype(np.uint8).T  # (480, 640)
    p = predictor.predict(board)
    assert p.seen.shape == (32, 32, 3) and abs(p.seen.mean() - 127.5) < 8 and p.seen.std() < 8


def test_gray_rgba_palette_and_16_bit_images_become_rgb(predictor, tmp_path):
    gray = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))
    p = predictor.predict(gray)
    assert np.array_equal(p.seen[..., 0], p.seen[..., 2]) and p.mode == "L"
    clear = np.zeros((40, 40, 4), np.uint8)  # black and fully transparent: shown on white
    assert predictor.predict(clear).seen.min() == 255
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).convert("P").save(tmp_path / "p.gif")
    assert abs(int(predictor.predict(tmp_path / "p.gif").seen.mean()) - 200) <= 2
    Image.fromarray(np.full((40, 40), 65535 // 2, np.uint16)).save(tmp_path / "deep.png")
    assert abs(predictor.predict(tmp_path / "deep.png").seen.mean() - 127.5) <= 1


def test_a_phone_photo_is_turned_upright_by_its_exif(predictor, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: turn 90 degrees clockwise to view
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(tmp_path / "phone.jpg", exif=exif)
    assert predictor.predict(tmp_path / "phone.jpg").size == (20, 40)


def test_the_checkpoints_class_names_and_normalisation_are_used(trained_run, tmp_path, tiny_arrays):
    state = torch.load(trained_run / "checkpoint.pt", weights_only=True)
    names = [f"thing{i}" for i in range(10)]
    state |= {"classes": names, "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    custom = load_predictor(tmp_path, device="cpu")
    assert custom.classes == names and custom.mean == (0.5, 0.5, 0.5)
    x = custom.normalize(np.full((1, 32, 32, 3), 255, np.uint8))
    assert torch.allclose(x, torch.full_like(x, 2.0))  # (1 - 0.5) / 0.25
    assert custom.predict(tiny_arrays[1].images[0]).label in names
    old = load_predictor(trained_run, device="cpu")  # written without them: CIFAR-10's
    assert old.classes[0] == "airplane" and old.std == (0.2470, 0.2435, 0.2616)


def test_gradcam_map_of_any_class(predictor, tiny_arrays):
    p = predictor.predict(tiny_arrays[1].images[2])
    cams = [predictor.gradcam(p), predictor.gradcam(p, 3)]
    for cam in cams:
        assert cam.shape == (32, 32) and cam.min() >= 0 and cam.max() <= 1
    over = predict.overlay_on_square(p, cams[0])
    assert over.shape == (predict.DISPLAY, predict.DISPLAY, 3) and over.dtype == np.uint8


def test_command_prints_top_k_and_writes_the_gradcam_figure(trained_run, tiny_arrays, tmp_path, capsys):
    for i in range(2):
        Image.fromarray(tiny_arrays[1].images[i]).save(tmp_path / f"img{i}.png")
    figure = tmp_path / "figs" / "cam.png"
    code, out, _ = run_main([trained_run, tmp_path / "img0.png", tmp_path / "img1.png", "--top", "4",
                             "--gradcam", figure, "--class", "Truck", "--device", "cpu"], capsys)
    assert code == 0
    assert out.count("img0.png (32x32 RGB") == 1 and out.count("%") >= 8
    assert Image.open(figure).size[0] > 800
    predictor = load_predictor(trained_run, device="cpu")
    best, prob = predictor.predict(tmp_path / "img0.png").top(1)[0]
    assert f"{best:<12} {100 * prob:5.1f}%" in out


def test_gradcam_never_replaces_a_file_unless_overwrite(trained_run, tiny_arrays, tmp_path, capsys):
    Image.fromarray(tiny_arrays[1].images[0]).save(tmp_path / "img.png")
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"my own picture")
    assert "exists" in one_error_line([trained_run, tmp_path / "img.png", "--gradcam", mine], capsys)
    assert mine.read_bytes() == b"my own picture"
    code, _, _ = run_main([trained_run, tmp_path / "img.png", "--gradcam", mine, "--overwrite", "--device", "cpu"],
                          capsys)
    assert code == 0 and mine.read_bytes()[:4] == b"\x89PNG"


def test_bad_inputs_are_one_clear_line(trained_run, tiny_arrays, tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.fromarray(tiny_arrays[1].images[0]).save(good)
    (tmp_path / "notes.png").write_text("not a picture")
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    cases = {
        (trained_run, tmp_path / "notes.png"): "not an image",
        (trained_run, tmp_path): "is a folder",
        (trained_run, tmp_path / "cut.png"): "damaged or cut short",
        (trained_run, tmp_path / "absent.jpg"): "no such file",
        (tmp_path / "other.pt", good): "not a helpers.train checkpoint",
        (tmp_path / "nowhere", good): "no checkpoint at",
        (good, trained_run): "is an image, not a run: give the run first",  # the arguments swapped
        (trained_run, good, "--top", "0"): "choose 1 to 10",
        (trained_run, good, "--class", "unicorn"): "choose one of airplane",
        (trained_run, good, "--gradcam", tmp_path / "cam.txt"): "end the name in .png",
        (trained_run, good, "--gradcam", tmp_path): "is a folder",
    }
    for argv, expected in cases.items():
        assert expected in one_error_line(argv, capsys), argv
    assert not (tmp_path / "cam.txt").exists()
    # a good image before a bad one: nothing is printed for either
    assert "cut.png" in one_error_line([trained_run, good, tmp_path / "cut.png"], capsys)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((3, 32, 32), np.uint8), "channels last"),
    (np.zeros((32, 32, 3), np.int64), "uint8, or float"),
    (np.full((32, 32, 3), 2.0), "in [0, 1]"),
    (np.zeros((0, 5, 3), np.uint8), "channels last"),
    (42, "expected an image path"),
])
def test_bad_arrays_say_what_is_expected(predictor, bad, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        predictor.predict(bad)
